"""The in-memory file tree shared by the builder, the bootstrap reader and merge.

A `Node` is a name in a directory; an `Inode` carries the metadata.  Hard-linked
names are several `Node`s sharing one `Inode` object.  Regular files carry their
chunk list (`ChunkInfo` from image.py, one per chunk_size piece of the file).
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from erofs_nydus.rafs.image import ChunkInfo


@dataclass(eq=False, slots=True)
class Inode:
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    mtime_nsec: int = 0
    size: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    target: bytes = b""  # symlink target
    chunks: list[ChunkInfo] = field(default_factory=list)  # regular files
    # A directory a tar layer never listed, synthesized as the parent of an entry: when
    # layers are merged it must not override the lower layer's metadata for that path.
    implicit: bool = False

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)


@dataclass(eq=False, slots=True)
class Node:
    name: bytes
    inode: Inode
    children: dict[bytes, Node] | None = None  # set for directories

    def __post_init__(self) -> None:
        if self.inode.is_dir and self.children is None:
            self.children = {}

    def sorted_children(self) -> list[Node]:
        assert self.children is not None
        return [self.children[k] for k in sorted(self.children)]

    def walk(self) -> Iterator[tuple[bytes, Node]]:
        """Yield (path, node) depth-first in sorted order, this node as b"/" (iterative)."""
        stack: list[tuple[bytes, Node]] = [(b"/", self)]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children is not None:
                base = b"" if path == b"/" else path
                stack.extend((base + b"/" + c.name, c) for c in reversed(node.sorted_children()))


def new_dir(name: bytes, mode: int = 0o755, implicit: bool = False) -> Node:
    return Node(name, Inode(mode=stat.S_IFDIR | (mode & 0o7777), implicit=implicit))


def lookup(root: Node, path: bytes) -> Node | None:
    node = root
    for part in [p for p in path.split(b"/") if p]:
        if node.children is None or part not in node.children:
            return None
        node = node.children[part]
    return node
