"""CLI side of fscache mode: start the fscache supervisor, register, mount with fsid=."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import struct
import subprocess
import time
from typing import Any

from erofs_nydus.errors import DaemonError, UnsupportedError
from erofs_nydus.fsutil import private_dir
from erofs_nydus.service.client import DaemonClient, request_started, spawn_daemon

__all__ = [
    "BUFFERED_ENV",
    "BUFFERED_READ_AHEAD_KB",
    "READ_AHEAD_ENV",
    "FscacheClient",
    "buffered_cache_env",
    "buffered_cache_unsupported",
    "enable_buffered_cache",
    "erofs_bdis",
    "fscache_cache_dir",
    "mount_fscache",
    "prepare_buffered_cache",
    "set_read_ahead_kb",
]

log = logging.getLogger("erofs_nydus.fscache")

BUFFERED_ENV = "EROFS_NYDUS_FSCACHE_BUFFERED"
# <linux/fs.h>: inode flags ioctls (long-sized argument) and ext4's data-journaling flag
_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
FS_JOURNAL_DATA_FL = 0x00004000

READ_AHEAD_ENV = "EROFS_NYDUS_FSCACHE_READ_AHEAD_KB"
#: bdi readahead (KiB) given to a mount whose cache is buffered: the erofs readahead
#: window becomes the size of the page-cache reads of the backing file (measured in the
#: VM: half the disk reads of the kernel's 128 KiB).  With O_DIRECT backing reads a
#: bigger window did not help, so those mounts keep the kernel's default.
BUFFERED_READ_AHEAD_KB = 2048
_BDI_CLASS = "/sys/class/bdi"


class FscacheClient(DaemonClient):
    """A :class:`DaemonClient` whose daemon is the fscache supervisor + worker."""

    def ensure_running(self, timeout: float = 60.0) -> bool:
        """Start the fscache daemon unless it serves this cache dir; True if started now.

        A supervisor that cannot open or bind /dev/cachefiles exits at once with a
        ``FATAL:`` line in the log: that message is raised here.
        """
        private_dir(self.paths.cache_dir)
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
        from erofs_nydus.service.fscache_daemon import FATAL_PREFIX

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
        private_dir(self.paths.cache_dir)
        return spawn_daemon(self.paths.cache_dir, self.paths.log,
                            "erofs_nydus.service.fscache_daemon",
                            "--cache-dir", self.paths.cache_dir)


def fscache_cache_dir() -> str | None:
    """Cache dir of the running fscache daemon (there is at most one per system)."""
    from erofs_nydus.service.fscache_daemon import pointer_path

    try:
        with open(pointer_path(), encoding="utf-8") as f:
            doc = json.load(f)
        return str(doc["cache_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def buffered_cache_env() -> bool | None:
    """``$EROFS_NYDUS_FSCACHE_BUFFERED``: True for 1/true/yes/on, False for
    0/false/no/off, None when unset (or anything else)."""
    v = os.environ.get(BUFFERED_ENV, "").strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    return None


def _set_inode_flag(path: str, flag: int) -> bool:
    """Add ``flag`` to ``path``'s inode flags (FS_IOC_SETFLAGS); True if it was missing."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        buf = bytearray(struct.calcsize("l"))
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, buf)
        (flags,) = struct.unpack("l", buf)
        if flags & flag:
            return False
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, struct.pack("l", flags | flag))
        return True
    finally:
        os.close(fd)


def buffered_cache_unsupported(path: str) -> str | None:
    """Why ext4 would not serve O_DIRECT reads of new files under ``path`` from the page
    cache once their directory is ``chattr +j``; None when it would.

    ext4 journals a file's data (and then reads it buffered even under O_DIRECT) when
    the filesystem is mounted ``data=journal``, or the inode has FS_JOURNAL_DATA_FL
    and the filesystem is mounted ``nodelalloc``: with delayed allocation (ext4's
    default) the flag is ignored.  Other filesystems have no such mode."""
    from erofs_nydus.mount import mount_containing

    m = mount_containing(path)
    if m is None:
        return f"cannot read the mount options of {path}"
    if m.fstype != "ext4":
        return f"{path} is on {m.fstype or 'an unknown filesystem'}, not ext4"
    if "data=journal" in m.options or "nodelalloc" in m.options:
        return None
    return (f"the ext4 at {m.mountpoint} is mounted with delalloc (mount it nodelalloc "
            "for page-cache warm reads)")


