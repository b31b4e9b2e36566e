"""`erofs-nydus mount REF`: lazy mounts straight from a real docker-registry.

A real three-layer OCI image (umoci) is pushed with skopeo, converted, then mounted by
reference in fanotify mode: only the bootstrap layer is fetched at mount time, chunks
come with Range requests on first read.  Faults are injected by `FaultProxy`, a small
HTTP proxy on 127.0.0.1 in front of the registry that counts requests and can delay,
drop, corrupt or refuse blob range reads.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import treeutil
from daemon_support import CLI, daemon_status, fanotify_usable, run_cli
from layers_support import base_step, top_step, umoci_image, umoci_unpack, upper_step
from registry_fixture import HTPASSWD_USER, RegistryServer, skopeo_copy

from erofs_nydus.errors import BackendError, UsageError
from erofs_nydus.mount import is_mountpoint
from erofs_nydus.registry import RegistryClient
from erofs_nydus.registry.backend import RegistryBackend
from erofs_nydus.registry.convert import ConvertOptions, convert_image
from erofs_nydus.registry.manifest import manifest_blobs
from erofs_nydus.registry.resolve import NOT_NYDUS, looks_like_reference, resolve_remote_image
from erofs_nydus.service.client import DaemonClient

pytestmark = [pytest.mark.registry, pytest.mark.kernel]

needs_fanotify = pytest.mark.skipif(
    not fanotify_usable(), reason="needs root and pre-content fanotify (Linux >= 6.14)"
)


# -- a fault-injecting proxy ------------------------------------------------------------


@dataclass
class FaultProxy:
    """HTTP proxy on 127.0.0.1 to `upstream`.  `mode` applies to blob GETs with a Range
    header (on-demand reads; manifests and the bootstrap layer pass untouched):
    "pass", "delay" (sleep `delay` s first), "drop" (close without answering),
    "corrupt" (flip a byte of the body), "500"."""

    upstream: str
    mode: str = "pass"
    delay: float = 5.0
    delay_match: str = ""  # "delay": only requests whose path contains this
    range_requests: int = 0
    range_bytes: int = 0
    requests: list[str] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _client: httpx.Client | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._client = self._client or httpx.Client(timeout=60, follow_redirects=False)
        server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        server.daemon_threads = True
        server.allow_reuse_address = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Close the listening socket (connections are refused until `start`)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def close(self) -> None:
        self.stop()
        if self._client is not None:
            self._client.close()

    def reset(self) -> None:
        self.mode, self.range_requests, self.range_bytes = "pass", 0, 0
        self.requests.clear()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                assert proxy._client is not None
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                ranged = "/blobs/" in self.path and "Range" in self.headers
                proxy.requests.append(f"{self.command} {self.path}")
                if ranged and self.command == "GET":
                    proxy.range_requests += 1
                    if proxy.mode == "delay" and proxy.delay_match in self.path:
                        time.sleep(proxy.delay)
                    elif proxy.mode == "drop":
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return
                    elif proxy.mode == "500":
                        self._reply(500, {"Content-Type": "text/plain"}, b"injected\n")
                        return
                try:
                    r = proxy._client.request(
                        self.command, f"http://{proxy.upstream}{self.path}", headers=headers,
                        content=body,
                    )
                except (httpx.HTTPError, RuntimeError):  # upstream gone, or proxy closed
                    self.close_connection = True
                    return
                data = r.content
                if ranged and self.command == "GET":
                    proxy.range_bytes += len(data)
                    if proxy.mode == "corrupt" and data:
                        data = bytes([data[0] ^ 0xFF]) + data[1:]
                out = {k: v for k, v in r.headers.items()
                       if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                            "content-encoding")}
                self._reply(r.status_code, out, b"" if self.command == "HEAD" else data,
                            int(r.headers.get("Content-Length", len(data))))

            def _reply(self, status: int, headers: dict[str, str], data: bytes,
                       length: int | None = None) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data) if length is None else length))
                self.end_headers()
                if data:
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _forward

        return Handler


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return umoci_image(tmp_path_factory.mktemp("src"), [base_step, upper_step, top_step])


@pytest.fixture(scope="module")
def expected_tree(source_layout: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return umoci_unpack(source_layout, tmp_path_factory.mktemp("unpacked") / "bundle")


@pytest.fixture(scope="module")
def nydus_ref(source_layout: Path, registry: RegistryServer,
              tmp_path_factory: pytest.TempPathFactory) -> str:
    src = registry.ref("rm/src:v1")
    skopeo_copy(f"oci:{source_layout}:latest", f"docker://{src}", fmt="v2s2")
    target = registry.ref("rm/nydus:v1")
    convert_image(src, target, ConvertOptions(
        cache_dir=str(tmp_path_factory.mktemp("conv")), client_options={"plain_http": True}))
    return target


@pytest.fixture
def proxy(registry: RegistryServer) -> Iterator[FaultProxy]:
    p = FaultProxy(registry.host).start()
    yield p
    p.close()


class RefMounts:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.active: list[tuple[Path, Path]] = []

    def mount(self, ref: str, name: str, *extra: str, env: dict[str, str] | None = None,
              check: bool = True) -> Path:
        mp = self.base / name
        mp.mkdir(parents=True, exist_ok=True)
        cache = self.base / f"cache-{name}"
        proc = _cli(["mount", ref, str(mp), "--cache-dir", str(cache), *extra], env)
        if check:
            assert proc.returncode == 0, proc.stderr
            assert is_mountpoint(mp)
            self.active.append((mp, cache))
        self.last = proc
        return mp

    def cache(self, mp: Path) -> Path:
        return next(c for m, c in self.active if m == mp)

    def close(self) -> None:
        for mp, cache in self.active:
            run_cli("umount", str(mp), "--cache-dir", str(cache), check=False)
            client = DaemonClient(cache)
            end = time.monotonic() + 20
            while client.supervisor_running() and time.monotonic() < end:
                time.sleep(0.1)
            assert not client.supervisor_running(), f"daemon for {cache} still running"


def _cli(args: list[str], env: dict[str, str] | None = None) -> Any:
    import subprocess

    from daemon_support import CLI

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300,
                          env=full_env, check=False)


@pytest.fixture
def ref_mounts(tmp_path: Path) -> Iterator[RefMounts]:
    m = RefMounts(tmp_path)
    try:
        yield m
    finally:
        m.close()


def _via(proxy: FaultProxy, ref: str) -> str:
    return proxy.host + ref[ref.index("/"):]


def _read_error(path: Path) -> OSError | None:
    try:
        path.read_bytes()
    except OSError as exc:
        return exc
    return None


# -- without the kernel ------------------------------------------------------------------


def test_reference_detection(tmp_path: Path) -> None:
    boot = tmp_path / "image.boot"
    boot.write_bytes(b"x")
    assert not looks_like_reference(str(boot))
    assert looks_like_reference("127.0.0.1:5000/a/b:v1")
    assert looks_like_reference(f"oci:{tmp_path}/lay:tag")
    assert not looks_like_reference("Not A Ref!")
    assert not looks_like_reference("imgs/mistyped.boot")  # not docker.io/imgs/mistyped.boot
    assert looks_like_reference("localhost:5000/x/y.boot")


def test_resolve_fetches_only_the_bootstrap(nydus_ref: str, proxy: FaultProxy,
                                            tmp_path: Path) -> None:
    remote = resolve_remote_image(_via(proxy, nydus_ref), str(tmp_path / "c"))
    assert proxy.range_requests == 0
    blob_gets = [r for r in proxy.requests if r.startswith("GET") and "/blobs/" in r]
    assert len(blob_gets) == 1  # the bootstrap layer, nothing else
    assert remote.bootstrap == str(tmp_path / "c" / (Path(remote.bootstrap).name))
    assert remote.backend["type"] == "registry" and remote.backend["repo"].endswith("rm/nydus")
    assert "password" not in json.dumps(remote.backend)
    again = resolve_remote_image(_via(proxy, nydus_ref), str(tmp_path / "c"))
    assert again.bootstrap == remote.bootstrap and again.bootstrap_fetched == 0
    assert len([r for r in proxy.requests if r.startswith("GET") and "/blobs/" in r]) == 1
    be = RegistryBackend.from_spec(remote.backend)
    try:
        assert be.spec() == remote.backend
    finally:
        be.close()


@needs_fanotify
def test_daemon_resolve_validates_fully_for_the_register_that_follows(
        nydus_ref: str, tmp_path: Path) -> None:
    """The daemon's `resolve` (what `mount REF` sends) parses the bootstrap once, with
    the full validation a mount needs: its verdict is on disk before any register, and
    the register that follows takes that parse."""
    import hashlib

    from erofs_nydus.daemon.images import VERDICT_FILE

    cache = tmp_path / "cache"
    client = DaemonClient(cache)
    assert client.ensure_running()
    try:
        resp = client.request("resolve", ref=nydus_ref)
        boot = Path(resp["bootstrap"])
        digest = hashlib.sha256(boot.read_bytes()).hexdigest()
        assert (cache / VERDICT_FILE).read_text().split() == [digest]
        mp = tmp_path / "mnt"
        mp.mkdir()
        info = client.request("register", bootstrap=str(boot), backend=resp["backend"],
                              mountpoint=str(mp), mode="fanotify")
        assert info["bootstrap"].endswith(".boot") and len(info["devices"]) == len(
            resp["blob_ids"])
        client.request("detach", mountpoint=str(mp))
    finally:
        client.shutdown()


@needs_fanotify
def test_register_ref_resolves_and_registers_in_one_request(nydus_ref: str,
                                                            tmp_path: Path) -> None:
    """`mount REF` sends one `register_ref`: the daemon resolves the reference, fully
    validates the bootstrap once (verdict on disk), and registers it with the
    caller's backend settings on top of the resolved registry backend."""
    import hashlib

    from erofs_nydus.daemon.images import STATE_FILE, VERDICT_FILE
    from erofs_nydus.mount import mount_erofs_file, umount

    cache, mp = tmp_path / "cache", tmp_path / "mnt"
    mp.mkdir()
    client = DaemonClient(cache)
    assert client.ensure_running()
    try:
        info = client.request("register_ref", ref=nydus_ref, mountpoint=str(mp),
                              backend_config={"retries": 7}, amplify=0)
        boot = Path(info["bootstrap"])
        digest = hashlib.sha256(boot.read_bytes()).hexdigest()
        assert (cache / VERDICT_FILE).read_text().split() == [digest]
        state = json.loads((cache / STATE_FILE).read_text())
        (entry,) = state["images"]
        assert entry["backend"]["type"] == "registry" and entry["backend"]["retries"] == 7
        assert entry["mountpoints"] == [str(mp)]
        mount_erofs_file(info["bootstrap"], mp, info["devices"])
        try:
            assert (mp / "etc/keep").exists()
        finally:
            umount(mp)
        client.request("detach", mountpoint=str(mp))
        with pytest.raises(Exception, match="backend_config must be a JSON object"):
            client.request("register_ref", ref=nydus_ref, mountpoint=str(mp),
                           backend_config=[1])
    finally:
        client.shutdown()


