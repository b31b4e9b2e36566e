"""An HTTP/1.1 server on a unix socket: what the control API (`api`) and nydusd's API
(`nydusd_api`) share.

The socket is bound in a private dir (ours, 0700 when we make it) and made 0600 before
the server listens, so nobody else can connect or swap it; a stale socket left by a
killed predecessor is replaced (the caller holds whatever makes the path its own).
One daemon thread per connection, HTTP/1.1 keep-alive, no idle timeout; `start()`
serves from a thread, `stop()` removes the socket only if it is still the one this
process bound.  The subclasses supply the handler (routes) and their logger.

`http.server` (with `http.client`, `email` and `ssl` behind it: ~20 ms) is imported at
the first request, not when a daemon starts: a `UnixHttpHandler` subclass holds the
routes, and the server puts `BaseHTTPRequestHandler` under it then (`handler_class`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socketserver
import sys
import threading
from typing import TYPE_CHECKING, Any, ClassVar

from erofs_nydus.fsutil import private_dir
from erofs_nydus.service.paths import note_bound, unlink_own_socket

if TYPE_CHECKING:
    from http.server import BaseHTTPRequestHandler as _HandlerBase
else:
    _HandlerBase = object  # BaseHTTPRequestHandler joins at the first request

__all__ = ["UnixHttpHandler", "UnixHttpServer", "handler_class"]

_made: dict[type, type] = {}
_made_lock = threading.Lock()


def handler_class(handler: type[UnixHttpHandler]) -> type[UnixHttpHandler]:
    """`handler` with `http.server.BaseHTTPRequestHandler` under it (made once)."""
    with _made_lock:
        made = _made.get(handler)
        if made is None:
            from http.server import BaseHTTPRequestHandler

            made = _made[handler] = type(handler.__name__, (handler, BaseHTTPRequestHandler),
                                         {"__module__": handler.__module__})
        return made


class UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves `handler` on the unix socket `path` (see the module docstring)."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = False
    log: ClassVar[logging.Logger] = logging.getLogger("erofs_nydus.daemon")

    def __init__(self, path: str, handler: type[UnixHttpHandler]) -> None:
        self.path = os.path.abspath(path)
        private_dir(os.path.dirname(self.path), what="socket dir")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by a killed predecessor
        self.handler = handler
        super().__init__(self.path, socketserver.BaseRequestHandler)  # see finish_request
        self._thread: threading.Thread | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        handler_class(self.handler)(request, client_address, self)

    def server_bind(self) -> None:
        # Bound but not yet listening: nobody can connect before the mode is set.
        super().server_bind()
        os.chmod(self.path, 0o600)
        note_bound(self.path)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer (a CLI interrupted, the snapshotter
        # restarting) is no error.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            self.log.debug("api client went away: %s", exc)
            return
        self.log.exception("api connection failed")

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


class UnixHttpHandler(_HandlerBase):
    """Request handler base: HTTP/1.1, access lines to the server's logger at debug.
    A subclass holds the routes (``do_GET``...); the server serves it through
    `handler_class`, which adds ``BaseHTTPRequestHandler`` as the HTTP base."""

    server: UnixHttpServer
    protocol_version = "HTTP/1.1"

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log.debug("api: " + format, *args)
