"""Nydus RAFS v6 extensions to EROFS, and the data blob's chunk-info trailer.

Source: dragonflyoss/nydus `rafs/src/metadata/layout/v6.rs`, `storage/src/meta/`
as summarised in /work/shared/reference/nydus-rafs-v6.md sections 1.3-1.5, 1.12, 2.3.
"""

from __future__ import annotations

import struct
from typing import Any

import construct as cs

from erofs_nydus.errors import FormatError

RAFS_V5_MAGIC = 0x5241_4653  # "RAFS" at byte 0 of a v5 (FUSE-only) bootstrap
EXT_SUPERBLOCK_OFFSET = 1152  # right after the 128-byte EROFS superblock at 1024
DEVT_SLOTOFF = 11  # device table at 11*128 = 1408
DEVICE_TABLE_OFFSET = DEVT_SLOTOFF * 128
MAX_BLOBS = 254  # blob_index + 1 must fit the low byte of a chunk index's device_id

# RafsSuperFlags (ext superblock s_flags)
FLAG_COMPRESSION_NONE = 0x1
FLAG_COMPRESSION_LZ4 = 0x2
FLAG_HASH_BLAKE3 = 0x4
FLAG_HASH_SHA256 = 0x8
FLAG_EXPLICIT_UID_GID = 0x10
FLAG_HAS_XATTR = 0x20
FLAG_COMPRESSION_GZIP = 0x40
FLAG_COMPRESSION_ZSTD = 0x80
FLAG_INLINED_CHUNK_DIGEST = 0x100
FLAG_TARFS_MODE = 0x200
FLAG_ENCRYPTION_NONE = 0x0100_0000
FLAG_ENCRYPTION_AES128_XTS = 0x0200_0000
COMPRESSION_FLAGS = {FLAG_COMPRESSION_NONE: "none", FLAG_COMPRESSION_LZ4: "lz4",
                     FLAG_COMPRESSION_GZIP: "gzip", FLAG_COMPRESSION_ZSTD: "zstd"}
HASH_FLAGS = {FLAG_HASH_BLAKE3: "blake3", FLAG_HASH_SHA256: "sha256"}

# blob table compression_algo / ci_compressor / digest_algo (nydus-utils `compress::Algorithm`,
# `digest::Algorithm`); "lz4" is nydus's "lz4_block" (raw LZ4 block, no size prefix)
COMPRESSOR_IDS = {"none": 0, "lz4": 1, "gzip": 2, "zstd": 3}
DIGESTER_IDS = {"blake3": 0, "sha256": 1}
COMPRESSOR_NAMES = {v: k for k, v in COMPRESSOR_IDS.items()}
DIGESTER_NAMES = {v: k for k, v in DIGESTER_IDS.items()}
SUPPORTED_COMPRESSORS = ("none", "lz4", "zstd")  # what rafs.codec decodes (gzip: refused)

