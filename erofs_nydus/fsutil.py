"""Small filesystem helpers shared by the builder, the registry layout and the daemon.

The daemon runs as root and keeps its files in a cache dir: whoever can write that
directory could plant a symlink (`<blob>.blob.data` -> /etc/shadow) and have root
overwrite its target, or replace the control socket.  So a cache dir must be a real
directory owned by us and writable by nobody else (`private_dir`), and every file in
it is opened relative to a directory fd without following symlinks, created
exclusively with mode 0600 whatever the umask (`open_at`, `open_private`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile

from erofs_nydus.errors import UnsafePathError

__all__ = ["atomic_write", "open_at", "open_dir", "open_private", "private_dir"]

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> None:
    """Replace `path` with `data` all at once: a temporary file in the same directory,
    fsync'd, chmod'ed and renamed over it.  Readers see the old or the new content,
    never a part; a failure leaves the old file and no temporary behind.  Raises OSError.

    Safe in a private dir: the temporary is created O_EXCL and the rename replaces a
    symlink at `path` instead of following it.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def open_dir(path: str | os.PathLike[str]) -> int:
    """An O_DIRECTORY fd of `path`, refusing a symlink as the last component."""
    path = os.fspath(path)
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise UnsafePathError(f"{path} is a symlink; refusing to follow it") from exc
        raise


def _mkdirs(path: str, mode: int) -> None:
    """Create `path` and missing parents with exactly `mode` (not the umask's)."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for p in reversed(missing):
        try:
            os.mkdir(p, mode)
        except FileExistsError:
            continue
        os.chmod(p, mode)


def private_dir(path: str | os.PathLike[str], *, what: str = "cache dir") -> str:
    """Make sure `path` is a directory only we control; create it (mode 0700, parents
    0755, whatever the umask) if missing.  Returns the absolute path.

    Raises UnsafePathError (one line) for a symlink, a directory owned by another
    user (root's are fine: root could do anything anyway), or one group/world-writable;
    also when a directory above it (after resolving symlinks, too) is another user's or
    writable by others without the sticky bit: they could swap ours for theirs.
    """
    path = os.path.abspath(os.fspath(path))
    created = False
    _mkdirs(os.path.dirname(path), 0o755)
    for chain in dict.fromkeys((path, os.path.realpath(path))):  # symlinked parents too
        _check_ancestors(chain, what)
    if not os.path.lexists(path):
        try:
            os.mkdir(path, 0o700)
            created = True
        except FileExistsError:
            pass
    fd = open_dir(path)
    try:
        if created:
            os.fchmod(fd, 0o700)
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_uid not in (os.geteuid(), 0):
        raise UnsafePathError(
            f"{what} {path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}) "
            "or root; use a directory of our own"
        )
    if st.st_mode & 0o022:
        raise UnsafePathError(
            f"{what} {path} is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); chmod go-w it or use another directory"
        )
    return path


def _check_ancestors(path: str, what: str) -> None:
    """Every directory above `path` must be ours or root's, and writable by nobody
    else unless sticky (/tmp): otherwise its owner could move our directory away and
    put theirs in its place."""
    parent = os.path.dirname(path)
    while True:
        st = os.stat(parent)
        if st.st_uid not in (os.geteuid(), 0):
            raise UnsafePathError(
                f"{what} {path}: {parent} above it is owned by uid {st.st_uid}, who could "
                "replace it; use a directory only root controls"
            )
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafePathError(
                f"{what} {path}: {parent} above it is writable by group or others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); use a directory only root controls"
            )
        up = os.path.dirname(parent)
        if up == parent:
            return
        parent = up


def open_at(
    dir_fd: int, name: str, flags: int, mode: int = 0o600, *, shown: str | None = None
) -> int:
    """open(2) `name` relative to `dir_fd` without following a symlink.

    With O_CREAT a missing file is created O_EXCL with exactly `mode` (fchmod: the
    umask does not apply); an existing one must be a regular file we (or root) own, and a file
    opened for writing must have no other hard link.  Group/other bits beyond `mode`
    on a file opened for writing are removed.  O_TRUNC truncates after those checks.
    Raises UnsafePathError for what could be a plant, OSError otherwise.
    """
    shown = shown or name
    base = (flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC)) | _NOFOLLOW | os.O_NONBLOCK
    fd = -1
    created = False
    try:
        for _ in range(8):
            if not flags & os.O_EXCL:
                try:
                    fd = os.open(name, base, dir_fd=dir_fd)
                    break
                except FileNotFoundError:
                    if not flags & os.O_CREAT:
                        raise
            try:
                fd = os.open(name, base | os.O_CREAT | os.O_EXCL, mode, dir_fd=dir_fd)
                created = True
                break
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
        else:
            raise UnsafePathError(f"{shown} keeps appearing and vanishing; refusing it")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"{shown} is a symlink; refusing to follow it") from exc
        raise
    try:
        st = os.fstat(fd)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{shown} is not a regular file; refusing it")
        if st.st_uid not in (os.geteuid(), 0):
            raise UnsafePathError(f"{shown} is owned by uid {st.st_uid}, not by us; refusing it")
        if writable and st.st_nlink != 1:
            raise UnsafePathError(f"{shown} has {st.st_nlink} hard links; refusing to write it")
        if created or (writable and stat.S_IMODE(st.st_mode) & ~mode):
            os.fchmod(fd, mode)
        if flags & os.O_TRUNC:
            os.ftruncate(fd, 0)
        if not flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private(path: str | os.PathLike[str], flags: int, mode: int = 0o600) -> int:
    """`open_at` of `path` relative to its directory (opened without following a
    symlink): for files in a cache dir that `private_dir` checked."""
    path = os.path.abspath(os.fspath(path))
    dfd = open_dir(os.path.dirname(path))
    try:
        return open_at(dfd, os.path.basename(path), flags, mode, shown=path)
    finally:
        os.close(dfd)
