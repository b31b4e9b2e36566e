"""fscache mode: the /dev/cachefiles on-demand protocol (see :mod:`.protocol`)."""
