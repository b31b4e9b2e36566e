"""`erofs-nydus mount/umount` in fanotify mode on the host kernel: lazy mounts of built
images, laziness, concurrency, corruption, bad input, sharing, and crash/restart."""

from __future__ import annotations

import errno
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import treeutil
from daemon_support import (
    BuiltImage,
    Mounts,
    build_image,
    daemon_status,
    fanotify_usable,
    pid_alive,
    read_or_fail,
    run_cli,
    small_image,
    wait_for,
)

from erofs_nydus.mount import is_mountpoint
from erofs_nydus.service.client import DaemonClient

pytestmark = pytest.mark.kernel

if not fanotify_usable():
    pytest.skip("needs root and pre-content fanotify (Linux >= 6.14)", allow_module_level=True)

# The builder gives hard-linked symlinks/fifos distinct inodes (as Nydus does).
BUILDER_DIFFS = (b"hard/fifo_h_a", b"hard/other/fifo_h_b", b"hard/sym_h_a", b"hard/sym_h_b")


@pytest.fixture(scope="module")
def synthetic_image(
    synthetic_tree: treeutil.Manifest, tmp_path_factory: pytest.TempPathFactory
) -> BuiltImage:
    return build_image(synthetic_tree.root, tmp_path_factory.mktemp("synimg"))


def _regular_files(root: Path) -> list[Path]:
    out = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_file() and not p.is_symlink():
                out.append(p)
    return sorted(out)


def test_lazy_mount_full_compare_then_clean_umount(
    synthetic_tree: treeutil.Manifest, synthetic_image: BuiltImage, mounts: Mounts
) -> None:
    mp = mounts.mount(synthetic_image, "mnt")
    diffs = treeutil.compare_trees(synthetic_tree.root, mp, ignore_paths=BUILDER_DIFFS, limit=20)
    assert diffs == []
    st = daemon_status(mounts.base / "cache")
    (blob,) = st["blobs"].values()
    assert blob["complete"] and not blob["marked"]  # unmarked once complete
    assert st["fanotify"]["denied"] == 0
    pid = st["pid"]
    sup = DaemonClient(mounts.base / "cache").supervisor_pid()
    assert "daemon stopped" in mounts.umount(mp)
    for p in (pid, sup):
        assert p is not None
        wait_for(lambda p=p: not pid_alive(p), 10, f"process {p} (left behind) to exit")


def test_reading_one_small_file_is_lazy(
    synthetic_tree: treeutil.Manifest, synthetic_image: BuiltImage, mounts: Mounts
) -> None:
    mp = mounts.mount(synthetic_image, "mnt")
    rel = "sizes/f4097"
    assert (mp / rel).read_bytes() == (synthetic_tree.root / rel).read_bytes()
    st = daemon_status(mounts.base / "cache")
    (blob,) = st["blobs"].values()
    assert 0 < blob["present"] < blob["size"] / 10, blob
    assert os.stat(blob["path"]).st_blocks * 512 < blob["size"] / 10
    out = run_cli("mount-stats", str(mp)).stdout
    assert f"cache filled: {blob['present']} of {blob['size']} bytes" in out


def test_32_concurrent_readers_random_files_and_offsets(
    synthetic_tree: treeutil.Manifest, synthetic_image: BuiltImage, mounts: Mounts
) -> None:
    mp = mounts.mount(synthetic_image, "mnt", None, "--amplify", "0")
    src = synthetic_tree.root
    files = [p.relative_to(src) for p in _regular_files(src) if p.stat().st_size > 0]
    wide = [f for f in files if str(f).startswith("wide/")]
    files = [f for f in files if not str(f).startswith("wide/")]
    files += random.Random(1).sample(wide, min(200, len(wide)))
    errors: list[str] = []

    def reader(seed: int) -> int:
        rng = random.Random(seed)
        n = 0
        for _ in range(40):
            rel = rng.choice(files)
            size = (src / rel).stat().st_size
            off = rng.randrange(size)
            length = rng.randrange(1, 256 * 1024)
            with open(src / rel, "rb") as f:
                f.seek(off)
                want = f.read(length)
            fd = os.open(mp / rel, os.O_RDONLY)
            try:
                got = os.pread(fd, length, off)
            finally:
                os.close(fd)
            if got != want:
                errors.append(f"{rel}@{off}+{length}")
            n += len(got)
        return n

    with ThreadPoolExecutor(32) as pool:
        total = sum(pool.map(reader, range(32)))
    assert errors == []
    assert total > 0
    assert daemon_status(mounts.base / "cache")["fanotify"]["denied"] == 0