# BlobFeatures (storage/src/device.rs).  Bits 0..15 are incompatible: a reader must know each.
BLOB_FEATURE_ALIGNED = 0x1  # uncompressed address space 4 KiB-aligned per chunk (v6)
BLOB_FEATURE_INLINED_FS_META = 0x2  # the bootstrap is also inside the blob (image.boot)
BLOB_FEATURE_CHUNK_INFO_V2 = 0x4  # 24-byte CI entries with per-chunk flags
BLOB_FEATURE_ZRAN = 0x8  # chunks are ranges of an OCI gzip layer (OCI-ref)
BLOB_FEATURE_SEPARATE = 0x10  # the CI table lives in a separate meta blob
BLOB_FEATURE_INLINED_CHUNK_DIGEST = 0x20  # blob.digest: 32 B per chunk, by CI index
BLOB_FEATURE_TARFS = 0x40
BLOB_FEATURE_BATCH = 0x80  # small chunks merged into one compressed batch chunk
BLOB_FEATURE_ENCRYPTED = 0x100
BLOB_FEATURE_CHUNKDICT_GENERATED = 0x200
BLOB_FEATURE_SEPARATED_PREFETCH = 0x400
BLOB_FEATURE_EXTERNAL = 0x800  # data lives in an external storage backend
BLOB_FEATURE_HAS_TAR_HEADER = 0x1000_0000  # each section is followed by a 512 B tar header
BLOB_FEATURE_HAS_TOC = 0x2000_0000  # a ToC (rafs.blob.toc) ends the blob
BLOB_FEATURE_CAP_TAR_TOC = 0x4000_0000  # nydus-image >= 2.2 layout: compressed_size = file size
BLOB_FEATURE_V5_NO_EXT_BLOB_TABLE = 0x8000_0000  # internal to nydus; never on disk
BLOB_FEATURE_INCOMPAT_MASK = 0xFFFF
BLOB_FEATURE_KNOWN_INCOMPAT = 0x0FFF
# Features that change what a byte means and that this project does not implement.
REFUSED_BLOB_FEATURES = {
    BLOB_FEATURE_ENCRYPTED: "encrypted chunks",
    BLOB_FEATURE_BATCH: "batch chunks",
    BLOB_FEATURE_ZRAN: "zran (OCI-ref) chunks",
    BLOB_FEATURE_TARFS: "tarfs mode",
    BLOB_FEATURE_EXTERNAL: "external blobs",
}
BLOB_FEATURE_NAMES = {
    BLOB_FEATURE_ALIGNED: "aligned", BLOB_FEATURE_INLINED_FS_META: "inlined-fs-meta",
    BLOB_FEATURE_CHUNK_INFO_V2: "chunk-info-v2", BLOB_FEATURE_ZRAN: "zran",
    BLOB_FEATURE_SEPARATE: "separate", BLOB_FEATURE_INLINED_CHUNK_DIGEST: "inlined-chunk-digest",
    BLOB_FEATURE_TARFS: "tarfs", BLOB_FEATURE_BATCH: "batch", BLOB_FEATURE_ENCRYPTED: "encrypted",
    BLOB_FEATURE_CHUNKDICT_GENERATED: "chunkdict-generated",
    BLOB_FEATURE_SEPARATED_PREFETCH: "separated-prefetch", BLOB_FEATURE_EXTERNAL: "external",
    BLOB_FEATURE_HAS_TAR_HEADER: "tar-header", BLOB_FEATURE_HAS_TOC: "toc",
    BLOB_FEATURE_CAP_TAR_TOC: "cap-tar-toc",
}

# RafsV5ChunkInfo flags (BlobChunkFlags)
CHUNK_FLAG_COMPRESSED = 0x1
CHUNK_FLAG_HOLE = 0x2  # never written by nydus-image; refused
CHUNK_FLAG_ENCRYPTED = 0x4
CHUNK_FLAG_BATCH = 0x8
CHUNK_FLAG_HAS_CRC32 = 0x10  # crc32 field set; the digest is what we verify
CHUNK_FLAGS_KNOWN = 0x1F
REFUSED_CHUNK_FLAGS = {CHUNK_FLAG_HOLE: "hole chunks", CHUNK_FLAG_ENCRYPTED: "encrypted chunks",
                       CHUNK_FLAG_BATCH: "batch chunks"}

MIN_CHUNK_SIZE = 0x1000
MAX_CHUNK_SIZE = 0x100_0000
MAX_CHUNKS_PER_BLOB = 1 << 24

SuperBlockExt = cs.Struct(  # 256 bytes at 1152
    "s_flags" / cs.Int64ul,  # @0 RafsSuperFlags: one compression bit, one hash bit
    "s_blob_table_offset" / cs.Int64ul,  # @8 4 KiB-aligned, after the device slots
    "s_blob_table_size" / cs.Int32ul,  # @16 256 * number of blobs
    "s_chunk_size" / cs.Int32ul,  # @20 power of two in [4 KiB, 16 MiB]
    "s_chunk_table_offset" / cs.Int64ul,  # @24 4 KiB-aligned
    "s_chunk_table_size" / cs.Int64ul,  # @32 80 * unique chunks
    "s_prefetch_table_offset" / cs.Int64ul,  # @40 0 if none
    "s_prefetch_table_size" / cs.Int32ul,  # @48 4 * entries (u32 nids)
    "s_padding" / cs.Int32ul,  # @52
    "s_reserved" / cs.Bytes(200),  # @56
)

