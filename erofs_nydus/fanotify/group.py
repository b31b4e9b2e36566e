"""The fanotify group and its marks: the syscalls, with nothing else imported.

Split from `handler` so that the processes that only open a group or test for
pre-content support (`mount` choosing its mode, the supervisor holding the group)
do not import the core, anyio and the codecs the handler needs to fill ranges.
"""

from __future__ import annotations

import errno
import importlib
import os
from typing import Any

from erofs_nydus.errors import KernelError

__all__ = ["add_mark", "init_group", "remove_mark"]


def _lib() -> Any:
    """The compiled cffi module (imported lazily: pure modules must not need it)."""
    return importlib.import_module("erofs_nydus._native._fanotify")


def init_group(*, nonblock: bool = True) -> int:
    """Create a pre-content fanotify group; return its fd (close-on-exec)."""
    native = _lib()
    lib = native.lib
    flags = lib.FAN_CLASS_PRE_CONTENT | lib.FAN_CLOEXEC | lib.FAN_UNLIMITED_QUEUE
    if nonblock:
        flags |= lib.FAN_NONBLOCK
    fd = int(lib.fanotify_init(flags, lib.O_RDWR | lib.O_LARGEFILE))
    if fd < 0:
        err = int(native.ffi.errno)
        hint = {
            errno.EPERM: "needs CAP_SYS_ADMIN (run as root)",
            errno.EINVAL: "this kernel lacks pre-content fanotify (Linux >= 6.14 with "
            "CONFIG_FANOTIFY_ACCESS_PERMISSIONS)",
            errno.ENOSYS: "fanotify is not built into this kernel",
        }.get(err, "")
        raise KernelError(err, f"fanotify_init: {os.strerror(err)}" + (f"; {hint}" if hint else ""))
    return fd


def _mark(group_fd: int, target: str | int, flags: int) -> None:
    native = _lib()
    lib = native.lib
    if isinstance(target, int):
        rc = lib.fanotify_mark(group_fd, flags, lib.FAN_PRE_ACCESS, target, native.ffi.NULL)
        what = f"fd {target}"
    else:
        rc = lib.fanotify_mark(
            group_fd, flags, lib.FAN_PRE_ACCESS, lib.AT_FDCWD, os.fsencode(target)
        )
        what = target
    if rc != 0:
        err = int(native.ffi.errno)
        raise KernelError(err, f"fanotify_mark({what}): {os.strerror(err)}")


def add_mark(group_fd: int, target: str | int) -> None:
    """Report FAN_PRE_ACCESS for the file `target` (path, or an fd of it).

    Only files opened *after* this call generate events (the kernel decides at
    open), so mark cache files before mounting them.
    """
    _mark(group_fd, target, _lib().lib.FAN_MARK_ADD)


def remove_mark(group_fd: int, target: str | int) -> None:
    _mark(group_fd, target, _lib().lib.FAN_MARK_REMOVE)
