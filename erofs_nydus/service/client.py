"""Client side of a cache dir's daemon: start it, talk to it, wait for it to stop."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

from erofs_nydus import errors
from erofs_nydus.errors import DaemonError, ErofsNydusError, UnsafePathError
from erofs_nydus.fsutil import open_private, private_dir
from erofs_nydus.service.paths import RunPaths, check_peer_is_root

__all__ = ["DaemonClient", "DaemonUnreachable", "error_from_response"]


class DaemonUnreachable(DaemonError):
    """No daemon answers on the cache dir's control socket."""


_SUPERVISOR_CMD = "from erofs_nydus.service.supervisor import main; main()"
# Supervisors we started outlive this process; keeping their Popen objects avoids a
# "still running" ResourceWarning when one would be garbage-collected.
_SPAWNED: dict[str, list[subprocess.Popen[bytes]]] = {}


def error_from_response(resp: dict[str, Any]) -> ErofsNydusError:
    """Rebuild the project error a control request failed with (the daemon sends the
    class name and message)."""
    cls = getattr(errors, str(resp.get("type")), None)
    msg = str(resp.get("error", "daemon request failed"))
    if isinstance(cls, type) and issubclass(cls, ErofsNydusError):
        return cls(msg)
    return DaemonError(msg)


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
        resp: dict[str, Any] = json.loads(buf)
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
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

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
        with os.fdopen(self.open_log(), "ab") as logf:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _SUPERVISOR_CMD,
                    self.paths.cache_dir,
                ],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=logf,
                start_new_session=True,
                close_fds=True,
            )
        _SPAWNED.setdefault(self.paths.cache_dir, []).append(proc)
        return proc

    def shutdown(self, timeout: float = 20.0) -> None:
        """Stop daemon and supervisor (refused by the daemon while mounts remain)."""
        if self.supervisor_running():
            with contextlib.suppress(DaemonUnreachable):
                self.request("shutdown")
        deadline = time.monotonic() + timeout
        while self.supervisor_running():
            if time.monotonic() > deadline:
                raise DaemonError(
                    f"daemon for {self.paths.cache_dir} did not stop; see {self.paths.log}"
                )
            time.sleep(0.05)
        for proc in _SPAWNED.pop(self.paths.cache_dir, []):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # reap the supervisors we started (no zombies)
