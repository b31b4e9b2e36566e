"""Build images and mount them with the host kernel (file-backed EROFS): every file must
come back identical (content, type, mode, owner, mtime, xattrs, symlinks, rdev, hard links).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import treeutil

from erofs_nydus.builder import BuildOptions, create_image
from erofs_nydus.mount import mounted
from erofs_nydus.rafs.check import check_bootstrap
from erofs_nydus.rafs.reader import read_bootstrap_file

pytestmark = pytest.mark.kernel


def build_and_mount(source: str, out: Path, **opts: object) -> Iterator[Path]:
    boot = out / "image.boot"
    cache = out / "cache"
    res = create_image(
        source, str(boot), str(out / "blobs"), BuildOptions(blob_cache_dir=str(cache), **opts)
    )  # type: ignore[arg-type]
    report = check_bootstrap(boot.read_bytes(), "image", str(out / "blobs"))
    assert report.ok, report.problems
    devices = [cache / f"{b.blob_id}.blob.data" for b in res.blobs]
    mnt = out / "mnt"
    mnt.mkdir()
    with mounted(boot, mnt, devices) as root:
        yield root


def _roundtrip(
    source: str, expected: Path, out: Path, ignore: frozenset[str] = frozenset(), **opts: object
) -> None:
    for root in build_and_mount(source, out, **opts):
        diffs = treeutil.compare_trees(expected, root, ignore=ignore, limit=30)
        assert diffs == [], "\n".join(diffs)


def test_synthetic_tree_dir(synthetic_tree: treeutil.Manifest, tmp_path: Path) -> None:
    _roundtrip(str(synthetic_tree.root), synthetic_tree.root, tmp_path)


def test_synthetic_tree_no_compression_small_chunks(
    synthetic_tree: treeutil.Manifest, tmp_path: Path
) -> None:
    _roundtrip(
        str(synthetic_tree.root),
        synthetic_tree.root,
        tmp_path,
        compressor="none",
        chunk_size=0x1000,
    )


@pytest.mark.parametrize("fixture", ["synthetic_tar", "synthetic_targz", "synthetic_gnu_tar"])
def test_synthetic_tree_tar(
    fixture: str, synthetic_tree: treeutil.Manifest, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    tar = request.getfixturevalue(fixture)
    # tar cannot carry sockets; the GNU format has no sub-second mtimes and no xattrs
    ignore = {"sockets"} | ({"mtime_nsec", "xattr:"} if fixture == "synthetic_gnu_tar" else set())
    _roundtrip(str(tar), synthetic_tree.root, tmp_path, ignore=frozenset(ignore))


def test_synthetic_tree_stdin(
    synthetic_targz: Path, synthetic_tree: treeutil.Manifest, tmp_path: Path
) -> None:
    boot = tmp_path / "b"
    with open(synthetic_targz, "rb") as f:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "erofs_nydus.cli",
                "create",
                "-",
                "-B",
                str(boot),
                "-D",
                str(tmp_path / "blobs"),
                "--blob-cache-dir",
                str(tmp_path / "cache"),
            ],
            stdin=f,
            capture_output=True,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr
    img = read_bootstrap_file(str(boot))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted(
        boot, mnt, [tmp_path / "cache" / f"{b.blob_id}.blob.data" for b in img.blobs]
    ) as root:
        diffs = treeutil.compare_trees(synthetic_tree.root, root, ignore={"sockets"}, limit=30)
        assert diffs == [], "\n".join(diffs)


@pytest.mark.slow
def test_huge_sparse_file(synthetic_tree_big: treeutil.Manifest, tmp_path: Path) -> None:
    assert synthetic_tree_big.big_sparse is not None
    _roundtrip(str(synthetic_tree_big.root), synthetic_tree_big.root, tmp_path)


def test_deterministic_synthetic(synthetic_tree: treeutil.Manifest, tmp_path: Path) -> None:
    digests = []
    for i in range(2):
        out = tmp_path / str(i)
        res = create_image(str(synthetic_tree.root), str(out / "b"), str(out / "blobs"))
        h = hashlib.sha256((out / "b").read_bytes())
        for b in res.blobs:
            h.update((out / "blobs" / b.blob_id).read_bytes())
        digests.append(h.hexdigest())
    assert digests[0] == digests[1]


def test_bootstrap_size_per_inode(synthetic_tree: treeutil.Manifest, tmp_path: Path) -> None:
    res = create_image(str(synthetic_tree.root), str(tmp_path / "b"), str(tmp_path / "blobs"))
    # chunk table and dir blocks included; the wide and deep dirs dominate
    assert res.bootstrap_size / res.inodes < 200, (res.bootstrap_size, res.inodes)


@pytest.mark.slow
def test_debootstrap_rootfs_dir(debootstrap_rootfs: Path, tmp_path: Path) -> None:
    _roundtrip(str(debootstrap_rootfs), debootstrap_rootfs, tmp_path)


@pytest.mark.slow
def test_debootstrap_rootfs_targz(debootstrap_rootfs: Path, tmp_path: Path) -> None:
    tar = tmp_path / "rootfs.tar.gz"
    treeutil.write_tar(debootstrap_rootfs, tar, gzip=True)
    _roundtrip(str(tar), debootstrap_rootfs, tmp_path / "o", ignore=frozenset({"sockets"}))
    assert os.path.getsize(tar) > 1 << 20
