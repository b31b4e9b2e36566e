"""EROFS on-disk structures as RAFS v6 writes them.

Source: linux `fs/erofs/erofs_fs.h` (6.12), checked against mkfs.erofs 1.5 images and
/work/shared/reference/kernel-interfaces.md section C.  All little-endian.
"""

from __future__ import annotations

import struct
from typing import Any

import construct as cs

EROFS_SUPER_MAGIC = 0xE0F5E1E2
EROFS_SUPER_OFFSET = 1024  # the superblock sits at byte 1024 of block 0
ISLOT_BITS = 5  # inodes live on 32-byte slots: offset = meta_blkaddr*4096 + nid*32

# feature bits
COMPAT_SB_CHKSUM = 0x1
COMPAT_MTIME = 0x2
COMPAT_RAFS_V6 = 0x4000_0000  # Nydus marks its bootstraps with this compat bit
INCOMPAT_CHUNKED_FILE = 0x4
INCOMPAT_DEVICE_TABLE = 0x8

# i_format: bit 0 = version (1 = extended 64 B), bits 1..3 = data layout
INODE_LAYOUT_COMPACT = 0
INODE_LAYOUT_EXTENDED = 1
DATALAYOUT_FLAT_PLAIN = 0
DATALAYOUT_FLAT_INLINE = 2
DATALAYOUT_CHUNK_BASED = 4

# chunk-based i_u: low 5 bits = chunkbits - blkszbits, 0x20 = 8-byte chunk indexes
CHUNK_FORMAT_BLKBITS_MASK = 0x1F
CHUNK_FORMAT_INDEXES = 0x20
NULL_ADDR = 0xFFFFFFFF

# i_reserved (u16 @6 of the extended inode) is ignored by the kernel; erofs_nydus keeps
# layer-merge hints there.  IMPLICIT_DIR: a directory synthesized as the parent of a tar
# entry, whose metadata a merge must not apply over the lower layers' directory.
I_RESERVED_IMPLICIT_DIR = 0x1

# dirent file types (d_type of the kernel's fs_ftype)
FT_UNKNOWN, FT_REG_FILE, FT_DIR, FT_CHRDEV, FT_BLKDEV, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)

# xattr name indexes and their prefixes (inline xattrs only; no long prefixes)
XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_SECURITY = 6
XATTR_PREFIXES: dict[int, bytes] = {
    XATTR_INDEX_USER: b"user.",
    XATTR_INDEX_POSIX_ACL_ACCESS: b"system.posix_acl_access",
    XATTR_INDEX_POSIX_ACL_DEFAULT: b"system.posix_acl_default",
    XATTR_INDEX_TRUSTED: b"trusted.",
    XATTR_INDEX_SECURITY: b"security.",
}

SuperBlock = cs.Struct(  # 128 bytes at byte 1024
    "magic" / cs.Int32ul,  # @0 EROFS_SUPER_MAGIC
    "checksum" / cs.Int32ul,  # @4 crc32c of [1024, 4096) if COMPAT_SB_CHKSUM
    "feature_compat" / cs.Int32ul,  # @8
    "blkszbits" / cs.Int8ul,  # @12 12 for 4 KiB blocks (required by fscache)
    "sb_extslots" / cs.Int8ul,  # @13 0
    "root_nid" / cs.Int16ul,  # @14 root inode = meta_blkaddr*4096 + root_nid*32
    "inos" / cs.Int64ul,  # @16
    "build_time" / cs.Int64ul,  # @24 time of every compact inode
    "build_time_nsec" / cs.Int32ul,  # @32
    "blocks" / cs.Int32ul,  # @36 blocks of the primary image (informational)
    "meta_blkaddr" / cs.Int32ul,  # @40 start block of the inode area
    "xattr_blkaddr" / cs.Int32ul,  # @44 shared xattr area; RAFS v6 requires 0
    "uuid" / cs.Bytes(16),  # @48
    "volume_name" / cs.Bytes(16),  # @64 must contain a NUL
    "feature_incompat" / cs.Int32ul,  # @80 RAFS v6: CHUNKED_FILE | DEVICE_TABLE
    "u1" / cs.Int16ul,  # @84 available_compr_algs; 0 for uncompressed
    "extra_devices" / cs.Int16ul,  # @86 number of data blobs (device slots)
    "devt_slotoff" / cs.Int16ul,  # @88 device table at devt_slotoff*128 (Nydus: 11 = 1408)
    "dirblkbits" / cs.Int8ul,  # @90 must be 0
    "xattr_prefix_count" / cs.Int8ul,  # @91
    "xattr_prefix_start" / cs.Int32ul,  # @92
    "packed_nid" / cs.Int64ul,  # @96
    "xattr_filter_reserved" / cs.Int8ul,  # @104
    "reserved2" / cs.Bytes(23),  # @105
)

