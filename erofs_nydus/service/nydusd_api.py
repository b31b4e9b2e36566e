"""nydusd's HTTP/1.1 API on a unix socket, as nydus-snapshotter's client uses it.

    GET    /api/v1/daemon                       {id, version{...}, state}
    POST   /api/v1/mount?mountpoint=MP          body {fs_type, source, config}: mount an image
    DELETE /api/v1/mount?mountpoint=MP          unmount it
    GET    /api/v1/metrics[?id=/ID]             FsMetrics
    GET    /api/v1/metrics/blobcache[?id=/ID]   CacheMetrics
    GET    /api/v1/metrics/inflight             [] (no request outlives its reply here)
    PUT    /api/v1/daemon/fuse/sendfd           204: nothing to hand over (the cache dir's
                                                daemon keeps the kernel state)
    PUT    /api/v1/daemon/fuse/takeover         adopt the mounts still served; state READY
    PUT    /api/v1/daemon/start                 state RUNNING
    PUT    /api/v1/daemon/exit                  exit, leaving the mounts to the next process
    PUT    /api/v1/config                       accepted, nothing to change
    PUT    /api/v2/blobs                        fscache mode: register a blob cache entry
                                                (bootstrap under the snapshotter's fsid)
    DELETE /api/v2/blobs?domain_id=&blob_id=    fscache mode: remove entries / cull a blob
    GET    /api/v2/blobs                        fscache mode: the entries

Errors are `{"code": ..., "message": ...}` with a 4xx/5xx status.  The snapshotter keeps one
idle keep-alive connection and takes its hang-up as the daemon's death: one thread per
connection, HTTP/1.1 keep-alive, no idle timeout; sockets are close-on-exec (Python's default).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import urllib.parse
from typing import TYPE_CHECKING, Any

from erofs_nydus.errors import ErofsNydusError, UsageError
from erofs_nydus.service.unixhttp import UnixHttpHandler, UnixHttpServer

if TYPE_CHECKING:
    from erofs_nydus.service.nydusd import NydusdService

__all__ = ["ApiError", "NydusdApiServer"]

log = logging.getLogger("erofs_nydus.nydusd")

MAX_BODY = 1 << 20


class ApiError(ErofsNydusError):
    """An API answer other than success: HTTP status and nydusd's error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _error_status(exc: ErofsNydusError) -> tuple[int, str]:
    status = getattr(exc, "status", None)
    code = getattr(exc, "code", None)
    if isinstance(status, int) and isinstance(code, str):
        return status, code
    if isinstance(exc, UsageError):
        return 400, "InvalidArgument"
    return 500, type(exc).__name__


class _Handler(UnixHttpHandler):
    server: NydusdApiServer

    # -- plumbing ----------------------------------------------------------------------------

    def _reply(self, status: int, obj: Any = None) -> None:
        body = b"" if obj is None else json.dumps(obj).encode()
        self.send_response(status)
        if obj is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n < 0 or n > MAX_BODY:
            raise UsageError(f"request body of {n} bytes (at most {MAX_BODY})")
        return self.rfile.read(n) if n else b""

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        try:
            body = self._body()
            status, obj = self.server.route(method, url.path, query, body)
        except ErofsNydusError as exc:
            status, code = _error_status(exc)
            log.warning("api %s %s: %s", method, self.path, exc)
            status, obj = status, {"code": code, "message": str(exc)}
        except Exception as exc:  # a bug must answer, not hang the snapshotter
            log.exception("api %s %s failed", method, self.path)
            status, obj = 500, {"code": "Internal", "message": f"{type(exc).__name__}: {exc}"}
        self._reply(status, obj)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


class NydusdApiServer(UnixHttpServer):
    log = logging.getLogger("erofs_nydus.nydusd")

    def __init__(self, path: str, svc: NydusdService) -> None:
        self.svc = svc
        super().__init__(path, _Handler)

    # -- routes ------------------------------------------------------------------------------

    def route(self, method: str, path: str, query: dict[str, str],
              body: bytes) -> tuple[int, Any]:
        from erofs_nydus.service.nydusd_config import parse_nydusd_config

        svc = self.svc
        path = path.rstrip("/") or "/"
        if path == "/api/v1/daemon" and method == "GET":
            return 200, svc.daemon_info()
        if path == "/api/v1/mount" and method in ("POST", "DELETE", "PUT"):
            mp = query.get("mountpoint")
            if not mp:
                raise ApiError(400, "InvalidArgument", "mountpoint query parameter missing")
            if method == "DELETE":
                svc.umount(mp)
                return 204, None
            try:
                req = json.loads(body or b"{}")
            except ValueError as exc:
                raise ApiError(400, "InvalidArgument", f"mount body: {exc}") from None
            if not isinstance(req, dict):
                raise ApiError(400, "InvalidArgument", "mount body must be a JSON object")
            fs_type = req.get("fs_type", "rafs")
            if fs_type != "rafs":
                raise ApiError(400, "Unsupported", f"fs_type {fs_type!r} (rafs only)")
            source, config = req.get("source"), req.get("config")
            if not isinstance(source, str) or not source:
                raise ApiError(400, "InvalidArgument", "mount body lacks source")
            if not isinstance(config, str) or not config:
                raise ApiError(400, "InvalidArgument", "mount body lacks config")
            if not config.lstrip().startswith("{") and os.path.isfile(config):
                with open(config, "rb") as f:  # some clients send the config file's path
                    config = f.read().decode()
            if method == "PUT":  # remount (nydusd: update the image): umount, mount again
                with contextlib.suppress(ApiError):
                    svc.umount(mp)
            svc.mount(mp, os.path.abspath(source), parse_nydusd_config(config))
            return 204, None
        if path == "/api/v1/metrics" and method == "GET":
            return 200, svc.fs_metrics()
        if path == "/api/v1/metrics/blobcache" and method == "GET":
            return 200, svc.cache_metrics()
        if path in ("/api/v1/metrics/inflight", "/api/v1/metrics/pattern",
                    "/api/v1/metrics/files", "/api/v1/metrics/backend") and method == "GET":
            return 200, [] if path.endswith(("inflight", "pattern", "files")) else {}
        if path == "/api/v1/daemon/fuse/sendfd" and method == "PUT":
            return 204, None
        if path == "/api/v1/daemon/fuse/takeover" and method == "PUT":
            svc.takeover()
            return 204, None
        if path == "/api/v1/daemon/start" and method == "PUT":
            svc.state = "RUNNING"
            return 204, None
        if path == "/api/v1/daemon/exit" and method == "PUT":
            svc.request_stop(0, keep_mounts=True)
            return 204, None
        if path == "/api/v1/config" and method == "PUT":
            return 204, None
        if path == "/api/v2/blobs" and method == "PUT":
            svc.bind_blob(body)
            return 204, None
        if path == "/api/v2/blobs" and method == "DELETE":
            svc.unbind_blob(query.get("domain_id"), query.get("blob_id"))
            return 204, None
        if path == "/api/v2/blobs" and method == "GET":
            return 200, svc.blob_entries()
        raise ApiError(404, "NotFound", f"no route {method} {path}")
