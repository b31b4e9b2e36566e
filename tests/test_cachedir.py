"""Threat model, local users: the cache dir and the daemon's sockets.

A local user who is not root must not be able to make the root daemon write a file
of their choosing, read an image's private files out of the cache, or answer the
root CLI in the daemon's place.  What holds that:

* the cache dir must be a real directory owned by us and not group/world-writable
  (refused with one line otherwise); we create it 0700 whatever the umask;
* every file in it (cache files, chunk maps, `daemon.lock`, `daemon.log`, state,
  bootstrap copies) is opened relative to a directory fd without following a
  symlink, created O_EXCL with mode 0600: a symlink planted by whoever could write
  there once is refused, its target never written;
* the CLI trusts `daemon.sock` only if the process serving it is root (SO_PEERCRED);
* host mounts are `nosuid,nodev` unless `mount --allow-suid-dev`: a setuid binary or a
  device node inside an image gives nobody anything;
* control requests are bounded (a line over 1 MiB gets an error reply, the daemon
  lives on) and range-checked; repeated log lines are rate-limited, the log capped.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_support import (
    BuiltImage,
    build_image,
    fanotify_usable,
    make_blob,
    make_payloads,
    run_cli,
)

from erofs_nydus.daemon.blobcache import BlobCacheFile, cache_paths
from erofs_nydus.daemon.chunkmap import ChunkMap
from erofs_nydus.errors import UnsafePathError, UsageError
from erofs_nydus.fsutil import open_private, private_dir
from erofs_nydus.mount import is_mountpoint, mount_table
from erofs_nydus.service import logs
from erofs_nydus.service.client import DaemonClient
from erofs_nydus.service.paths import RunPaths, take_supervisor_lock

NOBODY = 65534
TARGET_TEXT = b"precious: must never be overwritten\n"


@pytest.fixture
def target(tmp_path: Path) -> Path:
    """A file a planted symlink points at (think /etc/shadow)."""
    t = tmp_path / "target"
    t.write_bytes(TARGET_TEXT)
    return t


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return Path(private_dir(tmp_path / "cache"))


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


# -- planted symlinks -------------------------------------------------------------------


def test_symlink_for_cache_file_is_refused(cache: Path, target: Path) -> None:
    sb = make_blob(make_payloads([5000, 9000]))
    data, _ = cache_paths(str(cache), sb.blob.blob_id)
    os.symlink(target, data)
    with pytest.raises(UnsafePathError, match="symlink"):
        BlobCacheFile(str(cache), sb.blob, sb.chunks, durable=False)
    assert target.read_bytes() == TARGET_TEXT


def test_symlink_for_chunk_map_is_refused(cache: Path, target: Path) -> None:
    sb = make_blob(make_payloads([5000, 9000]))
    _, cmap = cache_paths(str(cache), sb.blob.blob_id)
    BlobCacheFile(str(cache), sb.blob, sb.chunks, durable=False).close()
    os.unlink(cmap)
    os.symlink(target, cmap)  # next to a cache file of the right size: kept, then opened
    with pytest.raises(UnsafePathError, match="symlink"):
        BlobCacheFile(str(cache), sb.blob, sb.chunks, durable=False)
    with pytest.raises(UnsafePathError):
        ChunkMap.open(cmap, 8)
    assert target.read_bytes() == TARGET_TEXT


def test_symlink_for_lock_file_is_refused(cache: Path, target: Path) -> None:
    paths = RunPaths.of(cache)
    os.symlink(target, paths.lock)
    with pytest.raises(UnsafePathError, match="symlink"):
        take_supervisor_lock(paths)
    with pytest.raises(UnsafePathError):
        DaemonClient(cache).supervisor_running()
    assert target.read_bytes() == TARGET_TEXT


def test_symlink_for_log_is_refused(cache: Path, target: Path) -> None:
    client = DaemonClient(cache)
    os.symlink(target, client.paths.log)
    with pytest.raises(UnsafePathError):
        client.open_log()
    assert target.read_bytes() == TARGET_TEXT


def test_dangling_symlink_is_not_created_through(cache: Path, tmp_path: Path) -> None:
    os.symlink(tmp_path / "would-be-created", cache / "x")
    with pytest.raises(UnsafePathError):
        open_private(cache / "x", os.O_RDWR | os.O_CREAT)
    assert not (tmp_path / "would-be-created").exists()


def test_hard_link_and_fifo_are_refused(cache: Path, target: Path) -> None:
    os.link(target, cache / "linked")
    with pytest.raises(UnsafePathError, match="hard link"):
        open_private(cache / "linked", os.O_RDWR | os.O_CREAT)
    os.mkfifo(cache / "fifo")
    with pytest.raises(UnsafePathError, match="regular"):
        open_private(cache / "fifo", os.O_RDONLY)  # and does not block
    assert target.read_bytes() == TARGET_TEXT


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_file_owned_by_someone_else_is_refused(cache: Path) -> None:
    (cache / "theirs").write_bytes(b"")
    os.chown(cache / "theirs", NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match="owned by uid 65534"):
        open_private(cache / "theirs", os.O_RDONLY)


def test_symlinked_cache_dir_is_refused(tmp_path: Path) -> None:
    real = Path(private_dir(tmp_path / "real"))
    os.symlink(real, tmp_path / "link")
    with pytest.raises(UnsafePathError, match="symlink"):
        private_dir(tmp_path / "link")


# -- the cache dir's owner and mode -----------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777, 0o702])
def test_writable_cache_dir_is_refused(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(UnsafePathError, match="writable by group or others") as ei:
        private_dir(d)
    assert "\n" not in str(ei.value)
    with pytest.raises(UnsafePathError):
        take_supervisor_lock(RunPaths.of(d))
    assert not (d / "daemon.lock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_foreign_owned_cache_dir_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(UnsafePathError, match="owned by uid 65534"):
        private_dir(d)
    with pytest.raises(UnsafePathError):
        DaemonClient(d).ensure_running()
    assert os.listdir(d) == []


# -- modes whatever the umask -----------------------------------------------------------


def test_modes_with_umask_000(tmp_path: Path, umask0: None) -> None:
    cdir = tmp_path / "new" / "cache"
    private_dir(cdir)
    assert _mode(cdir) == 0o700 and _mode(cdir.parent) == 0o755
    sb = make_blob(make_payloads([5000, 9000]))
    bc = BlobCacheFile(str(cdir), sb.blob, sb.chunks, durable=False)
    bc.close()
    data, cmap = cache_paths(str(cdir), sb.blob.blob_id)
    assert _mode(Path(data)) == 0o600 and _mode(Path(cmap)) == 0o600
    os.close(DaemonClient(cdir).open_log())
    assert _mode(cdir / "daemon.log") == 0o600
    fd = take_supervisor_lock(RunPaths.of(cdir))
    assert fd is not None
    os.close(fd)
    assert _mode(cdir / "daemon.lock") == 0o600


def test_old_world_readable_cache_file_is_tightened(cache: Path) -> None:
    sb = make_blob(make_payloads([5000]))
    data, _ = cache_paths(str(cache), sb.blob.blob_id)
    Path(data).write_bytes(b"")
    os.chmod(data, 0o644)
    BlobCacheFile(str(cache), sb.blob, sb.chunks, durable=False).close()
    assert _mode(Path(data)) == 0o600


# -- through the CLI (real daemon, real mounts) -----------------------------------------

kernel = pytest.mark.skipif(not fanotify_usable(),
                            reason="needs root and pre-content fanotify (Linux >= 6.14)")


@pytest.fixture(scope="module")
def small_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    base = tmp_path_factory.mktemp("cdimg")
    src = base / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(300_000))
    return build_image(src, base / "img", "--chunk-size", "0x10000")


def _mount(img: BuiltImage, mnt: Path, cache: Path, *extra: str
           ) -> subprocess.CompletedProcess[str]:
    mnt.mkdir(exist_ok=True)
    return run_cli("mount", str(img.bootstrap), str(mnt), "--blob-dir", str(img.blob_dir),
                   "--cache-dir", str(cache), "--mode", "fanotify", *extra, check=False)


def _one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("erofs-nydus: error:"), r.stderr
    return lines[0]


@kernel
@pytest.mark.kernel
def test_mount_refuses_world_writable_cache_dir(small_image: BuiltImage, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    line = _one_line_error(_mount(small_image, tmp_path / "mnt", cache))
    assert "writable by group or others" in line
    assert os.listdir(cache) == [] and not is_mountpoint(tmp_path / "mnt")


@kernel
@pytest.mark.kernel
def test_mount_refuses_planted_cache_file(small_image: BuiltImage, tmp_path: Path,
                                          target: Path) -> None:
    cache = Path(private_dir(tmp_path / "cache"))
    (blob,) = small_image.blobs
    os.symlink(target, cache / f"{blob.name}.blob.data")
    line = _one_line_error(_mount(small_image, tmp_path / "mnt", cache))
    assert "symlink" in line
    assert target.read_bytes() == TARGET_TEXT and not is_mountpoint(tmp_path / "mnt")
    assert not DaemonClient(cache).supervisor_running()


@kernel
@pytest.mark.kernel
def test_mount_refuses_planted_lock(small_image: BuiltImage, tmp_path: Path,
                                    target: Path) -> None:
    cache = Path(private_dir(tmp_path / "cache"))
    os.symlink(target, cache / "daemon.lock")
    line = _one_line_error(_mount(small_image, tmp_path / "mnt", cache))
    assert "symlink" in line and target.read_bytes() == TARGET_TEXT


def _warm(img: BuiltImage, cache: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("warm", str(img.bootstrap), "--blob-dir", str(img.blob_dir), "--all",
                   "--cache-dir", str(cache), check=False)


def test_warm_refuses_world_writable_cache_dir(small_image: BuiltImage, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    assert "writable by group or others" in _one_line_error(_warm(small_image, cache))
    assert os.listdir(cache) == []


def test_warm_refuses_planted_lock(small_image: BuiltImage, tmp_path: Path,
                                   target: Path) -> None:
    cache = Path(private_dir(tmp_path / "cache"))
    os.symlink(target, cache / "daemon.lock")
    assert "symlink" in _one_line_error(_warm(small_image, cache))
    assert target.read_bytes() == TARGET_TEXT


def test_warm_makes_a_private_cache_dir(small_image: BuiltImage, tmp_path: Path,
                                        umask0: None) -> None:
    cache = tmp_path / "new" / "cache"
    r = _warm(small_image, cache)
    assert r.returncode == 0, r.stderr
    assert _mode(cache) == 0o700
    files = [p for p in cache.iterdir() if p.is_file()]
    assert files and all(_mode(p) == 0o600 for p in files), [(p, _mode(p)) for p in files]


# -- control requests are bounded -------------------------------------------------------

BIG_LINE = b'{"op": "ping", "pad": "' + b"x" * (2 << 20) + b'"}\n'


def _send_big_line_read_reply(sock: socket.socket) -> dict[str, Any]:
    """Send a 2 MiB request line (in a thread: the daemon stops reading it) and return
    the reply line."""
    sock.settimeout(60)

    def send() -> None:
        with contextlib.suppress(OSError):  # the daemon drops the connection
            sock.sendall(BIG_LINE)

    t = threading.Thread(target=send)
    t.start()
    buf = b""
    while not buf.endswith(b"\n"):
        part = sock.recv(65536)
        if not part:
            break
        buf += part
    t.join(60)
    assert buf, "connection closed without a reply"
    reply: dict[str, Any] = json.loads(buf)
    return reply


BAD_REGISTER = [
    ({"amplify": -1}, "amplify=-1 is out of range"),
    ({"amplify": "big"}, "amplify='big': expected an integer"),
    ({"prefetch_threads": 0}, "prefetch_threads=0 is out of range"),
    ({"prefetch_threads": 100000}, "prefetch_threads=100000 is out of range"),
    ({"prefetch_bandwidth": -5}, "prefetch_bandwidth=-5 is out of range"),
]


@kernel
@pytest.mark.kernel
def test_fanotify_daemon_bounds_control_requests(tmp_path: Path) -> None:
    client = DaemonClient(tmp_path / "cache")
    client.ensure_running()
    try:
        pid = client.request("ping")["pid"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(client.paths.socket)
            reply = _send_big_line_read_reply(s)
        assert reply["ok"] is False and "longer than 1048576 bytes" in reply["error"]
        assert client.request("ping")["pid"] == pid  # the same worker: it did not crash
        from daemon_support import daemon_metrics

        assert daemon_metrics(client.paths.cache_dir)[
            "erofs_nydus_limit_hits_total{limit=control_request_bytes}"] == 1
        for extra, msg in BAD_REGISTER:
            with pytest.raises(UsageError) as ei:
                client.request("register", bootstrap="/nonexistent", mountpoint="/nonexistent",
                               backend={"type": "local", "dir": "/"}, **extra)
            assert msg in str(ei.value) and "\n" not in str(ei.value)
        for deadline in (-1, 0, float("inf")):
            with pytest.raises(UsageError, match="deadline="):
                client.request("resolve", ref="127.0.0.1:9/none:latest", deadline=deadline)
        assert client.request("ping")["pid"] == pid
    finally:
        client.shutdown()


def test_fscache_daemon_bounds_control_requests(tmp_path: Path) -> None:
    from erofs_nydus.service.fscache_daemon import FscacheWorker

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker = FscacheWorker(-1, ours, str(private_dir(tmp_path / "cache")), threads=1)
    served = threading.Thread(target=worker._serve_conn, args=(theirs,))
    served.start()
    try:
        reply = _send_big_line_read_reply(ours)
        assert reply["ok"] is False and "longer than 1048576 bytes" in reply["error"]
        served.join(60)
        assert not served.is_alive()
        assert logs.limit_hits()["control_request_bytes"] >= 1
        for extra, msg in BAD_REGISTER:
            with pytest.raises(UsageError, match=re.escape(msg)):
                worker.dispatch({"op": "register", "mode": "fscache", "bootstrap": "/x",
                                 "mountpoint": "/x", "backend": {}, **extra})
    finally:
        ours.close()
        worker.pool.shutdown()
        worker.table.close()


# -- nosuid,nodev host mounts -----------------------------------------------------------


@pytest.fixture(scope="module")
def suid_dev_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """An image with a setuid-root copy of id(1) and a 0666 char device node (1:3)."""
    base = tmp_path_factory.mktemp("suidimg")
    src = base / "src"
    src.mkdir(mode=0o755)
    src.chmod(0o755)
    shutil.copy("/usr/bin/id", src / "suid-id")
    os.chmod(src / "suid-id", 0o4755)
    os.mknod(src / "nulldev", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(src / "nulldev", 0o666)
    return build_image(src, base / "img")


@pytest.fixture
def open_dir_for_nobody() -> Iterator[Path]:
    """A directory user nobody can reach (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="en-suid-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for mp in d.iterdir():
            if is_mountpoint(mp):
                run_cli("umount", str(mp), check=False)
        shutil.rmtree(d, ignore_errors=True)


def _euid_as_nobody(binary: Path) -> str:
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        str(binary), "-u"], capture_output=True, text=True, timeout=60,
                       check=True)  # fmt: skip
    return r.stdout.strip()


