"""Fault injection for RegistryClient: httpx.MockTransport (faults only) and a mute socket."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from erofs_nydus.errors import (
    AuthError,
    BackendError,
    DigestMismatchError,
    NotFoundError,
    RegistryError,
)
from erofs_nydus.registry import (
    Credentials,
    DeadlineExceededError,
    RegistryBackend,
    RegistryClient,
)
from erofs_nydus.registry.manifest import OCI_MANIFEST, sha256_digest

HOST = "reg.test"
DATA = bytes(range(256)) * 1000
DIGEST = sha256_digest(DATA)
BLOB_URL = f"/v2/app/blobs/{DIGEST}"
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()

Handler = Callable[[httpx.Request], httpx.Response]


def make_client(handler: Handler, **kwargs: object) -> RegistryClient:
    options: dict[str, object] = {
        "plain_http": True,
        "use_docker_config": False,
        "backoff": 0.001,
        "max_backoff": 0.01,
        "retries": 3,
        "transport": httpx.MockTransport(handler),
    }
    options.update(kwargs)
    return RegistryClient(**options)  # type: ignore[arg-type]


def ref(tail: str = "app") -> str:
    return f"{HOST}/{tail}"


class Script:
    """Answer requests from a list of responders, then with the last one forever."""

    def __init__(self, *responders: Handler) -> None:
        self.responders = list(responders)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        responder = self.responders.pop(0) if len(self.responders) > 1 else self.responders[0]
        return responder(request)


def status(code: int, **headers: str) -> Handler:
    return lambda request: httpx.Response(code, headers=headers, json={"errors": []})


def manifest_ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, headers={"Content-Type": OCI_MANIFEST}, content=MANIFEST)


def reset(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadError("[Errno 104] Connection reset by peer", request=request)


def blob_ok(request: httpx.Request) -> httpx.Response:
    rng = request.headers.get("Range")
    if rng:
        start, _, end = rng.removeprefix("bytes=").partition("-")
        stop = int(end) + 1 if end else len(DATA)
        return httpx.Response(
            206,
            headers={"Content-Range": f"bytes {start}-{stop - 1}/{len(DATA)}"},
            content=DATA[int(start) : stop],
        )
    return httpx.Response(200, content=DATA)


# -- retries ------------------------------------------------------------------------


def test_5xx_then_success() -> None:
    script = Script(status(500), status(502), status(503), manifest_ok)
    with make_client(script) as c:
        result = c.get_manifest(ref())
    assert result.data == MANIFEST
    assert len(script.requests) == 4


def test_persistent_5xx_gives_clear_error() -> None:
    script = Script(status(500))
    with make_client(script) as c, pytest.raises(RegistryError) as info:
        c.get_manifest(ref())
    message = str(info.value)
    assert "HTTP 500" in message
    assert f"http://{HOST}/v2/app/manifests/latest" in message
    assert "after 4 attempts" in message
    assert len(script.requests) == 4


def test_4xx_is_not_retried() -> None:
    script = Script(status(400))
    with make_client(script) as c, pytest.raises(RegistryError, match="HTTP 400"):
        c.get_manifest(ref())
    assert len(script.requests) == 1


def test_404_names_the_reference() -> None:
    script = Script(
        lambda r: httpx.Response(
            404, json={"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
        )
    )
    with make_client(script) as c, pytest.raises(NotFoundError) as info:
        c.get_manifest(ref("app:v9"))
    assert "reg.test/app:v9" in str(info.value) and "MANIFEST_UNKNOWN" in str(info.value)


def test_429_with_retry_after() -> None:
    script = Script(status(429, **{"Retry-After": "0"}), manifest_ok)
    with make_client(script) as c:
        assert c.get_manifest(ref()).data == MANIFEST
    assert len(script.requests) == 2


def test_connection_reset_then_success() -> None:
    script = Script(reset, reset, manifest_ok)
    with make_client(script) as c:
        assert c.get_manifest(ref()).data == MANIFEST
    assert len(script.requests) == 3


def test_connection_refused_persistently() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with make_client(Script(refuse)) as c, pytest.raises(RegistryError, match="ConnectError"):
        c.blob_exists(ref(), DIGEST)


def test_download_interrupted_resumes_with_range() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        def body() -> Iterator[bytes]:
            yield DATA[:100_000]
            raise httpx.ReadError("[Errno 104] Connection reset by peer", request=request)

        return httpx.Response(200, content=body())

    script = Script(broken, blob_ok)
    with make_client(script) as c:
        assert c.get_blob(ref(), DIGEST) == DATA
    assert script.requests[1].headers["Range"] == "bytes=100000-"


def test_download_resume_when_server_ignores_range() -> None:
    def broken(request: httpx.Request) -> httpx.Response:
        def body() -> Iterator[bytes]:
            yield DATA[:5000]
            raise httpx.RemoteProtocolError("peer closed connection", request=request)

        return httpx.Response(200, content=body())

    script = Script(broken, lambda r: httpx.Response(200, content=DATA))
    with make_client(script) as c:
        assert b"".join(c.open_blob_stream(ref(), DIGEST, chunk_size=7777)) == DATA


def test_upload_restarts_after_5xx_on_put() -> None:
    uploads: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return httpx.Response(404)
        if request.method == "POST":
            uploads.append("POST")
            return httpx.Response(
                202, headers={"Location": f"/v2/app/blobs/uploads/u{len(uploads)}"}
            )
        if request.method == "PUT":
            assert request.url.params["digest"] == DIGEST
            assert request.read() == DATA
            uploads.append(f"PUT {request.url.path}")
            return httpx.Response(500 if len(uploads) == 2 else 201)
        raise AssertionError(request)

    with make_client(handler) as c:
        assert c.push_blob(ref(), DATA) == DIGEST
    assert uploads == [
        "POST",
        "PUT /v2/app/blobs/uploads/u1",
        "POST",
        "PUT /v2/app/blobs/uploads/u3",
    ]


# -- digests ------------------------------------------------------------------------


def test_digest_mismatch_refused() -> None:
    tampered = bytearray(DATA)
    tampered[1234] ^= 1

    def evil(request: httpx.Request) -> httpx.Response:
        if "/manifests/" in request.url.path:
            return httpx.Response(200, headers={"Content-Type": OCI_MANIFEST}, content=MANIFEST)
        return httpx.Response(200, content=bytes(tampered))  # also ignores Range

    with make_client(evil) as c:
        with pytest.raises(DigestMismatchError, match=DIGEST):
            c.get_blob(ref(), DIGEST)
        with pytest.raises(DigestMismatchError):
            list(c.open_blob_stream(ref(), DIGEST))
        wrong = "sha256:" + "5" * 64
        with pytest.raises(DigestMismatchError):
            c.get_manifest(f"{ref()}@{wrong}")

    def lying_header(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            headers={"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": "sha256:" + "6" * 64},
            content=MANIFEST,
        )

    with make_client(lying_header) as c, pytest.raises(DigestMismatchError):
        c.get_manifest(ref())


def test_range_answered_with_whole_blob_is_sliced() -> None:
    script = Script(lambda r: httpx.Response(200, content=DATA))
    with make_client(script) as c:
        assert c.read_blob_range(ref(), DIGEST, 1000, 3000) == DATA[1000:4000]
    assert script.requests[0].headers["Range"] == "bytes=1000-3999"


class Endless:
    """A body of DATA repeated forever; counts the bytes the client pulled."""

    def __init__(self) -> None:
        self.pulled = 0

    def __iter__(self) -> Iterator[bytes]:
        while True:
            for i in range(0, len(DATA), 16384):
                piece = DATA[i : i + 16384]
                self.pulled += len(piece)
                yield piece


def test_range_answered_with_200_streams_only_the_window() -> None:
    """A server ignoring Range (200 + the whole blob, here endless) costs one window."""
    bodies: list[Endless] = []

    def whole(request: httpx.Request) -> httpx.Response:
        bodies.append(Endless())
        return httpx.Response(200, content=iter(bodies[-1]))

    with make_client(whole) as c:
        got = c.read_blob_range(ref(), DIGEST, 300_000, 5000, deadline=30)
    assert got == (DATA * 2)[300_000 - len(DATA) : 305_000 - len(DATA)]
    assert bodies[0].pulled <= 305_000 + 16384


def test_range_206_body_read_up_to_the_length() -> None:
    bodies: list[Endless] = []

    def too_long(request: httpx.Request) -> httpx.Response:
        bodies.append(Endless())
        return httpx.Response(
            206, headers={"Content-Range": f"bytes 0-9/{len(DATA)}"}, content=iter(bodies[-1])
        )

    with make_client(too_long) as c:
        assert c.read_blob_range(ref(), DIGEST, 0, 10, deadline=30) == DATA[:10]
    assert bodies[0].pulled <= 16384


def test_range_with_compressed_answer_is_refused() -> None:
    def gz(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=iter([b"x"]))

    with make_client(gz) as c, pytest.raises(RegistryError, match="Content-Encoding"):
        c.read_blob_range(ref(), DIGEST, 0, 10)


def test_range_206_with_wrong_range_is_refused() -> None:
    def wrong(request: httpx.Request) -> httpx.Response:
        return httpx.Response(206, headers={"Content-Range": "bytes 0-9/100"}, content=DATA[:10])

    with make_client(wrong) as c, pytest.raises(RegistryError, match="server sent range"):
        c.read_blob_range(ref(), DIGEST, 50, 10)


# -- deadlines ----------------------------------------------------------------------


def test_slow_stream_past_deadline() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        def body() -> Iterator[bytes]:
            for i in range(0, len(DATA), 1000):
                time.sleep(0.05)
                yield DATA[i : i + 1000]

        return httpx.Response(200, content=body())

    with make_client(slow) as c:
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError, match=r"deadline of 0\.5 s"):
            c.get_blob(ref(), DIGEST, deadline=0.5)
        assert time.monotonic() - start < 2.0
        backend = RegistryBackend(c, ref(), deadline=0.5)
        start = time.monotonic()
        with pytest.raises(BackendError):
            backend.read_range(DIGEST.removeprefix("sha256:"), 0, len(DATA))
        assert time.monotonic() - start < 2.0


def test_retries_stop_at_deadline() -> None:
    script = Script(status(503))
    with make_client(script, retries=1000, backoff=0.05, max_backoff=0.2) as c:
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            c.get_manifest(ref(), deadline=1.0)
        assert time.monotonic() - start < 1.5


@pytest.fixture
def mute_server() -> Iterator[str]:
    """A TCP port that accepts connections and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
                held.append(conn)
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


