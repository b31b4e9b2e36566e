"""Open and bind ``/dev/cachefiles`` in on-demand mode, with errors that say what to fix."""

from __future__ import annotations

import errno
import os
import time

from erofs_nydus.errors import DaemonError, UnsupportedError
from erofs_nydus.fscache import protocol as p

__all__ = [
    "DEVICE",
    "ONDEMAND_CONFIGS",
    "bind_ondemand",
    "fs_type_of",
    "open_device",
    "unavailable_reason",
]

DEVICE = "/dev/cachefiles"
ONDEMAND_CONFIGS = "CONFIG_CACHEFILES_ONDEMAND and CONFIG_EROFS_FS_ONDEMAND"
_CACHE_FS_OK = ("ext4", "xfs", "btrfs", "ext3", "ext2", "f2fs")


def _misc_minor() -> int | None:
    try:
        with open("/proc/misc", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1] == "cachefiles":
                    return int(parts[0])
    except OSError:
        return None
    return None


def unavailable_reason() -> str | None:
    """Why fscache mode cannot work on this kernel (None if it looks usable)."""
    from erofs_nydus.mount import kernel_config, kernel_supports_erofs

    if not kernel_supports_erofs():
        return "EROFS is not available in this kernel (CONFIG_EROFS_FS)"
    if not os.path.exists(DEVICE) and _misc_minor() is None:
        return (
            f"no {DEVICE}: this kernel has no cachefiles on-demand support "
            f"(needs CONFIG_CACHEFILES with {ONDEMAND_CONFIGS})"
        )
    conf = kernel_config()
    if conf is not None and "CONFIG_EROFS_FS" in conf:
        missing = [
            c
            for c in ("CONFIG_CACHEFILES_ONDEMAND", "CONFIG_EROFS_FS_ONDEMAND")
            if conf.get(c) != "y"
        ]
        if missing:
            return f"this kernel lacks {' and '.join(missing)} (fscache on-demand mode)"
    return None


def fs_type_of(path: str) -> str | None:
    """Filesystem type of the mount holding ``path`` (longest mountpoint prefix)."""
    from erofs_nydus.mount import mount_containing

    m = mount_containing(path)
    return m.fstype if m is not None else None


def open_device(busy_wait: float = 5.0) -> int:
    """Open /dev/cachefiles (creating the node from /proc/misc if /dev lacks it)."""
    if not os.path.exists(DEVICE):
        minor = _misc_minor()
        if minor is None:
            raise UnsupportedError(
                f"no {DEVICE}: this kernel has no cachefiles on-demand support "
                f"(needs CONFIG_CACHEFILES with {ONDEMAND_CONFIGS})"
            )
        import stat

        os.mknod(DEVICE, 0o600 | stat.S_IFCHR, os.makedev(10, minor))
    deadline = time.monotonic() + busy_wait
    while True:
        try:
            return os.open(DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            # The previous daemon's cache is released asynchronously after its fds close.
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                err = exc
                break
        time.sleep(0.1)
    try:
        raise err
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise DaemonError(
                f"{DEVICE} is busy: another cachefiles user holds it (cachefilesd, or an "
                "erofs-nydus fscache daemon for another cache dir); only one may exist"
            ) from exc
        if exc.errno == errno.EPERM:
            raise DaemonError(f"{DEVICE}: needs CAP_SYS_ADMIN (run as root)") from exc
        raise DaemonError(f"cannot open {DEVICE}: {exc.strerror}") from exc


def bind_ondemand(devfd: int, cache_dir: str) -> None:
    """``dir <cache_dir>`` + ``bind ondemand``; explains the usual failures."""
    cache_dir = os.path.abspath(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    fstype = fs_type_of(cache_dir)
    if fstype == "tmpfs":
        raise DaemonError(
            f"cachefiles needs ext4/xfs/btrfs for its cache: {cache_dir} is on tmpfs "
            "(no sync_fs); put --cache-dir on a disk filesystem"
        )
    try:
        os.write(devfd, p.cmd_dir(cache_dir))
    except OSError as exc:
        raise DaemonError(f"cachefiles 'dir {cache_dir}' failed: {exc.strerror}") from exc
    try:
        os.write(devfd, p.cmd_bind_ondemand())
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            raise DaemonError(
                f"cachefiles refused {cache_dir} ({fstype or 'unknown'} filesystem): "
                "cachefiles needs ext4/xfs/btrfs with user xattrs and a block size <= page size"
            ) from exc
        if exc.errno == errno.EINVAL:
            raise UnsupportedError(
                f"'bind ondemand' refused: this kernel has no on-demand cachefiles "
                f"(needs {ONDEMAND_CONFIGS})"
            ) from exc
        if exc.errno == errno.EROFS:
            raise DaemonError(f"cachefiles cache dir {cache_dir} is read-only") from exc
        raise DaemonError(f"cachefiles 'bind ondemand' failed: {exc.strerror}") from exc