@kernel
@pytest.mark.kernel
def test_mounts_are_nosuid_nodev_unless_allowed(suid_dev_image: BuiltImage, tmp_path: Path,
                                                open_dir_for_nobody: Path) -> None:
    cache = tmp_path / "cache"
    mp = open_dir_for_nobody / "mnt"
    assert _mount(suid_dev_image, mp, cache).returncode == 0
    try:
        assert stat.S_IMODE((mp / "suid-id").stat().st_mode) == 0o4755
        assert _euid_as_nobody(mp / "suid-id") == str(NOBODY)
        with pytest.raises(PermissionError):
            os.open(mp / "nulldev", os.O_WRONLY)
        opts = next(m.options for m in mount_table() if m.mountpoint == str(mp))
        assert {"nosuid", "nodev"} <= opts
    finally:
        run_cli("umount", str(mp))
    # the explicit opt-out
    assert _mount(suid_dev_image, mp, cache, "--allow-suid-dev").returncode == 0
    try:
        assert _euid_as_nobody(mp / "suid-id") == "0"
        os.close(os.open(mp / "nulldev", os.O_WRONLY))
    finally:
        run_cli("umount", str(mp))


def test_mount_help_documents_the_opt_out() -> None:
    out = run_cli("mount", "--help").stdout
    assert "--allow-suid-dev" in out and "nosuid,nodev" in out