def test_backend_from_spec_is_lazy_and_shares_its_client(nydus_ref: str,
                                                         tmp_path: Path) -> None:
    remote = resolve_remote_image(nydus_ref, str(tmp_path / "c"))
    a, b = (RegistryBackend.from_spec(remote.backend) for _ in range(2))
    assert a._client is None and b._client is None  # nothing made until the first read
    blob = remote.blob_ids[0]
    assert len(a.read_range(blob, 0, 16)) == 16 and len(b.read_range(blob, 16, 16)) == 16
    assert a.client is b.client
    shared = a.client
    a.close()
    assert not shared._http.is_closed  # still used by b
    b.close()
    assert shared._http.is_closed
    with pytest.raises(BackendError, match="closed"):
        a.read_range(blob, 0, 1)


def test_backend_with_client_options_is_lazy_and_closable() -> None:
    be = RegistryBackend(None, "127.0.0.1:9/app", deadline=5.0, client_options={
        "plain_http": "loopback", "timeout": 2.0, "retries": 1})
    assert be.spec() == {"type": "registry", "repo": "127.0.0.1:9/app",
                         "plain_http": "loopback", "deadline": 5.0, "timeout": 2.0,
                         "retries": 1}
    assert be._client is None  # spec() makes no client
    be.close()
    with pytest.raises(BackendError, match="closed"):
        be.read_range("0" * 64, 0, 1)


