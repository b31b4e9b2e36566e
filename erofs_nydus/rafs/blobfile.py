"""Data blob file layouts: where the chunk-info table, chunk digests and ToC live, and which
bytes a blob id names.

Two layouts exist in registries (reference: nydus `storage/src/meta/`, `builder/src/core/`):

- ours and nydus-image < 2.2: ``[chunk data][CI table][4 KiB CI header]``; the blob table's
  `compressed_size` is the chunk data; the blob id is the sha256 of the whole file.
- nydus-image >= 2.2 (`CAP_TAR_TOC`, what nydusify publishes): every section is followed by a
  512-byte tar header naming it (``image.blob``, ``blob.meta`` = CI table + CI header,
  ``blob.digest`` = 32 bytes per chunk, ``image.boot``, ``rafs.blob.toc``); the ToC (128-byte
  entries, `HAS_TOC`) ends the file and its sha256 is `blob_toc_digest`; `compressed_size` is
  the whole file.  The blob id is either the OCI layer digest (sha256 of the file, what
  `nydus-image merge --blob-digests` and nydusify write) or nydus-image's own build hash: the
  sha256 of every byte *except* the ``blob.digest`` section's content (nydus writes that
  section without hashing it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from erofs_nydus.errors import BackendError, FormatError
from erofs_nydus.layout import parse
from erofs_nydus.layout import rafs as R
from erofs_nydus.rafs.backend import BlobBackend
from erofs_nydus.rafs.codec import decompress
from erofs_nydus.rafs.image import BlobInfo

MAX_SECTIONS = 16  # a nydus blob has at most 6 sections; stop walking garbage early


@dataclass(slots=True)
class Section:
    name: str
    offset: int  # of the content in the blob file
    size: int  # of the content (compressed)
    digest: bytes = b""  # from the ToC: sha256 of the uncompressed content
    compressor: str = "none"
    uncompressed_size: int = 0


@dataclass(slots=True)
class BlobLayout:
    file_size: int
    sections: dict[str, Section] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _read(backend: BlobBackend, blob_id: str, offset: int, size: int) -> bytes:
    try:
        data = backend.read_range(blob_id, offset, size)
    except BackendError as exc:
        raise FormatError(f"cannot read {size} bytes at {offset:#x}: {exc}") from exc
    if len(data) != size:
        raise FormatError(f"short read of {size} bytes at {offset:#x}")
    return data


def tar_sections(backend: BlobBackend, blob_id: str, file_size: int) -> dict[str, Section]:
    """Walk the trailing tar headers from the end of a `HAS_TAR_HEADER` blob."""
    out: dict[str, Section] = {}
    end = file_size
    while end > 0 and len(out) < MAX_SECTIONS:
        if end < R.TAR_HEADER_SIZE:
            raise FormatError(f"{end} bytes before the first section are not a tar header")
        hdr = R.tar_header_entry(_read(backend, blob_id, end - R.TAR_HEADER_SIZE,
                                       R.TAR_HEADER_SIZE))
        if hdr is None:
            raise FormatError(f"no valid tar header ends at {end:#x}")
        name, size = hdr
        start = end - R.TAR_HEADER_SIZE - size
        if start < 0:
            raise FormatError(f"tar section {name!r} of {size} bytes starts before the file")
        out.setdefault(name, Section(name, start, size, uncompressed_size=size))
        end = start
    return out


def read_toc(backend: BlobBackend, blob: BlobInfo, file_size: int) -> dict[str, Section]:
    """The ToC at the end of a `HAS_TOC` blob, checked against `blob_toc_digest`."""
    size = blob.blob_toc_size
    tar = R.TAR_HEADER_SIZE if blob.features & R.BLOB_FEATURE_HAS_TAR_HEADER else 0
    if not size:  # older nydus-image left it 0: find it by its tar header
        if not tar:
            raise FormatError("ToC size unknown and no tar header to find it")
        hdr = R.tar_header_entry(_read(backend, blob.blob_id, file_size - tar, tar))
        if hdr is None or hdr[0] != R.TOC_ENTRY_BLOB_TOC:
            raise FormatError("the file does not end with a rafs.blob.toc tar header")
        size = hdr[1] + tar
    if size > min(file_size, R.MAX_TOC_SIZE + tar) or (size - tar) % R.TOC_ENTRY_SIZE:
        raise FormatError(f"ToC size {size} invalid")
    raw = _read(backend, blob.blob_id, file_size - size, size)
    if blob.blob_toc_size and blob.blob_toc_digest.strip(b"\0") and (
            hashlib.sha256(raw).digest() != blob.blob_toc_digest):
        raise FormatError("ToC sha256 does not match blob_toc_digest")
    out: dict[str, Section] = {}
    for i in range(0, size - tar, R.TOC_ENTRY_SIZE):
        e = parse(R.TocEntry, raw, i, "ToC entry")
        name = e.name.split(b"\0", 1)[0].decode("ascii", "replace")
        bad = R.validate_toc_entry(e, file_size)
        if bad:
            raise FormatError(bad[0])
        out[name] = Section(name, e.compressed_offset, e.compressed_size, e.uncompressed_digest,
                            R.TOC_FLAG_COMPRESSION[e.flags & 0xF], e.uncompressed_size)
    return out


def blob_layout(backend: BlobBackend, blob: BlobInfo, file_size: int) -> BlobLayout:
    """The sections of a blob file, from its ToC or tar headers (empty for our layout)."""
    lay = BlobLayout(file_size)
    if not blob.tar_toc:
        return lay
    try:
        if blob.features & R.BLOB_FEATURE_HAS_TOC:
            lay.sections = read_toc(backend, blob, file_size)
        elif blob.features & R.BLOB_FEATURE_HAS_TAR_HEADER:
            lay.sections = tar_sections(backend, blob.blob_id, file_size)
    except FormatError as exc:
        lay.problems.append(str(exc))
    return lay


def section_bytes(backend: BlobBackend, blob_id: str, s: Section) -> bytes:
    """A section's uncompressed content, checked against its ToC digest when it has one."""
    raw = _read(backend, blob_id, s.offset, s.size)
    data = decompress(raw, s.compressor, s.uncompressed_size or s.size, f"section {s.name}")
    if s.digest and hashlib.sha256(data).digest() != s.digest:
        raise FormatError(f"section {s.name}: sha256 does not match the ToC")
    return data


