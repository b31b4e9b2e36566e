"""OCI registries and image layouts: references, auth, client, daemon backend,
convert (OCI image -> Nydus image), remote resolve (`resolve`: manifest + bootstrap for
`mount REF`) and remote check.

May import: `builder`, `rafs`, `layout` and the loose modules; never `daemon`,
`service` or the request sources.

Names are imported on first use (PEP 562): `erofs_nydus.registry.reference` alone is
cheap, while the client pulls in the HTTP stack (~0.3 s), which a `mount REF` command
that hands the download to its daemon never needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from erofs_nydus.registry.auth import (
        Credentials,
        load_docker_credentials,
        parse_www_authenticate,
    )
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

_WHERE = {
    "Credentials": "auth",
    "load_docker_credentials": "auth",
    "parse_www_authenticate": "auth",
    "RegistryBackend": "backend",
    "DeadlineExceededError": "client",
    "RegistryClient": "client",
    "TransientRegistryError": "client",
    "OCILayout": "layout",
    "Descriptor": "manifest",
    "ManifestResult": "manifest",
    "Platform": "manifest",
    "ImageReference": "reference",
    "LayoutReference": "reference",
    "Reference": "reference",
    "parse_image_reference": "reference",
    "parse_layout_reference": "reference",
    "parse_reference": "reference",
    "ImageStore": "store",
    "open_image_store": "store",
}

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


def __getattr__(name: str) -> Any:
    sub = _WHERE.get(name)
    if sub is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{sub}"), name)
    globals()[name] = value
    return value
