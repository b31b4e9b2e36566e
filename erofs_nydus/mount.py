"""Mount and unmount EROFS images with mount(2)/umount2(2) through ctypes.

Why not mount(8): given a regular image file, mount(8) attaches a loop device and
passes that as the source; the kernel then treats every ``device=`` path as a block
device and refuses regular blob files.  Calling mount(2) directly with the image
*file* as source selects EROFS's file-backed mode (CONFIG_EROFS_FS_BACKED_BY_FILE,
kernel >= 6.12), in which the extra devices are opened as plain files too.

Two ways to mount:

* :func:`mount_erofs_file` - file-backed: source = bootstrap path,
  data = ``device=/abs/blob1,device=/abs/blob2,...`` (the fanotify mode and local tests);
* :func:`mount_erofs_fscache` - fscache on-demand: source "none",
  data = ``fsid=<id>[,domain_id=<d>][,device=<tag>...]`` (needs CONFIG_EROFS_FS_ONDEMAND and
  a daemon bound to /dev/cachefiles).

Failures raise :class:`~erofs_nydus.errors.KernelError` carrying the errno, the call,
a hint and the kernel log lines EROFS printed during the attempt (read from /dev/kmsg,
positioned at its end just before the call, so only new lines are shown).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from erofs_nydus.errors import KernelError, UsageError

__all__ = [
    "MNT_DETACH",
    "MNT_FORCE",
    "MS_NODEV",
    "MS_NOSUID",
    "MS_RDONLY",
    "MountEntry",
    "check_option_value",
    "host_mount_flags",
    "image_extra_devices",
    "is_mountpoint",
    "kernel_config",
    "kernel_supports_erofs",
    "kernel_supports_erofs_file_backed",
    "kernel_supports_erofs_fscache",
    "mount_at",
    "mount_containing",
    "mount_erofs_file",
    "mount_erofs_fscache",
    "mount_fstype",
    "mount_table",
    "mounted",
    "mounted_fscache",
    "umount",
]

StrPath = str | os.PathLike[str]

# <linux/mount.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
# <sys/mount.h> umount2 flags
MNT_FORCE = 0x1
MNT_DETACH = 0x2

_FSTYPE = b"erofs"
# Option separators the kernel's option parser splits on.
_BAD_OPTION_CHARS = (",", "\0", "\n")

_libc: ctypes.CDLL | None = None


def _get_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        # the libc this interpreter runs on (no find_library: that runs ldconfig)
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        lib.mount.restype = ctypes.c_int
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.umount2.restype = ctypes.c_int
        _libc = lib
    return _libc


# --------------------------------------------------------------------------------------
# Kernel log capture (best effort)
# --------------------------------------------------------------------------------------


class _KmsgTail:
    """Reads the kernel log records appended after construction (needs root).

    /dev/kmsg returns one record per read(); ``lseek(SEEK_END)`` skips the existing
    ones.  Any failure (no permission, no /dev/kmsg) makes this a no-op.
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        try:
            fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.lseek(fd, 0, os.SEEK_END)
        except OSError:
            os.close(fd)
            return
        self._fd = fd

    def read_new(self, *, limit: int = 200) -> list[str]:
        """Return the message text of records logged since construction."""
        lines: list[str] = []
        if self._fd is None:
            return lines
        for _ in range(limit):
            try:
                rec = os.read(self._fd, 8192)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EPIPE:  # records overwritten; keep reading
                    continue
                break
            if not rec:
                break
            text = rec.decode("utf-8", "replace")
            # "prio,seq,usec,flags[,more];message\n continuation lines"
            head, _, msg = text.partition(";")
            msg = msg.split("\n", 1)[0] if msg else head
            lines.append(msg)
        return lines

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> _KmsgTail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _erofs_lines(lines: Sequence[str], *, keep: int = 8) -> list[str]:
    # Keep the filesystem's own messages, not call-trace lines of an unrelated WARN.
    relevant = [
        ln for ln in lines if "erofs" in ln.lower() and not ln[:1].isspace() and "+0x" not in ln
    ]
    return relevant[-keep:]