InodeCompact = cs.Struct(  # 32 bytes
    "i_format" / cs.Int16ul,
    "i_xattr_icount" / cs.Int16ul,
    "i_mode" / cs.Int16ul,
    "i_nlink" / cs.Int16ul,
    "i_size" / cs.Int32ul,
    "i_reserved" / cs.Int32ul,
    "i_u" / cs.Int32ul,
    "i_ino" / cs.Int32ul,
    "i_uid" / cs.Int16ul,
    "i_gid" / cs.Int16ul,
    "i_reserved2" / cs.Int32ul,
)

InodeExtended = cs.Struct(  # 64 bytes
    "i_format" / cs.Int16ul,  # @0 (datalayout << 1) | 1
    "i_xattr_icount" / cs.Int16ul,  # @2 0, or (xattr ibody bytes - 12) / 4 + 1
    "i_mode" / cs.Int16ul,  # @4
    "i_reserved" / cs.Int16ul,  # @6
    "i_size" / cs.Int64ul,  # @8
    "i_u" / cs.Int32ul,  # @16 raw_blkaddr | rdev | chunk format
    "i_ino" / cs.Int32ul,  # @20 RAFS inode number (hard links share it)
    "i_uid" / cs.Int32ul,  # @24
    "i_gid" / cs.Int32ul,  # @28
    "i_mtime" / cs.Int64ul,  # @32
    "i_mtime_nsec" / cs.Int32ul,  # @40
    "i_nlink" / cs.Int32ul,  # @44
    "i_reserved2" / cs.Bytes(16),  # @48
)

Dirent = cs.Struct(  # 12 bytes; a dir block is [dirents][names], names not NUL-terminated
    "nid" / cs.Int64ul,
    "nameoff" / cs.Int16ul,  # entry 0's nameoff / 12 = number of entries in the block
    "file_type" / cs.Int8ul,
    "reserved" / cs.Int8ul,
)

XattrIbodyHeader = cs.Struct(  # 12 bytes right after the inode
    "h_name_filter" / cs.Int32ul,  # bloom filter; 0 = "maybe present" for every name
    "h_shared_count" / cs.Int8ul,  # RAFS v6: 0 (no shared xattrs)
    "h_reserved" / cs.Bytes(7),
)

XattrEntry = cs.Struct(  # 4-byte header, then name suffix and value, padded to 4 bytes
    "e_name_len" / cs.Int8ul,
    "e_name_index" / cs.Int8ul,
    "e_value_size" / cs.Int16ul,
)

ChunkIndex = cs.Struct(  # 8 bytes per chunk of a CHUNK_BASED inode with INDEXES
    "advise" / cs.Int16ul,  # Nydus: low 16 bits of the chunk's index in the blob CI array
    "device_id" / cs.Int16ul,  # blob_index + 1 (bits 0..7); CI index bits 16..23 in bits 8..15
    "blkaddr" / cs.Int32ul,  # uncompressed_offset / 4096 within that blob
)

DeviceSlot = cs.Struct(  # 128 bytes at devt_slotoff*128 + 128*i; slot i = device_id i+1
    "tag" / cs.Bytes(64),  # blob id, 64 ASCII hex chars; the fscache cookie key
    "blocks" / cs.Int32ul,  # uncompressed_size / 4096
    "mapped_blkaddr" / cs.Int32ul,  # 0: no unified address space
    "reserved" / cs.Bytes(56),
)

SUPERBLOCK_SIZE = SuperBlock.sizeof()
INODE_COMPACT_SIZE = InodeCompact.sizeof()
INODE_EXTENDED_SIZE = InodeExtended.sizeof()
DIRENT_SIZE = Dirent.sizeof()
XATTR_IBODY_HEADER_SIZE = XattrIbodyHeader.sizeof()
XATTR_ENTRY_SIZE = XattrEntry.sizeof()
CHUNK_INDEX_SIZE = ChunkIndex.sizeof()
DEVICE_SLOT_SIZE = DeviceSlot.sizeof()


def i_format(datalayout: int, extended: bool = True) -> int:
    return (datalayout << 1) | (INODE_LAYOUT_EXTENDED if extended else INODE_LAYOUT_COMPACT)


