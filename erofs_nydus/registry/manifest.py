"""OCI / Docker manifest documents: media types, descriptors, platforms, building.

Pure: parses and builds JSON bytes, does no I/O.  Built documents are serialized
deterministically (sorted keys, no whitespace) so equal inputs give equal digests.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from erofs_nydus.errors import NotFoundError, RegistryError, UsageError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
NYDUS_CONFIG = "application/vnd.nydus.image.config.v1+json"
NYDUS_ARTIFACT = "application/vnd.nydus.image.manifest.v1+json"

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_NYDUS_BLOB = "containerd.io/snapshot/nydus-blob"
ANNOTATION_NYDUS_BOOTSTRAP = "containerd.io/snapshot/nydus-bootstrap"
ANNOTATION_NYDUS_FS_VERSION = "containerd.io/snapshot/nydus-fs-version"

IMAGE_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = IMAGE_MANIFEST_TYPES | INDEX_TYPES
ACCEPT_MANIFESTS = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])


_SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def is_sha256_digest(value: object) -> bool:
    """``sha256:`` + 64 lower-case hex digits, nothing else (no other algorithm)."""
    return isinstance(value, str) and _SHA256_DIGEST.fullmatch(value) is not None


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class ManifestResult(NamedTuple):
    """What get_manifest returns: the media type, the exact bytes and their digest."""

    media_type: str
    data: bytes
    digest: str

    def json(self) -> dict[str, Any]:
        return parse_json_document(self.data)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES


_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm"}


@dataclass(frozen=True, slots=True)
class Platform:
    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    @classmethod
    def parse(cls, text: str | Platform) -> Platform:
        """``os/arch[/variant]`` (``linux/arm64/v8``); ``arch`` alone means linux/arch."""
        if isinstance(text, Platform):
            return text
        parts = text.strip().split("/") if isinstance(text, str) else []
        if len(parts) == 1 and parts[0]:
            parts = ["linux", parts[0]]
        if not 2 <= len(parts) <= 3 or not all(parts):
            raise UsageError(f"invalid platform {text!r}: expected os/arch[/variant]")
        arch = _ARCH_ALIASES.get(parts[1].lower(), parts[1].lower())
        return cls(parts[0].lower(), arch, parts[2].lower() if len(parts) == 3 else None)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Platform:
        arch = str(obj.get("architecture", ""))
        variant = obj.get("variant")
        return cls(
            str(obj.get("os", "")),
            _ARCH_ALIASES.get(arch, arch),
            str(variant) if variant else None,
        )

    def to_json(self) -> dict[str, str]:
        d = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            d["variant"] = self.variant
        return d

    def matches(self, other: Platform) -> bool:
        """Does the image platform `other` satisfy this requested platform?"""
        if self.os != other.os or self.architecture != other.architecture:
            return False
        if self.variant is None:
            return True
        mine, theirs = self.variant, other.variant
        if self.architecture == "arm64":  # arm64 has one variant in practice
            mine, theirs = mine or "v8", theirs or "v8"
        return mine == theirs

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


DEFAULT_PLATFORM = Platform("linux", "amd64")


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    artifact_type: str | None = None
    urls: Sequence[str] = ()

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform is not None:
            d["platform"] = self.platform.to_json()
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        if self.urls:
            d["urls"] = list(self.urls)
        return d

    @classmethod
    def from_json(cls, obj: Any) -> Descriptor:
        if not isinstance(obj, dict):
            raise RegistryError(f"malformed descriptor: {obj!r:.200}")
        try:
            media_type = str(obj.get("mediaType", ""))
            digest = obj["digest"]
            size = obj["size"]
        except KeyError as exc:
            raise RegistryError(f"descriptor lacks {exc.args[0]!r}: {obj!r:.200}") from None
        if not isinstance(digest, str) or not isinstance(size, int) or size < 0:
            raise RegistryError(f"malformed descriptor: {obj!r:.200}")
        if not is_sha256_digest(digest):  # before it can become a file or URL path
            raise RegistryError(
                f"malformed descriptor digest {digest!r:.100}: expected sha256:<64 lower-case hex>"
            )
        platform = obj.get("platform")
        annotations = obj.get("annotations") or {}
        return cls(
            media_type,
            digest,
            size,
            {str(k): str(v) for k, v in annotations.items()}
            if isinstance(annotations, dict)
            else {},
            Platform.from_json(platform) if isinstance(platform, dict) else None,
            obj.get("artifactType"),
            tuple(obj.get("urls") or ()),
        )

    @classmethod
    def for_bytes(
        cls, media_type: str, data: bytes, annotations: Mapping[str, str] | None = None
    ) -> Descriptor:
        return cls(media_type, sha256_digest(data), len(data), dict(annotations or {}))


def parse_json_document(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryError(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RegistryError("manifest is not a JSON object")
    return obj


def detect_media_type(data: bytes, header: str | None = None) -> str:
    """The media type from a Content-Type header, falling back to the document's field."""
    if header:
        mt = header.split(";", 1)[0].strip().lower()
        if mt in MANIFEST_TYPES:
            return mt
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        obj = None
    if isinstance(obj, dict):
        field_mt = obj.get("mediaType")
        if isinstance(field_mt, str) and field_mt:
            return field_mt
        if "manifests" in obj:
            return OCI_INDEX
        if "layers" in obj:
            return OCI_MANIFEST
    if header:
        return header.split(";", 1)[0].strip()
    raise RegistryError("cannot determine the manifest's media type")


