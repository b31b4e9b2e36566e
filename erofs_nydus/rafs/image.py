"""Read-side model of a RAFS v6 image: what the daemon, checker, merger and
inspector need to know about a bootstrap, without touching the kernel.

`rafs.reader.load_image()` parses and validates a bootstrap (see `layout/`) and
returns a `RafsImage`; this module only defines the values (no parsing: the reader
imports it, never the other way round).  The chunk lists per blob come from the
bootstrap's chunk table (RafsV5ChunkInfo, 80 B each), which carries every chunk's
digest and its offsets in both the compressed blob and the uncompressed (cache)
address space.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """One unique chunk of one blob."""

    digest: bytes  # sha256 of the uncompressed chunk, 32 bytes
    blob_index: int
    index: int  # position in the blob's chunk-info (CI) array
    compressed_offset: int  # in the blob file
    compressed_size: int
    uncompressed_offset: int  # in the blob's 4 KiB-aligned address space (cache file)
    uncompressed_size: int
    compressed: bool  # False: stored raw (compressed_size == uncompressed_size)

    @property
    def aligned_size(self) -> int:
        """Bytes this chunk occupies in the cache file (size rounded up to 4 KiB)."""
        return (self.uncompressed_size + 4095) & ~4095


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One data blob as the blob table describes it."""

    blob_id: str  # 64 hex chars: sha256 of the blob file
    blob_index: int  # device_id - 1
    chunk_size: int
    chunk_count: int
    compressor: str  # "none" | "lz4"
    digester: str  # "sha256"
    compressed_size: int  # bytes of chunk data in the blob file (before the CI table)
    uncompressed_size: int  # size of the cache file / fscache object, a 4 KiB multiple
    ci_offset: int  # offset of the chunk-info array in the blob file
    ci_compressed_size: int
    ci_uncompressed_size: int
    features: int


@dataclass(slots=True)
class RafsImage:
    """A parsed, validated bootstrap."""

    bootstrap_size: int
    chunk_size: int
    flags: int
    blobs: list[BlobInfo]
    chunks: list[list[ChunkInfo]] = field(default_factory=list)  # per blob, by uncompressed_offset
    fsid: str = ""  # sha256 hex of the bootstrap bytes: content-addressed fscache cookie

    def chunks_for_blob(self, blob_index: int) -> list[ChunkInfo]:
        return self.chunks[blob_index]

    def chunks_in_range(self, blob_index: int, offset: int, length: int) -> list[ChunkInfo]:
        """Chunks of a blob whose aligned extent overlaps [offset, offset+length)."""
        chunks = self.chunks[blob_index]
        starts = [c.uncompressed_offset for c in chunks]
        i = max(bisect.bisect_right(starts, offset) - 1, 0)
        out: list[ChunkInfo] = []
        end = offset + length
        while i < len(chunks) and chunks[i].uncompressed_offset < end:
            c = chunks[i]
            if c.uncompressed_offset + c.aligned_size > offset:
                out.append(c)
            i += 1
        return out

