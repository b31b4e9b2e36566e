"""Control API: HTTP over a unix socket (mode 0600), one per daemon (cache dir).

Served from the daemon process by the stdlib (`socketserver` + `http.server`, one
thread per connection); read-only:

    GET /api/v1/daemon                      info and state: version, pid, uptime, mode
    GET /api/v1/mounts                      mounted images (with prefetch and trace state)
    GET /api/v1/mounts/<mountpoint|fsid>    one image (404 with a JSON message if unknown);
                                            the mountpoint is URL-quoted, an fsid may be a
                                            prefix of >= 12 hex digits
    GET /api/v1/mounts/<...>/trace          its access trace (trace file format, version 1)
    GET /api/v1/blobs                       per-blob cache fill
    GET /metrics                            Prometheus text format (prometheus_client)

The socket lives next to the control socket: `api_socket_path(cache_dir)`.
`ApiClient` is the client side (httpx over the unix socket).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import socketserver
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from erofs_nydus.daemon.core import LATENCY_BUCKETS
from erofs_nydus.daemon.images import ImageEntry, ImageTable, prefetch_settings
from erofs_nydus.daemon.prefetch import PrefetchManager
from erofs_nydus.daemon.trace import TraceBook
from erofs_nydus.errors import DaemonError, UnsafePathError, UsageError
from erofs_nydus.fsutil import private_dir
from erofs_nydus.service import logs
from erofs_nydus.service.paths import check_peer_is_root, note_bound, unlink_own_socket

if TYPE_CHECKING:
    # Imported where used: prometheus_client at the first scrape, http.server at the
    # first API request; a daemon starts (and a `mount` waits for it) without either.
    from http.server import BaseHTTPRequestHandler

    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

__all__ = ["ApiClient", "ApiServer", "ControlPlane", "DaemonApi", "api_socket_path"]

log = logging.getLogger("erofs_nydus.daemon")

_SUN_PATH_MAX = 107
PROM_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def api_socket_path(cache_dir: str | os.PathLike[str]) -> str:
    """`<cache-dir>/api.sock`, or under /run/erofs-nydus if that is too long for AF_UNIX."""
    cdir = os.path.abspath(os.fspath(cache_dir))
    p = os.path.join(cdir, "api.sock")
    if len(os.fsencode(p)) <= _SUN_PATH_MAX:
        return p
    h = hashlib.sha256(os.fsencode(cdir)).hexdigest()[:24]
    return os.path.join("/run/erofs-nydus", f"{h}.api.sock")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("erofs_nydus")
    except PackageNotFoundError:
        return "unknown"


class NotFound(DaemonError):
    pass


class DaemonApi:
    """What the API shows: views over the daemon's image table, traces and prefetch."""

    def __init__(
        self,
        table: ImageTable,
        traces: TraceBook,
        prefetch: PrefetchManager,
        *,
        mode: str = "fanotify",
        request_stats: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.table = table
        self.traces = traces
        self.prefetch = prefetch
        self.mode = mode
        self.request_stats = request_stats or (lambda: {})
        self.started = time.time()
        self._registry: CollectorRegistry | None = None
        self._registry_lock = threading.Lock()

    # -- views ---------------------------------------------------------------------------

    def daemon(self) -> dict[str, Any]:
        return {
            "name": "erofs-nydus",
            "version": package_version(),
            "pid": os.getpid(),
            "state": "running",
            "mode": self.mode,
            "cache_dir": self.table.cache_dir,
            "started": self.started,
            "uptime": round(time.time() - self.started, 3),
            "images": len(self.table.images),
            "mounts": self.table.mountpoints(),
        }

    def _image(self, e: ImageEntry) -> dict[str, Any]:
        blobs = self.blobs()
        return {
            "fsid": e.fsid,
            "mountpoints": list(e.mountpoints),
            "bootstrap": e.bootstrap,
            "backend": e.backend,
            "amplify": e.amplify,
            "blobs": [{"blob_id": b, **blobs.get(b, {})} for b in e.blob_ids],
            "prefetch": self.prefetch.progress(e.fsid),
            "trace": self.traces.summary(e.fsid),
        }

    def mounts(self) -> list[dict[str, Any]]:
        with self.table._lock:
            entries = list(self.table.images.values())
        return [self._image(e) for e in entries]

    def find(self, key: str) -> ImageEntry:
        """Image by mountpoint (absolute path) or fsid (>= 12 leading hex digits)."""
        with self.table._lock:
            entries = list(self.table.images.values())
        if key.startswith("/"):
            mp = os.path.normpath(key)
            for e in entries:
                if mp in e.mountpoints:
                    return e
            raise NotFound(f"no image is mounted at {mp}")
        key = key.lower()
        hits = [e for e in entries if len(key) >= 12 and e.fsid.startswith(key)]
        if len(hits) == 1:
            return hits[0]
        raise NotFound(f"no mounted image has fsid {key!r}")

    def mount(self, key: str) -> dict[str, Any]:
        return self._image(self.find(key))

    def trace(self, key: str) -> dict[str, Any]:
        e = self.find(key)
        doc = self.traces.document(e.fsid)
        if doc is None:
            raise NotFound(f"image {e.fsid[:12]} has no access trace")
        return doc

    def blobs(self) -> dict[str, dict[str, Any]]:
        with self.table._lock:
            servers = list(self.table.blobs.items())
            marked = set(self.table.marked)
        out = {}
        for bid, s in servers:
            present = s.cache.present_bytes()
            out[bid] = {
                "size": s.cache.size,
                "present": present,
                "fill_ratio": round(present / s.cache.size, 6) if s.cache.size else 1.0,
                "complete": s.cache.complete(),
                "marked": bid in marked,
                "path": s.cache.data_path,
            }
        return out

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry of the daemon's metrics (made at the first scrape)."""
        with self._registry_lock:
            if self._registry is None:
                from prometheus_client import CollectorRegistry

                reg = CollectorRegistry(auto_describe=False)
                reg.register(_Collector(self))
                self._registry = reg
            return self._registry

    def metrics_text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    # -- routing -------------------------------------------------------------------------

    def route(self, path: str) -> tuple[int, str, bytes]:
        """(status, content type, body) for a GET of `path`."""
        path = urllib.parse.urlsplit(path).path
        try:
            if path == "/metrics":
                return 200, PROM_CONTENT_TYPE, self.metrics_text()
            if path in ("/api/v1/daemon", "/api/v1/daemon/"):
                body: Any = self.daemon()
            elif path in ("/api/v1/mounts", "/api/v1/mounts/"):
                body = self.mounts()
            elif path.startswith("/api/v1/mounts/"):
                rest = path[len("/api/v1/mounts/") :]
                if rest.endswith("/trace"):
                    body = self.trace(urllib.parse.unquote(rest[: -len("/trace")]))
                else:
                    body = self.mount(urllib.parse.unquote(rest))
            elif path in ("/api/v1/blobs", "/api/v1/blobs/"):
                body = self.blobs()
            else:
                raise NotFound(f"no such endpoint: {path}")
        except NotFound as exc:
            return 404, "application/json", _json({"error": str(exc), "code": 404})
        return 200, "application/json", _json(body)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1).encode() + b"\n"


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
        hits = CounterMetricFamily(f"{p}_limit_hits", "Times a bound was hit (and refused)",
                                   labels=["limit"])
        for name, n in sorted(logs.limit_hits().items()):
            hits.add_metric([name], n)
        yield hits
        yield GaugeMetricFamily(f"{p}_mounts", "Mounts served",
                                value=len(self.api.table.mountpoints()))  # fmt: skip
        yield GaugeMetricFamily(f"{p}_uptime_seconds", "Seconds since the daemon started",
                                value=time.time() - self.api.started)  # fmt: skip


