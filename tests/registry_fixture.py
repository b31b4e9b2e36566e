"""Fixtures that start a real docker-registry on 127.0.0.1.

The registry is Debian's ``docker-registry`` (CNCF distribution 2.8) run as
``docker-registry serve CONFIG`` with a free loopback port and a temporary
storage directory; a fixture waits until ``/v2/`` answers and stops it after.

* ``registry`` (session): no auth.
* ``registry_htpasswd`` (session): HTTP Basic via an htpasswd file made with
  ``htpasswd -Bbn`` (apache2-utils, bcrypt).  User ``alice`` / ``wonderland``.
* ``registry_token`` (session): distribution's ``token`` auth.  A small token server
  (`TokenServer`, stdlib http.server on 127.0.0.1) issues RS256 JWTs with an
  ``x5c`` header; its key and self-signed certificate are generated at test time
  with the ``cryptography`` package and the certificate is the registry's
  ``rootcertbundle``.  Authenticated users get the actions they ask for,
  anonymous requests get none.  User ``bob`` / ``builder``.
* ``registry_factory`` (function): start extra registries (fresh storage, any auth).
* ``oci_image_factory`` (function): build a small real OCI image with ``umoci``
  (init / new / unpack / repack per layer / config) in a layout directory.
* ``push_with_skopeo`` (session): ``skopeo copy --dest-tls-verify=false oci:... docker://...``.
* ``sample_image`` (session): one two-layer image pushed to ``registry`` in both
  OCI (``sample/oci:v1``) and Docker schema 2 (``sample/v2s2:v1``) formats.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

REGISTRY_BIN = "/usr/bin/docker-registry"
HTPASSWD_USER = ("alice", "wonderland")
TOKEN_USER = ("bob", "builder")
TOKEN_SERVICE = "erofs-nydus-test-registry"
TOKEN_ISSUER = "erofs-nydus-test-issuer"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} not installed (apt-get install {package})")
    return path


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, failing the test with its stderr when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


@dataclass
class RegistryServer:
    """A running docker-registry.  `host` is ``127.0.0.1:PORT`` (use plain HTTP)."""

    workdir: Path
    auth: dict[str, Any] | None = None
    users: dict[str, str] = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    token_server: TokenServer | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)  # e.g. {"proxy": {...}}

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def storage(self) -> Path:
        return self.workdir / "storage"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    def ref(self, repo_tag: str) -> str:
        return f"{self.host}/{repo_tag}"

    def start(self, port: int | None = None) -> RegistryServer:
        """Start on `port` (a free one when None; retried on a bind race)."""
        if not os.access(REGISTRY_BIN, os.X_OK):
            pytest.skip("docker-registry not installed (apt-get install docker-registry)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        config: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": "", "secret": secrets.token_hex(16)},
            "health": {"storagedriver": {"enabled": False}},
        }
        if self.auth:
            config["auth"] = self.auth
        config.update(self.extra_config)
        last_log = ""
        for _ in range(5 if port is None else 1):  # a free port can be taken before bind
            self.port = free_port() if port is None else port
            config["http"]["addr"] = self.host
            cfg_path = self.workdir / "config.yml"
            cfg_path.write_text(json.dumps(config, indent=1))  # JSON is valid YAML
            log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the process
            self.process = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(cfg_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            log.close()
            if self._wait_ready():
                return self
            self.stop()
            last_log = self.log_path.read_text(errors="replace")
        raise RuntimeError(f"docker-registry did not start:\n{last_log[-3000:]}")

    def _wait_ready(self, timeout: float = 20.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                r = httpx.get(f"{self.url}/v2/", timeout=1.0)
                if r.status_code in (200, 401):
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        return False

    def restart(self) -> None:
        """Stop and start again on the same port with the same storage."""
        self.stop()
        self.start(self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


# -- token server -------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class TokenServer:
    """A minimal distribution token server on 127.0.0.1 (RS256 JWT with x5c)."""

    def __init__(self, workdir: Path, users: dict[str, str]) -> None:
        crypto = pytest.importorskip("cryptography")
        del crypto
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa
        from cryptography.x509.oid import NameOID

        self.users = users
        self.requests: list[dict[str, Any]] = []
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "erofs-nydus test token signer")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = workdir / "token-cert.pem"
        workdir.mkdir(parents=True, exist_ok=True)
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()

        def sign(payload: bytes) -> bytes:
            return self._key.sign(payload, padding.PKCS1v15(), hashes.SHA256())

        self._sign = sign
        self.port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def make_token(self, subject: str, access: list[dict[str, Any]], ttl: int = 300) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": subject,
            "aud": TOKEN_SERVICE,
            "exp": now + ttl,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        )
        return f"{signing_input}.{_b64url(self._sign(signing_input.encode()))}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                user: str | None = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                    if server.users.get(name) != password:
                        server.requests.append({"user": name, "denied": True})
                        self._send(401, {"details": "invalid credentials"})
                        return
                    user = name
                scopes = [s for v in query.get("scope", []) for s in v.split()]
                server.requests.append(
                    {"user": user, "service": query.get("service"), "scopes": scopes}
                )
                if url.path != "/token":
                    self._send(404, {})
                    return
                access = []
                if user is not None:
                    for scope in scopes:
                        rtype, _, rest = scope.partition(":")
                        name, _, actions = rest.rpartition(":")
                        access.append({"type": rtype, "name": name, "actions": actions.split(",")})
                token = server.make_token(user or "", access)
                self._send(200, {"token": token, "access_token": token, "expires_in": 300})

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# -- starting registries ------------------------------------------------------------


def _htpasswd_line(user: str, password: str) -> str:
    exe = _need("htpasswd", "apache2-utils")
    return run([exe, "-Bbn", user, password]).stdout.strip()


def start_registry(workdir: Path, auth: str | None = None) -> RegistryServer:
    """Start a registry under `workdir` with auth None, "htpasswd" or "token"."""
    if auth is None:
        return RegistryServer(workdir).start()
    if auth == "htpasswd":
        htpasswd = workdir / "htpasswd"
        workdir.mkdir(parents=True, exist_ok=True)
        htpasswd.write_text(_htpasswd_line(*HTPASSWD_USER) + "\n")
        config = {"htpasswd": {"realm": "erofs-nydus-test", "path": str(htpasswd)}}
        return RegistryServer(workdir, config, dict([HTPASSWD_USER])).start()
    if auth == "token":
        tokens = TokenServer(workdir, dict([TOKEN_USER]))
        config = {
            "token": {
                "realm": tokens.realm,
                "service": TOKEN_SERVICE,
                "issuer": TOKEN_ISSUER,
                "rootcertbundle": str(tokens.cert_path),
            }
        }
        server = RegistryServer(workdir, config, dict([TOKEN_USER]), token_server=tokens)
        try:
            return server.start()
        except BaseException:
            tokens.stop()
            raise
    raise ValueError(f"unknown auth {auth!r}")


def stop_registry(server: RegistryServer) -> None:
    server.stop()
    if server.token_server is not None:
        server.token_server.stop()


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    server = start_registry(tmp_path_factory.mktemp("registry"))
    yield server
    stop_registry(server)


@pytest.fixture(scope="session")
def registry_htpasswd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    server = start_registry(tmp_path_factory.mktemp("registry-htpasswd"), "htpasswd")
    yield server
    stop_registry(server)


@pytest.fixture(scope="session")
def registry_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    server = start_registry(tmp_path_factory.mktemp("registry-token"), "token")
    yield server
    stop_registry(server)


@pytest.fixture
def registry_factory(tmp_path: Path) -> Iterator[Callable[..., RegistryServer]]:
    """Start fresh registries for one test: ``registry_factory(auth=None|"htpasswd"|"token")``."""
    started: list[RegistryServer] = []

    def make(auth: str | None = None) -> RegistryServer:
        server = start_registry(tmp_path / f"registry-{len(started)}", auth)
        started.append(server)
        return server

    yield make
    for server in started:
        stop_registry(server)


# -- images -------------------------------------------------------------------------


@dataclass
class OciImage:
    """A umoci-built image: `layout` directory and `tag` (``oci:LAYOUT:TAG``)."""

    layout: Path
    tag: str

    @property
    def oci_ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"

    def manifest(self) -> dict[str, Any]:
        index = json.loads((self.layout / "index.json").read_text())
        for m in index["manifests"]:
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == self.tag:
                blob = self.layout / "blobs" / "sha256" / m["digest"].split(":", 1)[1]
                return dict(json.loads(blob.read_text()))
        raise KeyError(self.tag)

    def layer_digests(self) -> list[str]:
        return [layer["digest"] for layer in self.manifest()["layers"]]


def build_oci_image(
    workdir: Path,
    layers: list[dict[str, bytes | None]],
    *,
    tag: str = "latest",
    layout: Path | None = None,
    architecture: str | None = None,
) -> OciImage:
    """Build an image with umoci: one layer per dict (path -> bytes; None deletes)."""
    umoci = _need("umoci", "umoci")
    layout = layout or workdir / "layout"
    if not (layout / "oci-layout").exists():
        run([umoci, "init", "--layout", str(layout)])
    run([umoci, "new", "--image", f"{layout}:{tag}"])
    for i, files in enumerate(layers):
        bundle = workdir / f"bundle-{tag}-{i}"
        run([umoci, "unpack", "--image", f"{layout}:{tag}", str(bundle)])
        rootfs = bundle / "rootfs"
        for rel, content in files.items():
            target = rootfs / rel
            if content is None:
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink()
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
        run([umoci, "repack", "--image", f"{layout}:{tag}", str(bundle)])
        shutil.rmtree(bundle)
    if architecture is not None:
        run([umoci, "config", "--image", f"{layout}:{tag}", "--architecture", architecture])
    return OciImage(layout, tag)


@pytest.fixture
def oci_image_factory(tmp_path: Path) -> Callable[..., OciImage]:
    """``oci_image_factory([{"etc/hello": b"hi"}], tag="v1", architecture="arm64")``."""
    counter = iter(range(1_000_000))

    def make(layers: list[dict[str, bytes | None]], **kwargs: Any) -> OciImage:
        return build_oci_image(tmp_path / f"img-{next(counter)}", layers, **kwargs)

    return make


def skopeo_copy(
    src: str,
    dest: str,
    *,
    fmt: str | None = None,
    creds: tuple[str, str] | None = None,
    all_images: bool = False,
) -> None:
    """``skopeo copy`` between transports; registries are reached over plain HTTP."""
    skopeo = _need("skopeo", "skopeo")
    cmd = [skopeo, "--insecure-policy", "copy", "--src-tls-verify=false", "--dest-tls-verify=false"]
    if src.startswith("oci:"):
        cmd.remove("--src-tls-verify=false")
    if dest.startswith("oci:"):
        cmd.remove("--dest-tls-verify=false")
    if fmt:
        cmd += ["--format", fmt]
    if creds:
        cmd += ["--dest-creds", f"{creds[0]}:{creds[1]}", "--src-creds", f"{creds[0]}:{creds[1]}"]
    if all_images:
        cmd.append("--all")
    run([*cmd, src, dest])


def skopeo_inspect(ref: str, *, raw: bool = False, creds: tuple[str, str] | None = None) -> Any:
    skopeo = _need("skopeo", "skopeo")
    cmd = [skopeo, "--insecure-policy", "inspect"]
    if ref.startswith("docker://"):
        cmd.append("--tls-verify=false")
    if raw:
        cmd.append("--raw")
    if creds:
        cmd += ["--creds", f"{creds[0]}:{creds[1]}"]
    return json.loads(run([*cmd, ref]).stdout)


@pytest.fixture(scope="session")
def push_with_skopeo() -> Callable[..., None]:
    """``push_with_skopeo(image, registry, "repo:tag", fmt="oci"|"v2s2", creds=None)``."""

    def push(
        image: OciImage,
        server: RegistryServer,
        repo_tag: str,
        *,
        fmt: str = "oci",
        creds: tuple[str, str] | None = None,
    ) -> None:
        skopeo_copy(image.oci_ref, f"docker://{server.ref(repo_tag)}", fmt=fmt, creds=creds)

    return push


SAMPLE_LAYERS: list[dict[str, bytes | None]] = [
    {"etc/hello.txt": b"hello from layer 0\n", "usr/share/data.bin": bytes(range(256)) * 300},
    {"etc/hello.txt": b"hello again from layer 1\n", "usr/share/data.bin": None},
]


@dataclass
class SampleImage:
    image: OciImage
    registry: RegistryServer
    oci_ref: str  # registry reference of the OCI-format push
    docker_ref: str  # registry reference of the Docker schema 2 push


@pytest.fixture(scope="session")
def sample_image(
    registry: RegistryServer,
    tmp_path_factory: pytest.TempPathFactory,
    push_with_skopeo: Callable[..., None],
) -> SampleImage:
    image = build_oci_image(tmp_path_factory.mktemp("sample-image"), SAMPLE_LAYERS, tag="v1")
    push_with_skopeo(image, registry, "sample/oci:v1", fmt="oci")
    push_with_skopeo(image, registry, "sample/v2s2:v1", fmt="v2s2")
    return SampleImage(
        image, registry, registry.ref("sample/oci:v1"), registry.ref("sample/v2s2:v1")
    )
