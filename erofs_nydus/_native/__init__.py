"""Compiled kernel ABI bindings (cffi API mode): _cachefiles and _fanotify."""
