"""Where a daemon for a cache dir keeps its run files."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
from typing import NamedTuple

from erofs_nydus.errors import UnsafePathError
from erofs_nydus.fsutil import open_private, private_dir

__all__ = ["RunPaths", "api_socket_path", "check_peer_is_root"]

_SUN_PATH_MAX = 107


def _short_hash(path: str) -> str:
    import hashlib  # only for a cache dir too long for a socket path

    return hashlib.sha256(os.fsencode(path)).hexdigest()[:24]


class RunPaths(NamedTuple):
    cache_dir: str

    @classmethod
    def of(cls, cache_dir: str | os.PathLike[str]) -> RunPaths:
        return cls(os.path.abspath(os.fspath(cache_dir)))

    @property
    def lock(self) -> str:
        """flock'ed by the supervisor while it runs; holds its pid."""
        return os.path.join(self.cache_dir, "daemon.lock")

    @property
    def log(self) -> str:
        return os.path.join(self.cache_dir, "daemon.log")

    @property
    def socket(self) -> str:
        """Control socket (in the cache dir unless that path is too long for AF_UNIX)."""
        p = os.path.join(self.cache_dir, "daemon.sock")
        if len(os.fsencode(p)) <= _SUN_PATH_MAX:
            return p
        h = _short_hash(self.cache_dir)
        return os.path.join("/run/erofs-nydus", f"{h}.sock")


def api_socket_path(cache_dir: str | os.PathLike[str]) -> str:
    """Control API socket: `<cache-dir>/api.sock`, or under /run/erofs-nydus if that is
    too long for AF_UNIX."""
    cdir = os.path.abspath(os.fspath(cache_dir))
    p = os.path.join(cdir, "api.sock")
    if len(os.fsencode(p)) <= _SUN_PATH_MAX:
        return p
    h = _short_hash(cdir)
    return os.path.join("/run/erofs-nydus", f"{h}.api.sock")


def take_supervisor_lock(paths: RunPaths) -> int | None:
    """Become the only supervisor of a cache dir: flock its pid file and ignore the
    signals that would stop it by accident (it holds the kernel fd readers depend on).

    Returns the locked fd (keep it open), or None when another supervisor holds it.
    """
    private_dir(paths.cache_dir)  # ours, not writable by others (UnsafePathError)
    while True:
        lock_fd = open_private(paths.lock, os.O_RDWR | os.O_CREAT)  # planted symlink: refused
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            return None
        try:  # still the file at the path? (a failed mount's cleanup may unlink it)
            if os.path.samestat(os.fstat(lock_fd), os.stat(paths.lock)):
                break
        except FileNotFoundError:
            pass
        os.close(lock_fd)
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    return lock_fd


def listen_unix(path: str) -> socket.socket:
    """A listening unix stream socket at `path` (mode 0600), replacing a stale one.

    Bound in a private dir (ours, 0700 when we make it): nobody else can connect in
    the moment between bind and chmod, nor swap the socket for their own."""
    private_dir(os.path.dirname(path), what="socket dir")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    note_bound(path)
    listener.listen(64)
    return listener


_BOUND: dict[str, tuple[int, int]] = {}  # socket path -> (dev, ino) this process bound


def note_bound(path: str) -> None:
    """Remember the socket file just bound at `path` (see `unlink_own_socket`)."""
    st = os.stat(path)
    _BOUND[path] = (st.st_dev, st.st_ino)


def unlink_own_socket(path: str) -> None:
    """Remove `path` only if it is still the socket this process bound there.

    A cache dir deleted and made again under a running daemon gets a new daemon with a
    socket at the same path; the old one must not delete that when it stops.
    """
    with contextlib.suppress(OSError):
        st = os.stat(path)
        if _BOUND.get(path) == (st.st_dev, st.st_ino):
            os.unlink(path)


_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def check_peer_is_root(sock: socket.socket, path: str) -> None:
    """Refuse a control socket not served by root (SO_PEERCRED: who called listen()).

    The CLI acts on the daemon's replies (bootstrap and cache-file paths it mounts as
    root); a socket someone else managed to put at `path` must not be believed.
    """
    pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    if uid != 0:
        raise UnsafePathError(
            f"{path} is served by uid {uid} (pid {pid}), not by root; refusing to trust "
            "its replies"
        )
