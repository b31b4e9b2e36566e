"""A scriptable HTTP registry on 127.0.0.1 for fault injection across process boundaries.

`httpx.MockTransport` (test_registry_faults.py) reaches only clients a test builds
itself; code that makes its own `RegistryClient` (resolve, convert, the CLI) needs a
real socket.  `FaultRegistry` serves routes a test registers, exactly or by path
prefix, and records every request (method, path, headers).  Responders:

* `static(status, body, headers)`: one answer;
* `endless(piece)`: 200 and `piece` forever (no Content-Length), until the client hangs up;
* `redirect(location)`: 302 to `location` (a loop when it points back);
* `slow(seconds, then)`: waits, then answers with `then`.

Only ever binds loopback (127.0.0.1 by default; 127.0.0.2 stands for another host).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Responder = Callable[[BaseHTTPRequestHandler], None]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def static(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Responder:
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    return answer


def endless(piece: bytes = b"\0" * 65536) -> Responder:
    def answer(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Connection", "close")
        h.end_headers()
        if h.command == "HEAD":
            return
        try:
            while True:
                h.wfile.write(piece)
        except OSError:  # the client hung up: what we want
            return

    return answer


def redirect(location: str) -> Responder:
    return static(302, b"", {"Location": location})


def slow(seconds: float, then: Responder) -> Responder:
    def answer(h: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        then(h)

    return answer


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class FaultRegistry:
    """Routes: exact path, or a prefix ending in ``*``; unknown paths answer 404."""

    def __init__(self, bind: str = "127.0.0.1") -> None:
        assert bind.startswith("127."), "loopback only"
        self.routes: dict[str, Responder] = {}
        self.requests: list[Seen] = []
        self._server = ThreadingHTTPServer((bind, 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def host(self) -> str:
        addr = self._server.server_address
        return f"{addr[0]!s}:{addr[1]}"

    def ref(self, repo_tag: str) -> str:
        return f"{self.host}/{repo_tag}"

    def route(self, path: str, responder: Responder) -> None:
        self.routes[path] = responder

    def blob(self, repo: str, data: bytes, responder: Responder | None = None) -> str:
        digest = digest_of(data)
        self.route(f"/v2/{repo}/blobs/{digest}", responder or static(200, data))
        return digest

    def manifest(self, repo: str, tag: str, doc: dict[str, Any]) -> bytes:
        data = json.dumps(doc).encode()
        answer = static(200, data, {"Content-Type": doc.get("mediaType", OCI_MANIFEST)})
        self.route(f"/v2/{repo}/manifests/{tag}", answer)
        self.route(f"/v2/{repo}/manifests/{digest_of(data)}", answer)
        return data

    def image(self, repo: str, tag: str, config: dict[str, Any] | bytes,
              layers: list[dict[str, Any]], config_size: int | None = None) -> bytes:
        """A manifest for `config` (served here) and the given layer descriptors."""
        cfg = config if isinstance(config, bytes) else json.dumps(config).encode()
        cfg_desc = {"mediaType": OCI_CONFIG, "digest": self.blob(repo, cfg),
                    "size": len(cfg) if config_size is None else config_size}
        return self.manifest(repo, tag, {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                         "config": cfg_desc, "layers": layers})

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _dispatch(self) -> None:
                path = self.path.split("?", 1)[0]
                registry.requests.append(Seen(self.command, self.path, dict(self.headers)))
                responder = registry.routes.get(path)
                if responder is None:
                    for key, r in registry.routes.items():
                        if key.endswith("*") and path.startswith(key[:-1]):
                            responder = r
                            break
                if responder is None and path == "/v2/":
                    responder = static(200, b"{}")
                try:
                    (responder or static(404, b'{"errors":[{"code":"NOT_FOUND"}]}'))(self)
                except OSError:  # the client hung up first (a deadline, a bound): fine
                    self.close_connection = True

            do_GET = do_HEAD = do_POST = _dispatch

        return Handler

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
