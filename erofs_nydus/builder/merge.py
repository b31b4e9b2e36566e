"""`merge`: flatten layer bootstraps into one image bootstrap."""

from __future__ import annotations

import os
from collections.abc import Callable
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


def merge_bootstraps(paths: list[str], out: str,
                     warn: Callable[[str], None] | None = None,
                     validate: bool = True) -> MergeResult:
    """Merge layer bootstraps (bottom first) into `out`; nothing is written on error.

    `validate=False` skips the full check of each layer (for bootstraps this process
    has just built); the tree walk still rejects structural damage."""
    if not paths:
        raise UsageError("merge needs at least one layer bootstrap")
    readers = []
    for i, path in enumerate(paths):
        reader = BootstrapReader(read_bootstrap_bytes(path), os.path.basename(path))
        problems = reader.problems(walk=validate)
        if problems:
            raise FormatError(f"layer {i} ({path}) fails check: {problems[0]}")
        readers.append(reader)
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
    layers = [(r.tree(), r.image.blobs) for r in readers]
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