BlobEntry = cs.Struct(  # RafsV6Blob, 256 bytes per blob in the blob table
    "blob_id" / cs.Bytes(64),  # @0 64 hex chars, NUL-padded; see `blob_id_rule()`
    "blob_index" / cs.Int32ul,  # @64 equals its position
    "chunk_size" / cs.Int32ul,  # @68 equals the ext superblock's
    "chunk_count" / cs.Int32ul,  # @72
    "compression_algo" / cs.Int32ul,  # @76 COMPRESSOR_IDS
    "digest_algo" / cs.Int32ul,  # @80 DIGESTER_IDS
    "features" / cs.Int32ul,  # @84 BlobFeatures
    "compressed_size" / cs.Int64ul,  # @88 chunk data bytes; CAP_TAR_TOC: the whole file
    "uncompressed_size" / cs.Int64ul,  # @96 4 KiB multiple: size of the cache file
    "blob_toc_size" / cs.Int32ul,  # @104 HAS_TOC: ToC bytes (+ its tar header) at the end
    "ci_compressor" / cs.Int32ul,  # @108
    "ci_offset" / cs.Int64ul,  # @112 offset of the CI array in the blob
    "ci_compressed_size" / cs.Int64ul,  # @120
    "ci_uncompressed_size" / cs.Int64ul,  # @128 chunk_count * 16 (V1) or * 24 (V2)
    "blob_toc_digest" / cs.Bytes(32),  # @136 sha256 of the last blob_toc_size bytes
    "blob_meta_digest" / cs.Bytes(32),  # @168
    "blob_meta_size" / cs.Int64ul,  # @200
    "cipher_iv" / cs.Bytes(8),  # @208
    "cipher_algo" / cs.Int32ul,  # @216 0 = none; anything else is refused
    "reserved" / cs.Bytes(36),  # @220
)

ChunkInfoEntry = cs.Struct(  # RafsV5ChunkInfo, 80 bytes per unique chunk, sorted by digest
    "digest" / cs.Bytes(32),  # @0 sha256 of the uncompressed chunk
    "blob_index" / cs.Int32ul,  # @32
    "flags" / cs.Int32ul,  # @36 CHUNK_FLAG_COMPRESSED
    "compressed_size" / cs.Int32ul,  # @40
    "uncompressed_size" / cs.Int32ul,  # @44
    "compressed_offset" / cs.Int64ul,  # @48 in the blob file
    "uncompressed_offset" / cs.Int64ul,  # @56 in the blob's uncompressed address space
    "file_offset" / cs.Int64ul,  # @64 offset in the first file that held it
    "index" / cs.Int32ul,  # @72 position in the blob CI array
    "crc32" / cs.Int32ul,  # @76 0 (not computed)
)

BLOB_CI_MAGIC = 0xB10BB10B
BlobCIHeader = cs.Struct(  # 4096 bytes at the end of a blob file
    "magic" / cs.Int32ul,  # @0 0xB10BB10B
    "features" / cs.Int32ul,  # @4 BlobFeatures (ALIGNED always set)
    "ci_compressor" / cs.Int32ul,  # @8
    "ci_entries" / cs.Int32ul,  # @12
    "ci_offset" / cs.Int64ul,  # @16
    "ci_compressed_size" / cs.Int64ul,  # @24
    "ci_uncompressed_size" / cs.Int64ul,  # @32
    "zran_offset" / cs.Int64ul,  # @40
    "zran_size" / cs.Int64ul,  # @48
    "zran_count" / cs.Int32ul,  # @56
    "reserved" / cs.Bytes(4032),  # @60
    "magic2" / cs.Int32ul,  # @4092 0xB10BB10B
)

