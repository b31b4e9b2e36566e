"""User errors through the real CLI (issue 11, the CLI slips): one line on stderr, a
non-zero exit that says what kind of problem it was, no traceback, and nothing left
behind (no half-written outputs, no created folders, no daemon files)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from daemon_support import CLI, build_image, fanotify_usable, run_cli

from erofs_nydus.mount import is_mountpoint
from erofs_nydus.service.paths import RunPaths

needs_fanotify = pytest.mark.skipif(
    not fanotify_usable(), reason="needs root and pre-content fanotify (Linux >= 6.14)")


def _cli(*args: str, cwd: Path | None = None,
         prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, *CLI, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, check=False)


def _one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if not ln.startswith("mode: ")]
    assert len(lines) == 1 and lines[0].startswith("erofs-nydus: error: "), proc.stderr
    return lines[0]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"data" * 5000)
    return src


def test_create_json_into_missing_dir_refused_before_writing(tree: Path, tmp_path: Path) -> None:
    boot, blobs = tmp_path / "b", tmp_path / "blobs"
    proc = _cli("create", str(tree), "-B", str(boot), "-D", str(blobs),
                "-J", "/nonexistent/x.json")
    assert "/nonexistent" in _one_line_error(proc, 2)
    assert not boot.exists() and not blobs.exists()


def test_convert_json_into_missing_dir_refused_before_converting(tmp_path: Path) -> None:
    # nothing listens on port 9: refused before any registry is asked
    proc = _cli("convert", "--source", "127.0.0.1:9/a/src:v1", "--target",
                "127.0.0.1:9/a/dst:v1", "--cache-dir", str(tmp_path / "conv"),
                "-J", "/nonexistent/x.json")
    assert "/nonexistent" in _one_line_error(proc, 2)
    assert not (tmp_path / "conv").exists()


def test_trace_output_into_missing_dir_refused(tmp_path: Path) -> None:
    proc = _cli("trace", str(tmp_path), "-o", str(tmp_path / "no" / "trace.json"))
    assert "no such directory" in _one_line_error(proc, 2)
    assert not (tmp_path / "no").exists()


def test_create_bootstrap_in_missing_dir_refused(tree: Path, tmp_path: Path) -> None:
    proc = _cli("create", str(tree), "-B", str(tmp_path / "no" / "dir" / "b"),
                "-D", str(tmp_path / "blobs"))
    assert "no such directory" in _one_line_error(proc, 2)
    assert not (tmp_path / "no").exists() and not (tmp_path / "blobs").exists()
    for opt in ("-D", "--blob-cache-dir"):  # the folder itself may be made, not its parents
        args = {"-D": str(tmp_path / "blobs"), opt: str(tmp_path / "no" / "dir" / "d")}
        proc = _cli("create", str(tree), "-B", str(tmp_path / "b"),
                    *(x for kv in args.items() for x in kv))
        assert "no such directory" in _one_line_error(proc, 2)
        assert not (tmp_path / "no").exists() and not (tmp_path / "b").exists()


def test_check_of_a_missing_relative_path_is_a_missing_file(tmp_path: Path) -> None:
    for arg in ("./missing/boot", "../missing/boot", str(tmp_path / "missing" / "boot")):
        msg = _one_line_error(_cli("check", arg, cwd=tmp_path), 2)
        assert "No such file" in msg and "registry" not in msg, msg


def test_unreadable_bootstrap_is_not_reported_corrupt(tree: Path, tmp_path: Path) -> None:
    assert shutil.which("setpriv"), "setpriv (util-linux) is needed"
    img = build_image(tree, tmp_path / "img")
    os.chown(img.bootstrap, 65534, 65534)
    os.chmod(img.bootstrap, 0)
    nodac = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
    for cmd in ("check", "inspect", "stat"):
        msg = _one_line_error(_cli(cmd, str(img.bootstrap), prefix=nodac), 2)
        assert "Permission denied" in msg, msg
    corrupt = tmp_path / "corrupt.boot"
    corrupt.write_bytes(b"\0" * 8192)
    assert _cli("check", str(corrupt)).returncode not in (0, 2)


def test_partial_daemon_reply_is_a_clean_error(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(RunPaths.of(cache).socket)
    listener.listen(8)
    listener.settimeout(60)

    def serve() -> None:  # a daemon that dies halfway through every reply
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(b'{"ok": true, "pi')

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        proc = _cli("umount", str(tmp_path / "mnt"), "--cache-dir", str(cache))
    finally:
        listener.close()
        t.join(10)
    assert "partial" in _one_line_error(proc, 1)


def test_cache_commands_refuse_a_missing_cache_dir(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    for cmd in ("gc", "ls", "du"):
        msg = _one_line_error(_cli("cache", cmd, "--cache-dir", str(missing)), 2)
        assert "no such cache dir" in msg, msg
    assert not missing.exists()


@needs_fanotify
def test_failed_mount_leaves_no_daemon_files(tree: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    bad = tmp_path / "bad.boot"
    bad.write_bytes(os.urandom(8192))
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    fresh = tmp_path / "fresh-cache"
    proc = _cli("mount", str(bad), str(mp), "--blob-dir", str(blobs), "--cache-dir", str(fresh))
    _one_line_error(proc, 3)
    assert not fresh.exists(), os.listdir(fresh)
    used = tmp_path / "used-cache"  # a cache dir with other content keeps only that
    used.mkdir()
    (used / "keep").write_text("x")
    proc = _cli("mount", str(bad), str(mp), "--blob-dir", str(blobs), "--cache-dir", str(used))
    _one_line_error(proc, 3)
    assert os.listdir(used) == ["keep"]
    assert not is_mountpoint(mp)


@needs_fanotify
def test_busy_umount_names_what_to_do(tree: Path, tmp_path: Path) -> None:
    img = build_image(tree, tmp_path / "img")
    mp, cache = tmp_path / "mnt", tmp_path / "cache"
    mp.mkdir()
    run_cli("mount", str(img.bootstrap), str(mp), "--blob-dir", str(img.blob_dir),
            "--cache-dir", str(cache))
    try:
        with open(mp / "d" / "f", "rb") as f:
            assert f.read(4) == b"data"
            proc = _cli("umount", str(mp), "--cache-dir", str(cache))
            msg = _one_line_error(proc, 1)
            assert "busy" in msg and "close" in msg and "lazy=True" not in msg, msg
            assert is_mountpoint(mp)
    finally:
        run_cli("umount", str(mp), "--cache-dir", str(cache))
    assert not is_mountpoint(mp)



def test_every_command_is_in_the_lazy_command_map() -> None:
    """`erofs_nydus.cli` imports a command's module only when the command runs: each
    command a module registers must be named in COMMANDS, or it could not be found."""
    import erofs_nydus.cli as cli

    cli.load_commands()
    assert set(cli.main.commands) == set(cli.COMMANDS)
    for name, module in cli.COMMANDS.items():
        assert cli.main.commands[name].callback.__module__ == f"erofs_nydus.cli.{module}", name
    proc = _cli("--help")
    assert proc.returncode == 0 and all(name in proc.stdout for name in cli.COMMANDS)


class _StoppingDaemon:
    """A DaemonClient stand-in: the first request meets a daemon that is stopping."""

    def __init__(self, first: Exception) -> None:
        self.first: Exception | None = first
        self.calls: list[str] = []
        self.running = 3  # supervisor_running() answers True this many times

    def ensure_running(self) -> bool:
        self.calls.append("ensure_running")
        return False

    def supervisor_running(self) -> bool:
        self.running -= 1
        return self.running > 0

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        self.calls.append(op)
        if self.first is not None:
            exc, self.first = self.first, None
            raise exc
        return {"fsid": "f", **args}

    def shutdown(self) -> None:
        self.calls.append("shutdown")


@pytest.mark.parametrize("first", ["stopping", "reset"])
def test_request_started_replaces_a_stopping_daemon_once(first: str) -> None:
    """A daemon that stops with its last image between our ping and the `register`
    (it answers DaemonStopping, or its closing listener resets the connection) is
    waited for and the next one asked - once; twice in a row is the caller's error."""
    from erofs_nydus.errors import DaemonStopping
    from erofs_nydus.service.client import DaemonUnreachable, request_started

    exc = (DaemonStopping("stopping") if first == "stopping"
           else DaemonUnreachable("reset by peer"))
    c = _StoppingDaemon(exc)
    info, started = request_started(c, "register", mountpoint="/m")
    assert info == {"fsid": "f", "mountpoint": "/m"} and started is False
    assert c.calls == ["ensure_running", "register", "ensure_running", "register"]
    assert c.running <= 0  # it waited for the stopping supervisor to go first

    def always(op: str, **args: Any) -> dict[str, Any]:
        raise exc

    c = _StoppingDaemon(exc)
    c.request = always  # type: ignore[method-assign]
    with pytest.raises(type(exc)):
        request_started(c, "register", mountpoint="/m", stop_wait=0.1)
