"""The control API's Prometheus metrics: the daemon's counters, prefetch progress, cache
fill and limits as metric families, built at scrape time (`prometheus_client`, imported
at the first scrape: a daemon starts, and the `mount` that started it waits, without)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from erofs_nydus.daemon.core import LATENCY_BUCKETS
from erofs_nydus.rafs.backend import path_counters
from erofs_nydus.service import logs

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

    from erofs_nydus.service.api import DaemonApi

__all__ = ["PROM_CONTENT_TYPE", "DaemonMetrics"]

PROM_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DaemonMetrics:
    """A registry holding the daemon's collector; `render()` is the /metrics body."""

    def __init__(self, api: DaemonApi) -> None:
        self.api = api
        self._registry: CollectorRegistry | None = None
        self._lock = threading.Lock()

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry (made at the first scrape)."""
        with self._lock:
            if self._registry is None:
                from prometheus_client import CollectorRegistry

                reg = CollectorRegistry(auto_describe=False)
                reg.register(_Collector(self.api))
                self._registry = reg
            return self._registry

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _Collector:
    """Builds the metric families from the daemon's counters at scrape time."""

    def __init__(self, api: DaemonApi) -> None:
        self.api = api

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        m = self.api.table.metrics
        with m.lock:
            c = {k: getattr(m, k) for k in (
                "reads", "hits", "bytes_fetched", "bytes_filled", "chunks_fetched",
                "backend_requests", "backend_errors", "digest_failures", "write_errors",
                "retries")}  # fmt: skip
            buckets = list(m.latency_buckets)
            lat_sum = m.latency_sum
        req = self.api.request_stats()
        p = "erofs_nydus"

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{p}_{name}", doc, value=value)

        yield counter("requests", "Kernel requests served (fanotify events, fscache READs)",
                      req.get("events", 0))
        yield counter("requests_denied", "Kernel requests answered with EIO", req.get("denied", 0))
        yield counter(
            "cache_hits", "Kernel requests answered without fetching", req.get("hits", 0)
        )
        yield counter("channel_full", "Times the daemon's channel to its supervisor was full "
                      "(messages waited, none dropped)", req.get("channel_full", 0))
        yield counter("inflight_throttled", "Times the supervisor paused reading kernel "
                      "events at its in-flight bound", req.get("inflight_throttled", 0))
        yield counter("event_read_emfile", "Kernel event reads that failed for lack of fds",
                      req.get("group_read_emfile", 0))
        yield counter("fills", "Fill requests to the daemon core (reads served)", c["reads"])
        yield counter("fill_hits", "Fill requests whose chunks were all present", c["hits"])
        yield counter("backend_requests", "Range reads sent to blob backends",
                      c["backend_requests"])  # fmt: skip
        yield counter("backend_fetched_bytes", "Compressed bytes read from blob backends",
                      c["bytes_fetched"])  # fmt: skip
        yield counter("backend_errors", "Failed backend reads", c["backend_errors"])
        yield counter("backend_retries", "Backend read retries", c["retries"])
        yield from _path_families(p)
        yield counter("digest_failures", "Chunks that failed decompression or sha256",
                      c["digest_failures"])  # fmt: skip
        yield counter("cache_write_errors", "Failed cache file writes", c["write_errors"])
        yield counter("chunks_fetched", "Chunks written to cache files", c["chunks_fetched"])
        yield counter("filled_bytes", "Uncompressed bytes written to cache files",
                      c["bytes_filled"])  # fmt: skip
        cum = 0
        hb: list[tuple[str, float]] = []
        for le, n in zip(LATENCY_BUCKETS, buckets, strict=True):
            cum += n
            hb.append(("+Inf" if le == float("inf") else repr(le), cum))
        yield HistogramMetricFamily(
            f"{p}_fetch_latency_seconds",
            "Latency of fill requests that had to fetch (misses)",
            buckets=hb,
            sum_value=lat_sum,
        )
        pf = GaugeMetricFamily(f"{p}_prefetch_chunks", "Prefetch chunks by state",
                               labels=["state"])  # fmt: skip
        pb = GaugeMetricFamily(f"{p}_prefetch_bytes", "Prefetch bytes by state", labels=["state"])
        t = self.api.prefetch.totals()
        pf.add_metric(["total"], t["total_chunks"])
        pf.add_metric(["done"], t["done_chunks"])
        pf.add_metric(["failed"], t["failed_chunks"])
        pb.add_metric(["total"], t["total_bytes"])
        pb.add_metric(["done"], t["done_bytes"])
        pb.add_metric(["fetched"], t["fetched_bytes"])
        yield pf
        yield pb
        yield GaugeMetricFamily(f"{p}_prefetch_running", "Prefetch jobs running",
                                value=t["running"])  # fmt: skip
        blob = GaugeMetricFamily(f"{p}_blob_cache_bytes", "Blob cache file bytes",
                                 labels=["blob", "kind"])  # fmt: skip
        for bid, b in self.api.blobs().items():
            blob.add_metric([bid, "size"], b["size"])
            blob.add_metric([bid, "present"], b["present"])
        yield blob
        yield counter("log_suppressed", "daemon.log lines dropped by the rate limit",
                      logs.suppressed_total())
        yield counter("log_write_errors", "daemon.log writes dropped because they failed "
                      "(a full cache disk)", logs.write_errors_total())
        hits = CounterMetricFamily(f"{p}_limit_hits", "Times a bound was hit (and refused)",
                                   labels=["limit"])
        for name, n in sorted(logs.limit_hits().items()):
            hits.add_metric([name], n)
        yield hits
        yield GaugeMetricFamily(f"{p}_mounts", "Mounts served",
                                value=len(self.api.table.mountpoints()))  # fmt: skip
        yield GaugeMetricFamily(f"{p}_uptime_seconds", "Seconds since the daemon started",
                                value=time.time() - self.api.started)  # fmt: skip


def _path_families(p: str) -> Iterator[Metric]:
    """Which network path (origin, each mirror, the proxy) served the registry reads."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    reads = CounterMetricFamily(f"{p}_backend_path_reads", "Registry range reads by path and "
                                "result (miss: a mirror that did not hold the blob yet; "
                                "diverted: passed over a mirror still storing the blob)",
                                labels=["path", "result"])  # fmt: skip
    nbytes = CounterMetricFamily(f"{p}_backend_path_bytes", "Bytes served by each registry path",
                                 labels=["path"])  # fmt: skip
    healthy = GaugeMetricFamily(f"{p}_backend_path_healthy", "1 while a mirror or the proxy is "
                                "used, 0 while skipped until its health check passes",
                                labels=["path"])  # fmt: skip
    for path, v in sorted(path_counters().items()):
        reads.add_metric([path, "ok"], v["reads"])
        reads.add_metric([path, "error"], v["errors"])
        reads.add_metric([path, "miss"], v["misses"])
        reads.add_metric([path, "diverted"], v["diverted"])
        nbytes.add_metric([path], v["bytes"])
        healthy.add_metric([path], v["healthy"])
    yield reads
    yield nbytes
    yield healthy