def test_resolve_refuses_plain_oci_images(nydus_ref: str, registry: RegistryServer,
                                          tmp_path: Path) -> None:
    from erofs_nydus.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match=NOT_NYDUS):
        resolve_remote_image(registry.ref("rm/src:v1"), str(tmp_path))
    with pytest.raises(UsageError):
        resolve_remote_image("Bad Ref", str(tmp_path))


# -- mounts ----------------------------------------------------------------------------------


@needs_fanotify
def test_mount_ref_lazy_then_full_compare(nydus_ref: str, proxy: FaultProxy,
                                          expected_tree: Path, ref_mounts: RefMounts) -> None:
    mp = ref_mounts.mount(_via(proxy, nydus_ref), "mnt")
    assert proxy.range_requests == 0  # nothing but the bootstrap before the first read
    assert (mp / "etc/keep").read_bytes() == (expected_tree / "etc/keep").read_bytes()
    st = daemon_status(ref_mounts.cache(mp))
    total = sum(b["size"] for b in st["blobs"].values())
    fetched = st["metrics"]["bytes_fetched"]
    assert st["images"][0]["backend"]["type"] == "registry"
    assert 0 < fetched <= 0.3 * total, (fetched, total)
    assert 0 < proxy.range_requests <= 3 and proxy.range_bytes == fetched
    diffs = treeutil.compare_trees(expected_tree, mp, ignore={"root"}, limit=30)
    assert diffs == [], "\n".join(diffs)
    st = daemon_status(ref_mounts.cache(mp))
    assert st["fanotify"]["denied"] == 0
    out = run_cli("mount-stats", str(mp)).stdout
    assert "fetched:" in out