_handler: type[BaseHTTPRequestHandler] | None = None


def _handler_class() -> type[BaseHTTPRequestHandler]:
    """The API's request handler class (http.server imported at the first request)."""
    global _handler
    if _handler is None:
        from http.server import BaseHTTPRequestHandler

        class Handler(BaseHTTPRequestHandler):
            server: ApiServer
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                try:
                    status, ctype, body = self.server.api.route(self.path)
                except Exception as exc:  # a bug must not kill the thread silently
                    log.exception("API %s failed", self.path)
                    status, ctype, body = (500, "application/json",
                                           _json({"error": str(exc), "code": 500}))
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_HEAD(self) -> None:
                self.send_error(405)

            def address_string(self) -> str:
                return "unix"

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("api: " + format, *args)

        _handler = Handler
    return _handler


class ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The API's HTTP server on a 0600 unix socket; `start()` serves in a thread."""

    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: str, api: DaemonApi) -> None:
        self.api = api
        self.path = path
        private_dir(os.path.dirname(path), what="socket dir")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a killed daemon; we hold the cache dir's lock
        super().__init__(path, socketserver.BaseRequestHandler)  # see finish_request
        self._thread: threading.Thread | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        _handler_class()(request, client_address, self)

    def server_bind(self) -> None:
        # Bound but not yet listening: nobody can connect before the mode is set.
        super().server_bind()
        os.chmod(self.path, 0o600)
        note_bound(self.path)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.5}, name="api", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
        self.server_close()
        unlink_own_socket(self.path)


# -- client ----------------------------------------------------------------------------


