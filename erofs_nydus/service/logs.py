"""The daemon's log (`<cache-dir>/daemon.log`): rate-limited and capped in size.

A reader hammering a corrupt file makes the daemon log one line per denied read
(821 KB in 10 s were seen): so lines with the same message template are let through
`burst` times per `window` seconds, then suppressed with one notice and counted
(`suppressed_total`, exported as the `erofs_nydus_log_suppressed` metric); the next
line of that template after the window says how many were dropped.

The supervisor and daemon write their stderr to `daemon.log` (the CLI started them
with it as stdio).  When it grows past `max_bytes` it is renamed `daemon.log.1` (the
previous one goes) and a fresh file takes fds 1 and 2; a process that finds another
one rotated follows it to the new file.  A daemon run in the foreground (stderr not
that file: a terminal, journald) is never rotated.

Writing the log must never take a daemon down: `daemon.log` lives in the cache dir,
which a filling cache disk fills too (ENOSPC), and an exception out of a log call
ends whatever loop made it (the worker, the supervisor, the keeper: with all three
gone a mount's holes read as zeros).  So `install` puts stdout and stderr on writers
that drop what the disk refuses and count it (`write_errors_total`, exported as
`erofs_nydus_log_write_errors`): `print`, tracebacks and the log handler alike.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from erofs_nydus.fsutil import open_private

__all__ = ["CappedLogHandler", "DropOnErrorWriter", "RateLimit", "install", "limit_hit",
           "limit_hits", "set_log_file", "suppressed_total", "tolerant_stdio",
           "write_errors_total"]

DEFAULT_BURST = 20
DEFAULT_WINDOW = 60.0
DEFAULT_MAX_BYTES = 8 << 20
_MAX_KEYS = 1024

_suppressed = 0
_suppressed_lock = threading.Lock()


def suppressed_total() -> int:
    """Log lines this process dropped by rate limiting."""
    return _suppressed


_write_errors = 0
# the disk is full or over quota: not a reason to stop rotating once space is back
_TRANSIENT = frozenset({errno.ENOSPC, errno.EDQUOT})


def write_errors_total() -> int:
    """Writes to stdout/stderr (the log) this process dropped because they failed."""
    return _write_errors


def _count_write_error() -> None:
    global _write_errors
    with _suppressed_lock:
        _write_errors += 1


class DropOnErrorWriter(io.RawIOBase):
    """A raw writer on `fd` whose writes never raise: what the fd refuses (ENOSPC,
    EIO, EPIPE...) is dropped and counted.  Each write goes straight to the fd (no
    buffer keeps refused bytes to fail again later); the fd is never closed here."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        done = 0
        try:
            while done < len(view):
                n = os.write(self._fd, view[done:])
                if n <= 0:
                    break
                done += n
        except OSError:
            _count_write_error()
        return len(view)


