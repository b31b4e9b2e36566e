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

    digest: bytes  # `digester` hash of the uncompressed chunk, 32 bytes
    blob_index: int
    index: int  # position in the blob's chunk-info (CI) array
    compressed_offset: int  # in the blob file
    compressed_size: int
    uncompressed_offset: int  # in the blob's 4 KiB-aligned address space (cache file)
    uncompressed_size: int
    compressed: bool  # False: stored raw (compressed_size == uncompressed_size)
    compressor: str = "lz4"  # the blob's compressor, applied when `compressed`
    digester: str = "sha256"  # "sha256" | "blake3": how `digest` was computed

    @property
    def aligned_size(self) -> int:
        """Bytes this chunk occupies in the cache file (size rounded up to 4 KiB)."""
        return (self.uncompressed_size + 4095) & ~4095


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """One data blob as the blob table describes it."""

    blob_id: str  # 64 hex chars; which bytes it hashes: rafs.check.blob_id_rule
    blob_index: int  # device_id - 1
    chunk_size: int
    chunk_count: int
    compressor: str  # "none" | "lz4" | "zstd"
    digester: str  # "sha256" | "blake3"
    compressed_size: int  # chunk data bytes (before the CI table); CAP_TAR_TOC: file size
    uncompressed_size: int  # size of the cache file / fscache object, a 4 KiB multiple
    ci_offset: int  # offset of the chunk-info array in the blob file
    ci_compressed_size: int
    ci_uncompressed_size: int
    features: int
    ci_compressor: str = "none"
    blob_toc_size: int = 0  # HAS_TOC: bytes of ToC (+ tar header) at the end of the file
    blob_toc_digest: bytes = b""  # sha256 of those bytes
    mapped_blkaddr: int = 0  # device slot's start in a unified address space (informational)

    # BlobFeatures bits (layout.rafs) this model needs; kept literal to keep rafs/image pure.
    @property
    def tar_toc(self) -> bool:
        """nydus-image >= 2.2 layout (CAP_TAR_TOC): sections followed by tar headers, maybe a
        ToC at the end, and `compressed_size` is the size of the whole file."""
        return bool(self.features & 0x4000_0000)

    @property
    def separate_meta(self) -> bool:
        """SEPARATE: the chunk-info table lives in another blob."""
        return bool(self.features & 0x10)

    @property
    def file_size(self) -> int:
        """Size of the blob file this layout implies."""
        if self.tar_toc:
            return self.compressed_size
        return self.ci_offset + self.ci_compressed_size + 4096

    @property
    def chunk_data_size(self) -> int:
        """Bytes of chunk data at the start of the file (what `stat` calls stored)."""
        if self.tar_toc and not self.separate_meta:
            tar = 512 if self.features & 0x1000_0000 else 0
            return max(self.ci_offset - tar, 0)
        return self.compressed_size


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

