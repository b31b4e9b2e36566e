"""`ImageStore`: what the converter needs from an image source or destination.

Both `RegistryClient` (``host/repo:tag``) and `OCILayout` (``oci:DIR:tag``)
implement it, so a conversion reads and writes either alike::

    src_store, src = open_image_store("docker.io/library/alpine:3.20")
    dst_store, dst = open_image_store("oci:/tmp/out:nydus")
    m = src_store.get_manifest(src, "linux/amd64")
    for piece in src_store.open_blob_stream(src, layer_digest): ...
    dst_store.push_blob(dst, blob_path, digest)
    dst_store.put_manifest(dst, OCI_MANIFEST, manifest_bytes)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from erofs_nydus.registry.client import BlobData, RegistryClient
from erofs_nydus.registry.layout import OCILayout
from erofs_nydus.registry.manifest import ManifestResult, Platform
from erofs_nydus.registry.reference import LayoutReference, Reference, parse_reference


class ImageStore(Protocol):
    def get_manifest(
        self,
        ref: Reference | str,
        platform: str | Platform | None = None,
        *,
        resolve: bool = True,
    ) -> ManifestResult: ...

    def get_blob(
        self,
        repo: Reference | str,
        digest: str,
        *,
        max_size: int = ...,
        size: int | None = None,
        limit_name: str | None = None,
    ) -> bytes: ...

    def open_blob_stream(
        self,
        repo: Reference | str,
        digest: str,
        *,
        chunk_size: int = ...,
        max_size: int | None = None,
        size: int | None = None,
        limit_name: str | None = None,
    ) -> Iterator[bytes]: ...

    def read_blob_range(
        self, repo: Reference | str, digest: str, offset: int, length: int
    ) -> bytes: ...

    def blob_exists(self, repo: Reference | str, digest: str) -> bool: ...

    def push_blob(
        self,
        repo: Reference | str,
        data: BlobData,
        digest: str | None = None,
        *,
        mount_from: Iterable[Reference | str] = (),
    ) -> str: ...

    def put_manifest(self, ref: Reference | str, media_type: str, data: bytes) -> str: ...

    def close(self) -> None: ...


def open_image_store(
    text: str | Reference, *, create: bool = False, **client_options: Any
) -> tuple[ImageStore, Reference]:
    """The store for a reference and the parsed reference.

    ``oci:DIR[:tag]`` opens an `OCILayout` (created when `create`); anything else
    makes a `RegistryClient(**client_options)` (e.g. ``plain_http=True``).
    """
    ref = parse_reference(text) if isinstance(text, str) else text
    if isinstance(ref, LayoutReference):
        return OCILayout(ref.path, create=create), ref
    return RegistryClient(**client_options), ref
