"""fanotify event/response codec: table tests and fuzzing."""

from __future__ import annotations

import contextlib
import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from erofs_nydus.errors import ProtocolError
from erofs_nydus.fanotify import protocol as fp

Spec = tuple[int, int, int, object, list[tuple[int, bytes]]]


def _meta(event_len: int, fd: int = 5, mask: int = fp.FAN_PRE_ACCESS, vers: int = 3) -> bytes:
    return struct.pack("<IBBHQii", event_len, vers, 0, 24, mask, fd, 1234)


def test_pre_access_event_with_range() -> None:
    raw = _meta(48) + struct.pack("<BBHIQQ", 6, 0, 24, 0, 8192, 4096)
    (ev,) = fp.parse_events(raw)
    assert ev.fd == 5 and ev.pid == 1234 and ev.is_pre_access
    assert ev.range == fp.FileRange(8192, 4096)
    assert ev.range.end == 12288
    assert ev.records == () and ev.problem is None


def test_roundtrip_multiple_events_and_unknown_records() -> None:
    rec = fp.InfoRecord(4, b"\x07\x00\x00\x00")
    raw = (
        fp.encode_event(fp.FAN_PRE_ACCESS, 7, 1, fp.FileRange(0, 1 << 20))
        + fp.encode_event(fp.FAN_PRE_ACCESS, 8, 2, None, (rec,))
        + fp.encode_event(fp.FAN_PRE_ACCESS, 9, 3, fp.FileRange(1 << 40, 1), (rec,))
    )
    evs = fp.parse_events(raw)
    assert [e.fd for e in evs] == [7, 8, 9]
    assert evs[0].range == fp.FileRange(0, 1 << 20)
    assert evs[1].range is None and evs[1].records == (rec,)
    assert evs[2].range == fp.FileRange(1 << 40, 1)


def test_metadata_only_event() -> None:
    (ev,) = fp.parse_events(_meta(24, fd=-1, mask=0x4000))
    assert ev.is_overflow and not ev.needs_response


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b"\x00" * 10, "truncated event metadata"),
        (_meta(24, vers=2), "metadata version"),
        (_meta(20), "bad lengths"),
        (_meta(100), "runs past"),
        (_meta(24) + b"\x01", "truncated event metadata"),
    ],
)
def test_framing_errors(raw: bytes, what: str) -> None:
    with pytest.raises(ProtocolError, match=what):
        fp.parse_events(raw)


@pytest.mark.parametrize(
    ("body", "what"),
    [
        (b"\x06\x00", "truncated info record"),
        (struct.pack("<BBH", 6, 0, 2), "bad length"),
        (struct.pack("<BBH", 6, 0, 40) + b"\x00" * 4, "bad length"),
        (struct.pack("<BBHI", 6, 0, 8, 0), "too short"),
        (struct.pack("<BBHIQQ", 6, 0, 24, 0, 0, 1) * 2, "second range"),
    ],
)
def test_record_errors_keep_fd(body: bytes, what: str) -> None:
    raw = _meta(24 + len(body), fd=11) + body + fp.encode_event(fp.FAN_PRE_ACCESS, 12, 1)
    events, err = fp.split_events(raw)
    assert err is None
    assert [e.fd for e in events] == [11, 12]
    assert events[0].problem is not None and what in events[0].problem
    with pytest.raises(ProtocolError, match=what):
        fp.parse_events(raw)


def test_split_events_keeps_events_before_framing_error() -> None:
    raw = fp.encode_event(fp.FAN_PRE_ACCESS, 3, 1, fp.FileRange(0, 1)) + b"\xff" * 30
    events, err = fp.split_events(raw)
    assert [e.fd for e in events] == [3]
    assert isinstance(err, ProtocolError)


def test_responses() -> None:
    assert fp.allow(5) == struct.pack("<iI", 5, 1)
    assert fp.deny(5) == struct.pack("<iI", 5, 2)
    # FAN_DENY_ERRNO(EIO) = FAN_DENY | (EIO & 0xff) << 24
    assert fp.deny(5, errno.EIO) == struct.pack("<iI", 5, 2 | (5 << 24))
    fd, resp = fp.decode_response(fp.deny(9, errno.ENOSPC))
    assert fd == 9 and resp & 0xFF == fp.FAN_DENY and fp.response_errno(resp) == errno.ENOSPC
    assert fp.response_errno(fp.FAN_ALLOW) == 0
    with pytest.raises(ValueError):
        fp.deny(1, 256)
    with pytest.raises(ValueError):
        fp.deny(1, 0)
    with pytest.raises(ProtocolError):
        fp.decode_response(b"\x00" * 7)


@given(st.binary(max_size=300))
def test_garbage_only_raises_protocol_error(data: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        fp.parse_events(data)
    events, err = fp.split_events(data)
    assert err is None or isinstance(err, ProtocolError)
    assert all(isinstance(e, fp.FanotifyEvent) for e in events)


@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**64 - 1),
            st.integers(-(2**31), 2**31 - 1),
            st.integers(-(2**31), 2**31 - 1),
            st.none() | st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
            st.lists(
                st.tuples(st.integers(0, 255).filter(lambda t: t != 6), st.binary(max_size=20)),
                max_size=3,
            ),
        ),
        max_size=6,
    )
)
def test_encode_parse_roundtrip(specs: list[Spec]) -> None:
    raw = b""
    expected = []
    for mask, fd, pid, rng, recs in specs:
        r = fp.FileRange(*rng) if isinstance(rng, tuple) else None
        records = tuple(fp.InfoRecord(t, p) for t, p in recs)
        raw += fp.encode_event(mask, fd, pid, r, records)
        expected.append(fp.FanotifyEvent(mask, fd, pid, r, records))
    assert fp.parse_events(raw) == expected
