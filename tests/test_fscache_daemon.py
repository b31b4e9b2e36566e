"""The fscache worker's request handling on the host, without /dev/cachefiles: the device
is a pipe (we read the replies the worker writes), anon fds are regular files (pwrite
lands there; READ_COMPLETE's ioctl fails on them and is only logged)."""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from erofs_nydus.builder.create import BuildOptions, create_image
from erofs_nydus.errors import DaemonError
from erofs_nydus.fscache import protocol as p
from erofs_nydus.fscache.objects import FsObject, ObjectTable
from erofs_nydus.service.fscache_daemon import FscacheWorker, mounted_fsids


def _open_msg(msg_id: int, object_id: int, volume: str, key: str, fd: int) -> bytes:
    vk = f"erofs,{volume}".encode() + b"\0"
    ck = key.encode()
    body = struct.pack("<IIII", len(vk), len(ck), fd, 0) + vk + ck
    return struct.pack("<IIII", msg_id, p.OP_OPEN, 16 + len(body), object_id) + body


def _read_msg(msg_id: int, object_id: int, off: int, length: int) -> bytes:
    return struct.pack("<IIIIQQ", msg_id, p.OP_READ, 32, object_id, off, length)


class Harness:
    def __init__(self, tmp: Path) -> None:
        src = tmp / "src"
        src.mkdir()
        self.data = os.urandom(300_000)
        (src / "a.bin").write_bytes(self.data)
        (src / "b.txt").write_text("hello\n" * 1000)
        self.boot, blobs = tmp / "image.boot", tmp / "blobs"
        res = create_image(str(src), str(self.boot), str(blobs), BuildOptions(chunk_size=0x10000))
        (self.blob,) = res.blobs
        self.rfd, self.wfd = os.pipe()
        os.set_blocking(self.rfd, False)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.worker = FscacheWorker(self.wfd, self.sock, str(tmp / "cache"), threads=2)
        self.info = self.worker.dispatch({
            "op": "register", "mode": "fscache", "bootstrap": str(self.boot),
            "backend": {"type": "local", "dir": str(blobs)}, "mountpoint": str(tmp / "mnt"),
        })  # fmt: skip
        self.tmp = tmp
        self.n = 0

    def anon(self) -> tuple[int, Path]:
        self.n += 1
        path = self.tmp / f"anon{self.n}"
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600), path

    def replies(self) -> list[bytes]:
        try:
            return os.read(self.rfd, 65536).split(b"copen ")[1:]
        except BlockingIOError:
            return []

    def handle(self, raw: bytes) -> None:
        msg = p.parse_message(raw)
        if isinstance(msg, p.OpenRequest):
            self.worker.on_open(msg)
        elif isinstance(msg, p.ReadRequest):
            self.worker.on_read(msg)
        else:
            self.worker.objects.remove(msg.object_id)

    def close(self) -> None:
        self.worker.objects.remove_all()
        self.worker.pool.shutdown()
        self.worker.table.close()
        self.sock.close()
        os.close(self.rfd)
        os.close(self.wfd)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.close()


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_register_answers_the_mount_fsid(h: Harness) -> None:
    assert h.info["fsid"] == h.info["mount_fsid"] and len(h.info["fsid"]) == 64
    other = h.worker.dispatch({
        "op": "register", "mode": "fscache", "bootstrap": str(h.boot),
        "backend": {"type": "local", "dir": str(h.tmp / "blobs")},
        "mountpoint": str(h.tmp / "mnt2"),
    })  # fmt: skip
    assert other["mount_fsid"] == h.info["fsid"] + ".1"  # a second mount gets its own key
    with pytest.raises(DaemonError, match="fscache mode"):
        h.worker.dispatch({"op": "register", "bootstrap": str(h.boot), "backend": {},
                           "mountpoint": "/x"})
    assert isinstance(mounted_fsids(), set)