@needs_fanotify
def test_mount_oci_layout_ref(source_layout: Path, expected_tree: Path, tmp_path: Path,
                              ref_mounts: RefMounts) -> None:
    out = tmp_path / "nydus-layout"
    convert_image(f"oci:{source_layout}:latest", f"oci:{out}:nydus",
                  ConvertOptions(cache_dir=str(tmp_path / "conv")))
    mp = ref_mounts.mount(f"oci:{out}:nydus", "mnt")
    diffs = treeutil.compare_trees(expected_tree, mp, ignore={"root"}, limit=30)
    assert diffs == [], "\n".join(diffs)


@needs_fanotify
def test_daemon_restart_recreates_registry_backend(nydus_ref: str, expected_tree: Path,
                                                   ref_mounts: RefMounts) -> None:
    mp = ref_mounts.mount(nydus_ref, "mnt")
    cache = ref_mounts.cache(mp)
    state = json.loads((cache / "daemon-state.json").read_text())
    assert state["images"][0]["backend"]["type"] == "registry"
    pid = daemon_status(cache)["pid"]
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.3)
    assert (mp / "big").read_bytes() == (expected_tree / "big").read_bytes()
    st = daemon_status(cache)
    assert st["pid"] != pid and st["metrics"]["backend_requests"] > 0


def test_mount_errors_are_one_line(nydus_ref: str, registry: RegistryServer,
                                   tmp_path: Path, ref_mounts: RefMounts) -> None:
    ref_mounts.mount(registry.ref("rm/src:v1"), "plain", check=False)
    proc = ref_mounts.last
    assert proc.returncode == 4 and NOT_NYDUS in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("mode: ")]
    assert "Traceback" not in proc.stderr and len(errors) == 1
    ref_mounts.mount(registry.ref("rm/nydus:nope"), "nope", check=False)
    proc = ref_mounts.last
    assert proc.returncode != 0 and "rm/nydus" in proc.stderr and "Traceback" not in proc.stderr
    ref_mounts.mount(str(tmp_path / "no-such.boot"), "bad", check=False)
    assert ref_mounts.last.returncode == 2 and "Traceback" not in ref_mounts.last.stderr


# -- auth ----------------------------------------------------------------------------------


