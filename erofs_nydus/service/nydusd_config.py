"""nydusd's JSON daemon config (what nydus-snapshotter writes) as our backend spec and cache dir.

nydusd reads ``{"device": {"backend": {"type": "registry" | "localfs", "config": {...}},
"cache": {"type": "blobcache", "config": {"work_dir": DIR}}}, ...}`` (fusedev), or the same
backend/cache keys at the top level with ``"type": "bootstrap"`` (fscache's v2 shape).  We keep
what changes where the bytes come from and where they are cached, and ignore the rest
(``mode``, ``digest_validate``, ``iostats_files``, ``fs_prefetch``: our daemon always verifies
chunks and prefetches by the image's own list).

A registry backend's ``mirrors`` and ``proxy`` (nydusd's keys: mirror ``host``, ``headers``,
``health_check_interval``, ``failure_limit``, ``ping_url``, ``auth_through``; proxy ``url``,
``ping_url``, ``fallback``, ``check_interval``, ``use_http``) become the spec's mirrors/proxy
(`registry.mirrors` reads through them); as in nydusd, 0 or empty means the default, a proxy
without a url means none, and keys we do not know are ignored like the rest.

Registry credentials (``auth``: base64 of ``user:password``; ``registry_token``: a bearer
token sent as ``Authorization: Bearer`` to that registry only, as Docker's ``registrytoken``)
never enter a backend spec, which the daemon stores in its state file: they go to a private
Docker config.json (mode 0600) under the cache dir, and the spec names that directory.

fscache mode's ``PUT /api/v2/blobs`` body (:func:`parse_blob_request`) is nydusd's blob cache
entry: ``{"type": "bootstrap", "id": FSID, "domain_id": D, "config": {"id": FSID,
"backend_type": ..., "backend_config": {...}, "cache_type": "fscache", "cache_config":
{"work_dir": ...}, "metadata_path": BOOTSTRAP, "prefetch_config": {"enable": ...}}}``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from typing import Any

from erofs_nydus.config import normalize_mirrors, normalize_proxy
from erofs_nydus.errors import UsageError
from erofs_nydus.fsutil import atomic_write

__all__ = ["BlobRequest", "NydusdConfig", "parse_blob_request", "parse_nydusd_config"]

AUTH_DIR = "nydusd-auth"


class NydusdConfig:
    """A parsed nydusd config: `cache_dir` (work_dir) and `backend` (our daemon's spec)."""

    def __init__(self, cache_dir: str, backend: dict[str, Any], auth: str | None,
                 host: str | None, token: str | None = None) -> None:
        self.cache_dir = cache_dir
        self.backend = backend
        self._auth = auth
        self._host = host
        self._token = token

    def write_credentials(self) -> None:
        """Put the registry credentials where the spec's `docker_config` points (no-op
        without credentials).  Called before the daemon reads a blob."""
        if (self._auth is None and self._token is None) or self._host is None:
            return
        d = str(self.backend["docker_config"])
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
        entry: dict[str, str] = {}
        if self._auth is not None:
            entry["auth"] = self._auth
        if self._token is not None:
            entry["registrytoken"] = self._token
        body = json.dumps({"auths": {self._host: entry}}).encode()
        atomic_write(os.path.join(d, "config.json"), body, mode=0o600)


def _obj(v: object, what: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise UsageError(f"nydusd config: {what} must be a JSON object")
    return v


def _num(cfg: dict[str, Any], key: str, default: float) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise UsageError(f"nydusd config: backend {key} must be a non-negative number, not {v!r}")
    return float(v) if v else default


_MIRROR_KEYS = ("host", "headers", "health_check_interval", "failure_limit", "ping_url",
                "auth_through")
_PROXY_KEYS = ("url", "ping_url", "fallback", "check_interval", "use_http")


def _known(item: object, keys: tuple[str, ...], what: str) -> dict[str, Any]:
    """nydusd's settings object with only the keys we map; null, 0 and "" are left out
    (nydusd's defaults then apply)."""
    obj = _obj(item, what)

    def unset(v: object) -> bool:
        return v is None or v == "" or (v == 0 and not isinstance(v, bool))

    return {k: obj[k] for k in keys if not unset(obj.get(k))}


def _routes(inner: dict[str, Any]) -> dict[str, Any]:
    """The registry config's ``mirrors`` / ``proxy`` as spec keys (UsageError if bad)."""
    out: dict[str, Any] = {}
    raw = inner.get("mirrors")
    if raw is not None and not isinstance(raw, list):
        raise UsageError("nydusd config: backend mirrors must be a JSON list")
    try:
        mirrors = normalize_mirrors([_known(m, _MIRROR_KEYS, f"backend mirrors[{i}]")
                                     for i, m in enumerate(raw or [])])  # fmt: skip
        proxy = normalize_proxy(_known(inner["proxy"], _PROXY_KEYS, "backend proxy")
                                if inner.get("proxy") is not None else None)  # fmt: skip
    except ValueError as exc:
        raise UsageError(f"nydusd config: backend {exc}") from None
    if mirrors:
        out["mirrors"] = mirrors
    if proxy:
        out["proxy"] = proxy
    return out


def parse_nydusd_config(text: str | bytes | dict[str, Any], *,
                        default_cache_dir: str | None = None) -> NydusdConfig:
    """Parse nydusd's config (a JSON text or an already-parsed object); UsageError if bad."""
    if isinstance(text, dict):
        cfg = text
    else:
        try:
            cfg = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"nydusd config is not valid JSON: {exc}") from None
    cfg = _obj(cfg, "the config")
    device = _obj(cfg.get("device"), "device")
    backend_cfg = _obj(device.get("backend") or cfg.get("backend"), "device.backend")
    cache_cfg = _obj(device.get("cache") or cfg.get("cache"), "device.cache")
    cache_inner = _obj(cache_cfg.get("config"), "device.cache.config")
    # fscache v2 configs name the cache dir under cache.fscache.work_dir
    work_dir = cache_inner.get("work_dir") or _obj(cache_cfg.get("fscache"),
                                                    "cache.fscache").get("work_dir")
    work_dir = work_dir or default_cache_dir
    if not isinstance(work_dir, str) or not work_dir:
        raise UsageError("nydusd config: device.cache.config.work_dir is missing")
    cache_dir = os.path.abspath(work_dir)

    kind = backend_cfg.get("type")
    inner = _obj(backend_cfg.get("config") or backend_cfg.get(str(kind)), "device.backend.config")
    if kind == "localfs":
        d = inner.get("dir") or inner.get("blob_dir")
        if not isinstance(d, str) or not d:
            raise UsageError("nydusd config: localfs backend needs config.dir")
        return NydusdConfig(cache_dir, {"type": "local", "dir": os.path.abspath(d)}, None, None)
    if kind != "registry":
        raise UsageError(f"nydusd config: backend type {kind!r} is not supported "
                         "(registry or localfs)")
    host, repo = inner.get("host"), inner.get("repo")
    if not isinstance(host, str) or not host or not isinstance(repo, str) or not repo:
        raise UsageError("nydusd config: registry backend needs config.host and config.repo")
    scheme = inner.get("scheme") or ""
    plain_http: bool | str
    if scheme == "http":
        plain_http = True
    elif scheme == "https":
        plain_http = False
    elif scheme == "":
        plain_http = "loopback"
    else:
        raise UsageError(f"nydusd config: registry scheme {scheme!r} (http or https)")
    timeout = _num(inner, "timeout", 30.0)
    connect = _num(inner, "connect_timeout", timeout)
    retries = int(_num(inner, "retry_limit", 3))
    spec: dict[str, Any] = {
        "type": "registry",
        "repo": f"{host}/{repo}",
        "plain_http": plain_http,
        "timeout": max(timeout, connect),
        "retries": retries,
        "deadline": max(30.0, max(timeout, connect) * (retries + 1)),
    }
    if inner.get("skip_verify"):
        spec["verify"] = False
    spec.update(_routes(inner))
    auth = inner.get("auth") or None
    if auth is not None:
        if not isinstance(auth, str):
            raise UsageError("nydusd config: registry auth must be a base64 string")
        try:
            user_pass = base64.b64decode(auth, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise UsageError("nydusd config: registry auth is not base64 of user:password") \
                from None
        if ":" not in user_pass:
            raise UsageError("nydusd config: registry auth lacks the ':' of user:password")
    token = inner.get("registry_token") or None
    if token is not None and (not isinstance(token, str) or not token.isprintable()
                              or " " in token):
        raise UsageError("nydusd config: registry_token must be a bearer token string")
    if auth is not None or token is not None:
        key = hashlib.sha256(f"{host}\0{auth or ''}\0{token or ''}".encode()).hexdigest()[:16]
        spec["docker_config"] = os.path.join(cache_dir, AUTH_DIR, key)
    return NydusdConfig(cache_dir, spec, auth, host, token)


class BlobRequest:
    """A parsed ``PUT /api/v2/blobs`` body: register `bootstrap` as fsid `id` in `domain_id`."""

    def __init__(self, id: str, domain_id: str, bootstrap: str, config: NydusdConfig,
                 prefetch: bool) -> None:
        self.id = id
        self.domain_id = domain_id
        self.bootstrap = bootstrap
        self.config = config
        self.prefetch = prefetch


def parse_blob_request(text: str | bytes, cache_dir: str) -> BlobRequest:
    """Parse nydusd's blob cache entry (fscache mode).  The image is served from
    `cache_dir` (nydusd's ``--fscache`` dir): the entry's per-snapshot ``work_dir`` is
    not used.  UsageError if unusable."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"blob request is not valid JSON: {exc}") from None
    doc = _obj(doc, "the blob request")
    kind = doc.get("type")
    if kind != "bootstrap":
        raise UsageError(f"blob request type {kind!r}: only \"bootstrap\" entries are "
                         "supported (data blobs come with their bootstrap)")
    cfg = _obj(doc.get("config"), "config")
    fsid = doc.get("id") or cfg.get("id")
    if not isinstance(fsid, str) or not fsid:
        raise UsageError("blob request lacks id")
    domain = doc.get("domain_id") or fsid
    if not isinstance(domain, str):
        raise UsageError("blob request domain_id must be a string")
    boot = cfg.get("metadata_path")
    if not isinstance(boot, str) or not boot:
        raise UsageError("blob request lacks config.metadata_path (the bootstrap)")
    backend = {"type": cfg.get("backend_type"), "config": _obj(cfg.get("backend_config"),
                                                               "config.backend_config")}
    parsed = parse_nydusd_config({"backend": backend}, default_cache_dir=cache_dir)
    prefetch = bool(_obj(cfg.get("prefetch_config"), "config.prefetch_config").get("enable"))
    return BlobRequest(fsid, domain, os.path.abspath(boot), parsed, prefetch)
