"""Access traces: which chunks of an image a workload touched first, and when.

The daemon keeps one `ImageTrace` per registered image.  Every request source call
that names chunks of a blob (`BlobServer.is_present` / `fill`, through the server's
`tracer` hook) reports them here; the first access of each chunk is appended as
(blob id, uncompressed offset, seconds since the image was registered).  Later
accesses of the same chunk cost one bit test.  Memory is bounded: at most
`max_entries` chunks per image are recorded (the rest are counted as dropped), and an
entry costs 18 bytes in three arrays plus a bit per chunk in a per-blob map of chunk
indexes: tracing every chunk of a 200k-chunk image takes ~4 MB (tuples and a set of
keys took ~45 MB).

`ImageTrace.document()` is the trace file format `optimize.py` reads (version 1).
"""

from __future__ import annotations

import threading
import time
from array import array
from collections.abc import Sequence
from typing import Any

from erofs_nydus.rafs.image import ChunkInfo

__all__ = ["DEFAULT_MAX_ENTRIES", "TRACE_VERSION", "ImageTrace", "TraceBook"]

TRACE_VERSION = 1
DEFAULT_MAX_ENTRIES = 1 << 18  # 256 Ki chunks: 256 GiB of 1 MiB chunks, ~5 MiB of memory


class ImageTrace:
    def __init__(self, fsid: str, blob_ids: list[str], max_entries: int) -> None:
        self.fsid = fsid
        self.blob_ids = list(blob_ids)
        self.max_entries = max_entries
        self.started = time.monotonic()
        self._names: list[str] = []  # blob ids, numbered in order of first access
        self._number: dict[str, int] = {}
        self._blob = array("H")  # per entry: number of its blob id
        self._offset = array("Q")  # per entry: uncompressed offset of the chunk
        self._time = array("d")  # per entry: seconds since `started`
        self._seen: dict[str, bytearray] = {}  # blob id -> bit per CI index recorded
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._offset)

    def record(self, blob_id: str, chunks: Sequence[ChunkInfo], now: float) -> None:
        seen = self._seen.get(blob_id)
        if seen is None:
            seen = self._seen[blob_id] = bytearray()
        number = self._number.get(blob_id)
        for c in chunks:
            byte, bit = c.index >> 3, 1 << (c.index & 7)
            if byte < len(seen) and seen[byte] & bit:
                continue
            if len(self._offset) >= self.max_entries:
                self.dropped += 1
                continue
            if byte >= len(seen):
                seen.extend(bytes(byte + 1 - len(seen)))
            seen[byte] |= bit
            if number is None:
                number = self._number[blob_id] = len(self._names)
                self._names.append(blob_id)
            self._blob.append(number)
            self._offset.append(c.uncompressed_offset)
            self._time.append(now - self.started)

    def document(self) -> dict[str, Any]:
        names = self._names
        return {
            "version": TRACE_VERSION,
            "fsid": self.fsid,
            "blobs": self.blob_ids,
            "accesses": [
                {"blob": names[b], "offset": off, "t": round(t, 6)}
                for b, off, t in zip(self._blob, self._offset, self._time, strict=True)
            ],
            "dropped": self.dropped,
        }


class TraceBook:
    """The traces of every image a daemon serves.  Thread-safe."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self.traces: dict[str, ImageTrace] = {}
        self._by_blob: dict[str, list[ImageTrace]] = {}
        self._lock = threading.Lock()

    def add_image(self, fsid: str, blob_ids: list[str]) -> None:
        """Start tracing `fsid` (no-op if it is already traced: a second mount)."""
        with self._lock:
            if fsid in self.traces:
                return
            tr = ImageTrace(fsid, blob_ids, self.max_entries)
            self.traces[fsid] = tr
            for b in dict.fromkeys(blob_ids):
                self._by_blob.setdefault(b, []).append(tr)

    def remove_image(self, fsid: str) -> None:
        with self._lock:
            tr = self.traces.pop(fsid, None)
            if tr is None:
                return
            for b in dict.fromkeys(tr.blob_ids):
                lst = [t for t in self._by_blob.get(b, []) if t is not tr]
                if lst:
                    self._by_blob[b] = lst
                else:
                    self._by_blob.pop(b, None)

    def on_access(self, blob_id: str, chunks: Sequence[ChunkInfo]) -> None:
        """The `BlobServer.tracer` hook (hot path)."""
        if not chunks:
            return
        with self._lock:
            lst = self._by_blob.get(blob_id)
            if not lst:
                return
            now = time.monotonic()
            for tr in lst:
                tr.record(blob_id, chunks, now)

    def document(self, fsid: str) -> dict[str, Any] | None:
        with self._lock:
            tr = self.traces.get(fsid)
            return None if tr is None else tr.document()

    def summary(self, fsid: str) -> dict[str, int]:
        with self._lock:
            tr = self.traces.get(fsid)
            if tr is None:
                return {"chunks": 0, "dropped": 0}
            return {"chunks": len(tr), "dropped": tr.dropped}