def datalayout_of(fmt: int) -> int:
    return (fmt >> 1) & 0x7


def xattr_ibody_size(icount: int) -> int:
    """Bytes of the xattr body after the inode: 0, or 12 + 4*(icount-1)."""
    return 0 if icount == 0 else XATTR_IBODY_HEADER_SIZE + 4 * (icount - 1)


def encode_dev(major: int, minor: int) -> int:
    """The kernel's new_encode_dev(), as stored in i_u for char/block devices."""
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def decode_dev(value: int) -> tuple[int, int]:
    """Inverse of `encode_dev`: (major, minor)."""
    major = (value & 0xFFF00) >> 8
    minor = (value & 0xFF) | ((value >> 12) & 0xFFF00)
    return major, minor


def split_xattr_name(name: bytes) -> tuple[int, bytes] | None:
    """Map a full xattr name to (name_index, suffix); None for unsupported namespaces."""
    for index in (XATTR_INDEX_POSIX_ACL_ACCESS, XATTR_INDEX_POSIX_ACL_DEFAULT):
        if name == XATTR_PREFIXES[index]:
            return index, b""
    for index in (XATTR_INDEX_USER, XATTR_INDEX_TRUSTED, XATTR_INDEX_SECURITY):
        prefix = XATTR_PREFIXES[index]
        if name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix):]
    return None


# Fast fixed-layout codecs for the hot paths (one per inode / dirent / chunk).  They must
# agree byte for byte with the construct declarations above; tests/test_layout.py checks.
INODE_EXTENDED_PACK = struct.Struct("<HHHHQIIIIQII16s")
INODE_COMPACT_PACK = struct.Struct("<HHHHIIIIHHI")
DIRENT_PACK = struct.Struct("<QHBB")
CHUNK_INDEX_PACK = struct.Struct("<HHI")
XATTR_ENTRY_PACK = struct.Struct("<BBH")


def validate_superblock(sb: object, meta_size: int, devt_slotoff: int) -> list[str]:
    """`RafsV6SuperBlock::validate` of nydusd, plus the fields the kernel and our reader use:
    4 KiB blocks, no checksum, no shared xattrs, CHUNKED_FILE|DEVICE_TABLE, the RAFS v6 compat
    bit, the device table where Nydus puts it.  A bootstrap without devices must say
    `blocks` 0 (or 4096, an old nydus-image bug) — nydusd's "invalid extra device count"."""
    s: Any = sb
    bad = []
    if meta_size % 4096:
        bad.append(f"superblock: bootstrap size {meta_size} is not a 4 KiB multiple")
    if s.blkszbits != 12:
        bad.append(f"superblock: blkszbits {s.blkszbits}, RAFS v6 needs 12")
    if s.checksum:
        bad.append(f"superblock: checksum {s.checksum:#x}, nydusd requires 0")
    if s.sb_extslots:
        bad.append(f"superblock: sb_extslots {s.sb_extslots}, expected 0")
    if s.inos == 0:
        bad.append("superblock: inos is 0")
    if s.u1:
        bad.append(f"superblock: u1 {s.u1}, expected 0")
    if s.xattr_blkaddr:
        bad.append(f"superblock: xattr_blkaddr {s.xattr_blkaddr}, shared xattrs are not allowed")
    if s.meta_blkaddr * 4096 > meta_size:
        bad.append(f"superblock: meta_blkaddr {s.meta_blkaddr} beyond the bootstrap")
    if s.extra_devices == 0 and s.blocks not in (0, 4096):
        bad.append(f"superblock: blocks {s.blocks} with 0 extra devices (nydusd: invalid extra "
                   "device count)")
    if s.devt_slotoff != devt_slotoff:
        bad.append(f"superblock: devt_slotoff {s.devt_slotoff}, expected {devt_slotoff}")
    if s.feature_incompat != INCOMPAT_CHUNKED_FILE | INCOMPAT_DEVICE_TABLE:
        bad.append(f"superblock: feature_incompat {s.feature_incompat:#x}, expected 0xc")
    if not s.feature_compat & COMPAT_RAFS_V6:
        bad.append(f"superblock: feature_compat {s.feature_compat:#x} lacks RAFS_V6 (0x40000000)")
    if s.dirblkbits:
        bad.append(f"superblock: dirblkbits {s.dirblkbits}, expected 0")
    if b"\0" not in s.volume_name:
        bad.append("superblock: volume_name has no NUL")
    return bad
