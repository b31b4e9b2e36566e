"""`check`: validate a bootstrap and, given its blobs, each blob file's layout (see
`rafs.blobfile`) and every chunk against its digest."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from erofs_nydus.errors import DigestMismatchError, ErofsNydusError, FormatError
from erofs_nydus.layout import rafs as R
from erofs_nydus.rafs.backend import BlobBackend, LocalDirBackend
from erofs_nydus.rafs.blobfile import blob_id_matches, blob_layout, read_ci_table, section_bytes
from erofs_nydus.rafs.codec import decode_chunk, decompress_chunk
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


def verify_blob(backend: LocalDirBackend, blob: BlobInfo, chunks: Sequence[ChunkInfo],
                report: CheckReport, blob_dir: str) -> None:
    """The blob file against its blob table entry: size, id rule, ToC and section digests,
    chunk-info table, inlined chunk digests, and every chunk against its digest."""
    where = f"blob {blob.blob_id[:12]}"
    path = backend.path(blob.blob_id)
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        report.problems.append(f"{where}: cannot read {path}: {exc.strerror}")
        return
    if blob.features & R.BLOB_FEATURE_INLINED_FS_META:
        ok_size = size >= blob.chunk_data_size
    else:
        ok_size = size == blob.file_size
    if not ok_size:
        report.problems.append(f"{where}: file is {size} bytes, blob table says {blob.file_size}")
    lay = blob_layout(backend, blob, size)
    report.problems.extend(f"{where}: {p}" for p in lay.problems)
    try:
        matched, file_hex = blob_id_matches(backend, blob, lay)
        if not matched:
            report.problems.append(f"{where}: file sha256 {file_hex[:12]} does not match its id")
        for s in lay.sections.values():
            if s.digest and s.name != R.TOC_ENTRY_BLOB_RAW:
                section_bytes(backend, blob.blob_id, s)
    except ErofsNydusError as exc:
        report.problems.append(f"{where}: {exc}")
    if not blob.separate_meta:
        try:
            _verify_ci(backend, blob, chunks)
        except ErofsNydusError as exc:
            report.problems.append(f"{where}: {exc}")
    digests = lay.sections.get(R.TOC_ENTRY_BLOB_DIGEST)
    if digests is not None:
        try:
            _verify_inlined_digests(section_bytes(backend, blob.blob_id, digests), chunks)
        except ErofsNydusError as exc:
            report.problems.append(f"{where}: {exc}")
    for c in chunks:
        try:
            read_chunk(backend, blob.blob_id, c, verify=True)
        except ErofsNydusError as exc:
            report.problems.append(f"{where}: chunk {c.index} at {c.compressed_offset:#x}: {exc}")
            continue
        report.chunks_verified += 1


def read_chunk(backend: BlobBackend, blob_id: str, c: ChunkInfo, verify: bool = False) -> bytes:
    """One chunk's plain bytes; with `verify`, also checked against its digest."""
    raw = backend.read_range(blob_id, c.compressed_offset, c.compressed_size)
    return decode_chunk(raw, c) if verify else decompress_chunk(raw, c)


def _verify_inlined_digests(raw: bytes, chunks: Sequence[ChunkInfo]) -> None:
    """blob.digest holds each chunk's digest at 32 * CI index."""
    for c in chunks:
        if raw[32 * c.index:32 * c.index + 32] != c.digest:
            raise FormatError(f"chunk {c.index}: blob.digest disagrees with the chunk table")


def _verify_ci(backend: BlobBackend, blob: BlobInfo, chunks: Sequence[ChunkInfo]) -> None:
    ci = read_ci_table(backend, blob)
    for c in chunks:
        if c.index >= len(ci):
            raise FormatError(f"chunk index {c.index} beyond the chunk-info array")
        uoff, usize, coff, csize, flags = ci[c.index]
        if (uoff, usize, coff, csize) != (c.uncompressed_offset, c.uncompressed_size,
                                          c.compressed_offset, c.compressed_size) or (
                flags >= 0 and bool(flags & R.CI_V2_FLAG_COMPRESSED) != c.compressed):
            raise FormatError(f"chunk {c.index}: chunk-info array disagrees with chunk table")


def materialize_blob(backend: BlobBackend, blob: BlobInfo, chunks: list[ChunkInfo],
                     out_path: str) -> None:
    """Write a blob's whole uncompressed cache file (what the daemon fills lazily),
    every chunk verified against its digest."""
    with open(out_path, "wb") as f:
        for c in chunks:
            try:
                data = read_chunk(backend, blob.blob_id, c, verify=True)
            except DigestMismatchError as exc:
                raise DigestMismatchError(f"blob {blob.blob_id[:12]} {exc}") from exc
            os.pwrite(f.fileno(), data, c.uncompressed_offset)
        f.truncate(blob.uncompressed_size)