CIEntryV2 = cs.Struct(  # 24 bytes per chunk (CHUNK_INFO_V2)
    "uncomp_info" / cs.Int64ul,  # bits 0..31 uoff/4096, 32..55 usize-1, 56..63 CI_V2_FLAG_*
    "comp_info" / cs.Int64ul,  # bits 0..39 coff, 40..63 csize
    "data" / cs.Int64ul,  # crc32 (HAS_CRC32) or batch / zran indexes
)
CI_V2_FLAG_COMPRESSED = 0x1
CI_V2_FLAG_ZRAN = 0x2
CI_V2_FLAG_BATCH = 0x4
CI_V2_FLAG_ENCRYPTED = 0x8
CI_V2_FLAG_HAS_CRC32 = 0x10

# Blob ToC (storage/src/meta/toc.rs): 128-byte entries naming the blob's sections.
TAR_HEADER_SIZE = 512  # GNU tar header written *after* each section's bytes
TOC_ENTRY_BLOB_RAW = "image.blob"
TOC_ENTRY_BOOTSTRAP = "image.boot"
TOC_ENTRY_BLOB_META = "blob.meta"
TOC_ENTRY_BLOB_META_HEADER = "blob.meta.header"
TOC_ENTRY_BLOB_DIGEST = "blob.digest"
TOC_ENTRY_BLOB_TOC = "rafs.blob.toc"
TOC_FLAG_COMPRESSION = {0x1: "none", 0x2: "zstd", 0x4: "lz4"}
MAX_TOC_SIZE = 0x1_0000  # nydus caps the ToC at 64 KiB
TocEntry = cs.Struct(
    "flags" / cs.Int32ul,  # @0 TOC_FLAG_COMPRESSION of the section's bytes
    "reserved1" / cs.Int32ul,  # @4
    "name" / cs.Bytes(16),  # @8 NUL-padded TOC_ENTRY_*
    "uncompressed_digest" / cs.Bytes(32),  # @24 sha256 of the section's (uncompressed) bytes
    "compressed_offset" / cs.Int64ul,  # @56 in the blob file
    "compressed_size" / cs.Int64ul,  # @64
    "uncompressed_size" / cs.Int64ul,  # @72
    "reserved2" / cs.Bytes(48),  # @80
)

CIEntryV1 = cs.Struct(  # 16 bytes per chunk, by chunk index
    "uncomp_info" / cs.Int64ul,
    "comp_info" / cs.Int64ul,
)

SUPERBLOCK_EXT_SIZE = SuperBlockExt.sizeof()
BLOB_ENTRY_SIZE = BlobEntry.sizeof()
CHUNK_INFO_SIZE = ChunkInfoEntry.sizeof()
BLOB_CI_HEADER_SIZE = BlobCIHeader.sizeof()
CI_ENTRY_V1_SIZE = CIEntryV1.sizeof()
CI_ENTRY_V2_SIZE = CIEntryV2.sizeof()
TOC_ENTRY_SIZE = TocEntry.sizeof()


def encode_ci_v1(uncompressed_offset: int, uncompressed_size: int,
                 compressed_offset: int, compressed_size: int) -> tuple[int, int]:
    """Pack one V1 chunk-info entry.

    uncomp_info: bits 12..43 = uncompressed_offset (4 KiB-aligned, stored in place),
    bits 44..63 = (usize-1) low 20 bits, bits 8..11 = (usize-1) bits 20..23.
    comp_info: bits 0..39 = compressed_offset, bits 40..43 = (csize-1) bits 20..23,
    bits 44..63 = (csize-1) low 20 bits.  Sizes 1..16 MiB.
    """
    if uncompressed_offset & 0xFFF or uncompressed_offset >> 44:
        raise FormatError(f"CI uncompressed offset {uncompressed_offset:#x} not encodable")
    if not (1 <= uncompressed_size <= MAX_CHUNK_SIZE and 1 <= compressed_size <= MAX_CHUNK_SIZE):
        raise FormatError("CI chunk size out of range (1 B .. 16 MiB)")
    if compressed_offset >> 40:
        raise FormatError(f"CI compressed offset {compressed_offset:#x} not encodable")
    u = uncompressed_size - 1
    c = compressed_size - 1
    uncomp_info = uncompressed_offset | ((u & 0xFFFFF) << 44) | (((u >> 20) & 0xF) << 8)
    comp_info = compressed_offset | (((c >> 20) & 0xF) << 40) | ((c & 0xFFFFF) << 44)
    return uncomp_info, comp_info


