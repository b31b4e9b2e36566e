"""`check REF`: a converted image's manifest conventions, bootstrap, blobs, and (with a
source image) its whole tree against the original OCI image, without mounting."""

from __future__ import annotations

import hashlib
import io
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from erofs_nydus.builder.blob import DigestOnlyWriter
from erofs_nydus.builder.source import tree_from_tar
from erofs_nydus.builder.whiteout import merge_trees
from erofs_nydus.errors import ErofsNydusError
from erofs_nydus.rafs.check import CheckReport
from erofs_nydus.rafs.codec import decode_chunk
from erofs_nydus.rafs.image import BlobInfo, ChunkInfo
from erofs_nydus.rafs.reader import BootstrapReader
from erofs_nydus.rafs.tree import Node
from erofs_nydus.registry.client import MAX_BOOTSTRAP_LAYER_SIZE
from erofs_nydus.registry.convert import IterStream
from erofs_nydus.registry.manifest import (
    ANNOTATION_NYDUS_BLOB,
    ANNOTATION_NYDUS_BOOTSTRAP,
    ANNOTATION_NYDUS_FS_VERSION,
    NYDUS_BLOB,
    manifest_blobs,
    parse_json_document,
)
from erofs_nydus.registry.resolve import extract_bootstrap, open_layer_tar
from erofs_nydus.registry.store import ImageStore, open_image_store

MAX_DATA_BLOB_IN_MEMORY = 4 * 1024 * 1024 * 1024  # `check REF` verifies a data blob whole


@dataclass(slots=True)
class RemoteReport(CheckReport):
    entries_compared: int = 0


def check_remote(ref: str, source: str | None = None, *, platform: str | None = None,
                 client_options: dict[str, Any] | None = None,
                 progress: Callable[[str], None] | None = None) -> RemoteReport:
    report = RemoteReport()
    bad = report.problems.append
    store, r = open_image_store(ref, **(client_options or {}))
    try:
        man = store.get_manifest(r, platform)
        descs = manifest_blobs(man.data)
        config = parse_json_document(store.get_blob(r, descs[0].digest, size=descs[0].size))
        layers = descs[1:]
        if not layers:
            bad("manifest has no layers")
            return report
        boot_desc = layers[-1]
        if boot_desc.annotations.get(ANNOTATION_NYDUS_BOOTSTRAP) != "true":
            bad(f"last layer lacks annotation {ANNOTATION_NYDUS_BOOTSTRAP}: \"true\"")
        if boot_desc.annotations.get(ANNOTATION_NYDUS_FS_VERSION) != "6":
            bad(f"bootstrap layer lacks annotation {ANNOTATION_NYDUS_FS_VERSION}: \"6\"")
        for i, d in enumerate(layers[:-1]):
            if d.media_type != NYDUS_BLOB:
                bad(f"layer {i}: media type {d.media_type}, expected {NYDUS_BLOB}")
            if d.annotations.get(ANNOTATION_NYDUS_BLOB) != "true":
                bad(f"layer {i}: lacks annotation {ANNOTATION_NYDUS_BLOB}: \"true\"")
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
        if len(diff_ids) != len(layers):
            bad(f"config has {len(diff_ids)} diff_ids for {len(layers)} layers")
        else:
            for i, d in enumerate(layers[:-1]):
                if diff_ids[i] != d.digest:
                    bad(f"layer {i}: diff_id {diff_ids[i]} != blob digest {d.digest}")
        tgz = store.get_blob(r, boot_desc.digest, max_size=MAX_BOOTSTRAP_LAYER_SIZE,
                             size=boot_desc.size, limit_name="MAX_BOOTSTRAP_LAYER_SIZE")
        boot = extract_bootstrap(tgz)
        if diff_ids and len(diff_ids) == len(layers) and \
                diff_ids[-1] != _diff_id(tgz):
            bad("bootstrap layer diff_id does not match its uncompressed tar")
        try:
            reader = BootstrapReader(boot, "image.boot")
        except ErofsNydusError as exc:
            bad(f"bootstrap: {exc}")
            return report
        for p in reader.problems():
            bad(f"bootstrap: {p}")
        manifest_ids = [d.digest.removeprefix("sha256:") for d in layers[:-1]]
        table_ids = [b.blob_id for b in reader.image.blobs]
        if sorted(manifest_ids) != sorted(table_ids):
            bad(f"blob table {table_ids} and manifest blob layers {manifest_ids} differ")
        report.blobs = len(table_ids)
        sizes = {d.digest.removeprefix("sha256:"): d.size for d in layers[:-1]}
        for b in reader.image.blobs:
            if progress:
                progress(f"verifying blob {b.blob_id[:12]}")
            _verify_remote_blob(store, r, b.blob_id, reader.image.chunks[b.blob_index], report,
                                sizes.get(b.blob_id))
        if source is not None:
            _compare_with_source(reader.tree(), reader.image.chunk_size, source, platform,
                                 client_options or {}, report, progress)
    except ErofsNydusError as exc:
        bad(str(exc))
    finally:
        store.close()
    return report


