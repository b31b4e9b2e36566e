"""RegistryClient against the real docker-registry (distribution 2.8) on 127.0.0.1."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from registry_fixture import (
    HTPASSWD_USER,
    TOKEN_USER,
    OciImage,
    RegistryServer,
    SampleImage,
    run,
    skopeo_copy,
    skopeo_inspect,
)

from erofs_nydus.errors import AuthError, DigestMismatchError, NotFoundError, RegistryError
from erofs_nydus.registry import Credentials, OCILayout, RegistryClient, parse_image_reference
from erofs_nydus.registry.manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    build_image_manifest,
    build_index,
    manifest_blobs,
    sha256_digest,
)

pytestmark = pytest.mark.registry


class RecordingTransport(httpx.HTTPTransport):
    """The real HTTP transport, remembering what was sent."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return super().handle_request(request)

    def calls(self) -> list[tuple[str, str]]:
        return [
            (r.method, r.url.path + ("?" + r.url.query.decode() if r.url.query else ""))
            for r in self.requests
        ]


@pytest.fixture
def client() -> Iterator[RegistryClient]:
    with RegistryClient(plain_http=True, use_docker_config=False, backoff=0.01) as c:
        yield c


def _random(n: int, seed: int = 0) -> bytes:
    out = bytearray()
    block = hashlib.sha256(str(seed).encode()).digest()
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:n])


def test_blob_source_kinds(tmp_path: Path) -> None:
    from erofs_nydus.registry.client import BlobSource

    data = _random(3000, seed=7)
    (tmp_path / "b").write_bytes(data)
    mem, path = BlobSource(data), BlobSource(str(tmp_path / "b"))
    with open(tmp_path / "b", "rb") as f:
        fsrc = BlobSource(f)
        assert not fsrc.in_memory and fsrc.size == 3000
    assert mem.in_memory and not path.in_memory
    assert mem.digest() == path.digest() == sha256_digest(data)


# -- pulling ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "media_type"), [("oci", OCI_MANIFEST), ("v2s2", DOCKER_MANIFEST)]
)
def test_pull_skopeo_pushed_manifest(
    client: RegistryClient, sample_image: SampleImage, which: str, media_type: str
) -> None:
    ref = sample_image.oci_ref if which == "oci" else sample_image.docker_ref
    result = client.get_manifest(ref)
    assert result.media_type == media_type
    assert result.digest == sha256_digest(result.data)
    assert result.digest == skopeo_inspect(f"docker://{ref}")["Digest"]
    assert json.loads(result.data) == skopeo_inspect(f"docker://{ref}", raw=True)
    # by digest too, and the tag resolves to it
    by_digest = parse_image_reference(ref).with_digest(result.digest)
    assert client.get_manifest(by_digest).data == result.data
    assert client.manifest_digest(ref) == result.digest
    # the layers are the umoci layout's, byte for byte
    layers = manifest_blobs(result.data)[1:]
    layout = OCILayout(sample_image.image.layout)
    for layer in layers:
        data = client.get_blob(ref, layer.digest)
        assert data == layout.get_blob(None, layer.digest)
        assert len(data) == layer.size


def _push_arch_images(
    server: RegistryServer,
    oci_image_factory: Callable[..., OciImage],
    push: Callable[..., None],
    repo: str,
    fmt: str,
    client: RegistryClient,
) -> dict[str, Descriptor]:
    out = {}
    for arch in ("amd64", "arm64"):
        image = oci_image_factory([{f"etc/{arch}": arch.encode()}], tag=arch, architecture=arch)
        push(image, server, f"{repo}:{arch}", fmt=fmt)
        m = client.get_manifest(server.ref(f"{repo}:{arch}"))
        out[arch] = Descriptor(
            m.media_type, m.digest, len(m.data), platform=Platform("linux", arch)
        )
    return out