# -- replies are believed from root only ------------------------------------------------


def _serve_as_nobody(path: str, reply: dict[str, Any]) -> int:
    """Fork a fake daemon: bind `path` as root (only root can write the dir), then
    become nobody and listen (SO_PEERCRED reports who called listen) and answer every
    connection with `reply`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid:
        sock.close()
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"1", "fake daemon did not start"
        os.close(ready_r)
        return pid
    code = 1
    try:
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
        sock.listen(8)
        os.write(ready_w, b"1")
        while True:
            conn, _ = sock.accept()
            with conn, contextlib.suppress(OSError):  # a client that hangs up at once
                conn.recv(65536)
                conn.sendall(json.dumps(reply).encode() + b"\n")
    finally:
        os._exit(code)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_control_socket_served_by_nobody_is_not_trusted(cache: Path) -> None:
    from erofs_nydus.service.api_client import ApiClient
    from erofs_nydus.service.paths import api_socket_path

    client = DaemonClient(cache)
    evil = {"ok": True, "pid": 1, "mounts": [], "fsid": "0" * 64,
            "bootstrap": "/etc/shadow", "devices": ["/dev/sda"]}
    pids = [_serve_as_nobody(client.paths.socket, evil),
            _serve_as_nobody(api_socket_path(cache), evil)]
    try:
        with pytest.raises(UnsafePathError, match="served by uid 65534") as ei:
            client.request("register", bootstrap="/x", backend={}, mountpoint="/x")
        assert "\n" not in str(ei.value)
        with pytest.raises(UnsafePathError):
            client.ensure_running()  # neither believed nor replaced
        with pytest.raises(UnsafePathError, match="served by uid 65534"):
            ApiClient(cache).get_json("/api/v1/daemon")
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


# -- daemon.log: rate limit and size cap ------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _capture_logger(name: str, flt: logs.RateLimit) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(flt)
    lg = logging.getLogger(name)
    lg.handlers[:] = [handler]
    lg.propagate = False
    lg.setLevel(logging.INFO)
    return lg, out


def test_repeated_log_lines_are_rate_limited() -> None:
    clock = _Clock()
    lg, out = _capture_logger("erofs_nydus.test.ratelimit", logs.RateLimit(20, 60.0, clock))
    before = logs.suppressed_total()
    for i in range(10_000):
        lg.error("deny (EIO) fd=%d: chunk %d digest mismatch", i, i)
        lg.info("other message %d", i) if i < 5 else None
    lines = out.getvalue().splitlines()
    assert len([x for x in lines if x.startswith("deny")]) == 20
    assert len([x for x in lines if x.startswith("other")]) == 5
    assert len([x for x in lines if "rate limit: more messages like this" in x]) == 1
    assert len(lines) == 26
    assert logs.suppressed_total() - before == 10_000 - 20
    clock.now += 61  # the next window: a count of what was dropped, then lines again
    lg.error("deny (EIO) fd=%d: chunk %d digest mismatch", 1, 1)
    tail = out.getvalue().splitlines()[26:]
    assert tail[0].startswith("9980 more like this were suppressed: deny (EIO)")
    assert tail[1] == "deny (EIO) fd=1: chunk 1 digest mismatch"


def test_daemon_log_is_rotated_and_capped(cache: Path) -> None:
    path = str(cache / "daemon.log")
    fd = open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    other = os.dup(fd)  # a second process's stderr, sharing the file
    stream = open(fd, "w", closefd=False)  # noqa: SIM115 - closed below
    stream2 = open(other, "w", closefd=False)  # noqa: SIM115 - closed below
    h1 = logs.CappedLogHandler(max_bytes=10_000, fds=(fd,), stream=stream)
    h2 = logs.CappedLogHandler(max_bytes=10_000, fds=(other,), stream=stream2)
    try:
        assert h1.manage(path) and h2.manage(path)
        assert not logs.CappedLogHandler(stream=io.StringIO(), fds=(0,)).manage(path)
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "%s", ("y" * 99,), None)
        for _ in range(1000):  # 100 KB of log
            h1.emit(rec)
        assert os.path.getsize(path) <= 10_100
        assert 10_000 < os.path.getsize(path + ".1") <= 10_100
        h2.emit(logging.LogRecord("x", logging.ERROR, __file__, 1, "from h2", (), None))
        assert Path(path).read_text().endswith("from h2\n")  # followed the rotation
    finally:
        stream.close()
        stream2.close()
        os.close(fd)
        os.close(other)


_FULL_LOG_CHILD = """
import logging, sys, traceback
from erofs_nydus.service import logs
logs.install("%(message)s", sys.argv[1])  # stderr is that file: rotation on
log = logging.getLogger("erofs_nydus.daemon")
for i in range(200):  # past the rate limit: its notice is a write too
    log.error("deny (EIO) fd=%d: cannot write chunk %d: No space left on device", i, i)
