"""Registry mirrors and a caching proxy in front of the origin, with failover.

Real components only: the origin is the session's docker-registry; a mirror is another
docker-registry configured as a pull-through cache of it (``proxy: remoteurl:``); the
proxy is nginx caching blob Range reads (``proxy_cache`` + the slice module).  Faults
come from `FaultServer`, a small HTTP server on 127.0.0.1 in front of a mirror that can
cut an answer in the middle, stall it, or flip a byte of it; nginx with a dead upstream
answers 502 by itself.  Which path served what is read from the backend path counters
(`ctl metrics` in the daemon tests).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from daemon_support import daemon_metrics, daemon_status, fanotify_usable, run_cli
from fault_registry import FaultRegistry, endless, static
from layers_support import base_step, top_step, umoci_image, umoci_unpack, upper_step
from registry_fixture import RegistryServer, free_port, skopeo_copy

from erofs_nydus.config import load_config
from erofs_nydus.errors import BackendError
from erofs_nydus.mount import is_mountpoint, umount
from erofs_nydus.rafs.backend import path_counters
from erofs_nydus.registry import RegistryClient
from erofs_nydus.registry.backend import RegistryBackend
from erofs_nydus.registry.convert import ConvertOptions, convert_image
from erofs_nydus.registry.mirrors import RangeStreamTransport
from erofs_nydus.registry.resolve import extract_bootstrap, resolve_remote_image
from erofs_nydus.service.client import DaemonClient

pytestmark = [pytest.mark.registry]

REPO = "fleet/app"
BLOB_SIZE = 6 << 20


# -- components ----------------------------------------------------------------------------


def start_mirror(workdir: Path, origin: RegistryServer, port: int | None = None) -> RegistryServer:
    """A docker-registry as a pull-through cache of `origin`."""
    m = RegistryServer(workdir, extra_config={"proxy": {"remoteurl": origin.url}})
    return m.start(port)


class FaultServer:
    """HTTP server on 127.0.0.1 forwarding to `upstream`.  `mode` applies to blob GETs
    with a Range header: "pass", "cut" (half the body, then close), "slow" (sleep
    `delay` s before answering), "corrupt" (flip the first byte).  It counts, per blob
    digest, the GETs it answered and the body bytes it sent (`blob_gets`, `blob_bytes`):
    in front of an origin, what the origin paid for."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.delay = 30.0
        self.range_gets = 0
        self.blob_gets: dict[str, int] = {}  # GETs (ranged or not) per blob digest
        self.blob_bytes: dict[str, int] = {}  # body bytes sent per blob digest
        self.blob_ranged: dict[str, int] = {}  # of blob_gets, those with a Range header
        self.trickle = 0.0  # > 0: whole-blob GETs send 1 MiB, then sleep this long, ...
        self._count_lock = threading.Lock()
        self._client = httpx.Client(timeout=60)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def _count(self, counter: dict[str, int], dgst: str, n: int) -> None:
        with self._count_lock:
            counter[dgst] = counter.get(dgst, 0) + n

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fs = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except ConnectionError:  # the client hung up between requests
                    pass

            def send(self, data: bytes, dgst: str | None) -> None:
                self.wfile.write(data)
                self.wfile.flush()
                if dgst is not None:
                    fs._count(fs.blob_bytes, dgst, len(data))

            def do_GET(self) -> None:
                head = self.command == "HEAD"
                ranged = "/blobs/" in self.path and "Range" in self.headers and not head
                mode = fs.mode if ranged else "pass"
                dgst = None
                if "/blobs/" in self.path and not head:
                    dgst = self.path.rsplit("/", 1)[1].split(":")[-1]
                    fs._count(fs.blob_gets, dgst, 1)
                if ranged:
                    fs.range_gets += 1
                    fs._count(fs.blob_ranged, dgst or "", 1)
                if mode == "slow":
                    time.sleep(fs.delay)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                if fs.trickle and dgst is not None and not ranged:
                    self.trickle(headers, dgst)
                    return
                try:
                    with fs._client.stream(self.command, fs.upstream + self.path,
                                           headers=headers) as r:  # fmt: skip
                        body = r.read()
                except (httpx.HTTPError, RuntimeError):  # upstream gone, or closed
                    self.close_connection = True
                    return
                if mode == "corrupt" and body:  # the first byte of the asked range
                    at = 0
                    if r.status_code == 200:
                        at = int(self.headers["Range"].split("=")[1].split("-")[0])
                    body = body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                length = r.headers.get("Content-Length", "0") if head else str(len(body))
                self.send_header("Content-Length", length)
                self.end_headers()
                if head:  # headers only, or the connection's next answer is garbage
                    return
                try:
                    if mode == "cut":
                        self.send(body[: len(body) // 2], dgst)
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                    else:
                        self.send(body, dgst)
                except OSError:  # the reader went away
                    self.close_connection = True

            def trickle(self, headers: dict[str, str], dgst: str) -> None:
                """A whole-blob GET as over a slow link: 1 MiB, a pause, 1 MiB... read
                from upstream as it goes (a dropped answer costs upstream nothing more)."""
                try:
                    with fs._client.stream("GET", fs.upstream + self.path,
                                           headers=headers) as r:  # fmt: skip
                        self.send_response(r.status_code)
                        for k, v in r.headers.items():
                            if k.lower() not in ("transfer-encoding", "connection"):
                                self.send_header(k, v)
                        self.end_headers()
                        for piece in r.iter_bytes(1 << 20):
                            self.send(piece, dgst)
                            time.sleep(fs.trickle)
                except (httpx.HTTPError, RuntimeError, OSError):  # either side went away
                    self.close_connection = True

            do_HEAD = do_GET

        return Handler


NGINX_CONF = """
user root;
worker_processes 1;
daemon off;
error_log {d}/error.log;
pid {d}/nginx.pid;
events {{ worker_connections 64; }}
http {{
  access_log {d}/access.log;
  client_body_temp_path {d}/t1; proxy_temp_path {d}/t2; fastcgi_temp_path {d}/t3;
  uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;
  proxy_cache_path {d}/cache levels=1:2 keys_zone=blobs:4m max_size=1g inactive=1h
                   use_temp_path=off;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      slice 1m;
      proxy_cache blobs;
      proxy_cache_key $host$uri$slice_range;
      proxy_set_header Range $slice_range;
      proxy_http_version 1.1;
      proxy_cache_valid 200 206 1h;
      proxy_pass http://{upstream};
    }}
  }}
}}
"""


class Nginx:
    """nginx as a caching HTTP proxy that honours Range (slices of 1 MiB)."""

    def __init__(self, workdir: Path, upstream: str, port: int | None = None) -> None:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.access(nginx, os.X_OK):
            pytest.skip("nginx not installed (apt-get install nginx-light)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port() if port is None else port
        conf = workdir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(d=workdir, port=self.port, upstream=upstream))
        self.log = workdir / "error.log"
        self.process = subprocess.Popen(
            [nginx, "-c", str(conf), "-p", str(workdir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        end = time.monotonic() + 20
        while time.monotonic() < end:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.05)
        self.close()
        pytest.fail(f"nginx did not start: {self.log.read_text(errors='replace')}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blob(registry: RegistryServer) -> tuple[str, bytes]:
    data = os.urandom(BLOB_SIZE)
    with RegistryClient(plain_http=True, use_docker_config=False) as c:
        digest = c.push_blob(registry.ref(REPO), data)
    return digest.split(":", 1)[1], data


@pytest.fixture
def mirror(registry: RegistryServer, tmp_path: Path) -> Iterator[RegistryServer]:
    m = start_mirror(tmp_path / "mirror", registry)
    yield m
    m.stop()


@pytest.fixture
def counted_origin(registry: RegistryServer) -> Iterator[FaultServer]:
    """The origin behind a pass-through FaultServer that counts its blob Range GETs."""
    f = FaultServer(registry.url)
    yield f
    f.close()


def backend(origin: str, *, mirrors: list[Any] = (), proxy: Any = None,  # type: ignore[assignment]
            deadline: float = 20.0) -> RegistryBackend:  # fmt: skip
    spec: dict[str, Any] = {"type": "registry", "repo": f"{origin}/{REPO}", "plain_http": True,
                            "deadline": deadline, "retries": 1}  # fmt: skip
    if mirrors:
        spec["mirrors"] = list(mirrors)
    if proxy is not None:
        spec["proxy"] = proxy
    return RegistryBackend.from_spec(spec)


def counts(path: str) -> dict[str, int]:
    empty = {"reads": 0, "errors": 0, "misses": 0, "diverted": 0, "bytes": 0, "healthy": 1}
    return path_counters().get(path, empty)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- settings ------------------------------------------------------------------------------


def test_config_mirrors_and_proxy(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[[backend.mirrors]]\nhost = "http://127.0.0.1:5001/"\nfailure_limit = 3\n'
        'headers = { "X-Node" = "n1" }\n'
        '[[backend.mirrors]]\nhost = "https://m2.example"\n'
        '[backend.proxy]\nurl = "http://127.0.0.1:65001"\nfallback = false\n'
    )
    c = load_config(str(cfg))
    assert c.mirrors[0] == {"host": "http://127.0.0.1:5001", "headers": {"X-Node": "n1"},
                            "health_check_interval": 5, "failure_limit": 3, "ping_url": "",
                            "auth_through": False}  # fmt: skip
    assert c.mirrors[1]["failure_limit"] == 5 and c.proxy is not None
    assert c.proxy["fallback"] is False and c.proxy["check_interval"] == 5
    shown = run_cli("config", "show", "--config", str(cfg)).stdout
    again = tmp_path / "again.toml"
    again.write_text(shown)
    c2 = load_config(str(again))
    assert (c2.mirrors, c2.proxy) == (c.mirrors, c.proxy)
    flags = run_cli("config", "show", "--json", "--mirror", "http://127.0.0.1:1",
                    "--proxy", "http://127.0.0.1:2").stdout  # fmt: skip
    assert '"host": "http://127.0.0.1:1"' in flags and '"url": "http://127.0.0.1:2"' in flags
    for bad in ('[[backend.mirrors]]\nhost = "ftp://x"\n',
                '[[backend.mirrors]]\nhost = "http://a"\nfailure_limit = 0\n',
                '[backend.proxy]\nurl = "http://a"\nbogus = 1\n'):  # fmt: skip
        cfg.write_text(bad)
        proc = run_cli("config", "show", "--config", str(cfg), check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# -- a pull-through-cache mirror ------------------------------------------------------------


class _Counting(httpx.BaseTransport):
    """Records the upstream status and how many body bytes were pulled from it."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.statuses: list[int] = []
        self.pulled = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.inner.handle_request(request)
        self.statuses.append(r.status_code)
        outer = self
        inner_stream = r.stream
        assert isinstance(inner_stream, httpx.SyncByteStream)

        class Stream(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                for piece in inner_stream:
                    outer.pulled += len(piece)
                    yield piece

            def close(self) -> None:
                inner_stream.close()

        return httpx.Response(r.status_code, headers=r.headers, stream=Stream(),
                              extensions=r.extensions)  # fmt: skip


def test_pull_through_mirror_whole_blob_answer_is_streamed(
    blob: tuple[str, bytes], mirror: RegistryServer
) -> None:
    blob_id, data = blob
    counting = _Counting()
    url = f"{mirror.url}/v2/{REPO}/blobs/sha256:{blob_id}"
    off, n = 1000, 1000
    with httpx.Client(transport=RangeStreamTransport(counting)) as c:
        r = c.get(url, headers={"Range": f"bytes={off}-{off + n - 1}"})
    assert counting.statuses == [200]  # uncached: the mirror sends the whole blob
    assert r.status_code == 206 and r.content == data[off : off + n]
    assert r.headers["Content-Range"] == f"bytes {off}-{off + n - 1}/{BLOB_SIZE}"
    assert counting.pulled < BLOB_SIZE // 4  # stopped reading after the range
    wait_for(lambda: stored(mirror, blob_id), "the mirror to store the blob")
    be = backend("127.0.0.1:1", mirrors=[mirror.url])  # origin unreachable: mirror only
    try:
        for off, n in ((5 << 20, 4096), (0, 1 << 20), (BLOB_SIZE - 10, 10)):
            assert be.read_range(blob_id, off, n) == data[off : off + n]
    finally:
        be.close()
    assert counts(f"mirror {mirror.url}")["reads"] == 3


def layer_ids(ref: str) -> list[str]:
    """Blob ids of a Nydus image's layers (the last layer is the bootstrap)."""
    with RegistryClient(plain_http=True, use_docker_config=False) as c:
        manifest = c.get_manifest(ref)
    return [d["digest"].split(":", 1)[1] for d in json.loads(manifest.data)["layers"]]


def data_blobs(ref: str) -> list[str]:
    return layer_ids(ref)[:-1]


def stored(mirror: RegistryServer, blob_id: str) -> bool:
    return (mirror.storage / "docker/registry/v2/blobs/sha256" / blob_id[:2] / blob_id
            / "data").exists()  # fmt: skip


def prime(mirror: RegistryServer, blob_id: str) -> None:
    """Make the pull-through mirror fetch and store the blob."""
    with httpx.Client() as c:
        c.get(f"{mirror.url}/v2/{REPO}/blobs/sha256:{blob_id}", headers={"Range": "bytes=0-0"})
    wait_for(lambda: stored(mirror, blob_id), "the mirror to store the blob")


def test_cold_mirror_far_range_goes_to_the_origin_meanwhile(
    blob: tuple[str, bytes], registry: RegistryServer, mirror: RegistryServer
) -> None:
    """A range deep into a blob the mirror has not cached: not worth streaming the blob
    up to it; the origin answers and the mirror, storing the blob, serves later reads."""
    blob_id, data = blob
    name = f"mirror {mirror.url}"
    be = backend(registry.host, mirrors=[mirror.url])
    origin_before = counts("origin")["reads"]
    off, n = 5 << 20, 65536
    try:
        assert be.read_range(blob_id, off, n) == data[off : off + n]
        assert counts(name)["misses"] == 1 and counts(name)["errors"] == 0
        assert counts(name)["healthy"] == 1
        assert counts("origin")["reads"] == origin_before + 1
        wait_for(lambda: stored(mirror, blob_id), "the mirror to store the blob")
        # passed over (to the origin) until its back-off's probe finds the blob stored
        wait_for(lambda: be.read_range(blob_id, off, n) == data[off : off + n]
                 and counts(name)["reads"] == 1, "the mirror to serve the range")  # fmt: skip
        c = counts(name)
        assert counts("origin")["reads"] == origin_before + 1 + c["diverted"]
        assert c["misses"] == 1 and c["errors"] == 0 and c["healthy"] == 1
    finally:
        be.close()


def test_cold_mirror_is_passed_over_while_it_stores_the_blob(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """While a pull-through mirror stores a blob, it answers each read of it with a
    fresh copy from the origin.  32 concurrent reads of different ranges of a cold blob
    all went to the mirror and cost the origin 33 whole-blob GETs, 2.8 copies of the
    blob.  Now the first read's 200 sends the blob's reads to the origin (ranged: only
    the range) for a back-off, not a failure; one read a period probes the mirror, and
    once it holds the blob (206) reads go there again: 2 GETs, 1.1 copies."""
    size = 32 << 20
    data = os.urandom(size)
    with RegistryClient(plain_http=True, use_docker_config=False) as c:
        blob_id = c.push_blob(registry.ref(REPO), data).split(":", 1)[1]
    counted = FaultServer(registry.url)  # the origin, counting what it sends
    counted.trickle = 0.125  # the mirror stores the blob over about 4 s
    mirror = RegistryServer(tmp_path / "mirror", extra_config={
        "proxy": {"remoteurl": counted.url}}).start()  # fmt: skip
    name = f"mirror {mirror.url}"
    be = backend(f"127.0.0.1:{counted.port}",
                 mirrors=[{"host": mirror.url, "health_check_interval": 2}])  # fmt: skip
    ranges = [(i * (size // 32) + i * 4096, 65536) for i in range(32)]
    try:
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda r: be.read_range(blob_id, *r), ranges))
        assert got == [data[o : o + n] for o, n in ranges]
        whole = counted.blob_gets[blob_id] - counted.blob_ranged.get(blob_id, 0)
        c = counts(name)
        # the store, the first read's stream, a probe or two (2 here; before: 33)
        assert whole <= 4, (whole, c)
        assert c["diverted"] >= 16 and c["errors"] == 0 and c["healthy"] == 1, c
        wait_for(lambda: stored(mirror, blob_id), "the mirror to store the blob")
        sent = counted.blob_bytes[blob_id]  # the store + what streamed before hang-ups
        assert sent <= 1.25 * size, (whole, sent / size)  # 1.1 copies; before: 2.8
        off, n = ranges[5]
        wait_for(lambda: be.read_range(blob_id, off, n) == data[off : off + n]
                 and counts(name)["reads"] > c["reads"], "a probe to find the blob stored")
        gets = counted.blob_gets[blob_id]
        with ThreadPoolExecutor(8) as pool:  # held by the mirror now: all read there
            got = list(pool.map(lambda r: be.read_range(blob_id, *r), ranges))
        assert got == [data[o : o + n] for o, n in ranges]
        assert counted.blob_gets[blob_id] == gets  # none reached the origin
        assert counts(name)["errors"] == 0
    finally:
        be.close()
        mirror.stop()
        counted.close()


def test_cold_mirror_streams_the_whole_blob_when_the_origin_is_out_of_reach(
    blob: tuple[str, bytes], mirror: RegistryServer
) -> None:
    blob_id, data = blob
    name = f"mirror {mirror.url}"
    be = backend("127.0.0.1:1", mirrors=[mirror.url])  # the node reaches only its mirror
    off, n = BLOB_SIZE - 70_000, 65536
    try:
        assert be.read_range(blob_id, off, n) == data[off : off + n]
        assert counts(name)["misses"] == 1 and counts(name)["reads"] == 1
    finally:
        be.close()


def test_mirror_down_skipped_after_failure_limit_then_recovers(
    blob: tuple[str, bytes], registry: RegistryServer, tmp_path: Path
) -> None:
    blob_id, data = blob
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    name = f"mirror {url}"
    spec = {"host": url, "failure_limit": 2, "health_check_interval": 0.2}
    be = backend(registry.host, mirrors=[spec])
    origin_before = counts("origin")["reads"]
    try:
        for i in range(4):
            assert be.read_range(blob_id, i * 4096, 4096) == data[i * 4096 : (i + 1) * 4096]
        assert counts(name)["errors"] == 2 and counts(name)["healthy"] == 0
        assert counts("origin")["reads"] == origin_before + 4
        m = start_mirror(tmp_path / "late-mirror", registry, port)
        try:
            wait_for(lambda: counts(name)["healthy"] == 1, "the mirror's health check")
            assert be.read_range(blob_id, 0, 100) == data[:100]
            assert counts(name)["reads"] == 1
        finally:
            m.stop()
    finally:
        be.close()


@pytest.mark.parametrize("mode", ["cut", "slow", "corrupt"])
def test_faulty_mirror_costs_time_never_bytes(
    mode: str, blob: tuple[str, bytes], registry: RegistryServer, mirror: RegistryServer
) -> None:
    blob_id, data = blob
    prime(mirror, blob_id)
    fault = FaultServer(mirror.url)
    fault.mode, fault.delay = mode, 10
    be = backend(registry.host, mirrors=[fault.url], deadline=6)
    name = f"mirror {fault.url}"
    off, n = BLOB_SIZE - 400_000, 300_000
    try:
        got = be.read_range(blob_id, off, n)
        if mode == "corrupt":  # only the daemon core can tell (chunk digests): it rejects
            assert got != data[off : off + n] and counts(name)["reads"] == 1
            assert be.reject(blob_id, off, n)
            got = be.read_range(blob_id, off, n)
            assert not be.reject(blob_id, off, n)  # the origin's bytes: nothing to retry
        assert got == data[off : off + n]
        assert counts(name)["errors"] == 1
    finally:
        be.close()
        fault.close()


# -- nginx as a caching proxy ---------------------------------------------------------------


def test_nginx_caching_proxy_serves_a_second_node_from_its_cache(
    blob: tuple[str, bytes], counted_origin: FaultServer, tmp_path: Path
) -> None:
    blob_id, data = blob
    ng = Nginx(tmp_path / "nginx", f"127.0.0.1:{counted_origin.port}")
    try:
        nodes = [backend(f"127.0.0.1:{counted_origin.port}", proxy={"url": ng.url})
                 for _ in range(2)]  # fmt: skip
        ranges = [(100, 5000), (3 << 20, 1 << 20), (BLOB_SIZE - 5000, 5000)]
        for off, n in ranges:
            assert nodes[0].read_range(blob_id, off, n) == data[off : off + n]
        first = counted_origin.range_gets
        assert 0 < first <= 5  # whole 1 MiB slices, fetched once
        for off, n in ranges:
            assert nodes[1].read_range(blob_id, off, n) == data[off : off + n]
        assert counted_origin.range_gets == first  # all from nginx's cache
        assert counts(f"proxy {ng.url}")["reads"] == 6
        for be in nodes:
            be.close()
    finally:
        ng.close()


def test_proxy_502_falls_back_to_the_origin_unless_told_not_to(
    blob: tuple[str, bytes], registry: RegistryServer, tmp_path: Path
) -> None:
    blob_id, data = blob
    ng = Nginx(tmp_path / "nginx", f"127.0.0.1:{free_port()}")  # nobody there: 502
    try:
        with httpx.Client() as c:
            assert c.get(ng.url + "/v2/").status_code == 502
        origin_before = counts("origin")["reads"]
        be = backend(registry.host, proxy={"url": ng.url})
        try:
            assert be.read_range(blob_id, 7, 70_000) == data[7:70_007]
        finally:
            be.close()
        assert counts(f"proxy {ng.url}")["errors"] >= 1
        assert counts("origin")["reads"] == origin_before + 1
        strict = backend(registry.host, proxy={"url": ng.url, "fallback": False})
        try:
            with pytest.raises(BackendError, match="no fallback"):
                strict.read_range(blob_id, 7, 70)
        finally:
            strict.close()
    finally:
        ng.close()


# -- through the daemon and the kernel -------------------------------------------------------

needs_fanotify = pytest.mark.skipif(
    not fanotify_usable(), reason="needs root and pre-content fanotify (Linux >= 6.14)"
)


@pytest.fixture(scope="module")
def source_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return umoci_image(tmp_path_factory.mktemp("src"), [base_step, upper_step, top_step])


@pytest.fixture(scope="module")
def expected_tree(source_layout: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return umoci_unpack(source_layout, tmp_path_factory.mktemp("unpacked") / "bundle")


@pytest.fixture(scope="module")
def nydus_ref(source_layout: Path, registry: RegistryServer,
              tmp_path_factory: pytest.TempPathFactory) -> str:  # fmt: skip
    src = registry.ref("fleet/src:v1")
    skopeo_copy(f"oci:{source_layout}:latest", f"docker://{src}", fmt="v2s2")
    target = registry.ref("fleet/nydus:v1")
    convert_image(src, target, ConvertOptions(
        cache_dir=str(tmp_path_factory.mktemp("conv")), client_options={"plain_http": True}))
    return target


class Node:
    """One mount of an image by reference, with its own cache dir and daemon."""

    def __init__(self, base: Path, ref: str, config: str, *extra: str) -> None:
        self.mp, self.cache = base / "mnt", base / "cache"
        self.mp.mkdir(parents=True)
        cfg = base / "config.toml"
        cfg.write_text(config)
        run_cli("mount", ref, str(self.mp), "--cache-dir", str(self.cache), "--config",
                str(cfg), "--amplify", "0", "--no-prefetch", *extra)  # fmt: skip

    def metric(self, family: str, **labels: str) -> float:
        key = family + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
        return daemon_metrics(self.cache).get(key, 0.0)

    def umount(self) -> None:
        run_cli("umount", str(self.mp), "--cache-dir", str(self.cache), check=False)
        client = DaemonClient(self.cache)
        wait_for(lambda: not client.supervisor_running(), "the daemon to stop")


FILES = ("etc/keep", "big", "hl/one", "opaque/new")


@needs_fanotify
@pytest.mark.kernel
def test_mount_reads_through_a_pull_through_mirror(
    nydus_ref: str, registry: RegistryServer, mirror: RegistryServer, expected_tree: Path,
    tmp_path: Path,
) -> None:
    node = Node(tmp_path, nydus_ref, f'[[backend.mirrors]]\nhost = "{mirror.url}"\n')
    try:
        for rel in FILES:
            assert (node.mp / rel).read_bytes() == (expected_tree / rel).read_bytes(), rel
        def reads(path: str, result: str) -> float:
            return node.metric("erofs_nydus_backend_path_reads_total", path=path, result=result)

        m = f"mirror {mirror.url}"
        assert reads(m, "ok") >= 2 and reads(m, "error") == 0
        boot_layer = layer_ids(nydus_ref)[-1]
        assert f"blobs/sha256:{boot_layer}" in mirror.log()  # the bootstrap came this way
        # the origin only read what the mirror did not hold yet (ranges far into a blob,
        # reads passed over it while it stored the blob)
        assert reads("origin", "ok") == reads(m, "miss") + reads(m, "diverted")
        status = daemon_status(node.cache)
        assert status["images"][0]["backend"]["mirrors"][0]["host"] == mirror.url
        assert status["metrics"]["digest_failures"] == 0
    finally:
        node.umount()


@needs_fanotify
@pytest.mark.kernel
@pytest.mark.parametrize("fault", ["down", "cut", "corrupt", "slow", "proxy502"])
def test_mount_survives_a_failing_mirror_or_proxy(
    fault: str, nydus_ref: str, registry: RegistryServer, mirror: RegistryServer,
    expected_tree: Path, tmp_path: Path,
) -> None:
    """Every fault: correct bytes (from the origin), counted on the failing path."""
    fs: FaultServer | None = None
    ng: Nginx | None = None
    if fault == "down":
        url = f"http://127.0.0.1:{free_port()}"
        config = f'[[backend.mirrors]]\nhost = "{url}"\nfailure_limit = 2\n'
    elif fault == "proxy502":
        ng = Nginx(tmp_path / "nginx", f"127.0.0.1:{free_port()}")
        url = ng.url
        config = f'[backend.proxy]\nurl = "{url}"\n'
    else:  # the mirror holds the blobs: the faults hit its 206 answers
        run_cli("warm", nydus_ref, "--mirrors-only", "--mirror", mirror.url)
        for d in data_blobs(nydus_ref):
            wait_for(lambda d=d: stored(mirror, d), "the mirror to store the blobs")
        fs = FaultServer(mirror.url)
        fs.mode, fs.delay = fault, 20
        url = fs.url
        config = f'[[backend.mirrors]]\nhost = "{url}"\n'
    path = f"{'proxy' if ng else 'mirror'} {url}"
    extra = ("--read-deadline", "8") if fault == "slow" else ()
    node = Node(tmp_path / "node", nydus_ref, config, *extra)
    try:
        for rel in FILES:
            assert (node.mp / rel).read_bytes() == (expected_tree / rel).read_bytes(), rel
        errors = node.metric("erofs_nydus_backend_path_reads_total", path=path, result="error")
        assert errors >= 1
        assert node.metric("erofs_nydus_backend_path_reads_total", path="origin",
                           result="ok") >= 1  # fmt: skip
        st = daemon_status(node.cache)
        assert st["fanotify"]["denied"] == 0
        if fault == "corrupt":
            assert st["metrics"]["digest_failures"] >= 1
        if fault == "down":  # skipped after failure_limit errors
            assert errors == 2
            assert node.metric("erofs_nydus_backend_path_healthy", path=path) == 0
    finally:
        node.umount()
        if fs is not None:
            fs.close()
        if ng is not None:
            ng.close()



@pytest.mark.parametrize("answer", ["endless", "oversize", "corrupt"])
def test_bootstrap_layer_from_a_bad_mirror_is_bounded_then_read_from_the_origin(
    answer: str, nydus_ref: str, tmp_path: Path
) -> None:
    """A mirror is as untrusted as the origin: its bootstrap layer has the same bounds
    (the descriptor's size) and digest check; failing them costs one origin download."""
    boot = "sha256:" + layer_ids(nydus_ref)[-1]
    with RegistryClient(plain_http=True, use_docker_config=False) as c:
        layer = c.get_blob(nydus_ref, boot, max_size=64 << 20)
    bad = FaultRegistry()
    path = f"/v2/fleet/nydus/blobs/{boot}"
    bad.route(path, {"endless": endless(),
                     "oversize": static(200, layer + bytes(4096)),
                     "corrupt": static(200, bytes([layer[0] ^ 1]) + layer[1:])}[answer])
    name = f"mirror http://{bad.host}"
    errors, origin = counts(name)["errors"], counts("origin")["reads"]
    cache = tmp_path / "cache"
    try:
        remote = resolve_remote_image(nydus_ref, str(cache),
                                      mirrors=[{"host": f"http://{bad.host}"}])  # fmt: skip
    finally:
        bad.close()
    assert [s.path for s in bad.requests if "/blobs/" in s.path] == [path]
    assert counts(name)["errors"] == errors + 1 and counts(name)["bytes"] == 0
    assert counts("origin")["reads"] == origin + 1
    assert remote.bootstrap_fetched == len(layer)
    assert Path(remote.bootstrap).read_bytes() == extract_bootstrap(layer)
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [Path(remote.bootstrap).name, "bootstrap-layers"])  # no partial download left


@needs_fanotify
@pytest.mark.kernel
def test_nydusd_config_mirrors_serve_a_nydusd_mount(
    nydus_ref: str, mirror: RegistryServer, expected_tree: Path, tmp_path: Path
) -> None:
    """nydus-snapshotter's nydusd config with backend.config.mirrors: our `nydusd`
    hands them to the cache dir's daemon, whose reads then go through the mirror."""
    boot = resolve_remote_image(nydus_ref, str(tmp_path / "boot")).bootstrap
    host, rest = nydus_ref.split("/", 1)
    cache, mnt, sock = tmp_path / "cache", tmp_path / "mnt", tmp_path / "api.sock"
    mnt.mkdir()
    config = tmp_path / "nydusd.json"
    config.write_text(json.dumps({"device": {
        "backend": {"type": "registry", "config": {
            "host": host, "repo": rest.rsplit(":", 1)[0], "scheme": "http", "timeout": 5,
            "retry_limit": 1, "mirrors": [{"host": mirror.url, "health_check_interval": 0,
                                           "headers": {"X-Fleet": "n1"}}]}},
        "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}}}}))
    with open(tmp_path / "nydusd.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "erofs_nydus.service.nydusd", "fuse",
                                 "--config", str(config), "--bootstrap", boot, "--mountpoint",
                                 str(mnt), "--apisock", str(sock)], stdout=log, stderr=log)
    try:
        wait_for(lambda: is_mountpoint(mnt) or proc.poll() is not None, "nydusd to mount", 60)
        assert proc.poll() is None, (tmp_path / "nydusd.log").read_text()
        for rel in FILES:
            assert (mnt / rel).read_bytes() == (expected_tree / rel).read_bytes(), rel
        key = f"erofs_nydus_backend_path_reads_total{{path=mirror {mirror.url},result=ok}}"
        assert daemon_metrics(cache).get(key, 0.0) >= 1
        (image,) = daemon_status(cache)["images"]
        assert image["backend"]["mirrors"][0]["headers"] == {"X-Fleet": "n1"}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        if is_mountpoint(mnt):
            umount(str(mnt), lazy=True)
        client = DaemonClient(cache)
        wait_for(lambda: not client.supervisor_running(), "the daemon to stop")


# -- pre-warming ---------------------------------------------------------------------------


@needs_fanotify
@pytest.mark.kernel
def test_warm_fills_the_cache_dir_a_mount_then_uses(
    nydus_ref: str, counted_origin: FaultServer, expected_tree: Path, tmp_path: Path
) -> None:
    ref = f"127.0.0.1:{counted_origin.port}" + nydus_ref[nydus_ref.index("/"):]
    cache = tmp_path / "cache"
    out = run_cli("warm", ref, "--cache-dir", str(cache), "--all").stdout
    assert "all chunks" in out and "origin:" in out
    assert counted_origin.range_gets > 0
    again = run_cli("warm", ref, "--cache-dir", str(cache), "--all").stdout
    assert " 0 bytes fetched" in again  # everything present already
    counted_origin.range_gets = 0
    mp = tmp_path / "mnt"
    mp.mkdir()
    run_cli("mount", ref, str(mp), "--cache-dir", str(cache))
    try:
        for rel in FILES:
            assert (mp / rel).read_bytes() == (expected_tree / rel).read_bytes(), rel
        assert counted_origin.range_gets == 0  # all from the warmed cache
    finally:
        run_cli("umount", str(mp), "--cache-dir", str(cache), check=False)
        client = DaemonClient(cache)
        wait_for(lambda: not client.supervisor_running(), "the daemon to stop")


def test_warm_mirrors_only_fills_a_pull_through_mirror(
    nydus_ref: str, registry: RegistryServer, mirror: RegistryServer, tmp_path: Path
) -> None:
    out = run_cli("warm", nydus_ref, "--mirrors-only", "--mirror", mirror.url).stdout
    assert f"mirror {mirror.url}:" in out and "mirrors / proxy" in out
    assert "origin:" not in out  # filling the mirror never reads from the origin
    blobs = data_blobs(nydus_ref)
    assert blobs
    wait_for(lambda: all(stored(mirror, d) for d in blobs), "the mirror to store the blobs")
    proc = run_cli("warm", nydus_ref, "--mirrors-only", check=False)
    assert proc.returncode != 0 and "needs a mirror" in proc.stderr


def test_warm_mirrors_only_costs_the_origin_one_copy_of_a_blob(
    registry: RegistryServer, tmp_path: Path
) -> None:
    """A cold pull-through mirror answers every read of a blob it is still storing with
    a fresh fetch from the origin (dropped by us, paid for by the origin).  `warm
    --mirrors-only` reading all of a blob's 24 ranges at once, and again each retry
    round, made the origin send about 94 GETs and 4 copies of the blob.  Now one read
    starts the store and one probe a round waits for it: the origin sees the store,
    the first read's stream and one GET a round while the store (about 5 s) runs."""

    def big(r: Path) -> None:
        (r / "big.bin").write_bytes(os.urandom(48 << 20))  # incompressible: 24 units

    layout = umoci_image(tmp_path / "img", [big])
    src = registry.ref("fleet/big-src:v1")
    skopeo_copy(f"oci:{layout}:latest", f"docker://{src}", fmt="v2s2")
    ref = registry.ref("fleet/big-nydus:v1")
    convert_image(src, ref, ConvertOptions(cache_dir=str(tmp_path / "conv"),
                                           client_options={"plain_http": True}))  # fmt: skip
    [blob_id] = data_blobs(ref)
    counted = FaultServer(registry.url)  # the mirror's origin, counting what it sends
    counted.trickle = 0.1  # the mirror stores the blob over about 5 s, as over a real link
    mirror = RegistryServer(tmp_path / "mirror", extra_config={
        "proxy": {"remoteurl": counted.url}}).start()  # fmt: skip
    try:
        out = run_cli("warm", ref, "--all", "--mirrors-only", "--mirror", mirror.url).stdout
        assert "origin:" not in out and " 0 errors" in out, out
        wait_for(lambda: stored(mirror, blob_id), "the mirror to store the blob")
        size = (mirror.storage / "docker/registry/v2/blobs/sha256" / blob_id[:2] / blob_id
                / "data").stat().st_size  # fmt: skip
        gets, sent = counted.blob_gets[blob_id], counted.blob_bytes[blob_id]
        # 2 (store + first read) + a probe a second while storing; before: 94, 4.1 copies
        assert gets <= 15, (gets, sent / size)
        assert sent <= 1.5 * size, (gets, sent / size)  # 1.25 copies here
    finally:
        mirror.stop()
        counted.close()


def test_closed_backend_reads_nothing_through_its_mirrors(
    blob: tuple[str, bytes], registry: RegistryServer, mirror: RegistryServer
) -> None:
    blob_id, _ = blob
    fault = FaultServer(mirror.url)
    try:
        be = backend(registry.host, mirrors=[fault.url])
        be.close()
        with pytest.raises(BackendError, match="closed"):
            be.read_range(blob_id, 0, 10)
        assert fault.range_gets == 0
    finally:
        fault.close()


def test_proxy_with_ping_url_is_skipped_until_it_answers_again(
    blob: tuple[str, bytes], registry: RegistryServer, tmp_path: Path
) -> None:
    blob_id, data = blob
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    name = f"proxy {url}"
    be = backend(registry.host, proxy={"url": url, "ping_url": f"{url}/v2/",
                                       "check_interval": 0.2})  # fmt: skip
    try:
        for i in range(3):
            assert be.read_range(blob_id, i, 1000) == data[i : i + 1000]
        assert counts(name)["errors"] == 1 and counts(name)["healthy"] == 0  # then skipped
        ng = Nginx(tmp_path / "nginx", registry.host, port)
        try:
            wait_for(lambda: counts(name)["healthy"] == 1, "the proxy's health check")
            assert be.read_range(blob_id, 5, 1000) == data[5:1005]
            assert counts(name)["reads"] == 1
        finally:
            ng.close()
    finally:
        be.close()