def test_silent_server_hits_deadline(mute_server: str) -> None:
    with RegistryClient(plain_http=True, use_docker_config=False, timeout=30.0) as c:
        start = time.monotonic()
        with pytest.raises(RegistryError):
            c.read_blob_range(f"{mute_server}/app", DIGEST, 0, 10, deadline=1.0)
        assert time.monotonic() - start < 3.0
        backend = RegistryBackend(c, f"{mute_server}/app", deadline=1.0)
        start = time.monotonic()
        with pytest.raises(BackendError):
            backend.read_range(DIGEST.removeprefix("sha256:"), 0, 10)
        assert time.monotonic() - start < 3.0


# -- auth and redirects -------------------------------------------------------------


def test_cross_host_redirect_drops_authorization() -> None:
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.headers.get("Authorization")))
        if request.url.host == "storage.test":
            return httpx.Response(200, content=DATA)
        if "Authorization" not in request.headers:
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})
        if request.url.path == BLOB_URL:
            return httpx.Response(307, headers={"Location": "/v2/app/redirected"})
        return httpx.Response(307, headers={"Location": "http://storage.test/bucket/blob?sig=x"})

    with make_client(handler, credentials=Credentials("u", "p")) as c:
        assert c.get_blob(ref(), DIGEST) == DATA
    basic = Credentials("u", "p").basic_header()
    assert seen == [
        (HOST, None),
        (HOST, basic),
        (HOST, basic),  # same-host redirect keeps it
        ("storage.test", None),  # another host never sees the credentials
    ]