_HINTS: dict[int, str] = {
    errno.EINVAL: (
        "the kernel rejected the image or the options (bad superblock, wrong device count, "
        "unsupported feature); see `dmesg | grep -i erofs`"
    ),
    errno.ENOENT: "a path does not exist (mountpoint, image, or a device= blob file)",
    errno.ENOTDIR: "the mountpoint is not a directory",
    errno.EPERM: "mounting needs CAP_SYS_ADMIN (run as root)",
    errno.EACCES: "permission denied on the image, a blob, or the mountpoint",
    errno.ENODEV: "the kernel does not know the 'erofs' filesystem (modprobe erofs?)",
    errno.ENOTBLK: (
        "the kernel wanted a block device: this kernel lacks file-backed EROFS "
        "(CONFIG_EROFS_FS_BACKED_BY_FILE, Linux >= 6.12)"
    ),
    errno.EBUSY: "already mounted, or in use (fsid collision in fscache mode)",
    errno.EEXIST: "fsid already registered in this fscache domain",
    errno.ENOBUFS: "no on-demand cache bound (is the cachefiles daemon running?)",
    errno.EOPNOTSUPP: "the image uses a feature this kernel does not support",
    errno.EBADMSG: "superblock checksum mismatch",
    errno.EUCLEAN: "the image is corrupt (EFSCORRUPTED)",
    errno.EIO: "I/O error reading the image or a blob",
}


def _kernel_error(
    err: int, what: str, *, log: Sequence[str] = (), extra_hint: str | None = None
) -> KernelError:
    msg = f"{what}: {os.strerror(err)} (errno {errno.errorcode.get(err, err)})"
    hint = extra_hint or _HINTS.get(err)
    if any("fsid option not supported" in ln for ln in log):
        hint = "this kernel has no fscache mode for EROFS (CONFIG_EROFS_FS_ONDEMAND is off)"
    if hint:
        msg += f"; {hint}"
    lines = _erofs_lines(log)
    if lines:
        msg += "\nkernel log:\n  " + "\n  ".join(lines)
    exc = KernelError(err, msg)
    exc.kernel_log = lines  # type: ignore[attr-defined]
    return exc


# --------------------------------------------------------------------------------------
# mount / umount
# --------------------------------------------------------------------------------------


def check_option_value(name: str, value: str) -> None:
    """Refuse a mount option value the kernel's option parser would split or cut
    (a comma, NUL or newline) or that is empty: a `UsageError` naming the option."""
    if not value:
        raise UsageError(f"empty {name}= value")
    for c in _BAD_OPTION_CHARS:
        if c in value:
            raise UsageError(f"{name}={value!r}: mount option values cannot contain {c!r}")


def _fsencode(p: StrPath) -> bytes:
    return os.fsencode(os.fspath(p))


def _do_mount(source: bytes, target: bytes, flags: int, data: str, what: str) -> None:
    libc = _get_libc()
    with _KmsgTail() as kmsg:
        rc = libc.mount(source, target, _FSTYPE, flags, os.fsencode(data) if data else None)
        if rc == 0:
            return
        err = ctypes.get_errno()
        log = kmsg.read_new()
    raise _kernel_error(err, what, log=log)


EROFS_MAGIC = 0xE0F5E1E2
_SB_OFFSET = 1024
_INCOMPAT_DEVICE_TABLE = 0x8


def image_extra_devices(bootstrap: StrPath) -> int | None:
    """``extra_devices`` from an EROFS superblock, 0 without a device table, or None
    if the file does not start with an EROFS superblock."""
    try:
        with open(bootstrap, "rb") as f:
            f.seek(_SB_OFFSET)
            sb = f.read(128)
    except OSError:
        return None
    if len(sb) < 128 or int.from_bytes(sb[0:4], "little") != EROFS_MAGIC:
        return None
    incompat = int.from_bytes(sb[80:84], "little")
    if not incompat & _INCOMPAT_DEVICE_TABLE:
        return 0
    return int.from_bytes(sb[86:88], "little")