def index_entries(data: bytes) -> list[Descriptor]:
    manifests = parse_json_document(data).get("manifests")
    if not isinstance(manifests, list):
        raise RegistryError("image index has no 'manifests' list")
    return [Descriptor.from_json(m) for m in manifests]


def select_platform(
    data: bytes, platform: str | Platform | None = None, *, name: str = "image"
) -> Descriptor:
    """Choose the entry of an index (OCI index or Docker manifest list) for `platform`.

    Raises NotFoundError listing the platforms the index does offer.
    """
    want = Platform.parse(platform) if platform is not None else DEFAULT_PLATFORM
    entries = index_entries(data)
    # Attestation manifests hide behind platform unknown/unknown: never offer them.
    candidates = [e for e in entries if e.platform is not None and e.platform.os != "unknown"]
    for e in candidates:
        if e.platform is not None and want.matches(e.platform):
            return e
    available = sorted({str(e.platform) for e in candidates if e.platform is not None})
    raise NotFoundError(
        f"{name}: no manifest for platform {want} in the index; available: "
        + (", ".join(available) if available else "none (entries carry no platform)")
    )


def _dump(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def build_image_manifest(
    config: Descriptor,
    layers: Iterable[Descriptor],
    *,
    media_type: str = OCI_MANIFEST,
    annotations: Mapping[str, str] | None = None,
    artifact_type: str | None = None,
    subject: Descriptor | None = None,
) -> bytes:
    """Serialize an image manifest (OCI, or Docker schema 2 with `media_type=DOCKER_MANIFEST`)."""
    if media_type not in IMAGE_MANIFEST_TYPES:
        raise UsageError(f"not an image manifest media type: {media_type}")
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    if annotations:
        if media_type == DOCKER_MANIFEST:
            raise UsageError("Docker schema 2 manifests carry no annotations")
        doc["annotations"] = dict(annotations)
    if artifact_type:
        doc["artifactType"] = artifact_type
    if subject is not None:
        doc["subject"] = subject.to_json()
    return _dump(doc)


def build_index(
    manifests: Iterable[Descriptor],
    *,
    media_type: str = OCI_INDEX,
    annotations: Mapping[str, str] | None = None,
) -> bytes:
    """Serialize an OCI image index (or a Docker manifest list)."""
    if media_type not in INDEX_TYPES:
        raise UsageError(f"not an index media type: {media_type}")
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [m.to_json() for m in manifests],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return _dump(doc)


def manifest_blobs(data: bytes) -> list[Descriptor]:
    """Config and layer descriptors of an image manifest, config first."""
    doc = parse_json_document(data)
    out = [Descriptor.from_json(doc.get("config"))]
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise RegistryError("image manifest has no 'layers' list")
    out.extend(Descriptor.from_json(layer) for layer in layers)
    return out
