"""layout/: sizes, offsets, round trips, and garbage that must raise only our errors."""

from __future__ import annotations

import construct as cs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erofs_nydus.errors import ErofsNydusError, FormatError
from erofs_nydus.layout import build, parse
from erofs_nydus.layout import erofs as E
from erofs_nydus.layout import rafs as R

SIZES = [
    (E.SuperBlock, 128), (E.InodeCompact, 32), (E.InodeExtended, 64), (E.Dirent, 12),
    (E.XattrIbodyHeader, 12), (E.XattrEntry, 4), (E.ChunkIndex, 8), (E.DeviceSlot, 128),
    (R.SuperBlockExt, 256), (R.BlobEntry, 256), (R.ChunkInfoEntry, 80),
    (R.BlobCIHeader, 4096), (R.CIEntryV1, 16),
]


@pytest.mark.parametrize(("struct", "size"), SIZES)
def test_struct_sizes(struct: cs.Struct, size: int) -> None:
    assert struct.sizeof() == size


def _offsets(struct: cs.Struct) -> dict[str, int]:
    out, off = {}, 0
    for sub in struct.subcons:
        out[sub.name] = off
        off += sub.sizeof()
    return out


@pytest.mark.parametrize(("struct", "expected"), [
    (E.SuperBlock, {"magic": 0, "checksum": 4, "feature_compat": 8, "blkszbits": 12,
                    "root_nid": 14, "inos": 16, "blocks": 36, "meta_blkaddr": 40,
                    "xattr_blkaddr": 44, "volume_name": 64, "feature_incompat": 80,
                    "extra_devices": 86, "devt_slotoff": 88, "dirblkbits": 90,
                    "packed_nid": 96}),
    (E.InodeExtended, {"i_format": 0, "i_xattr_icount": 2, "i_mode": 4, "i_size": 8,
                       "i_u": 16, "i_ino": 20, "i_uid": 24, "i_gid": 28, "i_mtime": 32,
                       "i_mtime_nsec": 40, "i_nlink": 44}),
    (E.InodeCompact, {"i_nlink": 6, "i_size": 8, "i_u": 16, "i_ino": 20, "i_uid": 24,
                      "i_gid": 26}),
    (E.Dirent, {"nid": 0, "nameoff": 8, "file_type": 10}),
    (E.DeviceSlot, {"tag": 0, "blocks": 64, "mapped_blkaddr": 68}),
    (R.SuperBlockExt, {"s_flags": 0, "s_blob_table_offset": 8, "s_blob_table_size": 16,
                       "s_chunk_size": 20, "s_chunk_table_offset": 24,
                       "s_chunk_table_size": 32, "s_prefetch_table_offset": 40,
                       "s_prefetch_table_size": 48}),
    (R.BlobEntry, {"blob_id": 0, "blob_index": 64, "chunk_size": 68, "chunk_count": 72,
                   "compression_algo": 76, "digest_algo": 80, "features": 84,
                   "compressed_size": 88, "uncompressed_size": 96, "blob_toc_size": 104,
                   "ci_compressor": 108, "ci_offset": 112, "ci_compressed_size": 120,
                   "ci_uncompressed_size": 128, "blob_toc_digest": 136,
                   "blob_meta_digest": 168, "blob_meta_size": 200, "cipher_iv": 208,
                   "cipher_algo": 216}),
    (R.ChunkInfoEntry, {"digest": 0, "blob_index": 32, "flags": 36, "compressed_size": 40,
                        "uncompressed_size": 44, "compressed_offset": 48,
                        "uncompressed_offset": 56, "file_offset": 64, "index": 72,
                        "crc32": 76}),
    (R.BlobCIHeader, {"magic": 0, "features": 4, "ci_compressor": 8, "ci_entries": 12,
                      "ci_offset": 16, "ci_compressed_size": 24, "ci_uncompressed_size": 32,
                      "zran_offset": 40, "zran_size": 48, "zran_count": 56, "magic2": 4092}),
])
def test_field_offsets(struct: cs.Struct, expected: dict[str, int]) -> None:
    offsets = _offsets(struct)
    for name, off in expected.items():
        assert offsets[name] == off, name


def test_fixed_offsets_in_bootstrap() -> None:
    assert E.EROFS_SUPER_OFFSET == 1024
    assert R.EXT_SUPERBLOCK_OFFSET == 1152
    assert R.DEVICE_TABLE_OFFSET == 1408 == R.DEVT_SLOTOFF * 128