def enable_buffered_cache(cache_dir: str) -> str | None:
    """Let cachefiles' backing files be read through the page cache; return why that is
    not in effect, or None when it is.

    cachefiles opens its backing files with O_DIRECT, so a warm fscache read is one
    direct disk read per file (no readahead across files, unlike a file-backed mount
    of a materialized blob).  ext4 serves O_DIRECT with buffered I/O for inodes whose
    data is journaled, so where that takes effect (:func:`buffered_cache_unsupported`)
    this marks the cachefiles directory (and every directory below it, which new
    cache files inherit from) ``FS_JOURNAL_DATA_FL`` (``chattr +j``); writes into the
    cache are then journaled (written twice).  Nothing is marked where it would not
    take effect."""
    from erofs_nydus.mount import mount_containing
    from erofs_nydus.service.fscache_daemon import kernel_cache_dir

    kdir = kernel_cache_dir(cache_dir)
    os.makedirs(kdir, exist_ok=True)
    why = buffered_cache_unsupported(kdir)
    if why is not None:
        return why
    m = mount_containing(kdir)
    if m is not None and "data=journal" in m.options:
        return None  # every file's data is journaled already
    changed = 0
    try:
        for dirpath, _dirs, _files in os.walk(kdir):
            changed += _set_inode_flag(dirpath, FS_JOURNAL_DATA_FL)
    except OSError as e:
        need = " (needs CAP_SYS_RESOURCE)" if e.errno == errno.EPERM else ""
        return f"cannot chattr +j {kdir}: {e.strerror or e}{need}"
    if changed:
        log.info("buffered fscache cache: marked %d directories under %s +j", changed, kdir)
    return None


def prepare_buffered_cache(cache_dir: str) -> bool:
    """:func:`enable_buffered_cache`; True if in effect (the reason why not is logged)."""
    why = enable_buffered_cache(cache_dir)
    if why is not None:
        log.info("buffered fscache cache not in effect: %s", why)
    return why is None


def erofs_bdis() -> set[str]:
    """Names of the EROFS per-superblock bdis (``erofs-<n>`` in /sys/class/bdi).

    Mounts without a block device (fscache, file-backed) get a private bdi named by a
    global counter, not by the superblock's anon dev (``/sys/class/bdi/0:<n>`` does not
    exist), so a new mount's bdi is the one that appears across its mount(2)."""
    try:
        return {n for n in os.listdir(_BDI_CLASS) if n.startswith("erofs-")}
    except OSError:
        return set()


def set_read_ahead_kb(bdi: str, kb: int) -> int:
    """Write ``kb`` to ``/sys/class/bdi/<bdi>/read_ahead_kb``; return the value read back."""
    path = os.path.join(_BDI_CLASS, bdi, "read_ahead_kb")
    with open(path, "w", encoding="ascii") as f:
        f.write(f"{kb}\n")
    with open(path, encoding="ascii") as f:
        return int(f.read())


def _read_ahead_setting(buffered: bool) -> int:
    """KiB to set (0: keep the kernel's default): ``$EROFS_NYDUS_FSCACHE_READ_AHEAD_KB``,
    else :data:`BUFFERED_READ_AHEAD_KB` for a buffered cache."""
    raw = os.environ.get(READ_AHEAD_ENV, "").strip()
    if raw:
        try:
            if int(raw) >= 0:
                return int(raw)
        except ValueError:
            pass
        log.warning("ignoring %s=%r (want KiB >= 0)", READ_AHEAD_ENV, raw)
    return BUFFERED_READ_AHEAD_KB if buffered else 0


def _apply_read_ahead(mountpoint: str, before: set[str], kb: int) -> dict[str, Any]:
    """Best effort: set the readahead of the bdi this mount created; log why not."""
    new = sorted(erofs_bdis() - before)
    if len(new) != 1:
        log.warning("fscache mount %s: read_ahead_kb left at the kernel's default: %s",
                    mountpoint, "no new erofs bdi in /sys/class/bdi" if not new
                    else f"{len(new)} new erofs bdis ({', '.join(new)}), concurrent mounts")
        return {"bdi": None, "read_ahead_kb": None}
    (bdi,) = new
    try:
        got = set_read_ahead_kb(bdi, kb)
    except (OSError, ValueError) as e:
        log.warning("fscache mount %s: could not set %s/%s/read_ahead_kb to %d: %s",
                    mountpoint, _BDI_CLASS, bdi, kb, e)
        return {"bdi": bdi, "read_ahead_kb": None}
    log.info("fscache mount %s: bdi %s read_ahead_kb=%d", mountpoint, bdi, got)
    return {"bdi": bdi, "read_ahead_kb": got}