def tolerant_stdio() -> None:
    """Put `sys.stdout`/`sys.stderr` on `DropOnErrorWriter`s (line by line, same fds)."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        try:
            os.fstat(fd)
        except OSError:
            continue  # closed: leave it as it is
        old = getattr(sys, name)
        if isinstance(getattr(old, "buffer", None), DropOnErrorWriter):
            continue
        with contextlib.suppress(Exception):
            old.flush()
        setattr(sys, name, io.TextIOWrapper(
            DropOnErrorWriter(fd), encoding="utf-8", errors="backslashreplace",
            line_buffering=True, write_through=True))


_limits: dict[str, int] = {}


def limit_hit(name: str, logger: logging.Logger, msg: str, *args: object) -> None:
    """A bound (request size, queue length...) was hit: log it (rate-limited like any
    line) and count it, as `erofs_nydus_limit_hits{limit=name}`."""
    with _suppressed_lock:
        _limits[name] = _limits.get(name, 0) + 1
    logger.warning(msg, *args)


def limit_hits() -> dict[str, int]:
    with _suppressed_lock:
        return dict(_limits)


class RateLimit(logging.Filter):
    """Let each message template through `burst` times per `window` seconds."""

    def __init__(self, burst: int = DEFAULT_BURST, window: float = DEFAULT_WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.window = window
        self.clock = clock
        self._seen: dict[tuple[str, int, str], list[float]] = {}  # [start, passed, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        global _suppressed
        if getattr(record, "rate_limit_notice", False):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        notice = None
        with self._lock:
            st = self._seen.get(key)
            if st is None or now - st[0] >= self.window:
                if st is None and len(self._seen) >= _MAX_KEYS:
                    self._forget(now)
                dropped = int(st[2]) if st is not None else 0
                self._seen[key] = [now, 1, 0]
                if dropped:
                    notice = f"{dropped} more like this were suppressed: {record.msg}"
                passed = True
            else:
                st[1] += 1
                passed = st[1] <= self.burst
                if not passed:
                    st[2] += 1
                    if st[2] == 1:
                        notice = (f"rate limit: more messages like this are suppressed for up "
                                  f"to {self.window:.0f} s: {record.msg}")
        if not passed:
            with _suppressed_lock:
                _suppressed += 1
        if notice is not None:
            logging.getLogger(record.name).log(
                record.levelno, "%s", notice, extra={"rate_limit_notice": True})
        return passed

    def _forget(self, now: float) -> None:
        for k in [k for k, st in self._seen.items() if now - st[0] >= self.window]:
            del self._seen[k]
        if len(self._seen) >= _MAX_KEYS:
            self._seen.clear()


class CappedLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stderr handler that rotates the log file stderr writes to once too big."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, fds: tuple[int, ...] = (1, 2),
                 stream: TextIO | None = None) -> None:
        super().__init__(sys.stderr if stream is None else stream)
        self.path: str | None = None  # set by manage()
        self.max_bytes = max_bytes
        self.fds = fds  # the descriptors that point at the log (stdout and stderr)

    def emit(self, record: logging.LogRecord) -> None:
        """Write one line; never raises (a log call must not end the caller's loop)."""
        try:
            if self.path is not None:
                self._rotating(self._follow)  # a line must land in the current file
            super().emit(record)  # a failed write goes to handleError below
            if self.path is not None:
                self._rotating(self._cap)
        except Exception:
            _count_write_error()

    def handleError(self, record: logging.LogRecord) -> None:
        # StreamHandler's default prints a traceback per failed line to stderr, the
        # very file that just failed: count it instead.
        _count_write_error()

    def _rotating(self, step: Callable[[], None]) -> None:
        try:
            step()
        except OSError as exc:
            _count_write_error()
            if exc.errno in _TRANSIENT:
                return  # the disk is full: try again with a later line
            self.path = None  # no rotation rather than a failure per line
            with contextlib.suppress(Exception):
                self.stream.write(f"daemon.log rotation disabled: {exc}\n")
                self.stream.flush()

    def manage(self, path: str) -> bool:
        """Rotate `path` from now on if it is what our stderr writes to (not when the
        daemon runs in the foreground with a terminal or journald as stderr)."""
        try:
            mine, cur = os.fstat(self.fds[-1]), os.stat(path)
        except OSError:
            return False
        if (mine.st_dev, mine.st_ino) != (cur.st_dev, cur.st_ino):
            return False
        self.path = path
        return True

    def _follow(self) -> None:
        """Point our fds at `path` again if another process rotated it."""
        assert self.path is not None
        mine = os.fstat(self.fds[-1])
        try:
            cur = os.stat(self.path)
        except FileNotFoundError:
            return  # removed under us: keep writing where we were
        if (mine.st_dev, mine.st_ino) != (cur.st_dev, cur.st_ino):
            self._point_at(self.path)

    def _cap(self) -> None:
        assert self.path is not None
        self.flush()
        mine = os.fstat(self.fds[-1])
        if mine.st_size <= self.max_bytes:
            return
        try:
            cur = os.stat(self.path)
        except FileNotFoundError:
            cur = None  # renamed earlier, but its successor could not be created
        if cur is not None and (cur.st_dev, cur.st_ino) == (mine.st_dev, mine.st_ino):
            os.replace(self.path, self.path + ".1")
        self._point_at(self.path, create=True)

    def _point_at(self, path: str, *, create: bool = False) -> None:
        self.flush()
        flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0)
        new = open_private(path, flags)
        try:
            for fd in self.fds:
                os.dup2(new, fd, inheritable=fd < 3)
        finally:
            os.close(new)


_handler: CappedLogHandler | None = None


def install(fmt: str, log_path: str | None = None) -> None:
    """Log to stderr at $EROFS_NYDUS_LOG (INFO) with rate limiting and, once the log
    file is known (`log_path` or `set_log_file`), size capping."""
    global _handler
    tolerant_stdio()
    _handler = CappedLogHandler()
    if log_path is not None:
        _handler.manage(log_path)
    _handler.setFormatter(logging.Formatter(fmt))
    _handler.addFilter(RateLimit())
    logging.basicConfig(level=os.environ.get("EROFS_NYDUS_LOG", "INFO"), handlers=[_handler],
                        force=True)


def set_log_file(path: str) -> None:
    """Name the file stderr is expected to be (`<cache-dir>/daemon.log`)."""
    if _handler is not None:
        _handler.manage(path)
