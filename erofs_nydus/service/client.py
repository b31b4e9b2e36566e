"""Client side of a cache dir's daemon: start it, talk to it, wait for it to stop."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, Protocol

from erofs_nydus import errors
from erofs_nydus.errors import DaemonError, DaemonStopping, ErofsNydusError, UnsafePathError
from erofs_nydus.fsutil import open_private, private_dir
from erofs_nydus.service.paths import RunPaths, check_peer_is_root

if TYPE_CHECKING:  # imported where a daemon is started: `mount` to a running one needs none
    import subprocess

__all__ = [
    "DAEMON_ENV",
    "DaemonClient",
    "DaemonUnreachable",
    "daemon_command",
    "daemon_environ",
    "error_from_response",
    "request_started",
    "spawn_daemon",
    "wait_stopped",
]


class DaemonUnreachable(DaemonError):
    """No daemon answers on the cache dir's control socket."""


#: The project's own variables a daemon reads, fixed for its lifetime (daemon-wide
#: settings: they come from the caller that starts it, later callers cannot change
#: them): log level, idle exit, the stuck-daemon deadline, the fscache pointer file and
#: the fscache test switches.
DAEMON_ENV = (
    "EROFS_NYDUS_LOG",
    "EROFS_NYDUS_IDLE_EXIT",
    "EROFS_NYDUS_READ_DEADLINE",
    "EROFS_NYDUS_FSCACHE_POINTER",
    "EROFS_NYDUS_FSCACHE_READ_DELAY",
    "EROFS_NYDUS_FSCACHE_CHUNK_WRITES",
)
_LOCALE_ENV = ("PATH", "LANG", "LANGUAGE", "TZ")

# Imports erofs_nydus from exactly the directory the caller's own package lives in
# (and nothing else from next to it), then runs a module's main().  Run with -I, so
# neither the cwd, $PYTHON*, nor the user site reach the root daemon's sys.path, and
# with -S: no `.pth` file's code runs in the root daemon (they import whatever their
# installer chose - an editable finder, CA injection, setuptools' shim - ~25 ms of
# every start here).  The site-packages dirs an -I interpreter would have are added
# here, with the directory lines of their .pth files (site.addpackage, without its
# `import` lines), so the dependencies resolve as before; in a virtualenv (pyvenv.cfg
# next to the interpreter, as site.venv() reads it) its own site-packages first.
_BOOT = """\
import importlib.util, os, site, sys
prefixes = None
exe_dir = os.path.dirname(os.path.abspath(sys.executable))
for cfg in (os.path.join(exe_dir, "pyvenv.cfg"),
            os.path.join(os.path.dirname(exe_dir), "pyvenv.cfg")):
    if os.path.isfile(cfg):  # a venv: what site.venv() does without -S, minus .pth code
        system = False
        with open(cfg, encoding="utf-8") as f:
            for line in f:
                key, eq, value = line.partition("=")
                if eq and key.strip().lower() == "include-system-site-packages":
                    system = value.strip().lower() == "true"
        sys.prefix = sys.exec_prefix = os.path.dirname(exe_dir)
        prefixes = [sys.prefix] + ([sys.base_prefix] if system else [])
        break
for d in site.getsitepackages(prefixes):
    if not os.path.isdir(d) or d in sys.path:
        continue
    sys.path.append(d)
    for n in sorted(os.listdir(d)):
        if not n.endswith(".pth") or n.startswith("."):
            continue
        try:
            with open(os.path.join(d, n), encoding="locale") as f:
                lines = f.read().splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            if line.startswith(("#", "import ", "import\t")) or not line.strip():
                continue
            p = os.path.abspath(os.path.join(d, line.rstrip()))
            if os.path.exists(p) and p not in sys.path:
                sys.path.append(p)
spec = importlib.util.spec_from_file_location(
    "erofs_nydus", {init!r}, submodule_search_locations=[{pkg!r}])
mod = importlib.util.module_from_spec(spec)
sys.modules["erofs_nydus"] = mod
spec.loader.exec_module(mod)
from {module} import main
main(sys.argv[1:])
"""
# Supervisors we started outlive this process; keeping their Popen objects avoids a
# "still running" ResourceWarning when one would be garbage-collected.  Those that
# stopped on their own (idle exit, lost a start race) are reaped by _reap.
_SPAWNED: dict[str, list[subprocess.Popen[bytes]]] = {}