def _docker_config(path: Path, host: str, user: str, password: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    (path / "config.json").write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


@needs_fanotify
def test_mount_from_basic_auth_registry(source_layout: Path, expected_tree: Path,
                                        registry_htpasswd: RegistryServer, tmp_path: Path,
                                        ref_mounts: RefMounts) -> None:
    reg = registry_htpasswd
    src, target = reg.ref("auth/src:v1"), reg.ref("auth/nydus:v1")
    skopeo_copy(f"oci:{source_layout}:latest", f"docker://{src}", creds=HTPASSWD_USER)
    good = _docker_config(tmp_path / "good", reg.host, *HTPASSWD_USER)
    convert_image(src, target, ConvertOptions(
        cache_dir=str(tmp_path / "conv"),
        client_options={"plain_http": True, "docker_config": str(good)}))

    bad = _docker_config(tmp_path / "bad", reg.host, HTPASSWD_USER[0], "wrong")
    ref_mounts.mount(target, "bad", env={"DOCKER_CONFIG": str(bad)}, check=False)
    proc = ref_mounts.last
    assert proc.returncode != 0 and "refused" in proc.stderr and "alice" in proc.stderr
    assert "Traceback" not in proc.stderr and "wrong" not in proc.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    ref_mounts.mount(target, "none", env={"DOCKER_CONFIG": str(empty)}, check=False)
    assert ref_mounts.last.returncode != 0 and "credentials" in ref_mounts.last.stderr

    mp = ref_mounts.mount(target, "mnt", env={"DOCKER_CONFIG": str(good)})
    state = (ref_mounts.cache(mp) / "daemon-state.json").read_text()
    assert HTPASSWD_USER[1] not in state and str(good) in state  # the path, never the secret
    diffs = treeutil.compare_trees(expected_tree, mp, ignore={"root"}, limit=30)
    assert diffs == [], "\n".join(diffs)


@needs_fanotify
def test_each_mount_uses_its_own_callers_credentials(source_layout: Path,
                                                     registry_htpasswd: RegistryServer,
                                                     tmp_path: Path) -> None:
    """The daemon keeps none of the environment of the caller that started it: each
    mount's registry auth file is its own caller's (issue 11 item 3)."""
    reg = registry_htpasswd
    src, target = reg.ref("envs/src:v1"), reg.ref("envs/nydus:v1")
    skopeo_copy(f"oci:{source_layout}:latest", f"docker://{src}", creds=HTPASSWD_USER)
    good = _docker_config(tmp_path / "good", reg.host, *HTPASSWD_USER)
    convert_image(src, target, ConvertOptions(
        cache_dir=str(tmp_path / "conv"),
        client_options={"plain_http": True, "docker_config": str(good)}))
    cache = tmp_path / "cache"
    home = tmp_path / "home"  # credentials in ~/.docker, no $DOCKER_CONFIG
    _docker_config(home / ".docker", reg.host, *HTPASSWD_USER)
    nohome = tmp_path / "nohome"
    nohome.mkdir()
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("DOCKER_CONFIG", "REGISTRY_AUTH_FILE")}
    mps = []

    def mount(name: str, env: dict[str, str]) -> Any:
        mp = tmp_path / name
        mp.mkdir()
        proc = subprocess.run([*CLI, "mount", target, str(mp), "--cache-dir", str(cache)],
                              capture_output=True, text=True, timeout=300,
                              env={**base_env, **env}, check=False)
        if proc.returncode == 0:
            mps.append(mp)
        return proc

    try:
        # the daemon is started by a caller with credentials in $DOCKER_CONFIG...
        first = mount("first", {"DOCKER_CONFIG": str(good), "HOME": str(nohome)})
        assert first.returncode == 0, first.stderr
        # ...a caller without any must not get them
        second = mount("second", {"HOME": str(nohome)})
        assert second.returncode != 0 and "credentials" in second.stderr, second.stderr
        # and a caller whose credentials are in its ~/.docker gets its own
        third = mount("third", {"HOME": str(home)})
        assert third.returncode == 0, third.stderr
        assert (mps[-1] / "etc/keep").exists()
    finally:
        for mp in mps:
            run_cli("umount", str(mp), "--cache-dir", str(cache), check=False)
        client = DaemonClient(cache)
        end = time.monotonic() + 20
        while client.supervisor_running() and time.monotonic() < end:
            time.sleep(0.1)


@needs_fanotify
def test_callers_tls_roots_travel_with_the_mount(nydus_ref: str, tmp_path: Path,
                                                ref_mounts: RefMounts) -> None:
    """$SSL_CERT_FILE does not reach the daemon's environment; the mount's backend gets
    it explicitly (its registry reads use the caller's CA bundle)."""
    import certifi

    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes())
    mp = ref_mounts.mount(nydus_ref, "mnt", env={"SSL_CERT_FILE": str(bundle)})
    state = json.loads((ref_mounts.cache(mp) / "daemon-state.json").read_text())
    assert str(bundle) in json.dumps(state), state
    assert (mp / "etc/keep").exists()


# -- faults --------------------------------------------------------------------------------


