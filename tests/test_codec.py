"""rafs.codec's chunk compressors: a reused per-thread zstd compressor writes the bytes a
fresh one does, in any order of chunk sizes and from many threads at once."""

from __future__ import annotations

import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zstandard

from erofs_nydus.rafs import codec


def _chunks() -> list[bytes]:
    """Chunks of real text, random bytes and zeros, 1 B to 1 MiB, big and small mixed
    (a context sized for a big input must not shape a small one's frame, or the
    reverse)."""
    rng = random.Random(7)
    text = b"".join(p.read_bytes() for p in sorted(Path(os.__file__).parent.glob("*.py")))
    assert len(text) > 2 << 20  # the standard library's top-level modules
    out = []
    for size in (1 << 20, 17, 4096, 1 << 20, 300_000, 1, 65_536, 999_999, 8191, 1 << 20):
        start = rng.randrange(0, len(text) - size)
        out.append(text[start:start + size])
        out.append(rng.randbytes(size))
        out.append(bytes(size))
        half = size // 2
        out.append(text[start:start + half] + rng.randbytes(size - half))
    return out


def _fresh(data: bytes) -> bytes | None:
    out = zstandard.ZstdCompressor(level=codec.ZSTD_LEVEL).compress(data)
    return out if len(out) < len(data) else None


def test_reused_zstd_compressor_writes_fresh_compressor_bytes() -> None:
    chunks = _chunks()
    for data in [*chunks, *reversed(chunks)]:
        got = codec.compress_chunk(data, "zstd")
        assert got == _fresh(data)
        if got is not None:
            assert codec.decompress(got, "zstd", len(data)) == data


def test_zstd_compressor_is_per_thread_and_reused() -> None:
    codec.compress_chunk(b"a" * 4096, "zstd")
    mine = codec._local.zstd
    codec.compress_chunk(b"b" * 4096, "zstd")
    assert codec._local.zstd is mine  # reused on this thread
    seen: list[object] = []

    def other() -> None:
        codec.compress_chunk(b"c" * 4096, "zstd")
        seen.append(codec._local.zstd)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen and seen[0] is not mine  # another thread has its own


def test_zstd_under_concurrency_is_deterministic() -> None:
    chunks = _chunks() * 3
    random.Random(11).shuffle(chunks)
    want = [_fresh(c) for c in chunks]
    workers = max(4, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        for _ in range(2):
            assert list(pool.map(lambda c: codec.compress_chunk(c, "zstd"), chunks)) == want
