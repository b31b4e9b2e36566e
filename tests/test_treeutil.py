"""The tree utilities must not be able to pass silently: every kind of difference is caught."""

from __future__ import annotations

import os
import stat
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import treeutil
from treeutil import Manifest, MiB, Snapshot, compare_trees, snapshot_tar, snapshot_tree

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (devices, owners)")

SMALL_WIDE = 40


@pytest.fixture(scope="module")
def small_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Snapshot:
    m = treeutil.make_synthetic_tree(tmp_path_factory.mktemp("small") / "t", wide_count=SMALL_WIDE)
    return snapshot_tree(m.root)


@pytest.fixture
def small_tree(tmp_path: Path) -> Manifest:
    return treeutil.make_synthetic_tree(tmp_path / "t", wide_count=SMALL_WIDE)


# ------------------------------------------------------------------ the synthetic tree


def test_synthetic_tree_has_every_case(
    synthetic_tree: Manifest, synthetic_snapshot: Snapshot
) -> None:
    m = synthetic_tree
    snap = synthetic_snapshot
    assert snapshot_tree(m.root, content=False, xattrs=False).keys() == snap.keys()
    types = {e.type for e in snap.values()}
    assert types == {"reg", "dir", "lnk", "chr", "blk", "fifo", "sock"}
    # sizes
    for size, rel in m.files_by_size.items():
        assert snap[rel].size == size
    # sparse: really sparse on disk, islands where the manifest says
    st = os.stat(m.path(b"sparse/sparse_20m"))
    assert st.st_size == 20 * MiB and st.st_blocks * 512 < 2 * MiB
    assert treeutil.sparse_extent_count(m.path(b"sparse/sparse_20m")) >= 3
    # deep and wide
    assert m.deep_dir.count(b"/") + 1 >= 60 and snap[m.deep_dir + b"/leaf"].type == "reg"
    assert len(os.listdir(m.path(m.wide_dir))) == m.wide_count == 30000
    # symlinks
    assert snap[b"links/long_target"].target is not None
    assert len(snap[b"links/long_target"].target or b"") == 4095
    for rel, tgt in m.symlinks.items():
        assert snap[rel].target == tgt
    # hard links as partitions of paths
    for group in m.hardlink_groups:
        for p in group:
            assert snap[p].links == tuple(sorted(group)), p
            assert snap[p].nlink == len(group)
    # devices including minor > 255 and a 12-bit major
    for rel, (kind, ma, mi) in m.devices.items():
        assert snap[rel].type == kind and snap[rel].rdev == (ma, mi)
    assert any(mi > 255 for _, _, mi in m.devices.values())
    # owners and modes
    for rel, (u, g) in m.owners.items():
        assert (snap[rel].uid, snap[rel].gid) == (u, g), rel
    assert snap[b"perm/uid_big"].uid > 65535
    for rel, mode in m.modes.items():
        assert snap[rel].mode == mode, rel
    # mtimes with nanoseconds and beyond 2^32 seconds
    assert any(e.mtime_ns % 10**9 for e in snap.values())
    assert max(e.mtime_ns for e in snap.values()) > 2**32 * 10**9
    # xattrs in all namespaces, including empty and ~1000-byte values, and ACLs
    x = snap[b"xattr/user_several"].xattr_dict()
    assert x[b"user.empty"] == b"" and len(x[b"user.long_value"]) == 1000
    assert b"trusted.foo" in snap[b"xattr/trusted"].xattr_dict()
    assert b"security.capability" in snap[b"xattr/security_cap"].xattr_dict()
    assert b"system.posix_acl_default" in snap[b"acl/dir"].xattr_dict()
    assert b"system.posix_acl_access" in snap[b"acl/file"].xattr_dict()
    assert snap[b"links/absolute"].xattr_dict() == {b"trusted.on_symlink": b"1"}
    # names
    assert all(len(rel.rsplit(b"/", 1)[-1]) == 255 for rel in m.long_names)
    for rel in m.non_utf8_names:
        assert rel in snap
        with pytest.raises(UnicodeDecodeError):
            rel.decode("utf-8")
    assert b"names/-x" in snap and b"names/~" in snap and b"names/new\nline" in snap
    # dedup groups really are identical
    for group in m.dedup_groups:
        assert len({snap[p].digest for p in group}) == 1


def test_synthetic_tree_is_deterministic(small_snapshot: Snapshot, small_tree: Manifest) -> None:
    assert compare_trees(small_snapshot, snapshot_tree(small_tree.root)) == []


# ------------------------------------------------------------------ digests


