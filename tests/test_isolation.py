"""The root daemon runs isolated from whoever starts it (issue 11 item 3, invariant (c)).

Threat: a local user who can write the directory root runs `erofs-nydus mount` from, or
whose variables reach root's environment (``sudo -E``), must not get code run in the
daemon (uid 0) nor settings that a later caller's mounts would inherit.  Each test
starts a real daemon from a caller that imported erofs_nydus from this tree, with
plants around it, and looks at the running daemon through /proc.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from daemon_support import fanotify_usable

import erofs_nydus
from erofs_nydus.service.client import DAEMON_ENV

pytestmark = pytest.mark.kernel

if not fanotify_usable():
    pytest.skip("needs root and pre-content fanotify (Linux >= 6.14)", allow_module_level=True)

TREE = str(Path(erofs_nydus.__file__).resolve().parent.parent)

# The caller: an isolated interpreter that imports erofs_nydus from this tree, then
# moves into the planted directory and takes on the planted environment, as a root
# shell would have them, and starts the cache dir's daemon.
CALLER = textwrap.dedent("""\
    import json, os, sys
    sys.path.insert(0, {tree!r})
    from erofs_nydus.service.client import DaemonClient
    os.chdir({cwd!r})
    os.environ.update({env!r})
    c = DaemonClient({cache!r})
    try:
        c.ensure_running()
        print(json.dumps({{"pid": c.supervisor_pid()}}), flush=True)
        sys.stdin.read()  # the test looks at the daemon meanwhile
    finally:
        c.shutdown()
