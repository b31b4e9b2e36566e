"""Client of a daemon's control API (`api`): httpx over the unix socket, after checking
that root serves it."""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
from typing import Any

from erofs_nydus.errors import DaemonError, UnsafePathError, UsageError
from erofs_nydus.service.paths import api_socket_path, check_peer_is_root

__all__ = ["ApiClient"]


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
