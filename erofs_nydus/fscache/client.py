"""CLI side of fscache mode: start the fscache supervisor, register, mount with fsid=."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from erofs_nydus.daemon.client import DaemonClient
from erofs_nydus.errors import DaemonError, UnsupportedError

__all__ = ["FscacheClient", "fscache_cache_dir", "mount_fscache"]


class FscacheClient(DaemonClient):
    """A :class:`DaemonClient` whose daemon is the fscache supervisor + worker."""

    def ensure_running(self, timeout: float = 60.0) -> bool:
        """Start the fscache daemon unless it serves this cache dir; True if started now.

        A supervisor that cannot open or bind /dev/cachefiles exits at once with a
        ``FATAL:`` line in the log: that message is raised here.
        """
        if self.alive():
            self._check_mode()
            return False
        deadline = time.monotonic() + timeout
        while self.supervisor_running() and time.monotonic() < deadline:  # stopping one
            if self.alive():
                self._check_mode()
                return False
            time.sleep(0.1)
        log_start = os.path.getsize(self.paths.log) if os.path.exists(self.paths.log) else 0
        proc = self._spawn()
        while time.monotonic() < deadline:
            if self.alive():
                return True
            if proc.poll() is not None:
                raise DaemonError(self._fatal(log_start, proc.returncode))
            time.sleep(0.05)
        raise DaemonError(
            f"fscache daemon for {self.paths.cache_dir} did not come up in {timeout:.0f} s; "
            f"see {self.paths.log}"
        )

    def _check_mode(self) -> None:
        if self.request("ping").get("mode") != "fscache":
            raise DaemonError(
                f"a fanotify-mode daemon serves {self.paths.cache_dir}; use another cache dir"
            )

    def _fatal(self, log_start: int, code: int | None) -> str:
        from erofs_nydus.fscache.daemon import FATAL_PREFIX

        try:
            with open(self.paths.log, "rb") as f:
                f.seek(log_start)
                text = f.read().decode(errors="replace")
        except OSError:
            text = ""
        for line in reversed(text.splitlines()):
            if line.startswith(FATAL_PREFIX):
                return line[len(FATAL_PREFIX) :]
        return f"fscache daemon exited with status {code}; see {self.paths.log}"

    def _spawn(self) -> subprocess.Popen[bytes]:
        os.makedirs(self.paths.cache_dir, exist_ok=True)
        with open(self.paths.log, "ab") as logf:
            proc = subprocess.Popen(
                [sys.executable, "-m", "erofs_nydus.fscache.daemon",
                 "--cache-dir", self.paths.cache_dir],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                start_new_session=True, close_fds=True,
            )  # fmt: skip
        from erofs_nydus.daemon import client as _client

        _client._SPAWNED.setdefault(self.paths.cache_dir, []).append(proc)
        return proc


def fscache_cache_dir() -> str | None:
    """Cache dir of the running fscache daemon (there is at most one per system)."""
    from erofs_nydus.fscache.daemon import pointer_path

    try:
        with open(pointer_path(), encoding="utf-8") as f:
            doc = json.load(f)
        return str(doc["cache_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def mount_fscache(
    bootstrap: str,
    mountpoint: str,
    cache_dir: str,
    backend: dict[str, Any],
    *,
    amplify: int = 1 << 20,
    domain_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Register ``bootstrap`` with the fscache daemon of ``cache_dir`` (started if needed)
    and ``mount -t erofs -o fsid=<id>[,domain_id=<d>] none MOUNTPOINT``.  Returns the
    daemon's register answer (``fsid``, ``mount_fsid``, ...)."""
    from erofs_nydus.fscache.device import unavailable_reason
    from erofs_nydus.mount import _check_option_value, mount_erofs_fscache

    reason = unavailable_reason()
    if reason is not None:
        raise UnsupportedError(f"fscache mode: {reason}")
    if domain_id is not None:
        _check_option_value("domain_id", domain_id)
        if "/" in domain_id:
            raise UnsupportedError(f"--domain-id {domain_id!r}: must not contain '/'")
    from erofs_nydus.fscache.device import fs_type_of

    if fs_type_of(cache_dir) == "tmpfs":  # what bind would refuse, said before starting
        raise DaemonError(
            f"cachefiles needs ext4/xfs/btrfs for its cache: {os.path.abspath(cache_dir)} is "
            "on tmpfs (no sync_fs); put --cache-dir on a disk filesystem"
        )
    client = FscacheClient(cache_dir)
    started = client.ensure_running()
    try:
        info = client.request(
            "register", mode="fscache", bootstrap=bootstrap, backend=backend,
            mountpoint=mountpoint, amplify=amplify, domain_id=domain_id, **(extra or {}),
        )  # fmt: skip
    except Exception:
        if started:
            client.shutdown()
        raise
    try:
        mount_erofs_fscache(mountpoint, str(info["mount_fsid"]), domain_id)
    except BaseException:
        remaining = client.request("detach", mountpoint=mountpoint)["remaining"]
        if remaining == 0:
            client.shutdown()
        raise
    return info
