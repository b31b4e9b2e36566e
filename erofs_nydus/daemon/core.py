"""Daemon core: make byte ranges of blob cache files exist, on demand.

Kernel-interface independent: the fanotify and fscache request sources both call
`BlobServer.fill(offset, length)` (from worker threads) and answer the kernel when
it returns or raises.

Fill algorithm for one request:
  1. range -> chunks overlapping it (by uncompressed offset, binary search);
  2. drop chunks already present; chunks another request is fetching are waited on
     (per-chunk in-flight futures: each chunk is fetched once);
  3. amplify: when the missing bytes are fewer than `amplify`, claim following
     missing chunks up to that many bytes (0 disables);
  4. group claimed chunks whose compressed extents touch (or are within
     `merge_gap`) into one backend `read_range` each;
  5. per chunk: decompress (zstd, lz4), check size and digest (blake3, sha256)
     against the chunk table BEFORE anything is written, pwrite at the aligned
     offset, then fdatasync and set the presence bits.
Errors for requested chunks (BackendError, DigestMismatchError, DaemonError for cache
write failures) propagate to the caller; failures of amplified chunks only count.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from erofs_nydus.daemon.blobcache import BlobCacheFile
from erofs_nydus.errors import BackendError, DaemonError, DigestMismatchError, ErofsNydusError
from erofs_nydus.rafs.backend import BlobBackend, counting_retries
from erofs_nydus.rafs.codec import decode_chunk
from erofs_nydus.rafs.image import ChunkInfo, ChunkList

__all__ = ["DEFAULT_AMPLIFY", "BlobServer", "Metrics"]

DEFAULT_AMPLIFY = 1 << 20
MAX_BACKEND_READ = 16 << 20
# Upper bounds (seconds) of the fill-latency histogram buckets (last: +Inf).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, float("inf"))
# Called with (blob id, chunks) for every request that names chunks (access trace).
AccessHook = Callable[[str, Sequence[ChunkInfo]], None]


@dataclass
class Metrics:
    """Counters shared by every blob a daemon serves.  Update under `lock`."""

    reads: int = 0  # fill requests
    hits: int = 0  # requests whose chunks were all present
    bytes_fetched: int = 0  # compressed bytes read from backends
    bytes_filled: int = 0  # uncompressed bytes written to cache files
    chunks_fetched: int = 0
    backend_requests: int = 0
    backend_errors: int = 0
    digest_failures: int = 0
    write_errors: int = 0
    retries: int = 0  # backend retries (backends that retry add to it)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=100_000))
    latency_buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_sum: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def observe_latency(self, seconds: float) -> None:
        with self.lock:
            self.latencies.append(seconds)
            self.latency_sum += seconds
            self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            lat = sorted(self.latencies)
            out: dict[str, float] = {
                k: getattr(self, k)
                for k in (
                    "reads",
                    "hits",
                    "bytes_fetched",
                    "bytes_filled",
                    "chunks_fetched",
                    "backend_requests",
                    "backend_errors",
                    "digest_failures",
                    "write_errors",
                    "retries",
                )
            }
        out["misses"] = len(lat)
        if lat:
            out["miss_latency_median_ms"] = lat[len(lat) // 2] * 1000
            out["miss_latency_p99_ms"] = lat[min(len(lat) - 1, (len(lat) * 99) // 100)] * 1000
        return out


def _view_of(chunks: ChunkList) -> tuple[ChunkList, Sequence[int]]:
    return chunks, chunks.starts


class BlobServer:
    """Serves one blob: its cache file, its backend, its in-flight fetches."""

    def __init__(
        self,
        cache: BlobCacheFile,
        backend: BlobBackend,
        *,
        amplify: int = DEFAULT_AMPLIFY,
        merge_gap: int = 0,
        metrics: Metrics | None = None,
    ) -> None:
        self.cache = cache
        self.backend = backend
        self.amplify = amplify
        self.merge_gap = merge_gap
        self.metrics = metrics if metrics is not None else Metrics()
        self.blob_id = cache.blob_id
        # (sorted chunks, their start offsets): replaced as one tuple by add_chunks, so a
        # lock-free reader never pairs one list's positions with the other's chunks
        self._view: tuple[ChunkList, Sequence[int]] = _view_of(cache.chunks)
        self._inflight: dict[int, Future[None]] = {}
        self.tracer: AccessHook | None = None  # set by the daemon (trace.py)

    def add_chunks(self, chunks: Sequence[ChunkInfo]) -> int:
        """Serve the union of this blob's chunk list and `chunks`; return how many were new."""
        new = self.cache.add_chunks(chunks)
        if new:
            with self.cache.lock:
                self._view = _view_of(self.cache.chunks)
        return len(new)

    # -- mapping ------------------------------------------------------------------

    def _span(self, offset: int, length: int) -> tuple[ChunkList, int, int]:
        """One snapshot of the sorted chunk list and the positions [lo, hi) in it that
        overlap [offset, offset+length)."""
        chunks, starts = self._view
        end = offset + length
        lo = max(bisect.bisect_right(starts, offset) - 1, 0)
        if lo < len(chunks):
            c = chunks[lo]
            if c.uncompressed_offset + c.aligned_size <= offset:
                lo += 1
        hi = bisect.bisect_left(starts, end)
        return chunks, lo, max(hi, lo)

    def chunks_in_range(self, offset: int, length: int) -> list[ChunkInfo]:
        chunks, lo, hi = self._span(offset, length)
        return chunks[lo:hi]

    def is_present(self, offset: int, length: int) -> bool:
        """True if every chunk overlapping the range is present (cheap: no I/O)."""
        chunks, lo, hi = self._span(offset, max(length, 0))
        if self.tracer is not None:
            self.tracer(self.blob_id, chunks[lo:hi])
        with self.cache.lock:
            return all(c.index in self.cache.map for c in chunks[lo:hi])

    # -- filling ------------------------------------------------------------------

    def fill(
        self,
        offset: int,
        length: int,
        *,
        fd: int | None = None,
        record: bool = True,
        amplify: int | None = None,
    ) -> None:
        """Ensure [offset, offset+length) of the cache file holds verified data.

        `fd`: descriptor to write through instead of the cache file's own (see
        `BlobCacheFile.write_chunk`); it must stay open until this returns.
        `record=False` (prefetch): neither counted as a read nor traced as an access;
        `amplify` overrides the server's amplification size.
        """
        t0 = time.monotonic()
        chunks, lo, hi = self._span(offset, max(length, 0))
        if record:
            self.metrics.add(reads=1)
            if self.tracer is not None:
                self.tracer(self.blob_id, chunks[lo:hi])
        amplify = self.amplify if amplify is None else amplify
        mine: list[ChunkInfo] = []
        extras: list[ChunkInfo] = []
        theirs: list[Future[None]] = []
        with self.cache.lock:
            missing_bytes = 0
            for c in chunks[lo:hi]:
                if c.index in self.cache.map:
                    continue
                fut = self._inflight.get(c.index)
                if fut is not None:
                    theirs.append(fut)
                else:
                    self._inflight[c.index] = Future()
                    mine.append(c)
                missing_bytes += c.aligned_size
            if not mine and not theirs:
                if record:
                    self.metrics.add(hits=1)
                return
            if mine and amplify > 0:
                budget = amplify - missing_bytes
                j = hi
                while j < len(chunks) and budget >= chunks[j].aligned_size:
                    c = chunks[j]
                    if c.index in self.cache.map or c.index in self._inflight:
                        break
                    self._inflight[c.index] = Future()
                    extras.append(c)
                    budget -= c.aligned_size
                    j += 1
        failures: dict[int, ErofsNydusError] = {}
        try:
            self.cache.acquire()  # the cache file stays open until this fill is done
            try:
                failures = self._fetch(mine + extras, fd)
            finally:
                self.cache.release()
        finally:
            with self.cache.lock:
                for c in mine + extras:
                    fut = self._inflight.pop(c.index)
                    exc = failures.get(c.index)
                    if exc is None and c.index not in self.cache.map:
                        exc = DaemonError(f"blob {self.blob_id}: chunk {c.index} was not filled")
                    if exc is not None:
                        fut.set_exception(exc)
                    else:
                        fut.set_result(None)
        for c in mine:
            if c.index in failures:
                raise failures[c.index]
        for fut in theirs:
            fut.result()
        if record:
            self.metrics.observe_latency(time.monotonic() - t0)

    def fill_all(self) -> None:
        """Fill the whole blob (prefetch / tests)."""
        self.fill(0, self.cache.size)
        while not self.cache.complete():
            for c in self._view[0]:
                if c.index not in self.cache.map:
                    self.fill(c.uncompressed_offset, c.aligned_size)

    def _runs(self, chunks: list[ChunkInfo]) -> list[list[ChunkInfo]]:
        runs: list[list[ChunkInfo]] = []
        run_end = -1
        for c in sorted(chunks, key=lambda c: c.compressed_offset):
            if (
                runs
                and c.compressed_offset <= run_end + self.merge_gap
                and c.compressed_offset >= runs[-1][0].compressed_offset
                and c.compressed_offset + c.compressed_size - runs[-1][0].compressed_offset
                <= MAX_BACKEND_READ
            ):
                runs[-1].append(c)
                run_end = max(run_end, c.compressed_offset + c.compressed_size)
            else:
                runs.append([c])
                run_end = c.compressed_offset + c.compressed_size
        return runs

    def _count_retry(self) -> None:
        self.metrics.add(retries=1)

    def _fetch(self, chunks: list[ChunkInfo], fd: int | None) -> dict[int, ErofsNydusError]:
        failures: dict[int, ErofsNydusError] = {}
        written: list[ChunkInfo] = []
        for run in self._runs(chunks):
            start = run[0].compressed_offset
            end = max(c.compressed_offset + c.compressed_size for c in run)
            try:
                with counting_retries(self._count_retry):
                    data = self.backend.read_range(self.blob_id, start, end - start)
                if len(data) != end - start:
                    raise BackendError(
                        f"blob {self.blob_id}: backend returned {len(data)} bytes for "
                        f"{start}+{end - start}"
                    )
            except ErofsNydusError as exc:
                self.metrics.add(backend_requests=1, backend_errors=1)
                for c in run:
                    failures[c.index] = exc
                continue
            except OSError as exc:
                self.metrics.add(backend_requests=1, backend_errors=1)
                err = BackendError(f"blob {self.blob_id}: backend read failed: {exc}")
                for c in run:
                    failures[c.index] = err
                continue
            self.metrics.add(backend_requests=1, bytes_fetched=end - start)
            bad = self._store(run, start, data, fd, failures, written)
            if bad and self._reread_elsewhere(start, end - start):
                # A mirror served bytes that failed their digest: once more, from the origin.
                try:
                    with counting_retries(self._count_retry):
                        data = self.backend.read_range(self.blob_id, start, end - start)
                except (ErofsNydusError, OSError):
                    self.metrics.add(backend_requests=1, backend_errors=1)
                    continue
                self.metrics.add(backend_requests=1, bytes_fetched=end - start)
                if len(data) == end - start:
                    for c in bad:
                        del failures[c.index]
                    self._store(bad, start, data, fd, failures, written)
        try:
            self.cache.commit(written)
        except OSError as exc:
            self.metrics.add(write_errors=1)
            for c in written:
                failures[c.index] = DaemonError(
                    f"blob {self.blob_id}: cannot sync {self.cache.data_path}: {exc.strerror}"
                )
            written = []
        self.metrics.add(
            chunks_fetched=len(written), bytes_filled=sum(c.uncompressed_size for c in written)
        )
        return failures

    def _store(
        self,
        run: list[ChunkInfo],
        start: int,
        data: bytes,
        fd: int | None,
        failures: dict[int, ErofsNydusError],
        written: list[ChunkInfo],
    ) -> list[ChunkInfo]:
        """Verify and write the chunks of `run` from `data` (read at `start`); return
        the chunks whose bytes failed their digest."""
        bad = []
        for c in run:
            lo = c.compressed_offset - start
            raw = data[lo : lo + c.compressed_size]
            try:
                plain = self._decode(c, raw)
            except DigestMismatchError as exc:
                self.metrics.add(digest_failures=1)
                failures[c.index] = exc
                bad.append(c)
                continue
            try:
                self.cache.write_chunk(c, plain, fd)
            except OSError as exc:
                self.metrics.add(write_errors=1)
                failures[c.index] = DaemonError(
                    f"blob {self.blob_id}: cannot write chunk {c.index} to "
                    f"{self.cache.data_path}: {exc.strerror}"
                )
                continue
            written.append(c)
        return bad

    def _reread_elsewhere(self, offset: int, length: int) -> bool:
        """Ask a backend that reads through mirrors whether another read of this range
        would come from elsewhere (`RejectingBackend.reject`)."""
        reject = getattr(self.backend, "reject", None)
        return bool(reject is not None and reject(self.blob_id, offset, length))

    def _decode(self, c: ChunkInfo, raw: bytes) -> bytes:
        try:
            return decode_chunk(raw, c)
        except DigestMismatchError as exc:
            raise DigestMismatchError(
                f"blob {self.blob_id}: {exc} (blob corrupt or altered)"
            ) from exc

    def close(self) -> None:
        self.cache.close()
