"""Sans-I/O codec for the fanotify permission-event ABI (Linux uapi `fanotify.h`).

A `read()` on a fanotify group returns back-to-back events:

    struct fanotify_event_metadata {   /* 24 bytes */
        u32 event_len; u8 vers; u8 reserved; u16 metadata_len;
        u64 mask; s32 fd; s32 pid;
    };

followed (inside `event_len`) by info records, each starting with
`{u8 info_type; u8 pad; u16 len}`.  Pre-content events (`FAN_PRE_ACCESS`, 6.14+)
carry a range record (type 6): `{hdr; u32 pad; u64 offset; u64 count}`.

A permission event is answered by writing `struct fanotify_response {s32 fd;
u32 response}`: `FAN_ALLOW`, `FAN_DENY`, or (pre-content groups, 6.14+)
`FAN_DENY | (errno & 0xff) << 24`, which makes the blocked syscall fail with that
errno.  No info record is needed for an errno response.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from erofs_nydus.errors import ProtocolError

__all__ = [
    "EVENT_METADATA_LEN",
    "FAN_ALLOW",
    "FAN_DENY",
    "FAN_NOFD",
    "FAN_PRE_ACCESS",
    "INFO_TYPE_RANGE",
    "METADATA_VERSION",
    "RESPONSE_LEN",
    "FanotifyEvent",
    "FileRange",
    "InfoRecord",
    "allow",
    "decode_response",
    "deny",
    "encode_event",
    "encode_response",
    "parse_events",
    "split_events",
]

METADATA_VERSION = 3
EVENT_METADATA_LEN = 24
RESPONSE_LEN = 8
INFO_HEADER_LEN = 4
RANGE_RECORD_LEN = 24

FAN_PRE_ACCESS = 0x0010_0000
FAN_Q_OVERFLOW = 0x0000_4000
INFO_TYPE_RANGE = 6

FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_NOFD = -1
_ERRNO_SHIFT = 24
_ERRNO_MASK = 0xFF

_META = struct.Struct("<IBBHQii")
_INFO_HDR = struct.Struct("<BBH")
_RANGE = struct.Struct("<BBHIQQ")
_RESPONSE = struct.Struct("<iI")


@dataclass(frozen=True, slots=True)
class FileRange:
    """Byte range [offset, offset+count) the blocked access wants to touch."""

    offset: int
    count: int

    @property
    def end(self) -> int:
        return self.offset + self.count


@dataclass(frozen=True, slots=True)
class InfoRecord:
    """An info record this codec does not interpret (payload after the 4-byte header)."""

    info_type: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class FanotifyEvent:
    mask: int
    fd: int
    pid: int
    range: FileRange | None = None
    records: tuple[InfoRecord, ...] = ()
    problem: str | None = None  # set when the header parsed but the info records did not

    @property
    def is_pre_access(self) -> bool:
        return bool(self.mask & FAN_PRE_ACCESS)

    @property
    def is_overflow(self) -> bool:
        return bool(self.mask & FAN_Q_OVERFLOW)

    @property
    def needs_response(self) -> bool:
        """Permission events carry an fd that must be answered (and closed)."""
        return self.fd >= 0


def _parse_records(body: bytes, base: int) -> tuple[FileRange | None, tuple[InfoRecord, ...]]:
    pos = 0
    rng: FileRange | None = None
    others: list[InfoRecord] = []
    while pos < len(body):
        if len(body) - pos < INFO_HEADER_LEN:
            raise ProtocolError(f"truncated info record header at byte {base + pos}")
        info_type, _pad, length = _INFO_HDR.unpack_from(body, pos)
        if length < INFO_HEADER_LEN or pos + length > len(body):
            raise ProtocolError(f"info record at byte {base + pos} has bad length {length}")
        if info_type == INFO_TYPE_RANGE:
            if length < RANGE_RECORD_LEN:
                raise ProtocolError(f"range record at byte {base + pos} too short ({length})")
            if rng is not None:
                raise ProtocolError(f"second range record at byte {base + pos}")
            _t, _p, _l, _pad32, offset, count = _RANGE.unpack_from(body, pos)
            rng = FileRange(offset, count)
        else:
            others.append(InfoRecord(info_type, bytes(body[pos + INFO_HEADER_LEN : pos + length])))
        pos += length
    return rng, tuple(others)


def split_events(buf: bytes) -> tuple[list[FanotifyEvent], ProtocolError | None]:
    """Parse as much of `buf` as possible.

    Returns the events parsed and the first framing error (or None).  An event whose
    header is sound but whose info records are not is returned with `problem` set, so
    its fd can still be answered; after a framing error nothing further is trusted.
    """
    events: list[FanotifyEvent] = []
    view = memoryview(buf)
    pos = 0
    while pos < len(view):
        if len(view) - pos < EVENT_METADATA_LEN:
            return events, ProtocolError(
                f"truncated event metadata at byte {pos} ({len(view) - pos} bytes left)"
            )
        event_len, vers, _res, meta_len, mask, fd, pid = _META.unpack_from(view, pos)
        if vers != METADATA_VERSION:
            return events, ProtocolError(f"event at byte {pos}: metadata version {vers}")
        if meta_len < EVENT_METADATA_LEN or event_len < meta_len:
            return events, ProtocolError(
                f"event at byte {pos}: bad lengths (event_len={event_len}, metadata_len={meta_len})"
            )
        if pos + event_len > len(view):
            return events, ProtocolError(
                f"event at byte {pos}: event_len {event_len} runs past the buffer"
            )
        body = bytes(view[pos + meta_len : pos + event_len])
        try:
            rng, records = _parse_records(body, pos + meta_len)
        except ProtocolError as exc:
            events.append(FanotifyEvent(mask, fd, pid, problem=str(exc)))
        else:
            events.append(FanotifyEvent(mask, fd, pid, rng, records))
        pos += event_len
    return events, None


def parse_events(buf: bytes) -> list[FanotifyEvent]:
    """Strict parse: any malformed byte raises `ProtocolError`."""
    events, err = split_events(buf)
    if err is not None:
        raise err
    for ev in events:
        if ev.problem is not None:
            raise ProtocolError(ev.problem)
    return events


def encode_event(
    mask: int,
    fd: int,
    pid: int,
    rng: FileRange | None = None,
    records: tuple[InfoRecord, ...] = (),
) -> bytes:
    """Build one event as the kernel would (tests, and re-framing by the supervisor)."""
    body = b""
    if rng is not None:
        body += _RANGE.pack(INFO_TYPE_RANGE, 0, RANGE_RECORD_LEN, 0, rng.offset, rng.count)
    for r in records:
        body += _INFO_HDR.pack(r.info_type, 0, INFO_HEADER_LEN + len(r.payload)) + r.payload
    event_len = EVENT_METADATA_LEN + len(body)
    head = _META.pack(event_len, METADATA_VERSION, 0, EVENT_METADATA_LEN, mask, fd, pid)
    return head + body


def encode_response(fd: int, response: int) -> bytes:
    return _RESPONSE.pack(fd, response)


def decode_response(buf: bytes) -> tuple[int, int]:
    if len(buf) != RESPONSE_LEN:
        raise ProtocolError(f"fanotify response must be {RESPONSE_LEN} bytes, got {len(buf)}")
    fd, response = _RESPONSE.unpack(buf)
    return fd, response


def allow(fd: int) -> bytes:
    return encode_response(fd, FAN_ALLOW)


def deny(fd: int, errno: int | None = None) -> bytes:
    """FAN_DENY, or FAN_DENY_ERRNO(errno) when `errno` is given (1..255)."""
    if errno is None:
        return encode_response(fd, FAN_DENY)
    if not 0 < errno <= _ERRNO_MASK:
        raise ValueError(f"errno {errno} does not fit a fanotify deny response")
    return encode_response(fd, FAN_DENY | (errno << _ERRNO_SHIFT))


def response_errno(response: int) -> int:
    """The errno carried by a response (0 for none)."""
    return (response >> _ERRNO_SHIFT) & _ERRNO_MASK