def decode_ci_v1(uncomp_info: int, comp_info: int) -> tuple[int, int, int, int]:
    """Inverse of `encode_ci_v1`: (uoff, usize, coff, csize)."""
    uoff = uncomp_info & 0x0000_0FFF_FFFF_F000
    usize = (((uncomp_info >> 8) & 0xF) << 20 | (uncomp_info >> 44)) + 1
    coff = comp_info & 0xFF_FFFF_FFFF
    csize = (((comp_info >> 40) & 0xF) << 20 | (comp_info >> 44)) + 1
    return uoff, usize, coff, csize


def blob_id_bytes(blob_id: str) -> bytes:
    raw = blob_id.encode("ascii")
    if len(raw) > 64:
        raise FormatError(f"blob id longer than 64 bytes: {blob_id!r}")
    return raw.ljust(64, b"\0")


def blob_id_str(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")

CHUNK_INFO_PACK = struct.Struct("<32sIIIIQQQII")  # agrees with ChunkInfoEntry
CI_ENTRY_V1_PACK = struct.Struct("<QQ")
CI_ENTRY_V2_PACK = struct.Struct("<QQQ")


def decode_ci_v2(uncomp_info: int, comp_info: int) -> tuple[int, int, int, int, int]:
    """One V2 chunk-info entry: (uoff, usize, coff, csize, flags)."""
    uoff = (uncomp_info & 0xFFFF_FFFF) << 12
    usize = ((uncomp_info >> 32) & 0xFF_FFFF) + 1
    flags = uncomp_info >> 56
    coff = comp_info & 0xFF_FFFF_FFFF
    csize = (comp_info >> 40) & 0xFF_FFFF
    return uoff, usize, coff, csize, flags


def feature_names(features: int) -> list[str]:
    """Names of the BlobFeatures bits set in `features` (unknown bits as hex)."""
    out = [n for bit, n in BLOB_FEATURE_NAMES.items() if features & bit]
    rest = features & ~sum(BLOB_FEATURE_NAMES)
    if rest:
        out.append(f"{rest:#x}")
    return out


def tar_header_entry(raw: bytes) -> tuple[str, int] | None:
    """(name, size) of a 512-byte tar header as nydus writes them, or None if it is not one."""
    if len(raw) != TAR_HEADER_SIZE:
        return None
    name = raw[:100].split(b"\0", 1)[0]
    size_field = raw[124:136].split(b"\0", 1)[0].strip()
    if not size_field or size_field.strip(b"01234567"):
        return None
    try:
        size = int(size_field, 8)
        text = name.decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None
    chksum_field = raw[148:156].split(b"\0", 1)[0].strip()
    try:
        want = int(chksum_field, 8)
    except ValueError:
        return None
    got = sum(raw[:148]) + 8 * 32 + sum(raw[156:])
    return (text, size) if got == want else None


# -- validate(): what nydusd's loader checks (rafs/src/metadata/layout/v6.rs), pure -----------

def validate_ext_superblock(ext: object, meta_size: int, devslot_end: int) -> list[str]:
    """`RafsV6SuperBlockExt::validate`: one compression bit, one hash bit, chunk size, tables
    inside the bootstrap, 4 KiB-aligned, after the device slots, not overlapping."""
    e: Any = ext
    bad: list[str] = []
    flags = e.s_flags
    if sum(1 for k in COMPRESSION_FLAGS if flags & k) != 1:
        bad.append(f"ext superblock: flags {flags:#x} must carry exactly one compression bit")
    if sum(1 for k in HASH_FLAGS if flags & k) != 1:
        bad.append(f"ext superblock: flags {flags:#x} must carry exactly one hash bit")
    cs_ = e.s_chunk_size
    if not (MIN_CHUNK_SIZE <= cs_ <= MAX_CHUNK_SIZE) or cs_ & (cs_ - 1):
        bad.append(f"ext superblock: chunk size {cs_:#x} invalid")
    ranges: list[tuple[str, int, int]] = []
    for what, off, size, unit, aligned in (
            ("blob table", e.s_blob_table_offset, e.s_blob_table_size, BLOB_ENTRY_SIZE, True),
            ("chunk table", e.s_chunk_table_offset, e.s_chunk_table_size, CHUNK_INFO_SIZE, True),
            ("prefetch table", e.s_prefetch_table_offset, e.s_prefetch_table_size, 4, False)):
        if size == 0 or (what == "prefetch table" and off == 0):
            continue
        if (off < 4096 or (aligned and off % 4096) or off < devslot_end or size % unit
                or off + size > meta_size):
            bad.append(f"ext superblock: {what} at {off:#x}+{size:#x} is invalid")
            continue
        for other, o2, s2 in ranges:
            if off < o2 + s2 and o2 < off + size:
                bad.append(f"ext superblock: {what} overlaps the {other}")
        ranges.append((what, off, size))
    return bad


def refused_super_flags(flags: int) -> str | None:
    """The first feature of the ext superblock's s_flags that this project refuses."""
    if flags & FLAG_TARFS_MODE:
        return "tarfs mode"
    if flags & FLAG_ENCRYPTION_AES128_XTS:
        return "encrypted chunks (aes128-xts)"
    if flags & FLAG_COMPRESSION_GZIP:
        return "gzip-compressed chunks"
    return None


def refused_blob_features(features: int, cipher_algo: int = 0,
                          compression_algo: int = 0) -> str | None:
    """The first blob feature that changes what a byte means and is not implemented."""
    for bit, name in REFUSED_BLOB_FEATURES.items():
        if features & bit:
            return name
    if cipher_algo:
        return f"encrypted chunks (cipher {cipher_algo})"
    if COMPRESSOR_NAMES.get(compression_algo) == "gzip":
        return "gzip-compressed chunks"
    return None


def validate_device_slot(slot: object, blob_id: str, uncompressed_size: int) -> list[str]:
    """`RafsV6Device::validate`: a 64-char tag and non-zero blocks; and what we rely on:
    the tag is the blob id and blocks cover the blob's uncompressed size.  `mapped_blkaddr`
    (nydus-image >= 2.3: the blob's start in a unified address space) is informational."""
    d: Any = slot
    bad = []
    tag = blob_id_str(d.tag)
    if len(tag) != 64:
        bad.append(f"device slot tag {tag[:16]!r} is not 64 characters")
    elif tag != blob_id:
        bad.append(f"device slot tag {tag[:12]!r} != blob id")
    if d.blocks == 0:
        bad.append("device slot has 0 blocks")
    elif d.blocks != uncompressed_size >> 12:
        bad.append(f"device slot blocks {d.blocks} != uncompressed size / 4096")
    return bad


def validate_blob_entry(entry: object, index: int, chunk_size: int) -> list[str]:
    """`RafsV6Blob::validate` (minus what `refused_blob_features` reports): id, index, chunk
    size, algorithms, size bounds, feature bits, CI table size per CI format."""
    e: Any = entry
    bad = []
    blob_id = blob_id_str(e.blob_id)
    if len(blob_id) != 64 or not set(blob_id) <= set("0123456789abcdef"):
        bad.append("blob id is not 64 lowercase hex chars")
    if e.blob_index != index:
        bad.append(f"blob_index {e.blob_index} at position {index}")
    if e.chunk_size != chunk_size:
        bad.append(f"chunk size {e.chunk_size:#x} differs from the image's {chunk_size:#x}")
    if e.chunk_count > MAX_CHUNKS_PER_BLOB:
        bad.append(f"chunk count {e.chunk_count} too large")
    for what, algo in (("compressor", e.compression_algo), ("chunk-info compressor",
                                                            e.ci_compressor)):
        name = COMPRESSOR_NAMES.get(algo)
        if name is None:
            bad.append(f"unknown {what} id {algo}")
        elif name not in SUPPORTED_COMPRESSORS:
            bad.append(f"unsupported {what} {name}")
    if e.digest_algo not in DIGESTER_NAMES:
        bad.append(f"unknown digester id {e.digest_algo}")
    f = e.features
    if f & BLOB_FEATURE_INCOMPAT_MASK & ~BLOB_FEATURE_KNOWN_INCOMPAT or (
            f & BLOB_FEATURE_V5_NO_EXT_BLOB_TABLE):
        bad.append(f"unknown incompatible features {f:#x}")
    if not f & BLOB_FEATURE_ALIGNED:
        bad.append("ALIGNED feature missing")
    if e.uncompressed_size % 4096 or e.uncompressed_size == 0:
        bad.append(f"uncompressed size {e.uncompressed_size} not a non-zero 4 KiB multiple")
    if e.ci_compressed_size > e.ci_uncompressed_size:
        bad.append(f"ci_compressed_size {e.ci_compressed_size} > ci_uncompressed_size "
                   f"{e.ci_uncompressed_size}")
    entry_size = CI_ENTRY_V2_SIZE if f & BLOB_FEATURE_CHUNK_INFO_V2 else CI_ENTRY_V1_SIZE
    if not f & BLOB_FEATURE_CHUNKDICT_GENERATED and (
            e.ci_uncompressed_size != e.chunk_count * entry_size):
        bad.append(f"ci_uncompressed_size {e.ci_uncompressed_size} != {e.chunk_count} * "
                   f"{entry_size}")
    if f & BLOB_FEATURE_HAS_TOC and not f & BLOB_FEATURE_CAP_TAR_TOC:
        bad.append("ToC feature without CAP_TAR_TOC")
    if e.blob_toc_size > MAX_TOC_SIZE or (e.blob_toc_size and not f & BLOB_FEATURE_HAS_TOC):
        bad.append(f"blob_toc_size {e.blob_toc_size} invalid")
    return bad


def validate_ci_header(hdr: object, entry: object) -> list[str]:
    """The blob's chunk-info header (`BlobCompressionContextHeader`) must repeat the blob
    table's CI fields (nydus's `validate_header`)."""
    h: Any = hdr
    e: Any = entry
    bad = []
    if h.magic != BLOB_CI_MAGIC or h.magic2 != BLOB_CI_MAGIC:
        bad.append("chunk-info header magic is not 0xB10BB10B")
    elif (h.ci_compressor, h.ci_offset, h.ci_compressed_size, h.ci_uncompressed_size) != (
            e.ci_compressor, e.ci_offset, e.ci_compressed_size, e.ci_uncompressed_size) or (
            not e.features & BLOB_FEATURE_CHUNKDICT_GENERATED and h.ci_entries != e.chunk_count):
        bad.append("chunk-info header disagrees with the blob table")
    return bad


def validate_toc_entry(entry: object, file_size: int) -> list[str]:
    """A ToC entry has a known compressor and lies inside the blob file.  The image.blob
    entry is informational (nydus-image 2.2 records its end as its offset, and the running
    blob hash as its digest): only its flags are checked."""
    t: Any = entry
    bad = []
    name = t.name.split(b"\0", 1)[0].decode("ascii", "replace")
    if t.flags & ~0xF or t.flags & 0xF not in TOC_FLAG_COMPRESSION:
        bad.append(f"ToC entry {name!r}: flags {t.flags:#x} unknown")
    if name != TOC_ENTRY_BLOB_RAW and t.compressed_offset + t.compressed_size > file_size:
        bad.append(f"ToC entry {name!r}: {t.compressed_offset:#x}+{t.compressed_size} beyond "
                   f"the {file_size}-byte file")
    return bad
