"""`create_image`: the builder's one entry point.

source -> tree (chunking data into the blob writer as it goes) -> blob finished and
renamed -> bootstrap planned, written to a temp name, renamed.  Any error removes
every temporary file, so a failed build leaves nothing behind.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

from erofs_nydus.builder.blob import BlobStats, BlobWriter, ChunkLookup
from erofs_nydus.builder.bootstrap import write_bootstrap
from erofs_nydus.builder.source import tree_from_dir, tree_from_tar
from erofs_nydus.errors import SourceError, UsageError
from erofs_nydus.fsutil import atomic_write
from erofs_nydus.layout.rafs import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from erofs_nydus.rafs.codec import COMPRESSORS as CODEC_COMPRESSORS
from erofs_nydus.rafs.codec import DEFAULT_COMPRESSOR, DEFAULT_DIGESTER
from erofs_nydus.rafs.codec import DIGESTERS as CODEC_DIGESTERS
from erofs_nydus.rafs.image import BlobInfo, ChunkInfo
from erofs_nydus.rafs.tree import Node

COMPRESSORS = CODEC_COMPRESSORS
DIGESTERS = CODEC_DIGESTERS


@dataclass(slots=True)
class BuildOptions:
    chunk_size: int = 0x100000
    compressor: str = DEFAULT_COMPRESSOR
    digester: str = DEFAULT_DIGESTER
    blob_cache_dir: str | None = None
    chunk_dicts: list[str] = field(default_factory=list)
    whiteout_spec: str = "none"
    # chunk digest + compress threads (blob.py); None: one per CPU, at most 4; 0: none
    threads: int | None = None

    def worker_threads(self) -> int:
        if self.threads is None:
            return min(4, os.cpu_count() or 1)
        return self.threads

    def validate(self) -> None:
        cs = self.chunk_size
        if cs < MIN_CHUNK_SIZE or cs > MAX_CHUNK_SIZE or cs & (cs - 1):
            raise UsageError(f"--chunk-size {cs:#x}: must be a power of two between "
                             f"{MIN_CHUNK_SIZE:#x} and {MAX_CHUNK_SIZE:#x}")
        if self.compressor not in COMPRESSORS:
            raise UsageError(f"--compressor {self.compressor}: choose one of "
                             f"{', '.join(COMPRESSORS)}")
        if self.digester not in DIGESTERS:
            raise UsageError(f"--digester {self.digester}: choose one of {', '.join(DIGESTERS)}")
        if self.threads is not None and not 0 <= self.threads <= 64:
            raise UsageError(f"threads {self.threads}: must be between 0 and 64")


@dataclass(slots=True)
class BuildResult:
    bootstrap: str
    bootstrap_size: int
    inodes: int
    blobs: list[BlobInfo]
    new_blob: BlobInfo | None
    stats: BlobStats
    chunk_size: int
    compressor: str
    digester: str = DEFAULT_DIGESTER

    def to_json(self) -> dict[str, Any]:
        s = self.stats
        return {
            "bootstrap": self.bootstrap,
            "bootstrap_size": self.bootstrap_size,
            "inodes": self.inodes,
            "chunk_size": self.chunk_size,
            "compressor": self.compressor,
            "digester": self.digester,
            "blobs": [
                {"blob_id": b.blob_id, "blob_index": b.blob_index,
                 "compressed_size": b.compressed_size,
                 "blob_file_size": b.file_size, "compressor": b.compressor,
                 "digester": b.digester,
                 "uncompressed_size": b.uncompressed_size, "chunk_count": b.chunk_count,
                 "new": self.new_blob is not None and b.blob_id == self.new_blob.blob_id}
                for b in self.blobs
            ],
            "dedup": {
                "chunks_referenced": s.chunks_referenced,
                "bytes_referenced": s.bytes_referenced,
                "chunks_stored": s.chunks_stored,
                "bytes_stored_uncompressed": s.bytes_stored_uncompressed,
                "bytes_stored_compressed": s.bytes_stored_compressed,
                "chunks_deduplicated": s.chunks_deduplicated,
                "chunks_from_chunk_dict": s.chunks_from_dict,
            },
        }


def _open_source(source: str) -> tuple[str, BinaryIO | None]:
    """Classify SOURCE: ("dir", None) or ("tar", stream)."""
    if source == "-":
        return "tar", sys.stdin.buffer
    try:
        st = os.stat(source)
    except OSError as exc:
        raise SourceError(f"{source}: {exc.strerror}") from exc
    if stat.S_ISDIR(st.st_mode):
        return "dir", None
    try:
        return "tar", open(source, "rb")
    except OSError as exc:
        raise SourceError(f"{source}: {exc.strerror}") from exc


def _load_chunk_dicts(paths: list[str], opts: BuildOptions) -> ChunkLookup | None:
    if not paths:
        return None
    from erofs_nydus.rafs.reader import read_bootstrap_file

    lookup = ChunkLookup()
    for path in paths:
        img = read_bootstrap_file(path)
        if img.chunk_size != opts.chunk_size:
            raise UsageError(f"--chunk-dict {path}: chunk size {img.chunk_size:#x} differs from "
                             f"--chunk-size {opts.chunk_size:#x}")
        for b in img.blobs:
            if b.compressor != opts.compressor:
                raise UsageError(f"--chunk-dict {path}: blob {b.blob_id[:12]} uses compressor "
                                 f"{b.compressor}, this build uses {opts.compressor}; pass "
                                 f"--compressor {b.compressor} to reuse its chunks")
            if b.digester != opts.digester:
                raise UsageError(f"--chunk-dict {path}: blob {b.blob_id[:12]} uses digester "
                                 f"{b.digester}, this build uses {opts.digester}; pass "
                                 f"--digester {b.digester} to reuse its chunks")
            lookup.add_blob(b, img.chunks[b.blob_index])
    return lookup


def _assign_blobs(root: Node, writer: BlobWriter, new_blob: BlobInfo | None,
                  lookup: ChunkLookup | None) -> tuple[list[BlobInfo], list[ChunkInfo]]:
    """Final blob table: used dictionary blobs first (lookup order), then the new blob.

    Chunks are relabelled with their final blob_index; files are updated in place.
    """
    used = sorted({c.blob_index for c in writer.used_dict_chunks.values()})
    assert lookup is not None or not used
    dict_blobs = [lookup.blobs[i] for i in used] if lookup is not None else []
    final_of_dict = {lookup_index: pos for pos, lookup_index in enumerate(used)}
    blobs = [replace(b, blob_index=i) for i, b in enumerate(dict_blobs)]
    if new_blob is not None:
        blobs.append(replace(new_blob, blob_index=len(blobs)))
    new_index = len(blobs) - 1
    new_ids = {id(c) for c in writer.chunks}
    relabelled: dict[int, ChunkInfo] = {}

    def relabel(c: ChunkInfo) -> ChunkInfo:
        got = relabelled.get(id(c))
        if got is None:
            idx = new_index if id(c) in new_ids else final_of_dict[c.blob_index]
            got = relabelled[id(c)] = c if idx == c.blob_index else replace(c, blob_index=idx)
        return got

    seen: set[int] = set()
    for _, node in root.walk():
        if node.inode.chunks and id(node.inode) not in seen:
            seen.add(id(node.inode))
            node.inode.chunks = [relabel(c) for c in node.inode.chunks]
    table = [relabel(c) for c in writer.chunks]
    table += [relabel(c) for c in writer.used_dict_chunks.values()]
    return blobs, table


def write_file_atomic(path: str, data: bytes) -> None:
    """`atomic_write`, with failures as SourceError (what build commands report)."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(path, data)
    except OSError as exc:
        raise SourceError(f"cannot write {path}: {exc.strerror}") from exc


