"""Process settings both daemon shells (fanotify and fscache mode) share: OOM
protection, the open-file limit, dying with the parent, the read deadline."""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import signal
import sys
from typing import NoReturn

__all__ = ["NOFILE", "die_with_parent", "raise_nofile", "read_deadline", "set_oom_score_adj"]

log = logging.getLogger("erofs_nydus.supervisor")

# Open-file limit for the daemons: every in-flight request holds an fd in the
# supervisor and in the daemon, every blob a cache fd.  In fanotify mode also the
# range of fd numbers a successor supervisor sweeps.
NOFILE = 65536
PR_SET_PDEATHSIG = 1


def read_deadline() -> float:
    """Seconds an event may wait for the daemon before the supervisor answers EIO
    itself and replaces the daemon as stuck (`EROFS_NYDUS_READ_DEADLINE`, default 60)."""
    try:
        return max(0.5, float(os.environ.get("EROFS_NYDUS_READ_DEADLINE", "60")))
    except ValueError:
        return 60.0


def die_with_parent(parent: int) -> None:
    """SIGKILL this (forked) process when its parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


def set_oom_score_adj(value: int) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError as exc:
        log.warning("cannot set oom_score_adj %d: %s", value, exc)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE if hard == resource.RLIM_INFINITY else min(hard, NOFILE)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit to %d: %s", want, exc)


def exit_forked_child(code: int) -> NoReturn:
    """End a forked child: flush what it can, then `os._exit`, whatever the flush does.

    A flush that raises (its log on a full disk) must never let the child return into
    the code of the process it was forked from: it would run a second supervisor loop.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(code)


def close_fds_except(keep: set[int]) -> None:
    """In a forked child: close every descriptor above stdio except those in `keep`."""
    lo = 3
    for fd in sorted(keep):
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, 1 << 20)
