"""OCI registries and image layouts: references, auth, client, daemon backend."""

from erofs_nydus.registry.auth import Credentials, load_docker_credentials, parse_www_authenticate
from erofs_nydus.registry.backend import RegistryBackend
from erofs_nydus.registry.client import (
    DeadlineExceededError,
    RegistryClient,
    TransientRegistryError,
)
from erofs_nydus.registry.layout import OCILayout
from erofs_nydus.registry.manifest import Descriptor, ManifestResult, Platform
from erofs_nydus.registry.reference import (
    ImageReference,
    LayoutReference,
    Reference,
    parse_image_reference,
    parse_layout_reference,
    parse_reference,
)
from erofs_nydus.registry.store import ImageStore, open_image_store

__all__ = [
    "Credentials",
    "DeadlineExceededError",
    "Descriptor",
    "ImageReference",
    "ImageStore",
    "LayoutReference",
    "ManifestResult",
    "OCILayout",
    "Platform",
    "Reference",
    "RegistryBackend",
    "RegistryClient",
    "TransientRegistryError",
    "load_docker_credentials",
    "open_image_store",
    "parse_image_reference",
    "parse_layout_reference",
    "parse_reference",
    "parse_www_authenticate",
]