def test_digest_sparse_equals_dense(tmp_path: Path, synthetic_tree: Manifest) -> None:
    src = synthetic_tree.path(b"sparse/sparse_20m")
    data = Path(os.fsdecode(src)).read_bytes()
    dense = tmp_path / "dense"
    dense.write_bytes(data)  # fully allocated zeros
    d = treeutil.file_digest(src)
    assert d == treeutil.file_digest(dense) == treeutil.bytes_digest(data)
    with open(dense, "rb") as f:
        assert treeutil.stream_digest(f) == d
    # a different zero tail length is a different file
    assert treeutil.bytes_digest(data + b"\0") != d
    # a byte inside a hole is noticed
    with open(dense, "r+b") as f:
        f.seek(15 * MiB + 3)
        f.write(b"\1")
    assert treeutil.file_digest(dense) != d


def test_digest_unaligned_islands(tmp_path: Path) -> None:
    p = tmp_path / "f"
    with open(p, "wb") as f:
        f.truncate(3 * MiB + 5)
        for off in (4095, 65535, 2 * MiB + 70000, 3 * MiB + 4):
            f.seek(off)
            f.write(b"\xaa\xbb")
    data = p.read_bytes()
    assert treeutil.file_digest(p) == treeutil.bytes_digest(data)


# ------------------------------------------------------------------ compare catches everything


