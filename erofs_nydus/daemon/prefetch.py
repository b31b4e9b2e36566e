"""Background prefetch of the files an image's prefetch table names.

On registration of an image whose bootstrap carries a prefetch table (written by
`optimize`), the daemon resolves the table's nids to their chunks (in table order,
each chunk once), groups chunks that are adjacent in a blob into units of at most
`UNIT_BYTES`, and fills the units from `threads` background threads, optionally
throttled to `bandwidth` compressed bytes/s (a token bucket shared by the threads).

Prefetch goes through `BlobServer.fill(record=False, amplify=0)`: a chunk is fetched
once, whoever asks first; a foreground request for a chunk being prefetched waits on
the same in-flight future, and prefetch never holds the kernel's request threads.
A unit that fails (backend error, digest mismatch) is logged and counted; the chunks
stay missing, so a later foreground read retries them and gets the data or EIO.
"""

from __future__ import annotations

import logging
import queue
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from erofs_nydus.daemon import heap
from erofs_nydus.daemon.core import BlobServer
from erofs_nydus.errors import ErofsNydusError
from erofs_nydus.layout import erofs as E
from erofs_nydus.rafs.image import ChunkInfo
from erofs_nydus.rafs.reader import BootstrapReader, has_prefetch_table

__all__ = ["PrefetchJob", "PrefetchManager", "TokenBucket", "prefetch_chunks"]

log = logging.getLogger("erofs_nydus.daemon")

UNIT_BYTES = 2 << 20
DEFAULT_THREADS = 4


def prefetch_chunks(bootstrap: bytes) -> list[ChunkInfo]:
    """Chunks of the files in the bootstrap's prefetch table, in table order, unique.

    A directory entry stands for every file below it, as in nydusd (nydus-snapshotter's
    `--prefetch-policy fs` puts the root nid there): expanded depth-first in dirent order,
    each inode once.  Most images have no prefetch table: that is read from the ext
    superblock alone, without parsing the metadata a second time at every register."""
    if not has_prefetch_table(bootstrap):
        return []
    reader = BootstrapReader(bootstrap)
    out: list[ChunkInfo] = []
    seen: set[tuple[int, int]] = set()
    visited: set[int] = set()
    for nid in reader.prefetch_nids():
        stack = [nid]
        while stack:
            n = stack.pop()
            if n in visited:
                continue
            visited.add(n)
            try:
                ri = reader.inode(n)
                if stat.S_ISDIR(ri.mode):
                    stack.extend(child for name, child, _ in reversed(reader.dirents(ri))
                                 if name not in (b".", b".."))
                    continue
                chunks = (
                    reader.chunk_refs(ri) if ri.datalayout == E.DATALAYOUT_CHUNK_BASED else []
                )
            except ErofsNydusError as exc:
                log.warning("prefetch table: nid %d skipped: %s", n, exc)
                continue
            for c in chunks:
                key = (c.blob_index, c.uncompressed_offset)
                if key not in seen:
                    seen.add(key)
                    out.append(c)
    return out


class TokenBucket:
    """Blocking rate limiter: `take(n)` returns when n bytes fit under `rate` bytes/s."""

    def __init__(self, rate: int, burst: int | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(rate, UNIT_BYTES)
        self.tokens = float(self.burst)
        self.stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self, n: int, stop: threading.Event) -> bool:
        """Wait for n tokens (debt allowed up to one unit); False if stopped first."""
        while True:
            with self._lock:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens > 0:
                    self.tokens -= n
                    return True
                wait = -self.tokens / self.rate
            if stop.wait(min(wait, 1.0)):
                return False