def test_open_bootstrap_and_blob_sizes(h: Harness) -> None:
    fsid = h.info["fsid"]
    fd1, _ = h.anon()
    fd2, _ = h.anon()
    h.handle(_open_msg(1, 10, fsid, fsid, fd1))
    h.handle(_open_msg(2, 11, fsid, h.blob.blob_id, fd2))
    assert h.replies() == [
        f"1,{h.boot.stat().st_size}".encode(), f"2,{h.blob.uncompressed_size}".encode()
    ]
    # an alias of the fsid (second mount of the same image) is the same bootstrap
    fd3, _ = h.anon()
    h.handle(_open_msg(3, 12, fsid + ".1", fsid + ".1", fd3))
    assert h.replies() == [f"3,{h.boot.stat().st_size}".encode()]


def test_unknown_cookie_and_double_open_are_refused(h: Harness) -> None:
    fd, _ = h.anon()
    h.handle(_open_msg(7, 20, "x", "no-such-cookie", fd))
    assert h.replies() == [f"7,-{errno.ENOENT}".encode()]
    assert not _fd_open(fd)
    fsid = h.info["fsid"]
    fd1, _ = h.anon()
    h.handle(_open_msg(8, 21, fsid, h.blob.blob_id, fd1))
    fd2, _ = h.anon()
    h.handle(_open_msg(9, 22, fsid, h.blob.blob_id, fd2))
    assert h.replies() == [f"8,{h.blob.uncompressed_size}".encode(),
                           f"9,-{errno.EALREADY}".encode()]
    assert _fd_open(fd1) and not _fd_open(fd2)
    assert h.worker.stats["open_refused"] == 2


def test_read_fills_verified_pages_and_close_releases(h: Harness) -> None:
    fsid = h.info["fsid"]
    fd, path = h.anon()
    h.handle(_open_msg(1, 30, fsid, h.blob.blob_id, fd))
    h.replies()
    h.handle(_read_msg(2, 30, 0x10000, 0x8000))
    # whole chunks around the request were written at their offsets, page-aligned
    got = path.read_bytes()
    assert len(got) % 4096 == 0 and len(got) >= 0x20000
    srv = h.worker.table.blobs[h.blob.blob_id]
    expected = os.pread(srv.cache.fd, 0x10000, 0x10000)
    assert got[0x10000:0x20000] == expected and expected != bytes(0x10000)
    # a READ beyond the blob writes nothing (completing it then fails it: EIO)
    before = path.stat().st_size
    h.handle(_read_msg(3, 30, h.blob.uncompressed_size + 4096, 4096))
    assert path.stat().st_size == before and h.worker.stats["read_failed"] == 1
    # the bootstrap object is written whole on its first READ
    bfd, bpath = h.anon()
    h.handle(_open_msg(4, 31, fsid, fsid, bfd))
    h.handle(_read_msg(5, 31, 0, 4096))
    boot = h.boot.read_bytes()
    assert bpath.read_bytes()[: len(boot)] == boot
    h.handle(struct.pack("<IIII", 6, p.OP_CLOSE, 16, 30))
    assert not _fd_open(fd) and _fd_open(bfd)
    h.handle(_read_msg(7, 30, 0, 4096))  # READ for a closed object: ignored, counted
    assert h.worker.stats["read_orphans"] == 1


def test_drop_fds_and_status(h: Harness) -> None:
    fd, _ = h.anon()
    h.handle(_open_msg(1, 40, h.info["fsid"], h.blob.blob_id, fd))
    st: dict[str, Any] = h.worker.dispatch({"op": "status"})
    assert st["fscache"]["objects"] == 1 and st["fscache"]["opens_by_key"] == {
        h.blob.blob_id: 1}
    assert h.worker.dispatch({"op": "drop_fds"}) == {"dropped": 1}
    assert not _fd_open(fd)
    with pytest.raises(DaemonError, match="still serving"):
        h.worker.dispatch({"op": "shutdown"})


