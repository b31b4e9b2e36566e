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

import contextlib
import gzip
import hashlib
import io
import os
import re
import stat
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, Literal

from erofs_nydus.errors import ErofsNydusError, NotFoundError, RegistryError, UnsupportedError
from erofs_nydus.fsutil import atomic_write, open_private, private_dir
from erofs_nydus.rafs.image import RafsImage
from erofs_nydus.rafs.reader import (
    MAX_BOOTSTRAP_SIZE,
    LoadedBootstrap,
    bootstrap_from_bytes,
    load_bootstrap_file,
)
from erofs_nydus.registry import client
from erofs_nydus.registry.backend import RegistryBackend
from erofs_nydus.registry.client import (
    DeadlineExceededError,
    RegistryClient,
    note_limit,
    size_limit_text,
)
from erofs_nydus.registry.layout import OCILayout
from erofs_nydus.registry.manifest import (
    ANNOTATION_NYDUS_BOOTSTRAP,
    Descriptor,
    manifest_blobs,
)
from erofs_nydus.registry.reference import (
    ImageReference,
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
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# All registry traffic of one resolve (manifest, bootstrap layer, blob checks): below the
# daemon's 60 s idle exit (EROFS_NYDUS_IDLE_EXIT), which counts only registered images.
RESOLVE_DEADLINE = 45.0
# The whole uncompressed tar of a bootstrap layer: the bootstrap plus headers and padding.
MAX_BOOTSTRAP_INFLATED = MAX_BOOTSTRAP_SIZE + 16 * 1024 * 1024


@dataclass
class RemoteImage:
    ref: str
    manifest_digest: str
    bootstrap: str  # <cache-dir>/<sha256>.boot
    backend: dict[str, Any]
    blob_ids: list[str] = field(default_factory=list)
    bootstrap_fetched: int = 0  # bytes downloaded for the bootstrap layer (0: cached)
    # the bootstrap's bytes and their validated parse, for a register in the same
    # process (the daemon's `resolve` then `register`): parsed once, not twice
    loaded: LoadedBootstrap | None = field(default=None, repr=False, compare=False)


class InflateBound(io.RawIOBase):
    """A reader that fails once more than `limit` bytes came through (a gzip bomb)."""

    def __init__(self, src: IO[bytes] | gzip.GzipFile, limit: int, what: str) -> None:
        self._src, self._left, self._limit, self._what = src, limit, limit, what

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._src.read(min(len(b), self._left + 1))
        if len(data) > self._left:
            raise note_limit("bootstrap", f"{self._what}: inflates to more than "
                             f"{size_limit_text(self._limit, 'MAX_BOOTSTRAP_INFLATED')}")
        self._left -= len(data)
        b[: len(data)] = data
        return len(data)


def open_layer_tar(src: IO[bytes], what: str, limit: int | None = None) -> IO[bytes]:
    """The uncompressed tar of a (gzip or plain) layer, failing past `limit` bytes
    (default MAX_BOOTSTRAP_INFLATED)."""
    limit = MAX_BOOTSTRAP_INFLATED if limit is None else limit
    head = src.read(2)
    src.seek(-len(head), io.SEEK_CUR)
    raw: IO[bytes] | gzip.GzipFile = src
    if head == b"\x1f\x8b":
        raw = gzip.GzipFile(fileobj=src, mode="rb")
    return io.BufferedReader(InflateBound(raw, limit, what), 1 << 16)


def extract_bootstrap_to(src: IO[bytes], dst: IO[bytes], *, what: str = "bootstrap layer",
                         max_size: int | None = None, max_inflated: int | None = None) -> int:
    """Copy `image/image.boot` out of a bootstrap layer (seekable `src`, gzip or plain
    tar) into `dst`, streaming; returns its size.  The entry may be at most `max_size`
    bytes and the whole tar at most `max_inflated` (a gzip bomb ends there); defaults:
    this module's MAX_BOOTSTRAP_SIZE and MAX_BOOTSTRAP_INFLATED."""
    max_size = MAX_BOOTSTRAP_SIZE if max_size is None else max_size
    try:
        with tarfile.open(fileobj=open_layer_tar(src, what, max_inflated), mode="r|") as tf:
            for m in tf:
                if m.name.lstrip("./") != BOOTSTRAP_NAME or not m.isreg():
                    continue
                if m.size > max_size:
                    raise note_limit("bootstrap", f"{what}: {BOOTSTRAP_NAME} is {m.size} "
                                     f"bytes, more than "
                                     f"{size_limit_text(max_size, 'MAX_BOOTSTRAP_SIZE')}")
                f = tf.extractfile(m)
                assert f is not None
                done = 0
                while piece := f.read(1 << 20):
                    dst.write(piece)
                    done += len(piece)
                return done
    except ErofsNydusError:
        raise  # a bound hit (RegistryError is an OSError too)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise RegistryError(f"{what} is not a readable tar.gz: {exc}") from exc
    raise RegistryError(f"{what} has no {BOOTSTRAP_NAME}")


def extract_bootstrap(layer_tgz: bytes | IO[bytes], **bounds: Any) -> bytes:
    """`image/image.boot` out of a bootstrap layer, in memory (bounded as
    `extract_bootstrap_to`)."""
    src = io.BytesIO(layer_tgz) if isinstance(layer_tgz, bytes | bytearray) else layer_tgz
    out = io.BytesIO()
    extract_bootstrap_to(src, out, **bounds)
    return out.getvalue()


def _cached_bootstrap(cache_dir: str, layer_digest: str
                      ) -> tuple[str, bytes, os.stat_result] | None:
    """The stored bootstrap a previous resolve extracted from this layer - (path, its
    bytes, its fstat) - if the index names one and the file holds what its sha256 name
    says.  Both files are opened without following symlinks, must be ours
    (`fsutil.open_private`) and are read bounded: anything else is a miss, and the
    fetch that follows replaces them."""
    idx = os.path.join(cache_dir, LAYER_INDEX, layer_digest.split(":", 1)[1])
    try:
        with os.fdopen(open_private(idx, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            sha = f.read(130).strip().decode("ascii", "replace")
        if not _SHA256_HEX.fullmatch(sha):
            return None
        boot = os.path.join(cache_dir, f"{sha}.boot")
        with os.fdopen(open_private(boot, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_BOOTSTRAP_SIZE:
                return None
            data = f.read(MAX_BOOTSTRAP_SIZE + 1)
        if len(data) <= MAX_BOOTSTRAP_SIZE and hashlib.sha256(data).hexdigest() == sha:
            return boot, data, st
    except (OSError, ErofsNydusError):  # missing, a symlink, someone else's: a miss
        pass
    return None


def _fetch_bootstrap(store: OCILayout | RegistryClient, ref: Reference, desc: Descriptor,
                     cache_dir: str, left: Callable[[], float], *,
                     mirrors: list[dict[str, Any]] | None = None,
                     proxy: dict[str, Any] | None = None,
                     backend: dict[str, Any] | None = None) -> tuple[str, int]:
    """Download the bootstrap layer `desc` to a temporary file (bounded by its descriptor
    size and MAX_BOOTSTRAP_LAYER_SIZE, digest-verified), extract the bootstrap (bounded)
    into ``<cache-dir>/<sha256>.boot``; returns (path, bytes downloaded).

    With `mirrors` / `proxy` (and the registry `backend` spec they go with) the layer is
    read through them first, as the chunks are later, the origin last: a mirror is as
    untrusted as the origin, so its answer has the same bounds and digest check, and
    one that fails them only moves the download on to the next path."""
    what = f"bootstrap layer {desc.digest}"
    with tempfile.TemporaryFile(dir=cache_dir) as layer, \
            tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".boot-", delete=False) as out:
        try:
            fetched = _download_layer(store, ref, desc, layer, left, mirrors, proxy, backend)
            layer.seek(0)
            extract_bootstrap_to(layer, out, what=what)
            out.flush()
            out.seek(0)
            hasher = hashlib.sha256()
            while piece := out.read(1 << 20):
                hasher.update(piece)
            os.fsync(out.fileno())
            sha = hasher.hexdigest()
            path = os.path.join(cache_dir, f"{sha}.boot")
            os.chmod(out.name, 0o600)
            os.replace(out.name, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(out.name)
            raise
    _index_bootstrap(cache_dir, desc.digest, sha)
    return path, fetched


def _download_layer(store: OCILayout | RegistryClient, ref: Reference, desc: Descriptor,
                    layer: IO[bytes], left: Callable[[], float],
                    mirrors: list[dict[str, Any]] | None, proxy: dict[str, Any] | None,
                    backend: dict[str, Any] | None) -> int:  # fmt: skip
    """The layer's bytes into `layer` (from its start; bounded, digest-verified when the
    stream ends); returns how many."""

    def download(src: OCILayout | RegistryClient, at: Reference, seconds: float) -> int:
        layer.seek(0)
        layer.truncate()  # a failed path's partial bytes go
        n = 0
        for piece in src.open_blob_stream(at, desc.digest,
                                          max_size=client.MAX_BOOTSTRAP_LAYER_SIZE,
                                          size=desc.size, limit_name="MAX_BOOTSTRAP_LAYER_SIZE",
                                          deadline=seconds):  # fmt: skip
            layer.write(piece)
            n += len(piece)
        return n

    if (not (mirrors or proxy) or backend is None or not isinstance(store, RegistryClient)
            or not isinstance(ref, ImageReference)):  # fmt: skip
        return download(store, ref, left())
    via = RegistryBackend.from_spec({**backend, "mirrors": mirrors or [], "proxy": proxy})
    try:
        return via.router.read((desc.digest.split(":", 1)[1], 0, desc.size), ref, left(),
                               download, lambda: store, ranged=False)  # fmt: skip
    finally:
        via.close()


def _index_bootstrap(cache_dir: str, layer_digest: str, sha: str) -> None:
    private_dir(os.path.join(cache_dir, LAYER_INDEX))
    atomic_write(os.path.join(cache_dir, LAYER_INDEX, layer_digest.split(":", 1)[1]),
                  sha.encode(), mode=0o600)


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
    mirrors: list[dict[str, Any]] | None = None,
    proxy: dict[str, Any] | None = None,
    resolve_deadline: float | None = None,
    validate: Callable[[bytes, str], RafsImage] | None = None,
) -> RemoteImage:
    """Resolve `text`, fetch its bootstrap into `cache_dir`, return what to register.

    Raises UsageError (bad reference), NotFoundError (unknown image, tag, platform),
    AuthError (credentials missing or refused), RegistryError, UnsupportedError
    (not a Nydus image), FormatError (a bootstrap that does not parse).
    `deadline`: seconds per on-demand read in the daemon (retries included).
    `mirrors`, `proxy` (backend settings): the bootstrap layer is read through them
    first, as the chunks are later; manifests always come from the origin.
    `resolve_deadline` (default RESOLVE_DEADLINE): seconds for all of this call's
    registry traffic together, so a slow registry ends in one DeadlineExceededError
    line before the daemon that runs this gives up on being idle.
    `validate` (data, name) -> image: how the bootstrap is parsed (default
    `load_image`: no tree walk); the daemon passes its full validation, and
    ``RemoteImage.loaded`` then carries that parse to its `register`.
    """
    total = RESOLVE_DEADLINE if resolve_deadline is None else resolve_deadline
    end = time.monotonic() + total

    def left() -> float:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError(f"{text}: resolving took longer than {total:g} s "
                                        "(RESOLVE_DEADLINE)")
        return remaining

    ref = parse_reference(text) if isinstance(text, str) else text
    cache_dir = private_dir(cache_dir)
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
        man = store.get_manifest(ref, platform, deadline=left())
        descs = manifest_blobs(man.data)
        layers = descs[1:]
        if not layers or layers[-1].annotations.get(ANNOTATION_NYDUS_BOOTSTRAP) != "true":
            raise UnsupportedError(f"{ref}: {NOT_NYDUS}")
        boot_desc = layers[-1]
        fetched = 0
        cached = _cached_bootstrap(cache_dir, boot_desc.digest)
        if cached is not None:
            boot_path = cached[0]
            loaded = bootstrap_from_bytes(*cached, validate)  # read once, parsed once
        else:
            boot_path, fetched = _fetch_bootstrap(store, ref, boot_desc, cache_dir, left,
                                                  mirrors=mirrors, proxy=proxy, backend=backend)
            loaded = load_bootstrap_file(boot_path, validate)
        image = loaded.image
        listed = {d.digest for d in layers}
        for b in image.blobs:
            digest = f"sha256:{b.blob_id}"
            if digest not in listed and not store.blob_exists(ref, digest, deadline=left()):
                raise NotFoundError(f"{ref}: blob {digest} named by the bootstrap is missing")
        return RemoteImage(
            ref=str(ref),
            manifest_digest=man.digest,
            bootstrap=boot_path,
            backend=backend,
            blob_ids=[b.blob_id for b in image.blobs],
            bootstrap_fetched=fetched,
            loaded=loaded,
        )
    finally:
        store.close()