@dataclass
class PrefetchJob:
    fsid: str
    units: list[tuple[BlobServer, list[ChunkInfo]]]
    threads: int
    bandwidth: int
    total_chunks: int = 0
    total_bytes: int = 0
    done_chunks: int = 0
    done_bytes: int = 0
    fetched_bytes: int = 0  # compressed bytes this job itself asked the backend for
    failed_chunks: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    workers: list[threading.Thread] = field(default_factory=list, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def state(self) -> str:
        if self.finished is None:
            return "running"
        return "cancelled" if self.stop.is_set() else "done"

    def progress(self) -> dict[str, Any]:
        with self.lock:
            end = self.finished if self.finished is not None else time.monotonic()
            return {
                "state": self.state,
                "total_chunks": self.total_chunks,
                "total_bytes": self.total_bytes,
                "done_chunks": self.done_chunks,
                "done_bytes": self.done_bytes,
                "failed_chunks": self.failed_chunks,
                "threads": self.threads,
                "bandwidth": self.bandwidth,
                "seconds": round(end - self.started, 3),
            }

    # -- running -------------------------------------------------------------------------

    def run(self, on_done: Callable[[PrefetchJob], None] | None = None) -> None:
        q: queue.SimpleQueue[tuple[BlobServer, list[ChunkInfo]]] = queue.SimpleQueue()
        for u in self.units:
            q.put(u)
        bucket = TokenBucket(self.bandwidth) if self.bandwidth > 0 else None
        left = [max(1, min(self.threads, len(self.units)))]

        def worker() -> None:
            try:
                while not self.stop.is_set():
                    try:
                        srv, chunks = q.get_nowait()
                    except queue.Empty:
                        return
                    self._unit(srv, chunks, bucket)
            finally:
                with self.lock:
                    left[0] -= 1
                    last = left[0] == 0
                    if last:
                        self.finished = time.monotonic()
                if last:
                    log.info("prefetch %s %s: %s", self.fsid[:12], self.state, self.progress())
                    if on_done is not None:
                        on_done(self)

        for i in range(left[0]):
            t = threading.Thread(target=worker, name=f"prefetch-{self.fsid[:8]}-{i}", daemon=True)
            self.workers.append(t)
            t.start()

    def join(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self.workers:
            t.join(max(0.0, deadline - time.monotonic()))

    def _unit(
        self, srv: BlobServer, chunks: list[ChunkInfo], bucket: TokenBucket | None
    ) -> None:
        with srv.cache.lock:
            missing = [c for c in chunks if c.index not in srv.cache.map]
        if (
            missing
            and bucket is not None
            and not bucket.take(sum(c.compressed_size for c in missing), self.stop)
        ):
            return
        start = chunks[0].uncompressed_offset
        end = chunks[-1].uncompressed_offset + chunks[-1].aligned_size
        err: Exception | None = None
        if missing:
            try:
                srv.fill(start, end - start, record=False, amplify=0)
            except Exception as exc:  # never fatal: logged and counted
                err = exc
        with srv.cache.lock:
            ok = [c for c in chunks if c.index in srv.cache.map]
        with self.lock:
            self.done_chunks += len(ok)
            self.done_bytes += sum(c.uncompressed_size for c in ok)
            self.failed_chunks += len(chunks) - len(ok)
            self.fetched_bytes += sum(c.compressed_size for c in missing)
        if err is not None or len(ok) != len(chunks):
            log.warning(
                "prefetch %s: blob %s %d of %d chunks at %#x failed: %s",
                self.fsid[:12],
                srv.blob_id[:12],
                len(chunks) - len(ok),
                len(chunks),
                start,
                err,
            )


def _units(
    chunks: list[ChunkInfo], servers: dict[int, BlobServer]
) -> list[tuple[BlobServer, list[ChunkInfo]]]:
    """Group chunks (table order) into runs adjacent in one blob, <= UNIT_BYTES each."""
    units: list[tuple[BlobServer, list[ChunkInfo]]] = []
    for c in chunks:
        srv = servers.get(c.blob_index)
        if srv is None:
            continue
        if units:
            usrv, run = units[-1]
            last = run[-1]
            if (
                usrv is srv
                and c.uncompressed_offset == last.uncompressed_offset + last.aligned_size
                and c.uncompressed_offset + c.aligned_size - run[0].uncompressed_offset
                <= UNIT_BYTES
            ):
                run.append(c)
                continue
        units.append((srv, [c]))
    return units


class PrefetchManager:
    """Prefetch jobs of one daemon, one per image (fsid)."""

    def __init__(self) -> None:
        self.jobs: dict[str, PrefetchJob] = {}
        self._lock = threading.Lock()

    def start(
        self,
        fsid: str,
        bootstrap: bytes,
        servers: dict[int, BlobServer],
        *,
        threads: int = DEFAULT_THREADS,
        bandwidth: int = 0,
    ) -> PrefetchJob | None:
        """Start prefetching `fsid` unless a job for it exists or its table is empty.

        `servers`: blob index -> server (blobs left out are not prefetched).
        """
        with self._lock:
            old = self.jobs.get(fsid)
            if old is not None and old.state != "cancelled":
                return None
            try:
                chunks = prefetch_chunks(bootstrap)
            except ErofsNydusError as exc:
                log.warning("prefetch %s: cannot read the prefetch table: %s", fsid[:12], exc)
                return None
            finally:
                heap.trim()  # the parse of the whole bootstrap (heap.py)
            units = _units(chunks, servers)
            if not units:
                return None
            job = PrefetchJob(fsid, units, max(1, threads), max(0, bandwidth))
            job.total_chunks = sum(len(u) for _, u in units)
            job.total_bytes = sum(c.uncompressed_size for _, u in units for c in u)
            self.jobs[fsid] = job
        log.info(
            "prefetch %s: %d chunks, %d bytes, %d threads, bandwidth %s",
            fsid[:12],
            job.total_chunks,
            job.total_bytes,
            job.threads,
            f"{job.bandwidth} B/s" if job.bandwidth else "unlimited",
        )
        job.run()
        return job

    def cancel(self, fsid: str, *, wait: bool = True) -> None:
        """Stop `fsid`'s job; with `wait`, return once no unit is being filled (its
        blobs may then be closed)."""
        with self._lock:
            job = self.jobs.pop(fsid, None)
        if job is not None:
            job.stop.set()
            if wait:
                job.join()

    def cancel_all(self) -> None:
        with self._lock:
            jobs = list(self.jobs.values())
            self.jobs.clear()
        for j in jobs:
            j.stop.set()
        for j in jobs:
            j.join()

    def progress(self, fsid: str) -> dict[str, Any] | None:
        with self._lock:
            job = self.jobs.get(fsid)
        return None if job is None else job.progress()

    def totals(self) -> dict[str, int]:
        with self._lock:
            jobs = list(self.jobs.values())
        out = {"total_chunks": 0, "total_bytes": 0, "done_chunks": 0, "done_bytes": 0,
               "failed_chunks": 0, "fetched_bytes": 0, "running": 0}
        for j in jobs:
            with j.lock:
                out["total_chunks"] += j.total_chunks
                out["total_bytes"] += j.total_bytes
                out["done_chunks"] += j.done_chunks
                out["done_bytes"] += j.done_bytes
                out["failed_chunks"] += j.failed_chunks
                out["fetched_bytes"] += j.fetched_bytes
                out["running"] += j.finished is None
        return out
