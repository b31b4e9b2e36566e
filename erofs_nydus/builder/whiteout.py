"""OCI whiteouts and layer merging (flatten layer bootstraps bottom to top).

Layer bootstraps keep whiteouts as data, in OCI form: an empty file `.wh.<name>`
removes `<name>` from the layers below; `.wh..wh..opq` in a directory hides
everything the lower layers had in it.  `create --whiteout-spec overlayfs` turns
the overlayfs convention (char device 0:0, `trusted.overlay.opaque=y`) into that
form, so `merge` only knows one.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Sequence
from dataclasses import replace

from erofs_nydus.errors import FormatError, UsageError
from erofs_nydus.rafs.image import BlobInfo, ChunkInfo
from erofs_nydus.rafs.tree import Inode, Node

WH_PREFIX = b".wh."
WH_OPAQUE = b".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = b"trusted.overlay.opaque"
WHITEOUT_SPECS = ("oci", "overlayfs", "none")


def _marker(name: bytes, like: Inode) -> Node:
    return Node(name, Inode(mode=stat.S_IFREG | 0o644, uid=like.uid, gid=like.gid,
                            mtime=like.mtime, mtime_nsec=like.mtime_nsec))


def normalize_whiteouts(root: Node, spec: str) -> None:
    """Rewrite a layer tree's whiteouts into OCI markers (`overlayfs`), or keep them."""
    if spec not in WHITEOUT_SPECS:
        raise UsageError(f"--whiteout-spec {spec}: choose one of {WHITEOUT_SPECS}")
    if spec != "overlayfs":
        return
    for _, node in list(root.walk()):
        if node.children is None:
            continue
        for name, child in list(node.children.items()):
            ino = child.inode
            if stat.S_ISCHR(ino.mode) and ino.rdev_major == 0 and ino.rdev_minor == 0:
                del node.children[name]
                node.children[WH_PREFIX + name] = _marker(WH_PREFIX + name, ino)
        if node.inode.xattrs.get(OVERLAY_OPAQUE_XATTR) == b"y":
            del node.inode.xattrs[OVERLAY_OPAQUE_XATTR]
            node.children[WH_OPAQUE] = _marker(WH_OPAQUE, node.inode)


class MergeError(FormatError):
    """A layer stack that cannot be flattened (whiteout with nothing below, ...)."""


def _is_marker(name: bytes) -> bool:
    return name.startswith(WH_PREFIX)


def apply_layer(lower: Node, upper: Node, path: bytes, warn: Callable[[str], None] | None,
                layer: int) -> None:
    """Apply directory `upper` (one layer) onto directory `lower` (the merged result)."""
    assert lower.children is not None and upper.children is not None
    here = path or b"/"

    def missing(what: str) -> None:
        msg = f"layer {layer}: {what}"
        if warn is None:
            raise MergeError(msg)
        warn(msg)

    if WH_OPAQUE in upper.children:
        if not path:
            raise MergeError(f"layer {layer}: opaque marker in the root directory")
        lower.children.clear()
    for name in sorted(upper.children):
        if name == WH_OPAQUE or not _is_marker(name):
            continue
        target = name[len(WH_PREFIX):]
        if not target:
            raise MergeError(f"layer {layer}: empty whiteout name in {_show(here)}")
        if lower.children.pop(target, None) is None:
            missing(f"whiteout {_show(path + b'/' + target)} has nothing below to remove")
    for name in sorted(upper.children):
        if _is_marker(name):
            continue
        up = upper.children[name]
        low = lower.children.get(name)
        cpath = path + b"/" + name
        if up.children is not None and low is not None and low.children is not None:
            if not up.inode.implicit:
                low.inode = up.inode  # the upper directory's metadata wins, children merge
            apply_layer(low, up, cpath, warn, layer)
        elif up.children is not None:
            fresh = Node(name, up.inode)
            lower.children[name] = fresh
            apply_layer(fresh, up, cpath, warn, layer)
        else:
            lower.children[name] = up


def _show(path: bytes) -> str:
    return path.decode("utf-8", "backslashreplace") or "/"


def merge_trees(layers: list[tuple[Node, list[BlobInfo]]], warn: Callable[[str], None] | None
                ) -> tuple[Node, list[BlobInfo], list[ChunkInfo]]:
    """Flatten layers (bottom first).  Returns the tree, the blob table and the chunk table
    with chunks relabelled to the merged blob order (first appearance, bottom to top,
    only blobs still referenced)."""
    if not layers:
        raise UsageError("merge needs at least one layer bootstrap")
    # Give every layer's chunks a global blob key (blob id) before merging trees.
    base_root, _ = layers[0]
    merged = Node(b"", base_root.inode)
    for i, (root, _blobs) in enumerate(layers):
        if root.children is None:
            raise MergeError(f"layer {i}: root is not a directory")
        if not root.inode.implicit or i == 0:
            merged.inode = root.inode
        apply_layer(merged, root, b"", warn, i)
    blob_order: list[str] = []
    info_by_id: dict[str, BlobInfo] = {}
    for _root, blobs in layers:
        for b in blobs:
            info_by_id.setdefault(b.blob_id, b)
    # which blob ids are referenced, in first-appearance order over layers
    layer_of_inode: dict[int, list[BlobInfo]] = {}
    for root, blobs in layers:
        for _, node in root.walk():
            layer_of_inode.setdefault(id(node.inode), blobs)
    referenced: set[str] = set()
    for _, node in merged.walk():
        if node.inode.chunks:
            blobs = layer_of_inode[id(node.inode)]
            referenced.update(blobs[c.blob_index].blob_id for c in node.inode.chunks)
    for _root, blobs in layers:
        for b in blobs:
            if b.blob_id in referenced and b.blob_id not in blob_order:
                blob_order.append(b.blob_id)
    new_index = {bid: i for i, bid in enumerate(blob_order)}
    relabelled: dict[tuple[str, int], ChunkInfo] = {}

    def relabel(c: ChunkInfo, blobs: list[BlobInfo]) -> ChunkInfo:
        bid = blobs[c.blob_index].blob_id
        key = (bid, c.uncompressed_offset)
        got = relabelled.get(key)
        if got is None:
            got = relabelled[key] = replace(c, blob_index=new_index[bid])
        return got

    done: set[int] = set()
    for _, node in merged.walk():
        ino = node.inode
        if ino.chunks and id(ino) not in done:
            done.add(id(ino))
            blobs = layer_of_inode[id(ino)]
            ino.chunks = [relabel(c, blobs) for c in ino.chunks]
    out_blobs = [replace(info_by_id[bid], blob_index=i) for i, bid in enumerate(blob_order)]
    return merged, out_blobs, list(relabelled.values())


def add_blob_chunks(table: list[ChunkInfo], layers_chunks: list[tuple[list[BlobInfo],
                    Sequence[Sequence[ChunkInfo]]]], blobs: list[BlobInfo]) -> list[ChunkInfo]:
    """Complete the chunk table with every known chunk of each kept blob, so the daemon
    knows each blob's whole layout (amplification, prefetch), not only referenced chunks."""
    index = {b.blob_id: b.blob_index for b in blobs}
    seen = {(c.blob_index, c.uncompressed_offset) for c in table}
    out = list(table)
    for layer_blobs, chunks in layers_chunks:
        for b in layer_blobs:
            if b.blob_id not in index:
                continue
            new = index[b.blob_id]
            for c in chunks[b.blob_index]:
                if (new, c.uncompressed_offset) not in seen:
                    seen.add((new, c.uncompressed_offset))
                    out.append(replace(c, blob_index=new))
    return out
