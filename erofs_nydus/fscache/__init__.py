"""fscache mode: EROFS over /dev/cachefiles on-demand (Linux 5.19+, restore 6.8+).

- :mod:`.protocol`  sans-I/O codec of the device's messages and commands;
- :mod:`.device`    open + ``dir`` + ``bind ondemand`` with errors that name the fix;
- :mod:`.objects`   the table of open cachefiles objects (anon fds) per cookie;
- :mod:`.daemon`    supervisor (holds the device fd) + worker (request loop over the
  daemon core), ``python -m erofs_nydus.service.fscache_daemon --cache-dir DIR``;
- :mod:`.client`    CLI side: start the daemon, register, ``mount -t erofs -o fsid=...``.
"""