print("a print", file=sys.stderr, flush=True)
print("a print on stdout", flush=True)
try:
    raise RuntimeError("a traceback")
except RuntimeError:
    traceback.print_exc()
logs.CappedLogHandler(max_bytes=0).emit(logging.LogRecord(
    "x", logging.ERROR, "child", 1, "rotation on a full disk", (), None))
with open(sys.argv[2], "w") as out:
    out.write(str(logs.write_errors_total()))
"""


@pytest.fixture
def full_ext4(tmp_path: Path) -> Iterator[Path]:
    """A tiny ext4 (loop mounted) filled to its last block, holding `daemon.log`
    whose last block is half used: what a filling cache disk leaves."""
    img = tmp_path / "full.ext4"
    with open(img, "wb") as f:
        f.truncate(2 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-b", "1024", str(img)], check=True)
    mp = tmp_path / "full"
    mp.mkdir()
    subprocess.run(["mount", "-o", "loop", str(img), str(mp)], check=True)
    try:
        (mp / "daemon.log").write_text("x" * 500 + "\n")
        with open(mp / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 1024)
        yield mp
    finally:
        subprocess.run(["umount", str(mp)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a loop mount")
def test_log_writes_on_a_full_disk_never_raise(tmp_path: Path, full_ext4: Path) -> None:
    """The cause of the full-cache-disk restart loop: `daemon.log` lives in the cache
    dir, and once a fill had used the disk's last block a log line was written in
    part, the rest stayed in stderr's buffer and every later flush raised ENOSPC -
    out of the handler's own error path, `print` and `traceback.print_exc`, into the
    worker's, the supervisor's and the keeper's loops.  All three died; the mount's
    holes then read as zeros."""
    import sys

    log = full_ext4 / "daemon.log"
    result = tmp_path / "errors"
    with open(log, "ab") as out:
        r = subprocess.run([sys.executable, "-c", _FULL_LOG_CHILD, str(log), str(result)],
                           stdout=out, stderr=out, timeout=120, check=False,
                           env={**os.environ, "EROFS_NYDUS_LOG": "INFO"})
    assert r.returncode == 0, log.read_text()[-2000:]
    assert int(result.read_text()) >= 10  # dropped and counted, not raised
    assert "deny (EIO) fd=0:" in log.read_text()  # what fitted was written


def test_dropping_writer_keeps_what_fits(tmp_path: Path) -> None:
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        w = io.TextIOWrapper(logs.DropOnErrorWriter(fd), encoding="utf-8",
                             line_buffering=True, write_through=True)
        before = logs.write_errors_total()
        w.write("one line\n")
        w.close()  # closes the wrapper, not the fd
        os.write(fd, b"fd still open\n")
        assert path.read_text() == "one line\nfd still open\n"
        assert logs.write_errors_total() == before
    finally:
        os.close(fd)
    with open("/dev/full", "wb") as full:
        before = logs.write_errors_total()
        assert logs.DropOnErrorWriter(full.fileno()).write(b"x" * 10) == 10
        assert logs.write_errors_total() == before + 1


@kernel
@pytest.mark.kernel
def test_hammering_a_corrupt_file_logs_a_bounded_number_of_lines(tmp_path: Path) -> None:
    from daemon_support import daemon_metrics

    src = tmp_path / "src"
    src.mkdir()
    (src / "bad").write_bytes(os.urandom(200_000))
    img = build_image(src, tmp_path / "img", "--chunk-size", "0x10000")
    (blob,) = img.blobs
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    mp = tmp_path / "mnt"
    assert _mount(img, mp, cache, "--amplify", "0").returncode == 0
    try:
        fd = os.open(mp / "bad", os.O_RDONLY)
        try:
            for _ in range(2000):
                with pytest.raises(OSError):
                    os.pread(fd, 4096, 0)
        finally:
            os.close(fd)
        log_text = (cache / "daemon.log").read_text()
        deny = [x for x in log_text.splitlines() if "deny (EIO)" in x]
        assert 1 <= len(deny) <= 40, len(deny)
        assert "rate limit: more messages like this are suppressed" in log_text
        assert daemon_metrics(cache)["erofs_nydus_log_suppressed_total"] >= 1900
    finally:
        run_cli("umount", str(mp))


def test_cache_dir_under_a_directory_others_control_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could move our dir away and put theirs there
    with pytest.raises(UnsafePathError, match="above it is writable by group or others"):
        private_dir(shared / "cache")
    assert not (shared / "cache").exists()
    shared.chmod(0o1777)  # sticky, like /tmp: only the owner may rename an entry
    assert private_dir(shared / "cache2") == str(shared / "cache2")
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o755)
        os.chown(theirs, NOBODY, NOBODY)
        with pytest.raises(UnsafePathError, match="owned by uid 65534, who could replace"):
            private_dir(theirs / "cache")
        os.symlink(theirs, tmp_path / "link")  # a parent reached through a symlink
        (theirs / "sub").mkdir(mode=0o700)
        with pytest.raises(UnsafePathError, match="owned by uid 65534"):
            private_dir(tmp_path / "link" / "sub")