@pytest.mark.parametrize(
    ("fmt", "index_type"), [("oci", OCI_INDEX), ("v2s2", DOCKER_MANIFEST_LIST)]
)
def test_index_platform_selection(
    client: RegistryClient,
    registry: RegistryServer,
    oci_image_factory: Callable[..., OciImage],
    push_with_skopeo: Callable[..., None],
    fmt: str,
    index_type: str,
) -> None:
    repo = f"multi/{fmt}"
    arch = _push_arch_images(registry, oci_image_factory, push_with_skopeo, repo, fmt, client)
    index = build_index([arch["amd64"], arch["arm64"]], media_type=index_type)
    ref = registry.ref(f"{repo}:all")
    assert client.put_manifest(ref, index_type, index) == sha256_digest(index)

    raw = client.get_manifest(ref, resolve=False)
    assert (raw.media_type, raw.data) == (index_type, index)
    assert client.get_manifest(ref).digest == arch["amd64"].digest  # default linux/amd64
    assert client.get_manifest(ref, "linux/arm64").digest == arch["arm64"].digest
    assert client.get_manifest(ref, Platform("linux", "arm64", "v8")).digest == arch["arm64"].digest
    with pytest.raises(NotFoundError, match=r"linux/s390x.*available: linux/amd64, linux/arm64"):
        client.get_manifest(ref, "linux/s390x")
    # skopeo reads the index we pushed and picks the same manifests
    assert skopeo_inspect(f"docker://{ref}", raw=True)["manifests"][1]["digest"] == (
        arch["arm64"].digest
    )
    skopeo = ["skopeo", "--insecure-policy", "--override-arch", "arm64", "inspect"]
    out = run([*skopeo, "--tls-verify=false", f"docker://{ref}"]).stdout
    info = json.loads(out)
    assert info["Architecture"] == "arm64"
    assert info["Layers"] == [
        d.digest for d in manifest_blobs(client.get_manifest(ref, "linux/arm64").data)[1:]
    ]


def test_unknown_tag_repo_and_blob(client: RegistryClient, sample_image: SampleImage) -> None:
    server = sample_image.registry
    with pytest.raises(NotFoundError, match=r"sample/oci:nope"):
        client.get_manifest(server.ref("sample/oci:nope"))
    with pytest.raises(NotFoundError, match=r"no/such/repo:latest"):
        client.get_manifest(server.ref("no/such/repo"))
    missing = "sha256:" + "0" * 64
    with pytest.raises(NotFoundError, match=missing):
        client.get_blob(sample_image.oci_ref, missing)
    with pytest.raises(NotFoundError):
        client.read_blob_range(sample_image.oci_ref, missing, 0, 10)
    assert not client.blob_exists(sample_image.oci_ref, missing)
    assert client.list_tags(sample_image.oci_ref) == ["v1"]


# -- blobs --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_blob(registry: RegistryServer) -> tuple[str, bytes, str]:
    data = _random(3 * 1024 * 1024 + 123)
    ref = registry.ref("blobs/big")
    with RegistryClient(plain_http=True, use_docker_config=False) as c:
        digest = c.push_blob(ref, data)
    return ref, data, digest


def test_blob_get_and_stream_verified(
    client: RegistryClient, big_blob: tuple[str, bytes, str]
) -> None:
    ref, data, digest = big_blob
    assert client.blob_exists(ref, digest)
    assert client.blob_size(ref, digest) == len(data)
    assert client.get_blob(ref, digest) == data
    chunks = list(client.open_blob_stream(ref, digest, chunk_size=1 << 20))
    assert [len(c) for c in chunks] == [1 << 20] * 3 + [123]
    assert b"".join(chunks) == data


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 1),
        (0, 4096),
        (1, 4095),
        (1 << 20, 1 << 20),
        (3 * 1024 * 1024, 123),
        (3 * 1024 * 1024 + 122, 1),
    ],
)
def test_range_reads(
    client: RegistryClient, big_blob: tuple[str, bytes, str], offset: int, length: int
) -> None:
    ref, data, digest = big_blob
    assert client.read_blob_range(ref, digest, offset, length) == data[offset : offset + length]