def _diff_id(tgz: bytes) -> str:
    """sha256 of the uncompressed tar, inflated in bounded pieces (a gzip bomb stops)."""
    hasher = hashlib.sha256()
    tar = open_layer_tar(io.BytesIO(tgz), "bootstrap layer")
    while piece := tar.read(1 << 20):
        hasher.update(piece)
    return "sha256:" + hasher.hexdigest()


def _verify_remote_blob(store: ImageStore, ref: object, blob_id: str, chunks: Sequence[ChunkInfo],
                        report: RemoteReport, size: int | None) -> None:
    # the whole data blob is held: bounded by its manifest descriptor's size
    data = store.get_blob(ref, f"sha256:{blob_id}", max_size=MAX_DATA_BLOB_IN_MEMORY,  # type: ignore[arg-type]
                          size=size, limit_name="MAX_DATA_BLOB_IN_MEMORY")
    for c in chunks:
        raw = data[c.compressed_offset:c.compressed_offset + c.compressed_size]
        try:
            decode_chunk(raw, c)
        except ErofsNydusError as exc:
            report.problems.append(f"blob {blob_id[:12]} chunk {c.index}: {exc}")
            continue
        report.chunks_verified += 1


def _source_tree(source: str, platform: str | None, client_options: dict[str, Any],
                 chunk_size: int, progress: Callable[[str], None] | None,
                 digester: str = "sha256") -> Node:
    store, r = open_image_store(source, **client_options)
    try:
        man = store.get_manifest(r, platform)
        layers = manifest_blobs(man.data)[1:]
        trees: list[tuple[Node, list[BlobInfo]]] = []
        for i, d in enumerate(layers):
            if progress:
                progress(f"reading source layer {i + 1}/{len(layers)}")
            writer = DigestOnlyWriter("/nonexistent", chunk_size=chunk_size, compressor="none",
                                      digester=digester)
            stream = io.BufferedReader(IterStream(store.open_blob_stream(r, d.digest, size=d.size)))
            fake = BlobInfo(f"source-layer-{i}", 0, chunk_size, 0, "none", "sha256", 0, 0, 0, 0,
                            0, 0)  # merge_trees needs a blob per layer to relabel chunks
            trees.append((tree_from_tar(stream, writer, label=f"source layer {i}"), [fake]))
        root, _, _ = merge_trees(trees, warn=lambda m: None)
        return root
    finally:
        store.close()


def _compare_with_source(got: Node, chunk_size: int, source: str, platform: str | None,
                         client_options: dict[str, Any], report: RemoteReport,
                         progress: Callable[[str], None] | None) -> None:
    digester = next((c.digester for _, n in got.walk() for c in n.inode.chunks), "sha256")
    want = _source_tree(source, platform, client_options, chunk_size, progress, digester)
    a = dict(want.walk())
    b = dict(got.walk())
    bad = report.problems.append
    for p in sorted(a.keys() - b.keys())[:50]:
        bad(f"{p.decode(errors='replace')}: missing in the converted image")
    for p in sorted(b.keys() - a.keys())[:50]:
        bad(f"{p.decode(errors='replace')}: not in the source image")
    for p in sorted(a.keys() & b.keys()):
        report.entries_compared += 1
        x, y = a[p].inode, b[p].inode
        name = p.decode(errors="replace")
        if p == b"/":
            continue
        for attr in ("mode", "uid", "gid", "mtime", "mtime_nsec", "size", "rdev_major",
                     "rdev_minor", "target", "xattrs"):
            if attr == "size" and stat.S_ISDIR(x.mode):
                continue
            if getattr(x, attr) != getattr(y, attr):
                bad(f"{name}: {attr} {getattr(x, attr)!r} != {getattr(y, attr)!r}")
        if [c.digest for c in x.chunks] != [c.digest for c in y.chunks]:
            bad(f"{name}: content differs")