class ApiClient:
    """Client of a daemon's control API, found from its cache dir."""

    def __init__(self, cache_dir: str | os.PathLike[str], timeout: float = 30.0) -> None:
        self.cache_dir = os.path.abspath(os.fspath(cache_dir))
        self.path = api_socket_path(self.cache_dir)
        self.timeout = timeout

    def get(self, endpoint: str) -> tuple[int, bytes]:
        import httpx

        if not os.path.exists(self.path):
            raise DaemonError(
                f"no daemon serves {self.cache_dir} (no control API socket at {self.path})"
            )
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(self.path)
                check_peer_is_root(s, self.path)  # the dir is ours: no swap after this
        except OSError as exc:
            if isinstance(exc, UnsafePathError):
                raise
            raise DaemonError(f"control API at {self.path} not reachable: {exc}") from exc
        try:
            transport = httpx.HTTPTransport(uds=self.path)
            with httpx.Client(
                transport=transport, base_url="http://erofs-nydus", timeout=self.timeout
            ) as client:
                r = client.get(endpoint)
        except httpx.HTTPError as exc:
            raise DaemonError(f"control API at {self.path} not reachable: {exc}") from exc
        return r.status_code, r.content

    def get_json(self, endpoint: str) -> Any:
        status, body = self.get(endpoint)
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise DaemonError(f"control API {endpoint}: bad JSON answer ({status})") from exc
        if status == 404:
            raise UsageError(str(doc.get("error", "not found")))
        if status != 200:
            raise DaemonError(f"control API {endpoint}: {doc.get('error', status)}")
        return doc

    def metrics(self) -> str:
        status, body = self.get("/metrics")
        if status != 200:
            raise DaemonError(f"control API /metrics answered {status}")
        return body.decode()

    @staticmethod
    def mount_path(key: str) -> str:
        return "/api/v1/mounts/" + urllib.parse.quote(key, safe="")


class ControlPlane:
    """The daemon's traces, prefetch jobs and API server, driven by worker hooks."""

    def __init__(
        self,
        table: ImageTable,
        *,
        mode: str = "fanotify",
        request_stats: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.table = table
        self.traces = TraceBook()
        self.prefetch = PrefetchManager()
        self.api = DaemonApi(
            table, self.traces, self.prefetch, mode=mode, request_stats=request_stats
        )
        self.server: ApiServer | None = None
        # Blobs a restarted daemon had to reopen after their files were marked: writing
        # through that fd would raise events, so prefetch skips them (see `restored`).
        self.unsafe_blobs: set[str] = set()

    def start(self) -> None:
        path = api_socket_path(self.table.cache_dir)
        try:
            self.server = ApiServer(path, self.api)
        except OSError as exc:
            log.error("control API not available at %s: %s", path, exc)
            return
        self.server.start()
        log.info("control API on %s", path)

    def stop(self) -> None:
        self.prefetch.cancel_all()
        if self.server is not None:
            self.server.stop()
            self.server = None

    def _trace(self, fsid: str) -> None:
        e = self.table.images.get(fsid)
        if e is None:
            return
        self.traces.add_image(fsid, e.blob_ids)
        for b in e.blob_ids:
            srv = self.table.blobs.get(b)
            if srv is not None:
                srv.tracer = self.traces.on_access

    def restored(self, unsafe: set[str] | None = None) -> None:
        """After `ImageTable.load_state`: trace restored images and resume their
        prefetch.  `unsafe`: blobs a restarted fanotify daemon reopened after they were
        marked (writing through their fd would raise events): never prefetched."""
        with self.table._lock:
            self.unsafe_blobs |= set(unsafe or ())
            fsids = list(self.table.images)
            for fsid in fsids:
                self._trace(fsid)
        for fsid in fsids:
            self._start_prefetch(fsid)

    def registered(self, fsid: str) -> None:
        """After a successful `register`: trace the image, start its prefetch with the
        settings the register request stored with it."""
        with self.table._lock:
            self._trace(fsid)
        self._start_prefetch(fsid)

    def _start_prefetch(self, fsid: str) -> None:
        with self.table._lock:
            e = self.table.images.get(fsid)
            if e is None:
                return
            opts = e.prefetch or prefetch_settings({})  # state files from before settings
            if not opts["enable"]:
                return
            servers = {
                i: self.table.blobs[b]
                for i, b in enumerate(e.blob_ids)
                if b in self.table.blobs and b not in self.unsafe_blobs
            }
            boot = e.bootstrap
        try:
            with open(boot, "rb") as f:
                data = f.read()
        except OSError as exc:
            log.warning("prefetch %s: cannot read %s: %s", fsid[:12], boot, exc)
            return
        self.prefetch.start(fsid, data, servers, threads=int(opts["threads"]),
                            bandwidth=int(opts["bandwidth"]))

    def detaching(self, mountpoint: str) -> None:
        """Before `detach`: stop the prefetch of an image losing its last mount, so no
        prefetch fill runs while its blobs are closed."""
        mp = os.path.abspath(mountpoint)
        with self.table._lock:
            gone = [e.fsid for e in self.table.images.values() if e.mountpoints == [mp]]
        for fsid in gone:
            self.prefetch.cancel(fsid)

    def detached(self) -> None:
        """After `detach`: forget traces and prefetch of images no longer served."""
        with self.table._lock:
            live = set(self.table.images)
            self.unsafe_blobs &= set(self.table.blobs)
        for fsid in list(self.traces.traces):
            if fsid not in live:
                self.traces.remove_image(fsid)
        for fsid in list(self.prefetch.jobs):
            if fsid not in live:
                self.prefetch.cancel(fsid)
