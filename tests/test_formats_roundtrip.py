"""Images we write with each compressor / digester: check -D, inspect, a lazy fanotify
mount that reads back the source, corruption of zstd data and of blake3 digests, and
layers without file data (nydusd's superblock rules)."""

from __future__ import annotations

import errno
import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import treeutil
from daemon_support import BuiltImage, build_image, fanotify_usable, run_cli

from erofs_nydus.layout import erofs as E
from erofs_nydus.layout import parse
from erofs_nydus.mount import is_mountpoint, mounted
from erofs_nydus.rafs.check import check_bootstrap
from erofs_nydus.rafs.reader import BootstrapReader, read_image_meta

# The builder gives hard-linked symlinks/fifos distinct inodes (as Nydus does).
BUILDER_DIFFS = (b"hard/fifo_h_a", b"hard/other/fifo_h_b", b"hard/sym_h_a", b"hard/sym_h_b")
COMBOS = [("zstd", "blake3"), ("lz4", "sha256"), ("none", "blake3")]

needs_fanotify = pytest.mark.skipif(not fanotify_usable(),
                                    reason="needs root and pre-content fanotify (Linux >= 6.14)")


class _Mount:
    def __init__(self, img: BuiltImage, base: Path, *extra: str) -> None:
        self.mp = base / "mnt"
        self.cache = base / "cache"
        self.mp.mkdir(parents=True)
        run_cli("mount", str(img.bootstrap), str(self.mp), "--blob-dir", str(img.blob_dir),
                "--cache-dir", str(self.cache), *extra)
        assert is_mountpoint(self.mp)

    def close(self) -> None:
        run_cli("umount", str(self.mp), "--cache-dir", str(self.cache), check=False)
        assert not is_mountpoint(self.mp)


@pytest.fixture
def lazy_mount() -> Iterator[list[_Mount]]:
    made: list[_Mount] = []
    try:
        yield made
    finally:
        for m in made:
            m.close()


@pytest.mark.parametrize(("compressor", "digester"), COMBOS)
def test_build_check_inspect(synthetic_tree: treeutil.Manifest, tmp_path: Path,
                             compressor: str, digester: str) -> None:
    img = build_image(synthetic_tree.root, tmp_path, "--compressor", compressor,
                      "--digester", digester)
    report = check_bootstrap(img.bootstrap.read_bytes(), "img", str(img.blob_dir))
    assert report.ok, report.problems
    info = json.loads(run_cli("inspect", "--json", str(img.bootstrap)).stdout)
    (b,) = info["image"]["blobs"]
    assert (b["compressor"], b["digester"]) == (compressor, digester)
    assert b["blob_file_size"] == img.blobs[0].stat().st_size
    stat = json.loads(run_cli("stat", "--json", str(img.bootstrap)).stdout)
    (sb,) = stat["images"][0]["blobs"]
    assert (sb["compressor"], sb["digester"]) == (compressor, digester)


def test_default_is_zstd_blake3_everywhere(synthetic_tree: treeutil.Manifest,
                                           tmp_path: Path) -> None:
    """The default chosen by bench/compressor.py (README, Measured): what `create` writes
    without options, what `create`/`convert --help` say, and the library defaults."""
    from erofs_nydus.builder import BuildOptions
    from erofs_nydus.registry.convert import ConvertOptions

    img = build_image(synthetic_tree.root, tmp_path)
    (b,) = json.loads(run_cli("inspect", "--json", str(img.bootstrap)).stdout)["image"]["blobs"]
    assert (b["compressor"], b["digester"]) == ("zstd", "blake3")
    assert check_bootstrap(img.bootstrap.read_bytes(), "img", str(img.blob_dir)).ok
    for cmd in ("create", "convert"):
        text = " ".join(run_cli(cmd, "--help").stdout.split())
        assert "[default: zstd]" in text and "[default: blake3]" in text, (cmd, text)
    for opts in (BuildOptions(), ConvertOptions()):
        assert (opts.compressor, opts.digester) == ("zstd", "blake3")