def create_image(source: str | BinaryIO, bootstrap: str, blob_dir: str,
                 opts: BuildOptions | None = None, label: str | None = None,
                 blob_tee: Callable[[bytes], None] | None = None,
                 blob_written: Callable[[str], None] | None = None) -> BuildResult:
    """Build `source` into `bootstrap` + a blob in `blob_dir`.

    `source` is a directory, a tar or tar.gz file, "-" (stdin), or an open binary
    stream of a tar/tar.gz (not closed here); `label` names it in error messages.
    `blob_tee` is given every byte of the new blob in order as it is written (convert
    streams it to the registry); the blob is only valid once this returns.
    `blob_written(blob_id)` is called when the tee has seen the new blob's last byte
    (`BlobWriter.finish`), before the blob is synced and the bootstrap built; not at
    all when the build stores no new blob or fails before.
    """
    opts = opts or BuildOptions()
    opts.validate()
    lookup = _load_chunk_dicts(opts.chunk_dicts, opts)
    if isinstance(source, str):
        kind, stream = _open_source(source)
        owned = stream is not None and source != "-"
        label = label or ("stdin" if source == "-" else source)
    else:
        kind, stream, owned = "tar", source, False
        label = label or "tar stream"
    writer = BlobWriter(blob_dir, chunk_size=opts.chunk_size, compressor=opts.compressor,
                        cache_dir=opts.blob_cache_dir, chunk_dict=lookup,
                        digester=opts.digester, threads=opts.worker_threads(), tee=blob_tee)
    new_blob: BlobInfo | None = None
    try:
        try:
            if kind == "dir":
                assert isinstance(source, str)
                root = tree_from_dir(source, writer)
            else:
                assert stream is not None
                root = tree_from_tar(stream, writer, label=label)
        finally:
            if owned and stream is not None:
                stream.close()
        if opts.whiteout_spec != "none":
            from erofs_nydus.builder.whiteout import normalize_whiteouts

            normalize_whiteouts(root, opts.whiteout_spec)
        # the blob's fsync and rename run in a thread while the bootstrap is planned
        new_blob = writer.finish(blob_written, background=True)
    except BaseException:
        writer.abort()
        raise
    try:
        blobs, table = _assign_blobs(root, writer, new_blob, lookup)
        if new_blob is not None:
            new_blob = blobs[-1]
        plan = write_bootstrap(root, blobs, table, chunk_size=opts.chunk_size,
                               compressor=opts.compressor, digester=opts.digester)
    except BaseException:
        try:
            writer.installed()  # the blob is in place, as when planning failed before
        except SourceError:
            pass
        raise
    writer.installed()  # the blob is in place before a bootstrap names it
    try:
        write_file_atomic(bootstrap, plan.data)
    except BaseException:
        writer.remove_created()
        raise
    return BuildResult(bootstrap=bootstrap, bootstrap_size=len(plan.data), inodes=plan.inode_count,
                       blobs=blobs, new_blob=new_blob, stats=writer.stats,
                       chunk_size=opts.chunk_size, compressor=opts.compressor,
                       digester=opts.digester)
