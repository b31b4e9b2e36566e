"""What the hot commands import: `mount` and `umount` talking to a running daemon.

A container start waits for `erofs-nydus mount`; most of its time was the interpreter
importing modules the command never used (the builder, the HTTP stack, the daemon
core, every command group, click).  These tests run the real commands against a real
daemon and list `sys.modules` at exit: no timing, so nothing flaky.  The lean entry
(`cli.fast`) must decide every invocation as click does: the same output, errors and
exit codes, click's own wording for what it declines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_support import BuiltImage, build_image, fanotify_usable

from erofs_nydus.mount import is_mountpoint, umount
from erofs_nydus.service.client import DaemonClient

pytestmark = pytest.mark.kernel

if not fanotify_usable():
    pytest.skip("needs root and pre-content fanotify (Linux >= 6.14)", allow_module_level=True)

# Run the CLI as the console script does; at exit write the modules in sys.modules
# (everything, also what importlib.import_module loaded, which -X importtime misses;
# not the names `as_program` marks absent).
_HOOKED_CLI = """\
import atexit, json, os, sys
def _dump():
    with open(os.environ["MODULES_OUT"], "w") as f:
        json.dump(sorted(k for k, v in sys.modules.items() if v is not None), f)
atexit.register(_dump)
from erofs_nydus.cli import run
run()
"""

#: Never on the path of `mount`/`umount` to a running daemon (fanotify mode, a
#: bootstrap file): click, the HTTP stack, the on-disk format library, the codecs, the
#: metrics, the daemon core and its event loop, the builder, the other command groups,
#: and what only they need (dataclasses' inspect, platform).
HEAVY = (
    "click", "inspect", "dataclasses", "platform",
    "httpx", "httpcore", "h11", "ssl", "construct", "prometheus_client", "http.server",
    "zstandard", "lz4", "blake3", "anyio", "asyncio", "tomllib", "gzip",
    "erofs_nydus.builder", "erofs_nydus.registry", "erofs_nydus.rafs", "erofs_nydus.layout",
    "erofs_nydus.daemon", "erofs_nydus.fanotify.handler", "erofs_nydus.fscache.protocol",
    "erofs_nydus.service.worker", "erofs_nydus.service.supervisor",
    "erofs_nydus.cli.build", "erofs_nydus.cli.registry", "erofs_nydus.cli.ops",
    "erofs_nydus.cli.runtime", "erofs_nydus.cli.group", "erofs_nydus.cli.options",
)  # fmt: skip


def _modules(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    out = tmp / f"modules-{args[0]}.json"
    env = {**os.environ, "MODULES_OUT": str(out)}
    env.pop("EROFS_NYDUS_CONFIG", None)
    proc = subprocess.run([sys.executable, "-c", _HOOKED_CLI, *args], capture_output=True,
                          text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, set(json.loads(out.read_text()))


def _heavy(mods: set[str]) -> set[str]:
    return {m for m in mods if any(m == h or m.startswith(h + ".") for h in HEAVY)}


@pytest.fixture
def image(tmp_path: Path) -> BuiltImage:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(4):
        (src / "d" / f"f{i}").write_bytes(os.urandom(50_000))
    return build_image(src, tmp_path / "img")


def test_mount_and_umount_to_a_running_daemon_stay_light(image: BuiltImage,
                                                         tmp_path: Path) -> None:
    cache, mp = tmp_path / "cache", tmp_path / "mnt"
    mp.mkdir()
    client = DaemonClient(cache)
    assert client.ensure_running()  # the daemon is up before the commands run
    try:
        proc, mods = _modules(tmp_path, "mount", str(image.bootstrap), str(mp), "--blob-dir",
                              str(image.blob_dir), "--cache-dir", str(cache))
        assert "mounted" in proc.stdout and is_mountpoint(mp)
        assert "erofs_nydus.service.client" in mods  # the hook worked
        assert _heavy(mods) == set()
        assert (mp / "d" / "f0").stat().st_size == 50_000
        proc, mods = _modules(tmp_path, "umount", str(mp))
        assert "unmounted" in proc.stdout and not is_mountpoint(mp)
        assert "erofs_nydus.service.client" in mods
        assert _heavy(mods) == set()
    finally:
        if is_mountpoint(mp):
            umount(mp, lazy=True)
        if client.alive():
            client.request("detach", mountpoint=str(mp))
            client.shutdown()


def test_daemon_modules_load_the_api_stack_at_first_use() -> None:
    """The daemon's own modules (both modes' shell, worker and control API) import no
    HTTP client or server stack and no metrics library until a request needs one: a
    `mount` that starts a daemon waits for that start."""
    code = (
        "import sys\n"
        "import erofs_nydus.service.supervisor, erofs_nydus.service.worker\n"
        "import erofs_nydus.service.fscache_daemon, erofs_nydus.service.api\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    mods = set(proc.stdout.split())
    assert "erofs_nydus.service.metrics" in mods and "erofs_nydus.service.unixhttp" in mods
    late = {"prometheus_client", "http.server", "http.client", "ssl", "httpx", "httpcore"}
    assert {m for m in mods if m.split(".")[0] in late or m in late} == set()


# The same argv through the lean entry (`run`) and through click alone; each prints
# whether click was imported, after the command's own output.
_VIA_RUN = """\
import atexit, sys
atexit.register(lambda: sys.stderr.write("[click %s]" % ("click" in sys.modules)))
from erofs_nydus.cli import run
run()
"""
_VIA_CLICK = """\
import atexit, sys
atexit.register(lambda: sys.stderr.write("[click %s]" % ("click" in sys.modules)))
from erofs_nydus import as_program
from erofs_nydus.cli.group import main
as_program()
main()
"""


def _both(tmp: Path, *args: str, env: dict[str, str] | None = None) -> tuple[
        subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    run_env = {**os.environ, **(env or {})}
    run_env.pop("EROFS_NYDUS_CONFIG", None) if not env else None
    out = []
    for code in (_VIA_RUN, _VIA_CLICK):
        out.append(subprocess.run([sys.executable, "-c", code, *args], capture_output=True,
                                  text=True, timeout=120, env=run_env, cwd=tmp, check=False))
    return out[0], out[1]


def test_lean_entry_decides_as_click(image: BuiltImage, tmp_path: Path) -> None:
    """User errors of `mount`/`umount`, through the lean entry and through click: the
    same stdout, stderr and exit code.  Those the lean entry can parse run without
    click; the rest (click's own usage errors, help, rarer options) are click's."""
    boot, blobs = str(image.bootstrap), str(image.blob_dir)
    mp = tmp_path / "mnt"
    mp.mkdir()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cache = str(tmp_path / "cache")
    conf = tmp_path / "c.toml"
    conf.write_text(f'[daemon]\ncache_dir = "{cache}"\nmode = "fscache"\n')
    bad_conf = tmp_path / "bad.toml"
    bad_conf.write_text("[daemon]\nnope = 1\n")
    lean = [  # (argv, env) the lean entry runs itself
        (["mount", boot, str(mp)], None),
        (["mount", boot, str(mp), "--cache-dir", cache], None),
        (["mount", boot, str(mp), f"--cache-dir={cache}", "--blob-dir", blobs,
          "--domain-id", "d"], None),
        (["mount", boot, str(mp), "--cache-dir", cache, "--blob-dir", blobs,
          "--buffered-cache"], None),
        (["mount", "no/such:file:@", str(mp), "--cache-dir", cache], None),
        (["mount", boot, str(mp), "--blob-dir", blobs, "--config", str(conf)], None),
        (["mount", boot, str(mp), "--blob-dir", blobs, "--config", str(bad_conf)], None),
        (["mount", boot, str(mp), "--blob-dir", blobs, "--config", str(tmp_path / "none")],
         None),
        (["mount", boot, str(mp), "--blob-dir", blobs], {"EROFS_NYDUS_CONFIG": str(conf)}),
        (["mount", "--mode", "fanotify", "--amplify", "0", "--read-deadline", "1.5",
          "--no-prefetch", "--retries", "2", "--prefetch-threads", "3", "--plain-http",
          "--platform", "linux/arm64", "--allow-suid-dev", boot, str(mp), "--blob-dir",
          blobs, "--cache-dir", str(tmp_path), "--domain-id=x"], None),
        (["umount", str(mp)], None),
        (["umount", str(tmp_path / "nothing"), "--cache-dir", cache], None),
    ]
    declined = [  # click's own errors and help
        ["mount", boot, str(tmp_path / "missing"), "--cache-dir", cache],
        ["mount", boot, str(a_file), "--cache-dir", cache],
        ["mount", boot, str(mp), "--cache-dir", str(a_file)],
        ["mount", boot, str(mp), "--cache-dir", cache, "--mode", "FANOTIFY"],
        ["mount", boot, str(mp), "--cache-dir", cache, "--amplify", "-1"],
        ["mount", boot, str(mp), "--cache-dir", cache, "--amplify", "1k"],
        ["mount", boot, str(mp), "--cache-dir", cache, "--read-deadline", "0"],
        ["mount", boot, str(mp), "--cache-dir", cache, "--retries", "101"],
        ["mount", boot, str(mp), "--cache-dir", cache, "--plain-http=yes"],
        ["mount", boot, str(mp), "--cache-dir", cache, "--blob-dir", str(a_file)],
        ["mount", boot, str(mp), "--cache-dir", cache, "--mirror", "ftp://x"],
        ["mount", boot, str(mp), "--cache-dir"],
        ["mount", boot, str(mp), "--cache", cache],
        ["mount", boot],
        ["mount", boot, str(mp), "extra"],
        ["mount", "--help"],
        ["umount"],
        ["umount", "-h"],
        ["umount", str(mp), "--cache-dir", str(a_file)],
    ]
    for argv, env in [*lean, *((d, None) for d in declined)]:
        fast, slow = _both(tmp_path, *argv, env=env)
        assert slow.stderr.endswith("[click True]"), (argv, slow.stderr)
        want_click = "True" if argv in declined else "False"
        assert fast.stderr.endswith(f"[click {want_click}]"), (argv, fast.stderr)
        assert (fast.returncode, fast.stdout, fast.stderr.rsplit("[click", 1)[0]) == (
            slow.returncode, slow.stdout, slow.stderr.rsplit("[click", 1)[0]), argv
        assert not is_mountpoint(mp)


def test_mount_ref_falls_back_to_resolve_then_register_on_an_older_daemon(
        tmp_path: Path) -> None:
    """`mount REF` sends one `register_ref`; a daemon from before it answers "unknown
    request" and then gets the two requests it knows.  The old daemon is a stand-in on
    the control socket (fault injection: no real daemon of an older version here)."""
    import socket
    import threading

    from erofs_nydus.cli.mounting import mount_image
    from erofs_nydus.errors import DaemonError
    from erofs_nydus.service.paths import RunPaths

    cache, mp = tmp_path / "cache", tmp_path / "mnt"
    cache.mkdir(mode=0o700)
    mp.mkdir()
    ops: list[dict[str, object]] = []
    answers = {
        "ping": {"ok": True, "pid": os.getpid(), "mounts": [], "resident": True},
        "register_ref": {"ok": False, "error": "unknown request 'register_ref'",
                         "type": "DaemonError"},
        "resolve": {"ok": True, "bootstrap": str(tmp_path / "x.boot"),
                    "backend": {"type": "registry", "host": "127.0.0.1:1", "repo": "r"}},
        "register": {"ok": False, "error": "stand-in stops here", "type": "DaemonError"},
    }
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(RunPaths.of(cache).socket)
    srv.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as f:
                req = json.loads(f.readline())
                ops.append(req)
                conn.sendall(json.dumps(answers[str(req["op"])]).encode() + b"\n")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(DaemonError, match="stand-in stops here"):
            mount_image("127.0.0.1:1/r:v1", str(mp), None, str(cache), "fanotify", 0, False,
                        None, 30.0)
    finally:
        srv.close()
    names = [o["op"] for o in ops]
    assert names[names.index("register_ref"):] == ["register_ref", "resolve", "register"]
    reg = ops[-1]
    assert reg["bootstrap"] == str(tmp_path / "x.boot") and reg["mountpoint"] == str(mp)
    assert reg["backend"]["retries"] == 3  # type: ignore[index]  # the config's, added here