def test_bearer_token_flow_and_refusal() -> None:
    token_requests: list[httpx.Request] = []
    accept = {"good-token"}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            token_requests.append(request)
            return httpx.Response(200, json={"access_token": "good-token", "expires_in": 300})
        auth = request.headers.get("Authorization", "")
        if auth.removeprefix("Bearer ") in accept:
            return manifest_ok(request)
        challenge = (
            'Bearer realm="http://reg.test/token",service="reg.test",scope="repository:app:pull"'
        )
        return httpx.Response(401, headers={"WWW-Authenticate": challenge})

    with make_client(handler, credentials=Credentials("u", "p")) as c:
        assert c.get_manifest(ref()).data == MANIFEST
        assert c.get_manifest(ref()).data == MANIFEST  # cached token, no new token request
    assert len(token_requests) == 1
    params = token_requests[0].url.params
    assert params["service"] == "reg.test"
    assert params.get_list("scope") == ["repository:app:pull"]
    assert token_requests[0].headers["Authorization"] == Credentials("u", "p").basic_header()

    accept.clear()  # the registry now refuses every token
    with make_client(handler) as c, pytest.raises(AuthError, match="refused"):
        c.get_manifest(ref())


def test_basic_auth_refused_is_auth_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="r"'})

    with (
        make_client(handler, credentials=Credentials("u", "bad")) as c,
        pytest.raises(AuthError, match="as 'u'"),
    ):
        c.get_manifest(ref())


def test_https_and_verification_by_default() -> None:
    with RegistryClient(use_docker_config=False) as c:
        assert c.scheme == "https"
        assert c._http._transport._pool._ssl_context.verify_mode.name == "CERT_REQUIRED"  # type: ignore[attr-defined]


def test_backend_contract() -> None:
    with make_client(blob_ok) as c:
        backend = RegistryBackend(c, ref())
        blob_id = DIGEST.removeprefix("sha256:")
        assert backend.read_range(blob_id, 4096, 8192) == DATA[4096 : 4096 + 8192]
        with pytest.raises(BackendError, match="invalid blob id"):
            backend.read_range("xyz", 0, 1)
        backend.close()
    assert hashlib.sha256(DATA).hexdigest() == blob_id


def test_plain_http_loopback_only() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url.copy_with(path="/")))
        return httpx.Response(404)

    transport = httpx.MockTransport(handler)
    with RegistryClient(plain_http="loopback", transport=transport, use_docker_config=False) as c:
        for host in ("127.0.0.1:5000", "localhost:5000", "[::1]:5000", "reg.test", "10.0.0.1:5000"):
            c.blob_exists(f"{host}/app", DIGEST)
    assert seen == [
        "http://127.0.0.1:5000/",
        "http://localhost:5000/",
        "http://[::1]:5000/",
        "https://reg.test/",
        "https://10.0.0.1:5000/",
    ]
