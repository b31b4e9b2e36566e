"""Blob backends: where the daemon reads compressed chunk bytes from.

A backend only moves bytes: `read_range(blob_id, offset, length)` returns exactly
`length` bytes of the blob file or raises `BackendError`.  The daemon core merges
and amplifies ranges before calling it, and verifies every chunk's digest after.
"""

from __future__ import annotations

import os
from typing import Protocol

from erofs_nydus.errors import BackendError


class BlobBackend(Protocol):
    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        """Return bytes [offset, offset+length) of the blob file named by blob_id."""
        ...

    def close(self) -> None: ...


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
                data = os.pread(f.fileno(), length, offset)
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