def _reap(cache_dir: str | None = None, wait_free: bool = False) -> None:
    """Collect the exit status of spawned daemons that have stopped (of one cache dir,
    or all), so none stays a zombie or is collected unreaped.  ``wait_free``: first
    wait briefly for those whose cache dir's lock is free (they are exiting)."""
    if not _SPAWNED:
        return
    import subprocess

    for key in [cache_dir] if cache_dir is not None else list(_SPAWNED):
        if wait_free and not DaemonClient(key).supervisor_running():
            for p in _SPAWNED.get(key, []):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=5)
        left = [p for p in _SPAWNED.get(key, []) if p.poll() is None]
        if left:
            _SPAWNED[key] = left
        else:
            _SPAWNED.pop(key, None)


atexit.register(_reap, wait_free=True)


class _Startable(Protocol):
    def ensure_running(self) -> bool: ...
    def supervisor_running(self) -> bool: ...
    def request(self, op: str, **args: Any) -> dict[str, Any]: ...
    def shutdown(self) -> None: ...


def wait_stopped(client: _Startable, timeout: float) -> bool:
    """Wait (at most `timeout` s) for the supervisor of `client`'s cache dir to exit;
    True once none runs."""
    deadline = time.monotonic() + timeout
    while client.supervisor_running():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def request_started(client: _Startable, op: str, *, stop_wait: float = 20.0,
                    **args: Any) -> tuple[dict[str, Any], bool]:
    """Send `op` (a registration) to the daemon of `client`'s cache dir, started if
    none runs; the answer and whether a daemon was started for it.  A daemon that
    decides to stop (its last image went) between our ping and the request answers
    ``DaemonStopping``, or resets the connection as its listener closes: it is waited
    for and the next one asked, once.  A daemon started here for a request that fails is
    stopped again."""
    for attempt in (0, 1):
        started = client.ensure_running()
        try:
            return client.request(op, **args), started
        except (DaemonStopping, DaemonUnreachable):
            if attempt:
                raise
            wait_stopped(client, stop_wait)  # not an error: the next one serves
        except Exception:
            if started:
                with contextlib.suppress(Exception):
                    client.shutdown()
            raise
    raise AssertionError("unreachable")


def error_from_response(resp: dict[str, Any]) -> ErofsNydusError:
    """Rebuild the project error a control request failed with (the daemon sends the
    class name and message)."""
    cls = getattr(errors, str(resp.get("type")), None)
    msg = str(resp.get("error", "daemon request failed"))
    if isinstance(cls, type) and issubclass(cls, ErofsNydusError):
        return cls(msg)
    return DaemonError(msg)


def daemon_environ(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a daemon gets: an allow-list of the caller's (PATH, locale, TZ
    and :data:`DAEMON_ENV`).  Whatever a mount needs beyond that (the registry auth
    file, backend settings) travels in its request, so a daemon never serves a later
    caller with the first caller's settings."""
    env = os.environ if environ is None else environ
    out = {k: v for k, v in env.items()
           if k in _LOCALE_ENV or k.startswith("LC_") or k in DAEMON_ENV}
    out.setdefault("PATH", os.defpath)
    return out


def daemon_command(module: str, *args: str) -> list[str]:
    """argv running ``module.main(args)`` in an isolated interpreter (``-I -S``: see
    `_BOOT`) that imports erofs_nydus from where this process's erofs_nydus came from."""
    import erofs_nydus

    init = os.path.abspath(erofs_nydus.__file__ or "")
    code = _BOOT.format(init=init, pkg=os.path.dirname(init), module=module)
    return [sys.executable, "-I", "-S", "-c", code, *args]


def spawn_daemon(cache_dir: str, log_path: str, module: str,
                 *args: str) -> subprocess.Popen[bytes]:
    """Start a daemon process (own session, stdio to ``log_path``, cwd ``/``,
    :func:`daemon_environ`) and remember it for reaping."""
    import subprocess

    private_dir(cache_dir)
    logfd = open_private(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)  # 0600, no symlink
    with os.fdopen(logfd, "ab") as logf:
        proc = subprocess.Popen(
            daemon_command(module, *args),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            cwd="/",
            env=daemon_environ(),
            start_new_session=True,
            close_fds=True,
        )
    _reap()
    _SPAWNED.setdefault(cache_dir, []).append(proc)
    return proc


