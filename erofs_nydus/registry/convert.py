"""`convert`: an OCI image (registry or oci: layout) -> a Nydus RAFS v6 image.

Per source layer: stream the blob (digest-verified as it arrives, never unpacked to
disk) into the builder -> layer bootstrap + data blob.  Layer results are cached by
source digest and build options, so a layer converted once is not rebuilt.  Then the
layer bootstraps are merged, and pushed as Nydus expects (reference/nydus-rafs-v6.md 4.3):
one layer per data blob (`application/vnd.oci.image.layer.nydus.blob.v1`,
`containerd.io/snapshot/nydus-blob: "true"`), the bootstrap last as a tar.gz holding
`image/image.boot` (`containerd.io/snapshot/nydus-bootstrap: "true"`,
`containerd.io/snapshot/nydus-fs-version: "6"`), and a config whose
`rootfs.diff_ids` match those layers.

With an access trace (`ConvertOptions.prefetch_trace`, recorded by `erofs-nydus trace`
on a mount of this image converted without one) the merged bootstrap is optimized
before the push (optimize.py): one blob with the traced chunks first and a prefetch
table.  Conversion is deterministic, so the trace's fsid identifies the merged
bootstrap it was recorded on; a trace of any other image is refused.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from erofs_nydus.builder import BuildOptions, create_image
from erofs_nydus.builder.merge import merge_bootstraps
from erofs_nydus.builder.optimize import OptimizeResult, load_trace, optimize_image
from erofs_nydus.errors import UnsupportedError, UsageError
from erofs_nydus.rafs.reader import read_bootstrap_file
from erofs_nydus.registry.manifest import (
    ANNOTATION_NYDUS_BLOB,
    ANNOTATION_NYDUS_BOOTSTRAP,
    ANNOTATION_NYDUS_FS_VERSION,
    DOCKER_LAYER_GZIP,
    NYDUS_BLOB,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    build_image_manifest,
    manifest_blobs,
    parse_json_document,
    sha256_digest,
)
from erofs_nydus.registry.reference import parse_layout_reference
from erofs_nydus.registry.resolve import extract_bootstrap as extract_bootstrap  # bounded
from erofs_nydus.registry.store import ImageStore, open_image_store

BOOTSTRAP_NAME = "image/image.boot"
_TAR_LAYER_TYPES = {OCI_LAYER_TAR, OCI_LAYER_GZIP, DOCKER_LAYER_GZIP,
                    "application/vnd.docker.image.rootfs.diff.tar",
                    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"}
_ZSTD_LAYER_TYPES = {OCI_LAYER_ZSTD, "application/vnd.docker.image.rootfs.diff.tar.zstd"}


class IterStream(io.RawIOBase):
    """A readable file over an iterator of byte chunks (a streaming HTTP body)."""

    def __init__(self, it: Iterator[bytes]) -> None:
        self._it = it
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


@dataclass(slots=True)
class ConvertOptions:
    chunk_size: int = 0x100000
    compressor: str = "lz4"
    digester: str = "sha256"
    chunk_dicts: list[str] = field(default_factory=list)
    platform: str | None = None
    cache_dir: str = "/var/cache/erofs_nydus/convert"
    client_options: dict[str, Any] = field(default_factory=dict)
    prefetch_trace: str | None = None  # optimize by this access trace (see optimize.py)


@dataclass(slots=True)
class ConvertResult:
    target: str
    manifest_digest: str
    bootstrap: str
    blobs: list[tuple[str, int]]  # (blob id, size) in layer order
    layers_converted: int
    layers_cached: int
    bootstrap_layer_digest: str
    prefetch: OptimizeResult | None = None  # with --prefetch-trace

    def to_json(self) -> dict[str, Any]:
        prefetch = None if self.prefetch is None else {
            "files": self.prefetch.prefetch_files, "chunks": self.prefetch.prefetch_chunks,
            "bytes": self.prefetch.prefetch_bytes}
        return {"target": self.target, "manifest_digest": self.manifest_digest,
                "bootstrap": self.bootstrap,
                "blobs": [{"digest": f"sha256:{b}", "size": s} for b, s in self.blobs],
                "layers_converted": self.layers_converted, "layers_cached": self.layers_cached,
                "bootstrap_layer": self.bootstrap_layer_digest, "prefetch": prefetch}


Progress = Callable[[str, int, int], None]  # (label, done, total)


def bootstrap_layer_bytes(bootstrap: bytes) -> tuple[bytes, str]:
    """Deterministic tar.gz with `image/` and `image/image.boot`; returns (tgz, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("image")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
        tf.addfile(d)
        f = tarfile.TarInfo(BOOTSTRAP_NAME)
        f.size, f.mode, f.mtime = len(bootstrap), 0o644, 0
        tf.addfile(f, io.BytesIO(bootstrap))
    tar = raw.getvalue()
    return gzip.compress(tar, compresslevel=6, mtime=0), sha256_digest(tar)


def _layer_key(digest: str, opts: ConvertOptions) -> str:
    dig = "" if opts.digester == "sha256" else f"|{opts.digester}"  # old keys stay valid
    h = hashlib.sha256(f"{digest}|{opts.chunk_size}|{opts.compressor}|v1{dig}".encode())
    for p in opts.chunk_dicts:
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def _convert_layer(store: ImageStore, ref: Any, layer: Descriptor, opts: ConvertOptions,
                   progress: Progress | None, label: str) -> tuple[str, bool]:
    """Layer bootstrap path for one source layer (cached); (path, was_cached)."""
    if layer.media_type in _ZSTD_LAYER_TYPES:
        raise UnsupportedError(f"{label}: zstd-compressed layers are not supported yet "
                               f"({layer.media_type})")
    if layer.media_type and layer.media_type not in _TAR_LAYER_TYPES:
        raise UnsupportedError(f"{label}: unsupported layer media type {layer.media_type}")
    key = _layer_key(layer.digest, opts)
    boot = os.path.join(opts.cache_dir, "layers", key + ".boot")
    blob_dir = os.path.join(opts.cache_dir, "blobs")
    if os.path.exists(boot):
        img = read_bootstrap_file(boot)
        if all(os.path.exists(os.path.join(blob_dir, b.blob_id)) for b in img.blobs):
            return boot, True
    done = 0

    def counted() -> Iterator[bytes]:
        nonlocal done
        for piece in store.open_blob_stream(ref, layer.digest, size=layer.size):
            done += len(piece)
            if progress:
                progress(label, done, layer.size)
            yield piece

    stream = io.BufferedReader(IterStream(counted()), buffer_size=1 << 20)
    bopts = BuildOptions(chunk_size=opts.chunk_size, compressor=opts.compressor,
                         digester=opts.digester, chunk_dicts=opts.chunk_dicts)
    create_image(stream, boot, blob_dir, bopts, label=label)
    return boot, False


def push_nydus_image(store: ImageStore, ref: Any, bootstrap: str, blob_dir: str,
                     config: dict[str, Any], progress: Progress | None = None,
                     ) -> tuple[str, list[tuple[str, int]], str]:
    """Push a Nydus image: each blob of `bootstrap` (from `blob_dir`) as a nydus-blob
    layer, the bootstrap as the last tar.gz layer, `config` with matching rootfs and
    history, then the manifest.  Returns (manifest digest, [(blob id, size)], bootstrap
    layer digest)."""
    img = read_bootstrap_file(bootstrap)
    layer_descs: list[Descriptor] = []
    blob_sizes: list[tuple[str, int]] = []
    for b in img.blobs:
        path = os.path.join(blob_dir, b.blob_id)
        size = os.path.getsize(path)
        if progress:
            progress(f"push blob {b.blob_id[:12]}", 0, size)
        store.push_blob(ref, path, f"sha256:{b.blob_id}")
        if progress:
            progress(f"push blob {b.blob_id[:12]}", size, size)
        layer_descs.append(Descriptor(NYDUS_BLOB, f"sha256:{b.blob_id}", size,
                                      {ANNOTATION_NYDUS_BLOB: "true"}))
        blob_sizes.append((b.blob_id, size))
    with open(bootstrap, "rb") as f:
        boot_bytes = f.read()
    tgz, diff_id = bootstrap_layer_bytes(boot_bytes)
    boot_digest = store.push_blob(ref, tgz, sha256_digest(tgz))
    layer_descs.append(Descriptor(OCI_LAYER_GZIP, boot_digest, len(tgz), {
        ANNOTATION_NYDUS_BOOTSTRAP: "true", ANNOTATION_NYDUS_FS_VERSION: "6"}))
    config = dict(config)
    config["rootfs"] = {"type": "layers",
                        "diff_ids": [d.digest for d in layer_descs[:-1]] + [diff_id]}
    config["history"] = [{"created_by": "erofs-nydus convert: Nydus blob layer",
                          "comment": "nydus blob"} for _ in layer_descs[:-1]] + [
        {"created_by": "erofs-nydus convert: Nydus Bootstrap Layer",
         "comment": "nydus bootstrap"}]
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    cfg_digest = store.push_blob(ref, config_bytes, sha256_digest(config_bytes))
    manifest = build_image_manifest(Descriptor(OCI_CONFIG, cfg_digest, len(config_bytes)),
                                    layer_descs, media_type=OCI_MANIFEST)
    return store.put_manifest(ref, OCI_MANIFEST, manifest), blob_sizes, boot_digest


def _optimize_merged(merged: str, opts: ConvertOptions,
                     trace: dict[str, Any]) -> tuple[str, OptimizeResult]:
    """The merged bootstrap rebuilt by `opts.prefetch_trace`: traced chunks first in one
    new blob (in the layer cache's blob dir), with a prefetch table."""
    assert opts.prefetch_trace is not None
    with open(merged, "rb") as f:
        fsid = hashlib.sha256(f.read()).hexdigest()
    if trace.get("fsid") != fsid:
        raise UsageError(
            f"{opts.prefetch_trace}: the trace was recorded on another image (fsid "
            f"{str(trace.get('fsid'))[:12]}, this conversion gives {fsid[:12]}); trace a mount "
            f"of this source converted without --prefetch-trace and with the same "
            f"--chunk-size, --compressor and --chunk-dict")
    with open(opts.prefetch_trace, "rb") as f:
        key = hashlib.sha256(fsid.encode() + f.read()).hexdigest()
    out = os.path.join(os.path.dirname(merged), f"{key}.opt.boot")
    blob_dir = os.path.join(opts.cache_dir, "blobs")
    res = optimize_image(merged, blob_dir, out, blob_dir, trace=opts.prefetch_trace)
    return out, res


class _LayoutUndo:
    """What `convert` creates for an ``oci:DIR`` target, removed again when it fails:
    the directories that did not exist (the topmost one, recursively), or in an existing
    directory the layout skeleton files it did not hold.  Registry targets: nothing."""

    SKELETON = ("oci-layout", "index.json", "blobs")

    def __init__(self, target: str) -> None:
        self.top: str | None = None
        self.new_files: list[str] = []
        if not target.startswith("oci:"):
            return
        path = os.path.abspath(parse_layout_reference(target).path)
        probe = path
        while not os.path.lexists(probe):
            self.top, probe = probe, os.path.dirname(probe)
        if self.top is None and os.path.isdir(path):
            self.new_files = [os.path.join(path, n) for n in self.SKELETON
                              if not os.path.lexists(os.path.join(path, n))]

    def run(self) -> None:
        if self.top is not None:
            shutil.rmtree(self.top, ignore_errors=True)
        for p in self.new_files:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(p)


def convert_image(source: str, target: str, opts: ConvertOptions,
                  progress: Progress | None = None,
                  warn: Callable[[str], None] | None = None) -> ConvertResult:
    # a bad trace file fails now, not after converting every layer
    trace = load_trace(opts.prefetch_trace) if opts.prefetch_trace else None
    undo = _LayoutUndo(target)
    src_store, src_ref = open_image_store(source, **opts.client_options)
    try:
        dst_store, dst_ref = open_image_store(target, create=True, **opts.client_options)
    except BaseException:
        src_store.close()
        undo.run()
        raise
    try:
        man = src_store.get_manifest(src_ref, opts.platform)
        descs = manifest_blobs(man.data)
        config_desc, layers = descs[0], descs[1:]
        config = parse_json_document(
            src_store.get_blob(src_ref, config_desc.digest, size=config_desc.size))
        boots: list[str] = []
        cached = 0
        for i, layer in enumerate(layers):
            label = f"layer {i + 1}/{len(layers)} {layer.digest[7:19]}"
            boot, was_cached = _convert_layer(src_store, src_ref, layer, opts, progress, label)
            cached += was_cached
            boots.append(boot)
        work = os.path.join(opts.cache_dir, "images")
        os.makedirs(work, exist_ok=True)
        merged = os.path.join(work, hashlib.sha256(
            "|".join([man.digest, *boots]).encode()).hexdigest() + ".boot")
        # layer bootstraps come from our own cache: skip re-validating each one
        merge_bootstraps(boots, merged, warn or (lambda m: None), validate=False)
        boot, optimized = merged, None
        if trace is not None:
            boot, optimized = _optimize_merged(merged, opts, trace)
        digest, blob_sizes, boot_digest = push_nydus_image(
            dst_store, dst_ref, boot, os.path.join(opts.cache_dir, "blobs"), config, progress)
        return ConvertResult(target=target, manifest_digest=digest, bootstrap=boot,
                             blobs=blob_sizes, layers_converted=len(layers) - cached,
                             layers_cached=cached, bootstrap_layer_digest=boot_digest,
                             prefetch=optimized)
    except BaseException:
        dst_store.close()
        undo.run()
        raise
    finally:
        src_store.close()
        dst_store.close()
