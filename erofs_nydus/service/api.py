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

The socket lives next to the control socket: `paths.api_socket_path(cache_dir)`.
Here: the views and routes (`DaemonApi`), the server (`ApiServer`, on `unixhttp`) and
the `ControlPlane` the worker drives; the metric families are built in `metrics`, the
client side is `api_client.ApiClient`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from erofs_nydus.daemon.images import ImageEntry, ImageTable, TableSnapshot, prefetch_settings
from erofs_nydus.daemon.prefetch import PrefetchManager
from erofs_nydus.daemon.trace import TraceBook
from erofs_nydus.errors import DaemonError
from erofs_nydus.service.metrics import PROM_CONTENT_TYPE, DaemonMetrics
from erofs_nydus.service.paths import api_socket_path
from erofs_nydus.service.unixhttp import UnixHttpHandler, UnixHttpServer

__all__ = ["ApiServer", "ControlPlane", "DaemonApi", "NotFound", "package_version"]

log = logging.getLogger("erofs_nydus.daemon")


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # at the first info call

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
        self.metrics = DaemonMetrics(self)

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
        entries = list(self.table.snapshot().images.values())
        return [self._image(e) for e in entries]

    def find(self, key: str) -> ImageEntry:
        """Image by mountpoint (absolute path) or fsid (>= 12 leading hex digits)."""
        entries = list(self.table.snapshot().images.values())
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
        snap = self.table.snapshot()
        marked = snap.marked
        out = {}
        for bid, s in snap.blobs.items():
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

    def metrics_text(self) -> bytes:
        return self.metrics.render()

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


class _Handler(UnixHttpHandler):
    server: ApiServer

    def do_GET(self) -> None:
        try:
            status, ctype, body = self.server.api.route(self.path)
        except Exception as exc:  # a bug must not kill the thread silently
            log.exception("API %s failed", self.path)
            status, ctype, body = 500, "application/json", _json({"error": str(exc), "code": 500})
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.send_error(405)


class ApiServer(UnixHttpServer):
    """The API's HTTP server on a 0600 unix socket; `start()` serves in a thread."""

    def __init__(self, path: str, api: DaemonApi) -> None:
        self.api = api
        super().__init__(path, _Handler)


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

    def _trace(self, fsid: str, snap: TableSnapshot) -> None:
        e = snap.images.get(fsid)
        if e is None:
            return
        self.traces.add_image(fsid, e.blob_ids)
        for b in e.blob_ids:
            srv = snap.blobs.get(b)
            if srv is not None:
                srv.tracer = self.traces.on_access

    def restored(self, unsafe: set[str] | None = None) -> None:
        """After `ImageTable.load_state`: trace restored images and resume their
        prefetch.  `unsafe`: blobs a restarted fanotify daemon reopened after they were
        marked (writing through their fd would raise events): never prefetched."""
        self.unsafe_blobs |= set(unsafe or ())
        snap = self.table.snapshot()
        fsids = list(snap.images)
        for fsid in fsids:
            self._trace(fsid, snap)
        for fsid in fsids:
            self._start_prefetch(fsid)

    def registered(self, fsid: str) -> None:
        """After a successful `register`: trace the image, start its prefetch with the
        settings the register request stored with it."""
        self._trace(fsid, self.table.snapshot())
        self._start_prefetch(fsid)

    def _start_prefetch(self, fsid: str) -> None:
        snap = self.table.snapshot()
        e = snap.images.get(fsid)
        if e is None:
            return
        opts = e.prefetch or prefetch_settings({})  # state files from before settings
        if not opts["enable"]:
            return
        servers = {
            i: snap.blobs[b]
            for i, b in enumerate(e.blob_ids)
            if b in snap.blobs and b not in self.unsafe_blobs
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
        gone = [e.fsid for e in self.table.snapshot().images.values() if e.mountpoints == [mp]]
        for fsid in gone:
            self.prefetch.cancel(fsid)

    def detached(self) -> None:
        """After `detach`: forget traces and prefetch of images no longer served."""
        snap = self.table.snapshot()
        live = set(snap.images)
        self.unsafe_blobs &= set(snap.blobs)
        for fsid in list(self.traces.traces):
            if fsid not in live:
                self.traces.remove_image(fsid)
        for fsid in list(self.prefetch.jobs):
            if fsid not in live:
                self.prefetch.cancel(fsid)
