"""Build sources: a directory on disk or a tar / tar.gz stream, turned into a `Node` tree.

Regular-file data is chunked into the `BlobWriter` as it is met, so a tar stream is
read once, front to back, with memory bounded by the chunk size.  Directories are
walked in sorted byte order, so the blob layout is deterministic.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from typing import Any, BinaryIO, cast

from erofs_nydus.builder.blob import BlobWriter
from erofs_nydus.builder.inflate import INFLATE_ERRORS, ReadAhead
from erofs_nydus.builder.tarheader import FastTarInfo
from erofs_nydus.errors import SourceError, UnsupportedError
from erofs_nydus.layout.erofs import split_xattr_name
from erofs_nydus.rafs.tree import Inode, Node, new_dir

MAX_SYMLINK = 4095
MAX_NAME = 255


def _check_xattrs(xattrs: dict[bytes, bytes], where: str) -> None:
    for name, value in xattrs.items():
        if split_xattr_name(name) is None:
            shown = name.decode(errors="replace")
            raise SourceError(f"{where}: unsupported xattr namespace: {shown} "
                              "(supported: user., trusted., security., POSIX ACLs)")
        if len(value) > 0xFFFF:
            raise SourceError(f"{where}: xattr {name.decode(errors='replace')} value too large")


def _display(path: bytes) -> str:
    return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")


# -- directory ------------------------------------------------------------------------------

def _read_xattrs(path: bytes, where: str) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (95, 61):  # EOPNOTSUPP, ENODATA
            return {}
        raise SourceError(f"{where}: cannot list xattrs: {exc.strerror}") from exc
    out: dict[bytes, bytes] = {}
    for name in names:
        try:
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            raise SourceError(f"{where}: cannot read xattr {name}: {exc.strerror}") from exc
    _check_xattrs(out, where)
    return out


def _inode_from_stat(st: os.stat_result, xattrs: dict[bytes, bytes]) -> Inode:
    ino = Inode(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime=max(st.st_mtime_ns, 0)
                // 1_000_000_000, mtime_nsec=max(st.st_mtime_ns, 0) % 1_000_000_000,
                xattrs=xattrs)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        ino.rdev_major, ino.rdev_minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    return ino


def tree_from_dir(top: str | bytes, writer: BlobWriter) -> Node:
    """Walk `top` (not following symlinks) and return the root `Node`."""
    top_b = os.fsencode(top)
    try:
        st = os.lstat(top_b)
    except OSError as exc:
        raise SourceError(f"{_display(top_b)}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError(f"{_display(top_b)}: not a directory")
    root = Node(b"", _inode_from_stat(st, _read_xattrs(top_b, "/")))
    hardlinks: dict[tuple[int, int], Inode] = {}
    stack: list[tuple[bytes, bytes, Node]] = [(top_b, b"", root)]
    while stack:
        path, rel, node = stack.pop()
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            raise SourceError(f"{_display(rel or b'/')}: cannot list directory: "
                              f"{exc.strerror}") from exc
        subdirs: list[tuple[bytes, bytes, Node]] = []
        for name in names:
            cpath = path + b"/" + name
            crel = rel + b"/" + name
            where = _display(crel)
            if len(name) > MAX_NAME:
                raise SourceError(f"{where}: name longer than {MAX_NAME} bytes")
            try:
                cst = os.lstat(cpath)
            except OSError as exc:
                raise SourceError(f"{where}: {exc.strerror}") from exc
            mode = cst.st_mode
            if cst.st_nlink > 1 and not stat.S_ISDIR(mode):
                shared = hardlinks.get((cst.st_dev, cst.st_ino))
                if shared is not None:
                    assert node.children is not None
                    node.children[name] = Node(name, shared)
                    continue
            inode = _inode_from_stat(cst, _read_xattrs(cpath, where))
            child = Node(name, inode)
            if stat.S_ISREG(mode):
                inode.size = cst.st_size
                inode.chunks = writer.add_file(cpath, cst.st_size, where)
            elif stat.S_ISLNK(mode):
                try:
                    inode.target = os.readlink(cpath)
                except OSError as exc:
                    raise SourceError(f"{where}: cannot read link: {exc.strerror}") from exc
                if len(inode.target) > MAX_SYMLINK:
                    raise SourceError(f"{where}: symlink target longer than {MAX_SYMLINK} bytes")
                inode.size = len(inode.target)
            elif stat.S_ISDIR(mode):
                subdirs.append((cpath, crel, child))
            elif not (stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode)
                      or stat.S_ISSOCK(mode)):
                raise SourceError(f"{where}: unsupported file type {stat.S_IFMT(mode):o}")
            if cst.st_nlink > 1 and not stat.S_ISDIR(mode):
                hardlinks[(cst.st_dev, cst.st_ino)] = inode
            assert node.children is not None
            node.children[name] = child
        stack.extend(reversed(subdirs))
    return root


# -- tar ------------------------------------------------------------------------------------

_TAR_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError, EOFError, *INFLATE_ERRORS, OSError, UnicodeError)
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _tar_path(name: str, where: str) -> list[bytes]:
    raw = name.encode("utf-8", "surrogateescape")
    if raw.startswith(b"/"):
        raise SourceError(f"tar entry {where}: absolute path not allowed")
    parts = [p for p in raw.split(b"/") if p and p != b"."]
    if b".." in parts:
        raise SourceError(f"tar entry {where}: path with '..' not allowed")
    for p in parts:
        if len(p) > MAX_NAME:
            raise SourceError(f"tar entry {where}: name component longer than {MAX_NAME} bytes")
    return parts


def _tar_inode(member: tarfile.TarInfo, where: str) -> Inode:
    xattrs: dict[bytes, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            xattrs[key[13:].encode("utf-8", "surrogateescape")] = value.encode(
                "utf-8", "surrogateescape")
    _check_xattrs(xattrs, f"tar entry {where}")
    mtime_ns = 0
    pax_mtime = member.pax_headers.get("mtime")
    if pax_mtime is not None:
        whole, _, frac = pax_mtime.partition(".")
        try:
            mtime_ns = int(whole) * 1_000_000_000 + int((frac + "000000000")[:9] or 0)
        except ValueError as exc:
            raise SourceError(f"tar entry {where}: bad PAX mtime {pax_mtime!r}") from exc
    else:
        mtime_ns = int(member.mtime) * 1_000_000_000
    mtime_ns = max(mtime_ns, 0)
    if member.isdir():
        ftype = stat.S_IFDIR
    elif member.isreg():
        ftype = stat.S_IFREG
    elif member.issym():
        ftype = stat.S_IFLNK
    elif member.ischr():
        ftype = stat.S_IFCHR
    elif member.isblk():
        ftype = stat.S_IFBLK
    elif member.isfifo():
        ftype = stat.S_IFIFO
    else:
        raise SourceError(f"tar entry {where}: unsupported entry type {member.type!r}")
    inode = Inode(mode=ftype | (member.mode & 0o7777), uid=member.uid, gid=member.gid,
                  mtime=mtime_ns // 1_000_000_000, mtime_nsec=mtime_ns % 1_000_000_000,
                  xattrs=xattrs)
    if member.ischr() or member.isblk():
        inode.rdev_major, inode.rdev_minor = member.devmajor, member.devminor
    if member.issym():
        inode.target = member.linkname.encode("utf-8", "surrogateescape")
        if len(inode.target) > MAX_SYMLINK:
            raise SourceError(f"tar entry {where}: symlink target longer than {MAX_SYMLINK} bytes")
        inode.size = len(inode.target)
    return inode


def _parent_of(root: Node, parts: list[bytes], is_whiteout: bool) -> Node | None:
    """Find or synthesize (implicit, mode 0755) the parent directory of `parts`.

    A whiteout below a path this layer made a non-directory is moot (the new entry
    already hides everything below it; umoci writes such pairs): None, skip it.
    """
    node = root
    for part in parts[:-1]:
        assert node.children is not None
        child = node.children.get(part)
        if child is None or child.children is None:
            if child is not None and is_whiteout:
                return None
            child = new_dir(part, implicit=True)
            node.children[part] = child
        node = child
    return node


def _place(root: Node, parts: list[bytes], node: Node) -> None:
    parent = _parent_of(root, parts, parts[-1].startswith(b".wh."))
    if parent is None:
        return
    assert parent.children is not None
    old = parent.children.get(parts[-1])
    if old is not None and old.children is not None and node.children is not None:
        node.children = old.children  # a repeated dir entry updates metadata, keeps children
    parent.children[parts[-1]] = node


def tree_from_tar(stream: BinaryIO, writer: BlobWriter, label: str = "tar") -> Node:
    """Read a tar or tar.gz stream (gzip detected by magic) and return the root `Node`."""
    root = new_dir(b"", implicit=True)
    paths: dict[bytes, Node] = {}
    where = label
    try:
        raw: Any = stream if hasattr(stream, "peek") else io.BufferedReader(cast(Any, stream))
        magic = raw.peek(4)[:4]
        if magic.startswith(_ZSTD_MAGIC):
            raise UnsupportedError(f"{label}: zstd-compressed layers are not supported "
                                   "(use tar or tar.gz)")
        # fetch (+ gunzip) in a thread, a bounded queue ahead of the tar parser
        data = ReadAhead(raw, gzip=magic.startswith(_GZIP_MAGIC), name=f"read {label}")
    except _TAR_ERRORS as exc:
        raise SourceError(f"{label}: not a readable tar or tar.gz stream: {exc}") from exc
    try:
        try:
            # "r:" (not "r|"): member data is read straight from the forward-only reader
            tf = tarfile.open(fileobj=data, mode="r:", encoding="utf-8",  # noqa: SIM115
                              errors="surrogateescape", tarinfo=FastTarInfo)
        except _TAR_ERRORS as exc:
            raise SourceError(f"{label}: not a readable tar or tar.gz stream: {exc}") from exc
        with tf:
            for member in tf:
                where = repr(member.name)
                parts = _tar_path(member.name, where)
                if not parts:  # the root itself ("./")
                    if member.isdir():
                        inode = _tar_inode(member, where)
                        root.inode = inode
                    continue
                key = b"/".join(parts)
                if member.islnk():
                    target = _tar_path(member.linkname, where)
                    tnode = paths.get(b"/".join(target))
                    if tnode is None:
                        raise SourceError(f"tar entry {where}: hard link to missing target "
                                          f"{member.linkname!r}")
                    if tnode.children is not None:
                        raise SourceError(f"tar entry {where}: hard link to a directory")
                    node = Node(parts[-1], tnode.inode)  # hard links share one inode
                else:
                    node = Node(parts[-1], _tar_inode(member, where))
                    if member.isreg():
                        member_f: Any = data
                        if member.issparse():
                            member_f = tf.extractfile(member)
                        else:  # straight from the reader: no per-member file object
                            data.seek(member.offset_data)
                        node.inode.size = member.size
                        node.inode.chunks = writer.add_stream(member_f, member.size,
                                                              f"tar entry {where}")
                _place(root, parts, node)
                paths[key] = node
            where = "the end-of-archive marker"
            while data.read(1 << 20):  # drain: gzip verifies its CRC32 and length at EOF
                pass
    except SourceError:
        raise
    except _TAR_ERRORS as exc:
        raise SourceError(f"{label}: truncated or corrupt tar stream (after entry {where}): "
                          f"{exc}") from exc
    finally:
        data.close()  # stops and joins the read-ahead thread
    return root