def test_object_table_defers_close_while_in_use(tmp_path: Path) -> None:
    t = ObjectTable()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    obj = FsObject(1, fd, "v", "k", "blob", "b", 4096)
    assert t.add(obj) is None
    assert t.add(FsObject(2, -1, "v", "k", "blob", "b", 4096)) is obj
    with t.using(1) as o:
        assert o is obj
        t.remove(1)
        assert _fd_open(fd)  # a READ worker still writes through it
    assert not _fd_open(fd) and t.get(1) is None and len(t) == 0


def _close_msg(msg_id: int, object_id: int) -> bytes:
    return struct.pack("<IIII", msg_id, p.OP_CLOSE, 16, object_id)


def test_detached_image_lingers_while_the_kernel_holds_its_objects(h: Harness) -> None:
    """Its mount gone (umount under an overlay that still has it as a lower layer) but
    its objects open: the image stays served, counts as a mount (nothing stops the
    daemon), and is forgotten - and culled if asked - only when the kernel CLOSEs."""
    from erofs_nydus.daemon.blobcache import cache_paths

    fsid, bid, mp = h.info["fsid"], h.blob.blob_id, str(h.tmp / "mnt")
    cache = h.tmp / "cache"
    bfd, _ = h.anon()
    dfd, dpath = h.anon()
    h.handle(_open_msg(1, 50, fsid, fsid, bfd))
    h.handle(_open_msg(2, 51, fsid, bid, dfd))
    h.replies()
    files = [Path(f) for f in cache_paths(str(cache), bid)] + [cache / f"{fsid}.boot"]
    assert all(f.exists() for f in files)
    # the snapshotter removes the entry and its blob: nothing goes while the kernel uses it
    assert h.worker.dispatch({"op": "cull", "name": bid}) == {"culled": False, "pending": True}
    assert h.worker.dispatch({"op": "detach", "mountpoint": mp})["lingering"] is True
    assert h.worker.dispatch({"op": "cull", "name": fsid})["pending"] is True
    assert all(f.exists() for f in files)
    assert h.worker.dispatch({"op": "ping"})["mounts"] == [mp]
    with pytest.raises(DaemonError, match="still serving"):
        h.worker.dispatch({"op": "shutdown"})
    assert h.worker.on_stop() is False  # SIGTERM refused
    assert h.worker.dispatch({"op": "status"})["lingering"] == [mp]
    # its reads are still served: the image's bytes, not an error
    h.handle(_read_msg(3, 51, 0, 0x10000))
    srv = h.worker.table.blobs[bid]
    assert dpath.read_bytes()[:0x10000] == os.pread(srv.cache.fd, 0x10000, 0)
    assert h.worker.stats["read_failed"] == 0
    # the bootstrap object closes; a blob object of that image only still is open
    h.handle(_close_msg(4, 50))
    assert h.worker.reap_lingering() is False and fsid in h.worker.table.images
    # the kernel let go of everything: detached, culled, nothing left (the worker stops)
    h.handle(_close_msg(5, 51))
    assert h.worker.reap_lingering() is True
    assert not h.worker.table.images and not h.worker.lingering
    assert not any(f.exists() for f in files), [f for f in files if f.exists()]
    assert h.worker.pending_culls == set()


def test_shutdown_right_after_umount_waits_for_the_kernels_closes(h: Harness) -> None:
    """umount(2) returns before cachefiles' CLOSEs for the image's objects reach us: a
    shutdown sent right then (the last umount's daemon stop) must wait for them, not
    refuse on a race (seen under load in test_fscache_vm's device-closed remount)."""
    import threading

    fsid, mp = h.info["fsid"], str(h.tmp / "mnt")
    bfd, _ = h.anon()
    h.handle(_open_msg(1, 70, fsid, fsid, bfd))
    assert h.worker.dispatch({"op": "detach", "mountpoint": mp})["lingering"] is True
    late_close = threading.Timer(0.3, h.handle, args=(_close_msg(2, 70),))
    late_close.start()
    try:
        assert h.worker.dispatch({"op": "shutdown"}) == {}
    finally:
        late_close.join()
    assert not h.worker.lingering and not h.worker.table.images


