"""Pure parts of registry auth and manifests: challenges, config.json, scopes, platforms."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erofs_nydus.errors import AuthError, NotFoundError, UsageError
from erofs_nydus.registry.auth import (
    Challenge,
    Credentials,
    credentials_from_config,
    load_docker_credentials,
    merge_scopes,
    normalize_registry_key,
    parse_token_response,
    parse_www_authenticate,
    token_request,
)
from erofs_nydus.registry.manifest import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    build_image_manifest,
    build_index,
    detect_media_type,
    manifest_blobs,
    select_platform,
)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/ubuntu:pull"',
            [
                (
                    "bearer",
                    {
                        "realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:library/ubuntu:pull",
                    },
                )
            ],
        ),
        ('Basic realm="Registry Realm"', [("basic", {"realm": "Registry Realm"})]),
        ("BASIC Realm=x", [("basic", {"realm": "x"})]),
        (
            'Basic realm="a, b", Bearer realm=x, service=y',
            [("basic", {"realm": "a, b"}), ("bearer", {"realm": "x", "service": "y"})],
        ),
        ('Bearer realm="a\\"b"', [("bearer", {"realm": 'a"b'})]),
        (
            'Bearer realm="r",scope="repository:a:pull repository:b:pull,push"',
            [("bearer", {"realm": "r", "scope": "repository:a:pull repository:b:pull,push"})],
        ),
        ("", []),
        ("Basic", [("basic", {})]),
    ],
)
def test_parse_www_authenticate(header: str, expected: list[tuple[str, dict[str, str]]]) -> None:
    got = [(c.scheme, dict(c.params)) for c in parse_www_authenticate(header)]
    assert got == expected


def test_token68_challenge() -> None:
    (neg, basic) = parse_www_authenticate("Negotiate abc==, Basic realm=z")
    assert (neg.scheme, neg.token68) == ("negotiate", "abc==")
    assert basic.realm == "z"


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_www_authenticate_never_raises(header: str) -> None:
    for c in parse_www_authenticate(header):
        assert c.scheme == c.scheme.lower()


def _config(entries: dict[str, object]) -> dict[str, object]:
    return {"auths": entries}


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_credentials_from_config() -> None:
    cfg = _config(
        {
            "https://index.docker.io/v1/": {"auth": _b64("hub:secret")},
            "127.0.0.1:5000": {"auth": _b64("alice:pa:ss")},
            "http://quay.io/v2/": {"username": "u", "password": "p"},
            "ghcr.io": {"identitytoken": "refresh"},
        }
    )
    assert credentials_from_config(cfg, "docker.io") == Credentials("hub", "secret")
    assert credentials_from_config(cfg, "registry-1.docker.io") == Credentials("hub", "secret")
    assert credentials_from_config(cfg, "127.0.0.1:5000") == Credentials("alice", "pa:ss")
    assert credentials_from_config(cfg, "quay.io") == Credentials("u", "p")
    ghcr = credentials_from_config(cfg, "ghcr.io")
    assert ghcr is not None and ghcr.identity_token == "refresh"
    assert credentials_from_config(cfg, "127.0.0.1:5001") is None
    assert "secret" not in repr(credentials_from_config(cfg, "docker.io"))
    with pytest.raises(AuthError):
        credentials_from_config(_config({"h": {"auth": "!!!notbase64"}}), "h")
    with pytest.raises(AuthError):
        credentials_from_config(_config({"h": {"auth": _b64("nocolon")}}), "h")


def test_normalize_registry_key() -> None:
    assert normalize_registry_key("https://index.docker.io/v1/") == "docker.io"
    assert normalize_registry_key("http://h:5000/v2/") == "h:5000"
    assert normalize_registry_key("H:5000") == "h:5000"


def test_load_docker_credentials_from_env(tmp_path: Path) -> None:
    cfgdir = tmp_path / "dockercfg"
    cfgdir.mkdir()
    (cfgdir / "config.json").write_text(
        json.dumps(_config({"127.0.0.1:5000": {"auth": _b64("a:b")}}))
    )
    env = {"DOCKER_CONFIG": str(cfgdir), "HOME": str(tmp_path)}
    assert load_docker_credentials("127.0.0.1:5000", environ=env) == Credentials("a", "b")
    assert load_docker_credentials("other", environ=env) is None
    # ~/.docker/config.json when DOCKER_CONFIG is unset
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_text(
        json.dumps(_config({"h": {"auth": _b64("x:y")}}))
    )
    assert load_docker_credentials("h", environ={"HOME": str(tmp_path)}) == Credentials("x", "y")
    # explicit file or dir
    assert load_docker_credentials("h", config_path=tmp_path / ".docker") == Credentials("x", "y")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(AuthError, match="not valid JSON"):
        load_docker_credentials("h", config_path=tmp_path / "bad.json")
    assert load_docker_credentials("h", environ={"HOME": str(tmp_path / "nowhere")}) is None


def test_merge_scopes() -> None:
    assert merge_scopes(
        "repository:a:pull repository:b:pull", ["repository:a:push", "repository:c:pull"]
    ) == ["repository:a:pull,push", "repository:b:pull", "repository:c:pull"]
    assert merge_scopes(None, []) == []
    assert merge_scopes("registry:catalog:*") == ["registry:catalog:*"]


def test_token_request_and_response() -> None:
    ch = Challenge("bearer", {"realm": "https://auth.example/token", "service": "reg"})
    req = token_request(ch, ["repository:a:pull", "repository:b:pull,push"], None)
    assert req.method == "GET"
    assert req.url.params.get_list("scope") == ["repository:a:pull", "repository:b:pull,push"]
    assert req.url.params["service"] == "reg"
    assert "Authorization" not in req.headers
    req = token_request(ch, ["repository:a:pull"], Credentials("u", "p"))
    assert req.headers["Authorization"] == "Basic " + _b64("u:p")
    assert req.url.params["account"] == "u"
    req = token_request(ch, ["repository:a:pull"], Credentials("u", "", identity_token="rt"))
    assert req.method == "POST" and b"refresh_token=rt" in req.read()
    with pytest.raises(AuthError):
        token_request(Challenge("bearer", {}), [], None)
    tok = parse_token_response(b'{"access_token": "abc", "expires_in": 100}', now=0.0)
    assert (tok.token, tok.expires_at) == ("abc", 100.0)
    assert parse_token_response(b'{"token": "t"}', now=10.0).expires_at == 70.0
    for bad in (b"nope", b"[]", b"{}", b'{"token": ""}'):
        with pytest.raises(AuthError):
            parse_token_response(bad)


# -- manifests and platforms --------------------------------------------------------


def _index(entries: list[tuple[str, Platform | None]], media_type: str = OCI_INDEX) -> bytes:
    return build_index(
        [Descriptor(OCI_MANIFEST, "sha256:" + c * 64, 100, platform=p) for c, p in entries],
        media_type=media_type,
    )


def test_platform_parse_and_match() -> None:
    assert Platform.parse("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    assert Platform.parse("arm64") == Platform("linux", "arm64")
    assert Platform.parse("linux/x86_64") == Platform("linux", "amd64")
    assert Platform("linux", "arm64").matches(Platform("linux", "arm64", "v8"))
    assert Platform("linux", "arm64", "v8").matches(Platform("linux", "arm64"))
    assert not Platform("linux", "arm", "v7").matches(Platform("linux", "arm", "v6"))
    for bad in ("", "/", "linux/", "a/b/c/d"):
        with pytest.raises(UsageError):
            Platform.parse(bad)


def test_select_platform() -> None:
    data = _index(
        [
            ("a", Platform("linux", "amd64")),
            ("b", Platform("linux", "arm64", "v8")),
            ("c", Platform("unknown", "unknown")),
            ("d", Platform("linux", "arm", "v7")),
        ]
    )
    assert select_platform(data).digest == "sha256:" + "a" * 64
    assert select_platform(data, "linux/arm64").digest == "sha256:" + "b" * 64
    assert select_platform(data, "linux/arm/v7").digest == "sha256:" + "d" * 64
    with pytest.raises(
        NotFoundError, match=r"linux/s390x.*linux/amd64, linux/arm/v7, linux/arm64/v8"
    ):
        select_platform(data, "linux/s390x", name="img")
    docker_list = _index([("e", Platform("linux", "amd64"))], DOCKER_MANIFEST_LIST)
    assert select_platform(docker_list).digest == "sha256:" + "e" * 64


def test_build_manifest_deterministic() -> None:
    config = Descriptor.for_bytes(OCI_CONFIG, b"{}")
    layer = Descriptor(OCI_LAYER_GZIP, "sha256:" + "1" * 64, 5, {"k": "v"})
    m1 = build_image_manifest(config, [layer], annotations={"x": "y"})
    assert m1 == build_image_manifest(config, [layer], annotations={"x": "y"})
    assert detect_media_type(m1) == OCI_MANIFEST
    blobs = manifest_blobs(m1)
    assert blobs[0] == config and blobs[1].annotations == {"k": "v"}
    docker = build_image_manifest(config, [layer], media_type=DOCKER_MANIFEST)
    assert json.loads(docker)["mediaType"] == DOCKER_MANIFEST
    with pytest.raises(UsageError):
        build_image_manifest(config, [], media_type=DOCKER_MANIFEST, annotations={"a": "b"})
    assert detect_media_type(b"{}", "application/vnd.oci.image.index.v1+json; charset=x") == (
        OCI_INDEX
    )