def _wr(path: bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _flip_middle(m: Manifest) -> None:
    p = m.path(b"sizes/random_3m")
    with open(p, "r+b") as f:
        f.seek(MiB + 12345)
        b = f.read(1)
        f.seek(MiB + 12345)
        f.write(bytes([b[0] ^ 1]))
    # restore the mtime so only the content differs
    ns = m.mtimes[b"sizes/random_3m"]
    os.utime(p, ns=(ns, ns))


def _keep_mtime(m: Manifest, rel: bytes, fn: Callable[[], None]) -> None:
    fn()
    ns = m.mtimes[rel]
    os.utime(m.path(rel), ns=(ns, ns), follow_symlinks=False)


def _fill_hole(m: Manifest) -> None:
    def go() -> None:
        fd = os.open(m.path(b"sparse/sparse_20m"), os.O_WRONLY)
        os.pwrite(fd, b"x", 15 * MiB)
        os.close(fd)

    _keep_mtime(m, b"sparse/sparse_20m", go)


def _retarget(m: Manifest) -> None:
    p = m.path(b"links/dangling")
    ns = m.mtimes[b"links/dangling"]
    os.unlink(p)
    os.symlink(b"does/not/exist2", p)
    os.utime(p, ns=(ns, ns), follow_symlinks=False)
    os.utime(m.path(b"links"), ns=(m.mtimes[b"links"],) * 2)


def _break_link(m: Manifest) -> None:
    # replace one name of a 3-group by an identical copy with identical metadata
    p = m.path(b"hard/other/h3_b")
    data = Path(os.fsdecode(p)).read_bytes()
    st = os.lstat(p)
    os.unlink(p)
    _wr(p, data)
    os.chmod(p, stat.S_IMODE(st.st_mode))
    os.utime(p, ns=(st.st_mtime_ns, st.st_mtime_ns))
    os.utime(m.path(b"hard/other"), ns=(m.mtimes[b"hard/other"],) * 2)


def _relink(m: Manifest) -> None:
    # same number of groups and sizes, different partition: swap which files are linked
    a, b = m.path(b"hard/h2_b"), m.path(b"hard/empty_h2_a")
    # make h2_b a separate copy and link empty_h2_a's partner to h2_a instead
    st = os.lstat(a)
    os.unlink(a)
    _wr(a, b"two names\n")
    os.chmod(a, stat.S_IMODE(st.st_mode))
    os.utime(a, ns=(st.st_mtime_ns,) * 2)
    del b
    os.utime(m.path(b"hard"), ns=(m.mtimes[b"hard"],) * 2)


def _change_rdev(m: Manifest) -> None:
    os.unlink(m.path(b"dev/sda"))
    os.mknod(m.path(b"dev/sda"), stat.S_IFBLK | 0o660, os.makedev(8, 1))


def _fifo_to_file(m: Manifest) -> None:
    os.unlink(m.path(b"dev/fifo"))
    _wr(m.path(b"dev/fifo"), b"")


MUTATIONS: dict[str, tuple[Callable[[Manifest], None], bytes, str]] = {
    "content": (_flip_middle, b"sizes/random_3m", "content digest"),
    "content_in_hole": (_fill_hole, b"sparse/sparse_20m", "content digest"),
    "size": (
        lambda m: _keep_mtime(m, b"sizes/f4096", lambda: os.truncate(m.path(b"sizes/f4096"), 4097)),
        b"sizes/f4096",
        "size",
    ),
    "mode": (lambda m: os.chmod(m.path(b"perm/setuid"), 0o755), b"perm/setuid", "mode"),
    "uid": (lambda m: os.chown(m.path(b"perm/uid65536"), 65537, -1), b"perm/uid65536", "uid"),
    "gid": (lambda m: os.chown(m.path(b"perm/uid65536"), -1, 1), b"perm/uid65536", "gid"),
    "mtime_nsec": (
        lambda m: os.utime(m.path(b"text/aaaa.txt"), ns=(m.mtimes[b"text/aaaa.txt"] + 1,) * 2),
        b"text/aaaa.txt",
        "mtime",
    ),
    "xattr_value": (
        lambda m: os.setxattr(m.path(b"xattr/user_several"), "user.a", b"2"),
        b"xattr/user_several",
        "xattrs differ",
    ),
    "xattr_removed": (
        lambda m: os.removexattr(m.path(b"xattr/user_several"), "user.empty"),
        b"xattr/user_several",
        "only in a",
    ),
    "xattr_added": (
        lambda m: os.setxattr(m.path(b"sizes/f1"), "trusted.new", b""),
        b"sizes/f1",
        "only in b",
    ),
    "security_xattr": (
        lambda m: os.removexattr(m.path(b"xattr/security_cap"), "security.capability"),
        b"xattr/security_cap",
        "security.capability",
    ),
    "acl": (
        lambda m: os.removexattr(m.path(b"acl/dir"), "system.posix_acl_default"),
        b"acl/dir",
        "posix_acl_default",
    ),
    "symlink_target": (_retarget, b"links/dangling", "symlink target"),
    "hardlink_broken": (_break_link, b"hard/h3_a", "hard-link group"),
    "hardlink_partition": (_relink, b"hard/h2_a", "hard-link group"),
    "missing": (lambda m: os.unlink(m.path(b"dev/fifo")), b"dev/fifo", "missing in b"),
    "extra": (lambda m: _wr(m.path(b"wide/zzz_new"), b""), b"wide/zzz_new", "extra in b"),
    "rdev": (_change_rdev, b"dev/sda", "rdev"),
    "type": (_fifo_to_file, b"dev/fifo", "type"),
    "non_utf8_name_content": (
        lambda m: _keep_mtime(
            m, b"names/bad\xff\xfename", lambda: _wr(m.path(b"names/bad\xff\xfename"), b"X")
        ),
        b"names/bad\xff\xfename",
        "content digest",
    ),
}


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
def test_compare_catches(kind: str, small_snapshot: Snapshot, small_tree: Manifest) -> None:
    mutate, rel, keyword = MUTATIONS[kind]
    assert compare_trees(small_snapshot, snapshot_tree(small_tree.root)) == []
    mutate(small_tree)
    diffs = compare_trees(small_snapshot, snapshot_tree(small_tree.root))
    assert diffs, f"mutation {kind} not detected"
    name = treeutil._fmt_path(rel)
    assert any(name in d and keyword in d for d in diffs), diffs


def test_ignore_keys(small_snapshot: Snapshot, small_tree: Manifest) -> None:
    os.chmod(small_tree.path(b"perm/setuid"), 0o700)
    os.utime(small_tree.path(b"text/aaaa.txt"), ns=(5, 5))
    os.setxattr(small_tree.path(b"sizes/f1"), "trusted.new", b"")
    b = snapshot_tree(small_tree.root)
    assert len(compare_trees(small_snapshot, b)) == 3
    assert compare_trees(small_snapshot, b, ignore={"mode", "mtime", "xattrs"}) == []
    assert len(compare_trees(small_snapshot, b, ignore={"mode", "mtime", "xattr:trusted."})) == 0
    assert len(compare_trees(small_snapshot, b, ignore={"mode", "mtime", "xattr:user."})) == 1
    assert compare_trees(small_snapshot, b, ignore_paths=[b"perm", b"text", b"sizes/f1"]) == []
    with pytest.raises(ValueError):
        compare_trees(small_snapshot, b, ignore={"no-such-key"})
    assert compare_trees(small_snapshot, b, limit=1)[-1].startswith("... and 2 more")


# ------------------------------------------------------------------ tar


def test_tar_pax_round_trip(
    synthetic_tree: Manifest, synthetic_snapshot: Snapshot, synthetic_tar: Path
) -> None:
    src = synthetic_snapshot
    assert compare_trees(src, snapshot_tar(synthetic_tar), ignore={"sockets"}) == []


def test_targz_round_trip(
    synthetic_tree: Manifest, synthetic_snapshot: Snapshot, synthetic_targz: Path
) -> None:
    src = synthetic_snapshot
    with open(synthetic_targz, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"
    assert compare_trees(src, snapshot_tar(synthetic_targz), ignore={"sockets"}) == []


def test_gnu_tar_round_trip(
    synthetic_tree: Manifest, synthetic_snapshot: Snapshot, synthetic_gnu_tar: Path
) -> None:
    src = synthetic_snapshot
    with tarfile.open(synthetic_gnu_tar) as tf:
        names = [ti.name for ti in tf]
        assert not any(ti.pax_headers for ti in tf)
    assert max(len(n.encode("utf-8", "surrogateescape")) for n in names) > 255
    got = snapshot_tar(synthetic_gnu_tar)
    assert compare_trees(src, got, ignore={"sockets", "xattrs", "mtime_nsec"}) == []


def test_tar_is_deterministic(
    synthetic_tree: Manifest, synthetic_targz: Path, synthetic_tar: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again.tar"
    treeutil.write_tar(synthetic_tree.root, again)
    assert again.read_bytes() == synthetic_tar.read_bytes()
    gz = tmp_path / "again.tgz"
    treeutil.write_tar(synthetic_tree.root, gz, gzip=True)
    assert gz.read_bytes() == synthetic_targz.read_bytes()


def test_tar_member_details(synthetic_tar: Path) -> None:
    with tarfile.open(synthetic_tar, encoding="utf-8", errors="surrogateescape") as tf:
        members = {treeutil._tar_name(ti.name): ti for ti in tf}
    assert members[b"."].isdir()
    cap = members[b"xattr/security_cap"].pax_headers["SCHILY.xattr.security.capability"]
    assert cap.encode("utf-8", "surrogateescape")[:4] == b"\x01\x00\x00\x02"
    assert members[b"xattr/user_several"].pax_headers["SCHILY.xattr.user.empty"] == ""
    assert members[b"perm/mode0400"].pax_headers["mtime"] == "4294979641.999999999"
    links = [p for p, ti in members.items() if ti.islnk()]
    assert b"hard/other/h3_b" in links and b"hard/sym_h_b" in links
    assert members[b"dev/c_big"].devminor == 1048575
    assert b"dev/socket" not in members
    assert members[b"names/bad\xff\xfename"].isreg()


def test_tar_python_extractall(
    synthetic_tree: Manifest, synthetic_snapshot: Snapshot, synthetic_tar: Path, tmp_path: Path
) -> None:
    """Python's own extraction reproduces what it can: no xattrs, float mtimes (so
    x.999999999 s rounds up), symlink mtimes unset, and a hard link to a symlink gets
    resolved to the symlink's target."""
    dest = tmp_path / "x"
    with tarfile.open(synthetic_tar, encoding="utf-8", errors="surrogateescape") as tf:
        tf.extractall(dest, filter="fully_trusted", numeric_owner=True)
    diffs = compare_trees(
        synthetic_snapshot,
        snapshot_tree(dest),
        ignore={"sockets", "xattrs", "mtime_nsec", "lnk_mtime"},
        ignore_paths=[
            b"hard/h2_a",
            b"hard/h2_b",
            b"hard/sym_h_a",
            b"hard/sym_h_b",
            b"perm/mode0400",
        ],
    )
    assert diffs == []


def test_tar_reference_extract(
    synthetic_tree: Manifest, synthetic_snapshot: Snapshot, synthetic_tar: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "x"
    treeutil.extract_tar(synthetic_tar, dest)
    diffs = compare_trees(synthetic_snapshot, snapshot_tree(dest), ignore={"sockets"})
    assert diffs == []
    # sparse stays sparse
    assert os.stat(dest / "sparse" / "sparse_20m").st_blocks * 512 < 2 * MiB


@pytest.mark.slow
def test_big_sparse_file_hashes_fast(synthetic_tree_big: Manifest) -> None:
    m = synthetic_tree_big
    assert m.big_sparse is not None
    p = m.path(m.big_sparse)
    size = os.stat(p).st_size
    assert size > 4 * 1024**3
    t0 = time.monotonic()
    d = treeutil.file_digest(p)
    assert time.monotonic() - t0 < 20
    # the same digest built by hand from the islands: only blocks holding data count
    h = treeutil.ContentHasher()
    fd = os.open(p, os.O_RDONLY)
    try:
        blocks = sorted(
            {
                b
                for off, n in m.sparse_files[m.big_sparse]
                for b in range(
                    off // treeutil.HASH_BLOCK * treeutil.HASH_BLOCK, off + n, treeutil.HASH_BLOCK
                )
            }
        )
        for b in blocks:
            h.block(b, os.pread(fd, treeutil.HASH_BLOCK, b))
    finally:
        os.close(fd)
    assert h.hexdigest(size) == d
