"""`check`: validate a bootstrap and, given its blobs, every chunk against its digest."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import lz4.block

from erofs_nydus.errors import BackendError, DigestMismatchError, ErofsNydusError, FormatError
from erofs_nydus.layout import parse
from erofs_nydus.layout import rafs as R
from erofs_nydus.rafs.backend import BlobBackend, LocalDirBackend
from erofs_nydus.rafs.codec import decompress_chunk
from erofs_nydus.rafs.image import BlobInfo, ChunkInfo
from erofs_nydus.rafs.reader import BootstrapReader


@dataclass(slots=True)
class CheckReport:
    problems: list[str] = field(default_factory=list)
    inodes: int = 0
    blobs: int = 0
    chunks_verified: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def check_bootstrap(data: bytes, name: str, blob_dir: str | None = None) -> CheckReport:
    report = CheckReport()
    try:
        reader = BootstrapReader(data, name)
    except FormatError as exc:
        report.problems.append(str(exc))
        return report
    report.problems.extend(reader.problems())
    report.blobs = len(reader.image.blobs)
    report.inodes = reader.sb.inos
    if blob_dir is not None:
        backend = LocalDirBackend(blob_dir)
        for blob in reader.image.blobs:
            verify_blob(backend, blob, reader.image.chunks[blob.blob_index], report, blob_dir)
    return report


def verify_blob(backend: LocalDirBackend, blob: BlobInfo, chunks: list[ChunkInfo],
                report: CheckReport, blob_dir: str) -> None:
    """Blob id == sha256(file); CI trailer agrees with the chunk table; every chunk's digest."""
    where = f"blob {blob.blob_id[:12]}"
    path = backend.path(blob.blob_id)
    try:
        size = os.path.getsize(path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while buf := f.read(1 << 20):
                h.update(buf)
    except OSError as exc:
        report.problems.append(f"{where}: cannot read {path}: {exc.strerror}")
        return
    if h.hexdigest() != blob.blob_id:
        report.problems.append(f"{where}: file sha256 {h.hexdigest()[:12]} does not match its id")
    expect = blob.ci_offset + blob.ci_compressed_size + R.BLOB_CI_HEADER_SIZE
    if size != expect:
        report.problems.append(f"{where}: file is {size} bytes, blob table says {expect}")
    try:
        _verify_ci(backend, blob, chunks)
    except ErofsNydusError as exc:
        report.problems.append(f"{where}: {exc}")
    for c in chunks:
        try:
            data = read_chunk(backend, blob.blob_id, c)
        except ErofsNydusError as exc:
            report.problems.append(f"{where}: chunk {c.index}: {exc}")
            continue
        if hashlib.sha256(data).digest() != c.digest:
            report.problems.append(f"{where}: chunk {c.index} at {c.compressed_offset:#x}: "
                                   "digest mismatch")
            continue
        report.chunks_verified += 1


def read_chunk(backend: BlobBackend, blob_id: str, c: ChunkInfo) -> bytes:
    return decompress_chunk(backend.read_range(blob_id, c.compressed_offset, c.compressed_size), c)


def read_ci_table(backend: BlobBackend, blob: BlobInfo) -> list[tuple[int, int, int, int]]:
    """The blob's own chunk-info array: (uoff, usize, coff, csize) per chunk index."""
    if blob.ci_uncompressed_size != blob.chunk_count * R.CI_ENTRY_V1_SIZE or not (
            0 < blob.ci_compressed_size <= 2 * blob.ci_uncompressed_size + 4096):
        # sizes are allocated below: only those the (bounded) chunk count implies
        raise FormatError(f"chunk-info sizes {blob.ci_compressed_size}/"
                          f"{blob.ci_uncompressed_size} do not fit {blob.chunk_count} chunks")
    try:
        raw_hdr = backend.read_range(blob.blob_id, blob.ci_offset + blob.ci_compressed_size,
                                     R.BLOB_CI_HEADER_SIZE)
    except BackendError as exc:
        raise FormatError(f"cannot read chunk-info header: {exc}") from exc
    hdr = parse(R.BlobCIHeader, raw_hdr, 0, "blob chunk-info header")
    if hdr.magic != R.BLOB_CI_MAGIC or hdr.magic2 != R.BLOB_CI_MAGIC:
        raise FormatError("chunk-info header magic is not 0xB10BB10B")
    if (hdr.ci_offset, hdr.ci_compressed_size, hdr.ci_uncompressed_size, hdr.ci_entries) != (
            blob.ci_offset, blob.ci_compressed_size, blob.ci_uncompressed_size, blob.chunk_count):
        raise FormatError("chunk-info header disagrees with the blob table")
    try:
        raw = backend.read_range(blob.blob_id, blob.ci_offset, blob.ci_compressed_size)
    except BackendError as exc:
        raise FormatError(f"cannot read chunk-info array: {exc}") from exc
    if blob.ci_compressed_size != blob.ci_uncompressed_size:
        try:
            raw = lz4.block.decompress(raw, uncompressed_size=blob.ci_uncompressed_size)
        except lz4.block.LZ4BlockError as exc:
            raise FormatError(f"chunk-info array does not decompress: {exc}") from exc
    return [R.decode_ci_v1(*R.CI_ENTRY_V1_PACK.unpack_from(raw, i * R.CI_ENTRY_V1_SIZE))
            for i in range(len(raw) // R.CI_ENTRY_V1_SIZE)]


def _verify_ci(backend: BlobBackend, blob: BlobInfo, chunks: list[ChunkInfo]) -> None:
    ci = read_ci_table(backend, blob)
    for c in chunks:
        if c.index >= len(ci):
            raise FormatError(f"chunk index {c.index} beyond the chunk-info array")
        if ci[c.index] != (c.uncompressed_offset, c.uncompressed_size, c.compressed_offset,
                           c.compressed_size):
            raise FormatError(f"chunk {c.index}: chunk-info array disagrees with chunk table")


def materialize_blob(backend: BlobBackend, blob: BlobInfo, chunks: list[ChunkInfo],
                     out_path: str) -> None:
    """Write a blob's whole uncompressed cache file (what the daemon fills lazily),
    every chunk verified against its digest."""
    with open(out_path, "wb") as f:
        for c in chunks:
            data = read_chunk(backend, blob.blob_id, c)
            if hashlib.sha256(data).digest() != c.digest:
                raise DigestMismatchError(f"blob {blob.blob_id[:12]} chunk {c.index}: "
                                          "digest mismatch")
            os.pwrite(f.fileno(), data, c.uncompressed_offset)
        f.truncate(blob.uncompressed_size)