def host_mount_flags(*, readonly: bool = True, allow_suid_dev: bool = False) -> int:
    """mount(2) flags for an image on the host: ``nosuid,nodev`` by default.

    An image is someone else's content: without them a setuid-root binary inside it
    runs as root for any local user, and a device node inside it opens the host's
    device (e.g. a world-writable node for a disk).  ``allow_suid_dev`` is the explicit
    opt-out, for a container runtime that applies its own policy.
    """
    flags = MS_RDONLY if readonly else 0
    return flags if allow_suid_dev else flags | MS_NOSUID | MS_NODEV


def mount_erofs_file(
    bootstrap: StrPath,
    mountpoint: StrPath,
    devices: Sequence[StrPath] = (),
    *,
    readonly: bool = True,
    extra_options: Sequence[str] = (),
    check_devices: bool = True,
    allow_suid_dev: bool = False,
) -> None:
    """Mount ``bootstrap`` (a regular file) at ``mountpoint`` in file-backed mode.

    ``devices`` are the blob files in device-slot order (slot i = device_id i+1);
    each is passed as ``device=<absolute path>``.  ``extra_options`` are appended
    verbatim (e.g. ``"nouser_xattr"``, ``"cache_strategy=disabled"``).
    EROFS is read-only, so ``readonly=False`` is only useful to see the kernel refuse.
    Mounts are ``nosuid,nodev`` (see :func:`host_mount_flags`) unless ``allow_suid_dev``.

    With ``check_devices`` the superblock's ``extra_devices`` must equal
    ``len(devices)`` (:class:`UsageError` otherwise): the 6.18 kernel accepts a
    file-backed mount with too few ``device=`` options and only fails later, on read.
    A file that is not EROFS at all is left for the kernel to reject.
    """
    bs = Path(os.path.abspath(os.fspath(bootstrap)))
    mp = Path(os.path.abspath(os.fspath(mountpoint)))
    if not bs.is_file():
        what = "does not exist" if not bs.exists() else "is not a regular file"
        raise KernelError(
            errno.ENOENT if not bs.exists() else errno.EINVAL,
            f"mount erofs {bs} on {mp}: bootstrap {what}",
        )
    opts: list[str] = []
    for d in devices:
        p = os.path.abspath(os.fspath(d))
        check_option_value("device", p)
        if not os.path.exists(p):
            raise KernelError(
                errno.ENOENT,
                f"mount erofs {bs} on {mp}: device file {p} does not exist (device={p})",
            )
        opts.append(f"device={p}")
    if check_devices:
        want = image_extra_devices(bs)
        if want is not None and want != len(devices):
            raise UsageError(
                f"mount erofs {bs}: the image has {want} extra device(s) (blobs) "
                f"but {len(devices)} device path(s) were given"
            )
    for o in extra_options:
        if not o or "," in o or "\0" in o:
            raise UsageError(f"bad extra mount option {o!r}")
        opts.append(o)
    data = ",".join(opts)
    flags = host_mount_flags(readonly=readonly, allow_suid_dev=allow_suid_dev)
    what = f"mount -t erofs {bs} {mp}" + (f" -o {data}" if data else "")
    _do_mount(_fsencode(bs), _fsencode(mp), flags, data, what)


def mount_erofs_fscache(
    mountpoint: StrPath,
    fsid: str,
    domain_id: str | None = None,
    devices: Sequence[str] = (),
    *,
    readonly: bool = True,
    extra_options: Sequence[str] = (),
    allow_suid_dev: bool = False,
) -> None:
    """Mount an image served by a cachefiles on-demand daemon (fscache mode).

    ``fsid`` names the primary (bootstrap) cookie; ``domain_id`` shares blob cookies
    between mounts; ``devices`` override the on-disk device-slot tags as cookie keys
    (their count must equal the image's ``extra_devices``).
    """
    mp = Path(os.path.abspath(os.fspath(mountpoint)))
    check_option_value("fsid", fsid)
    opts = [f"fsid={fsid}"]
    if domain_id is not None:
        check_option_value("domain_id", domain_id)
        opts.append(f"domain_id={domain_id}")
    for d in devices:
        check_option_value("device", d)
        opts.append(f"device={d}")
    for o in extra_options:
        if not o or "," in o or "\0" in o:
            raise UsageError(f"bad extra mount option {o!r}")
        opts.append(o)
    data = ",".join(opts)
    flags = host_mount_flags(readonly=readonly, allow_suid_dev=allow_suid_dev)
    _do_mount(b"none", _fsencode(mp), flags, data, f"mount -t erofs none {mp} -o {data}")