def test_lingering_image_registered_again_stays(h: Harness) -> None:
    fsid, mp = h.info["fsid"], str(h.tmp / "mnt")
    bfd, _ = h.anon()
    h.handle(_open_msg(1, 60, fsid, fsid, bfd))
    assert h.worker.dispatch({"op": "detach", "mountpoint": mp})["lingering"] is True
    assert h.worker.dispatch({"op": "cull", "name": fsid})["pending"] is True
    assert h.worker.dispatch({"op": "revive", "mountpoint": mp}) == {"revived": True}
    h.handle(_close_msg(2, 60))
    assert h.worker.reap_lingering() is False
    assert h.worker.table.images[fsid].mountpoints == [mp]
    assert (h.tmp / "cache" / f"{fsid}.boot").exists() and not h.worker.pending_culls


def test_detach_without_open_objects_is_immediate(h: Harness) -> None:
    fsid, mp = h.info["fsid"], str(h.tmp / "mnt")
    resp = h.worker.dispatch({"op": "detach", "mountpoint": mp})
    assert "lingering" not in resp and resp["remaining"] == 0
    assert not h.worker.table.images
    assert h.worker.dispatch({"op": "cull", "name": fsid}) == {"culled": True, "pending": False}
    assert not (h.tmp / "cache" / f"{fsid}.boot").exists()
    with pytest.raises(DaemonError, match="not a usable name"):
        h.worker.dispatch({"op": "cull", "name": "../x"})


def test_a_close_reaped_mid_register_keeps_the_new_registration(h: Harness) -> None:
    """umount, then mount again at the same place: the old mount's CLOSE reaped while the
    new `register` is half done (the table has it, `registered_hook` has not run) must
    not detach the new registration and stop the worker under the mount being made
    (test_fscache_vm's buffered pass: the next `status` found the daemon gone)."""
    import threading

    fsid, mp = h.info["fsid"], str(h.tmp / "mnt")
    bfd, _ = h.anon()
    h.handle(_open_msg(1, 90, fsid, fsid, bfd))
    assert h.worker.dispatch({"op": "detach", "mountpoint": mp})["lingering"] is True
    h.handle(_close_msg(2, 90))  # the kernel let go; the linger watch has not looked yet
    reaped: list[bool] = []
    real = h.worker.table.register

    def register_then_reap(*args: Any, **kwargs: Any) -> dict[str, Any]:
        info: dict[str, Any] = real(*args, **kwargs)
        t = threading.Thread(target=lambda: reaped.append(h.worker.reap_lingering()))
        t.start()
        t.join(0.5)  # the watch thread gets its chance right here
        return info

    h.worker.table.register = register_then_reap  # type: ignore[method-assign]
    info = h.worker.dispatch({
        "op": "register", "mode": "fscache", "bootstrap": str(h.boot),
        "backend": {"type": "local", "dir": str(h.tmp / "blobs")}, "mountpoint": mp,
    })  # fmt: skip
    deadline = time.monotonic() + 5
    while not reaped and time.monotonic() < deadline:
        time.sleep(0.01)
    assert reaped == [False]
    assert info["fsid"] == fsid and h.worker.table.images[fsid].mountpoints == [mp]
    assert not h.worker.lingering and not h.worker.stop.is_set()


def test_register_is_refused_once_the_worker_stops(h: Harness) -> None:
    """After an accepted `shutdown` (or any stop decision) a registration is refused
    with DaemonStopping - the client starts a new daemon - never accepted by a worker
    that is about to exit under the mount."""
    from erofs_nydus.errors import DaemonStopping

    mp = str(h.tmp / "mnt")
    req = {"op": "register", "mode": "fscache", "bootstrap": str(h.boot),
           "backend": {"type": "local", "dir": str(h.tmp / "blobs")}, "mountpoint": mp}
    h.worker.dispatch({"op": "detach", "mountpoint": mp})
    assert h.worker.dispatch({"op": "shutdown"}) == {}
    with pytest.raises(DaemonStopping, match="stopping"):
        h.worker.dispatch(req)
    assert not h.worker.table.images