def test_second_mount_shares_cache(
    synthetic_tree: treeutil.Manifest, synthetic_image: BuiltImage, mounts: Mounts
) -> None:
    a = mounts.mount(synthetic_image, "a")
    b = mounts.mount(synthetic_image, "b")
    rel = "sizes/random_3m"
    assert (a / rel).read_bytes() == (synthetic_tree.root / rel).read_bytes()
    fetched = daemon_status(mounts.base / "cache")["metrics"]["bytes_fetched"]
    assert (b / rel).read_bytes() == (synthetic_tree.root / rel).read_bytes()
    st = daemon_status(mounts.base / "cache")
    assert st["metrics"]["bytes_fetched"] == fetched  # served from the shared cache
    assert len(st["blobs"]) == 1 and len(st["images"]) == 1
    assert sorted(st["images"][0]["mountpoints"]) == sorted([str(a), str(b)])
    assert "still serves 1" in mounts.umount(a)
    assert (b / "sizes/f1").read_bytes() == (synthetic_tree.root / "sizes/f1").read_bytes()
    assert "daemon stopped" in mounts.umount(b)


def test_corrupted_blob_read_errors_never_wrong_bytes(tmp_path: Path, mounts: Mounts) -> None:
    src, img = small_image(tmp_path)
    (blob,) = img.blobs
    data = bytearray(blob.read_bytes())
    for pos in range(1000, len(data), len(data) // 7):
        data[pos] ^= 0xA5
    blob.write_bytes(bytes(data))
    mp = mounts.mount(img, "mnt", None, "--amplify", "0")
    bad = good = 0
    for f in sorted(src.iterdir()):
        want = f.read_bytes()
        try:
            got = (mp / f.name).read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO
            bad += 1
            continue
        assert got == want, f"{f.name}: wrong bytes"
        good += 1
    assert bad > 0 and good > 0
    st = daemon_status(mounts.base / "cache")
    assert st["metrics"]["digest_failures"] > 0 and st["fanotify"]["denied"] > 0


def test_truncated_blob_read_errors(tmp_path: Path, mounts: Mounts) -> None:
    src, img = small_image(tmp_path)
    mp = mounts.mount(img, "mnt", None, "--amplify", "0")
    (blob,) = img.blobs
    data = blob.read_bytes()
    blob.write_bytes(data[: len(data) // 2])
    results = []
    for f in sorted(src.iterdir()):
        try:
            results.append((mp / f.name).read_bytes() == f.read_bytes())
        except OSError as exc:
            assert exc.errno == errno.EIO
            results.append(None)
    assert None in results and True in results and False not in results


def test_bad_bootstrap_refused(tmp_path: Path) -> None:
    boot = tmp_path / "bad.boot"
    boot.write_bytes(os.urandom(8192))
    (tmp_path / "blobs").mkdir()
    (tmp_path / "mnt").mkdir()
    cache = tmp_path / "cache"
    r = run_cli(
        "mount", str(boot), str(tmp_path / "mnt"), "--blob-dir", str(tmp_path / "blobs"),
        "--cache-dir", str(cache), check=False,
    )  # fmt: skip
    assert r.returncode != 0
    assert "erofs-nydus: error:" in r.stderr and "Traceback" not in r.stderr
    assert not is_mountpoint(tmp_path / "mnt")
    assert not DaemonClient(cache).supervisor_running()


def test_missing_blob_refused(tmp_path: Path) -> None:
    _src, img = small_image(tmp_path, 3)
    for b in img.blobs:
        b.unlink()
    (tmp_path / "mnt").mkdir()
    cache = tmp_path / "cache"
    r = run_cli(
        "mount", str(img.bootstrap), str(tmp_path / "mnt"), "--blob-dir", str(img.blob_dir),
        "--cache-dir", str(cache), check=False,
    )  # fmt: skip
    assert r.returncode != 0 and "not found" in r.stderr
    assert not DaemonClient(cache).supervisor_running()


def test_fscache_mode_says_use_the_vm(tmp_path: Path) -> None:
    _src, img = small_image(tmp_path, 1)
    (tmp_path / "mnt").mkdir()
    r = run_cli(
        "mount", str(img.bootstrap), str(tmp_path / "mnt"), "--blob-dir", str(img.blob_dir),
        "--cache-dir", str(tmp_path / "cache"), "--mode", "fscache", check=False,
    )  # fmt: skip
    assert r.returncode != 0 and "not available on this kernel" in r.stderr and "VM" in r.stderr


def test_kill_9_daemon_while_reader_blocked(tmp_path: Path, mounts: Mounts) -> None:
    src, img = small_image(tmp_path)
    mp = mounts.mount(img, "mnt", None, "--amplify", "0")
    cache = mounts.base / "cache"
    first = sorted(src.iterdir())[:8]
    pid = daemon_status(cache)["pid"]
    os.kill(pid, signal.SIGSTOP)  # the daemon can no longer answer anything
    results: dict[str, bytes | Exception] = {}

    def read(f: Path) -> None:
        try:
            results[f.name] = (mp / f.name).read_bytes()
        except Exception as exc:
            results[f.name] = exc

    threads = [threading.Thread(target=read, args=(f,)) for f in first]
    for t in threads:
        t.start()
    time.sleep(1.0)
    assert not results, "readers must block while the daemon is stopped"
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "reader still blocked after restart"
    for f in first:
        assert results[f.name] == f.read_bytes(), f.name
    st = daemon_status(cache)
    assert st["pid"] != pid
    # the restarted daemon restored the image and serves the rest
    for f in sorted(src.iterdir())[8:]:
        assert (mp / f.name).read_bytes() == f.read_bytes()
    assert "daemon stopped" in mounts.umount(mp)


def test_kill_9_daemon_between_reads(tmp_path: Path, mounts: Mounts) -> None:
    src, img = small_image(tmp_path)
    mp = mounts.mount(img, "mnt")
    cache = mounts.base / "cache"
    files = sorted(src.iterdir())
    assert (mp / files[0].name).read_bytes() == files[0].read_bytes()
    for _ in range(3):
        pid = daemon_status(cache)["pid"]
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        for f in files[1:6]:
            assert (mp / f.name).read_bytes() == f.read_bytes()
        files = files[5:]
    assert daemon_status(cache)["pid"] != pid


@pytest.fixture
def tiny_ext4(tmp_path: Path) -> Iterator[Path]:
    """A ~6 MiB ext4 filesystem (loop mounted) to fill up."""
    import subprocess

    img = tmp_path / "tiny.ext4"
    with open(img, "wb") as f:
        f.truncate(6 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(img)], check=True)
    mp = tmp_path / "tiny"
    mp.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mp)], check=True)
    try:
        yield mp
    finally:
        # a daemon that is still exiting may hold files there: fall back to a lazy umount
        if subprocess.run(["umount", str(mp)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mp)], check=False)


