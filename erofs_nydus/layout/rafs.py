"""Nydus RAFS v6 extensions to EROFS, and the data blob's chunk-info trailer.

Source: dragonflyoss/nydus `rafs/src/metadata/layout/v6.rs`, `storage/src/meta/`
as summarised in /work/shared/reference/nydus-rafs-v6.md sections 1.3-1.5, 1.12, 2.3.
"""

from __future__ import annotations

import struct

import construct as cs

from erofs_nydus.errors import FormatError

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
COMPRESSION_FLAGS = {FLAG_COMPRESSION_NONE: "none", FLAG_COMPRESSION_LZ4: "lz4",
                     FLAG_COMPRESSION_GZIP: "gzip", FLAG_COMPRESSION_ZSTD: "zstd"}
HASH_FLAGS = {FLAG_HASH_BLAKE3: "blake3", FLAG_HASH_SHA256: "sha256"}

# blob table compression_algo / digest_algo
COMPRESSOR_IDS = {"none": 0, "lz4": 1, "gzip": 2, "zstd": 3}
DIGESTER_IDS = {"blake3": 0, "sha256": 1}

# BlobFeatures
BLOB_FEATURE_ALIGNED = 0x1  # uncompressed address space 4 KiB-aligned per chunk (v6)
BLOB_FEATURE_CHUNK_INFO_V2 = 0x4
BLOB_FEATURE_KNOWN_INCOMPAT = 0x0FFF

# RafsV5ChunkInfo flags
CHUNK_FLAG_COMPRESSED = 0x1

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
    "blob_id" / cs.Bytes(64),  # @0 sha256 hex of the blob file, NUL-padded
    "blob_index" / cs.Int32ul,  # @64 equals its position
    "chunk_size" / cs.Int32ul,  # @68 equals the ext superblock's
    "chunk_count" / cs.Int32ul,  # @72
    "compression_algo" / cs.Int32ul,  # @76 COMPRESSOR_IDS
    "digest_algo" / cs.Int32ul,  # @80 DIGESTER_IDS
    "features" / cs.Int32ul,  # @84 BlobFeatures
    "compressed_size" / cs.Int64ul,  # @88 bytes of chunk data in the blob file
    "uncompressed_size" / cs.Int64ul,  # @96 4 KiB multiple: size of the cache file
    "blob_toc_size" / cs.Int32ul,  # @104 0
    "ci_compressor" / cs.Int32ul,  # @108
    "ci_offset" / cs.Int64ul,  # @112 offset of the CI array in the blob
    "ci_compressed_size" / cs.Int64ul,  # @120
    "ci_uncompressed_size" / cs.Int64ul,  # @128 chunk_count * 16 (V1)
    "blob_toc_digest" / cs.Bytes(32),  # @136
    "blob_meta_digest" / cs.Bytes(32),  # @168
    "blob_meta_size" / cs.Int64ul,  # @200
    "cipher_iv" / cs.Bytes(8),  # @208
    "cipher_algo" / cs.Int32ul,  # @216
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

CIEntryV1 = cs.Struct(  # 16 bytes per chunk, by chunk index
    "uncomp_info" / cs.Int64ul,
    "comp_info" / cs.Int64ul,
)

SUPERBLOCK_EXT_SIZE = SuperBlockExt.sizeof()
BLOB_ENTRY_SIZE = BlobEntry.sizeof()
CHUNK_INFO_SIZE = ChunkInfoEntry.sizeof()
BLOB_CI_HEADER_SIZE = BlobCIHeader.sizeof()
CI_ENTRY_V1_SIZE = CIEntryV1.sizeof()


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