def umount(
    mountpoint: StrPath,
    *,
    lazy: bool = False,
    force: bool = False,
    retries: int = 10,
    delay: float = 0.05,
) -> None:
    """Unmount ``mountpoint`` with umount2(2).

    ``lazy`` uses MNT_DETACH (detach now, release when no longer busy).  EBUSY is
    retried ``retries`` times with a growing delay (page-cache readers, a shell that
    just left the directory...), then raised as :class:`KernelError`.
    """
    libc = _get_libc()
    target = _fsencode(os.path.abspath(os.fspath(mountpoint)))
    flags = (MNT_DETACH if lazy else 0) | (MNT_FORCE if force else 0)
    attempt = 0
    while True:
        rc = libc.umount2(target, flags)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EBUSY and attempt < retries:
            attempt += 1
            time.sleep(delay * attempt)
            continue
        hint = None
        if err == errno.EINVAL:
            hint = "not a mountpoint"
        elif err == errno.EBUSY:
            hint = ("still busy (open files or a process's cwd inside): close them "
                    "(see fuser -vm) and try again")
        raise _kernel_error(err, f"umount {os.fsdecode(target)}", extra_hint=hint)


@contextlib.contextmanager
def mounted(
    bootstrap: StrPath,
    mountpoint: StrPath,
    devices: Sequence[StrPath] = (),
    *,
    extra_options: Sequence[str] = (),
    lazy_umount: bool = False,
    allow_suid_dev: bool = False,
) -> Iterator[Path]:
    """``with mounted(img, mnt, [blob]) as root:`` - file-backed mount, always unmounted."""
    mount_erofs_file(bootstrap, mountpoint, devices, extra_options=extra_options,
                     allow_suid_dev=allow_suid_dev)
    try:
        yield Path(mountpoint)
    finally:
        umount(mountpoint, lazy=lazy_umount)


@contextlib.contextmanager
def mounted_fscache(
    mountpoint: StrPath,
    fsid: str,
    domain_id: str | None = None,
    devices: Sequence[str] = (),
    *,
    lazy_umount: bool = False,
) -> Iterator[Path]:
    """Context-manager form of :func:`mount_erofs_fscache`."""
    mount_erofs_fscache(mountpoint, fsid, domain_id, devices)
    try:
        yield Path(mountpoint)
    finally:
        umount(mountpoint, lazy=lazy_umount)


# --------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out: list[str] = []
    i = 0
    while i < len(field):
        c = field[i]
        if c == "\\" and field[i + 1 : i + 4].isdigit() and len(field[i + 1 : i + 4]) == 3:
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(c)
            i += 1
    return "".join(out)


class MountEntry(NamedTuple):
    mountpoint: str
    fstype: str
    source: str
    options: frozenset[str]  # per-mount and superblock options


def mount_table() -> list[MountEntry]:
    """Every mount in this namespace, in mount order, from /proc/self/mountinfo."""
    result: list[MountEntry] = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 6:
                continue
            opts = set(parts[5].split(","))
            try:
                sep = parts.index("-")
                fstype, source = parts[sep + 1], _unescape_mountinfo(parts[sep + 2])
                opts |= set(parts[sep + 3].split(","))
            except (ValueError, IndexError):
                fstype, source = "", ""
            result.append(MountEntry(_unescape_mountinfo(parts[4]), fstype, source,
                                     frozenset(opts)))
    return result


def _mount_points() -> list[tuple[str, str]]:
    """(mountpoint, fstype) for every mount in this namespace, in mount order."""
    return [(m.mountpoint, m.fstype) for m in mount_table()]