def test_full_cache_disk_read_errors_daemon_keeps_serving(
    tmp_path: Path, tiny_ext4: Path, mounts: Mounts
) -> None:
    """A fill the full cache disk refuses is an EIO for that read only: the daemon
    (same process, no restart) keeps serving what is cached.  `daemon.log` is on that
    disk too: its failing writes must not end the daemon (they did: restart loop)."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(11)
    for i in range(30):
        (src / f"f{i:02d}").write_bytes(rng.randbytes(400_000))
    img = build_image(src, tmp_path / "img", "--chunk-size", "0x10000")
    cache = tiny_ext4 / "cache"
    mp = mounts.mount(img, "mnt", cache, "--amplify", "0")
    pid = daemon_status(cache)["pid"]
    ok = failed = 0
    for f in sorted(src.iterdir()):
        try:
            got = read_or_fail(mp / f.name)
        except OSError as exc:
            assert exc.errno == errno.EIO
            failed += 1
            continue
        assert got == f.read_bytes(), f"{f.name}: wrong bytes"
        ok += 1
    assert ok > 0 and failed > 0
    st = daemon_status(cache)
    assert st["metrics"]["write_errors"] > 0
    assert st["pid"] == pid  # never restarted
    # already-cached files still read fine, the daemon still answers
    first = sorted(src.iterdir())[0]
    assert read_or_fail(mp / first.name) == first.read_bytes()
    mounts.umount(mp)


def test_umount_while_file_open_fails_cleanly(tmp_path: Path, mounts: Mounts) -> None:
    src, img = small_image(tmp_path, 5)
    mp = mounts.mount(img, "mnt")
    f = sorted(src.iterdir())[0]
    with open(mp / f.name, "rb") as held:
        r = run_cli("umount", str(mp), check=False)
        assert r.returncode != 0 and "busy" in r.stderr.lower()
        assert held.read() == f.read_bytes()  # the daemon still serves the mount
    assert "daemon stopped" in mounts.umount(mp)


@pytest.fixture(scope="module")
def debootstrap_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuiltImage]:
    from fixtures_trees import ensure_debootstrap_rootfs

    try:
        rootfs = ensure_debootstrap_rootfs()
    except Exception as exc:  # no network / no debootstrap
        pytest.skip(f"debootstrap rootfs unavailable: {exc}")
    return rootfs, build_image(rootfs, tmp_path_factory.mktemp("debimg"))


@pytest.mark.slow
def test_debootstrap_chroot_lazily(
    debootstrap_image: tuple[Path, BuiltImage], mounts: Mounts
) -> None:
    import subprocess

    rootfs, img = debootstrap_image
    mp = mounts.mount(img, "rootfs")
    ls = subprocess.run(
        ["chroot", str(mp), "/bin/ls", "/"], capture_output=True, text=True, timeout=120
    )
    assert ls.returncode == 0 and "usr" in ls.stdout.split()
    dpkg = subprocess.run(
        ["chroot", str(mp), "dpkg", "-l"], capture_output=True, text=True, timeout=120
    )
    assert dpkg.returncode == 0 and "ii  dpkg " in dpkg.stdout
    st = daemon_status(mounts.base / "cache")
    (blob,) = st["blobs"].values()
    assert blob["present"] < blob["size"] / 5  # a command touches a small part of the image
    diffs = treeutil.compare_trees(rootfs, mp, limit=20)
    assert diffs == []
    assert daemon_status(mounts.base / "cache")["fanotify"]["denied"] == 0


def test_concurrent_mounts_start_one_daemon(tmp_path: Path, mounts: Mounts) -> None:
    import subprocess

    from daemon_support import CLI

    src, img = small_image(tmp_path, 4)
    cache = mounts.base / "cache"
    procs = []
    for name in ("m1", "m2", "m3"):
        (mounts.base / name).mkdir()
        procs.append(
            subprocess.Popen(
                [*CLI, "mount", str(img.bootstrap), str(mounts.base / name),
                 "--blob-dir", str(img.blob_dir), "--cache-dir", str(cache)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
        )  # fmt: skip
    for name, p in zip(("m1", "m2", "m3"), procs, strict=True):
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        mounts.active.append((mounts.base / name, cache))
    mounts.caches.add(cache)
    st = daemon_status(cache)
    assert len(st["images"][0]["mountpoints"]) == 3
    f = sorted(src.iterdir())[0]
    for name in ("m1", "m2", "m3"):
        assert (mounts.base / name / f.name).read_bytes() == f.read_bytes()
    assert "still serves 2" in mounts.umount(mounts.base / "m1")
    assert "still serves 1" in mounts.umount(mounts.base / "m2")
    assert "daemon stopped" in mounts.umount(mounts.base / "m3")


def test_kill_9_daemon_mid_fill(tmp_path: Path, mounts: Mounts) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    for i in range(12):
        (src / f"f{i:02d}").write_bytes(rng.randbytes(4 << 20))
    img = build_image(src, tmp_path / "img")
    # one miss amplifies into a ~48 MiB fill: long enough to be killed in the middle
    mp = mounts.mount(img, "mnt", None, "--amplify", str(64 << 20))
    cache = mounts.base / "cache"
    pid = daemon_status(cache)["pid"]
    first = sorted(src.iterdir())[0]
    result: list[bytes | Exception] = []

    def read() -> None:
        try:
            result.append((mp / first.name).read_bytes())
        except Exception as exc:
            result.append(exc)

    t = threading.Thread(target=read)
    t.start()
    deadline = time.monotonic() + 10
    blob = next(iter(img.blobs))
    data_file = cache / f"{blob.name}.blob.data"
    while os.stat(data_file).st_blocks == 0 and time.monotonic() < deadline:
        time.sleep(0.005)  # wait until the fill has started writing
    os.kill(pid, signal.SIGKILL)
    t.join(60)
    assert not t.is_alive()
    assert result == [first.read_bytes()]
    assert daemon_status(cache)["pid"] != pid
    assert treeutil.compare_trees(src, mp) == []


def test_idle_daemon_exits_by_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EROFS_NYDUS_IDLE_EXIT", "1")
    client = DaemonClient(tmp_path / "cache")
    assert client.ensure_running() is True
    assert client.alive()
    wait_for(lambda: not client.supervisor_running(), 30, "the idle daemon to exit")
    assert not os.path.exists(client.paths.socket)


def test_stopping_daemon_leaves_a_newer_socket_at_its_path(tmp_path: Path) -> None:
    """A cache dir deleted and made again under a running daemon: when the old daemon
    stops it must not remove the new daemon's sockets (same paths, other files)."""
    from erofs_nydus.service.paths import listen_unix, unlink_own_socket

    path = str(tmp_path / "daemon.sock")
    old = listen_unix(path)
    os.unlink(path)  # the cache dir went away...
    new = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    new.bind(path)  # ...and a new daemon listens at the same path
    unlink_own_socket(path)  # the old one stopping
    assert os.path.exists(path)
    old.close()
    new.close()
    mine = listen_unix(path)  # replaces the stale file
    unlink_own_socket(path)
    assert not os.path.exists(path)
    mine.close()
