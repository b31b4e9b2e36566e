"""The daemon's blob backend over a registry: `read_range` maps to a Range GET.

blob_id is the blob's sha256 in hex; the registry names the blob ``sha256:<blob_id>``
in the repository given at construction.  Every read runs under `deadline` seconds
(retries included) and raises BackendError past it, never hangs.  With mirrors or a
proxy in the spec, reads go through them first (`registry.mirrors`).
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

from erofs_nydus.errors import BackendError, ErofsNydusError, UsageError
from erofs_nydus.registry.client import RegistryClient
from erofs_nydus.registry.mirrors import Router, parse_routes
from erofs_nydus.registry.reference import ImageReference, as_image_reference

_BLOB_ID_RE = re.compile(r"^[0-9a-f]{64}$")
_SHARED: dict[str, tuple[RegistryClient, int]] = {}  # from_spec clients, with user counts
_SHARED_LOCK = threading.Lock()


class RegistryBackend:
    """`BlobBackend` reading blobs of one repository through a `RegistryClient`.

    `repo`: an ImageReference or ``host[:port]/repo`` (a tag or digest is ignored).
    `deadline`: seconds per read_range, retries included.  `owns_client`: close the
    client in `close()`.  `client_options` (with no `client`; what `from_spec` makes):
    the `RegistryClient` options; backends with the same ones share one client (one
    connection pool, TLS context and bearer token for all the blobs of an image),
    created on the first read, so registering an image in the daemon never waits for
    the HTTP stack.
    """

    def __init__(
        self,
        client: RegistryClient | None,
        repo: ImageReference | str,
        *,
        deadline: float = 60.0,
        owns_client: bool = False,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self._client = client
        self.repo = as_image_reference(repo)
        self.deadline = deadline
        self.owns_client = owns_client
        self.extra_spec: dict[str, Any] = {}  # docker_config / verify, kept by spec()
        # without a client: the RegistryClient options of the shared client made on first read
        self._options: dict[str, Any] = dict(client_options or {}) if client is None else {}
        self._shared_key: str | None = None
        self._lock = threading.Lock()
        self.router = Router([], None, {})

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> RegistryBackend:
        """Build from a daemon backend spec (JSON-able, no secrets)::

            {"type": "registry", "repo": "host:port/name", "plain_http": false | true |
             "loopback", "deadline": 60, "timeout": 30, "retries": 5,
             "docker_config": "/path/to/dir" | null, "verify": true | "/ca.pem",
             "mirrors": [{"host": "http://m:5000", ...}], "proxy": {"url": ...} | null}

        (`mirrors`, `proxy`: nydusd's settings, see `config.normalize_mirrors`;
        `"origin": false` reads only through them, to fill them: `warm --mirrors-only`.)
        Credentials come from Docker's config.json at run time, never from the spec.
        """
        if spec.get("type") != "registry" or not isinstance(spec.get("repo"), str):
            raise UsageError(f"not a registry backend spec: {spec!r}")
        deadline = float(spec.get("deadline", 60.0))
        plain_http = spec.get("plain_http", False)
        if plain_http not in (True, False, "loopback"):
            raise UsageError(f"registry backend spec: bad plain_http {plain_http!r}")
        options: dict[str, Any] = {
            "plain_http": plain_http,
            "verify": spec.get("verify", True),
            "docker_config": spec.get("docker_config"),
            "timeout": float(spec.get("timeout", min(30.0, deadline))),
            "retries": int(spec.get("retries", 5)),
            "deadline": deadline,
        }
        if options["timeout"] <= 0 or deadline <= 0 or options["retries"] < 0:
            raise UsageError(f"registry backend spec: bad timeout/deadline/retries in {spec!r}")
        backend = cls(None, spec["repo"], deadline=deadline, client_options=options)
        backend.extra_spec = {k: spec[k] for k in ("docker_config", "verify") if k in spec}
        mirrors, proxy = parse_routes(spec)
        if mirrors:
            backend.extra_spec["mirrors"] = mirrors
        if proxy:
            backend.extra_spec["proxy"] = proxy
        origin = spec.get("origin", True)
        if origin is not True:
            if origin is not False or not (mirrors or proxy):
                raise UsageError(f"registry backend spec: bad origin {origin!r} (false needs "
                                 "mirrors or a proxy)")
            backend.extra_spec["origin"] = False
        backend.router = Router(mirrors, proxy, options, origin=origin)
        return backend

    @property
    def client(self) -> RegistryClient:
        with self._lock:
            if self._client is None:
                if not self._options:
                    raise BackendError(f"registry backend for {self.repo.name} is closed")
                key = json.dumps(self._options, sort_keys=True)
                with _SHARED_LOCK:
                    client, users = _SHARED.get(key, (None, 0))
                    if client is None:
                        client = RegistryClient(**self._options)
                    _SHARED[key] = (client, users + 1)
                self._client, self._shared_key = client, key
            return self._client

    def spec(self) -> dict[str, Any]:
        """The spec `from_spec` takes (client options that matter for reads)."""
        if self._options:
            plain_http, timeout, retries = (
                self._options["plain_http"], self._options["timeout"], self._options["retries"]
            )
        else:
            c = self.client
            plain_http, timeout, retries = c.plain_http, c.timeout, c.retries
        return {
            "type": "registry",
            "repo": self.repo.name,
            "plain_http": plain_http,
            "deadline": self.deadline,
            "timeout": timeout,
            "retries": retries,
            **self.extra_spec,
        }

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        if not _BLOB_ID_RE.match(blob_id):
            raise BackendError(f"invalid blob id {blob_id!r}: expected 64 lower-case hex digits")
        digest = f"sha256:{blob_id}"

        def read(client: RegistryClient, ref: ImageReference, seconds: float) -> bytes:
            data = client.read_blob_range(ref, digest, offset, length, deadline=seconds)
            if len(data) != length:
                raise BackendError(f"short read at {offset}+{length} ({len(data)} bytes)")
            return data

        try:
            data = self.router.read(
                (blob_id, offset, length), self.repo, self.deadline, read, lambda: self.client
            )
        except BackendError:
            raise
        except ErofsNydusError as exc:  # DigestMismatchError, UsageError
            raise BackendError(f"blob {blob_id} in {self.repo.name}: {exc}") from exc
        except Exception as exc:  # never let a library error escape the daemon's contract
            raise BackendError(
                f"blob {blob_id} in {self.repo.name}: {type(exc).__name__}: {exc}"
            ) from exc
        if len(data) != length:
            raise BackendError(
                f"blob {blob_id}: short read at {offset}+{length} (got {len(data)} bytes)"
            )
        return data

    def reject(self, blob_id: str, offset: int, length: int) -> bool:
        """Bytes of this range failed their digest: True when a mirror or the proxy
        served them (the next read of the range then goes to the origin)."""
        return self.router.reject((blob_id, offset, length))

    def close(self) -> None:
        self.router.close()
        with self._lock:
            client, key = self._client, self._shared_key
            self._client, self._shared_key, self._options = None, None, {}
        if client is None:
            return
        if key is not None:
            with _SHARED_LOCK:
                shared, users = _SHARED.get(key, (None, 0))
                if shared is client and users > 1:
                    _SHARED[key] = (client, users - 1)
                    return
                if shared is client:
                    del _SHARED[key]
            client.close()
        elif self.owns_client:
            client.close()
