"""Real Nydus images: the nydus-image 2.2 fixture (zstd, blake3, ToC blob, mapped_blkaddr),
the feature bits we accept or refuse, and the zstd/blake3 chunk codec."""

from __future__ import annotations

import hashlib
import re
import shutil
import struct
from pathlib import Path

import pytest
from daemon_support import fanotify_usable, run_cli

from erofs_nydus.errors import DigestMismatchError, FormatError, UnsupportedError
from erofs_nydus.layout import rafs as R
from erofs_nydus.mount import is_mountpoint
from erofs_nydus.rafs.check import check_bootstrap
from erofs_nydus.rafs.codec import compress_chunk, decode_chunk, digest
from erofs_nydus.rafs.image import ChunkInfo
from erofs_nydus.rafs.reader import BootstrapReader, read_image_meta

DATA = Path(__file__).parent / "data" / "nydus"
BOOT = DATA / "rafs-v6-2.2.boot"
BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"
# sha256 of blobfs/src/lib.rs and blobfs/src/sync_io.rs in dragonflyoss/nydus at
# 10a2fef0cbd94549186c4d2299b83ee357972fbf, the commit that added the fixture.
SOURCE_SHA256 = {
    "lib.rs": "1810eba864521293bb0d6b55a3c82318d4d89f294ed761c456d9088a17de0c69",
    "sync_io.rs": "e629ab260ff0dc02a24648a3e0dd8c13a5daf233d535c330e3201925f5eeff96",
}
BLOB_TABLE = 4096  # the fixture's s_blob_table_offset


