"""Tree fixtures (synthetic tree, tars of it, debootstrap rootfs); helpers live in treeutil.

Fixtures (all session scoped, built once per test session):

* ``synthetic_tree`` -> :class:`treeutil.Manifest` (``.root`` is the directory) built by
  :func:`treeutil.make_synthetic_tree` in a pytest tmp dir (/tmp: ext4 with user.,
  trusted., security. xattrs and ACLs).  Needs root.  Treat it as read-only.
* ``synthetic_snapshot`` -> ``treeutil.snapshot_tree`` of it, taken once.
* ``synthetic_tree_big`` -> the same with a 5 GiB sparse file (mark tests ``slow``).
* ``synthetic_tar`` / ``synthetic_targz`` / ``synthetic_gnu_tar`` -> Path of a
  deterministic tar of ``synthetic_tree`` (PAX with xattrs / gzip'd PAX / GNU format).
  The socket is left out (tar cannot carry it): compare with ``ignore={"sockets"}``.
* ``debootstrap_rootfs`` -> Path of a cached ``debootstrap --variant=minbase bookworm``
  tree at ``$EROFS_NYDUS_CACHE/rootfs/bookworm-minbase`` (default base
  /var/cache/erofs_nydus), built with tools/debootstrap-rootfs when absent (~40 s).
  Treat it as read-only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import treeutil

REPO = Path(__file__).resolve().parent.parent
DEBOOTSTRAP_SCRIPT = REPO / "tools" / "debootstrap-rootfs"


def cache_base() -> Path:
    return Path(os.environ.get("EROFS_NYDUS_CACHE", "/var/cache/erofs_nydus"))


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root")


def _check_xattr_support(d: Path) -> None:
    probe = d / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        for name in ("user.probe", "trusted.probe", "security.probe"):
            try:
                os.setxattr(probe, name, b"1")
            except OSError as e:
                pytest.skip(f"{d} does not support {name.split('.')[0]}. xattrs: {e}")
    finally:
        probe.unlink()


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory: pytest.TempPathFactory) -> treeutil.Manifest:
    _need_root("the synthetic tree (devices, owners, trusted. xattrs)")
    base = tmp_path_factory.mktemp("synthetic")
    _check_xattr_support(base)
    return treeutil.make_synthetic_tree(base / "tree")


@pytest.fixture(scope="session")
def synthetic_snapshot(synthetic_tree: treeutil.Manifest) -> treeutil.Snapshot:
    """``snapshot_tree(synthetic_tree.root)``, taken once (do not mutate it)."""
    return treeutil.snapshot_tree(synthetic_tree.root)


@pytest.fixture(scope="session")
def synthetic_tree_big(tmp_path_factory: pytest.TempPathFactory) -> treeutil.Manifest:
    _need_root("the synthetic tree (devices, owners, trusted. xattrs)")
    base = tmp_path_factory.mktemp("synthetic_big")
    _check_xattr_support(base)
    return treeutil.make_synthetic_tree(base / "tree", big=True)


@pytest.fixture(scope="session")
def synthetic_tar(
    synthetic_tree: treeutil.Manifest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("synthetic_tar") / "tree.tar"
    treeutil.write_tar(synthetic_tree.root, out)
    return out


@pytest.fixture(scope="session")
def synthetic_targz(
    synthetic_tree: treeutil.Manifest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("synthetic_targz") / "tree.tar.gz"
    treeutil.write_tar(synthetic_tree.root, out, gzip=True)
    return out


@pytest.fixture(scope="session")
def synthetic_gnu_tar(
    synthetic_tree: treeutil.Manifest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("synthetic_gnu_tar") / "tree-gnu.tar"
    treeutil.write_gnu_tar(synthetic_tree.root, out)
    return out


def ensure_debootstrap_rootfs(suite: str = "bookworm", variant: str = "minbase",
                              include: str = "") -> Path:
    """Path of the cached rootfs, building it with tools/debootstrap-rootfs if absent."""
    dest = cache_base() / "rootfs" / f"{suite}-{variant}"
    if include:
        dest = dest.with_name(dest.name + "+" + include.replace(",", "+"))
    if dest.is_dir():
        return dest
    proc = subprocess.run(
        [str(DEBOOTSTRAP_SCRIPT), suite, variant, *([include] if include else [])],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "EROFS_NYDUS_CACHE": str(cache_base())},
    )
    if proc.returncode != 0 or not dest.is_dir():
        raise RuntimeError(
            f"tools/debootstrap-rootfs failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    return dest


@pytest.fixture(scope="session")
def debootstrap_rootfs() -> Iterator[Path]:
    _need_root("debootstrap")
    yield ensure_debootstrap_rootfs()


# Packages the second debootstrap tree adds: a real "install packages" layer.
EXTRA_PACKAGES = "less,procps,psmisc"


@pytest.fixture(scope="session")
def debootstrap_rootfs_extra() -> Iterator[Path]:
    _need_root("debootstrap")
    yield ensure_debootstrap_rootfs(include=EXTRA_PACKAGES)