def mount_containing(path: StrPath) -> MountEntry | None:
    """The mount holding ``path`` (symlinks resolved): the longest mountpoint prefix,
    the topmost of those; None if mountinfo cannot be read."""
    real = os.path.realpath(os.fspath(path))
    best: MountEntry | None = None
    try:
        mounts = mount_table()
    except OSError:
        return None
    for m in mounts:
        mp = m.mountpoint
        if (real == mp or real.startswith(mp.rstrip("/") + "/")) and (
                best is None or len(mp) >= len(best.mountpoint)):
            best = m
    return best


def mount_at(path: StrPath) -> MountEntry | None:
    """The topmost mount at exactly ``path`` (symlinks resolved), or None."""
    real = os.path.realpath(os.fspath(path))
    found: MountEntry | None = None
    for m in mount_table():
        if m.mountpoint == real:
            found = m
    return found


def is_mountpoint(path: StrPath) -> bool:
    """True if ``path`` (symlinks resolved) is the target of a mount in this namespace.

    Uses /proc/self/mountinfo, so bind mounts on the same device count too.
    """
    real = os.path.realpath(os.fspath(path))
    try:
        return any(mp == real for mp, _ in _mount_points())
    except OSError:
        return os.path.ismount(real)


def mount_fstype(path: StrPath) -> str | None:
    """Filesystem type of the topmost mount at exactly ``path``, or None."""
    real = os.path.realpath(os.fspath(path))
    found: str | None = None
    for mp, fstype in _mount_points():
        if mp == real:
            found = fstype
    return found


def kernel_supports_erofs() -> bool:
    """True if 'erofs' is listed in /proc/filesystems (built in or module loaded)."""
    try:
        with open("/proc/filesystems", encoding="ascii", errors="replace") as f:
            return any(line.split()[-1:] == ["erofs"] for line in f)
    except OSError:
        return False


def kernel_config() -> dict[str, str] | None:
    """The running kernel's build options (``CONFIG_X`` -> ``y``/``m``/value), from
    /proc/config.gz or /boot/config-<release>; None when neither is readable."""
    import gzip

    text: str | None = None
    try:
        with gzip.open("/proc/config.gz", "rt", encoding="utf-8", errors="replace") as g:
            text = g.read()
    except OSError:
        try:
            text = Path(f"/boot/config-{os.uname().release}").read_text(errors="replace")
        except OSError:
            return None
    conf: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            k, _, v = line.partition("=")
            conf[k] = v
    return conf


def _kernel_version() -> tuple[int, int]:
    rel = os.uname().release
    nums: list[int] = []
    for part in rel.split(".")[:2]:
        digits = ""
        for c in part:
            if not c.isdigit():
                break
            digits += c
        nums.append(int(digits) if digits else 0)
    while len(nums) < 2:
        nums.append(0)
    return nums[0], nums[1]


def kernel_supports_erofs_file_backed() -> bool:
    """Best guess, without mounting anything, that file-backed EROFS mounts work.

    Needs erofs registered in /proc/filesystems and either the kernel config saying
    ``CONFIG_EROFS_FS_BACKED_BY_FILE=y`` or, when no config is readable, Linux >= 6.12.
    """
    if not kernel_supports_erofs():
        return False
    conf = kernel_config()
    if conf is not None and "CONFIG_EROFS_FS" in conf:
        return conf.get("CONFIG_EROFS_FS_BACKED_BY_FILE") == "y"
    return _kernel_version() >= (6, 12)


def kernel_supports_erofs_fscache() -> bool:
    """True if fscache on-demand mode looks usable: erofs, /dev/cachefiles, and the
    on-demand options in the kernel config (when readable)."""
    if not kernel_supports_erofs() or not os.path.exists("/dev/cachefiles"):
        return False
    conf = kernel_config()
    if conf is not None and "CONFIG_EROFS_FS" in conf:
        return conf.get("CONFIG_EROFS_FS_ONDEMAND") == "y"
    return _kernel_version() >= (5, 19)
