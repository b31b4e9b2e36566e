"""What the hot commands import: `mount` and `umount` talking to a running daemon.

A container start waits for `erofs-nydus mount`; most of its time was the interpreter
importing modules the command never used (the builder, the HTTP stack, the daemon
core, every command group).  These tests run the real commands against a real daemon
and list `sys.modules` at exit: no timing, so nothing flaky.
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
#: bootstrap file): the HTTP stack, the on-disk format library, the codecs, the metrics,
#: the daemon core and its event loop, the builder, and the other command groups.
HEAVY = (
    "httpx", "httpcore", "h11", "ssl", "construct", "prometheus_client", "http.server",
    "zstandard", "lz4", "blake3", "anyio", "asyncio", "tomllib", "gzip",
    "erofs_nydus.builder", "erofs_nydus.registry", "erofs_nydus.rafs", "erofs_nydus.layout",
    "erofs_nydus.daemon", "erofs_nydus.fanotify.handler", "erofs_nydus.fscache.protocol",
    "erofs_nydus.service.worker", "erofs_nydus.service.supervisor",
    "erofs_nydus.cli.build", "erofs_nydus.cli.registry", "erofs_nydus.cli.ops",
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
        assert "erofs_nydus.service.client" in mods and "click" in mods  # the hook worked
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