def test_range_past_end(client: RegistryClient, big_blob: tuple[str, bytes, str]) -> None:
    ref, data, digest = big_blob
    assert client.read_blob_range(ref, digest, 5, 0) == b""
    with pytest.raises(RegistryError):
        client.read_blob_range(ref, digest, len(data) - 10, 20)
    with pytest.raises(RegistryError):
        client.read_blob_range(ref, digest, len(data) + 10, 20)


def test_push_monolithic_chunked_and_mount(registry: RegistryServer, tmp_path: Path) -> None:
    transport = RecordingTransport()
    c = RegistryClient(plain_http=True, use_docker_config=False, transport=transport)
    data = _random(700_000, seed=1)
    digest = sha256_digest(data)

    # monolithic: POST then one PUT ?digest= carrying the bytes
    assert c.push_blob(registry.ref("push/mono"), data) == digest
    methods = [m for m, _ in transport.calls()]
    assert methods == ["HEAD", "POST", "PUT"]
    assert f"digest={digest.replace(':', '%3A')}" in transport.calls()[-1][1]
    assert c.get_blob(registry.ref("push/mono"), digest) == data

    # chunked, from a file: PATCH with Content-Range, then an empty PUT
    transport.requests.clear()
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert c.push_blob(registry.ref("push/chunked"), path, digest, chunk_size=256 * 1024) == digest
    patches = [r for r in transport.requests if r.method == "PATCH"]
    assert [r.headers["Content-Range"] for r in patches] == [
        "0-262143",
        "262144-524287",
        "524288-699999",
    ]
    assert transport.requests[-1].method == "PUT"
    assert transport.requests[-1].headers["Content-Length"] == "0"
    assert c.get_blob(registry.ref("push/chunked"), digest) == data

    # already there: only the HEAD
    transport.requests.clear()
    c.push_blob(registry.ref("push/chunked"), data, digest)
    assert [m for m, _ in transport.calls()] == ["HEAD"]

    # cross-repository mount: one POST ?mount=&from= answered 201, no data sent
    transport.requests.clear()
    assert (
        c.push_blob(registry.ref("push/mounted"), data, digest, mount_from=["push/mono"]) == digest
    )
    calls = transport.calls()
    assert [m for m, _ in calls] == ["HEAD", "POST"]
    assert "mount=" in calls[1][1] and "from=push%2Fmono" in calls[1][1]
    assert c.blob_exists(registry.ref("push/mounted"), digest)

    # mount from a repo that lacks it: the registry opens a normal upload instead
    other = _random(1000, seed=2)
    transport.requests.clear()
    c.push_blob(registry.ref("push/mounted"), other, mount_from=["push/empty"])
    assert [m for m, _ in transport.calls()] == ["HEAD", "POST", "PUT"]
    assert c.get_blob(registry.ref("push/mounted"), sha256_digest(other)) == other

    with pytest.raises(DigestMismatchError):
        c.push_blob(registry.ref("push/bad"), b"abc", "sha256:" + "1" * 64)
    with pytest.raises(DigestMismatchError):  # the registry's own check, for file sources
        c.push_blob(registry.ref("push/bad"), path, "sha256:" + "1" * 64)
    c.close()


def test_push_image_then_skopeo_reads_it(
    client: RegistryClient, sample_image: SampleImage, tmp_path: Path
) -> None:
    """Copy the sample image blob by blob with our client, then let skopeo and umoci read it."""
    server = sample_image.registry
    src = OCILayout(sample_image.image.layout)
    manifest = src.get_manifest(sample_image.image.tag)
    blobs = manifest_blobs(manifest.data)
    dst = server.ref("pushed/image:v1")
    for desc in blobs:
        with open(src.blob_path(desc.digest), "rb") as f:
            client.push_blob(dst, f, desc.digest)
    # rebuild the manifest ourselves (same config and layers, plus an annotation)
    rebuilt = build_image_manifest(
        Descriptor(OCI_CONFIG, blobs[0].digest, blobs[0].size),
        blobs[1:],
        annotations={"org.example.pushed-by": "erofs-nydus"},
    )
    digest = client.put_manifest(dst, OCI_MANIFEST, rebuilt)
    info = skopeo_inspect(f"docker://{dst}")
    assert info["Digest"] == digest
    assert info["Layers"] == [b.digest for b in blobs[1:]]
    assert skopeo_inspect(f"docker://{dst}", raw=True)["annotations"] == {
        "org.example.pushed-by": "erofs-nydus"
    }
    out = tmp_path / "copied"
    skopeo_copy(f"docker://{dst}", f"oci:{out}:v1")
    bundle = tmp_path / "bundle"
    run(["umoci", "unpack", "--image", f"{out}:v1", str(bundle)])
    assert (bundle / "rootfs/etc/hello.txt").read_bytes() == b"hello again from layer 1\n"
    assert not (bundle / "rootfs/usr/share/data.bin").exists()