def _values(struct: cs.Struct, draw: st.DrawFn) -> dict[str, object]:
    out: dict[str, object] = {}
    for sub in struct.subcons:
        size = sub.sizeof()
        if isinstance(sub.subcon, cs.Bytes) or type(sub.subcon).__name__ == "Bytes":
            out[sub.name] = draw(st.binary(min_size=size, max_size=size))
        else:
            out[sub.name] = draw(st.integers(0, (1 << (8 * size)) - 1))
    return out


@pytest.mark.parametrize(("struct", "_size"), SIZES)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_round_trip(struct: cs.Struct, _size: int, data: st.DataObject) -> None:
    values = _values(struct, data.draw)
    raw = build(struct, values)
    assert len(raw) == struct.sizeof()
    parsed = parse(struct, raw)
    assert {k: parsed[k] for k in values} == values


@pytest.mark.parametrize(("struct", "pack"), [
    (E.InodeExtended, E.INODE_EXTENDED_PACK), (E.InodeCompact, E.INODE_COMPACT_PACK),
    (E.Dirent, E.DIRENT_PACK), (E.ChunkIndex, E.CHUNK_INDEX_PACK),
    (E.XattrEntry, E.XATTR_ENTRY_PACK), (R.ChunkInfoEntry, R.CHUNK_INFO_PACK),
    (R.CIEntryV1, R.CI_ENTRY_V1_PACK),
])
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_fast_packers_agree_with_construct(struct: cs.Struct, pack: object,
                                           data: st.DataObject) -> None:
    values = _values(struct, data.draw)
    raw = build(struct, values)
    assert pack.unpack(raw) == tuple(values.values())  # type: ignore[attr-defined]


@given(st.binary(max_size=300), st.integers(0, 300))
def test_parse_garbage_raises_format_error_only(buf: bytes, offset: int) -> None:
    for struct, _ in SIZES:
        try:
            parse(struct, buf, offset)
        except FormatError:
            pass


def test_build_out_of_range_is_format_error() -> None:
    with pytest.raises(FormatError):
        build(E.Dirent, {"nid": -1, "nameoff": 0, "file_type": 0, "reserved": 0})


@given(uoff=st.integers(0, (1 << 32) - 1).map(lambda b: b << 12),
       usize=st.integers(1, 1 << 24), coff=st.integers(0, (1 << 40) - 1),
       csize=st.integers(1, 1 << 24))
def test_ci_v1_round_trip(uoff: int, usize: int, coff: int, csize: int) -> None:
    packed = R.encode_ci_v1(uoff, usize, coff, csize)
    assert R.decode_ci_v1(*packed) == (uoff, usize, coff, csize)


def test_ci_v1_known_value() -> None:
    # 4 KiB chunk at 0x1000, stored raw at 0: usize-1 = 0xfff in bits 44..63
    u, c = R.encode_ci_v1(0x1000, 0x1000, 0, 0x1000)
    assert u == 0x1000 | (0xFFF << 44)
    assert c == 0xFFF << 44
    with pytest.raises(FormatError):
        R.encode_ci_v1(0x800, 1, 0, 1)


@given(major=st.integers(0, 0xFFF), minor=st.integers(0, 0xFFFFF))
def test_dev_encoding_round_trip(major: int, minor: int) -> None:
    assert E.decode_dev(E.encode_dev(major, minor)) == (major, minor)


def test_dev_encoding_matches_kernel() -> None:
    assert E.encode_dev(8, 1) == 0x801
    assert E.encode_dev(1, 0x123) == 0x23 | (1 << 8) | (0x100 << 12)


def test_xattr_prefixes() -> None:
    assert E.split_xattr_name(b"user.foo") == (1, b"foo")
    assert E.split_xattr_name(b"trusted.overlay.opaque") == (4, b"overlay.opaque")
    assert E.split_xattr_name(b"security.capability") == (6, b"capability")
    assert E.split_xattr_name(b"system.posix_acl_access") == (2, b"")
    assert E.split_xattr_name(b"system.posix_acl_default") == (3, b"")
    assert E.split_xattr_name(b"system.nfs4_acl") is None
    assert E.split_xattr_name(b"user.") is None


def test_errors_form_one_hierarchy() -> None:
    assert issubclass(FormatError, ErofsNydusError)
    assert issubclass(FormatError, ValueError)