def test_chunk_dict_of_the_old_default_names_the_flag(synthetic_tree: treeutil.Manifest,
                                                      tmp_path: Path) -> None:
    """A chunk dict built with the former default (lz4 + sha256): one line saying which
    flag reuses it, no traceback."""
    old = build_image(synthetic_tree.root, tmp_path / "old", "--compressor", "lz4",
                      "--digester", "sha256")
    args = ("create", str(synthetic_tree.root), "-B", str(tmp_path / "new.boot"),
            "-D", str(tmp_path / "new"), "--chunk-dict", str(old.bootstrap))
    proc = run_cli(*args, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "uses compressor lz4" in line and "pass --compressor lz4" in line
    proc = run_cli(*args, "--compressor", "lz4", check=False)
    (line,) = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "pass --digester sha256" in line
    run_cli(*args, "--compressor", "lz4", "--digester", "sha256")


@pytest.mark.kernel
@needs_fanotify
@pytest.mark.parametrize(("compressor", "digester"), COMBOS)
def test_lazy_mount_round_trip(synthetic_tree: treeutil.Manifest, tmp_path: Path,
                               lazy_mount: list[_Mount], compressor: str, digester: str) -> None:
    img = build_image(synthetic_tree.root, tmp_path / "img", "--compressor", compressor,
                      "--digester", digester)
    m = _Mount(img, tmp_path)
    lazy_mount.append(m)
    diffs = treeutil.compare_trees(synthetic_tree.root, m.mp, ignore_paths=BUILDER_DIFFS,
                                   limit=20)
    assert diffs == []


def _small_image(tmp_path: Path, *extra: str) -> tuple[Path, BuiltImage]:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(12)
    for i in range(24):  # compressible text-like data, several chunks per file
        words = [rng.choice([b"erofs", b"nydus", b"chunk", b"zstd", b"blake3"])
                 for _ in range(rng.randrange(100, 40_000))]
        (src / f"f{i:02d}").write_bytes(b" ".join(words))
    return src, build_image(src, tmp_path / "img", "--chunk-size", "0x10000", *extra)


def _read_all(src: Path, mp: Path) -> tuple[int, int]:
    bad = good = 0
    for f in sorted(src.iterdir()):
        try:
            got = (mp / f.name).read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO
            bad += 1
            continue
        assert got == f.read_bytes(), f"{f.name}: wrong bytes"
        good += 1
    return bad, good


@pytest.mark.kernel
@needs_fanotify
def test_corrupt_zstd_chunk_read_errors_never_wrong_bytes(tmp_path: Path,
                                                          lazy_mount: list[_Mount]) -> None:
    src, img = _small_image(tmp_path, "--compressor", "zstd", "--digester", "blake3")
    (blob,) = img.blobs
    r = BootstrapReader(img.bootstrap.read_bytes())
    data = bytearray(blob.read_bytes())
    for c in r.image.chunks[0][::5]:  # flip a byte inside every 5th zstd frame
        assert c.compressed
        data[c.compressed_offset + c.compressed_size // 2] ^= 0x5A
    blob.write_bytes(bytes(data))
    m = _Mount(img, tmp_path, "--amplify", "0")
    lazy_mount.append(m)
    bad, good = _read_all(src, m.mp)
    assert bad > 0 and good > 0


@pytest.mark.kernel
@needs_fanotify
def test_wrong_blake3_digest_read_errors_never_wrong_bytes(tmp_path: Path,
                                                           lazy_mount: list[_Mount]) -> None:
    src, img = _small_image(tmp_path, "--compressor", "zstd", "--digester", "blake3")
    boot = bytearray(img.bootstrap.read_bytes())
    r = BootstrapReader(bytes(boot))
    table = r.ext.s_chunk_table_offset
    for i in range(0, r.ext.s_chunk_table_size // 80, 7):  # last digest byte of every 7th
        boot[table + 80 * i + 31] ^= 0x01
    img.bootstrap.write_bytes(bytes(boot))
    m = _Mount(img, tmp_path, "--amplify", "0")
    lazy_mount.append(m)
    bad, good = _read_all(src, m.mp)
    assert bad > 0 and good > 0


@pytest.mark.parametrize(("compressor", "digester"), COMBOS)
def test_layer_without_file_data_passes_nydusd_superblock_rules(
        tmp_path: Path, compressor: str, digester: str) -> None:
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "d" / "empty").write_bytes(b"")
    (src / ".wh.gone").write_bytes(b"")
    img = build_image(src, tmp_path / "img", "--compressor", compressor, "--digester", digester)
    data = img.bootstrap.read_bytes()
    sb = parse(E.SuperBlock, data, E.EROFS_SUPER_OFFSET)
    assert (sb.extra_devices, sb.blocks) == (0, 0)
    read_image_meta(data)  # strict: includes nydusd's "invalid extra device count"
    assert E.validate_superblock(sb, len(data), 11) == []


@pytest.mark.kernel
def test_layer_without_file_data_mounts(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "empty").write_bytes(b"")
    img = build_image(src, tmp_path / "img")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(img.bootstrap, mnt) as root:
        assert (root / "d" / "empty").read_bytes() == b""


def test_prefetch_directory_entry_expands_recursively(synthetic_tree: treeutil.Manifest,
                                                      tmp_path: Path) -> None:
    from erofs_nydus.builder.bootstrap import write_bootstrap
    from erofs_nydus.daemon.prefetch import prefetch_chunks

    img = build_image(synthetic_tree.root, tmp_path / "img", "--chunk-size", "0x10000")
    r = BootstrapReader(img.bootstrap.read_bytes())
    root = r.tree()
    sub = next(n for p, n in root.walk() if p == b"/sizes")
    all_chunks = [c for lst in r.image.chunks for c in lst]
    for prefetch, paths in (([root], None), ([sub], b"/sizes/")):
        plan = write_bootstrap(root, r.image.blobs, all_chunks, chunk_size=r.image.chunk_size,
                               compressor="lz4", prefetch=prefetch)
        got = prefetch_chunks(plan.data)
        want = {(c.blob_index, c.uncompressed_offset) for p, n in root.walk()
                if n.inode.is_reg and (paths is None or p.startswith(paths))
                for c in n.inode.chunks}
        assert want and {(c.blob_index, c.uncompressed_offset) for c in got} == want
        assert len(got) == len(want)


@pytest.mark.slow
@pytest.mark.kernel
@needs_fanotify
def test_debootstrap_zstd_blake3_lazy_chroot_and_full_compare(
        debootstrap_rootfs: Path, tmp_path: Path, lazy_mount: list[_Mount]) -> None:
    import subprocess

    img = build_image(debootstrap_rootfs, tmp_path / "img", "--compressor", "zstd",
                      "--digester", "blake3")
    m = _Mount(img, tmp_path)
    lazy_mount.append(m)
    dpkg = subprocess.run(["chroot", str(m.mp), "dpkg", "-l"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert dpkg.returncode == 0 and "ii  dpkg " in dpkg.stdout
    diffs = treeutil.compare_trees(debootstrap_rootfs, m.mp, limit=20)
    assert diffs == []