""")


def _plant(module_dir: Path, name: str, marker: Path) -> None:
    """A module that records being imported (pid) and then breaks the import."""
    module_dir.mkdir(parents=True, exist_ok=True)
    (module_dir / name).write_text(
        f"import os\nwith open({str(marker)!r}, 'a') as f:\n"
        "    f.write(f'{os.getpid()}\\n')\n"
        "raise ImportError('planted module imported')\n"
    )


class Started:
    """A daemon started by a caller that runs in ``cwd`` with ``env`` added."""

    def __init__(self, tmp: Path, cwd: Path, env: dict[str, str]) -> None:
        cwd.mkdir(exist_ok=True)
        self.cache = tmp / "cache"
        code = CALLER.format(tree=TREE, cwd=str(cwd), env=env, cache=str(self.cache))
        self.err = ""
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.communicate("", timeout=60)
            log = (self.cache / "daemon.log").read_text() if self.cache.exists() else ""
            raise AssertionError(f"daemon did not start:\n{log}")
        self.pid = int(json.loads(line)["pid"])

    def environ(self) -> dict[str, str]:
        raw = Path(f"/proc/{self.pid}/environ").read_bytes()
        return dict(e.split("=", 1) for e in raw.decode().split("\0") if "=" in e)

    def close(self) -> None:
        _out, err = self.proc.communicate("", timeout=60)
        assert self.proc.returncode == 0, err


def test_planted_modules_in_the_callers_cwd_are_not_imported(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    cwd = tmp_path / "plants"  # what `python -c` would import first: the cwd's modules
    _plant(cwd, "selectors.py", marker)
    _plant(cwd / "erofs_nydus", "__init__.py", marker)
    try:
        started = Started(tmp_path, cwd, {})
    finally:
        assert not marker.exists(), f"planted module imported by pid(s) {marker.read_text()}"
    try:
        assert os.readlink(f"/proc/{started.pid}/cwd") == "/"
    finally:
        started.close()
    assert not marker.exists()


def test_pythonpath_and_python_variables_of_the_caller_are_ignored(tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    planted = tmp_path / "pp"
    _plant(planted, "sitecustomize.py", marker)
    _plant(planted, "selectors.py", marker)
    _plant(planted / "erofs_nydus", "__init__.py", marker)
    env = {"PYTHONPATH": str(planted), "PYTHONHOME": str(planted / "home"),
           "PYTHONSTARTUP": str(planted / "selectors.py")}
    started = Started(tmp_path, tmp_path / "empty", env)
    try:
        assert not marker.exists(), f"planted module imported by pid(s) {marker.read_text()}"
        cmdline = Path(f"/proc/{started.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1] == b"-I"
        # the daemon runs this tree's package, the one its caller imported
        maps = Path(f"/proc/{started.pid}/maps").read_text()
        natives = {line.split()[-1] for line in maps.splitlines() if "/_native/" in line}
        assert natives and all(n.startswith(TREE + "/erofs_nydus/_native/") for n in natives)
    finally:
        started.close()


def test_daemon_environment_is_an_allow_list(tmp_path: Path) -> None:
    env = {"DOCKER_CONFIG": str(tmp_path / "docker"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "LD_PRELOAD": "", "SECRET_TOKEN": "s3cret", "EROFS_NYDUS_LOG": "DEBUG",
           "EROFS_NYDUS_UNKNOWN": "1", "LC_ALL": "C.UTF-8", "TZ": "UTC"}
    started = Started(tmp_path, tmp_path / "empty", env)
    try:
        got = started.environ()
    finally:
        started.close()
    allowed = {"PATH", "LANG", "LANGUAGE", "TZ", *DAEMON_ENV}
    assert {k for k in got if not k.startswith("LC_")} <= allowed, got
    assert got["EROFS_NYDUS_LOG"] == "DEBUG" and got["LC_ALL"] == "C.UTF-8"
    assert got["TZ"] == "UTC" and "PATH" in got


def test_spawned_daemon_that_stops_on_its_own_is_reaped(tmp_path: Path) -> None:
    """A daemon that exits by itself (idle) is reaped: no `subprocess ... is still
    running` ResourceWarning when the caller exits."""
    code = textwrap.dedent(f"""\
        import sys, time
        sys.path.insert(0, {TREE!r})
        from erofs_nydus.service.client import DaemonClient
        c = DaemonClient({str(tmp_path / "cache")!r})
        assert c.ensure_running()
        end = time.monotonic() + 30
        while c.supervisor_running() and time.monotonic() < end:
            time.sleep(0.05)
        assert not c.supervisor_running()
    """)
    env = {**os.environ, "EROFS_NYDUS_IDLE_EXIT": "1"}
    proc = subprocess.run([sys.executable, "-I", "-W", "always::ResourceWarning", "-c", code],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "ResourceWarning" not in proc.stderr, proc.stderr


def test_daemon_interpreter_runs_no_pth_code_and_keeps_the_site_path(tmp_path: Path) -> None:
    """The daemon's interpreter is `-I -S`: no `.pth` file's code runs in it (nor
    sitecustomize), yet its sys.path is exactly an `-I` interpreter's, so every
    dependency imports as before.  Checked by running the daemon's boot code with a
    probe in place of the module's main()."""
    from erofs_nydus.service.client import daemon_command

    argv = daemon_command("erofs_nydus.service.client")
    assert argv[1:4] == ["-I", "-S", "-c"]
    tail = "from erofs_nydus.service.client import main\nmain(sys.argv[1:])\n"
    assert argv[4].endswith(tail)
    probe = ("import json\n"
             "import anyio, blake3, cffi, construct, crcmod, httpx, isal, lz4, zstandard\n"
             "print(json.dumps([sys.path, sys.flags.no_site, sorted(sys.modules)]))\n")
    proc = subprocess.run([*argv[:4], argv[4][:-len(tail)] + probe], capture_output=True,
                          text=True, cwd="/", env={"PATH": os.defpath}, timeout=60, check=True)
    path, no_site, modules = json.loads(proc.stdout)
    code = ("import sys, json\n"
            "print(json.dumps([sys.path, [m for m in sys.modules if m.startswith("
            "('__editable', '_distutils_hack', 'sitecustomize'))]]))\n")
    plain = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                           cwd="/", env={}, timeout=60, check=True)
    want_path, pth_imports = json.loads(plain.stdout)  # what .pth code imports here
    assert path == want_path and no_site == 1
    assert not {"sitecustomize", "usercustomize", *pth_imports} & set(modules)
