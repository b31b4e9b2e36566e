"""`optimize`: rebuild an image so the data a workload reads first sits first.

Input: an access trace recorded by the daemon (`erofs-nydus trace`), or a list of
paths.  Output: a new bootstrap and one new blob whose chunks are laid out in access
order (traced chunks first and contiguous, then everything else in tree order), and
a prefetch table (Nydus's u32 nid list) naming the files the workload touched, in the
order it touched them.  On mount the daemon prefetches those files' chunks: after
optimization they are one contiguous span of the blob, so a few large backend reads.

Trace file (JSON, written by the daemon):
    {"version": 1, "fsid": "<sha256 of the bootstrap>", "blobs": ["<blob id>", ...],
     "accesses": [{"blob": "<blob id>", "offset": <uncompressed offset>, "t": <s>}, ...]}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from erofs_nydus.builder.blob import BlobWriter
from erofs_nydus.builder.bootstrap import write_bootstrap
from erofs_nydus.builder.create import write_file_atomic
from erofs_nydus.errors import DigestMismatchError, FormatError, UsageError
from erofs_nydus.rafs.backend import BlobBackend, LocalDirBackend
from erofs_nydus.rafs.check import read_chunk
from erofs_nydus.rafs.codec import DEFAULT_COMPRESSOR, DEFAULT_DIGESTER
from erofs_nydus.rafs.image import BlobInfo, ChunkInfo
from erofs_nydus.rafs.reader import BootstrapReader, read_bootstrap_bytes
from erofs_nydus.rafs.tree import Inode, Node, lookup

TRACE_VERSION = 1


@dataclass(slots=True)
class OptimizeResult:
    bootstrap: str
    blob: BlobInfo | None
    prefetch_files: int
    prefetch_chunks: int
    prefetch_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"bootstrap": self.bootstrap,
                "blob_id": self.blob.blob_id if self.blob else None,
                "prefetch_files": self.prefetch_files, "prefetch_chunks": self.prefetch_chunks,
                "prefetch_bytes": self.prefetch_bytes}


def load_trace(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            trace = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: not a readable trace file: {exc}") from exc
    if not isinstance(trace, dict) or trace.get("version") != TRACE_VERSION or \
            not isinstance(trace.get("accesses"), list):
        raise UsageError(f"{path}: not an erofs-nydus trace (version {TRACE_VERSION})")
    return trace


def _traced_chunks(reader: BootstrapReader, trace: dict[str, Any]) -> list[ChunkInfo]:
    if trace.get("fsid") != reader.image.fsid:
        raise UsageError(f"the trace was recorded on another image (fsid "
                         f"{str(trace.get('fsid'))[:12]}, this image {reader.image.fsid[:12]})")
    index = {b.blob_id: b.blob_index for b in reader.image.blobs}
    out: list[ChunkInfo] = []
    seen: set[tuple[int, int]] = set()
    for acc in trace["accesses"]:
        try:
            key = (index[acc["blob"]], int(acc["offset"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"trace entry {acc!r:.80} names no chunk of this image") from exc
        c = reader.by_addr.get(key)
        if c is not None and key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _chunks_of_paths(root: Node, paths: list[str]) -> list[ChunkInfo]:
    out: list[ChunkInfo] = []
    for p in paths:
        node = lookup(root, os.fsencode(p))
        if node is None:
            raise UsageError(f"prefetch list: {p}: no such path in the image")
        for _, n in node.walk():
            out.extend(n.inode.chunks)
    return out


def optimize_image(bootstrap: str, blob_dir: str, out_bootstrap: str, out_blob_dir: str, *,
                   trace: str | None = None, prefetch_list: str | None = None,
                   backend: BlobBackend | None = None) -> OptimizeResult:
    if (trace is None) == (prefetch_list is None):
        raise UsageError("give exactly one of --trace and --prefetch-list")
    reader = BootstrapReader(read_bootstrap_bytes(bootstrap), os.path.basename(bootstrap))
    problems = reader.problems()
    if problems:
        raise FormatError(f"{bootstrap}: {problems[0]}")
    root = reader.tree()
    if trace is not None:
        first = _traced_chunks(reader, load_trace(trace))
    else:
        assert prefetch_list is not None
        with open(prefetch_list) as f:
            paths = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        first = _chunks_of_paths(root, paths)
    key_of = {id(c): (c.blob_index, c.uncompressed_offset) for lst in reader.image.chunks
              for c in lst}
    first_keys = [(c.blob_index, c.uncompressed_offset) for c in first]
    # prefetch files: in order of their first traced chunk
    owner: dict[tuple[int, int], list[Inode]] = {}
    nodes_of: dict[int, Node] = {}
    for _, node in root.walk():
        ino = node.inode
        if ino.chunks and id(ino) not in nodes_of:
            nodes_of[id(ino)] = node
            for c in ino.chunks:
                owner.setdefault(key_of[id(c)], []).append(ino)
    prefetch: list[Node] = []
    picked: set[int] = set()
    for k in first_keys:
        for ino in owner.get(k, []):
            if id(ino) not in picked:
                picked.add(id(ino))
                prefetch.append(nodes_of[id(ino)])
    # new blob: traced chunks first (access order), then the rest in tree order
    order: list[tuple[int, int]] = []
    placed: set[tuple[int, int]] = set()
    for k in first_keys:
        if k not in placed:
            placed.add(k)
            order.append(k)
    for _, node in root.walk():
        for c in node.inode.chunks:
            k = key_of[id(c)]
            if k not in placed:
                placed.add(k)
                order.append(k)
    src = backend or LocalDirBackend(blob_dir)
    blobs = reader.image.blobs
    writer = BlobWriter(out_blob_dir, chunk_size=reader.image.chunk_size,
                        compressor=blobs[0].compressor if blobs else DEFAULT_COMPRESSOR,
                        digester=blobs[0].digester if blobs else DEFAULT_DIGESTER)
    new_of: dict[tuple[int, int], ChunkInfo] = {}
    try:
        for k in order:
            c = reader.by_addr[k]
            try:
                data = read_chunk(src, blobs[c.blob_index].blob_id, c, verify=True)
            except DigestMismatchError as exc:
                raise DigestMismatchError(f"blob {blobs[c.blob_index].blob_id[:12]} "
                                          f"{exc}") from exc
            new_of[k] = writer.add_chunk(data, 0, c.digest)
        new_blob = writer.finish()
    except BaseException:
        writer.abort()
        raise
    done: set[int] = set()
    for _, node in root.walk():
        ino = node.inode
        if ino.chunks and id(ino) not in done:
            done.add(id(ino))
            ino.chunks = [new_of[key_of[id(c)]] for c in ino.chunks]
    unique_first = list(dict.fromkeys(first_keys))
    plan = write_bootstrap(root, [new_blob] if new_blob else [], writer.chunks,
                           chunk_size=reader.image.chunk_size,
                           compressor=blobs[0].compressor if blobs else DEFAULT_COMPRESSOR,
                           digester=blobs[0].digester if blobs else DEFAULT_DIGESTER,
                           prefetch=prefetch)
    try:
        write_file_atomic(out_bootstrap, plan.data)
    except BaseException:
        writer.remove_created()
        raise
    return OptimizeResult(bootstrap=out_bootstrap, blob=new_blob, prefetch_files=len(prefetch),
                          prefetch_chunks=len(unique_first),
                          prefetch_bytes=sum(new_of[k].uncompressed_size for k in unique_first))
