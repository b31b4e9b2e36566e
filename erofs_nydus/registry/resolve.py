"""Resolve a Nydus image by reference for `erofs-nydus mount REF`.

Only the bootstrap layer is fetched now: the manifest is resolved (platform from an
index, linux/amd64 by default), its last layer must carry the nydus-bootstrap
annotation, and the bootstrap inside it is stored content-addressed as
``<cache-dir>/<sha256 of the bootstrap>.boot`` (the name the daemon uses too).
Data chunks are read later, on demand, by the daemon through the backend spec
returned here:

* registry: ``{"type": "registry", "repo": "host/name", ...}``
  (`RegistryBackend.from_spec`; no secrets: credentials come from Docker's
  config.json when the daemon reads, `docker_config` names only its directory);
* ``oci:DIR[:tag]``: ``{"type": "local", "dir": "DIR/blobs/sha256"}``.

A small index ``<cache-dir>/bootstrap-layers/<layer digest hex>`` -> bootstrap sha256
lets a second mount of the same image skip the download.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any, Literal

from erofs_nydus.errors import NotFoundError, RegistryError, UnsupportedError
from erofs_nydus.fsutil import atomic_write
from erofs_nydus.rafs.reader import BootstrapReader
from erofs_nydus.registry.backend import RegistryBackend
from erofs_nydus.registry.client import RegistryClient
from erofs_nydus.registry.layout import OCILayout
from erofs_nydus.registry.manifest import (
    ANNOTATION_NYDUS_BOOTSTRAP,
    manifest_blobs,
)
from erofs_nydus.registry.reference import (
    LayoutReference,
    Reference,
    looks_like_reference,
    parse_reference,
)

__all__ = [
    "NOT_NYDUS",
    "RemoteImage",
    "looks_like_reference",
    "resolve_remote_image",
]

BOOTSTRAP_NAME = "image/image.boot"  # convert.BOOTSTRAP_NAME
NOT_NYDUS = "not a Nydus image; convert it first with erofs-nydus convert"
LAYER_INDEX = "bootstrap-layers"


@dataclass
class RemoteImage:
    ref: str
    manifest_digest: str
    bootstrap: str  # <cache-dir>/<sha256>.boot
    backend: dict[str, Any]
    blob_ids: list[str] = field(default_factory=list)
    bootstrap_fetched: int = 0  # bytes downloaded for the bootstrap layer (0: cached)


def extract_bootstrap(layer_tgz: bytes) -> bytes:
    """`image/image.boot` out of a bootstrap layer (as `convert.extract_bootstrap`, without
    importing the builder: this runs on every cold mount)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(layer_tgz), mode="r:*") as tf:
            for m in tf:
                if m.name.lstrip("./") == BOOTSTRAP_NAME and m.isreg():
                    f = tf.extractfile(m)
                    if f is not None:
                        return f.read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise RegistryError(f"bootstrap layer is not a readable tar.gz: {exc}") from exc
    raise RegistryError(f"bootstrap layer has no {BOOTSTRAP_NAME}")


def _cached_bootstrap(cache_dir: str, layer_digest: str) -> str | None:
    idx = os.path.join(cache_dir, LAYER_INDEX, layer_digest.split(":", 1)[1])
    try:
        with open(idx, encoding="ascii") as f:
            sha = f.read().strip()
    except OSError:
        return None
    boot = os.path.join(cache_dir, f"{sha}.boot")
    try:
        with open(boot, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() == sha:
                return boot
    except OSError:
        pass
    return None


def _store_bootstrap(cache_dir: str, layer_digest: str, boot: bytes) -> str:
    sha = hashlib.sha256(boot).hexdigest()
    path = os.path.join(cache_dir, f"{sha}.boot")
    try:
        with open(path, "rb") as f:
            same = f.read(len(boot) + 1) == boot
    except OSError:
        same = False
    if not same:  # missing, or planted / damaged under our name: replace it
        atomic_write(path, boot)
    os.makedirs(os.path.join(cache_dir, LAYER_INDEX), exist_ok=True)
    atomic_write(os.path.join(cache_dir, LAYER_INDEX, layer_digest.split(":", 1)[1]),
                  sha.encode())
    return path


def resolve_remote_image(
    text: str | Reference,
    cache_dir: str,
    *,
    plain_http: bool | Literal["loopback"] = "loopback",
    platform: str | None = None,
    deadline: float = 30.0,
    timeout: float | None = None,
    retries: int = 3,
    docker_config: str | None = None,
    verify: bool | str = True,
) -> RemoteImage:
    """Resolve `text`, fetch its bootstrap into `cache_dir`, return what to register.

    Raises UsageError (bad reference), NotFoundError (unknown image, tag, platform),
    AuthError (credentials missing or refused), RegistryError, UnsupportedError
    (not a Nydus image), FormatError (a bootstrap that does not parse).
    `deadline`: seconds per on-demand read in the daemon (retries included).
    """
    ref = parse_reference(text) if isinstance(text, str) else text
    cache_dir = os.path.abspath(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    if docker_config is None:
        docker_config = os.environ.get("DOCKER_CONFIG") or None
    if isinstance(ref, LayoutReference):
        store: OCILayout | RegistryClient = OCILayout(ref.path)
        backend: dict[str, Any] = {
            "type": "local",
            "dir": os.path.join(os.path.abspath(ref.path), "blobs", "sha256"),
        }
    else:
        store = RegistryClient(
            plain_http=plain_http,
            verify=verify,
            docker_config=docker_config,
            timeout=timeout or min(30.0, deadline),
            retries=retries,
            deadline=max(60.0, deadline),
        )
        spec_backend = RegistryBackend(store, ref, deadline=deadline)
        backend = spec_backend.spec()
        if docker_config:
            backend["docker_config"] = os.path.abspath(docker_config)
        if verify is not True:
            backend["verify"] = verify
    try:
        man = store.get_manifest(ref, platform)
        descs = manifest_blobs(man.data)
        layers = descs[1:]
        if not layers or layers[-1].annotations.get(ANNOTATION_NYDUS_BOOTSTRAP) != "true":
            raise UnsupportedError(f"{ref}: {NOT_NYDUS}")
        boot_desc = layers[-1]
        fetched = 0
        boot_path = _cached_bootstrap(cache_dir, boot_desc.digest)
        if boot_path is None:
            layer = store.get_blob(ref, boot_desc.digest)  # digest-verified
            fetched = len(layer)
            boot_path = _store_bootstrap(cache_dir, boot_desc.digest, extract_bootstrap(layer))
        with open(boot_path, "rb") as f:
            image = BootstrapReader(f.read()).image
        listed = {d.digest for d in layers}
        for b in image.blobs:
            digest = f"sha256:{b.blob_id}"
            if digest not in listed and not store.blob_exists(ref, digest):
                raise NotFoundError(f"{ref}: blob {digest} named by the bootstrap is missing")
        return RemoteImage(
            ref=str(ref),
            manifest_digest=man.digest,
            bootstrap=boot_path,
            backend=backend,
            blob_ids=[b.blob_id for b in image.blobs],
            bootstrap_fetched=fetched,
        )
    finally:
        store.close()
