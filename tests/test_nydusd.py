"""`nydusd` (erofs_nydus.service.nydusd): nydusd's argv and HTTP API, serving kernel EROFS
mounts (fanotify mode) the way nydus-snapshotter drives nydusd: dedicated (image in argv),
shared (images by the API), SIGTERM, kill -9 and restart with the same argv, failover calls."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from daemon_support import BuiltImage, build_image, fanotify_usable, kill_daemon, read_or_fail

from erofs_nydus.mount import is_mountpoint, umount
from erofs_nydus.service.client import DaemonClient
from erofs_nydus.service.nydusd import build_info, parse_argv
from erofs_nydus.service.nydusd_config import parse_nydusd_config

NYDUSD = [sys.executable, "-m", "erofs_nydus.service.nydusd"]


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 60.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def api(sock: str | Path, method: str, path: str, body: Any = None,
        conn: UnixHTTPConnection | None = None) -> tuple[int, Any]:
    c = conn or UnixHTTPConnection(str(sock))
    data = None if body is None else json.dumps(body).encode()
    c.request(method, path, body=data, headers={"Content-Type": "application/json"} if data
              else {})
    r = c.getresponse()
    raw = r.read()
    if conn is None:
        c.close()
    return r.status, (json.loads(raw) if raw else None)


def wait_state(sock: Path, state: str = "RUNNING", timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            status, last = api(sock, "GET", "/api/v1/daemon")
            if status == 200 and last["state"] == state:
                return dict(last)
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"nydusd at {sock} not {state}: {last}")


def refused_one_line(argv: list[str]) -> str:
    """Run nydusd with `argv`, which it must refuse: non-zero exit, no traceback, one
    line on stderr (returned)."""
    p = subprocess.run([*NYDUSD, *argv], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0, p.stderr
    assert p.stderr.strip() and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    return p.stderr.strip()


def supervisor_stops(cache: Path, timeout: float = 30) -> bool:
    """Wait up to `timeout` for the cache dir's daemon to stop; whether it did."""
    deadline = time.monotonic() + timeout
    while DaemonClient(cache).supervisor_running() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not DaemonClient(cache).supervisor_running()


def localfs_config(img: BuiltImage, cache: Path) -> dict[str, Any]:
    return {"device": {"backend": {"type": "localfs", "config": {"dir": str(img.blob_dir)}},
                       "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}}},
            "mode": "direct", "digest_validate": False, "iostats_files": False,
            "enable_xattr": True, "fs_prefetch": {"enable": False}}


# -- pure: argv and config ---------------------------------------------------------------


def test_argv_forms_and_ignored_flags() -> None:
    o = parse_argv(["fuse", "--config", "c.json", "--bootstrap", "b", "--mountpoint", "/m",
                    "--apisock", "/s", "--id", "x", "--supervisor", "/sup", "--thread-num", "4",
                    "--log-level", "info", "--log-rotation-size", "100",
                    "--prefetch-files", "/a"])
    assert (o.mode, o.config, o.bootstrap, o.mountpoint, o.apisock, o.id) == \
        ("fuse", "c.json", "b", "/m", "/s", "x")
    assert "--thread-num" in o.ignored
    shared = parse_argv(["fuse", "--mountpoint", "/root", "--apisock", "/s"])
    assert shared.bootstrap is None
    fsc = parse_argv(["singleton", "--fscache", "/d", "--fscache-threads", "2", "--apisock",
                      "/s"])
    assert (fsc.mode, fsc.fscache) == ("singleton", "/d")


def test_bad_argv_is_one_line() -> None:
    assert "--apisock" in refused_one_line(["fuse", "--mountpoint", "/x"])


def test_version_git_commit_matches_api_field() -> None:
    p = subprocess.run([*NYDUSD, "--version"], capture_output=True, text=True, timeout=60,
                       check=True)
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("Git Commit:"))
    assert line.split(":", 1)[1].strip() == build_info()["git_commit"]


