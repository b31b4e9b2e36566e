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
import struct
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload


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


# One packed chunk of a ChunkList: digest, uncompressed offset, compressed offset,
# uncompressed size, compressed size, CI index, compressed flag (61 bytes).
PACKED_CHUNK = struct.Struct("<32sQQIIIB")
_START = struct.Struct("<32xQ21x")  # uncompressed offset
_USIZE = struct.Struct("<48xI9x")  # uncompressed size
_EXTENT = struct.Struct("<32xQ8xI4xI1x")  # uncompressed offset, uncompressed size, CI index


class ChunkList(Sequence[ChunkInfo]):
    """One blob's chunks, sorted by uncompressed offset, packed 61 bytes each plus an
    8-byte start offset, instead of one ChunkInfo object each (~400 bytes with its digest
    and ints, before the dict that indexed them).  A daemon keeps one per blob for as long
    as an image is registered: at 200k chunks that is 14 MiB instead of ~100.

    Items are ChunkInfo values built on access (`chunks[i]`, slices, iteration), equal by
    value to what the bootstrap says; `materialize()` keeps them built, for tools that
    tell chunks apart by identity.  `starts` (array of offsets) is what to bisect.
    """

    __slots__ = ("_objs", "_rec", "blob_index", "compressor", "digester", "starts")

    def __init__(self, blob_index: int = 0, compressor: str = "lz4", digester: str = "sha256",
                 records: bytes | bytearray = b"", starts: array[int] | None = None) -> None:
        self.blob_index = blob_index
        self.compressor = compressor
        self.digester = digester
        self._rec = records
        if starts is None:
            starts = array("Q", (u for (u,) in _START.iter_unpack(records)))
        self.starts = starts
        self._objs: list[ChunkInfo] | None = None

    @staticmethod
    def pack(c: ChunkInfo) -> bytes:
        return PACKED_CHUNK.pack(c.digest, c.uncompressed_offset, c.compressed_offset,
                            c.uncompressed_size, c.compressed_size, c.index, c.compressed)

    @classmethod
    def build(cls, chunks: Iterable[ChunkInfo], blob_index: int | None = None,
              compressor: str | None = None, digester: str | None = None) -> ChunkList:
        """Pack ChunkInfo values (any order) of one blob."""
        if isinstance(chunks, ChunkList):
            return chunks
        items = list(chunks)
        first = items[0] if items else None
        bi = blob_index if blob_index is not None else first.blob_index if first else 0
        comp = compressor or (first.compressor if first else "lz4")
        dig = digester or (first.digester if first else "sha256")
        if any(c.blob_index != bi for c in items):
            raise ValueError("ChunkList.build: chunks of more than one blob")
        return cls.from_unsorted(bi, comp, dig, b"".join(cls.pack(c) for c in items))

    @classmethod
    def from_unsorted(cls, blob_index: int, compressor: str, digester: str,
                      records: bytes | bytearray) -> ChunkList:
        """A ChunkList of packed records in any order (sorted here, stable)."""
        size = PACKED_CHUNK.size
        starts = array("Q", (u for (u,) in _START.iter_unpack(records)))
        order = sorted(range(len(starts)), key=starts.__getitem__)
        if all(map(int.__eq__, order, range(len(order)))):
            return cls(blob_index, compressor, digester, records, starts)
        # one record copied at a time: no list of n slices (they would outlive the sort in
        # the allocator's arenas of a long-running daemon)
        src = memoryview(records)
        out = bytearray(len(records))
        j = 0
        for i in order:
            out[j:j + size] = src[i * size:(i + 1) * size]
            j += size
        src.release()
        return cls(blob_index, compressor, digester, out,
                   array("Q", map(starts.__getitem__, order)))

    def without_repeated_starts(self) -> ChunkList:
        """This list keeping only the first chunk at each offset (a reader drops the
        repeats of a bad chunk table, which it reports)."""
        size = PACKED_CHUNK.size
        src = memoryview(self._rec)
        out = bytearray()
        starts: array[int] = array("Q")
        for i, start in enumerate(self.starts):
            if not starts or starts[-1] != start:
                out += src[i * size:(i + 1) * size]
                starts.append(start)
        src.release()
        return ChunkList(self.blob_index, self.compressor, self.digester, out, starts)

    def records(self) -> bytes | bytearray:
        """The packed records (to compare two lists of one blob cheaply)."""
        return self._rec

    def extents(self) -> Iterator[tuple[int, int, int]]:
        """(CI index, uncompressed offset, bytes in the cache file) of each chunk, without
        building ChunkInfo values."""
        for uoff, usize, index in _EXTENT.iter_unpack(self._rec):
            yield index, uoff, (usize + 4095) & ~4095

    def sizes(self) -> Iterator[tuple[int, int]]:
        """(uncompressed offset, uncompressed size) of each chunk, without building
        ChunkInfo values."""
        for uoff, usize, _index in _EXTENT.iter_unpack(self._rec):
            yield uoff, usize

    def _make(self, i: int) -> ChunkInfo:
        digest, uoff, coff, usize, csize, index, flag = PACKED_CHUNK.unpack_from(
            self._rec, i * PACKED_CHUNK.size)
        return ChunkInfo(digest, self.blob_index, index, coff, csize, uoff, usize, bool(flag),
                         self.compressor, self.digester)

    def __len__(self) -> int:
        return len(self.starts)

    @overload
    def __getitem__(self, i: int) -> ChunkInfo: ...

    @overload
    def __getitem__(self, i: slice) -> list[ChunkInfo]: ...

    def __getitem__(self, i: int | slice) -> ChunkInfo | list[ChunkInfo]:
        if self._objs is not None:
            return self._objs[i]
        n = len(self.starts)
        if isinstance(i, slice):
            return [self._make(j) for j in range(*i.indices(n))]
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("chunk list index out of range")
        return self._make(i)

    def __iter__(self) -> Iterator[ChunkInfo]:
        if self._objs is not None:
            return iter(self._objs)
        return (self._make(i) for i in range(len(self.starts)))

    def __repr__(self) -> str:
        return f"<ChunkList blob {self.blob_index}: {len(self)} chunks>"

    def find(self, offset: int) -> ChunkInfo | None:
        """The chunk starting at uncompressed `offset`, or None."""
        i = bisect.bisect_left(self.starts, offset)
        if i < len(self.starts) and self.starts[i] == offset:
            return self[i]
        return None

    def size_at(self, offset: int) -> int | None:
        """Uncompressed size of the chunk starting at `offset`, or None (no ChunkInfo
        built)."""
        i = bisect.bisect_left(self.starts, offset)
        if i < len(self.starts) and self.starts[i] == offset:
            return int(_USIZE.unpack_from(self._rec, i * PACKED_CHUNK.size)[0])
        return None

    def materialize(self) -> list[ChunkInfo]:
        """Build every item once and keep them (stable identities from now on)."""
        if self._objs is None:
            self._objs = [self._make(i) for i in range(len(self.starts))]
        return self._objs


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
    # per blob, by uncompressed_offset (the reader gives ChunkLists)
    chunks: Sequence[Sequence[ChunkInfo]] = field(default_factory=list)
    fsid: str = ""  # sha256 hex of the bootstrap bytes: content-addressed fscache cookie

    def chunks_for_blob(self, blob_index: int) -> Sequence[ChunkInfo]:
        return self.chunks[blob_index]

    def chunks_in_range(self, blob_index: int, offset: int, length: int) -> list[ChunkInfo]:
        """Chunks of a blob whose aligned extent overlaps [offset, offset+length)."""
        chunks = self.chunks[blob_index]
        starts: Sequence[int] = (chunks.starts if isinstance(chunks, ChunkList)
                                 else [c.uncompressed_offset for c in chunks])
        i = max(bisect.bisect_right(starts, offset) - 1, 0)
        out: list[ChunkInfo] = []
        end = offset + length
        while i < len(chunks) and chunks[i].uncompressed_offset < end:
            c = chunks[i]
            if c.uncompressed_offset + c.aligned_size > offset:
                out.append(c)
            i += 1
        return out

