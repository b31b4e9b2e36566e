"""`merge`: flatten layer bootstraps into one image bootstrap."""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from erofs_nydus.builder.bootstrap import write_bootstrap
from erofs_nydus.builder.create import write_file_atomic
from erofs_nydus.builder.whiteout import add_blob_chunks, merge_trees
from erofs_nydus.errors import FormatError, UsageError
from erofs_nydus.layout.rafs import MAX_BLOBS
from erofs_nydus.rafs.codec import DEFAULT_COMPRESSOR, DEFAULT_DIGESTER
from erofs_nydus.rafs.image import BlobInfo
from erofs_nydus.rafs.reader import BootstrapReader, read_bootstrap_bytes
from erofs_nydus.rafs.tree import Node


@dataclass(slots=True)
class MergeResult:
    bootstrap: str
    bootstrap_size: int
    inodes: int
    blobs: list[BlobInfo]

    def to_json(self) -> dict[str, Any]:
        return {"bootstrap": self.bootstrap, "bootstrap_size": self.bootstrap_size,
                "inodes": self.inodes,
                "blobs": [{"blob_id": b.blob_id, "blob_index": b.blob_index,
                           "uncompressed_size": b.uncompressed_size,
                           "compressed_size": b.compressed_size} for b in self.blobs]}


@dataclass(slots=True)
class LoadedLayer:
    """A layer bootstrap read, checked and made a tree ahead of its merge (`preload`)."""
    reader: BootstrapReader
    tree: Node


def _read_layer(path: str) -> BootstrapReader:
    return BootstrapReader(read_bootstrap_bytes(path), os.path.basename(path))


def preload(path: str, validate: bool = True) -> LoadedLayer | None:
    """What `merge_bootstraps` does first with a layer, done ahead (convert does it for
    each layer as it is built, while the others convert); None when the layer fails its
    check or its tree (the merge then reads it again and reports that, in order)."""
    try:
        reader = _read_layer(path)
        if reader.problems(walk=validate):
            return None
        return LoadedLayer(reader, reader.tree())
    except Exception:  # reported by the merge itself
        return None


def merge_bootstraps(paths: list[str], out: str,
                     warn: Callable[[str], None] | None = None,
                     validate: bool = True,
                     loaded: MutableMapping[str, LoadedLayer] | None = None) -> MergeResult:
    """Merge layer bootstraps (bottom first) into `out`; nothing is written on error.

    `validate=False` skips the full check of each layer (for bootstraps this process
    has just built); the tree walk still rejects structural damage.  `loaded`: path ->
    `preload(path, validate)` of layers read ahead; each is used once (taken out: the
    merge changes the trees), a path listed twice is read again."""
    if not paths:
        raise UsageError("merge needs at least one layer bootstrap")
    readers = []
    trees: list[Node | None] = []
    for i, path in enumerate(paths):
        ahead = loaded.pop(path, None) if loaded is not None else None
        if ahead is not None:  # read and checked already
            readers.append(ahead.reader)
            trees.append(ahead.tree)
            continue
        reader = _read_layer(path)
        problems = reader.problems(walk=validate)
        if problems:
            raise FormatError(f"layer {i} ({path}) fails check: {problems[0]}")
        readers.append(reader)
        trees.append(None)
    chunk_size = readers[0].image.chunk_size
    compressors = {b.compressor for r in readers for b in r.image.blobs}
    digesters = {b.digester for r in readers for b in r.image.blobs}
    for i, r in enumerate(readers):
        if r.image.chunk_size != chunk_size:
            raise UsageError(f"layer {i} ({paths[i]}): chunk size {r.image.chunk_size:#x} "
                             f"differs from layer 0's {chunk_size:#x}")
    if len(compressors) > 1:
        raise UsageError(f"layers use different compressors: {sorted(compressors)}")
    if len(digesters) > 1:
        raise UsageError(f"layers use different digesters: {sorted(digesters)}")
    layers = [(t if t is not None else r.tree(), r.image.blobs)
              for r, t in zip(readers, trees, strict=True)]
    root, blobs, table = merge_trees(layers, warn)
    if len(blobs) > MAX_BLOBS:
        raise UsageError(f"the merged image references {len(blobs)} blobs; at most {MAX_BLOBS} "
                         "fit in one bootstrap")
    table = add_blob_chunks(table, [(r.image.blobs, r.image.chunks) for r in readers], blobs)
    compressor = compressors.pop() if compressors else DEFAULT_COMPRESSOR
    digester = digesters.pop() if digesters else DEFAULT_DIGESTER
    plan = write_bootstrap(root, blobs, table, chunk_size=chunk_size, compressor=compressor,
                           digester=digester)
    write_file_atomic(out, plan.data)
    return MergeResult(bootstrap=out, bootstrap_size=len(plan.data), inodes=plan.inode_count,
                       blobs=blobs)
