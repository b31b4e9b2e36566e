"""fscache request source: EROFS over /dev/cachefiles on-demand (Linux 5.19+, restore 6.8+).

Owns:
- :mod:`.protocol`  sans-I/O codec of the device's messages and commands;
- :mod:`.device`    open + ``dir`` + ``bind ondemand`` with errors that name the fix;
- :mod:`.objects`   the table of open cachefiles objects (anon fds) per cookie.

The symmetric sibling of `erofs_nydus.fanotify`.  The process shell that runs the
request loop (supervisor holding the device fd, worker, CLI side) lives in `service`
(`service.fscache_daemon`, `service.fscache_client`).

May import: `daemon` (the core), `layout`, `errors`, `_native`, `mount`.  No process code.
"""
