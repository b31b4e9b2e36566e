"""FanotifyHandler without a kernel: a pipe stands in for the group fd, so every
response the handler writes can be read back and counted."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import anyio
import pytest
from daemon_support import CountingBackend, SyntheticBlob, make_blob, make_payloads, write_blob

from erofs_nydus.daemon.blobcache import BlobCacheFile
from erofs_nydus.daemon.core import BlobServer
from erofs_nydus.fanotify import protocol as fp
from erofs_nydus.fanotify.handler import FanotifyHandler


@pytest.fixture
def setup(tmp_path: Path) -> tuple[SyntheticBlob, BlobServer, Path]:
    sb = make_blob(make_payloads([20_000] * 8, seed=4))
    (tmp_path / "blobs").mkdir()
    write_blob(tmp_path / "blobs", sb)
    cache = BlobCacheFile(str(tmp_path), sb.blob, sb.chunks, durable=False)
    return sb, BlobServer(cache, CountingBackend(tmp_path / "blobs"), amplify=0), tmp_path


def _run(
    srv: BlobServer, events: list[tuple[fp.FanotifyEvent, int]]
) -> tuple[list[tuple[int, int]], list[int], FanotifyHandler]:
    r, w = os.pipe()
    answered: list[int] = []
    handler = FanotifyHandler(
        w,
        lambda dev, ino: srv if (dev, ino) == srv.cache.dev_ino else None,
        on_answered=answered.append,
    )

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for ev, fd in events:
                handler.submit(tg, ev, fd, ev.fd)

    anyio.run(main)
    os.close(w)
    raw = b""
    while chunk := os.read(r, 4096):
        raw += chunk
    os.close(r)
    responses = [fp.decode_response(raw[i : i + 8]) for i in range(0, len(raw), 8)]
    return responses, answered, handler


def _ev(fd: int, off: int | None, n: int = 1, problem: str | None = None) -> fp.FanotifyEvent:
    rng = fp.FileRange(off, n) if off is not None else None
    return fp.FanotifyEvent(fp.FAN_PRE_ACCESS, fd, 1, rng, (), problem)


def _fd_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def test_each_event_answered_once_and_fd_closed(
    setup: tuple[SyntheticBlob, BlobServer, Path],
) -> None:
    sb, srv, tmp = setup
    c = sb.chunks
    srv.fill(c[0].uncompressed_offset, 1)  # a hit
    other = tmp / "other"
    other.write_bytes(b"x")
    # corrupt chunk 5 in the blob: its event must be denied
    blob = tmp / "blobs" / sb.blob.blob_id
    data = bytearray(blob.read_bytes())
    data[c[5].compressed_offset + 1] ^= 1
    blob.write_bytes(bytes(data))
    specs = [
        (c[0].uncompressed_offset, None, srv.cache.data_path),  # hit
        (c[2].uncompressed_offset, None, srv.cache.data_path),  # miss -> fill
        (c[5].uncompressed_offset, None, srv.cache.data_path),  # digest mismatch
        (0, None, str(other)),  # not a blob cache file
        (0, "bad record", srv.cache.data_path),  # malformed event
        (None, None, srv.cache.data_path),  # no range: whole blob (has chunk 5) -> deny
    ]
    events = []
    fds = []
    for off, problem, path in specs:
        fd = os.open(path, os.O_RDWR)
        fds.append(fd)
        events.append((_ev(fd, off, 1, problem), fd))
    responses, answered, handler = _run(srv, events)
    got = dict(responses)
    assert sorted(answered) == sorted(fds) and len(responses) == len(fds) == len(got)
    allow, eio = fp.FAN_ALLOW, fp.FAN_DENY | (errno.EIO << 24)
    assert [got[fd] for fd in fds] == [allow, allow, eio, eio, eio, eio]
    assert all(_fd_closed(fd) for fd in fds)
    assert handler.stats.hits == 1 and handler.stats.denied == 4
    assert srv.cache.present(c[2]) and not srv.cache.present(c[5])