def test_put_manifest_with_missing_blob_is_refused(
    client: RegistryClient, registry: RegistryServer
) -> None:
    config = Descriptor.for_bytes(OCI_CONFIG, b"{}")
    bad = build_image_manifest(config, [])
    with pytest.raises(RegistryError, match=r"HTTP 400.*MANIFEST_BLOB_UNKNOWN|blob unknown"):
        client.put_manifest(registry.ref("refused/x:v1"), OCI_MANIFEST, bad)
    by_digest = parse_image_reference(registry.ref("refused/x")).with_digest("sha256:" + "2" * 64)
    with pytest.raises(DigestMismatchError):
        client.put_manifest(by_digest, OCI_MANIFEST, bad)


# -- auth ---------------------------------------------------------------------------


def test_basic_auth(registry_htpasswd: RegistryServer, tmp_path: Path) -> None:
    ref = registry_htpasswd.ref("secret/blob")
    good = RegistryClient(plain_http=True, credentials=Credentials(*HTPASSWD_USER))
    digest = good.push_blob(ref, b"basic auth data")
    assert good.get_blob(ref, digest) == b"basic auth data"

    wrong = RegistryClient(plain_http=True, credentials=Credentials(HTPASSWD_USER[0], "wrong"))
    with pytest.raises(AuthError, match="alice"):
        wrong.get_blob(ref, digest)
    anonymous = RegistryClient(plain_http=True, use_docker_config=False)
    with pytest.raises(AuthError, match="requires credentials"):
        anonymous.blob_exists(ref, digest)

    # credentials from a docker config.json ($DOCKER_CONFIG layout)
    cfg = tmp_path / "docker"
    cfg.mkdir()
    auth = base64.b64encode(":".join(HTPASSWD_USER).encode()).decode()
    (cfg / "config.json").write_text(
        json.dumps({"auths": {f"http://{registry_htpasswd.host}": {"auth": auth}}})
    )
    from_config = RegistryClient(plain_http=True, docker_config=cfg)
    assert from_config.get_blob(ref, digest) == b"basic auth data"

    # skopeo can read what we pushed with the same credentials
    skopeo_creds = ":".join(HTPASSWD_USER)
    out = subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "inspect",
            "--tls-verify=false",
            "--creds",
            skopeo_creds,
            f"docker://{registry_htpasswd.ref('secret/none:v1')}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and "unknown" in out.stderr.lower()  # authenticated, tag missing
    for c in (good, wrong, anonymous, from_config):
        c.close()


