"""Image references: ``host[:port]/repo[:tag][@sha256:...]`` and ``oci:DIR[:tag]``.

Pure parsing, no I/O.  Registry references follow Docker's conventions:

* the first path component is a registry host when it contains ``.`` or ``:``,
  is ``localhost``, or has upper-case letters; otherwise the registry is Docker Hub;
* Docker Hub is spelled ``docker.io`` (``index.docker.io`` is folded into it) and
  single-component repositories there live under ``library/``;
* without tag and digest the tag is ``latest``; with a digest the digest wins.

``oci:DIR[:ref]`` names an OCI image layout on disk (what skopeo and umoci call the
``oci`` transport).  A ``docker://`` prefix on a registry reference is accepted.
Anything malformed raises `UsageError` and nothing else.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from erofs_nydus.errors import UsageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
DEFAULT_TAG = "latest"

_DOMAIN_COMPONENT = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_DOMAIN_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{{1,5}})?$"
)
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_ANY_DIGEST_RE = re.compile(
    r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Za-z=_-]+$"
)
# A ref name inside an OCI layout (org.opencontainers.image.ref.name): be liberal,
# but no path separators, no whitespace or control characters.
_LAYOUT_REF_RE = re.compile(r"^[A-Za-z0-9_.:@+-][A-Za-z0-9_.:@+-]{0,254}$")
_MAX_NAME = 255


def is_sha256_digest(value: str) -> bool:
    """True for ``sha256:`` followed by 64 lower-case hex digits."""
    return bool(_DIGEST_RE.match(value))


def check_digest(value: str) -> str:
    """Return `value` if it is a sha256 digest, else raise UsageError."""
    if not isinstance(value, str) or not _DIGEST_RE.match(value):
        raise UsageError(f"invalid digest {value!r}: expected sha256:<64 lower-case hex digits>")
    return value


@dataclass(frozen=True, slots=True)
class ImageReference:
    """An image in a registry.  `registry` is ``host[:port]`` (``docker.io`` for the Hub)."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    kind = "registry"

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when known, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def api_host(self) -> str:
        """The host the registry API is served from (Docker Hub's differs from its name)."""
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def with_tag(self, tag: str) -> ImageReference:
        if not _TAG_RE.match(tag):
            raise UsageError(f"invalid tag {tag!r}")
        return ImageReference(self.registry, self.repository, tag, None)

    def with_digest(self, digest: str) -> ImageReference:
        return ImageReference(self.registry, self.repository, self.tag, check_digest(digest))

    def with_repository(self, repository: str) -> ImageReference:
        _check_repository(repository, repository)
        return ImageReference(self.registry, repository, self.tag, self.digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag is not None:
            s += f":{self.tag}"
        if self.digest is not None:
            s += f"@{self.digest}"
        return s


@dataclass(frozen=True, slots=True)
class LayoutReference:
    """An image in an OCI image layout directory; `tag` is its ref name (None: the only one)."""

    path: str
    tag: str | None = None
    digest: str | None = None

    kind = "oci"

    def with_tag(self, tag: str) -> LayoutReference:
        if not _LAYOUT_REF_RE.match(tag):
            raise UsageError(f"invalid OCI layout ref name {tag!r}")
        return LayoutReference(self.path, tag, None)

    def with_digest(self, digest: str) -> LayoutReference:
        return LayoutReference(self.path, self.tag, check_digest(digest))

    def __str__(self) -> str:
        s = f"oci:{self.path}"
        if self.tag is not None:
            s += f":{self.tag}"
        if self.digest is not None:
            s += f"@{self.digest}"
        return s


Reference = ImageReference | LayoutReference


def _looks_like_domain(component: str) -> bool:
    return (
        "." in component
        or ":" in component
        or component == "localhost"
        or component.startswith("[")
        or component.lower() != component
    )


def _check_repository(repository: str, text: str) -> None:
    if not repository:
        raise UsageError(f"invalid image reference {text!r}: empty repository name")
    for part in repository.split("/"):
        if not _PATH_COMPONENT_RE.match(part):
            raise UsageError(
                f"invalid image reference {text!r}: repository component {part!r} must be "
                "lower-case letters, digits and single separators (. _ __ -)"
            )


def parse_image_reference(text: str, *, default_tag: str | None = DEFAULT_TAG) -> ImageReference:
    """Parse a registry reference.  Raises UsageError for anything malformed."""
    if not isinstance(text, str):
        raise UsageError(f"image reference must be a string, not {type(text).__name__}")
    original = text
    if text.startswith("docker://"):
        text = text[len("docker://") :]
    if not text or text != text.strip() or any(c.isspace() or ord(c) < 0x20 for c in text):
        raise UsageError(f"invalid image reference {original!r}")
    if text.startswith("oci:"):
        raise UsageError(f"{original!r} is an OCI layout reference, not a registry reference")

    digest: str | None = None
    if "@" in text:
        text, _, digest = text.partition("@")
        if not _DIGEST_RE.match(digest):
            if _ANY_DIGEST_RE.match(digest) and not digest.startswith("sha256:"):
                raise UsageError(
                    f"invalid image reference {original!r}: only sha256 digests are supported"
                )
            raise UsageError(
                f"invalid image reference {original!r}: digest must be sha256:<64 hex digits>"
            )

    registry = DOCKER_HUB
    first, sep, rest = text.partition("/")
    if sep and _looks_like_domain(first):
        if not _DOMAIN_RE.match(first):
            raise UsageError(f"invalid image reference {original!r}: bad registry host {first!r}")
        port = first.rpartition(":")[2] if not first.endswith("]") and ":" in first else None
        if port is not None and not 0 < int(port) < 65536:
            raise UsageError(f"invalid image reference {original!r}: bad port {port}")
        registry = first
        text = rest

    tag: str | None = None
    last_slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > last_slash:
        text, tag = text[:colon], text[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise UsageError(f"invalid image reference {original!r}: bad tag {tag!r}")

    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    _check_repository(text, original)
    if registry == DOCKER_HUB and "/" not in text:
        text = f"library/{text}"
    if len(registry) + 1 + len(text) > _MAX_NAME:
        raise UsageError(f"invalid image reference {original!r}: name longer than {_MAX_NAME}")
    if tag is None and digest is None:
        tag = default_tag
    return ImageReference(registry, text, tag, digest)


def parse_layout_reference(text: str) -> LayoutReference:
    """Parse ``oci:DIR[:ref][@sha256:...]``.  A ``:`` part containing ``/`` belongs to DIR."""
    if not isinstance(text, str) or not text.startswith("oci:"):
        raise UsageError(f"invalid OCI layout reference {text!r}: expected oci:DIR[:tag]")
    body = text[len("oci:") :]
    if any(ord(c) < 0x20 for c in body):
        raise UsageError(f"invalid OCI layout reference {text!r}")
    digest: str | None = None
    at = body.rfind("@")
    if at >= 0 and _DIGEST_RE.match(body[at + 1 :]):
        body, digest = body[:at], body[at + 1 :]
    tag: str | None = None
    colon = body.rfind(":")
    if colon >= 0 and "/" not in body[colon + 1 :]:
        body, tag = body[:colon], body[colon + 1 :]
        if not _LAYOUT_REF_RE.match(tag):
            raise UsageError(f"invalid OCI layout reference {text!r}: bad ref name {tag!r}")
    if not body:
        raise UsageError(f"invalid OCI layout reference {text!r}: empty directory")
    return LayoutReference(body, tag, digest)


def parse_reference(text: str, *, default_tag: str | None = DEFAULT_TAG) -> Reference:
    """Parse either kind: ``oci:DIR[:tag]`` or a registry reference."""
    if isinstance(text, str) and text.startswith("oci:"):
        return parse_layout_reference(text)
    return parse_image_reference(text, default_tag=default_tag)


def as_image_reference(ref: Reference | str) -> ImageReference:
    """Accept a parsed or textual registry reference; refuse OCI layouts."""
    if isinstance(ref, ImageReference):
        return ref
    if isinstance(ref, LayoutReference):
        raise UsageError(f"{ref} is an OCI layout, not a registry image")
    return parse_image_reference(ref)


def looks_like_reference(text: str) -> bool:
    """True when `text` is no existing path and parses as an image reference."""
    if os.path.exists(text):
        return False
    try:
        ref = parse_reference(text)
    except UsageError:
        return False
    # "image.boot" parses as docker.io/library/image.boot: a mistyped file, not a REF
    return not (isinstance(ref, ImageReference) and text.endswith(".boot")
                and ref.registry not in text)