def blob_id_matches(backend: BlobBackend, blob: BlobInfo, lay: BlobLayout) -> tuple[bool, str]:
    """Does the blob id name this file?  (matched, sha256 of the file)."""
    h_file = hashlib.sha256()
    h_build = hashlib.sha256()
    skip = lay.sections.get(R.TOC_ENTRY_BLOB_DIGEST) if blob.tar_toc else None
    pos = 0
    while pos < lay.file_size:
        n = min(1 << 20, lay.file_size - pos)
        buf = _read(backend, blob.blob_id, pos, n)
        h_file.update(buf)
        if skip is None:
            h_build.update(buf)
        else:  # drop the part of [pos, pos+n) inside the blob.digest content
            lo, hi = skip.offset - pos, skip.offset + skip.size - pos
            h_build.update(buf[:max(min(lo, n), 0)])
            h_build.update(buf[max(min(hi, n), 0):])
        pos += n
    file_hex = h_file.hexdigest()
    return blob.blob_id in (file_hex, h_build.hexdigest()), file_hex


def read_ci_table(backend: BlobBackend, blob: BlobInfo) -> list[tuple[int, int, int, int, int]]:
    """The blob's own chunk-info array: (uoff, usize, coff, csize, flags) per chunk index;
    flags are the V2 entry's CI_V2_FLAG_* bits, -1 for V1 entries (which have none).

    The 4 KiB CI header follows the (compressed) array in both layouts.  Its sizes are
    allocated below, so only those the (bounded) chunk count implies are read."""
    entry_size = (R.CI_ENTRY_V2_SIZE if blob.features & R.BLOB_FEATURE_CHUNK_INFO_V2
                  else R.CI_ENTRY_V1_SIZE)
    usize = blob.ci_uncompressed_size
    if blob.features & R.BLOB_FEATURE_CHUNKDICT_GENERATED:  # its own entry count
        fits = usize % entry_size == 0 and usize <= R.MAX_CHUNKS_PER_BLOB * entry_size
    else:
        fits = usize == blob.chunk_count * entry_size
    if not fits or blob.ci_compressed_size > 2 * usize + 4096:
        raise FormatError(f"chunk-info sizes {blob.ci_compressed_size}/"
                          f"{blob.ci_uncompressed_size} do not fit {blob.chunk_count} chunks")
    hdr_raw = _read(backend, blob.blob_id, blob.ci_offset + blob.ci_compressed_size,
                    R.BLOB_CI_HEADER_SIZE)
    hdr = parse(R.BlobCIHeader, hdr_raw, 0, "blob chunk-info header")
    entry = _CIFields(blob)
    bad = R.validate_ci_header(hdr, entry)
    if bad:
        raise FormatError(bad[0])
    raw = _read(backend, blob.blob_id, blob.ci_offset, blob.ci_compressed_size)
    raw = decompress(raw, blob.ci_compressor, blob.ci_uncompressed_size, "chunk-info array")
    if blob.features & R.BLOB_FEATURE_CHUNK_INFO_V2:
        return [R.decode_ci_v2(*R.CI_ENTRY_V2_PACK.unpack_from(raw, i * R.CI_ENTRY_V2_SIZE)[:2])
                for i in range(len(raw) // R.CI_ENTRY_V2_SIZE)]
    return [(*R.decode_ci_v1(*R.CI_ENTRY_V1_PACK.unpack_from(raw, i * R.CI_ENTRY_V1_SIZE)), -1)
            for i in range(len(raw) // R.CI_ENTRY_V1_SIZE)]


class _CIFields:
    """The blob table fields `validate_ci_header` compares, from a BlobInfo."""

    def __init__(self, b: BlobInfo) -> None:
        self.ci_compressor = R.COMPRESSOR_IDS.get(b.ci_compressor, -1)
        self.ci_offset = b.ci_offset
        self.ci_compressed_size = b.ci_compressed_size
        self.ci_uncompressed_size = b.ci_uncompressed_size
        self.chunk_count = b.chunk_count
        self.features = b.features
