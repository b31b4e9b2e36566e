"""Blob range reads through registry mirrors and an HTTP proxy, falling back to the origin.

The settings are nydusd's (`config.normalize_mirrors` / `normalize_proxy` give every key):
a read goes first to the proxy (when set and healthy), then to each healthy mirror in
order, then to the origin registry.  What a mirror or the proxy fails (connection
error, any HTTP error, a short or slow answer, bytes that fail their digest later)
goes on to the next path; nothing that comes back is trusted more than the origin's
bytes, because the daemon core verifies every chunk whatever answered.

Health, as nydusd does it: a mirror is skipped once it failed `failure_limit` times;
then a thread pings `ping_url` (default ``HOST/v2``) every `health_check_interval`
seconds and puts it back when the answer is below 500.  The proxy is skipped after a
failure only when it has a `ping_url`: a thread pings it every `check_interval`
seconds and puts it back on a 2xx/3xx answer; without a ping URL every read tries it.
With `fallback = false` a failed proxy read is an error (nothing goes to the origin).

Mirrors and the proxy never get more than half of what is left of a read's deadline,
so the origin always has time to answer.  A pull-through cache answers the first
Range read of a blob it does not hold yet with 200 and the whole blob (and stores the
blob meanwhile, whether the reader stays or not): `RangeStreamTransport` turns that
into the asked range while it streams and drops the connection after it, never
holding more than the range.  When the range starts more than `MAX_SKIP` bytes into
the blob, streaming up to it would cost the origin (and the reader) that much: the
answer is dropped at once and the read goes on to the next path, counted as a miss,
not a failure; the mirror serves the range once it has stored the blob.  Only when
the origin then fails too (a node that reaches nothing but its mirror) is the whole
blob streamed up to the range.

While a pull-through mirror stores a blob, every further read of that blob it gets
is copied from the origin to that reader (and not stored): each costs the origin
what streams before we hang up.  So once a mirror answered a Range read of blob X
with 200 (the whole blob: cold, storing), X's reads go past that mirror to the next
path for a back-off period - a diversion, not a failure: no `failure_limit` count,
no health check - and one read a period (1 s, doubling up to the mirror's
`health_check_interval`) probes the mirror again with the range it needs; a 206
ends the back-off.  The first read of a blob the mirror is not known to hold goes
alone: reads of the same blob meanwhile wait for its answer's status line.  Counted
per path as ``diverted`` (`ctl metrics`: ``result="diverted"``).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from erofs_nydus.config import normalize_mirrors, normalize_proxy
from erofs_nydus.errors import BackendError, ErofsNydusError, UsageError
from erofs_nydus.rafs.backend import note_path
from erofs_nydus.registry.client import RegistryClient
from erofs_nydus.registry.reference import ImageReference

log = logging.getLogger(__name__)

ORIGIN = "origin"
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d+)$")
MIRROR_SHARE = 0.5  # of the time left, at most, for one mirror or proxy attempt
PING_TIMEOUT = 5.0
MAX_SKIP = 1 << 20  # bytes of a whole-blob answer worth streaming past to reach a range
BACKOFF_START = 1.0  # s a storing mirror is passed over for a blob before the first probe
TRIAL_WAIT = 2.0  # s, at most, a read waits for the status of a blob's first mirror read
_KNOWN_BLOBS = 4096  # blob states a mirror's Health keeps (least recently used go)
_BLOB_PATH_RE = re.compile(r"/blobs/sha256:([0-9a-f]{64})$")
_stream_all = threading.local()  # .on: no MAX_SKIP (the origin is not reachable)


class BlobNotCachedError(Exception):
    """A mirror answered a Range read with the whole blob, the range too far into it."""


# -- 200 with the whole blob -> 206 with the range ------------------------------------------


class _SliceStream(httpx.SyncByteStream):
    """Bytes [start, end) of `inner`, read as they stream; the rest is never read."""

    def __init__(self, inner: httpx.SyncByteStream, start: int, end: int) -> None:
        self._inner, self._start, self._end = inner, start, end

    def __iter__(self) -> Iterator[bytes]:
        pos = 0
        for piece in self._inner:
            lo, hi = max(self._start - pos, 0), min(self._end - pos, len(piece))
            pos += len(piece)
            if lo < hi:
                yield piece[lo:hi]
            if pos >= self._end:
                break  # close() drops the connection: the rest of the blob is not read

    def close(self) -> None:
        self._inner.close()


class RangeStreamTransport(httpx.BaseTransport):
    """`inner` with `headers` added to every request; a 200 answer to a single
    ``Range: bytes=a-b`` GET becomes a 206 of that range, sliced while it streams."""

    def __init__(self, inner: httpx.BaseTransport, headers: dict[str, str] | None = None,
                 max_skip: int | None = None,
                 on_answer: Callable[[str, bool], None] | None = None) -> None:  # fmt: skip
        """`on_answer(blob_id, whole)`: called as soon as a Range GET of a blob has its
        status, 206 (whole=False) or 200 (whole=True), before the body is read."""
        self._inner = inner
        self._headers = dict(headers or {})
        self._max_skip = max_skip
        self._on_answer = on_answer

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for k, v in self._headers.items():
            request.headers[k] = v
        response = self._inner.handle_request(request)
        m = _RANGE_RE.match(request.headers.get("Range", ""))
        if request.method != "GET" or m is None:
            return response
        blob = _BLOB_PATH_RE.search(request.url.path)
        if self._on_answer is not None and blob and response.status_code in (200, 206):
            self._on_answer(blob.group(1), response.status_code == 200)
        if response.status_code != 200:
            return response
        start, end = int(m.group(1)), int(m.group(2)) + 1
        total = response.headers.get("Content-Length", "*")
        if total.isdigit() and int(total) < end:
            return response  # the client reports the short blob
        if (self._max_skip is not None and start > self._max_skip
                and not getattr(_stream_all, "on", False)):  # fmt: skip
            response.close()
            raise BlobNotCachedError(
                f"{request.url.host}:{request.url.port} answered with the whole blob "
                f"(not cached there yet); range starts {start} bytes in"
            )
        headers = [(k, v) for k, v in response.headers.multi_items()
                   if k.lower() not in ("content-length", "content-range")]  # fmt: skip
        headers += [("Content-Range", f"bytes {start}-{end - 1}/{total}"),
                    ("Content-Length", str(end - start))]  # fmt: skip
        assert isinstance(response.stream, httpx.SyncByteStream)
        return httpx.Response(
            206,
            headers=headers,
            stream=_SliceStream(response.stream, start, end),
            extensions=response.extensions,
            request=request,
        )

    def close(self) -> None:
        self._inner.close()


# -- endpoints and their health ------------------------------------------------------------


GO, WAIT, DIVERT = "go", "wait", "divert"  # what `Health.admit` tells a read


@dataclass
class _BlobState:
    """What a mirror is known to do with one blob: "trial" (its first read is out,
    answer not seen yet), "storing" (it answered 200: passed over until `due`, then
    probed once a `period`) or "held" (it answered 206)."""

    state: str
    owner: int = 0  # thread of the trial read
    event: threading.Event | None = None  # set when the trial's answer is known
    period: float = BACKOFF_START
    due: float = 0.0


@dataclass
class Health:
    """Whether a mirror or the proxy is used, shared by every endpoint of one URL in
    the process for its life (backends with different client options, and backends
    made later, count its failures together), and which blobs a mirror is still
    storing (passed over meanwhile, not counted as failures)."""

    kind: str  # "mirror" | "proxy"
    name: str
    failure_limit: int
    interval: float
    ping_url: str
    failures: int = 0
    healthy: bool = True
    _checker: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _blobs: OrderedDict[str, _BlobState] = field(default_factory=OrderedDict)

    def ok(self) -> bool:
        return self.healthy

    def admit(self, blob_id: str) -> tuple[str, threading.Event | None]:
        """May a Range read of `blob_id` go to this mirror now?  GO (the blob is held
        there, or this read is its first read or its probe), WAIT on the event (the
        first read's answer is not known yet; then ask again), or DIVERT (storing)."""
        now = time.monotonic()
        with self._lock:
            st = self._blobs.get(blob_id)
            if st is None:
                self._blobs[blob_id] = _BlobState("trial", threading.get_ident(),
                                                  threading.Event())  # fmt: skip
                self._trim()
                return GO, None
            self._blobs.move_to_end(blob_id)
            if st.state == "held":
                return GO, None
            if st.state == "trial":
                return WAIT, st.event
            if now >= st.due:  # storing, and this read is the period's probe
                st.due = now + st.period
                return GO, None
            return DIVERT, None

    def answered(self, blob_id: str, whole: bool) -> None:
        """A Range read of `blob_id` was answered 200 (`whole`: storing it) or 206."""
        now = time.monotonic()
        with self._lock:
            st = self._blobs.get(blob_id)
            if st is not None and st.event is not None:
                st.event.set()
            if not whole:
                if st is not None and st.state == "storing":
                    log.info("%s holds blob %s now: its reads go there again", self.name,
                             blob_id[:12])  # fmt: skip
                self._blobs[blob_id] = _BlobState("held")
            elif st is None or st.state != "storing":
                self._blobs[blob_id] = _BlobState("storing", due=now + BACKOFF_START)
                log.info("%s is storing blob %s: its reads go to the next path meanwhile",
                         self.name, blob_id[:12])  # fmt: skip
            else:  # a probe found it still storing: back off longer
                st.period = min(st.period * 2, max(self.interval, BACKOFF_START))
                st.due = now + st.period
            self._blobs.move_to_end(blob_id)
            self._trim()

    def release(self, blob_id: str) -> None:
        """The read admitted for `blob_id` is over: a trial it started that got no
        answer (an error before the status line) is forgotten, its waiters go on."""
        with self._lock:
            st = self._blobs.get(blob_id)
            if st is not None and st.state == "trial" and st.owner == threading.get_ident():
                del self._blobs[blob_id]
                if st.event is not None:
                    st.event.set()

    def _trim(self) -> None:
        while len(self._blobs) > _KNOWN_BLOBS:
            _, old = self._blobs.popitem(last=False)
            if old.event is not None:
                old.event.set()

    def succeeded(self) -> None:
        with self._lock:
            self.failures = 0

    def failed(self) -> None:
        with self._lock:
            self.failures += 1
            if not self.healthy or self.failures < self.failure_limit:
                return
            self.healthy = False
            note_path(self.name, healthy=False)
            log.warning("%s failed %d times: skipped until its health check passes",
                        self.name, self.failures)  # fmt: skip
            if self._checker is None or not self._checker.is_alive():
                self._checker = threading.Thread(
                    target=self._check_loop, name=f"health {self.name}", daemon=True
                )
                self._checker.start()

    def _check_loop(self) -> None:
        with httpx.Client(timeout=PING_TIMEOUT, follow_redirects=False, trust_env=False) as c:
            while True:  # until the URL answers again (a daemon thread: exits with us)
                time.sleep(self.interval)
                try:
                    status = c.get(self.ping_url).status_code
                except httpx.HTTPError as exc:
                    log.debug("%s: ping %s failed: %s", self.name, self.ping_url, exc)
                    continue
                good = status < 500 if self.kind == "mirror" else 200 <= status < 400
                if good:
                    with self._lock:
                        self.failures, self.healthy = 0, True
                    note_path(self.name, healthy=True)
                    log.info("%s recovered (ping answered %d)", self.name, status)
                    return


@dataclass
class Endpoint:
    """One mirror or proxy as one backend configuration reads it: a client, the
    reference to read through it, and the URL's shared `Health`."""

    kind: str  # "mirror" | "proxy"
    url: str
    settings: dict[str, Any]
    client: RegistryClient
    health: Health
    users: int = 0

    @property
    def name(self) -> str:
        return f"{self.kind} {self.url}"

    def ref_for(self, origin: ImageReference) -> ImageReference:
        if self.kind == "proxy":
            return origin
        return ImageReference(self.url.split("://", 1)[1], origin.repository)

    def ok(self) -> bool:
        return self.health.ok()

    def succeeded(self) -> None:
        self.health.succeeded()

    def failed(self) -> None:
        self.health.failed()


_ENDPOINTS: dict[str, Endpoint] = {}
_HEALTH: dict[str, Health] = {}
_ENDPOINTS_LOCK = threading.Lock()


def _make_client(kind: str, s: dict[str, Any], options: dict[str, Any],
                 health: Health) -> RegistryClient:  # fmt: skip
    if kind == "mirror":
        return RegistryClient(
            plain_http=s["host"].startswith("http://"),
            verify=options.get("verify", True),
            use_docker_config=s["auth_through"],
            docker_config=options.get("docker_config"),
            timeout=options.get("timeout", 30.0),
            retries=0,
            transport=RangeStreamTransport(httpx.HTTPTransport(), s["headers"], MAX_SKIP,
                                           health.answered),
            trust_env=False,
        )
    return RegistryClient(
        plain_http=True if s["use_http"] else options.get("plain_http", False),
        verify=options.get("verify", True),
        docker_config=options.get("docker_config"),
        timeout=options.get("timeout", 30.0),
        retries=0,
        transport=RangeStreamTransport(httpx.HTTPTransport(proxy=s["url"]), None, MAX_SKIP),
        trust_env=False,
    )


def _make_health(kind: str, name: str, s: dict[str, Any]) -> Health:
    if kind == "mirror":
        ping = s["ping_url"] or f"{s['host']}/v2"
        return Health(kind, name, int(s["failure_limit"]), float(s["health_check_interval"]),
                      ping)  # fmt: skip
    # Without a ping URL nothing could bring the proxy back: never skip it then.
    limit = 1 if s["ping_url"] else 1 << 30
    return Health(kind, name, limit, float(s["check_interval"]), s["ping_url"])


def acquire_endpoint(kind: str, settings: dict[str, Any], options: dict[str, Any]) -> Endpoint:
    """The process's shared endpoint for these settings and client options (one client);
    its health is shared by every endpoint of the same URL."""
    key = json.dumps([kind, settings, options], sort_keys=True, default=str)
    url = settings["host"] if kind == "mirror" else settings["url"]
    name = f"{kind} {url}"
    with _ENDPOINTS_LOCK:
        ep = _ENDPOINTS.get(key)
        if ep is None:
            health = _HEALTH.get(name)
            if health is None:
                health = _HEALTH[name] = _make_health(kind, name, settings)
                note_path(name, healthy=True)
            client = _make_client(kind, settings, options, health)
            ep = _ENDPOINTS[key] = Endpoint(kind, url, settings, client, health)
        ep.users += 1
        return ep


def release_endpoint(ep: Endpoint) -> None:
    with _ENDPOINTS_LOCK:
        ep.users -= 1
        if ep.users > 0:
            return
        for k, v in list(_ENDPOINTS.items()):
            if v is ep:
                del _ENDPOINTS[k]
    ep.client.close()  # its Health stays: the URL's record for the next backend


# -- routing -----------------------------------------------------------------------------


def parse_routes(spec: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The spec's mirrors and proxy, validated (the daemon may load an old state file)."""
    try:
        return normalize_mirrors(spec.get("mirrors") or []), normalize_proxy(spec.get("proxy"))
    except ValueError as exc:
        raise UsageError(f"registry backend spec: {exc}") from exc


T = TypeVar("T", bytes, int)  # what one read returns: the bytes, or how many it stored


def _size(data: bytes | int) -> int:
    return data if isinstance(data, int) else len(data)

_REMEMBER = 4096  # recent (blob, offset, length) -> path, for `reject`


class Router:
    """Sends one backend's reads along proxy -> mirrors -> origin (see the module doc)."""

    def __init__(self, mirrors: list[dict[str, Any]], proxy: dict[str, Any] | None,
                 options: dict[str, Any], *, origin: bool = True) -> None:  # fmt: skip
        """`origin=False`: never read from the origin (filling mirrors: `warm`)."""
        self.mirror_settings, self.proxy_settings, self._options = mirrors, proxy, options
        self.use_origin = origin
        self._endpoints: list[Endpoint] | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._served: OrderedDict[tuple[str, int, int], Endpoint | None] = OrderedDict()
        self._origin_only: set[tuple[str, int, int]] = set()

    def __bool__(self) -> bool:
        return bool(self.mirror_settings or self.proxy_settings)

    def endpoints(self) -> list[Endpoint]:
        with self._lock:
            if self._closed:
                return []
            if self._endpoints is None:
                eps = []
                if self.proxy_settings:
                    eps.append(acquire_endpoint("proxy", self.proxy_settings, self._options))
                for m in self.mirror_settings:
                    eps.append(acquire_endpoint("mirror", m, self._options))
                self._endpoints = eps
            return self._endpoints

    def read(self, key: tuple[str, int, int], origin: ImageReference, deadline: float,
             read: Callable[[RegistryClient, ImageReference, float], T],
             origin_client: Callable[[], RegistryClient], *, ranged: bool = True) -> T:  # fmt: skip
        """`read(client, ref, seconds)` along the paths; the origin gets what time is left.
        `read` returns the bytes, or how many bytes it stored itself (a streamed download).
        `ranged`: `read` is a Range read of blob ``key[0]`` (passed over mirrors that are
        storing that blob); False for whole-blob downloads."""
        end = time.monotonic() + deadline
        with self._lock:
            skip_others = key in self._origin_only
            self._origin_only.discard(key)
        errors: list[str] = []
        missed: list[Endpoint] = []
        if not skip_others:
            for ep in self.endpoints():
                if not ep.ok():
                    continue
                budget = (end - time.monotonic()) * MIRROR_SHARE
                gated = ranged and ep.kind == "mirror"
                if gated and not self._admitted(ep, key[0], budget):
                    note_path(ep.name, diverted=True)
                    missed.append(ep)
                    errors.append(f"{ep.name}: storing the blob, not served yet")
                    continue
                try:
                    data = read(ep.client, ep.ref_for(origin), budget)
                except BlobNotCachedError as exc:
                    note_path(ep.name, miss=True)
                    missed.append(ep)
                    log.debug("%s: %s", ep.name, exc)
                    if ep.kind == "proxy" and not ep.settings["fallback"]:
                        raise BackendError(f"{ep.name} (no fallback): {exc}") from exc
                    continue
                except (ErofsNydusError, httpx.HTTPError, OSError) as exc:
                    ep.failed()
                    note_path(ep.name, ok=False)
                    errors.append(f"{ep.name}: {exc}")
                    log.info("%s failed, trying the next path: %s", ep.name, exc)
                    if ep.kind == "proxy" and not ep.settings["fallback"]:
                        raise BackendError(f"{ep.name} (no fallback): {exc}") from exc
                    continue
                finally:
                    if gated:
                        ep.health.release(key[0])
                ep.succeeded()
                note_path(ep.name, ok=True, nbytes=_size(data))
                self._remember(key, ep)
                return data
        if not self.use_origin:
            raise BackendError(
                "no mirror or proxy served the range (origin reads are off): "
                + ("; ".join(errors) or "not cached there yet")
            )
        try:
            data = read(origin_client(), origin, max(end - time.monotonic(), 0.001))
        except Exception:
            note_path(ORIGIN, ok=False)
            for ep in missed:  # the origin is out of reach: stream the mirror's whole blob
                try:
                    _stream_all.on = True
                    data = read(ep.client, ep.ref_for(origin), max(end - time.monotonic(), 0.001))
                except (ErofsNydusError, httpx.HTTPError, OSError):
                    continue
                finally:
                    _stream_all.on = False
                note_path(ep.name, ok=True, nbytes=_size(data))
                self._remember(key, ep)
                return data
            raise
        note_path(ORIGIN, ok=True, nbytes=_size(data))
        self._remember(key, None)
        return data

    @staticmethod
    def _admitted(ep: Endpoint, blob_id: str, budget: float) -> bool:
        """Whether a Range read of `blob_id` goes to mirror `ep` now (see `Health.admit`);
        False: pass it over (it is storing the blob, or its first read's answer is not
        back within the wait)."""
        verdict, event = ep.health.admit(blob_id)
        if verdict == WAIT and event is not None:
            event.wait(max(min(budget, TRIAL_WAIT), 0.0))
            verdict, event = ep.health.admit(blob_id)
        return verdict == GO

    def _remember(self, key: tuple[str, int, int], ep: Endpoint | None) -> None:
        with self._lock:
            self._served[key] = ep
            self._served.move_to_end(key)
            while len(self._served) > _REMEMBER:
                self._served.popitem(last=False)

    def reject(self, key: tuple[str, int, int]) -> bool:
        """The bytes read for `key` were bad: blame who served them, next time the origin."""
        with self._lock:
            ep = self._served.pop(key, None)
            if ep is None:
                return False
            self._origin_only.add(key)
            while len(self._origin_only) > _REMEMBER:
                self._origin_only.pop()
        ep.failed()
        note_path(ep.name, ok=False)
        log.warning("%s served bytes that failed their digest; reading again from the origin",
                    ep.name)  # fmt: skip
        return True

    def close(self) -> None:
        with self._lock:
            eps, self._endpoints, self._closed = self._endpoints or [], None, True
        for ep in eps:
            release_endpoint(ep)
