"""Threat model, part "a registry": what a registry can and cannot do to us.

A registry (or whoever answers in its name: a proxy, a redirect target, a token realm
it names) is untrusted input, read by the CLI and by the root daemon (`mount REF`
resolves the image there).  Tests here pin each bound (issue 11 item 5, invariant (e)).

It CAN: refuse or stall (every operation has a deadline; one `resolve` has
RESOLVE_DEADLINE for all its traffic, below the daemon's idle exit); serve wrong bytes
(blobs and manifests are digest-checked, and chunks read by Range are checked against
their chunk digest by the daemon); point a tag at another image (pin @sha256 digests).

It CANNOT make us:
* hold or write more than a bound: manifests <= MAX_MANIFEST_SIZE or their index
  entry's size; configs <= MAX_CONFIG_SIZE or their descriptor's size; a bootstrap layer
  <= MAX_BOOTSTRAP_LAYER_SIZE, streamed to a file, inflating to <= MAX_BOOTSTRAP_INFLATED
  with an image.boot <= MAX_BOOTSTRAP_SIZE (a gzip bomb with a correct digest ends
  there); a Range read costs the asked window even when the server answers 200 with an
  endless body.  Each hit is one error line naming the bound, logged and counted in
  `client.LIMIT_HITS`;
* use a path of its choosing: digests are `sha256:` + 64 lower-case hex when parsed;
* learn our credentials for another host: they go only to a token realm on the
  registry's own host name, over https unless the registry itself is plain http;
* print a traceback (redirect loops, bad URLs, odd encodings) or leave a half-made
  `oci:` target behind after a failed convert.

Local files named as bootstraps get the same care: /dev/zero, FIFOs and files over
MAX_BOOTSTRAP_SIZE are refused in one line.  Fault servers: `FaultRegistry` (a real
socket on loopback) where the code under test builds its own client,
`httpx.MockTransport` where the test does.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import httpx
import pytest
from daemon_support import fanotify_usable, run_cli
from fault_registry import (
    OCI_LAYER_GZIP,
    FaultRegistry,
    digest_of,
    endless,
    redirect,
    slow,
    static,
)

from erofs_nydus.errors import AuthError, RegistryError
from erofs_nydus.mount import is_mountpoint
from erofs_nydus.registry import (
    Credentials,
    DeadlineExceededError,
    OCILayout,
    RegistryClient,
    resolve,
)
from erofs_nydus.registry.auth import credentials_withheld
from erofs_nydus.registry.client import LIMIT_HITS, SizeLimitError
from erofs_nydus.registry.manifest import OCI_MANIFEST, Descriptor, select_platform
from erofs_nydus.registry.resolve import extract_bootstrap, resolve_remote_image
from erofs_nydus.service.client import DaemonClient

NYDUS_BOOT = {"containerd.io/snapshot/nydus-bootstrap": "true"}


@pytest.fixture
def fault() -> Iterator[FaultRegistry]:
    server = FaultRegistry()
    yield server
    server.close()


def _endless_transport() -> httpx.MockTransport:
    def body() -> Iterator[bytes]:
        while True:
            yield b"{" * 65536

    return httpx.MockTransport(lambda r: httpx.Response(200, content=body()))


def test_get_blob_endless_body_stops_at_the_limit() -> None:
    digest = "sha256:" + "a" * 64
    with RegistryClient(plain_http=True, use_docker_config=False,
                        transport=_endless_transport()) as c:
        before = LIMIT_HITS["blob"]
        with pytest.raises(SizeLimitError, match=r"8 MiB \(MAX_CONFIG_SIZE\)"):
            c.get_blob("reg.test/app", digest, deadline=60)
        with pytest.raises(SizeLimitError, match="descriptor's size of 1000 bytes"):
            c.get_blob("reg.test/app", digest, size=1000, deadline=60)
        with pytest.raises(SizeLimitError, match="descriptor's size of 1000 bytes"):
            list(c.open_blob_stream("reg.test/app", digest, size=1000, deadline=60))
        assert LIMIT_HITS["blob"] == before + 3


def _tgz(entries: list[tuple[str, int, bytes | None]]) -> bytes:
    """A tar.gz of (name, size, content or None for zeros) regular files."""
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tf:
        for name, size, content in entries:
            info = tarfile.TarInfo(name)
            info.size = size
            src = io.BytesIO(content) if content is not None else _Zeros(size)
            tf.addfile(info, src)  # type: ignore[arg-type]
    return raw.getvalue()


class _Zeros:
    def __init__(self, n: int) -> None:
        self.left = n

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return b"\0" * n


def test_extract_bootstrap_bounds_entry_and_inflated_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ok = _tgz([("image/image.boot", 5, b"hello")])
    assert extract_bootstrap(ok) == b"hello"
    monkeypatch.setattr(resolve, "MAX_BOOTSTRAP_SIZE", 1 << 20)
    big = _tgz([("image/image.boot", 4 << 20, None)])
    with pytest.raises(SizeLimitError, match=r"1 MiB \(MAX_BOOTSTRAP_SIZE\)"):
        extract_bootstrap(big)
    monkeypatch.setattr(resolve, "MAX_BOOTSTRAP_INFLATED", 8 << 20)
    bomb = _tgz([("image/junk", 64 << 20, None), ("image/image.boot", 5, b"hello")])
    assert len(bomb) < 1 << 20
    with pytest.raises(SizeLimitError, match=r"inflates to more than 8 MiB "
                       r"\(MAX_BOOTSTRAP_INFLATED\)"):
        extract_bootstrap(bomb)


def _leftovers(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_file()) if cache.exists() else []


def test_resolve_endless_bootstrap_layer(fault: FaultRegistry, tmp_path: Path) -> None:
    """The bootstrap layer is read inside the root daemon: an endless one must end."""
    layer = b"x" * 1000
    digest = fault.blob("app", layer, endless())
    fault.image("app", "v1", {"architecture": "amd64", "os": "linux"},
                [{"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": len(layer),
                  "annotations": NYDUS_BOOT}])
    cache = tmp_path / "cache"
    with pytest.raises(SizeLimitError, match="descriptor's size of 1000 bytes") as info:
        resolve_remote_image(fault.ref("app:v1"), str(cache), deadline=30)
    assert "\n" not in str(info.value)
    assert _leftovers(cache) == []


def test_resolve_huge_descriptor_refused_before_download(
    fault: FaultRegistry, tmp_path: Path
) -> None:
    digest = fault.blob("app", b"never served", endless())
    fault.image("app", "v1", {"os": "linux"},
                [{"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": 10 << 30,
                  "annotations": NYDUS_BOOT}])
    with pytest.raises(SizeLimitError, match=r"512 MiB \(MAX_BOOTSTRAP_LAYER_SIZE\)"):
        resolve_remote_image(fault.ref("app:v1"), str(tmp_path / "cache"), deadline=30)
    assert not [s for s in fault.requests if "/blobs/" in s.path]


def test_resolve_gzip_bomb_with_correct_digest(
    fault: FaultRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resolve, "MAX_BOOTSTRAP_INFLATED", 8 << 20)
    bomb = _tgz([("image/junk", 64 << 20, None), ("image/image.boot", 5, b"hello")])
    digest = fault.blob("app", bomb)
    fault.image("app", "v1", {"os": "linux"},
                [{"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": len(bomb),
                  "annotations": NYDUS_BOOT}])
    cache = tmp_path / "cache"
    with pytest.raises(SizeLimitError, match="MAX_BOOTSTRAP_INFLATED"):
        resolve_remote_image(fault.ref("app:v1"), str(cache), deadline=30)
    assert _leftovers(cache) == []


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "erofs_nydus.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=cwd)


def test_convert_endless_config_is_one_line(fault: FaultRegistry, tmp_path: Path) -> None:
    config = b'{"os": "linux"}'
    fault.blob("src", config, endless())
    fault.manifest("src", "v1", {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest_of(config), "size": 100 << 20},
        "layers": []})
    target = tmp_path / "out"
    proc = _cli("convert", "--source", fault.ref("src:v1"), "--target", f"oci:{target}:v1",
                "--cache-dir", str(tmp_path / "cc"), "-q")
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "MAX_CONFIG_SIZE" in proc.stderr
    # no descriptor size: the limit constant bounds it
    fault.manifest("src", "v2", {
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest_of(config), "size": 16},
        "layers": []})
    proc = _cli("convert", "--source", fault.ref("src:v2"), "--target", f"oci:{target}:v1",
                "--cache-dir", str(tmp_path / "cc"), "-q")
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "descriptor's size of 16 bytes" in proc.stderr


@pytest.mark.parametrize("command", ["check", "inspect", "stat"])
def test_bootstrap_commands_refuse_dev_zero(command: str) -> None:
    proc = _cli(command, "/dev/zero")
    assert proc.returncode != 0
    assert proc.stderr.strip() == "erofs-nydus: error: /dev/zero: not a regular file"


def test_merge_refuses_dev_zero(tmp_path: Path) -> None:
    proc = _cli("merge", "/dev/zero", "/dev/zero", "-B", str(tmp_path / "m.boot"))
    assert proc.returncode != 0
    assert proc.stderr.strip() == "erofs-nydus: error: /dev/zero: not a regular file"


def test_static_responder_serves(fault: FaultRegistry) -> None:
    fault.route("/v2/x/tags/list", static(200, b'{"tags":["a"]}'))
    with RegistryClient(plain_http=True, use_docker_config=False) as c:
        assert c.list_tags(fault.ref("x")) == ["a"]


# -- digests are validated where they are parsed ---------------------------------------

BAD_DIGESTS = [
    "sha256:../../../../etc/passwd",
    "sha256:" + "A" * 64,
    "sha256:" + "a" * 63,
    "sha256:" + "a" * 64 + "/x",
    "sha512:" + "a" * 128,
    "a" * 64,
]


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_descriptor_digest_validated_when_parsed(digest: str) -> None:
    with pytest.raises(RegistryError, match="malformed descriptor digest"):
        Descriptor.from_json({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": 1})
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": OCI_MANIFEST, "digest": digest, "size": 10,
        "platform": {"os": "linux", "architecture": "amd64"}}]}).encode()
    with pytest.raises(RegistryError, match="malformed descriptor digest"):
        select_platform(index, "linux/amd64")


def test_resolve_refuses_a_path_like_layer_digest(fault: FaultRegistry, tmp_path: Path) -> None:
    """A manifest's digest must never reach the cache dir's paths (bootstrap-layers/<hex>)."""
    planted = tmp_path / "planted"
    planted.write_text("0" * 64)
    evil = "sha256:../../planted"
    fault.image("app", "v1", {"os": "linux"},
                [{"mediaType": OCI_LAYER_GZIP, "digest": evil, "size": 10,
                  "annotations": NYDUS_BOOT}])
    with pytest.raises(RegistryError, match="malformed descriptor digest"):
        resolve_remote_image(fault.ref("app:v1"), str(tmp_path / "c" / "cache"), deadline=30)
    assert not [s for s in fault.requests if "/blobs/" in s.path]


def test_manifest_digest_header_validated() -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "HEAD":
            return httpx.Response(200, headers={"Docker-Content-Digest": "sha256:../../x"})
        return httpx.Response(200, headers={"Content-Type": OCI_MANIFEST}, content=body)

    with RegistryClient(plain_http=True, use_docker_config=False,
                        transport=httpx.MockTransport(handler)) as c:
        assert c.manifest_digest("reg.test/app:v1") == digest_of(body)


# -- credentials go only to the registry's own token realm --------------------------------


def _bearer_registry(registry: FaultRegistry, realm: str) -> None:
    """The registry's manifest route: 401 with a Bearer challenge naming `realm`
    unless a token came along."""
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
    challenge = f'Bearer realm="{realm}",service="svc",scope="repository:app:pull"'

    def answer(h: BaseHTTPRequestHandler) -> None:
        if h.headers.get("Authorization", "").startswith("Bearer "):
            static(200, body, {"Content-Type": OCI_MANIFEST})(h)
        else:
            static(401, b"{}", {"WWW-Authenticate": challenge})(h)

    registry.route("/v2/app/manifests/v1", answer)


TOKEN_OK = static(200, b'{"token": "t0k", "expires_in": 300}',
                  {"Content-Type": "application/json"})


def test_credentials_never_go_to_a_realm_on_another_host(fault: FaultRegistry) -> None:
    """A registry names the realm: one on another host (127.0.0.2 here) gets no password."""
    other = FaultRegistry("127.0.0.2")
    same = FaultRegistry("127.0.0.1")
    try:
        creds = Credentials("alice", "s3cret")
        for realm_server, sent in ((other, False), (same, True)):
            realm_server.route("/token", TOKEN_OK)
            _bearer_registry(fault, f"http://{realm_server.host}/token")
            with RegistryClient(plain_http="loopback", credentials=creds,
                                use_docker_config=False) as c:
                c.get_manifest(fault.ref("app:v1"))
            (seen,) = realm_server.requests
            assert ("Authorization" in seen.headers) == sent, seen
            assert ("account=alice" in seen.path) == sent
        # a realm elsewhere that refuses anonymous tokens: the error says why
        other.route("/token", static(401, b"{}"))
        with RegistryClient(plain_http="loopback", credentials=creds,
                            use_docker_config=False, retries=0) as c:
            _bearer_registry(fault, f"http://{other.host}/token")
            with pytest.raises(AuthError, match=r"credentials withheld: token realm .* another"):
                c.get_manifest(fault.ref("app:v1"))
        assert all("Authorization" not in s.headers for s in other.requests)
    finally:
        other.close()
        same.close()


@pytest.mark.parametrize(("realm", "sent"), [
    ("http://reg.test/token", False),  # https registry, http realm: never
    ("https://reg.test:8443/token", True),  # same host, any port, https
    ("https://auth.test/token", False),  # another host
])
def test_https_registry_realm_rule(realm: str, sent: bool) -> None:
    token_requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/token":
            token_requests.append(request)
            return httpx.Response(200, json={"token": "t0k"})
        if request.headers.get("Authorization") == "Bearer t0k":
            return httpx.Response(200, headers={"Content-Type": OCI_MANIFEST}, content=b"{}")
        return httpx.Response(401, headers={"WWW-Authenticate": f'Bearer realm="{realm}"'})

    with RegistryClient(credentials=Credentials("u", "p"), use_docker_config=False,
                        transport=httpx.MockTransport(handler)) as c:
        c.get_manifest("reg.test/app:v1")
    (req,) = token_requests
    assert ("Authorization" in req.headers) == sent


def test_docker_hub_realm_alias() -> None:
    assert credentials_withheld("https://auth.docker.io/token",
                                "https://registry-1.docker.io") is None
    assert credentials_withheld("https://auth.docker.io.evil/token",
                                "https://registry-1.docker.io") is not None


# -- failures end in one line and leave nothing behind -------------------------------------


def test_convert_redirect_loop_is_one_line_and_leaves_no_target(
    fault: FaultRegistry, tmp_path: Path
) -> None:
    fault.route("/v2/src/manifests/v1", redirect("/v2/src/manifests/v1"))
    target = tmp_path / "new" / "out"
    proc = _cli("convert", "--source", fault.ref("src:v1"), "--target", f"oci:{target}:v1",
                "--cache-dir", str(tmp_path / "cc"), "-q")
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "redirect loop" in proc.stderr
    assert not (tmp_path / "new").exists()
    # an existing (empty) target folder stays, without the layout skeleton
    target.mkdir(parents=True)
    proc = _cli("convert", "--source", fault.ref("src:v1"), "--target", f"oci:{target}:v1",
                "--cache-dir", str(tmp_path / "cc"), "-q")
    assert proc.returncode != 0
    assert list(target.iterdir()) == []


def test_convert_failure_keeps_an_existing_layout(fault: FaultRegistry, tmp_path: Path) -> None:
    target = tmp_path / "out"
    OCILayout(target, create=True).put_manifest("keep", OCI_MANIFEST, b'{"layers": []}')
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    fault.route("/v2/src/manifests/v1", redirect("/v2/src/manifests/v1"))
    proc = _cli("convert", "--source", fault.ref("src:v1"), "--target", f"oci:{target}:v1",
                "--cache-dir", str(tmp_path / "cc"), "-q")
    assert proc.returncode != 0
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before


def test_slow_manifest_ends_within_the_resolve_deadline(
    fault: FaultRegistry, tmp_path: Path
) -> None:
    """A registry that stalls must not outlive the daemon's idle exit (60 s): the whole
    resolve has one deadline (RESOLVE_DEADLINE, 45 s by default; 1 s here)."""
    fault.route("/v2/app/manifests/v1", slow(5, static(200, b"{}")))
    with pytest.raises(DeadlineExceededError) as info:
        resolve_remote_image(fault.ref("app:v1"), str(tmp_path / "cache"), deadline=30,
                             resolve_deadline=1)
    assert "\n" not in str(info.value)
    assert resolve.RESOLVE_DEADLINE < 60


def test_manifest_bounded_by_limit_and_index_entry() -> None:
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": [],
                           "pad": "x" * 1000}).encode()
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [{"mediaType": OCI_MANIFEST, "digest": digest_of(manifest),
                                       "size": 100,
                                       "platform": {"os": "linux", "architecture": "amd64"}}]})

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/manifests/endless"):
            return _endless_transport().handle_request(request)
        if request.url.path.endswith("/manifests/v1"):
            return httpx.Response(200, headers={"Content-Type": "application/vnd.oci.image."
                                                "index.v1+json"}, content=index.encode())
        return httpx.Response(200, headers={"Content-Type": OCI_MANIFEST}, content=manifest)

    with RegistryClient(plain_http=True, use_docker_config=False,
                        transport=httpx.MockTransport(handler)) as c:
        with pytest.raises(SizeLimitError, match=r"100 bytes \(its index entry\)"):
            c.get_manifest("reg.test/app:v1")
        with pytest.raises(SizeLimitError, match=r"4 MiB \(MAX_MANIFEST_SIZE\)"):
            c.get_manifest("reg.test/app:endless", deadline=60)


@pytest.mark.kernel
@pytest.mark.skipif(not fanotify_usable(), reason="needs root and pre-content fanotify")
def test_mount_ref_with_endless_bootstrap_layer_is_one_line(
    fault: FaultRegistry, tmp_path: Path
) -> None:
    """Through the CLI and the root daemon that resolves the image: the daemon's memory
    stays bounded and the user gets one line (it used to be an empty `error:`)."""
    layer = b"x" * 4096
    digest = fault.blob("app", layer, endless(b"\x1f\x8b" + b"\0" * 65534))
    fault.image("app", "v1", {"os": "linux"},
                [{"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": len(layer),
                  "annotations": NYDUS_BOOT}])
    mp = tmp_path / "mnt"
    mp.mkdir()
    cache = tmp_path / "cache"
    proc = run_cli("mount", fault.ref("app:v1"), str(mp), "--cache-dir", str(cache),
                   check=False)
    try:
        assert proc.returncode != 0
        errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("mode: ")]
        assert len(errors) == 1, proc.stderr
        assert "descriptor's size of 4096 bytes" in errors[0]
        assert not is_mountpoint(mp)
    finally:
        client = DaemonClient(cache)
        if client.alive():
            client.shutdown()


def test_digest_only_writer_creates_nothing(tmp_path: Path) -> None:
    """check REF --source builds the source tree with a writer that must not create its
    (placeholder) blob dir or temp files there (it filled /nonexistent before)."""
    import io
    import tarfile

    from erofs_nydus.builder.source import tree_from_tar
    from erofs_nydus.registry.remote_check import DigestOnlyWriter

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("a", b"x" * 70000), ("z", bytes(9000))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    buf.seek(0)
    target = tmp_path / "never"
    writer = DigestOnlyWriter(str(target), chunk_size=0x10000, compressor="none")
    tree_from_tar(io.BufferedReader(buf), writer, label="t")  # type: ignore[arg-type]
    writer.abort()
    assert not target.exists()
