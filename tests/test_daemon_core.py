"""Daemon core: range mapping, amplification, merging, dedup, verification, restart."""

from __future__ import annotations

import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from daemon_support import CountingBackend, SyntheticBlob, make_blob, make_payloads, write_blob

from erofs_nydus.daemon.blobcache import BlobCacheFile
from erofs_nydus.daemon.core import BlobServer
from erofs_nydus.errors import BackendError, DaemonError, DigestMismatchError

KiB = 1024


def _server(
    tmp_path: Path, sb: SyntheticBlob, *, amplify: int = 0, merge_gap: int = 0
) -> tuple[BlobServer, CountingBackend]:
    blobs = tmp_path / "blobs"
    cache = tmp_path / "cache"
    blobs.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    write_blob(blobs, sb)
    backend = CountingBackend(blobs)
    bc = BlobCacheFile(str(cache), sb.blob, sb.chunks, durable=False)
    return BlobServer(bc, backend, amplify=amplify, merge_gap=merge_gap), backend


def _cache_bytes(srv: BlobServer) -> bytes:
    return Path(srv.cache.data_path).read_bytes()


@pytest.fixture
def sb() -> SyntheticBlob:
    # sizes chosen to exercise 4 KiB padding: 10 chunks of mixed sizes
    sizes = [5000, 4096, 100, 70 * KiB, 1, 12 * KiB, 33 * KiB, 4095, 64 * KiB, 9000]
    return make_blob(make_payloads(sizes, seed=1))


def test_cache_file_is_sparse_and_sized(tmp_path: Path, sb: SyntheticBlob) -> None:
    srv, backend = _server(tmp_path, sb)
    st = os.stat(srv.cache.data_path)
    assert st.st_size == sb.blob.uncompressed_size
    assert st.st_blocks == 0
    assert not backend.calls


def test_range_mapping(tmp_path: Path, sb: SyntheticBlob) -> None:
    srv, _ = _server(tmp_path, sb)
    c = sb.chunks
    assert srv.chunks_in_range(0, 1) == [c[0]]
    assert srv.chunks_in_range(4096, 8192) == [c[0], c[1]]  # chunk 0 is 8 KiB aligned
    assert srv.chunks_in_range(c[3].uncompressed_offset + 5, 1) == [c[3]]
    assert (
        srv.chunks_in_range(
            c[2].uncompressed_offset, c[4].uncompressed_offset - c[2].uncompressed_offset + 1
        )
        == c[2:5]
    )
    assert srv.chunks_in_range(sb.blob.uncompressed_size, 100) == []
    assert srv.chunks_in_range(0, 0) == []


def test_fill_single_chunk_exact_bytes(tmp_path: Path, sb: SyntheticBlob) -> None:
    srv, backend = _server(tmp_path, sb)
    c3 = sb.chunks[3]
    srv.fill(c3.uncompressed_offset + 100, 10)
    assert backend.calls == [(c3.compressed_offset, c3.compressed_size)]
    data = _cache_bytes(srv)
    assert data[c3.uncompressed_offset : c3.uncompressed_offset + c3.aligned_size] == (
        sb.payloads[3] + bytes(c3.aligned_size - c3.uncompressed_size)
    )
    assert srv.cache.present(c3) and not srv.cache.present(sb.chunks[2])
    # second fill of the same range is a hit: no backend call
    srv.fill(c3.uncompressed_offset, 1)
    assert len(backend.calls) == 1
    m = srv.metrics.snapshot()
    assert m["reads"] == 2 and m["hits"] == 1 and m["chunks_fetched"] == 1


def test_full_fill_matches_and_merges_into_one_read(tmp_path: Path, sb: SyntheticBlob) -> None:
    srv, backend = _server(tmp_path, sb)
    srv.fill(0, sb.blob.uncompressed_size)
    assert backend.calls == [(0, len(sb.data))]
    assert _cache_bytes(srv) == sb.expected_cache()
    assert srv.cache.complete()


def test_present_chunks_split_merged_reads(tmp_path: Path, sb: SyntheticBlob) -> None:
    srv, backend = _server(tmp_path, sb)
    c = sb.chunks
    srv.fill(c[4].uncompressed_offset, 1)
    backend.calls.clear()
    srv.fill(0, sb.blob.uncompressed_size)
    assert backend.calls == [
        (0, c[4].compressed_offset),
        (c[5].compressed_offset, len(sb.data) - c[5].compressed_offset),
    ]
    assert _cache_bytes(srv) == sb.expected_cache()