class DaemonClient:
    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.paths = RunPaths.of(cache_dir)

    # -- requests ----------------------------------------------------------------------

    def request(self, op: str, *, timeout: float = 120.0, **args: Any) -> dict[str, Any]:
        """Send one request; raise the project error the daemon answered with."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(self.paths.socket)
                check_peer_is_root(s, self.paths.socket)
                s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
                buf = b""
                while not buf.endswith(b"\n"):
                    part = s.recv(1 << 16)
                    if not part:
                        break
                    buf += part
        except UnsafePathError:
            raise
        except OSError as exc:
            raise DaemonUnreachable(
                f"daemon for {self.paths.cache_dir} not reachable at {self.paths.socket}: {exc}"
            ) from exc
        if not buf:
            raise DaemonUnreachable(f"daemon for {self.paths.cache_dir} closed the connection")
        try:
            resp = json.loads(buf)
        except ValueError:
            resp = None
        if not isinstance(resp, dict) or not buf.endswith(b"\n"):
            raise DaemonError(
                f"daemon for {self.paths.cache_dir} sent a partial or garbled reply to "
                f"{op!r} ({len(buf)} bytes); see {self.paths.log}"
            )
        if not resp.get("ok"):
            raise error_from_response(resp)
        return resp

    def alive(self) -> bool:
        try:
            self.request("ping", timeout=5.0)
        except DaemonUnreachable:
            return False
        return True

    # -- lifecycle ---------------------------------------------------------------------

    def supervisor_running(self) -> bool:
        """True while some supervisor holds the cache dir's lock."""
        try:
            fd = open_private(self.paths.lock, os.O_RDONLY)  # a planted symlink: refused
        except FileNotFoundError:
            _reap(self.paths.cache_dir)
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        _reap(self.paths.cache_dir)
        return False

    def remove_stale_files(self, *, log: bool) -> None:
        """Remove the lock file (and with ``log`` the log) a stopped daemon left.

        The lock file is unlinked while holding its lock, so no supervisor is using
        it; one that opened it just before re-checks the path after locking
        (`take_supervisor_lock`)."""
        try:
            fd = os.open(self.paths.lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), os.stat(self.paths.lock)):
                os.unlink(self.paths.lock)
        except OSError:
            return  # held: a supervisor runs, and its log is in use
        finally:
            os.close(fd)
        if log:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.paths.log)

    def supervisor_pid(self) -> int | None:
        try:
            with open(self.paths.lock, encoding="ascii") as f:
                text = f.read().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def ensure_running(self, timeout: float = 20.0) -> bool:
        """Start the supervisor + daemon unless one serves this cache dir.

        Returns True if it was started now.  Daemonized: own session, stdio to
        `<cache-dir>/daemon.log`.  Refuses a cache dir others could write.
        """
        private_dir(self.paths.cache_dir)
        if self.alive():
            return False
        spawned = 0
        proc: subprocess.Popen[bytes] | None = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.alive():
                return spawned > 0
            # Spawn when no supervisor holds the lock and ours (if any) has exited:
            # one that was just shutting down makes an attempt exit at once.
            if (
                (proc is None or proc.poll() is not None)
                and not self.supervisor_running()
                and spawned < 3
            ):
                proc = self._spawn()
                spawned += 1
            time.sleep(0.01)
        raise DaemonError(
            f"daemon for {self.paths.cache_dir} did not come up in {timeout:.0f} s; "
            f"see {self.paths.log}"
        )

    def open_log(self) -> int:
        """The daemon's log (append, 0600) in its checked cache dir: its stdio."""
        private_dir(self.paths.cache_dir)
        return open_private(self.paths.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def _spawn(self) -> subprocess.Popen[bytes]:
        return spawn_daemon(self.paths.cache_dir, self.paths.log,
                            "erofs_nydus.service.supervisor", self.paths.cache_dir)

    def shutdown(self, timeout: float = 20.0) -> None:
        """Stop daemon and supervisor (refused by the daemon while mounts remain)."""
        if self.supervisor_running():
            with contextlib.suppress(DaemonUnreachable):
                self.request("shutdown")
        if not wait_stopped(self, timeout):
            raise DaemonError(
                f"daemon for {self.paths.cache_dir} did not stop; see {self.paths.log}"
            )
        for proc in _SPAWNED.pop(self.paths.cache_dir, []):
            import subprocess

            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # reap the supervisors we started (no zombies)
