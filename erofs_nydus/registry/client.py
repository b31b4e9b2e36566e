"""A synchronous OCI distribution client on httpx.

One `RegistryClient` talks to any number of registries (the host comes from each
reference) and is safe to share between threads.  Every operation runs under an
overall deadline: transient failures (5xx, 408/429, connection resets, timeouts)
are retried with exponential backoff until the retry budget or the deadline runs
out; each HTTP attempt's timeout is capped by the time left.  Blob bytes are
verified against their sha256 digest while they stream, and interrupted blob
downloads resume with a Range request.

Errors: `NotFoundError` (unknown repository, tag, manifest or blob; names the
reference), `AuthError` (401/403 after authenticating, or credentials needed and
none found), `DigestMismatchError`, `DeadlineExceededError` and `RegistryError`
for anything else, naming HTTP status and URL.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import ipaddress
import json
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO, Literal

import httpx

from erofs_nydus.errors import (
    AuthError,
    DigestMismatchError,
    ErofsNydusError,
    NotFoundError,
    RegistryError,
    UsageError,
)
from erofs_nydus.rafs.backend import note_retry
from erofs_nydus.registry.auth import (
    BearerToken,
    Challenge,
    Credentials,
    credentials_withheld,
    fetch_bearer_token,
    load_docker_credentials,
    merge_scopes,
    parse_www_authenticate,
    repository_scope,
)
from erofs_nydus.registry.manifest import (
    ACCEPT_MANIFESTS,
    INDEX_TYPES,
    ManifestResult,
    Platform,
    detect_media_type,
    is_sha256_digest,
    select_platform,
    sha256_digest,
)
from erofs_nydus.registry.reference import (
    ImageReference,
    LayoutReference,
    Reference,
    as_image_reference,
    check_digest,
    parse_image_reference,
)

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Bounds of what a registry may make us hold or write (issue 11 invariant (e)).  Module
# constants so a deployment can raise them; callers pass tighter ones where they know
# the descriptor's size.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024  # manifests and indexes (distribution itself caps at 4 MiB)
MAX_CONFIG_SIZE = 8 * 1024 * 1024  # image configs; get_blob's default bound
MAX_BOOTSTRAP_LAYER_SIZE = 512 * 1024 * 1024  # a bootstrap layer (tar.gz), streamed to a file
DEFAULT_CHUNK = 1024 * 1024
USER_AGENT = "erofs-nydus/0.1"

BlobData = bytes | bytearray | memoryview | str | os.PathLike[str] | BinaryIO


class SizeLimitError(RegistryError):
    """A registry answer exceeded a size bound (a limit constant or a descriptor's size)."""


LIMIT_HITS: collections.Counter[str] = collections.Counter()
_LIMIT_LOCK = threading.Lock()


def note_limit(kind: str, message: str) -> SizeLimitError:
    """Log and count one bound hit (`kind`: e.g. "manifest", "blob", "bootstrap");
    returns the error to raise.  `LIMIT_HITS` is what metrics report."""
    with _LIMIT_LOCK:
        LIMIT_HITS[kind] += 1
    log.info("size bound hit: %s", message)  # the daemon's log; the CLI prints the error
    return SizeLimitError(message)


def size_limit_text(max_size: int, name: str | None) -> str:
    """``8 MiB (MAX_CONFIG_SIZE)``: a bound as a user reads it."""
    n = f"{max_size >> 20} MiB" if max_size >= 1 << 20 and not max_size & 0xFFFFF else (
        f"{max_size} bytes")
    return f"{n} ({name})" if name else n


class DeadlineExceededError(RegistryError, TimeoutError):
    """The operation's overall deadline passed before the registry delivered."""


class TransientRegistryError(RegistryError):
    """A failure worth retrying (5xx, reset, timeout) that ran out of retries."""


class _Deadline:
    __slots__ = ("end", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def check(self, what: str) -> float:
        left = self.remaining()
        if left <= 0:
            raise DeadlineExceededError(f"{what}: deadline of {self.seconds:g} s exceeded")
        return left


def _error_detail(response: httpx.Response) -> str:
    """`` (CODE: message)`` from a distribution error body, if there is one."""
    try:
        obj = json.loads(response.content[:65536])
    except (ValueError, UnicodeDecodeError, httpx.ResponseNotRead):
        return ""
    errors = obj.get("errors") if isinstance(obj, dict) else None
    if not isinstance(errors, list) or not errors:
        return ""
    parts = []
    for e in errors[:3]:
        if isinstance(e, dict):
            parts.append(f"{e.get('code', '?')}: {e.get('message', '')}".strip())
    return f" ({'; '.join(parts)})" if parts else ""


def _error_codes(response: httpx.Response) -> set[str]:
    try:
        obj = json.loads(response.content[:65536])
        return {str(e.get("code")) for e in obj.get("errors", []) if isinstance(e, dict)}
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError, httpx.ResponseNotRead):
        return set()


def _is_tls_verify_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def is_loopback_host(host: str) -> bool:
    """``host[:port]`` names this machine's loopback (127.0.0.0/8, ::1, localhost)."""
    name = host
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.rsplit(":", 1)[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def blob_bound(
    what: str, max_size: int | None, size: int | None, limit_name: str | None
) -> tuple[int, str] | None:
    """(bytes, how to name the bound) for a blob read, or None when unbounded.

    A descriptor `size` beyond `max_size` fails now, before any download."""
    if max_size is not None and size is not None and size > max_size:
        raise note_limit(
            "blob", f"{what}: its descriptor says {size} bytes, more than the limit of "
            f"{size_limit_text(max_size, limit_name)}"
        )
    if size is not None:
        return size, f"the descriptor's size of {size} bytes"
    if max_size is not None:
        return max_size, f"the limit of {size_limit_text(max_size, limit_name)}"
    return None


class BlobSource:
    """Bytes to upload: in memory or a seekable file, re-readable for retries."""

    def __init__(self, data: BlobData) -> None:
        self._mem: memoryview | None = None
        self._path: str | None = None
        self._file: BinaryIO | None = None
        if isinstance(data, bytes | bytearray | memoryview):
            self._mem = memoryview(data).cast("B")
            self.size = len(self._mem)
        elif isinstance(data, str | os.PathLike):
            self._path = os.fspath(data)
            try:
                self.size = os.stat(self._path).st_size
            except OSError as exc:
                raise UsageError(f"cannot read blob file {self._path}: {exc.strerror}") from exc
        elif hasattr(data, "read") and hasattr(data, "seek"):
            self._file = data
            self._base = data.tell()
            self.size = data.seek(0, io.SEEK_END) - self._base
        else:
            raise UsageError(f"cannot upload a {type(data).__name__}")

    @property
    def in_memory(self) -> bool:
        """The bytes are in memory (cheap to digest before any upload)."""
        return self._mem is not None

    def digest(self) -> str:
        h = hashlib.sha256()
        for piece in self.iter(0, self.size):
            h.update(piece)
        return "sha256:" + h.hexdigest()

    def iter(self, start: int, end: int, piece: int = DEFAULT_CHUNK) -> Iterator[bytes]:
        if self._mem is not None:
            for off in range(start, end, piece):
                yield bytes(self._mem[off : min(end, off + piece)])
            return
        if self._path is not None:
            with open(self._path, "rb") as f:
                yield from self._iter_file(f, 0, start, end, piece)
            return
        assert self._file is not None
        yield from self._iter_file(self._file, self._base, start, end, piece)

    @staticmethod
    def _iter_file(f: BinaryIO, base: int, start: int, end: int, piece: int) -> Iterator[bytes]:
        f.seek(base + start)
        off = start
        while off < end:
            data = f.read(min(piece, end - off))
            if not data:
                raise UsageError("blob file shrank while uploading")
            off += len(data)
            yield data


_TLS_CONTEXTS: dict[tuple[object, ...], ssl.SSLContext] = {}
_TLS_LOCK = threading.Lock()


def shared_tls_context(verify: bool | str = True, trust_env: bool = True) -> ssl.SSLContext:
    """The TLS context httpx makes for (`verify`, `trust_env`), made once per process
    while its CA source (bundle file or directory) is unchanged.

    Loading a CA bundle takes ~20 ms: every `RegistryClient` paid it, so every
    `mount REF` a resident daemon resolves did, even over plain HTTP.  A context is
    shared by the clients (SSLContext is safe to share); a changed CA source (path,
    environment, or its mtime/size/inode) makes a new one."""
    src: str | None = None
    if verify is True:
        if trust_env and os.environ.get("SSL_CERT_FILE"):
            src = os.environ["SSL_CERT_FILE"]
        elif trust_env and os.environ.get("SSL_CERT_DIR"):
            src = os.environ["SSL_CERT_DIR"]
        else:
            import certifi

            src = certifi.where()
    elif isinstance(verify, str):
        src = verify
    try:
        st = os.stat(src) if src is not None else None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino) if st is not None else None
    except OSError:
        stamp = None
    key = (verify, trust_env, src, stamp)
    with _TLS_LOCK:
        ctx = _TLS_CONTEXTS.get(key)
        if ctx is None:
            ctx = httpx.create_ssl_context(verify=verify, trust_env=trust_env)
            if len(_TLS_CONTEXTS) >= 8:  # CA files that changed: drop the old contexts
                _TLS_CONTEXTS.clear()
            _TLS_CONTEXTS[key] = ctx
        return ctx


@dataclass(frozen=True, slots=True)
class _HostAuth:
    scheme: str  # "basic" | "bearer"
    challenge: Challenge | None = None


class RegistryClient:
    """OCI distribution API client.

    `plain_http`: True speaks HTTP instead of HTTPS to every registry; "loopback"
    only to registries on 127.0.0.0/8, ::1 or localhost (HTTPS elsewhere).
    `verify`: TLS verification (True, False, or a CA bundle path).
    `credentials`: one `Credentials` for every host, or a mapping host -> Credentials;
    hosts without explicit credentials fall back to Docker's config.json unless
    `use_docker_config` is False (`docker_config` overrides where it is read from).
    `timeout`: per HTTP attempt; `deadline`: default overall limit per operation.
    `retries`: extra attempts after a transient failure; backoff doubles from
    `backoff` up to `max_backoff` seconds (with jitter).
    """

    def __init__(
        self,
        *,
        plain_http: bool | Literal["loopback"] = False,
        verify: bool | str = True,
        credentials: Credentials | Mapping[str, Credentials] | None = None,
        use_docker_config: bool = True,
        docker_config: str | os.PathLike[str] | None = None,
        timeout: float = 30.0,
        deadline: float = 600.0,
        retries: int = 5,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        upload_chunk_size: int | None = None,
        transport: httpx.BaseTransport | None = None,
        trust_env: bool = True,
        user_agent: str = USER_AGENT,
    ) -> None:
        if timeout <= 0 or deadline <= 0 or retries < 0 or backoff < 0:
            raise UsageError("timeout and deadline must be > 0, retries and backoff >= 0")
        if plain_http not in (True, False, "loopback"):
            raise UsageError(f"plain_http must be True, False or 'loopback', not {plain_http!r}")
        self.plain_http = plain_http
        self.scheme = "http" if plain_http is True else "https"
        self.timeout = timeout
        self.deadline = deadline
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.upload_chunk_size = upload_chunk_size
        self._credentials = credentials
        self._use_docker_config = use_docker_config
        self._docker_config = docker_config
        self._lock = threading.Lock()
        self._host_auth: dict[str, _HostAuth] = {}
        self._tokens: dict[tuple[str, tuple[str, ...]], BearerToken] = {}
        self._creds_cache: dict[str, Credentials | None] = {}
        self._withheld: dict[str, str] = {}  # host -> why its realm got no credentials
        self._http = httpx.Client(
            verify=shared_tls_context(verify, trust_env) if transport is None else verify,
            transport=transport,
            trust_env=trust_env,
            follow_redirects=True,
            max_redirects=10,
            timeout=timeout,
            headers={"User-Agent": user_agent},
        )

    # -- lifecycle --------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------

    def _host_url(self, host: str) -> str:
        if self.plain_http == "loopback" and is_loopback_host(host):
            return f"http://{host}"
        return f"{self.scheme}://{host}"

    def _base_url(self, ref: ImageReference) -> str:
        return self._host_url(ref.api_host)

    def _api_url(self, ref: ImageReference, tail: str) -> str:
        return f"{self._base_url(ref)}/v2/{ref.repository}/{tail}"

    def _deadline(self, deadline: float | None) -> _Deadline:
        return _Deadline(self.deadline if deadline is None else deadline)

    def _sleep_before_retry(
        self, attempt: int, dl: _Deadline, what: str, response: httpx.Response | None = None
    ) -> None:
        delay = min(self.max_backoff, self.backoff * (2**attempt)) * random.uniform(0.5, 1.0)
        if response is not None:
            retry_after = response.headers.get("Retry-After", "")
            if retry_after.isdigit():
                delay = max(delay, min(float(retry_after), self.max_backoff))
        left = dl.check(what)
        if delay >= left:
            raise DeadlineExceededError(
                f"{what}: deadline of {dl.seconds:g} s exceeded while retrying"
            )
        note_retry()
        time.sleep(delay)

    def credentials_for(self, host: str) -> Credentials | None:
        """Explicit credentials for `host`, else Docker config's (cached)."""
        if isinstance(self._credentials, Credentials):
            return self._credentials
        if self._credentials is not None and host in self._credentials:
            return self._credentials[host]
        if not self._use_docker_config:
            return None
        with self._lock:
            if host not in self._creds_cache:
                self._creds_cache[host] = load_docker_credentials(
                    host, config_path=self._docker_config
                )
            return self._creds_cache[host]

    def _send(
        self,
        make: Callable[[float], httpx.Request],
        dl: _Deadline,
        *,
        stream: bool = False,
        retry: bool = True,
    ) -> httpx.Response:
        """Send the request `make(timeout)` builds, retrying transient failures."""
        attempt = 0
        while True:
            request = make(min(self.timeout, dl.check("registry request")))
            what = f"{request.method} {request.url}"
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TooManyRedirects as exc:
                raise RegistryError(f"{what}: redirect loop ({exc})") from exc
            except httpx.TransportError as exc:
                if _is_tls_verify_failure(exc):
                    raise RegistryError(
                        f"{what}: TLS certificate verification failed ({exc}); "
                        "is this an HTTP registry (plain_http)?"
                    ) from exc
                if isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
                    raise RegistryError(f"{what}: {exc}") from exc
                if not retry or attempt >= self.retries:
                    kind = TransientRegistryError if not retry else RegistryError
                    if isinstance(exc, httpx.TimeoutException) and dl.remaining() <= 0:
                        raise DeadlineExceededError(
                            f"{what}: no answer within the deadline of {dl.seconds:g} s"
                        ) from exc
                    raise kind(
                        f"{what}: {type(exc).__name__}: {exc or 'connection failed'}"
                        f" (after {attempt + 1} attempt{'s' if attempt else ''})"
                    ) from exc
                log.debug("%s failed (%s), retrying", what, exc)
                self._sleep_before_retry(attempt, dl, what)
                attempt += 1
                continue
            except (httpx.HTTPError, httpx.InvalidURL) as exc:  # e.g. a bad Location header
                raise RegistryError(f"{what}: {type(exc).__name__}: {exc}") from exc
            if response.status_code in RETRY_STATUSES:
                if not retry or attempt >= self.retries:
                    if stream:
                        response.read()
                    response.close()
                    kind = TransientRegistryError if not retry else RegistryError
                    raise kind(
                        f"{what}: HTTP {response.status_code}{_error_detail(response)}"
                        f" after {attempt + 1} attempt{'s' if attempt else ''}"
                    )
                response.close()
                log.debug("%s answered %d, retrying", what, response.status_code)
                self._sleep_before_retry(attempt, dl, what, response)
                attempt += 1
                continue
            return response

    def _auth_header(self, host: str, scopes: tuple[str, ...], dl: _Deadline) -> str | None:
        creds = self.credentials_for(host)
        if creds is not None and creds.registry_token:  # given, not negotiated
            return f"Bearer {creds.registry_token}"
        with self._lock:
            state = self._host_auth.get(host)
            token = self._tokens.get((host, scopes))
        if state is None:
            return None
        if state.scheme == "basic":
            creds = self.credentials_for(host)
            return creds.basic_header() if creds else None
        if token is None or not token.valid():
            assert state.challenge is not None
            token = self._get_token(host, state.challenge, scopes, dl)
        return f"Bearer {token.token}"

    def _get_token(
        self, host: str, challenge: Challenge, scopes: tuple[str, ...], dl: _Deadline
    ) -> BearerToken:
        wanted = merge_scopes(challenge.scope, scopes)
        creds = self.credentials_for(host)
        withheld = credentials_withheld(challenge.realm or "", self._host_url(host))
        if creds is not None and withheld is not None:
            log.info("%s: asking for an anonymous token: %s", host, withheld)
            with self._lock:
                self._withheld[host] = withheld
            creds = None

        def send(req: httpx.Request) -> httpx.Response:
            def make(timeout: float) -> httpx.Request:
                req.extensions["timeout"] = httpx.Timeout(timeout).as_dict()
                return req

            return self._send(make, dl)

        try:
            token = fetch_bearer_token(send, challenge, wanted, creds)
        except AuthError as exc:
            if withheld is None or self.credentials_for(host) is None:
                raise
            raise AuthError(f"{exc}; credentials withheld: {withheld}") from exc
        with self._lock:
            self._tokens[(host, scopes)] = token
        return token

    def _authenticate(
        self, host: str, response: httpx.Response, scopes: tuple[str, ...], dl: _Deadline
    ) -> None:
        challenges = parse_www_authenticate(response.headers.get("WWW-Authenticate", ""))
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None:
            # The challenge's scope says what this request needs (merged with ours);
            # later requests on this host ask for their own scopes only.
            generic = Challenge("bearer", {k: v for k, v in bearer.params.items() if k != "scope"})
            with self._lock:
                self._host_auth[host] = _HostAuth("bearer", generic)
            self._get_token(host, bearer, scopes, dl)
            return
        if any(c.scheme == "basic" for c in challenges):
            if self.credentials_for(host) is None:
                raise AuthError(
                    f"{host} requires credentials (HTTP Basic) and none are configured "
                    "(docker login, $DOCKER_CONFIG/config.json)"
                )
            with self._lock:
                self._host_auth[host] = _HostAuth("basic")
            return
        raise AuthError(
            f"{response.request.method} {response.request.url}: HTTP 401 with no usable "
            f"challenge ({response.headers.get('WWW-Authenticate', 'none')!r})"
        )

    def _request(
        self,
        method: str,
        ref: ImageReference,
        url: str | httpx.URL,
        *,
        scopes: Iterable[str],
        headers: Mapping[str, str] | None = None,
        content: Callable[[], bytes | Iterator[bytes]] | None = None,
        params: Mapping[str, str] | None = None,
        stream: bool = False,
        retry: bool = True,
        dl: _Deadline,
    ) -> httpx.Response:
        """An authenticated request: on 401, follow the challenge once and resend."""
        host = ref.api_host
        scope_key = tuple(sorted(set(scopes)))
        target = httpx.URL(url)
        if params:
            target = target.copy_merge_params(dict(params))
        base = httpx.URL(self._base_url(ref))
        # Credentials only ever go to the registry itself (not to a Location elsewhere).
        same_origin = (target.scheme, target.host, target.port) == (
            base.scheme,
            base.host,
            base.port,
        )

        for round_ in range(2):
            auth = self._auth_header(host, scope_key, dl)

            def make(timeout: float, auth: str | None = auth) -> httpx.Request:
                h = dict(headers or {})
                if auth and same_origin:
                    h["Authorization"] = auth
                return self._http.build_request(
                    method,
                    target,
                    headers=h,
                    content=content() if content is not None else None,
                    timeout=timeout,
                )

            response = self._send(make, dl, stream=stream, retry=retry)
            if response.status_code != 401:
                return response
            if stream:
                response.read()
            response.close()
            if round_ == 1 or (auth is not None and not self._may_reauth(host, auth)):
                creds = self.credentials_for(host)
                who = f"as {creds.username!r}" if creds else "anonymously"
                with self._lock:
                    withheld = self._withheld.get(host)
                if withheld and creds:
                    who = f"anonymously (credentials withheld: {withheld})"
                raise AuthError(
                    f"{method} {target}: authentication {who} refused (HTTP 401"
                    f"{_error_detail(response)})"
                )
            self._authenticate(host, response, scope_key, dl)
        raise AssertionError("unreachable")

    def _may_reauth(self, host: str, auth: str) -> bool:
        """A cached bearer token may lack a scope or have expired: worth one more round.
        A configured registry token refused is final."""
        creds = self.credentials_for(host)
        if creds is not None and creds.registry_token and auth == f"Bearer {creds.registry_token}":
            return False
        with self._lock:
            for key in [k for k in self._tokens if k[0] == host]:
                del self._tokens[key]
        return auth.startswith("Bearer ")

    def _fail(self, response: httpx.Response, what: str) -> ErofsNydusError:
        """The error for an unexpected answer to an operation on `what`."""
        status = response.status_code
        detail = _error_detail(response)
        req = f"{response.request.method} {response.request.url}"
        if status == 404:
            return NotFoundError(f"{what}: not found{detail}")
        if status in (401, 403):
            return AuthError(f"{what}: access denied (HTTP {status}{detail}) for {req}")
        if status == 400 and "DIGEST_INVALID" in _error_codes(response):
            return DigestMismatchError(f"{what}: registry refused the digest{detail}")
        return RegistryError(f"{what}: HTTP {status}{detail} for {req}")

    def _read_body(
        self, response: httpx.Response, dl: _Deadline, what: str, limit: int | None = None
    ) -> bytes:
        buf = bytearray()
        for piece in response.iter_bytes():
            buf += piece
            if limit is not None and len(buf) > limit:
                name = "MAX_MANIFEST_SIZE" if limit == MAX_MANIFEST_SIZE else "its index entry"
                raise note_limit(
                    "manifest", f"{what}: answer larger than {size_limit_text(limit, name)}"
                )
            dl.check(what)
        return bytes(buf)

    # -- manifests --------------------------------------------------------------

    def _fetch_manifest(
        self, ref: ImageReference, reference: str, dl: _Deadline, size: int | None = None
    ) -> ManifestResult:
        """`size`: the index entry's, when it names one (a tighter bound than the limit)."""
        what = f"manifest {ref.name}{'@' if reference.startswith('sha256:') else ':'}{reference}"
        response = self._request(
            "GET",
            ref,
            self._api_url(ref, f"manifests/{reference}"),
            scopes=[repository_scope(ref.repository)],
            headers={"Accept": ACCEPT_MANIFESTS},
            stream=True,
            dl=dl,
        )
        try:
            if response.status_code != 200:
                response.read()
                raise self._fail(response, what)
            limit = MAX_MANIFEST_SIZE if size is None else min(size, MAX_MANIFEST_SIZE)
            data = self._read_body(response, dl, what, limit)
        finally:
            response.close()
        digest = sha256_digest(data)
        if reference.startswith("sha256:") and digest != reference:
            raise DigestMismatchError(f"{what}: content has digest {digest}")
        header = response.headers.get("Docker-Content-Digest", "")
        if header.startswith("sha256:") and header != digest:
            raise DigestMismatchError(
                f"{what}: registry says {header} but the content has digest {digest}"
            )
        media_type = detect_media_type(data, response.headers.get("Content-Type"))
        if media_type.startswith("application/vnd.docker.distribution.manifest.v1"):
            raise RegistryError(f"{what}: Docker schema 1 manifests are not supported")
        return ManifestResult(media_type, data, digest)

    def get_manifest(
        self,
        ref: Reference | str,
        platform: str | Platform | None = None,
        *,
        resolve: bool = True,
        deadline: float | None = None,
    ) -> ManifestResult:
        """Fetch a manifest by tag or digest.

        With `resolve` (default), an index / manifest list is resolved to the image
        manifest for `platform` (default linux/amd64); a missing platform raises
        NotFoundError listing the available ones.  `resolve=False` returns the index.
        A plain image manifest is returned as is (its config's platform is not checked).
        """
        image = as_image_reference(ref)
        dl = self._deadline(deadline)
        result = self._fetch_manifest(image, image.reference, dl)
        if resolve and result.media_type in INDEX_TYPES:
            entry = select_platform(result.data, platform, name=str(image))
            result = self._fetch_manifest(image, entry.digest, dl, entry.size)
        return result

    def manifest_digest(self, ref: Reference | str, *, deadline: float | None = None) -> str:
        """The digest a tag points to (HEAD, falling back to GET)."""
        image = as_image_reference(ref)
        dl = self._deadline(deadline)
        response = self._request(
            "HEAD",
            image,
            self._api_url(image, f"manifests/{image.reference}"),
            scopes=[repository_scope(image.repository)],
            headers={"Accept": ACCEPT_MANIFESTS},
            dl=dl,
        )
        if response.status_code == 200:
            header = str(response.headers.get("Docker-Content-Digest", ""))
            if is_sha256_digest(header):
                return header  # else: GET and digest the content ourselves
        elif response.status_code == 404:
            raise NotFoundError(f"manifest {image}: not found")
        return self._fetch_manifest(image, image.reference, dl).digest

    def put_manifest(
        self,
        ref: Reference | str,
        media_type: str,
        data: bytes,
        *,
        deadline: float | None = None,
    ) -> str:
        """Upload a manifest under the reference's tag (or its digest); returns the digest."""
        image = as_image_reference(ref)
        digest = sha256_digest(data)
        if image.digest is not None and image.digest != digest:
            raise DigestMismatchError(f"manifest for {image}: content has digest {digest}")
        target = image.tag if image.tag is not None else digest
        dl = self._deadline(deadline)
        response = self._request(
            "PUT",
            image,
            self._api_url(image, f"manifests/{target}"),
            scopes=[repository_scope(image.repository, ("pull", "push"))],
            headers={"Content-Type": media_type},
            content=lambda: bytes(data),
            dl=dl,
        )
        if response.status_code not in (200, 201, 202):
            raise self._fail(response, f"pushing manifest {image.name}:{target}")
        header = response.headers.get("Docker-Content-Digest", "")
        if header.startswith("sha256:") and header != digest:
            raise DigestMismatchError(f"registry stored manifest {image} as {header}, not {digest}")
        return digest

    def list_tags(self, repo: Reference | str, *, deadline: float | None = None) -> list[str]:
        image = as_image_reference(repo)
        dl = self._deadline(deadline)
        url: httpx.URL | None = httpx.URL(self._api_url(image, "tags/list"))
        tags: list[str] = []
        while url is not None:
            response = self._request(
                "GET", image, url, scopes=[repository_scope(image.repository)], dl=dl
            )
            if response.status_code != 200:
                raise self._fail(response, f"tags of {image.name}")
            try:
                tags.extend(response.json().get("tags") or [])
            except (ValueError, AttributeError):
                raise RegistryError(f"tags of {image.name}: malformed answer") from None
            nxt = response.links.get("next", {}).get("url")
            url = response.url.join(nxt) if nxt else None
        return tags

    # -- blobs: reading ---------------------------------------------------------

    def _blob_url(self, ref: ImageReference, digest: str) -> str:
        return self._api_url(ref, f"blobs/{check_digest(digest)}")

    def blob_size(
        self, repo: Reference | str, digest: str, *, deadline: float | None = None
    ) -> int | None:
        """Size of the blob in `repo`, or None when the registry does not have it."""
        image = as_image_reference(repo)
        response = self._request(
            "HEAD",
            image,
            self._blob_url(image, digest),
            scopes=[repository_scope(image.repository)],
            dl=self._deadline(deadline),
        )
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise self._fail(response, f"blob {digest} in {image.name}")
        length = response.headers.get("Content-Length")
        return int(length) if length and length.isdigit() else -1

    def blob_exists(
        self, repo: Reference | str, digest: str, *, deadline: float | None = None
    ) -> bool:
        return self.blob_size(repo, digest, deadline=deadline) is not None

    def open_blob_stream(
        self,
        repo: Reference | str,
        digest: str,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        deadline: float | None = None,
        max_size: int | None = None,
        size: int | None = None,
        limit_name: str | None = None,
    ) -> Iterator[bytes]:
        """Iterate the blob in chunks of `chunk_size` (the last may be shorter).

        The sha256 is checked as bytes pass; a mismatch raises DigestMismatchError
        when the stream ends, so consumers must not commit data before exhausting it.
        A dropped connection resumes with ``Range: bytes=N-``.
        `max_size` (named `limit_name` in errors) and the descriptor's `size` bound the
        body: more bytes than either raise SizeLimitError as soon as they arrive.
        """
        image = as_image_reference(repo)
        check_digest(digest)
        if chunk_size <= 0:
            raise UsageError("chunk_size must be positive")
        what = f"blob {digest} in {image.name}"
        bound = blob_bound(what, max_size, size, limit_name)
        return self._blob_stream(image, digest, chunk_size, self._deadline(deadline), bound)

    def _blob_stream(
        self,
        image: ImageReference,
        digest: str,
        chunk_size: int,
        dl: _Deadline,
        bound: tuple[int, str] | None = None,
    ) -> Iterator[bytes]:
        what = f"blob {digest} in {image.name}"
        hasher = hashlib.sha256()
        received = 0
        pending = bytearray()
        failures = 0
        while True:
            headers = {"Accept-Encoding": "identity"}
            if received:
                headers["Range"] = f"bytes={received}-"
            response = self._request(
                "GET",
                image,
                self._blob_url(image, digest),
                scopes=[repository_scope(image.repository)],
                headers=headers,
                stream=True,
                dl=dl,
            )
            try:
                if response.status_code not in (200, 206):
                    response.read()
                    raise self._fail(response, what)
                length = response.headers.get("Content-Length", "")
                if bound is not None and length.isdigit() and int(length) > bound[0] - (
                    received if response.status_code == 206 else 0
                ):
                    raise note_limit("blob", f"{what}: {length} bytes exceed {bound[1]}")
                skip = 0
                if received and response.status_code == 200:
                    skip = received  # the server ignored Range: drop what we have
                elif received and not response.headers.get("Content-Range", "").startswith(
                    f"bytes {received}-"
                ):
                    raise RegistryError(
                        f"{what}: resumed at {received} but the server sent "
                        f"{response.headers.get('Content-Range')!r}"
                    )
                for piece in response.iter_bytes():
                    dl.check(what)
                    if skip:
                        cut = min(skip, len(piece))
                        piece, skip = piece[cut:], skip - cut
                        if not piece:
                            continue
                    hasher.update(piece)
                    received += len(piece)
                    if bound is not None and received > bound[0]:
                        raise note_limit("blob", f"{what}: more bytes than {bound[1]}")
                    pending += piece
                    while len(pending) >= chunk_size:
                        out = bytes(pending[:chunk_size])
                        del pending[:chunk_size]
                        yield out
                break
            except httpx.DecodingError as exc:  # a Content-Encoding we did not ask for
                raise RegistryError(f"{what}: undecodable body: {exc}") from exc
            except httpx.TransportError as exc:
                failures += 1
                if failures > self.retries:
                    raise RegistryError(
                        f"{what}: download failed at byte {received}: {type(exc).__name__}: {exc}"
                    ) from exc
                log.debug("%s: interrupted at %d (%s), resuming", what, received, exc)
                self._sleep_before_retry(failures - 1, dl, what)
            finally:
                response.close()
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest:
            raise DigestMismatchError(f"{what}: content has digest {actual} ({received} bytes)")
        if pending:
            yield bytes(pending)

    def get_blob(
        self,
        repo: Reference | str,
        digest: str,
        *,
        deadline: float | None = None,
        max_size: int = MAX_CONFIG_SIZE,
        size: int | None = None,
        limit_name: str | None = None,
    ) -> bytes:
        """The whole blob in memory, verified against `digest`.

        Bounded by `max_size` (default `MAX_CONFIG_SIZE`: configs are what is read
        whole; stream anything bigger with open_blob_stream) and by the descriptor's
        `size` when known.
        """
        if limit_name is None and max_size == MAX_CONFIG_SIZE:
            limit_name = "MAX_CONFIG_SIZE"
        buf = bytearray()
        for piece in self.open_blob_stream(
            repo, digest, deadline=deadline, max_size=max_size, size=size, limit_name=limit_name
        ):
            buf += piece
        return bytes(buf)

    def read_blob_range(
        self,
        repo: Reference | str,
        digest: str,
        offset: int,
        length: int,
        *,
        deadline: float | None = None,
    ) -> bytes:
        """Bytes [offset, offset+length) of a blob, via ``Range: bytes=a-b``.

        A 206 answer must carry exactly that range and is read up to `length` bytes.
        A 200 answer (a server ignoring Range, or a pull-through cache's first read)
        is streamed: its first `offset` bytes are skipped, the next `length` kept and
        the connection dropped, so a miss never buffers or hashes the whole blob.  The
        slice cannot be checked against the blob digest then: callers verify what they
        use (the daemon checks every chunk's digest).  Fewer bytes than asked (range
        past the end) raise RegistryError.
        """
        image = as_image_reference(repo)
        check_digest(digest)
        if offset < 0 or length < 0:
            raise UsageError(f"invalid range {offset}+{length}")
        if length == 0:
            return b""
        dl = self._deadline(deadline)
        what = f"blob {digest} in {image.name} range {offset}+{length}"
        failures = 0
        while True:
            response = self._request(
                "GET",
                image,
                self._blob_url(image, digest),
                scopes=[repository_scope(image.repository)],
                headers={
                    "Range": f"bytes={offset}-{offset + length - 1}",
                    "Accept-Encoding": "identity",
                },
                stream=True,
                dl=dl,
            )
            try:
                status = response.status_code
                if status == 416:
                    response.read()
                    raise RegistryError(f"{what}: range not satisfiable (beyond the blob's end?)")
                if status not in (200, 206):
                    response.read()
                    raise self._fail(response, what)
                if status == 206:
                    content_range = response.headers.get("Content-Range", "")
                    if content_range and not content_range.startswith(f"bytes {offset}-"):
                        raise RegistryError(f"{what}: server sent range {content_range!r}")
                data = self._read_window(response, dl, what, offset if status == 200 else 0,
                                         length)
                break
            except httpx.TransportError as exc:
                failures += 1
                if failures > self.retries:
                    raise RegistryError(f"{what}: {type(exc).__name__}: {exc}") from exc
                self._sleep_before_retry(failures - 1, dl, what)
            finally:
                response.close()  # unread rest: httpx drops the connection
        if len(data) != length:
            raise RegistryError(f"{what}: short read ({len(data)} bytes)")
        return data

    @staticmethod
    def _read_window(
        response: httpx.Response, dl: _Deadline, what: str, skip: int, length: int
    ) -> bytes:
        """Bytes [skip, skip+length) of a streaming body; stops reading right after them.

        We ask for ``Accept-Encoding: identity``: a compressed answer would make each
        network read inflate without bound, so it is refused.
        """
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise RegistryError(f"{what}: unexpected Content-Encoding {encoding!r}")
        buf = bytearray()
        for piece in response.iter_bytes():  # identity: as received
            dl.check(what)
            if skip:
                cut = min(skip, len(piece))
                piece, skip = piece[cut:], skip - cut
            buf += piece[: length - len(buf)]
            if len(buf) >= length:
                break
        return bytes(buf)

    # -- blobs: writing ---------------------------------------------------------

    def push_blob(
        self,
        repo: Reference | str,
        data: BlobData,
        digest: str | None = None,
        *,
        mount_from: Iterable[Reference | str] = (),
        chunk_size: int | None = None,
        deadline: float | None = None,
    ) -> str:
        """Upload a blob unless the repository has it; returns its digest.

        `data`: bytes, a file path or a seekable binary file.  `mount_from`: other
        repositories (same registry) that may hold the blob: tried first with a
        cross-repository mount.  `chunk_size` (or the client's `upload_chunk_size`):
        upload in PATCH chunks of that size; otherwise one monolithic PUT.
        """
        image = as_image_reference(repo)
        source = BlobSource(data)
        if digest is None:
            digest = source.digest()
        else:
            check_digest(digest)
            if source.in_memory and source.digest() != digest:
                raise DigestMismatchError(f"blob for {image.name}: data is not {digest}")
        chunk = chunk_size if chunk_size is not None else self.upload_chunk_size
        if chunk is not None and chunk <= 0:
            raise UsageError("chunk_size must be positive")
        dl = self._deadline(deadline)
        if self.blob_exists(image, digest, deadline=dl.remaining()):
            return digest
        sources = [
            r for r in (self._mount_source(image, src) for src in mount_from) if r is not None
        ]
        attempt = 0
        while True:
            try:
                self._upload(image, source, digest, sources, chunk, dl)
                return digest
            except TransientRegistryError as exc:
                if attempt >= self.retries:
                    raise RegistryError(f"{exc} (upload retried {attempt} times)") from exc
                log.debug("upload of %s failed (%s), restarting", digest, exc)
                self._sleep_before_retry(attempt, dl, f"upload of {digest}")
                attempt += 1

    def push_blob_stream(
        self,
        repo: Reference | str,
        pieces: Iterable[bytes],
        *,
        deadline: float | None = None,
        digest: Callable[[], str] | None = None,
    ) -> tuple[str, int]:
        """Upload a blob while it is being produced: one PATCH whose body streams
        `pieces` (chunked transfer encoding), the sha256 computed on the way and sent
        with the closing PUT.  Returns (digest, size).  The bytes go out once, without
        retry; a caller that still has them (a file) falls back to `push_blob`.
        `digest`: a caller that hashes the bytes itself (a blob writer) saves the second
        sha256: called once the last piece is out, it gives the digest to send; the
        registry checks it against what it received and refuses the upload if wrong."""
        image = as_image_reference(repo)
        dl = self._deadline(deadline)
        push = repository_scope(image.repository, ("pull", "push"))
        what = f"streaming a blob to {image.name}"
        response = self._request(
            "POST", image, self._api_url(image, "blobs/uploads/"), scopes=[push],
            headers={"Content-Length": "0"}, dl=dl,
        )
        if response.status_code != 202:
            raise self._fail(response, what)
        location = self._location(response, what)
        hasher = hashlib.sha256()
        size = 0
        sent = False

        def body() -> Iterator[bytes]:
            nonlocal sent
            if sent:
                raise RegistryError(f"{what}: the registry asked for the body again")
            sent = True
            return hashed()

        def hashed() -> Iterator[bytes]:
            nonlocal size
            for piece in pieces:
                if digest is None:
                    hasher.update(piece)
                size += len(piece)
                yield piece

        response = self._request(
            "PATCH", image, location, scopes=[push],
            headers={"Content-Type": "application/octet-stream"}, content=body,
            retry=False, dl=dl,
        )
        if response.status_code != 202:
            self._raise_upload(response, what)
        location = self._location(response, what)
        final = "sha256:" + hasher.hexdigest() if digest is None else check_digest(digest())
        response = self._request(
            "PUT", image, location.copy_merge_params({"digest": final}), scopes=[push],
            headers={"Content-Type": "application/octet-stream", "Content-Length": "0"},
            retry=False, dl=dl,
        )
        if response.status_code not in (201, 204):
            self._raise_upload(response, what)
        return final, size

    def mount_blob(
        self,
        repo: Reference | str,
        digest: str,
        from_repo: Reference | str,
        *,
        deadline: float | None = None,
    ) -> bool:
        """Cross-repository mount only (no data at hand): True when the registry mounted it.

        When it cannot (the source lacks the blob), the upload session the registry
        opened instead is cancelled and False is returned.
        """
        image = as_image_reference(repo)
        check_digest(digest)
        src = self._mount_source(image, from_repo)
        if src is None:
            return False
        dl = self._deadline(deadline)
        response = self._request(
            "POST",
            image,
            self._api_url(image, "blobs/uploads/"),
            scopes=[repository_scope(image.repository, ("pull", "push")), repository_scope(src)],
            params={"mount": digest, "from": src},
            headers={"Content-Length": "0"},
            dl=dl,
        )
        if response.status_code == 201:
            return True
        if response.status_code != 202:
            raise self._fail(response, f"mounting blob {digest} from {src} into {image.name}")
        location = self._location(response, "mount")
        cancel = self._request(
            "DELETE",
            image,
            location,
            scopes=[repository_scope(image.repository, ("pull", "push"))],
            dl=dl,
        )
        cancel.close()
        return False

    @staticmethod
    def _mount_source(image: ImageReference, src: Reference | str) -> str | None:
        """Repository name to mount from, or None when `src` is not on `image`'s registry."""
        if isinstance(src, LayoutReference):
            return None
        if isinstance(src, str):
            try:
                parsed = parse_image_reference(src)
            except UsageError:
                parsed = None
            src = (
                parsed
                if parsed is not None and parsed.registry == image.registry
                else image.with_repository(src)
            )
        if src.api_host != image.api_host or src.repository == image.repository:
            return None
        return src.repository

    def _upload(
        self,
        image: ImageReference,
        source: BlobSource,
        digest: str,
        mount_sources: list[str],
        chunk: int | None,
        dl: _Deadline,
    ) -> None:
        what = f"pushing blob {digest} to {image.name}"
        push = repository_scope(image.repository, ("pull", "push"))
        start_url = self._api_url(image, "blobs/uploads/")
        location: httpx.URL | None = None
        for src in mount_sources:
            response = self._request(
                "POST",
                image,
                start_url,
                scopes=[push, repository_scope(src)],
                params={"mount": digest, "from": src},
                headers={"Content-Length": "0"},
                dl=dl,
            )
            if response.status_code == 201:
                log.debug("%s: mounted from %s", what, src)
                return
            if response.status_code != 202:
                raise self._fail(response, f"{what} (mount from {src})")
            location = self._location(response, what)
            break
        if location is None:
            response = self._request(
                "POST", image, start_url, scopes=[push], headers={"Content-Length": "0"}, dl=dl
            )
            if response.status_code != 202:
                raise self._fail(response, what)
            location = self._location(response, what)

        if chunk is not None and source.size > 0:
            for start in range(0, source.size, chunk):
                end = min(source.size, start + chunk)
                response = self._request(
                    "PATCH",
                    image,
                    location,
                    scopes=[push],
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{start}-{end - 1}",
                        "Content-Length": str(end - start),
                    },
                    content=functools.partial(source.iter, start, end),
                    retry=False,
                    dl=dl,
                )
                if response.status_code != 202:
                    self._raise_upload(response, what)
                location = self._location(response, what)
            body_size = 0
        else:
            body_size = source.size

        def whole() -> Iterator[bytes]:
            return source.iter(0, source.size)

        response = self._request(
            "PUT",
            image,
            location.copy_merge_params({"digest": digest}),
            scopes=[push],
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(body_size)},
            content=whole if body_size else None,
            retry=False,
            dl=dl,
        )
        if response.status_code not in (201, 204):
            self._raise_upload(response, what)

    def _raise_upload(self, response: httpx.Response, what: str) -> None:
        if response.status_code in (404, 416) and "BLOB_UPLOAD_UNKNOWN" in _error_codes(response):
            raise TransientRegistryError(f"{what}: upload session lost{_error_detail(response)}")
        raise self._fail(response, what)

    @staticmethod
    def _location(response: httpx.Response, what: str) -> httpx.URL:
        loc = response.headers.get("Location")
        if not loc:
            raise RegistryError(f"{what}: HTTP {response.status_code} without a Location header")
        return response.url.join(loc)