@needs_fanotify
def test_slow_registry_read_gets_eio_after_deadline(nydus_ref: str, proxy: FaultProxy,
                                                    expected_tree: Path,
                                                    ref_mounts: RefMounts) -> None:
    mp = ref_mounts.mount(_via(proxy, nydus_ref), "mnt", "--read-deadline", "2",
                          "--amplify", "0")
    # slow: the top layer's blob (etc/gone is only there); the others answer at once
    with RegistryClient(plain_http=True) as client:
        top_blob = manifest_blobs(client.get_manifest(nydus_ref).data)[-2].digest
    proxy.mode, proxy.delay, proxy.delay_match = "delay", 8.0, top_blob
    results: dict[str, Any] = {}

    def slow_reader() -> None:
        t0 = time.monotonic()
        results["err"] = _read_error(mp / "etc/gone")
        results["dt"] = time.monotonic() - t0

    t = threading.Thread(target=slow_reader)
    t.start()
    time.sleep(0.5)
    # the daemon keeps serving meanwhile: control socket, and a read from another blob
    assert DaemonClient(ref_mounts.cache(mp)).alive()
    t0 = time.monotonic()
    rel = "deep/a/b/c/other"  # upper layer's blob
    assert (mp / rel).read_bytes() == (expected_tree / rel).read_bytes()
    assert time.monotonic() - t0 < 1.0 and t.is_alive()
    t.join(30)
    assert not t.is_alive()
    err = results["err"]
    assert isinstance(err, OSError) and err.errno == errno.EIO
    # the deadline (the kernel may retry once after a failed readahead), not the delay
    assert 1.5 <= results["dt"] < 7.0, results["dt"]
    proxy.mode = "pass"
    for rel in ("etc/gone", "hl/one"):
        assert (mp / rel).read_bytes() == (expected_tree / rel).read_bytes()
    assert daemon_status(ref_mounts.cache(mp))["metrics"]["backend_errors"] >= 1


@needs_fanotify
def test_registry_down_after_mount_gives_eio_then_recovers(
    nydus_ref: str, proxy: FaultProxy, expected_tree: Path, ref_mounts: RefMounts
) -> None:
    mp = ref_mounts.mount(_via(proxy, nydus_ref), "mnt", "--read-deadline", "3",
                          "--amplify", "0")
    proxy.stop()  # connections refused from now on
    t0 = time.monotonic()
    err = _read_error(mp / "etc/keep")
    assert isinstance(err, OSError) and err.errno == errno.EIO
    assert time.monotonic() - t0 < 10
    proxy.start()  # same port
    proxy.mode = "drop"  # up, but dropping every range read
    err = _read_error(mp / "etc/keep")
    assert isinstance(err, OSError) and err.errno == errno.EIO
    retries = daemon_status(ref_mounts.cache(mp))["metrics"]["retries"]
    proxy.mode = "500"
    err = _read_error(mp / "etc/keep")
    assert isinstance(err, OSError) and err.errno == errno.EIO
    # every 500 was retried (with backoff, within the deadline) and counted
    st = daemon_status(ref_mounts.cache(mp))
    assert st["metrics"]["retries"] > retries and st["metrics"]["backend_errors"] >= 3
    proxy.mode = "pass"
    assert (mp / "etc/keep").read_bytes() == (expected_tree / "etc/keep").read_bytes()


@needs_fanotify
def test_corrupt_blob_bytes_give_eio_never_wrong_data(
    nydus_ref: str, proxy: FaultProxy, expected_tree: Path, ref_mounts: RefMounts
) -> None:
    mp = ref_mounts.mount(_via(proxy, nydus_ref), "mnt", "--amplify", "0")
    proxy.mode = "corrupt"
    for rel in ("big", "hl/one", "etc/keep"):
        err = _read_error(mp / rel)
        assert isinstance(err, OSError) and err.errno == errno.EIO, rel
    st = daemon_status(ref_mounts.cache(mp))
    assert st["metrics"]["digest_failures"] >= 3
    assert all(b["present"] == 0 for b in st["blobs"].values())
    proxy.mode = "pass"
    for rel in ("big", "hl/one", "etc/keep"):
        assert (mp / rel).read_bytes() == (expected_tree / rel).read_bytes()


# -- start-up cost --------------------------------------------------------------------------