def _patched(tmp_path: Path, offset: int, fmt: str, value: int) -> Path:
    data = bytearray(BOOT.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    out = tmp_path / "patched.boot"
    out.write_bytes(bytes(data))
    return out


def test_fixture_passes_check_with_blobs() -> None:
    report = check_bootstrap(BOOT.read_bytes(), "fixture", str(DATA))
    assert report.ok, report.problems
    assert report.chunks_verified == 2


def test_fixture_check_cli_and_inspect_tell_the_truth() -> None:
    out = run_cli("check", "-D", str(DATA), str(BOOT)).stdout
    assert "OK (3 inodes, 1 blobs, 2 chunks verified)" in out
    img = read_image_meta(BOOT.read_bytes())
    (b,) = img.blobs
    assert (b.compressor, b.digester, b.mapped_blkaddr) == ("zstd", "blake3", 512)
    assert b.tar_toc and b.file_size == (DATA / BLOB_ID).stat().st_size
    info = run_cli("inspect", "--json", str(BOOT)).stdout
    assert '"compressor": "zstd"' in info and '"digester": "blake3"' in info


def test_fixture_chunks_decode_to_the_nydus_sources() -> None:
    r = BootstrapReader(BOOT.read_bytes())
    blob = (DATA / BLOB_ID).read_bytes()
    for path, node in r.tree().walk():
        if not node.inode.is_reg:
            continue
        plain = b"".join(decode_chunk(blob[c.compressed_offset:c.compressed_offset
                                           + c.compressed_size], c) for c in node.inode.chunks)
        assert hashlib.sha256(plain).hexdigest() == SOURCE_SHA256[path.decode().lstrip("/")]


def test_blob_id_rule_and_toc_digest_are_checked(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    data = bytearray((DATA / BLOB_ID).read_bytes())
    data[-600] ^= 1  # inside the ToC
    (blobs / BLOB_ID).write_bytes(bytes(data))
    report = check_bootstrap(BOOT.read_bytes(), "fixture", str(blobs))
    assert any("ToC sha256" in p for p in report.problems), report.problems
    assert any("does not match its id" in p for p in report.problems), report.problems


def test_fixture_corrupt_zstd_chunk_is_refused_by_check(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    data = bytearray((DATA / BLOB_ID).read_bytes())
    data[100] ^= 0xFF  # inside chunk 0's zstd frame
    (blobs / BLOB_ID).write_bytes(bytes(data))
    report = check_bootstrap(BOOT.read_bytes(), "fixture", str(blobs))
    assert report.chunks_verified == 1
    assert any("chunk 0" in p for p in report.problems), report.problems


@pytest.mark.parametrize(("bit", "name"), [
    (R.BLOB_FEATURE_ENCRYPTED, "encrypted chunks"),
    (R.BLOB_FEATURE_BATCH, "batch chunks"),
    (R.BLOB_FEATURE_ZRAN, "zran (OCI-ref) chunks"),
    (R.BLOB_FEATURE_TARFS, "tarfs mode"),
    (R.BLOB_FEATURE_EXTERNAL, "external blobs"),
])
def test_refused_blob_features_name_the_feature(tmp_path: Path, bit: int, name: str) -> None:
    feats = int.from_bytes(BOOT.read_bytes()[BLOB_TABLE + 84:BLOB_TABLE + 88], "little")
    boot = _patched(tmp_path, BLOB_TABLE + 84, "<I", feats | bit)
    with pytest.raises(UnsupportedError, match=f"blob 0 .* uses {re.escape(name)}") as ei:
        read_image_meta(boot.read_bytes())
    assert "\n" not in str(ei.value)
    proc = run_cli("check", str(boot), check=False)
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0].endswith(f"unsupported: blob 0 ({BLOB_ID[:12]}) uses {name}")


def test_refused_cipher_gzip_tarfs_flag_and_batch_chunk(tmp_path: Path) -> None:
    boot = _patched(tmp_path, BLOB_TABLE + 216, "<I", 1)
    with pytest.raises(UnsupportedError, match="encrypted chunks"):
        read_image_meta(boot.read_bytes())
    boot = _patched(tmp_path, BLOB_TABLE + 76, "<I", R.COMPRESSOR_IDS["gzip"])
    with pytest.raises(UnsupportedError, match=r"uses gzip-compressed chunks$"):
        read_image_meta(boot.read_bytes())
    flags = int.from_bytes(BOOT.read_bytes()[1152:1160], "little")
    boot = _patched(tmp_path, 1152, "<Q", flags | R.FLAG_TARFS_MODE)
    with pytest.raises(UnsupportedError, match="image uses tarfs mode"):
        read_image_meta(boot.read_bytes())
    boot = _patched(tmp_path, 16384 + 36, "<I", R.CHUNK_FLAG_COMPRESSED | R.CHUNK_FLAG_BATCH)
    with pytest.raises(UnsupportedError, match="blob 0 has batch chunks"):
        read_image_meta(boot.read_bytes())


def test_mount_refuses_unsupported_feature_with_one_line(tmp_path: Path) -> None:
    feats = int.from_bytes(BOOT.read_bytes()[BLOB_TABLE + 84:BLOB_TABLE + 88], "little")
    boot = _patched(tmp_path, BLOB_TABLE + 84, "<I", feats | R.BLOB_FEATURE_ENCRYPTED)
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = run_cli("mount", str(boot), str(mp), "--blob-dir", str(DATA), "--cache-dir",
                   str(tmp_path / "cache"), check=False)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and errors[0].endswith("uses encrypted chunks"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_rafs_v5_is_fuse_only(tmp_path: Path) -> None:
    v5 = tmp_path / "v5.boot"
    v5.write_bytes(struct.pack("<II", R.RAFS_V5_MAGIC, 0x500) + bytes(8192))
    proc = run_cli("check", str(v5), check=False)
    assert proc.returncode == UnsupportedError.exit_code
    assert proc.stderr.strip().splitlines() == [
        "erofs-nydus: error: v5.boot: RAFS v5 bootstrap: FUSE-only (nydusd fuse), the kernel "
        "can mount only RAFS v6"]


@pytest.mark.parametrize("compressor", ["zstd", "lz4", "none"])
@pytest.mark.parametrize("digester", ["blake3", "sha256"])
def test_codec_round_trip_and_corruption(compressor: str, digester: str) -> None:
    plain = b"nydus " * 5000 + bytes(range(256))
    packed = compress_chunk(plain, compressor)
    raw = plain if packed is None else packed
    c = ChunkInfo(digest(plain, digester), 0, 0, 0, len(raw), 0, len(plain), packed is not None,
                  compressor, digester)
    assert decode_chunk(raw, c) == plain
    bad = bytearray(raw)
    bad[len(bad) // 2] ^= 0x55
    with pytest.raises(DigestMismatchError):
        decode_chunk(bytes(bad), c)
    wrong = ChunkInfo(bytes(32), 0, 0, 0, len(raw), 0, len(plain), packed is not None,
                      compressor, digester)
    with pytest.raises(DigestMismatchError, match=digester):
        decode_chunk(raw, wrong)


def test_blake3_is_the_nydus_digest() -> None:
    # chunk 0 of the fixture is lib.rs; its blake3 is the digest in the chunk table
    r = BootstrapReader(BOOT.read_bytes())
    c0 = min(r.image.chunks[0], key=lambda c: c.index)
    assert c0.digester == "blake3" and len(c0.digest) == 32


def test_fixture_copy_is_untouched(tmp_path: Path) -> None:
    shutil.copy(BOOT, tmp_path / "b")
    assert hashlib.sha256((DATA / BLOB_ID).read_bytes()).hexdigest().startswith("4b16fb83")


@pytest.mark.kernel
def test_fixture_lazy_fanotify_mount_reads_the_nydus_sources(tmp_path: Path) -> None:
    if not fanotify_usable():
        pytest.skip("needs root and pre-content fanotify (Linux >= 6.14)")
    mp = tmp_path / "mnt"
    mp.mkdir()
    cache = tmp_path / "cache"
    run_cli("mount", str(BOOT), str(mp), "--blob-dir", str(DATA), "--cache-dir", str(cache))
    try:
        assert is_mountpoint(mp)
        assert sorted(p.name for p in mp.iterdir()) == sorted(SOURCE_SHA256)
        for name, want in SOURCE_SHA256.items():
            assert hashlib.sha256((mp / name).read_bytes()).hexdigest() == want
    finally:
        run_cli("umount", str(mp), "--cache-dir", str(cache), check=False)
    assert not is_mountpoint(mp)


def _blob_entry_patched(tmp_path: Path, **fields: int) -> Path:
    from erofs_nydus.layout import build, parse

    data = bytearray(BOOT.read_bytes())
    e = dict(parse(R.BlobEntry, data, BLOB_TABLE))
    e.pop("_io", None)
    e.update(fields)
    data[BLOB_TABLE:BLOB_TABLE + R.BLOB_ENTRY_SIZE] = build(R.BlobEntry, e)
    out = tmp_path / "entry.boot"
    out.write_bytes(bytes(data))
    return out


def test_tar_header_layout_without_toc_is_walked(tmp_path: Path) -> None:
    feats = 0x7000_0021 & ~R.BLOB_FEATURE_HAS_TOC
    boot = _blob_entry_patched(tmp_path, features=feats, blob_toc_size=0)
    report = check_bootstrap(boot.read_bytes(), "no-toc", str(DATA))
    assert report.ok, report.problems
    from erofs_nydus.rafs.backend import LocalDirBackend
    from erofs_nydus.rafs.blobfile import blob_layout

    (b,) = read_image_meta(boot.read_bytes()).blobs
    lay = blob_layout(LocalDirBackend(DATA), b, b.file_size)
    assert set(lay.sections) == {"image.blob", "blob.meta", "blob.digest", "rafs.blob.toc"}
    assert (lay.sections["image.blob"].offset, lay.sections["image.blob"].size) == (0, 7802)


def test_toc_found_by_its_tar_header_when_size_is_unknown(tmp_path: Path) -> None:
    boot = _blob_entry_patched(tmp_path, blob_toc_size=0)
    report = check_bootstrap(boot.read_bytes(), "toc-size-0", str(DATA))
    assert report.ok, report.problems


def test_blob_table_size_rule_per_layout(tmp_path: Path) -> None:
    boot = _blob_entry_patched(tmp_path, compressed_size=12442)  # what our layout would say
    report = check_bootstrap(boot.read_bytes(), "short", str(DATA))
    assert any("file is 14554 bytes, blob table says 12442" in p for p in report.problems)


def test_ci_v2_entry_decoding() -> None:
    # uoff 0x5000 (>>12 = 5), usize 13400 (stored - 1), flags COMPRESSED | HAS_CRC32
    uncomp = 5 | (13399 << 32) | ((R.CI_V2_FLAG_COMPRESSED | R.CI_V2_FLAG_HAS_CRC32) << 56)
    comp = 4828 | (2974 << 40)  # coff, csize (not minus one in V2)
    assert R.decode_ci_v2(uncomp, comp) == (0x5000, 13400, 4828, 2974, 0x11)


def test_ci_v2_blob_entry_size_rule(tmp_path: Path) -> None:
    feats = 0x7000_0021 | R.BLOB_FEATURE_CHUNK_INFO_V2
    ok = _blob_entry_patched(tmp_path, features=feats, ci_uncompressed_size=2 * 24)
    assert not [p for p in BootstrapReader(ok.read_bytes()).problems() if "ci_" in p]
    bad = _blob_entry_patched(tmp_path, features=feats)  # 2 * 16: a V1 table
    with pytest.raises(FormatError, match="ci_uncompressed_size 32 != 2 \\* 24"):
        read_image_meta(bad.read_bytes())


def test_inspect_labels_digests_with_their_digester() -> None:
    out = run_cli("inspect", str(BOOT), "/lib.rs").stdout
    assert "blake3=f7e2735f1c6ae9cd" in out and "sha256=" not in out


# -- must-fail cases of the validate() functions (each a rule nydusd applies) -------------
@pytest.mark.parametrize(("offset", "fmt", "value", "message"), [
    (1024 + 4, "<I", 0x1234, "checksum 0x1234, nydusd requires 0"),
    (1024 + 16, "<Q", 0, "inos is 0"),
    (1024 + 88, "<H", 12, "devt_slotoff 12"),
    (1152 + 24, "<Q", 4096, "chunk table overlaps the blob table"),
    (1152 + 40, "<Q", 16384 + 4096 * 9, "prefetch table"),
    (1408 + 64, "<I", 0, "device slot has 0 blocks"),
    (1408 + 64, "<I", 8, "device slot blocks 8 != uncompressed size / 4096"),
    (BLOB_TABLE + 64, "<I", 1, "blob_index 1 at position 0"),
    (BLOB_TABLE + 80, "<I", 7, "unknown digester id 7"),
    (BLOB_TABLE + 108, "<I", 9, "unknown chunk-info compressor id 9"),
    (BLOB_TABLE + 84, "<I", 0x7000_1021, "unknown incompatible features 0x70001021"),
    (BLOB_TABLE + 84, "<I", 0x7000_0020, "ALIGNED feature missing"),
    (BLOB_TABLE + 120, "<Q", 64, "ci_compressed_size 64 > ci_uncompressed_size 32"),
])
def test_validate_rejects(tmp_path: Path, offset: int, fmt: str, value: int,
                          message: str) -> None:
    boot = _patched(tmp_path, offset, fmt, value)
    if offset == 1152 + 40:  # a prefetch table needs a size to be checked
        data = bytearray(boot.read_bytes())
        struct.pack_into("<I", data, 1152 + 48, 8)
        boot.write_bytes(bytes(data))
    problems = check_bootstrap(boot.read_bytes(), "x").problems
    assert any(message in p for p in problems), problems


def test_validate_superblock_blocks_without_devices() -> None:
    from erofs_nydus.layout import erofs as E
    from erofs_nydus.layout import parse

    sb = parse(E.SuperBlock, BOOT.read_bytes(), E.EROFS_SUPER_OFFSET)
    sb.extra_devices = 0
    assert any("blocks 9 with 0 extra devices" in p for p in E.validate_superblock(sb, 20480, 11))
    for ok in (0, 4096):  # 4096: an old nydus-image bug nydusd tolerates
        sb.blocks = ok
        assert E.validate_superblock(sb, 20480, 11) == []


def test_new_structure_sizes() -> None:
    assert (R.TOC_ENTRY_SIZE, R.CI_ENTRY_V2_SIZE, R.CI_ENTRY_V2_PACK.size) == (128, 24, 24)
    assert R.TocEntry.sizeof() == 128 and R.BlobEntry.sizeof() == 256


def test_tar_header_parser_takes_garbage() -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    @given(st.binary(min_size=512, max_size=512))
    def run(raw: bytes) -> None:
        got = R.tar_header_entry(raw)
        assert got is None or (isinstance(got[0], str) and got[1] >= 0)

    run()
    blob = (DATA / BLOB_ID).read_bytes()
    assert R.tar_header_entry(blob[-512:]) == ("rafs.blob.toc", 512)
    assert R.tar_header_entry(blob[-512:-1] + b"x") is None  # checksum
