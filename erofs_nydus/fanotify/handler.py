"""fanotify request source (Linux >= 6.14 pre-content hooks).

The daemon owns a `FAN_CLASS_PRE_CONTENT` group with a `FAN_PRE_ACCESS` mark on
every incomplete blob cache file.  A read of a marked file blocks in the kernel and
queues an event carrying the byte range and an fd opened without notification.
`FanotifyHandler.handle` fills the range through the core (in a worker thread,
writing through the event's fd so the write cannot recurse), then answers
`FAN_ALLOW`; any failure answers `FAN_DENY` with `EIO`, so the reader gets an error
and never sees a hole as zeros.  Every event gets exactly one answer and its fd is
closed.  A blob whose chunks are all present is unmarked, so warm reads never leave
the kernel.

Events come either straight from the group fd (`serve_group`, used in tests and
single-process mode) or from the supervisor, which reads the group fd itself and
forwards events with their fds so they survive a daemon crash (`supervisor.py`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.to_thread

from erofs_nydus.daemon.core import BlobServer
from erofs_nydus.fanotify import protocol as fp
from erofs_nydus.fanotify.group import add_mark, init_group, remove_mark

__all__ = [
    "FanotifyHandler",
    "FanotifyStats",
    "add_mark",
    "init_group",
    "remove_mark",
]

log = logging.getLogger("erofs_nydus.daemon")

READ_BUFFER = 64 * 1024


@dataclass
class FanotifyStats:
    events: int = 0
    allowed: int = 0
    denied: int = 0
    bytes_requested: int = 0
    hits: int = 0
    response_errors: int = 0

    def snapshot(self) -> dict[str, float]:
        out: dict[str, float] = dict(vars(self))
        if self.bytes_requested:
            out["events_per_mib"] = self.events / (self.bytes_requested / (1 << 20))
        return out


Lookup = Callable[[int, int], BlobServer | None]


class FanotifyHandler:
    """Answers pre-content events: fill the range via the core, then ALLOW or DENY(EIO)."""

    def __init__(
        self,
        group_fd: int,
        lookup: Lookup,
        *,
        workers: int = 16,
        on_answered: Callable[[int], None] | None = None,
        on_complete: Callable[[BlobServer], None] | None = None,
    ) -> None:
        self.group_fd = group_fd
        self.lookup = lookup
        self.limiter = anyio.CapacityLimiter(workers)
        self.on_answered = on_answered
        self.on_complete = on_complete
        self.stats = FanotifyStats()
        self._write_lock = threading.Lock()

    def respond(self, response_fd: int, allow: bool) -> None:
        msg = fp.allow(response_fd) if allow else fp.deny(response_fd, errno.EIO)
        try:
            with self._write_lock:
                os.write(self.group_fd, msg)
        except OSError as exc:
            # ENOENT: nothing pending under that fd (answered before a daemon restart).
            self.stats.response_errors += 1
            log.warning("fanotify response for fd %d failed: %s", response_fd, exc)

    def _target(self, ev: fp.FanotifyEvent, local_fd: int) -> tuple[BlobServer, int, int]:
        if ev.problem is not None:
            raise OSError(errno.EPROTO, f"malformed event: {ev.problem}")
        st = os.fstat(local_fd)
        server = self.lookup(st.st_dev, st.st_ino)
        if server is None:
            raise OSError(errno.ENOENT, f"event for unknown file (dev {st.st_dev} ino {st.st_ino})")
        if ev.range is not None:
            return server, ev.range.offset, ev.range.count
        return server, 0, server.cache.size  # no range: the whole file may be touched

    def _finish(self, ev: fp.FanotifyEvent, local_fd: int, response_fd: int, ok: bool) -> None:
        if ok:  # count first: the reader may look at stats as soon as it is answered
            self.stats.allowed += 1
        else:
            self.stats.denied += 1
        self.respond(response_fd, ok)
        with contextlib.suppress(OSError):
            os.close(local_fd)
        if self.on_answered is not None:
            self.on_answered(response_fd)

    def try_answer(self, ev: fp.FanotifyEvent, local_fd: int, response_fd: int) -> bool:
        """Answer at once if no data must be fetched (the common case); False if the
        event needs `handle` (a fill in a worker thread).  Never raises."""
        try:
            server, offset, count = self._target(ev, local_fd)
            if not server.is_present(offset, count):
                return False
        except Exception as exc:
            self.stats.events += 1
            log.error("deny (EIO) fd=%d pid=%d range=%s: %s", response_fd, ev.pid, ev.range, exc)
            self._finish(ev, local_fd, response_fd, False)
            return True
        self.stats.events += 1
        self.stats.hits += 1
        self.stats.bytes_requested += count
        self._finish(ev, local_fd, response_fd, True)
        return True

    async def handle(self, ev: fp.FanotifyEvent, local_fd: int, response_fd: int) -> None:
        """Answer one event exactly once and close `local_fd`; never raises."""
        self.stats.events += 1
        ok = False
        server: BlobServer | None = None
        try:
            server, offset, count = self._target(ev, local_fd)
            self.stats.bytes_requested += count
            if server.is_present(offset, count):
                self.stats.hits += 1
            else:
                await anyio.to_thread.run_sync(
                    lambda: server.fill(offset, count, fd=local_fd), limiter=self.limiter
                )
            ok = True
        except Exception as exc:
            log.error("deny (EIO) fd=%d pid=%d range=%s: %s", response_fd, ev.pid, ev.range, exc)
        finally:
            self._finish(ev, local_fd, response_fd, ok)
        if server is not None and self.on_complete is not None and server.cache.complete():
            self.on_complete(server)

    def submit(
        self, tg: anyio.abc.TaskGroup, ev: fp.FanotifyEvent, local_fd: int, response_fd: int
    ) -> None:
        """Answer `ev` now if possible, else start a task that fills and answers it."""
        if not self.try_answer(ev, local_fd, response_fd):
            tg.start_soon(self.handle, ev, local_fd, response_fd)

    async def dispatch(self, tg: anyio.abc.TaskGroup, events: list[fp.FanotifyEvent]) -> None:
        """Start a handler per permission event read directly from the group fd."""
        for ev in events:
            if ev.needs_response:
                self.submit(tg, ev, ev.fd, ev.fd)

    async def serve_group(self) -> None:
        """Read events from the (non-blocking) group fd until cancelled."""
        async with anyio.create_task_group() as tg:
            while True:
                await anyio.wait_readable(self.group_fd)
                while True:
                    try:
                        buf = os.read(self.group_fd, READ_BUFFER)
                    except BlockingIOError:
                        break
                    if not buf:
                        break
                    events, err = fp.split_events(buf)
                    if err is not None:
                        log.error("fanotify: %s (rest of the batch dropped)", err)
                    await self.dispatch(tg, events)
