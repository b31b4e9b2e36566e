"""`inspect`: the tree or one file's inode, chunks and blob mapping, as text or JSON."""

from __future__ import annotations

import os
import stat
from typing import Any

from erofs_nydus.errors import UsageError
from erofs_nydus.layout.rafs import feature_names
from erofs_nydus.rafs.reader import BootstrapReader
from erofs_nydus.rafs.tree import Node, lookup


def _path_str(p: bytes) -> str:
    return os.fsdecode(p)


def image_summary(reader: BootstrapReader) -> dict[str, Any]:
    img = reader.image
    return {
        "bootstrap_size": img.bootstrap_size,
        "fsid": img.fsid,
        "chunk_size": img.chunk_size,
        "flags": f"{img.flags:#x}",
        "inodes": reader.sb.inos,
        "root_nid": reader.sb.root_nid,
        "meta_blkaddr": reader.sb.meta_blkaddr,
        "blobs": [
            {"blob_id": b.blob_id, "blob_index": b.blob_index, "device_id": b.blob_index + 1,
             "compressor": b.compressor, "digester": b.digester, "chunk_count": b.chunk_count,
             "compressed_size": b.compressed_size, "uncompressed_size": b.uncompressed_size,
             "blob_file_size": b.file_size, "chunk_data_size": b.chunk_data_size,
             "features": feature_names(b.features), "ci_compressor": b.ci_compressor,
             "ci_offset": b.ci_offset, "ci_compressed_size": b.ci_compressed_size,
             "blob_toc_size": b.blob_toc_size, "mapped_blkaddr": b.mapped_blkaddr,
             "chunks_in_table": len(img.chunks[b.blob_index])}
            for b in img.blobs
        ],
        "prefetch_nids": reader.prefetch_nids(),
    }


def node_info(path: bytes, node: Node, blob_ids: list[str]) -> dict[str, Any]:
    ino = node.inode
    info: dict[str, Any] = {
        "path": _path_str(path), "type": stat.filemode(ino.mode)[0],
        "mode": f"{ino.mode & 0o7777:04o}", "uid": ino.uid, "gid": ino.gid,
        "mtime": ino.mtime, "mtime_nsec": ino.mtime_nsec, "size": ino.size,
    }
    if ino.xattrs:
        info["xattrs"] = {_path_str(k): v.hex() for k, v in sorted(ino.xattrs.items())}
    if stat.S_ISLNK(ino.mode):
        info["target"] = _path_str(ino.target)
    if stat.S_ISCHR(ino.mode) or stat.S_ISBLK(ino.mode):
        info["rdev"] = [ino.rdev_major, ino.rdev_minor]
    if ino.chunks:
        info["chunks"] = [
            {"file_offset": n, "digest": c.digest.hex(), "digester": c.digester,
             "compressed": c.compressed, "compressor": c.compressor if c.compressed else "none",
             "blob_id": blob_ids[c.blob_index],
             "blob_index": c.blob_index, "ci_index": c.index,
             "compressed_offset": c.compressed_offset, "compressed_size": c.compressed_size,
             "uncompressed_offset": c.uncompressed_offset,
             "uncompressed_size": c.uncompressed_size}
            for n, c in _offsets(ino.chunks)
        ]
    return info


def _offsets(chunks: list[Any]) -> list[tuple[int, Any]]:
    out, off = [], 0
    for c in chunks:
        out.append((off, c))
        off += c.uncompressed_size
    return out


def inspect_path(reader: BootstrapReader, path: str) -> dict[str, Any]:
    root = reader.tree()
    node = lookup(root, os.fsencode(path))
    if node is None:
        raise UsageError(f"{path}: no such path in the image")
    return node_info(os.fsencode(path), node, [b.blob_id for b in reader.image.blobs])


def list_tree(reader: BootstrapReader) -> list[dict[str, Any]]:
    root = reader.tree()
    ids = [b.blob_id for b in reader.image.blobs]
    out = []
    for p, node in root.walk():
        info = node_info(p, node, ids)
        if "chunks" in info:
            info["chunks"] = len(info["chunks"])
        out.append(info)
    return out