def test_registry_config_becomes_backend_spec_without_secrets(tmp_path: Path) -> None:
    import base64

    auth = base64.b64encode(b"alice:wonderland").decode()
    cfg = parse_nydusd_config(json.dumps({"device": {
        "backend": {"type": "registry", "config": {
            "host": "127.0.0.1:5000", "repo": "lib/app", "scheme": "http", "auth": auth,
            "skip_verify": True, "timeout": 5, "connect_timeout": 5, "retry_limit": 2}},
        "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "cache")}}}}))
    assert cfg.cache_dir == str(tmp_path / "cache")
    spec = cfg.backend
    assert spec["type"] == "registry" and spec["repo"] == "127.0.0.1:5000/lib/app"
    assert spec["plain_http"] is True and spec["verify"] is False and spec["retries"] == 2
    assert auth not in json.dumps(spec) and "wonderland" not in json.dumps(spec)
    cfg.write_credentials()
    conf = Path(spec["docker_config"]) / "config.json"
    assert json.loads(conf.read_text())["auths"]["127.0.0.1:5000"]["auth"] == auth
    assert conf.stat().st_mode & 0o777 == 0o600
    from erofs_nydus.registry.auth import load_docker_credentials

    creds = load_docker_credentials("127.0.0.1:5000", config_path=spec["docker_config"])
    assert creds is not None and (creds.username, creds.password) == ("alice", "wonderland")


def test_localfs_and_v2_config_shapes(tmp_path: Path) -> None:
    cfg = parse_nydusd_config({"device": {
        "backend": {"type": "localfs", "config": {"dir": "blobs"}},
        "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "c")}}}})
    assert cfg.backend == {"type": "local", "dir": os.path.abspath("blobs")}
    # the v2 shape (backend and cache at the top level, as fscache configs are)
    v2 = parse_nydusd_config({"type": "bootstrap", "id": "x", "backend": {
        "type": "registry", "registry": {"host": "reg.example", "repo": "a/b"}},
        "cache": {"type": "fscache", "fscache": {"work_dir": str(tmp_path / "f")}}})
    assert v2.cache_dir == str(tmp_path / "f")
    assert v2.backend["repo"] == "reg.example/a/b" and v2.backend["plain_http"] == "loopback"
    assert "docker_config" not in v2.backend
    v2.write_credentials()  # nothing to write without auth
    assert not (tmp_path / "f").exists()


def _registry(config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    return parse_nydusd_config({"device": {
        "backend": {"type": "registry", "config": {"host": "127.0.0.1:5000", "repo": "a/b",
                                                   **config}},
        "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "c")}}}}).backend


def test_registry_mirrors_and_proxy_become_the_specs_routes(tmp_path: Path) -> None:
    """backend.config.mirrors / proxy as nydusd documents them: every key mapped, 0 or
    empty means nydusd's default, unknown keys ignored; the daemon's backend takes them."""
    spec = _registry({
        "mirrors": [
            {"host": "http://127.0.0.1:65001", "headers": {"X-Dragonfly-Registry": "http://r"},
             "ping_url": "http://127.0.0.1:40901/server/ping", "health_check_interval": 7,
             "failure_limit": 3, "auth_through": False, "something_new": 1},
            {"host": "http://127.0.0.1:65002", "health_check_interval": 0, "ping_url": ""},
        ],
        "proxy": {"url": "http://127.0.0.1:65003", "ping_url": "http://127.0.0.1:40902/ping",
                  "fallback": False, "check_interval": 2, "use_http": True},
    }, tmp_path)
    assert spec["mirrors"] == [
        {"host": "http://127.0.0.1:65001", "headers": {"X-Dragonfly-Registry": "http://r"},
         "health_check_interval": 7, "failure_limit": 3,
         "ping_url": "http://127.0.0.1:40901/server/ping", "auth_through": False},
        {"host": "http://127.0.0.1:65002", "headers": {}, "health_check_interval": 5,
         "failure_limit": 5, "ping_url": "", "auth_through": False},
    ]
    assert spec["proxy"] == {"url": "http://127.0.0.1:65003",
                             "ping_url": "http://127.0.0.1:40902/ping", "fallback": False,
                             "check_interval": 2, "use_http": True}
    from erofs_nydus.registry.backend import RegistryBackend

    be = RegistryBackend.from_spec(spec)
    try:
        assert be.spec()["mirrors"] == spec["mirrors"] and be.spec()["proxy"] == spec["proxy"]
        assert len(be.router.mirror_settings) == 2 and be.router.proxy_settings is not None
    finally:
        be.close()
    # nydusd defaults: fallback on, check every 5 s; a proxy without a url is no proxy
    assert _registry({"proxy": {"url": "http://127.0.0.1:1"}}, tmp_path)["proxy"] == {
        "url": "http://127.0.0.1:1", "ping_url": "", "fallback": True, "check_interval": 5,
        "use_http": False}
    bare = _registry({"proxy": {"url": ""}, "mirrors": []}, tmp_path)
    assert "proxy" not in bare and "mirrors" not in bare


@pytest.mark.parametrize("routes", [
    {"mirrors": {"host": "http://m"}},
    {"mirrors": [{"host": "m:5000"}]},
    {"mirrors": ["ftp://m"]},
    {"mirrors": [{"host": "http://m", "failure_limit": 1000}]},
    {"mirrors": [{"host": "http://m", "headers": {"X": 1}}]},
    {"proxy": {"url": "p:65001"}},
    {"proxy": {"url": "http://p", "fallback": "yes"}},
    {"proxy": "http://p"},
])
def test_bad_mirrors_or_proxy_is_one_line(routes: dict[str, Any], tmp_path: Path) -> None:
    from erofs_nydus.errors import UsageError

    with pytest.raises(UsageError, match=r"^nydusd config: backend") as info:
        _registry(routes, tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [
    "{", "[]", '{"device": {"backend": {"type": "oss"}, "cache": {"config": {"work_dir": "/c"}}}}',
    '{"device": {"backend": {"type": "registry", "config": {"host": "h"}},'
    ' "cache": {"config": {"work_dir": "/c"}}}}',
    '{"device": {"backend": {"type": "registry", "config": {"host": "h", "repo": "r",'
    ' "auth": "!!"}}, "cache": {"config": {"work_dir": "/c"}}}}',
])
def test_bad_config_is_a_usage_error(bad: str) -> None:
    from erofs_nydus.errors import UsageError

    with pytest.raises(UsageError):
        parse_nydusd_config(bad)


# -- real mounts --------------------------------------------------------------------------

kernel = pytest.mark.skipif(not fanotify_usable(),
                            reason="needs root and pre-content fanotify (Linux >= 6.14)")


class Nydusd:
    def __init__(self, base: Path, argv: list[str]) -> None:
        self.base = base
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = base / "nydusd.log"

    def start(self) -> Nydusd:
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([*NYDUSD, *self.argv], stdout=logf, stderr=logf)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(60)


@dataclass
class Rig:
    """One scenario's image (built from `src`) and, under `base`, its cache dir, empty
    mountpoint, API socket path and localfs config file; the nydusd processes started
    here are killed at teardown, with the mounts and the daemon they leave."""

    base: Path
    img: BuiltImage
    src: Path
    procs: list[Nydusd] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cache, self.mnt = self.base / "cache", self.base / "mnt"
        self.sock, self.config = self.base / "api.sock", self.base / "config.json"
        self.mnt.mkdir()
        self.config.write_text(json.dumps(localfs_config(self.img, self.cache)))

    def argv(self, *extra: str, sock: Path | None = None,
             bootstrap: Path | None = None) -> list[str]:
        """Dedicated mode, the way the snapshotter starts it: the image in argv."""
        return ["fuse", "--config", str(self.config),
                "--bootstrap", str(bootstrap or self.img.bootstrap),
                "--mountpoint", str(self.mnt), "--apisock", str(sock or self.sock), *extra]

    def start(self, argv: list[str]) -> Nydusd:
        d = Nydusd(self.base, argv).start()
        self.procs.append(d)
        return d

    def serve(self, argv: list[str]) -> Nydusd:
        """Start nydusd and wait until its API says RUNNING."""
        d = self.start(argv)
        wait_state(self.sock)
        return d

    def close(self) -> None:
        for p in self.procs:
            if p.proc is not None and p.proc.poll() is None:
                p.stop(signal.SIGKILL)
        for line in Path("/proc/mounts").read_text().splitlines():
            mp = line.split()[1]
            if mp.startswith(str(self.base)):
                umount(mp, lazy=True)
        kill_daemon(DaemonClient(self.cache))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "greeting").write_text("hello from nydusd\n")
    (src / "big").write_bytes(os.urandom(3 << 20))
    (src / "other").write_bytes(os.urandom(1 << 20))
    r = Rig(tmp_path, build_image(src, tmp_path / "img"), src)
    try:
        yield r
    finally:
        r.close()


@kernel
def test_dedicated_mount_api_and_sigterm(rig: Rig) -> None:
    cache, mnt, sock = rig.cache, rig.mnt, rig.sock
    d = rig.start(rig.argv("--thread-num", "2", "--log-level", "info"))
    # One idle keep-alive connection, as the snapshotter holds it, stays usable.
    conn = UnixHTTPConnection(str(sock))
    info = wait_state(sock)
    assert info["version"]["git_commit"] == build_info()["git_commit"]
    assert (mnt / "etc" / "greeting").read_text() == "hello from nydusd\n"
    assert (mnt / "big").read_bytes() == (rig.src / "big").read_bytes()
    for _ in range(3):
        status, body = api(sock, "GET", "/api/v1/daemon", conn=conn)
        assert status == 200 and body["state"] == "RUNNING"
    # every descriptor nydusd holds (listener, kept connection, lock, log) is close-on-exec
    assert d.proc is not None
    for fd in os.listdir(f"/proc/{d.proc.pid}/fd"):
        if int(fd) > 2:
            flags = Path(f"/proc/{d.proc.pid}/fdinfo/{fd}").read_text().split("flags:")[1]
            assert int(flags.split()[0], 8) & 0o2000000, f"fd {fd} is inherited by children"
    status, m = api(sock, "GET", "/api/v1/metrics", conn=conn)
    assert status == 200 and m["data_read"] > 0
    status, cm = api(sock, "GET", "/api/v1/metrics/blobcache", conn=conn)
    assert status == 200 and all(f.endswith(".blob.data") for f in cm["underlying_files"])
    assert api(sock, "GET", "/api/v1/metrics/inflight", conn=conn)[0] == 200
    assert api(sock, "PUT", "/api/v1/daemon/fuse/sendfd", conn=conn)[0] == 204
    status, err = api(sock, "GET", "/api/v1/bogus", conn=conn)
    assert status == 404 and set(err) == {"code", "message"}
    status, err = api(sock, "PUT", "/api/v2/blobs", body={}, conn=conn)
    assert status == 400 and "fscache mode" in err["message"]  # blob entries: singleton only
    assert d.stop(signal.SIGTERM) == 0
    # SIGTERM: unmounted, and the cache dir's daemon stopped with its last mount.
    assert not is_mountpoint(mnt)
    assert not os.path.exists(sock)
    # the kept connection saw the hang-up
    try:
        api(sock, "GET", "/api/v1/daemon", conn=conn)
        raise AssertionError("connection still answered after exit")
    except (OSError, http.client.HTTPException):
        pass
    assert supervisor_stops(cache)


@kernel
def test_apisock_dir_is_private(rig: Rig) -> None:
    # a socket dir anyone may write to: someone could swap the socket; refused, one line
    (rig.base / "open").mkdir(mode=0o777)
    (rig.base / "open").chmod(0o777)
    line = refused_one_line([*rig.argv(sock=rig.base / "open" / "api.sock"), "--log-file",
                             str(rig.base / "refused.log")])
    assert "socket dir" in line
    assert not is_mountpoint(rig.mnt)
    # a missing one is made private (0700), like the control API's
    sock = rig.base / "run" / "nydusd" / "api.sock"
    d = rig.start(rig.argv(sock=sock))
    wait_state(sock)
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert d.stop(signal.SIGTERM) == 0
    assert not sock.exists() and not is_mountpoint(rig.mnt)


@kernel
def test_kill9_and_restart_adopts_the_mount(rig: Rig) -> None:
    mnt, src = rig.mnt, rig.src
    d = rig.serve(rig.argv())
    assert (mnt / "etc" / "greeting").read_text() == "hello from nydusd\n"
    held = open(mnt / "etc" / "greeting")  # noqa: SIM115  (a container's open file)
    d.stop(signal.SIGKILL)
    # The mount is still served: a file never read before comes back with the right bytes.
    assert (mnt / "other").read_bytes() == (src / "other").read_bytes()
    d2 = rig.serve(rig.argv())  # the snapshotter's restart policy: same argv
    assert is_mountpoint(mnt)
    assert (mnt / "big").read_bytes() == (src / "big").read_bytes()
    assert held.read() == "hello from nydusd\n"
    held.close()
    assert d2.stop() == 0
    assert not is_mountpoint(mnt)
    # the adopted image was cleaned up like one mounted by this process
    supervisor_stops(rig.cache)
    assert not list(rig.cache.glob("*.boot"))


@kernel
def test_shared_mode_mounts_by_api_and_failover_calls(rig: Rig) -> None:
    img, src, sock = rig.img, rig.src, rig.sock
    root = rig.base / "root"
    root.mkdir()
    argv = ["fuse", "--mountpoint", str(root), "--apisock", str(sock), "--id", "shared_daemon"]
    d = rig.start(argv)
    assert wait_state(sock)["id"] == "shared_daemon"
    cfg = json.dumps(localfs_config(img, rig.cache))
    body = {"fs_type": "rafs", "source": str(img.bootstrap), "config": cfg}
    for sid in ("1", "2"):
        status, err = api(sock, "POST", f"/api/v1/mount?mountpoint=/{sid}/fs", body=body)
        assert status == 204, err
    assert (root / "1" / "fs" / "etc" / "greeting").read_text() == "hello from nydusd\n"
    assert (root / "2" / "fs" / "big").read_bytes() == (src / "big").read_bytes()
    status, err = api(sock, "POST", "/api/v1/mount?mountpoint=/1/fs", body=body)
    assert status == 409 and err["code"] == "AlreadyExists"
    status, err = api(sock, "POST", "/api/v1/mount?mountpoint=/3/fs",
                      body={**body, "source": str(rig.base / "missing.boot")})
    assert status >= 400 and err["message"]
    assert not is_mountpoint(root / "3" / "fs")
    # restart policy: killed, restarted with the same argv, every mount re-POSTed: adopted
    d.stop(signal.SIGKILL)
    d2 = rig.serve(argv)
    for sid in ("1", "2"):
        assert api(sock, "POST", f"/api/v1/mount?mountpoint=/{sid}/fs", body=body)[0] == 204
    assert (root / "1" / "fs" / "other").read_bytes() == (src / "other").read_bytes()
    assert api(sock, "DELETE", "/api/v1/mount?mountpoint=/1/fs")[0] == 204
    assert not is_mountpoint(root / "1" / "fs")
    assert not (root / "1").exists()  # like nydusd's pseudo fs: the directories went too
    assert api(sock, "DELETE", "/api/v1/mount?mountpoint=/1/fs")[0] == 404
    # failover calls answer at once
    assert api(sock, "PUT", "/api/v1/daemon/fuse/sendfd")[0] == 204
    assert api(sock, "PUT", "/api/v1/daemon/fuse/takeover")[0] == 204
    assert api(sock, "PUT", "/api/v1/daemon/start")[0] == 204
    assert d2.stop() == 0
    assert not is_mountpoint(root / "2" / "fs")
    assert list(root.iterdir()) == []


def wait_new_supervisor(cache: Path, old: int, timeout: float = 60) -> int:
    """The pid of the supervisor that replaced `old` (the keeper writes it to the lock)."""
    client = DaemonClient(cache)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = client.supervisor_pid()
        if pid and pid != old and client.supervisor_running():
            return pid
        time.sleep(0.1)
    raise AssertionError(f"no supervisor replaced {old} for {cache}")


def kill_daemon_group(cache: Path) -> None:
    """kill -9 of every process of the cache dir's daemon at once (keeper, supervisor,
    worker: one process group), as `systemctl kill -s KILL` or a cgroup OOM kill does."""
    pid = DaemonClient(cache).supervisor_pid()
    assert pid
    os.killpg(os.getpgid(pid), signal.SIGKILL)




@kernel
def test_supervisor_death_the_keeper_repairs_is_not_nydusds_death(rig: Rig) -> None:
    """kill -9 of the supervisor alone (what the OOM killer would pick first if it could)
    is repaired by the keeper, which holds the fanotify group meanwhile: the mount keeps
    serving right bytes, so nydusd must not exit - the snapshotter's recovery would
    restart it and replace a mount that works (and containers running on it).
    nydus-snapshotter takes a hang-up of nydusd's API socket as its death."""
    cache, mnt, src = rig.cache, rig.mnt, rig.src
    d = rig.serve(rig.argv())
    assert read_or_fail(mnt / "etc" / "greeting") == (src / "etc" / "greeting").read_bytes()
    old = DaemonClient(cache).supervisor_pid()
    assert old
    os.kill(old, signal.SIGKILL)
    wait_new_supervisor(cache, old)
    # never read before: served through the new supervisor and its daemon
    assert read_or_fail(mnt / "big") == (src / "big").read_bytes()
    assert d.proc is not None and d.proc.poll() is None
    assert wait_state(rig.sock)["state"] == "RUNNING"
    assert is_mountpoint(mnt)
    assert d.stop() == 0  # SIGTERM still unmounts and exits
    assert not is_mountpoint(mnt)


@kernel
def test_death_of_the_whole_daemon_ends_nydusd(rig: Rig) -> None:
    """When nothing is left to serve the kernel (keeper, supervisor and daemon killed
    together), the process the snapshotter watches dies too, taking its mount along,
    and a restart with the same argv (the snapshotter's recovery) serves the image."""
    d = rig.serve(rig.argv())
    kill_daemon_group(rig.cache)
    assert d.proc is not None
    assert d.proc.wait(60) != 0
    assert not is_mountpoint(rig.mnt)  # never a mount whose holes read as zeros
    d2 = rig.serve(rig.argv())
    assert read_or_fail(rig.mnt / "big") == (rig.src / "big").read_bytes()
    assert d2.stop() == 0


@kernel
def test_restart_after_the_mount_was_removed_mounts_again(rig: Rig) -> None:
    """The snapshotter's failover unmounts nydusd's mountpoint when it can; the daemon still
    has the image registered there: the restarted nydusd mounts it again."""
    d = rig.serve(rig.argv())
    d.stop(signal.SIGKILL)
    umount(rig.mnt)
    d2 = rig.serve(rig.argv())
    assert (rig.mnt / "big").read_bytes() == (rig.src / "big").read_bytes()
    assert d2.stop() == 0
    assert not is_mountpoint(rig.mnt)
    # registered once: the daemon stopped with that unmount
    assert supervisor_stops(rig.cache)


@kernel
def test_bad_bootstrap_is_one_line_and_leaves_no_daemon(rig: Rig) -> None:
    bad = rig.base / "bad.boot"
    bad.write_bytes(b"not an image" * 1000)
    line = refused_one_line(rig.argv("--log-file", str(rig.base / "nydusd.log"), bootstrap=bad))
    assert line in (rig.base / "nydusd.log").read_text()
    assert not is_mountpoint(rig.mnt) and not rig.sock.exists()
    assert supervisor_stops(rig.cache)
