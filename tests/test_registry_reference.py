"""Image reference parsing: table tests and properties (pure, no registry)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erofs_nydus.errors import UsageError
from erofs_nydus.registry.reference import (
    ImageReference,
    LayoutReference,
    as_image_reference,
    parse_image_reference,
    parse_layout_reference,
    parse_reference,
)

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04", None),
        ("library/ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("docker.io/ubuntu", "docker.io", "library/ubuntu", "latest", None),
        ("index.docker.io/library/ubuntu:1", "docker.io", "library/ubuntu", "1", None),
        ("registry-1.docker.io/foo/bar", "docker.io", "foo/bar", "latest", None),
        ("docker://alpine:3.20", "docker.io", "library/alpine", "3.20", None),
        ("user/repo:tag", "docker.io", "user/repo", "tag", None),
        ("localhost/foo", "localhost", "foo", "latest", None),
        ("localhost:5000/foo/bar:v1", "localhost:5000", "foo/bar", "v1", None),
        (f"127.0.0.1:5000/a/b@{D}", "127.0.0.1:5000", "a/b", None, D),
        (f"quay.io/a/b:t@{D}", "quay.io", "a/b", "t", D),
        ("[::1]:5000/foo:bar", "[::1]:5000", "foo", "bar", None),
        ("Registry/foo", "Registry", "foo", "latest", None),
        (
            "ghcr.io/org/sub/img_x.y-z__w:V_1.0-rc",
            "ghcr.io",
            "org/sub/img_x.y-z__w",
            "V_1.0-rc",
            None,
        ),
        ("example.com:443/x", "example.com:443", "x", "latest", None),
    ],
)
def test_parse_image_reference(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    ref = parse_reference(text)
    assert isinstance(ref, ImageReference)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (
        registry,
        repository,
        tag,
        digest,
    )
    assert parse_reference(str(ref)) == ref


def test_reference_properties() -> None:
    hub = parse_image_reference("alpine")
    assert hub.api_host == "registry-1.docker.io"
    assert hub.reference == "latest"
    assert str(hub) == "docker.io/library/alpine:latest"
    local = parse_image_reference(f"127.0.0.1:5000/a:t@{D}")
    assert local.api_host == "127.0.0.1:5000"
    assert local.reference == D  # the digest wins
    assert local.with_tag("x") == ImageReference("127.0.0.1:5000", "a", "x", None)
    assert parse_image_reference("a", default_tag=None).tag is None
    assert as_image_reference("alpine") == hub
    with pytest.raises(UsageError):
        as_image_reference(LayoutReference("/x"))


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ubuntu",
        "ubuntu ",
        "UPPER",
        "a//b",
        "a/",
        "/a",
        ":tag",
        "repo:",
        "repo@sha256:abc",
        "repo@md5:" + "a" * 32,
        "repo@sha256:" + "AB" * 32,
        "repo:bad tag",
        "repo:-x",
        "repo:" + "t" * 129,
        "-abc",
        "a--",
        "host:99999/x",
        "host:0/x",
        "exa_mple.com/x",
        "a b",
        "a\nb",
        "docker://",
        "localhost:5000/",
        "a/" * 200 + "b",
    ],
)
def test_invalid_image_reference(text: str) -> None:
    with pytest.raises(UsageError):
        parse_image_reference(text)


@pytest.mark.parametrize(
    ("text", "path", "tag", "digest"),
    [
        ("oci:/tmp/x", "/tmp/x", None, None),
        ("oci:/tmp/x:v1", "/tmp/x", "v1", None),
        ("oci:rel/dir:tag", "rel/dir", "tag", None),
        ("oci:/a:b/c", "/a:b/c", None, None),
        ("oci:/a:b/c:d", "/a:b/c", "d", None),
        (f"oci:/tmp/x@{D}", "/tmp/x", None, D),
        ("oci:/tmp/x:registry.io/a", "/tmp/x:registry.io/a", None, None),
    ],
)
def test_parse_layout_reference(text: str, path: str, tag: str | None, digest: str | None) -> None:
    ref = parse_reference(text)
    assert isinstance(ref, LayoutReference)
    assert (ref.path, ref.tag, ref.digest) == (path, tag, digest)
    assert parse_layout_reference(str(ref)) == ref


@pytest.mark.parametrize("text", ["oci:", "oci::tag", "oci:/x:bad tag", "oci:/x:\x00", "docker:/x"])
def test_invalid_layout_reference(text: str) -> None:
    with pytest.raises(UsageError):
        parse_layout_reference(text)


def test_layout_is_not_a_registry_reference() -> None:
    with pytest.raises(UsageError, match="OCI layout"):
        parse_image_reference("oci:/tmp/x:v1")


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_garbage_raises_usage_error_only(text: str) -> None:
    try:
        ref = parse_reference(text)
    except UsageError:
        return
    assert parse_reference(str(ref)) == ref


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcAB09._-:/@[]", max_size=40))
def test_near_miss_garbage_raises_usage_error_only(text: str) -> None:
    try:
        ref = parse_reference(text)
    except UsageError:
        return
    assert parse_reference(str(ref)) == ref


_alnum = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
_component = st.builds(
    lambda a, sep, b: a + sep + b if sep is not None else a,
    _alnum,
    st.sampled_from([None, ".", "_", "__", "-", "--"]),
    _alnum,
)
_host = st.sampled_from(["quay.io", "localhost:5000", "127.0.0.1:40000", "reg.example.com"])
_tag = st.builds(
    lambda a, b: a + b,
    st.sampled_from("aZ9_"),
    st.text(alphabet="abcXYZ019_.-", max_size=20),
)


@settings(max_examples=120, deadline=None)
@given(_host, st.lists(_component, min_size=1, max_size=3), _tag)
def test_valid_references_keep_their_parts(host: str, parts: list[str], tag: str) -> None:
    repository = "/".join(parts)
    ref = parse_image_reference(f"{host}/{repository}:{tag}")
    assert (ref.registry, ref.repository, ref.tag) == (host, repository, tag)
