"""Supervisor <-> daemon channel: JSON messages with fds over a SOCK_SEQPACKET pair.

One `sendmsg` is one message (boundaries kept, fds travel with it via SCM_RIGHTS).

supervisor -> daemon
    {"op": "hello", "cache_dir": ..., "restart": bool}
                                                 fds: [fanotify group, control listener]
    {"op": "events", "events": [{fd, mask, pid, offset?, count?, problem?}, ...]}
                                                 fds: one per event, same order
    {"op": "stop"}
daemon -> supervisor
    {"op": "done", "fds": [event fd numbers as the supervisor knows them]}
    {"op": "shutdown"}                           no mounts left: stop everything

Event fd numbers stay those of the supervisor (the process that read the events):
they are what the kernel matches a response against, and the supervisor keeps each
event's fd open until "done", so a number is never reused for another pending event.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from erofs_nydus.errors import ProtocolError
from erofs_nydus.fanotify import protocol as fp

__all__ = ["MAX_FDS", "event_from_dict", "event_to_dict", "recv", "send"]

MAX_FDS = 200
MAX_MESSAGE = 1 << 20


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


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
