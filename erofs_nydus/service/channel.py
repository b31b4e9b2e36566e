"""Supervisor <-> daemon channel: JSON messages with fds over a SOCK_SEQPACKET pair
(both modes; "events", "done", "keep"/"drop" and "counters" are fanotify mode's).

One `sendmsg` is one message (boundaries kept, fds travel with it via SCM_RIGHTS).

supervisor -> daemon
    {"op": "hello", "cache_dir": ..., "restart": bool, "resident": bool}
                                                 fds: [request source (fanotify group or
                                                 /dev/cachefiles), control listener]
    {"op": "events", "events": [{fd, mask, pid, offset?, count?, problem?}, ...]}
                                                 fds: one per event, same order
    {"op": "stop"}                               SIGTERM/SIGINT: stop if no mounts live
    {"op": "ping"}
daemon -> supervisor
    {"op": "done", "fds": [event fd numbers as the supervisor knows them]}
    {"op": "shutdown"}                           no mounts left: stop everything
    {"op": "stop_refused", "mounts": n}          answer to "stop" with mounts live
    {"op": "pong"}                               answer to {"op": "ping"} (liveness)
    {"op": "deadline", "seconds": s}             fills may take this long (registry)
    {"op": "keep"|"drop", "blob": id}            a cache fd to keep (fds: [it]) / forget

Backpressure: the daemon sends through a `Sender` (a thread with a bounded queue):
nothing is dropped; when the bound is hit the producer waits, and that is logged and
counted.  The bound cannot be reached in normal operation: "done" messages follow
answered events, and the supervisor keeps at most `MAX_INFLIGHT` events in flight.

Event fd numbers stay those of the supervisor (the process that read the events):
they are what the kernel matches a response against, and the supervisor keeps each
event's fd open until "done", so a number is never reused for another pending event.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import socket
import threading
import time
from typing import Any

from erofs_nydus.errors import ProtocolError
from erofs_nydus.fanotify import protocol as fp

__all__ = ["MAX_FDS", "MAX_INFLIGHT", "Sender", "event_from_dict", "event_to_dict", "recv",
           "send"]

log = logging.getLogger("erofs_nydus.daemon")

MAX_FDS = 200
MAX_MESSAGE = 1 << 20
MAX_INFLIGHT = 4096  # events the supervisor reads ahead of the daemon's answers
MAX_DONE = 4096  # fd numbers in one "done" message (~40 KB of JSON)


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def send_blocking(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None,
                  *, timeout: float | None = None) -> None:
    """`send` that waits for room on a non-blocking socket (at most `timeout` s)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            send(sock, msg, fds)
            return
        except BlockingIOError:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError("channel full") from None
            select.select([], [sock], [], 1.0 if left is None else min(1.0, left))


class Sender:
    """Sends messages from any thread, in order, through one thread of its own (so
    no caller - the event loop least of all - blocks on the socket).  The queue is
    bounded; a full queue makes the caller wait, logged and counted in `full`.
    Consecutive "done" messages go out as one."""

    def __init__(self, sock: socket.socket, bound: int = 2 * MAX_INFLIGHT) -> None:
        self.sock = sock
        self.full = 0  # times a caller found the queue full and waited
        self.errors = 0
        self._q: queue.Queue[tuple[dict[str, Any], list[int]] | None] = queue.Queue(bound)
        self._last_log = 0.0
        self._thread = threading.Thread(target=self._run, name="channel-sender", daemon=True)
        self._thread.start()

    def put(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        """Queue `msg`; `fds` are duplicated now (the caller may close its own)."""
        item = (msg, [os.dup(fd) for fd in fds or []])
        try:
            self._q.put_nowait(item)
            return
        except queue.Full:
            self.full += 1
            now = time.monotonic()
            if now - self._last_log > 10:
                self._last_log = now
                log.warning("channel to the supervisor full (%d queued); waiting (%d times)",
                            self._q.maxsize, self.full)
        self._q.put(item)

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (up to `timeout` s), then stop the thread."""
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        held: tuple[dict[str, Any], list[int]] | None = None
        stop = False
        while not stop:
            item = held if held is not None else self._q.get()
            held = None
            if item is None:
                return
            msg, fds = item
            if msg.get("op") == "done" and not fds:
                numbers = list(msg.get("fds", []))
                while len(numbers) < MAX_DONE:
                    try:
                        nxt = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is not None and nxt[0].get("op") == "done" and not nxt[1]:
                        numbers += list(nxt[0].get("fds", []))
                        continue
                    if nxt is None:
                        stop = True  # after this one
                    else:
                        held = nxt  # sent next, order kept
                    break
                msg = {"op": "done", "fds": numbers}
            try:
                send_blocking(self.sock, msg, fds)
            except OSError as exc:
                self.errors += 1
                log.error("cannot send %s to the supervisor: %s", msg.get("op"), exc)
            finally:
                for fd in fds:
                    os.close(fd)


def recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message, or (None, []) at EOF.  Raises BlockingIOError when none is ready."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS + 16)
    if not data:
        return None, list(fds)
    try:
        msg = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"bad channel message: {exc}") from exc
    if not isinstance(msg, dict):
        raise ProtocolError("bad channel message: not an object")
    return msg, list(fds)


def event_to_dict(ev: fp.FanotifyEvent) -> dict[str, Any]:
    d: dict[str, Any] = {"fd": ev.fd, "mask": ev.mask, "pid": ev.pid}
    if ev.range is not None:
        d["offset"] = ev.range.offset
        d["count"] = ev.range.count
    if ev.problem is not None:
        d["problem"] = ev.problem
    return d


def event_from_dict(d: dict[str, Any]) -> fp.FanotifyEvent:
    rng = fp.FileRange(int(d["offset"]), int(d["count"])) if "offset" in d else None
    return fp.FanotifyEvent(int(d["mask"]), int(d["fd"]), int(d["pid"]), rng, (), d.get("problem"))