def test_merge_gap_reads_through_present_chunk(tmp_path: Path, sb: SyntheticBlob) -> None:
    srv, backend = _server(tmp_path, sb, merge_gap=1 << 20)
    srv.fill(sb.chunks[4].uncompressed_offset, 1)
    backend.calls.clear()
    srv.fill(0, sb.blob.uncompressed_size)
    assert backend.calls == [(0, len(sb.data))]
    assert _cache_bytes(srv) == sb.expected_cache()


def test_amplification(tmp_path: Path, sb: SyntheticBlob) -> None:
    c = sb.chunks
    # budget: chunk 2 (4 KiB) + chunk 3 (72 KiB) + chunk 4 (4 KiB) = 80 KiB
    srv, backend = _server(tmp_path, sb, amplify=80 * KiB)
    srv.fill(c[2].uncompressed_offset, 1)
    assert [srv.cache.present(x) for x in c] == [False, False, True, True, True] + [False] * 5
    assert backend.calls == [
        (c[2].compressed_offset, c[5].compressed_offset - c[2].compressed_offset)
    ]
    # amplification stops at a present chunk
    srv2, backend2 = _server(tmp_path / "b", sb, amplify=1 << 20)
    srv2.fill(c[7].uncompressed_offset, 1)
    srv2.fill(c[5].uncompressed_offset, 1)
    assert [srv2.cache.present(x) for x in c] == [False] * 5 + [True, True, True, True, True]
    assert backend2.calls[1] == (
        c[5].compressed_offset,
        c[7].compressed_offset - c[5].compressed_offset,
    )


def test_amplify_zero_disables(tmp_path: Path, sb: SyntheticBlob) -> None:
    srv, _ = _server(tmp_path, sb, amplify=0)
    srv.fill(0, 1)
    assert [srv.cache.present(x) for x in sb.chunks] == [True] + [False] * 9


def test_concurrent_requests_fetch_once(tmp_path: Path, sb: SyntheticBlob) -> None:
    srv, backend = _server(tmp_path, sb)
    backend.gate = threading.Event()
    c3 = sb.chunks[3]
    with ThreadPoolExecutor(16) as pool:
        futs = [pool.submit(srv.fill, c3.uncompressed_offset + i * 100, 50) for i in range(16)]
        threading.Event().wait(0.2)
        backend.gate.set()
        for f in futs:
            f.result(timeout=10)
    assert backend.calls == [(c3.compressed_offset, c3.compressed_size)]
    assert srv.metrics.snapshot()["chunks_fetched"] == 1


def test_concurrent_random_fills_are_correct(tmp_path: Path) -> None:
    sizes = [(i * 7919) % (200 * KiB) + 1 for i in range(60)]
    sb = make_blob(make_payloads(sizes, seed=5))
    srv, _ = _server(tmp_path, sb, amplify=256 * KiB)
    import random

    rng = random.Random(3)
    reqs = [
        (rng.randrange(sb.blob.uncompressed_size), rng.randrange(1, 300 * KiB)) for _ in range(300)
    ]
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda r: srv.fill(*r), reqs))
    expected = sb.expected_cache()
    data = _cache_bytes(srv)
    for c in sb.chunks:
        if srv.cache.present(c):
            s = slice(c.uncompressed_offset, c.uncompressed_offset + c.aligned_size)
            assert data[s] == expected[s]
    for off, n in reqs:
        for c in srv.chunks_in_range(off, n):
            assert srv.cache.present(c)
    srv.fill_all()
    assert _cache_bytes(srv) == expected


def _corrupt(tmp_path: Path, sb: SyntheticBlob, pos: int) -> None:
    p = tmp_path / "blobs" / sb.blob.blob_id
    data = bytearray(p.read_bytes())
    data[pos] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("which", [1, 2])  # raw chunk, compressed chunk
