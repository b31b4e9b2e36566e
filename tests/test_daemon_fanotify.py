"""fanotify request source on a plain marked sparse file (no EROFS needed)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anyio.from_thread
import pytest
from daemon_support import CountingBackend, SyntheticBlob, make_blob, make_payloads, write_blob

from erofs_nydus.daemon.blobcache import BlobCacheFile
from erofs_nydus.daemon.core import BlobServer
from erofs_nydus.fanotify.handler import FanotifyHandler, add_mark, init_group, remove_mark

pytestmark = pytest.mark.kernel

KiB = 1024


def _fanotify_available() -> bool:
    from erofs_nydus.cli.mounting import fanotify_works as _fanotify_works

    return _fanotify_works()


if os.geteuid() != 0 or not _fanotify_available():
    pytest.skip("needs root and pre-content fanotify (Linux >= 6.14)", allow_module_level=True)


@dataclass
class Served:
    sb: SyntheticBlob
    server: BlobServer
    handler: FanotifyHandler
    backend: CountingBackend
    group: int
    path: str
    unmarked: threading.Event


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    sizes = [(i * 7919) % (300 * KiB) + 1 for i in range(40)]
    sb = make_blob(make_payloads(sizes, seed=9))
    (tmp_path / "blobs").mkdir()
    (tmp_path / "cache").mkdir()
    write_blob(tmp_path / "blobs", sb)
    backend = CountingBackend(tmp_path / "blobs")
    cache = BlobCacheFile(str(tmp_path / "cache"), sb.blob, sb.chunks, durable=False)
    server = BlobServer(cache, backend, amplify=0)
    group = init_group()
    add_mark(group, cache.data_path)
    unmarked = threading.Event()

    def on_complete(srv: BlobServer) -> None:
        if not unmarked.is_set():
            remove_mark(group, srv.cache.fd)
            unmarked.set()

    handler = FanotifyHandler(
        group,
        lambda dev, ino: server if (dev, ino) == cache.dev_ino else None,
        on_complete=on_complete,
    )
    with anyio.from_thread.start_blocking_portal() as portal:
        fut = portal.start_task_soon(handler.serve_group)
        try:
            yield Served(sb, server, handler, backend, group, cache.data_path, unmarked)
        finally:
            fut.cancel()
    os.close(group)
    server.close()


def _pread(path: str, off: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def test_read_fills_exact_bytes(served: Served) -> None:
    exp = served.sb.expected_cache()
    c = served.sb.chunks[7]
    got = _pread(served.path, c.uncompressed_offset + 10, 5000)
    assert got == exp[c.uncompressed_offset + 10 : c.uncompressed_offset + 5010]
    assert served.handler.stats.allowed >= 1 and served.handler.stats.denied == 0
    # only the chunks touched were fetched
    assert served.server.cache.present(c)
    assert not served.server.cache.present(served.sb.chunks[20])


def test_whole_file_read_by_another_process_then_unmark(served: Served) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; sys.stdout.buffer.write(open({served.path!r},'rb').read())",
        ],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    assert out == served.sb.expected_cache()
    assert served.server.cache.complete()
    assert served.unmarked.wait(5)
    before = served.handler.stats.events
    assert _pread(served.path, 0, 100) == out[:100]
    assert served.handler.stats.events == before  # warm reads never reach the daemon
    mib = served.sb.blob.uncompressed_size / (1 << 20)
    print(f"events: {before} for {mib:.1f} MiB -> {before / mib:.1f} per MiB")


def test_concurrent_random_readers(served: Served) -> None:
    import random

    exp = served.sb.expected_cache()
    size = len(exp)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(served.path, os.O_RDONLY)
        try:
            for _ in range(20):
                off = rng.randrange(size)
                n = rng.randrange(1, 200 * KiB)
                assert os.pread(fd, n, off) == exp[off : off + n]
        finally:
            os.close(fd)

    with ThreadPoolExecutor(32) as pool:
        list(pool.map(reader, range(32)))
    assert served.handler.stats.denied == 0


def test_corrupted_blob_gives_eio_and_no_wrong_bytes(served: Served, tmp_path: Path) -> None:
    sb = served.sb
    bad = sb.chunks[5]
    p = tmp_path / "blobs" / sb.blob.blob_id
    data = bytearray(p.read_bytes())
    data[bad.compressed_offset + 7] ^= 0x55
    p.write_bytes(bytes(data))
    with pytest.raises(OSError) as ei:
        _pread(served.path, bad.uncompressed_offset, 100)
    assert ei.value.errno == errno.EIO
    assert served.handler.stats.denied == 1
    assert not served.server.cache.present(bad)
    # the reader in another process gets EIO as well, never zeros
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import os; fd=os.open({served.path!r}, os.O_RDONLY); "
            f"os.pread(fd, 4096, {bad.uncompressed_offset})",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "Input/output error" in r.stderr
    # other chunks still read fine
    c = sb.chunks[6]
    assert _pread(served.path, c.uncompressed_offset, 50) == sb.payloads[6][:50]


def test_missing_blob_gives_eio(served: Served, tmp_path: Path) -> None:
    (tmp_path / "blobs" / served.sb.blob.blob_id).unlink()
    with pytest.raises(OSError) as ei:
        _pread(served.path, 0, 10)
    assert ei.value.errno == errno.EIO