def test_token_auth_flow(registry_token: RegistryServer) -> None:
    tokens = registry_token.token_server
    assert tokens is not None
    tokens.requests.clear()
    ref = registry_token.ref("tok/repo:v1")
    c = RegistryClient(plain_http=True, credentials=Credentials(*TOKEN_USER))
    config = c.push_blob(
        ref, b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    )
    manifest = build_image_manifest(Descriptor(OCI_CONFIG, config, 79), [])
    assert c.put_manifest(ref, OCI_MANIFEST, manifest) == sha256_digest(manifest)
    assert c.get_manifest(ref).data == manifest
    # mount into a second repo: the token must cover both repositories
    assert c.mount_blob(registry_token.ref("tok/other"), config, "tok/repo")
    assert not c.mount_blob(registry_token.ref("tok/other"), "sha256:" + "3" * 64, "tok/repo")
    scopes = [r["scopes"] for r in tokens.requests if "scopes" in r]
    assert ["repository:tok/repo:pull"] in scopes
    assert ["repository:tok/repo:pull,push"] in scopes
    assert ["repository:tok/other:pull,push", "repository:tok/repo:pull"] in scopes
    assert all(r["user"] == TOKEN_USER[0] for r in tokens.requests)
    assert all(r["service"] == ["erofs-nydus-test-registry"] for r in tokens.requests)
    assert c.blob_exists(registry_token.ref("tok/other"), config)
    c.close()

    wrong = RegistryClient(plain_http=True, credentials=Credentials(TOKEN_USER[0], "nope"))
    with pytest.raises(AuthError, match=r"token server .* refused user 'bob'"):
        wrong.get_manifest(ref)
    anonymous = RegistryClient(plain_http=True, use_docker_config=False)
    with pytest.raises(AuthError, match="refused"):  # the token grants no access
        anonymous.get_manifest(ref)
    wrong.close()
    anonymous.close()


def test_docker_config_env_is_default(
    registry_htpasswd: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    auth = base64.b64encode(":".join(HTPASSWD_USER).encode()).decode()
    (tmp_path / "config.json").write_text(
        json.dumps({"auths": {registry_htpasswd.host: {"auth": auth}}})
    )
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    with RegistryClient(plain_http=True) as c:
        assert c.push_blob(registry_htpasswd.ref("envcfg/x"), b"env") == sha256_digest(b"env")


def test_layers_are_same_size_in_registry_storage(sample_image: SampleImage) -> None:
    """The registry keeps what skopeo pushed: a sanity check of the fixture itself."""
    blobs = sample_image.registry.storage / "docker/registry/v2/blobs/sha256"
    assert blobs.is_dir()
    names = {p.name for p in blobs.rglob("*") if p.is_dir() and len(p.name) == 64}
    for digest in sample_image.image.layer_digests():
        assert digest.split(":")[1] in names
    assert os.path.exists(sample_image.registry.log_path)


def test_registry_restart_is_retried(registry_factory: Callable[..., RegistryServer]) -> None:
    """A registry that goes away and comes back within the retry budget: no error."""
    server = registry_factory()
    opts = {"plain_http": True, "use_docker_config": False, "backoff": 0.05, "max_backoff": 0.4}
    with RegistryClient(retries=1, **opts) as impatient:  # type: ignore[arg-type]
        digest = impatient.push_blob(server.ref("restart/x"), b"survives restarts")
        server.stop()
        with pytest.raises(RegistryError, match="ConnectError"):
            impatient.get_blob(server.ref("restart/x"), digest)
    with RegistryClient(retries=20, **opts) as patient:  # type: ignore[arg-type]
        timer = threading.Timer(0.3, lambda: server.start(server.port))
        timer.start()
        try:
            data = patient.get_blob(server.ref("restart/x"), digest, deadline=30)
        finally:
            timer.join()
        assert data == b"survives restarts"


def test_clients_share_one_tls_context_until_the_ca_file_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a CA bundle costs ~20 ms per client: each `mount REF` a resident daemon
    resolved paid it.  One context per CA source, remade when the source changes."""
    import certifi

    from erofs_nydus.registry.client import shared_tls_context

    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(Path(certifi.where()).read_bytes())
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    first = shared_tls_context(True, True)
    assert shared_tls_context(True, True) is first
    with RegistryClient(plain_http=True) as a, RegistryClient(plain_http=True) as b:
        assert a._http._transport._pool._ssl_context is first  # type: ignore[attr-defined]
        assert b._http._transport._pool._ssl_context is first  # type: ignore[attr-defined]
    st = bundle.stat()
    os.utime(bundle, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert shared_tls_context(True, True) is not first  # a rotated CA file is read again
    assert shared_tls_context(False, True) is not shared_tls_context(True, True)
