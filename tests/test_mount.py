"""erofs_nydus.mount against the real kernel, with images made by mkfs.erofs (erofs-utils 1.5).

What mkfs.erofs 1.5 preserves (verified here): type, mode, uid, gid, mtime with
nanoseconds, size, content, rdev, symlink targets, all xattr namespaces incl. POSIX
ACLs and security.capability, hard links.  It cannot take 255-byte names ("Could not
format the device: No such file or directory"), so those are excluded from the image.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import treeutil
from treeutil import Manifest, Snapshot, compare_trees, snapshot_tree

from erofs_nydus import mount
from erofs_nydus.errors import KernelError, UsageError

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root"),
    pytest.mark.skipif(
        not mount.kernel_supports_erofs_file_backed(), reason="no file-backed EROFS in this kernel"
    ),
]

CHUNK = 1024 * 1024


def _mkfs_erofs() -> str:
    exe = shutil.which("mkfs.erofs")
    if exe is None:
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "erofs-utils"],
            check=False,
            capture_output=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        exe = shutil.which("mkfs.erofs")
    if exe is None:
        pytest.skip("mkfs.erofs (erofs-utils) not available")
    return exe


@dataclasses.dataclass
class MkfsImage:
    image: Path
    blob: Path | None
    excluded: list[bytes]


def mkfs_image(
    src: Path, out: Path, *, chunked: bool = True, exclude: list[bytes] | None = None
) -> MkfsImage:
    out.mkdir(parents=True, exist_ok=True)
    img, blob = out / "img.erofs", out / "blob.bin"
    cmd: list[str | bytes] = [_mkfs_erofs(), "--quiet"]
    if chunked:
        cmd += [f"--chunksize={CHUNK}", f"--blobdev={blob}"]
    for rel in exclude or []:
        cmd.append(b"--exclude-path=" + rel)
    cmd += [str(img), str(src)]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return MkfsImage(img, blob if chunked else None, list(exclude or []))


def _drop(snap: Snapshot, excluded: list[bytes]) -> Snapshot:
    """The source snapshot as mkfs saw it with ``excluded`` paths left out."""
    out = {
        p: e for p, e in snap.items() if not any(p == x or p.startswith(x + b"/") for x in excluded)
    }
    for x in excluded:
        if snap.get(x) is not None and snap[x].type == "dir":
            parent = x.rpartition(b"/")[0] or b"."
            out[parent] = dataclasses.replace(out[parent], nlink=out[parent].nlink - 1)
    return out


def names_mkfs_cannot_take(snap: Snapshot) -> list[bytes]:
    """Paths with a 255-byte component (erofs-utils 1.5 fails on them), outermost only."""
    out: list[bytes] = []
    for p in sorted(snap):
        if any(len(c) >= 255 for c in p.split(b"/")) and not any(
            p.startswith(x + b"/") for x in out
        ):
            out.append(p)
    return out


@pytest.fixture(scope="module")
def synthetic_image(
    synthetic_tree: Manifest, synthetic_snapshot: Snapshot, tmp_path_factory: pytest.TempPathFactory
) -> MkfsImage:
    return mkfs_image(
        synthetic_tree.root,
        tmp_path_factory.mktemp("mkfs_synth"),
        exclude=names_mkfs_cannot_take(synthetic_snapshot),
    )


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Path]:
    p = tmp_path / "mnt"
    p.mkdir()
    yield p
    if mount.is_mountpoint(p):
        mount.umount(p, lazy=True)


def test_kernel_probe() -> None:
    assert mount.kernel_supports_erofs()
    assert mount.kernel_supports_erofs_file_backed()


def test_mount_synthetic_tree_identical(
    synthetic_image: MkfsImage, synthetic_snapshot: Snapshot, mnt: Path
) -> None:
    assert synthetic_image.blob is not None
    assert mount.image_extra_devices(synthetic_image.image) == 1
    assert not mount.is_mountpoint(mnt)
    with mount.mounted(synthetic_image.image, mnt, [synthetic_image.blob]) as root:
        assert mount.is_mountpoint(mnt) and mount.mount_fstype(mnt) == "erofs"
        at = mount.mount_at(mnt)
        assert at is not None and (at.fstype, at.source) == ("erofs", str(synthetic_image.image))
        assert os.statvfs(mnt).f_flag & os.ST_RDONLY
        got = snapshot_tree(root)
        expected = _drop(synthetic_snapshot, synthetic_image.excluded)
        assert compare_trees(expected, got, limit=40) == []
        # a device node in the image is not the host's device (nodev by default)
        with pytest.raises(PermissionError):
            open(root / "dev" / "null", "rb")  # noqa: SIM115 - raises
    assert not mount.is_mountpoint(mnt) and mount.mount_at(mnt) is None
    with (
        mount.mounted(synthetic_image.image, mnt, [synthetic_image.blob],
                      allow_suid_dev=True) as root,
        open(root / "dev" / "null", "rb") as f,  # the explicit opt-out
    ):
        assert f.read(10) == b""


def test_mount_reads_chunked_data(
    synthetic_tree: Manifest, synthetic_image: MkfsImage, mnt: Path
) -> None:
    assert synthetic_image.blob is not None
    with mount.mounted(synthetic_image.image, mnt, [synthetic_image.blob]) as root:
        for rel in (b"sizes/random_3m", b"dedup/blocks_ba", b"sparse/sparse_20m"):
            want = Path(os.fsdecode(synthetic_tree.path(rel))).read_bytes()
            assert (root / os.fsdecode(rel)).read_bytes() == want


def test_relative_paths_are_made_absolute(
    synthetic_image: MkfsImage, mnt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert synthetic_image.blob is not None
    monkeypatch.chdir(synthetic_image.image.parent)
    mount.mount_erofs_file(synthetic_image.image.name, mnt, [synthetic_image.blob.name])
    try:
        assert (mnt / "sizes" / "f1").stat().st_size == 1
    finally:
        mount.umount(mnt)


def test_missing_device_file(synthetic_image: MkfsImage, mnt: Path) -> None:
    missing = synthetic_image.image.parent / "no-such-blob.bin"
    with pytest.raises(KernelError) as ei:
        mount.mount_erofs_file(synthetic_image.image, mnt, [missing])
    assert ei.value.errno == errno.ENOENT
    assert str(missing) in str(ei.value)
    assert not mount.is_mountpoint(mnt)


def test_device_count_checked(synthetic_image: MkfsImage, mnt: Path) -> None:
    assert synthetic_image.blob is not None
    with pytest.raises(UsageError, match="1 extra device"):
        mount.mount_erofs_file(synthetic_image.image, mnt, [])
    # the kernel's own check, with its log line in the message
    with pytest.raises(KernelError) as ei:
        mount.mount_erofs_file(
            synthetic_image.image,
            mnt,
            [synthetic_image.blob, synthetic_image.blob],
            check_devices=False,
        )
    assert ei.value.errno == errno.EINVAL
    assert "dmesg" in str(ei.value)
    assert "extra devices don't match" in str(ei.value)
    assert not mount.is_mountpoint(mnt)


def test_garbage_image(tmp_path: Path, mnt: Path) -> None:
    bad = tmp_path / "garbage.img"
    bad.write_bytes(os.urandom(3 * 4096))
    assert mount.image_extra_devices(bad) is None
    with pytest.raises(KernelError) as ei:
        mount.mount_erofs_file(bad, mnt)
    assert ei.value.errno == errno.EINVAL
    msg = str(ei.value)
    assert "dmesg" in msg and str(bad) in msg
    assert "superblock" in msg  # the kernel's "cannot find valid erofs superblock"


def test_missing_image_and_mountpoint(
    synthetic_image: MkfsImage, tmp_path: Path, mnt: Path
) -> None:
    with pytest.raises(KernelError) as ei:
        mount.mount_erofs_file(tmp_path / "nope.img", mnt)
    assert ei.value.errno == errno.ENOENT
    assert synthetic_image.blob is not None
    with pytest.raises(KernelError) as ei:
        mount.mount_erofs_file(synthetic_image.image, tmp_path / "no-mnt", [synthetic_image.blob])
    assert ei.value.errno == errno.ENOENT


def test_plain_image_without_blob(synthetic_tree: Manifest, tmp_path: Path, mnt: Path) -> None:
    src = synthetic_tree.path(b"dev")  # devices, fifo, socket: no data, no outside links
    made = mkfs_image(Path(os.fsdecode(src)), tmp_path / "plain", chunked=False)
    assert mount.image_extra_devices(made.image) == 0
    with mount.mounted(made.image, mnt) as root:
        assert compare_trees(snapshot_tree(src), snapshot_tree(root)) == []


def test_umount_errors_and_lazy(synthetic_image: MkfsImage, mnt: Path) -> None:
    with pytest.raises(KernelError) as ei:
        mount.umount(mnt)
    assert ei.value.errno == errno.EINVAL and "not a mountpoint" in str(ei.value)
    assert synthetic_image.blob is not None
    mount.mount_erofs_file(synthetic_image.image, mnt, [synthetic_image.blob])
    f = open(mnt / "sizes" / "f4096", "rb")  # noqa: SIM115
    try:
        t0 = time.monotonic()
        with pytest.raises(KernelError) as ei:
            mount.umount(mnt, retries=2, delay=0.01)
        assert ei.value.errno == errno.EBUSY and "lazy" in str(ei.value)
        assert time.monotonic() - t0 < 5
        assert mount.is_mountpoint(mnt)
        mount.umount(mnt, lazy=True)
        assert not mount.is_mountpoint(mnt)
        assert len(f.read()) == 4096  # still readable after a lazy detach
    finally:
        f.close()


def test_mounted_unmounts_on_error(synthetic_image: MkfsImage, mnt: Path) -> None:
    assert synthetic_image.blob is not None
    with (
        pytest.raises(RuntimeError),
        mount.mounted(synthetic_image.image, mnt, [synthetic_image.blob]),
    ):
        assert mount.is_mountpoint(mnt)
        raise RuntimeError("boom")
    assert not mount.is_mountpoint(mnt)


def test_bad_options_rejected(synthetic_image: MkfsImage, mnt: Path) -> None:
    with pytest.raises(UsageError):
        mount.mount_erofs_file(synthetic_image.image, mnt, [Path("/tmp/a,b")])
    with pytest.raises(UsageError):
        mount.mount_erofs_fscache(mnt, "a,b")
    with pytest.raises(UsageError):
        mount.mount_erofs_file(synthetic_image.image, mnt, [], extra_options=["x,y"])
    for bad in ("", "a,b", "a\0b", "a\nb"):
        with pytest.raises(UsageError, match="domain_id"):
            mount.check_option_value("domain_id", bad)
    mount.check_option_value("domain_id", "dom-1")


def test_fscache_mount_reports_missing_support(mnt: Path) -> None:
    if mount.kernel_supports_erofs_fscache():
        pytest.skip("this kernel has fscache mode; exercised in the VM tests")
    with pytest.raises(KernelError) as ei:
        mount.mount_erofs_fscache(mnt, "testfs", domain_id="dom")
    assert "fsid=testfs,domain_id=dom" in str(ei.value)
    assert "CONFIG_EROFS_FS_ONDEMAND" in str(ei.value)


def test_kernel_config_lists_erofs() -> None:
    conf = mount.kernel_config()
    if conf is None:
        pytest.skip("no /proc/config.gz or /boot/config-<release> on this host")
    assert conf.get("CONFIG_EROFS_FS") in {"y", "m"}
    assert all(k.startswith("CONFIG_") for k in conf)


def test_fscache_unavailable_reason_on_this_kernel() -> None:
    from erofs_nydus.fscache.device import unavailable_reason

    if mount.kernel_supports_erofs_fscache():
        pytest.skip("this kernel has fscache mode; exercised in the VM tests")
    reason = unavailable_reason()
    assert reason is not None and ("cachefiles" in reason or "CONFIG_" in reason)


def test_is_mountpoint_basics(tmp_path: Path) -> None:
    assert mount.is_mountpoint("/")
    assert mount.is_mountpoint("/proc")
    assert not mount.is_mountpoint(tmp_path)
    assert not mount.is_mountpoint(tmp_path / "missing")
    link = tmp_path / "proc-link"
    link.symlink_to("/proc")
    assert mount.is_mountpoint(link)
    assert mount._unescape_mountinfo("a\\040b\\134c") == "a b\\c"


@pytest.mark.slow
def test_debootstrap_rootfs_round_trip(debootstrap_rootfs: Path, tmp_path: Path, mnt: Path) -> None:
    t0 = time.monotonic()
    src = snapshot_tree(debootstrap_rootfs)
    t_snap = time.monotonic() - t0
    made = mkfs_image(debootstrap_rootfs, tmp_path / "rootfs")
    assert made.blob is not None
    with mount.mounted(made.image, mnt, [made.blob]) as root:
        t0 = time.monotonic()
        got = snapshot_tree(root)
        t_snap_mnt = time.monotonic() - t0
        assert compare_trees(src, got, limit=40) == []
        assert (root / "bin").is_symlink() or (root / "bin" / "sh").exists()
    print(f"rootfs: {len(src)} entries, snapshot {t_snap:.1f}s source, {t_snap_mnt:.1f}s mounted")
    assert len(src) > 3000
    assert any(e.links for e in src.values()), "expected hard links in a Debian rootfs"
    assert treeutil.HASH_BLOCK == 65536
