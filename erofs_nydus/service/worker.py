"""The daemon process: serves fanotify events and control requests for one cache dir.

Started by the supervisor with one end of a SOCK_SEQPACKET pair (see `channel.py`);
it receives the fanotify group fd and the control listener, restores its state
from the cache dir, then runs one anyio loop with two tasks: events from the
supervisor (each filled in a worker thread, answered on the group fd, reported
"done") and the control socket (the shell's operations, `shell.ControlOps`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.buffered import BufferedByteReceiveStream

from erofs_nydus.daemon.core import BlobServer
from erofs_nydus.daemon.images import ImageTable
from erofs_nydus.errors import DaemonError
from erofs_nydus.fanotify.handler import FanotifyHandler, add_mark, remove_mark
from erofs_nydus.service import channel
from erofs_nydus.service.api import ControlPlane
from erofs_nydus.service.shell import (
    MAX_REQUEST,
    ControlOps,
    control_reply,
    receive_hello,
    setup_logging,
    too_long,
)

__all__ = ["Worker", "main"]

log = logging.getLogger("erofs_nydus.daemon")


def in_use(path: str) -> bool:
    """True while any open file description other than ours refers to `path`.

    An EROFS superblock keeps its bootstrap and device files open until it is really
    gone - after `umount -l`, as long as a file in it is open.  The kernel refuses a
    write lease (EAGAIN) on a file that others have open (verified on 6.18, also
    for the kernel's own read-only opens)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EBUSY)
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


class Worker(ControlOps):
    mode = "fanotify"

    def __init__(
        self, chan: socket.socket, group_fd: int, listener: socket.socket, cache_dir: str,
        *, resident: bool = False,
    ) -> None:
        self.chan = chan
        self.sender = channel.Sender(chan)
        self.resident = resident
        self.group_fd = group_fd
        self.listener = listener
        self.table = ImageTable(cache_dir, mark=self._mark, unmark=self._unmark)
        self.handler = FanotifyHandler(
            group_fd,
            self.table.lookup,
            on_answered=self._answered,
            on_complete=self.table.blob_complete,
        )
        self.started = time.time()
        # mountpoint -> bootstrap: unmounted (lazily) but the superblock still in use
        self.lingering: dict[str, str] = {}
        self.gate = threading.RLock()  # registrations vs stop decisions (ControlOps)
        self.supervisor_counters: dict[str, float] = {}
        self._stop: anyio.Event | None = None
        # traces, prefetch, HTTP control API (api.py)
        self.plane = ControlPlane(self.table, request_stats=self.request_stats)

    def request_stats(self) -> dict[str, float]:
        return {**self.handler.stats.snapshot(), "channel_full": float(self.sender.full),
                **self.supervisor_counters}

    # -- fanotify marks ----------------------------------------------------------------

    def _mark(self, srv: BlobServer) -> None:
        add_mark(self.group_fd, srv.cache.fd)
        # The supervisor keeps a copy of this fd (opened before the mark): a restarted
        # daemon writes through it without raising events, so it can prefetch again.
        self._tell_supervisor({"op": "keep", "blob": srv.blob_id}, [srv.cache.fd])

    def _unmark(self, srv: BlobServer) -> None:
        try:
            remove_mark(self.group_fd, srv.cache.fd)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("unmark %s: %s", srv.blob_id[:12], exc)
        self._tell_supervisor({"op": "drop", "blob": srv.blob_id})

    # -- supervisor channel ------------------------------------------------------------

    def _answered(self, response_fd: int) -> None:
        self._tell_supervisor({"op": "done", "fds": [response_fd]})

    def _tell_supervisor(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        """Send from any thread, never blocking on the socket (see channel.Sender)."""
        self.sender.put(msg, fds)

    tell = _tell_supervisor

    def close_channel(self) -> None:
        """Flush what is queued for the supervisor and stop the sender thread."""
        self.sender.close()

    async def _channel_loop(self, tg: anyio.abc.TaskGroup) -> None:
        self.chan.setblocking(False)
        while True:
            await anyio.wait_readable(self.chan)
            while True:
                try:
                    msg, fds = channel.recv(self.chan)
                except BlockingIOError:
                    break
                if msg is None:
                    log.error("supervisor gone; exiting")
                    tg.cancel_scope.cancel()
                    return
                op = msg.get("op")
                if op == "events":
                    events = msg.get("events", [])
                    if len(events) != len(fds):
                        log.error("events/fds mismatch (%d/%d): out of fds? answering "
                                  "the events without one EIO", len(events), len(fds))
                    for d, fd in zip(events, fds, strict=False):
                        ev = channel.event_from_dict(d)
                        self.handler.submit(tg, ev, fd, ev.fd)
                    for d in events[len(fds) :]:  # cannot be served, but must be answered
                        ev = channel.event_from_dict(d)
                        self.handler.stats.denied += 1
                        self.handler.respond(ev.fd, False)
                        self._answered(ev.fd)
                    for fd in fds[len(events) :]:
                        os.close(fd)
                elif op == "counters":  # the supervisor's bounds hit, for the metrics
                    for k in ("inflight_throttled", "group_read_emfile"):
                        self.supervisor_counters[k] = float(msg.get(k, 0))
                elif op == "ping":  # liveness: the supervisor replaces a stuck daemon
                    self._tell_supervisor({"op": "pong"})
                elif op == "stop":
                    # SIGTERM/SIGINT to the supervisor.  Stopping under a mount would
                    # close the fanotify group and let its holes read as zeros.
                    if await anyio.to_thread.run_sync(self.on_stop):
                        tg.cancel_scope.cancel()
                        return
                else:
                    for fd in fds:
                        os.close(fd)
                    log.error("unknown supervisor message %r", op)

    # -- control socket (the operations are the shell's: shell.ControlOps) ----------------

    def register_check(self, req: dict[str, Any], mountpoint: str) -> None:
        if mountpoint in self.lingering:
            raise DaemonError(f"{mountpoint}: the image lazily unmounted there is still in use "
                              "(files open); close them or mount elsewhere")

    def detach_hook(self, mountpoint: str) -> dict[str, Any]:
        boot = self._last_user_of(mountpoint)
        if boot is not None and in_use(boot):
            # `umount -l` with files still open: the superblock lives on and reads
            # through it; unmarking now would let its holes read as zeros.
            self.lingering[mountpoint] = boot
            log.info("%s detached but its superblock is still in use; serving it "
                     "until it is gone", mountpoint)
            return {"remaining": len(self.table.mountpoints()), "lingering": True}
        return super().detach_hook(mountpoint)

    def status_hook(self, st: dict[str, Any]) -> None:
        st["fanotify"] = self.request_stats()

    def _last_user_of(self, mountpoint: str) -> str | None:
        """The bootstrap of the image mounted at `mountpoint` if no other registered
        mount uses that image (else detaching it changes nothing for the kernel)."""
        for e in list(self.table.images.values()):
            if mountpoint in e.mountpoints:
                others = [m for m in e.mountpoints if m != mountpoint]
                return None if others else e.bootstrap
        return None

    async def _linger_loop(self) -> None:
        """Finish deferred detaches once the kernel has really let go of the image."""
        while True:
            await anyio.sleep(1.0)
            for mp, boot in list(self.lingering.items()):
                if in_use(boot):
                    continue
                del self.lingering[mp]
                log.info("%s: superblock gone; detaching", mp)
                self.plane.detaching(mp)
                try:
                    await anyio.to_thread.run_sync(self.table.detach, mp)
                except DaemonError as exc:
                    log.warning("deferred detach of %s: %s", mp, exc)
                self.plane.detached()
                if not self.resident and await anyio.to_thread.run_sync(
                        self.stop_when, lambda: not self.table.images):
                    log.info("no mounts left; stopping")
                    self._tell_supervisor({"op": "shutdown"})
                    assert self._stop is not None
                    self._stop.set()
                    return

    async def _serve_conn(self, stream: anyio.abc.SocketStream) -> None:
        reader = BufferedByteReceiveStream(stream)
        async with stream:
            while True:
                try:
                    line = await reader.receive_until(b"\n", MAX_REQUEST)
                except anyio.DelimiterNotFound:
                    # Refuse, say why, and drop the connection (the rest of the line
                    # is never read): one client cannot take the daemon down.
                    with contextlib.suppress(anyio.BrokenResourceError,
                                             anyio.ClosedResourceError):
                        await stream.send(json.dumps(too_long()).encode() + b"\n")
                    return
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                    return
                resp, shutdown = await anyio.to_thread.run_sync(
                    control_reply, line, self.dispatch)
                try:
                    await stream.send(json.dumps(resp).encode() + b"\n")
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return
                if shutdown and resp["ok"]:
                    log.info("shutdown requested")
                    self._tell_supervisor({"op": "shutdown"})
                    assert self._stop is not None
                    self._stop.set()
                    return

    async def _idle_exit(self, idle_timeout: float) -> None:
        """Stop when nothing has been registered for `idle_timeout` seconds (a CLI
        that died between starting the daemon and mounting, a deleted cache dir)."""
        idle_since = time.monotonic()
        while True:
            await anyio.sleep(min(5.0, idle_timeout))
            if self.table.images:
                idle_since = time.monotonic()
            elif (time.monotonic() - idle_since >= idle_timeout
                  and await anyio.to_thread.run_sync(
                      self.stop_when, lambda: not self.table.images)):
                log.info("no images for %.0f s; exiting", idle_timeout)
                self._tell_supervisor({"op": "shutdown"})
                assert self._stop is not None
                self._stop.set()
                return

    async def run(self) -> None:
        self._stop = anyio.Event()
        listener = await anyio.abc.SocketListener.from_socket(self.listener)
        idle = float(os.environ.get("EROFS_NYDUS_IDLE_EXIT", "60"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._channel_loop, tg)
            tg.start_soon(listener.serve, self._serve_conn, tg)
            tg.start_soon(self._linger_loop)
            if idle > 0 and not self.resident:
                tg.start_soon(self._idle_exit, idle)
            await self._stop.wait()
            tg.cancel_scope.cancel()


def run_worker(channel_fd: int) -> int:
    """Serve until told to stop or the supervisor goes away; return an exit status."""
    setup_logging("daemon")
    chan = socket.socket(fileno=channel_fd)
    hello = receive_hello(chan)
    if hello is None:
        return 2
    msg = hello.msg
    kept = _receive_kept_fds(chan, msg, hello.extra_fds)
    worker = Worker(chan, hello.source_fd, hello.listener, hello.cache_dir,
                    resident=hello.resident)
    # Restore before reading events: handed-over events may be for restored blobs.
    worker.table.kept_fds = kept
    worker.table.restarted = bool(msg.get("restart"))
    worker.table.load_state()
    worker.table.close_kept_fds()
    if not msg.get("restart"):
        # A fresh supervisor: mounts recorded by an earlier one may be gone (reboot,
        # manual umount); a restarted daemon keeps all (a mount may be in progress).
        worker.table.prune_stale()
    log.info("serving %s (%d images%s)", msg["cache_dir"], len(worker.table.images),
             ", resident" if worker.resident else "")
    # A restarted daemon that reopened a marked blob itself cannot write through that
    # fd without raising events: no prefetch for it (fds kept by the supervisor are fine).
    unsafe = set(worker.table.blobs) - worker.table.adopted if msg.get("restart") else set()
    worker.plane.restored(unsafe)
    worker.report_deadline()
    worker.plane.start()
    try:
        anyio.run(worker.run)
    finally:
        worker.plane.stop()
        worker.table.close()
        worker.close_channel()
    return 0


def _receive_kept_fds(chan: socket.socket, hello: dict[str, Any],
                      fds: list[int]) -> dict[str, int]:
    """Blob id -> cache-file fd the supervisor kept: those in the hello, then as many
    "kept" messages as the hello announces (a message carries at most MAX_FDS fds)."""
    blobs = list(hello.get("kept", []))
    fds = list(fds)
    for _ in range(int(hello.get("kept_messages", 0))):
        msg, more = channel.recv(chan)
        if msg is None or msg.get("op") != "kept":
            for fd in more:
                os.close(fd)
            break
        blobs += list(msg.get("blobs", []))
        fds += more
    if len(blobs) != len(fds):
        log.error("kept fds: %d blob ids for %d fds; ignoring them", len(blobs), len(fds))
        for fd in fds:
            os.close(fd)
        return {}
    return dict(zip(blobs, fds, strict=True))


def main() -> None:
    sys.exit(run_worker(int(sys.argv[1])))