def test_digest_mismatch_writes_nothing(tmp_path: Path, sb: SyntheticBlob, which: int) -> None:
    srv, _ = _server(tmp_path, sb)
    c = sb.chunks[which]
    _corrupt(tmp_path, sb, c.compressed_offset + c.compressed_size // 2)
    with pytest.raises(DigestMismatchError):
        srv.fill(c.uncompressed_offset, 1)
    assert not srv.cache.present(c)
    assert os.stat(srv.cache.data_path).st_blocks == 0
    assert srv.metrics.snapshot()["digest_failures"] == 1
    # neighbours in the same merged read are still served
    with pytest.raises(DigestMismatchError):
        srv.fill(0, sb.blob.uncompressed_size)
    data = _cache_bytes(srv)
    exp = sb.expected_cache()
    for x in sb.chunks:
        s = slice(x.uncompressed_offset, x.uncompressed_offset + x.aligned_size)
        if x is c:
            assert data[s] == bytes(x.aligned_size)
        else:
            assert srv.cache.present(x) and data[s] == exp[s]


def test_amplified_chunk_failure_does_not_fail_request(tmp_path: Path, sb: SyntheticBlob) -> None:
    srv, _ = _server(tmp_path, sb, amplify=1 << 20)
    c = sb.chunks
    _corrupt(tmp_path, sb, c[5].compressed_offset + 3)
    srv.fill(c[4].uncompressed_offset, 1)  # amplifies into chunk 5 (bad) and beyond
    assert srv.cache.present(c[4]) and not srv.cache.present(c[5])
    assert srv.metrics.snapshot()["digest_failures"] == 1


def test_missing_and_truncated_blob(tmp_path: Path, sb: SyntheticBlob) -> None:
    srv, _ = _server(tmp_path, sb)
    p = tmp_path / "blobs" / sb.blob.blob_id
    p.write_bytes(sb.data[: sb.chunks[5].compressed_offset + 1])
    srv.fill(0, 1)
    with pytest.raises(BackendError, match="short read"):
        srv.fill(sb.chunks[6].uncompressed_offset, 1)
    p.unlink()
    with pytest.raises(BackendError, match="cannot read"):
        srv.fill(sb.chunks[9].uncompressed_offset, 1)
    assert srv.metrics.snapshot()["backend_errors"] == 2
    # a failed fetch leaves nothing in flight: a retry after repair works
    write_blob(tmp_path / "blobs", sb)
    srv.fill(sb.chunks[9].uncompressed_offset, 1)
    assert srv.cache.present(sb.chunks[9])


def test_cache_write_failure_is_daemon_error(tmp_path: Path, sb: SyntheticBlob) -> None:
    srv, _ = _server(tmp_path, sb)
    ro = os.open(srv.cache.data_path, os.O_RDONLY)
    os.dup2(ro, srv.cache.fd)  # writes now fail with EBADF, like a full or broken disk
    os.close(ro)
    with pytest.raises(DaemonError, match="cannot write chunk"):
        srv.fill(0, 1)
    assert not srv.cache.present(sb.chunks[0])
    assert srv.metrics.snapshot()["write_errors"] == 1


def test_restart_keeps_and_verifies_map(tmp_path: Path, sb: SyntheticBlob) -> None:
    srv, _ = _server(tmp_path, sb)
    c = sb.chunks
    srv.fill(c[0].uncompressed_offset, 1)
    srv.fill(c[3].uncompressed_offset, 1)
    srv.fill(c[8].uncompressed_offset, 1)
    srv.close()
    # punch out chunk 3's data behind the map's back: the bit must not be trusted
    with open(tmp_path / "cache" / f"{sb.blob.blob_id}.blob.data", "r+b") as f:
        f.truncate(c[3].uncompressed_offset)
        f.truncate(sb.blob.uncompressed_size)
    bc = BlobCacheFile(str(tmp_path / "cache"), sb.blob, sb.chunks, durable=False)
    assert [bc.present(x) for x in c] == [True] + [False] * 9
    bc.close()
    # a restart with an intact file keeps everything
    srv2, backend2 = _server(tmp_path, sb)
    assert srv2.cache.present(c[0])
    srv2.fill(c[0].uncompressed_offset, 1)
    assert backend2.calls == []


def test_restart_with_wrong_size_file_starts_over(tmp_path: Path, sb: SyntheticBlob) -> None:
    srv, _ = _server(tmp_path, sb)
    srv.fill(0, sb.blob.uncompressed_size)
    srv.close()
    with open(tmp_path / "cache" / f"{sb.blob.blob_id}.blob.data", "r+b") as f:
        f.truncate(4096)
    srv2, _ = _server(tmp_path, sb)
    assert not any(srv2.cache.present(x) for x in sb.chunks)
    srv2.fill_all()
    assert _cache_bytes(srv2) == sb.expected_cache()


def test_latency_metrics(tmp_path: Path, sb: SyntheticBlob) -> None:
    srv, _ = _server(tmp_path, sb)
    for c in sb.chunks:
        srv.fill(c.uncompressed_offset, 1)
    m = srv.metrics.snapshot()
    assert m["misses"] == 10 and m["miss_latency_p99_ms"] >= m["miss_latency_median_ms"] > 0


def test_add_chunks_serves_the_union(tmp_path: Path, sb: SyntheticBlob) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    write_blob(blobs, sb)
    bc = BlobCacheFile(str(tmp_path), sb.blob, sb.chunks[::2], durable=False)
    srv = BlobServer(bc, CountingBackend(blobs), amplify=0)
    odd = sb.chunks[3]
    srv.fill(odd.uncompressed_offset, 1)
    assert not srv.cache.present(odd)  # unknown to the first image's chunk list
    assert srv.add_chunks(sb.chunks) == 5
    assert srv.add_chunks(sb.chunks) == 0
    srv.fill(0, sb.blob.uncompressed_size)
    assert srv.cache.complete() and _cache_bytes(srv) == sb.expected_cache()
    bad = dataclasses.replace(sb.chunks[1], digest=b"\0" * 32)
    with pytest.raises(DaemonError, match="disagree"):
        srv.add_chunks([bad])


def test_span_survives_add_chunks_between_lookups(
    tmp_path: Path, sb: SyntheticBlob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second image adding chunks while a lookup runs never pairs old positions with
    the new chunk list (which would map a range onto another chunk's data)."""
    from erofs_nydus.daemon import core

    blobs, cache = tmp_path / "blobs", tmp_path / "cache"
    blobs.mkdir()
    cache.mkdir()
    write_blob(blobs, sb)
    first, later = sb.chunks[::2], sb.chunks[1::2]
    srv = BlobServer(BlobCacheFile(str(cache), sb.blob, first, durable=False),
                     CountingBackend(blobs))
    real = core.bisect.bisect_left
    swapped = []

    def racing_bisect_left(a: list[int], x: int) -> int:
        if not swapped:
            swapped.append(srv.add_chunks(later))  # another thread registers an image
        return real(a, x)

    monkeypatch.setattr(core.bisect, "bisect_left", racing_bisect_left)
    target = sb.chunks[4]
    got = srv.chunks_in_range(target.uncompressed_offset, 1)
    assert swapped == [len(later)]
    assert got == [target]
    monkeypatch.undo()
    assert srv.chunks_in_range(sb.chunks[3].uncompressed_offset, 1) == [sb.chunks[3]]


def test_close_under_a_running_fill_never_writes_elsewhere(
    tmp_path: Path, sb: SyntheticBlob
) -> None:
    """close() while a fill waits on the backend (a prefetch outliving its cancel): the
    descriptor stays open until the fill ends, so its number cannot be reused by another
    file that the fill's pwrite would then overwrite."""
    srv, backend = _server(tmp_path, sb)
    backend.gate = threading.Event()
    c = sb.chunks[3]
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(srv.fill, c.uncompressed_offset, 1)
        while not backend.calls:
            threading.Event().wait(0.01)
        srv.close()
        other = tmp_path / "other"
        fd = os.open(other, os.O_RDWR | os.O_CREAT, 0o600)  # lowest free fd number
        try:
            backend.gate.set()
            fut.result(timeout=30)
        finally:
            os.close(fd)
    assert other.stat().st_size == 0
    assert srv.cache.fd == -1
    data = _cache_bytes(srv)
    assert data[c.uncompressed_offset : c.uncompressed_offset + c.uncompressed_size] == (
        sb.payloads[3]
    )
    with pytest.raises(DaemonError, match="closed"):
        srv.fill(sb.chunks[5].uncompressed_offset, 1)
