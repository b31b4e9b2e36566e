"""An HTTP/1.1 server on a unix socket: what the control API (`api`) and nydusd's API
(`nydusd_api`) share.

The socket is bound in a private dir (ours, 0700 when we make it) and made 0600 before
the server listens, so nobody else can connect or swap it; a stale socket left by a
killed predecessor is replaced (the caller holds whatever makes the path its own).
One daemon thread per connection, HTTP/1.1 keep-alive, no idle timeout; `start()`
serves from a thread, `stop()` removes the socket only if it is still the one this
process bound.  The subclasses supply the handler (routes) and their logger.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socketserver
import sys
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

from erofs_nydus.fsutil import private_dir
from erofs_nydus.service.paths import note_bound, unlink_own_socket

__all__ = ["UnixHttpHandler", "UnixHttpServer"]


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
        super().__init__(self.path, handler)
        self._thread: threading.Thread | None = None

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


class UnixHttpHandler(BaseHTTPRequestHandler):
    """Request handler base: HTTP/1.1, access lines to the server's logger at debug."""

    server: UnixHttpServer
    protocol_version = "HTTP/1.1"

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log.debug("api: " + format, *args)