@needs_fanotify
def test_mount_ref_command_never_imports_the_http_stack(nydus_ref: str,
                                                        ref_mounts: RefMounts) -> None:
    """The daemon resolves the reference; the short-lived `mount` process stays light."""
    import subprocess
    import sys

    mp = ref_mounts.base / "light"
    mp.mkdir()
    cache = ref_mounts.base / "cache-light"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "from erofs_nydus.cli import run; run()",
         "mount", nydus_ref, str(mp), "--cache-dir", str(cache)],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_mounts.active.append((mp, cache))
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in proc.stderr.splitlines()
                if ln.startswith("import time:")}
    assert "erofs_nydus.service.client" in imported  # importtime output was captured
    heavy = {"httpx", "httpcore", "trio", "erofs_nydus.registry.client",
             "erofs_nydus.builder", "erofs_nydus.service.worker"} & imported
    assert not heavy, heavy
    assert (mp / "etc/keep").exists()


@needs_fanotify
def test_resident_daemon_outlives_its_mounts_and_stops_on_sigterm(
        nydus_ref: str, expected_tree: Path, tmp_path: Path) -> None:
    import subprocess

    from daemon_support import CLI

    cache, mp = tmp_path / "cache", tmp_path / "mnt"
    mp.mkdir()
    with open(tmp_path / "daemon.log", "wb") as log:
        daemon = subprocess.Popen([*CLI, "daemon", "--cache-dir", str(cache), "--resident"],
                                  stdout=log, stderr=subprocess.STDOUT)
    client = DaemonClient(cache)
    try:
        end = time.monotonic() + 30
        while not client.alive():
            assert daemon.poll() is None and time.monotonic() < end, \
                (tmp_path / "daemon.log").read_text()
            time.sleep(0.05)
        assert client.request("ping")["resident"] is True
        pid = client.request("ping")["pid"]
        run_cli("mount", nydus_ref, str(mp), "--cache-dir", str(cache))
        assert (mp / "big").read_bytes() == (expected_tree / "big").read_bytes()
        assert client.request("ping")["pid"] == pid  # served by the resident daemon
        out = run_cli("umount", str(mp)).stdout
        assert "resident daemon keeps running" in out
        assert client.alive() and daemon.poll() is None
        with pytest.raises(Exception, match="resident"):
            client.request("shutdown")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0
        assert not client.supervisor_running() and not client.alive()
    finally:
        if is_mountpoint(mp):
            run_cli("umount", str(mp), check=False)
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


@needs_fanotify
def test_slow_registry_read_is_not_a_stuck_daemon(nydus_ref: str, proxy: FaultProxy,
                                                  expected_tree: Path,
                                                  ref_mounts: RefMounts) -> None:
    """A range read slower than the stuck-daemon deadline but within the mount's
    --read-deadline is served: the supervisor waits as long as the registry may take."""
    proxy.mode, proxy.delay = "delay", 4.0
    mp = ref_mounts.mount(_via(proxy, nydus_ref), "mnt", "--read-deadline", "20",
                          env={"EROFS_NYDUS_READ_DEADLINE": "1"})
    pid = daemon_status(ref_mounts.cache(mp))["pid"]
    assert (mp / "etc/keep").read_bytes() == (expected_tree / "etc/keep").read_bytes()
    assert daemon_status(ref_mounts.cache(mp))["pid"] == pid


def test_planted_cached_bootstrap_symlink_is_never_followed(nydus_ref: str,
                                                           tmp_path: Path) -> None:
    """A `<sha>.boot` (or the layer index) replaced by a symlink - even to a file holding
    the right bytes - is a cache miss: the bootstrap is fetched again and stored as our
    own regular file, the link's target is never read or written."""
    cache = tmp_path / "c"
    remote = resolve_remote_image(nydus_ref, str(cache))
    boot = Path(remote.bootstrap)
    elsewhere = tmp_path / "elsewhere.boot"
    elsewhere.write_bytes(boot.read_bytes())
    boot.unlink()
    boot.symlink_to(elsewhere)
    again = resolve_remote_image(nydus_ref, str(cache))
    assert again.bootstrap == remote.bootstrap and again.bootstrap_fetched > 0
    assert not boot.is_symlink() and boot.read_bytes() == elsewhere.read_bytes()
    index = next((cache / "bootstrap-layers").iterdir())
    target = tmp_path / "index-target"
    target.write_text(index.read_text())
    index.unlink()
    index.symlink_to(target)
    third = resolve_remote_image(nydus_ref, str(cache))
    assert third.bootstrap_fetched > 0 and not index.is_symlink()