def mount_fscache(
    bootstrap: str,
    mountpoint: str,
    cache_dir: str,
    backend: dict[str, Any],
    *,
    amplify: int = 1 << 20,
    domain_id: str | None = None,
    extra: dict[str, Any] | None = None,
    buffered_cache: bool | None = None,
    read_ahead_kb: int | None = None,
    allow_suid_dev: bool = False,
) -> dict[str, Any]:
    """Register ``bootstrap`` with the fscache daemon of ``cache_dir`` (started if needed)
    and ``mount -t erofs -o fsid=<id>[,domain_id=<d>] none MOUNTPOINT``.  Returns the
    daemon's register answer (``fsid``, ``mount_fsid``, ...) plus ``buffered_cache``,
    ``bdi`` and ``read_ahead_kb`` (both ``None`` unless readahead was set).

    ``buffered_cache`` (default: ``$EROFS_NYDUS_FSCACHE_BUFFERED``, else on): first
    call :func:`enable_buffered_cache` on ``cache_dir``; the answer's
    ``buffered_cache`` says whether it is in effect and ``buffered_cache_off`` why not
    (None when in effect or not asked for).  ``read_ahead_kb``: readahead of the new
    mount's bdi, set after mounting (best effort, a warning when it cannot be); ``None``
    takes ``$EROFS_NYDUS_FSCACHE_READ_AHEAD_KB``, else :data:`BUFFERED_READ_AHEAD_KB` when the
    buffered cache is in effect; ``0`` keeps the kernel's default (128 KiB).
    ``allow_suid_dev``: mount without ``nosuid,nodev``."""
    from erofs_nydus.fscache.device import unavailable_reason
    from erofs_nydus.mount import check_option_value, mount_erofs_fscache

    reason = unavailable_reason()
    if reason is not None:
        raise UnsupportedError(f"fscache mode: {reason}")
    if domain_id is not None:
        check_option_value("domain_id", domain_id)
        if "/" in domain_id:
            raise UnsupportedError(f"--domain-id {domain_id!r}: must not contain '/'")
    from erofs_nydus.fscache.device import fs_type_of

    if fs_type_of(cache_dir) == "tmpfs":  # what bind would refuse, said before starting
        raise DaemonError(
            f"cachefiles needs ext4/xfs/btrfs for its cache: {os.path.abspath(cache_dir)} is "
            "on tmpfs (no sync_fs); put --cache-dir on a disk filesystem"
        )
    if buffered_cache is None:
        env = buffered_cache_env()
        buffered_cache = True if env is None else env
    private_dir(cache_dir)  # before anything is made in it: 0700, ours
    off = enable_buffered_cache(cache_dir) if buffered_cache else None
    if off is not None:
        log.info("buffered fscache cache not in effect: %s", off)
    buffered = bool(buffered_cache) and off is None
    client = FscacheClient(cache_dir)
    info, _ = request_started(
        client, "register", mode="fscache", bootstrap=bootstrap, backend=backend,
        mountpoint=mountpoint, amplify=amplify, domain_id=domain_id, **(extra or {}),
    )  # fmt: skip
    if read_ahead_kb is None:
        read_ahead_kb = _read_ahead_setting(buffered)
    bdis_before = erofs_bdis() if read_ahead_kb > 0 else set()
    try:
        mount_erofs_fscache(mountpoint, str(info["mount_fsid"]), domain_id,
                            allow_suid_dev=allow_suid_dev)
    except BaseException:
        remaining = client.request("detach", mountpoint=mountpoint)["remaining"]
        if remaining == 0:
            client.shutdown()
        raise
    ra: dict[str, Any] = {"bdi": None, "read_ahead_kb": None}
    if read_ahead_kb > 0:
        ra = _apply_read_ahead(os.path.abspath(mountpoint), bdis_before, read_ahead_kb)
    return {**info, "buffered_cache": buffered, "buffered_cache_off": off, **ra}
