"""Give the C heap's free memory back to the system after a bootstrap was parsed.

A daemon reads each bootstrap it registers whole (19 MB at 100k files) and parses it
into a packed chunk index of a few MB: the transient buffers are freed, but glibc
keeps them.  Freeing a large block raises its dynamic mmap threshold (up to 32 MiB),
so the next big buffers come from the heap and the per-thread arenas (registration
runs in a worker thread), where freed pages stay resident.  Measured at 50k files:
the worker kept 25 MiB more after `register` and a prefetch-table parse than the
index needs.  So a daemon fixes the threshold at MMAP_THRESHOLD (`configure()`:
buffers that big are mmapped and unmapped when freed; chunk-sized ones below it are
still reused from the heap) and calls `malloc_trim(0)` after each parse (`trim()`)
for what smaller transient objects leave behind.

Rare (control operations, not the read path) and cheap (milliseconds).  No-op where
the C library has no `malloc_trim` (musl): the memory is then reused, not returned.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

__all__ = ["MMAP_THRESHOLD", "configure", "trim"]

MMAP_THRESHOLD = 2 << 20  # above a 1 MiB chunk (decompressed or read), below most bootstraps
_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
_lock = threading.Lock()
_libc: ctypes.CDLL | None = None
_looked_up = False
_configured = False


def _glibc() -> ctypes.CDLL | None:
    global _libc, _looked_up
    if not _looked_up:
        _looked_up = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            return None
        _libc = libc
    return _libc


def configure() -> bool:
    """Fix the mmap threshold at MMAP_THRESHOLD for this process (once); False where
    the C library cannot (then only `trim` helps, if it exists)."""
    global _configured
    with _lock:
        if not _configured:
            libc = _glibc()
            _configured = bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD,
                                                                 MMAP_THRESHOLD))
        return _configured


def trim() -> None:
    """Return the C heap's free pages to the system (glibc `malloc_trim(0)`)."""
    with _lock:
        libc = _glibc()
        if libc is not None:
            libc.malloc_trim(0)
