"""Blob backends: where the daemon reads compressed chunk bytes from.

A backend only moves bytes: `read_range(blob_id, offset, length)` returns exactly
`length` bytes of the blob file or raises `BackendError`.  The daemon core merges
and amplifies ranges before calling it, and verifies every chunk's digest after.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

from erofs_nydus.errors import BackendError

_listener = threading.local()


@contextlib.contextmanager
def counting_retries(on_retry: Callable[[], None]) -> Iterator[None]:
    """Call `on_retry` for every retry a backend makes in this thread meanwhile.

    Backends retry inside `read_range` (the registry client, with backoff); the daemon
    core wraps its reads in this to count them into its metrics, whatever client or
    connection pool the backend shares with others.
    """
    previous = getattr(_listener, "cb", None)
    _listener.cb = on_retry
    try:
        yield
    finally:
        _listener.cb = previous


def note_retry() -> None:
    """Report one retry to the listener of this thread, if any (backends call this)."""
    cb = getattr(_listener, "cb", None)
    if cb is not None:
        cb()


_paths_lock = threading.Lock()
_paths: dict[str, dict[str, int]] = {}


def note_path(path: str, *, ok: bool | None = None, nbytes: int = 0,
              healthy: bool | None = None, miss: bool = False,
              diverted: bool = False) -> None:  # fmt: skip
    """Count a read served (`ok`) or failed by one network path of a backend ("origin",
    "mirror <url>", "proxy <url>"), or passed on because the path did not hold the blob
    yet (`miss`: it answered with the whole blob), or passed over without asking it
    (`diverted`: a mirror still storing the blob), and/or record whether that path is
    in use."""
    with _paths_lock:
        c = _paths.setdefault(path, {"reads": 0, "errors": 0, "misses": 0, "diverted": 0,
                                     "bytes": 0, "healthy": 1})  # fmt: skip
        if ok is not None:
            c["reads" if ok else "errors"] += 1
        if miss:
            c["misses"] += 1
        if diverted:
            c["diverted"] += 1
        c["bytes"] += nbytes
        if healthy is not None:
            c["healthy"] = int(healthy)


def path_counters() -> dict[str, dict[str, int]]:
    """Per path: reads served, errors, misses, diverted, bytes served, healthy (0/1),
    since the process started."""
    with _paths_lock:
        return {k: dict(v) for k, v in _paths.items()}


class BlobBackend(Protocol):
    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        """Return bytes [offset, offset+length) of the blob file named by blob_id."""
        ...

    def close(self) -> None: ...


class RejectingBackend(BlobBackend, Protocol):
    def reject(self, blob_id: str, offset: int, length: int) -> bool:
        """The bytes the last read of exactly this range returned failed their digest.
        True when a second read may come from elsewhere (a mirror served them: the
        next read of this range goes to the origin); False when retrying is useless."""
        ...


class LocalDirBackend:
    """Blobs as files `<dir>/<blob_id>` (what `erofs-nydus create --blob-dir` writes)."""

    def __init__(self, blob_dir: str | os.PathLike[str]) -> None:
        self.blob_dir = os.fspath(blob_dir)

    def path(self, blob_id: str) -> str:
        return os.path.join(self.blob_dir, blob_id)

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        path = self.path(blob_id)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                # refuse before allocating: offsets and lengths come from bootstraps
                ok = offset >= 0 and length >= 0 and offset + length <= size
                data = os.pread(f.fileno(), length, offset) if ok else b""
        except OSError as exc:
            raise BackendError(f"blob {blob_id}: cannot read {path}: {exc.strerror}") from exc
        if len(data) != length:
            raise BackendError(
                f"blob {blob_id}: short read at {offset}+{length} (got {len(data)} bytes; "
                "blob truncated?)"
            )
        return data

    def close(self) -> None:
        pass
