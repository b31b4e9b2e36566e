"""fanotify request source (Linux >= 6.14): FAN_PRE_ACCESS on each blob's cache file.

Owns: `protocol` (sans-I/O event / response codec) and `handler` (group and mark
syscalls, `FanotifyHandler`: turn one pre-access event into a core fill, then ALLOW,
or DENY with EIO).  The symmetric sibling of `erofs_nydus.fscache`.

May import: `daemon` (the core), `layout`, `errors`, `_native`.  No process code.
"""
