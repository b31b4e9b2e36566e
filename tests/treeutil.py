"""Test utilities for trees: generate, snapshot, compare, and tar them.

* :func:`make_synthetic_tree` builds a deterministic tree with every case an image
  builder has to get right and returns a :class:`Manifest` pointing at the special cases.
* :func:`snapshot_tree` records what a filesystem shows for every entry (bytes paths);
  :func:`snapshot_tar` records the same from a tar archive; :func:`compare_trees`
  diffs two snapshots (or two directories) and returns readable differences.
* :func:`write_tar` writes a deterministic PAX (xattrs, ns mtimes, non-UTF-8 names) or
  GNU tar of a tree; :func:`extract_tar` is a faithful reference extractor.

What EROFS can preserve, and so what a built-and-mounted tree should match:
file type, mode (incl. setuid/setgid/sticky), uid, gid, size of regular files,
rdev of devices, symlink targets, xattrs (user., trusted., security., POSIX ACLs),
hard links (several dirents, one inode), and mtime: seconds + nanoseconds in extended
inodes; compact inodes carry the superblock build time instead.  Never preserved:
atime and ctime (both read back as mtime), directory sizes (filesystem-specific; never
compared here), inode numbers (hard links are compared as a partition of paths).

Content digests are canonical so that sparse and dense copies compare equal: the
file is cut into 64 KiB aligned blocks, all-zero blocks are skipped, and
``sha256(size || (offset || block)...)`` is taken over the rest.  Holes found with
SEEK_DATA/SEEK_HOLE are never read, so a 5 GiB sparse file hashes in milliseconds.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip as gzip_mod
import hashlib
import os
import random
import socket
import stat
import struct
import tarfile
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

HASH_BLOCK = 64 * KiB
_ZERO_BLOCK = bytes(HASH_BLOCK)

PathLike = str | bytes | os.PathLike[str] | os.PathLike[bytes]

# ---------------------------------------------------------------------------------------
# Entries and snapshots
# ---------------------------------------------------------------------------------------

TYPE_NAMES = {
    stat.S_IFREG: "reg",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "lnk",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "sock",
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One path as seen by a snapshot.  Fields that do not apply are None."""

    path: bytes  # relative, b"/"-separated; the root is b"."
    type: str  # reg dir lnk chr blk fifo sock
    mode: int  # permission bits incl. setuid/setgid/sticky (S_IMODE)
    uid: int
    gid: int
    mtime_ns: int
    nlink: int
    size: int | None = None  # regular files only
    rdev: tuple[int, int] | None = None  # (major, minor) for chr/blk
    target: bytes | None = None  # symlink target
    xattrs: tuple[tuple[bytes, bytes], ...] = ()  # sorted by name
    digest: str | None = None  # canonical content digest (regular files)
    links: tuple[bytes, ...] = ()  # all paths sharing this inode, sorted; () if nlink == 1

    def xattr_dict(self) -> dict[bytes, bytes]:
        return dict(self.xattrs)


Snapshot = dict[bytes, Entry]


class ContentHasher:
    """Canonical content digest over aligned HASH_BLOCK blocks; all-zero blocks skipped."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._next = 0

    def block(self, off: int, data: bytes | memoryview) -> None:
        """Feed the block at ``off`` (a HASH_BLOCK multiple, increasing); it may be partial
        only at the end of the file.  Blocks never fed count as zeros."""
        if off % HASH_BLOCK or off < self._next:
            raise ValueError(f"ContentHasher.block: bad offset {off}")
        self._next = off + len(data)
        if data != _ZERO_BLOCK[: len(data)]:
            self._h.update(struct.pack("<QI", off, len(data)))
            self._h.update(data)

    def hexdigest(self, size: int) -> str:
        h = self._h.copy()
        h.update(struct.pack("<Q", size))
        return h.hexdigest()


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) data ranges via SEEK_DATA/SEEK_HOLE, or the whole file."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, size
                return
            raise
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


_READ_SPAN = 16 * HASH_BLOCK


def file_digest(path: PathLike, *, fd: int | None = None) -> str:
    """Canonical content digest of a regular file (see module docstring)."""
    own = fd is None
    if fd is None:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        h = ContentHasher()
        done = 0  # every block below this offset has been fed
        for start, end in _data_extents(fd, size):
            b = max((start // HASH_BLOCK) * HASH_BLOCK, done)
            stop = min(-(-end // HASH_BLOCK) * HASH_BLOCK, size)
            while b < stop:
                data = os.pread(fd, min(_READ_SPAN, stop - b), b)
                if not data:
                    break
                mv = memoryview(data)
                for i in range(0, len(data), HASH_BLOCK):
                    h.block(b + i, mv[i : i + HASH_BLOCK])
                b += len(data)
            done = max(done, b)
        return h.hexdigest(size)
    finally:
        if own:
            os.close(fd)


def stream_digest(f: IO[bytes], size: int | None = None) -> str:
    """Canonical digest of a stream (e.g. a tar member)."""
    h = ContentHasher()
    off = 0
    while True:
        data = _read_full(f, _READ_SPAN)
        if not data:
            break
        mv = memoryview(data)
        for i in range(0, len(data), HASH_BLOCK):
            h.block(off + i, mv[i : i + HASH_BLOCK])
        off += len(data)
        if len(data) < _READ_SPAN:
            break
    return h.hexdigest(off if size is None else size)


def _read_full(f: IO[bytes], n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def bytes_digest(data: bytes) -> str:
    """Canonical digest of in-memory content."""
    h = ContentHasher()
    mv = memoryview(data)
    for i in range(0, len(data), HASH_BLOCK):
        h.block(i, mv[i : i + HASH_BLOCK])
    return h.hexdigest(len(data))


def _read_xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return ()
        raise
    out: list[tuple[bytes, bytes]] = []
    for name in names:
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                continue
            raise
        out.append((os.fsencode(name), value))
    out.sort()
    return tuple(out)


def snapshot_tree(root: PathLike, *, content: bool = True, xattrs: bool = True) -> Snapshot:
    """Record every entry below ``root`` (inclusive, as b".").  Does not follow symlinks."""
    rootb = os.fsencode(os.fspath(root))
    snap: Snapshot = {}
    inodes: dict[tuple[int, int], list[bytes]] = {}
    stack: list[bytes] = [b"."]
    while stack:
        rel = stack.pop()
        full = rootb if rel == b"." else rootb + b"/" + rel
        st = os.lstat(full)
        fmt = stat.S_IFMT(st.st_mode)
        typ = TYPE_NAMES.get(fmt, f"unknown({fmt:o})")
        size: int | None = None
        rdev: tuple[int, int] | None = None
        target: bytes | None = None
        digest: str | None = None
        if fmt == stat.S_IFREG:
            size = st.st_size
            if content:
                digest = file_digest(full)
        elif fmt == stat.S_IFLNK:
            target = os.readlink(full)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        elif fmt == stat.S_IFDIR:
            with os.scandir(full) as it:
                names = [e.name for e in it]
            for n in names:
                stack.append(n if rel == b"." else rel + b"/" + n)
        if fmt != stat.S_IFDIR and st.st_nlink > 1:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        snap[rel] = Entry(
            path=rel,
            type=typ,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            mtime_ns=st.st_mtime_ns,
            nlink=st.st_nlink,
            size=size,
            rdev=rdev,
            target=target,
            xattrs=_read_xattrs(full) if xattrs else (),
            digest=digest,
        )
    for paths in inodes.values():
        if len(paths) > 1:
            group = tuple(sorted(paths))
            for p in group:
                snap[p] = dataclasses.replace(snap[p], links=group)
    return dict(sorted(snap.items()))


def _tar_name(name: str) -> bytes:
    b = os.fsencode(name) if isinstance(name, str) else name
    b = b.encode("utf-8", "surrogateescape") if isinstance(b, str) else b
    while b.startswith(b"./"):
        b = b[2:]
    b = b.strip(b"/")
    return b or b"."


def _pax_mtime_ns(ti: tarfile.TarInfo) -> int:
    raw = ti.pax_headers.get("mtime")
    if raw is not None:
        neg = raw.startswith("-")
        sec, _, frac = raw.lstrip("-").partition(".")
        ns = int(sec) * 10**9 + int((frac + "000000000")[:9] or 0)
        return -ns if neg else ns
    return int(ti.mtime) * 10**9


def snapshot_tar(tar_path: PathLike, *, content: bool = True) -> Snapshot:
    """What extracting ``tar_path`` should produce, as a snapshot (last member wins).

    Directory nlink is computed as 2 + subdirectories and file nlink as the hard-link
    group size, as a filesystem would report after extraction.  Parent directories
    missing from the archive are not invented.
    """
    snap: Snapshot = {}
    hard: dict[bytes, bytes] = {}  # link path -> canonical target path
    with tarfile.open(
        os.fsdecode(os.fspath(tar_path)), "r:*", encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for ti in tf:
            rel = _tar_name(ti.name)
            mtime_ns = _pax_mtime_ns(ti)
            xattrs = tuple(
                sorted(
                    (k[len("SCHILY.xattr.") :].encode(), v.encode("utf-8", "surrogateescape"))
                    for k, v in ti.pax_headers.items()
                    if k.startswith("SCHILY.xattr.")
                )
            )
            common: dict[str, Any] = {
                "path": rel,
                "mode": ti.mode & 0o7777,
                "uid": ti.uid,
                "gid": ti.gid,
                "mtime_ns": mtime_ns,
                "nlink": 1,
                "xattrs": xattrs,
            }
            if ti.islnk():
                tgt = _tar_name(ti.linkname)
                tgt = hard.get(tgt, tgt)
                if tgt not in snap:
                    raise ValueError(f"hard link {rel!r} to missing {tgt!r}")
                hard[rel] = tgt
                snap[rel] = dataclasses.replace(snap[tgt], path=rel)
                continue
            hard.pop(rel, None)
            if ti.isreg():
                digest = None
                if content:
                    f = tf.extractfile(ti)
                    assert f is not None
                    digest = stream_digest(f, ti.size)
                snap[rel] = Entry(type="reg", size=ti.size, digest=digest, **common)
            elif ti.isdir():
                snap[rel] = Entry(type="dir", **common)
            elif ti.issym():
                tgt_b = ti.linkname.encode("utf-8", "surrogateescape")
                snap[rel] = Entry(type="lnk", target=tgt_b, **common)
            elif ti.ischr() or ti.isblk():
                snap[rel] = Entry(
                    type="chr" if ti.ischr() else "blk", rdev=(ti.devmajor, ti.devminor), **common
                )
            elif ti.isfifo():
                snap[rel] = Entry(type="fifo", **common)
            else:
                raise ValueError(f"unsupported tar member type {ti.type!r} for {rel!r}")
    # hard-link groups
    groups: dict[bytes, list[bytes]] = {}
    for link, tgt in hard.items():
        groups.setdefault(tgt, [tgt]).append(link)
    for members in groups.values():
        group = tuple(sorted(members))
        for p in group:
            snap[p] = dataclasses.replace(snap[p], links=group, nlink=len(group))
    # directory nlink: 2 + subdirectories
    subdirs: dict[bytes, int] = {}
    for p, e in snap.items():
        if e.type == "dir" and p != b".":
            parent = p.rpartition(b"/")[0] or b"."
            subdirs[parent] = subdirs.get(parent, 0) + 1
    for p, e in snap.items():
        if e.type == "dir":
            snap[p] = dataclasses.replace(e, nlink=2 + subdirs.get(p, 0))
    return dict(sorted(snap.items()))


# ---------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------

#: Keys accepted by ``compare_trees(ignore=...)``.  A key "xattr:<prefix>" (e.g.
#: "xattr:trusted.", "xattr:system.posix_acl_") ignores xattrs whose name starts with it.
IGNORE_KEYS = frozenset(
    {
        "type",
        "mode",
        "uid",
        "gid",
        "mtime",  # all mtimes
        "mtime_nsec",  # compare mtimes at second granularity
        "root",  # skip the root entry entirely
        "root_mtime",
        "root_mode",
        "root_owner",
        "root_xattrs",
        "dir_mtime",
        "lnk_mtime",  # symlink mtimes (many extractors do not set them)
        "nlink",  # all nlink values
        "dir_nlink",
        "size",
        "content",
        "rdev",
        "target",
        "xattrs",
        "links",  # hard-link grouping
        "sockets",  # drop sockets on both sides (tar cannot carry them)
        "extra",  # paths only in b are fine
        "missing",  # paths only in a are fine
    }
)


def _fmt_path(p: bytes) -> str:
    text = p.decode("ascii", "replace")
    return text if p.isascii() and text.isprintable() else repr(p)[2:-1]


def _fmt_xattrs(x: Mapping[bytes, bytes]) -> str:
    def short(v: bytes) -> str:
        return repr(v if len(v) <= 24 else v[:20] + b"...")

    return "{" + ", ".join(f"{k.decode(errors='replace')}={short(v)}" for k, v in x.items()) + "}"


def _coerce(s: Snapshot | PathLike) -> Snapshot:
    if isinstance(s, dict):
        return s
    return snapshot_tree(s)


def compare_trees(
    a: Snapshot | PathLike,
    b: Snapshot | PathLike,
    *,
    ignore: Collection[str] = frozenset(),
    ignore_paths: Iterable[bytes] = (),
    limit: int | None = None,
) -> list[str]:
    """Differences between two trees as readable lines; [] means identical.

    ``a`` and ``b`` are snapshots or directories.  ``ignore`` takes keys from
    :data:`IGNORE_KEYS` or "xattr:<prefix>".  ``ignore_paths`` skips those paths and
    everything below them.  ``limit`` truncates the list (a last line says how many more).
    """
    ign = frozenset(ignore)
    unknown = {k for k in ign if k not in IGNORE_KEYS and not k.startswith("xattr:")}
    if unknown:
        raise ValueError(f"unknown ignore keys: {sorted(unknown)}")
    xattr_prefixes = tuple(k[len("xattr:") :].encode() for k in ign if k.startswith("xattr:"))
    sa, sb = _coerce(a), _coerce(b)
    skip = tuple(ignore_paths)

    def wanted(p: bytes, e: Entry) -> bool:
        if p == b"." and "root" in ign:
            return False
        if "sockets" in ign and e.type == "sock":
            return False
        return not any(p == s or p.startswith(s + b"/") for s in skip)

    diffs: list[str] = []
    keys_a = {p for p, e in sa.items() if wanted(p, e)}
    keys_b = {p for p, e in sb.items() if wanted(p, e)}
    if "missing" not in ign:
        for p in sorted(keys_a - keys_b):
            diffs.append(f"missing in b: {_fmt_path(p)} ({sa[p].type})")
    if "extra" not in ign:
        for p in sorted(keys_b - keys_a):
            diffs.append(f"extra in b: {_fmt_path(p)} ({sb[p].type})")

    def filt_x(x: tuple[tuple[bytes, bytes], ...]) -> dict[bytes, bytes]:
        return {k: v for k, v in x if not (xattr_prefixes and k.startswith(xattr_prefixes))}

    for p in sorted(keys_a & keys_b):
        ea, eb = sa[p], sb[p]
        name = _fmt_path(p)
        is_root = p == b"."
        is_dir = ea.type == "dir"

        def d(what: str, va: object, vb: object, name: str = name) -> None:
            diffs.append(f"{name}: {what} {va} != {vb}")

        if ea.type != eb.type:
            if "type" not in ign:
                d("type", ea.type, eb.type)
            continue
        if ea.mode != eb.mode and "mode" not in ign and not (is_root and "root_mode" in ign):
            d("mode", oct(ea.mode), oct(eb.mode))
        if not (is_root and "root_owner" in ign):
            if ea.uid != eb.uid and "uid" not in ign:
                d("uid", ea.uid, eb.uid)
            if ea.gid != eb.gid and "gid" not in ign:
                d("gid", ea.gid, eb.gid)
        if not (
            "mtime" in ign
            or (is_root and "root_mtime" in ign)
            or (is_dir and "dir_mtime" in ign)
            or (ea.type == "lnk" and "lnk_mtime" in ign)
        ):
            ma, mb = ea.mtime_ns, eb.mtime_ns
            if "mtime_nsec" in ign:
                ma, mb = ma // 10**9, mb // 10**9
            if ma != mb:
                d("mtime_ns" if "mtime_nsec" not in ign else "mtime", ma, mb)
        if (
            ea.nlink != eb.nlink
            and "nlink" not in ign
            and not (is_dir and "dir_nlink" in ign)
            and not (not is_dir and "links" in ign)
        ):
            d("nlink", ea.nlink, eb.nlink)
        if ea.size != eb.size and "size" not in ign:
            d("size", ea.size, eb.size)
        if ea.digest != eb.digest and "content" not in ign and ea.digest and eb.digest:
            d("content digest", ea.digest[:16], eb.digest[:16])
        if ea.rdev != eb.rdev and "rdev" not in ign:
            d("rdev", ea.rdev, eb.rdev)
        if ea.target != eb.target and "target" not in ign:
            d("symlink target", ea.target, eb.target)
        if "xattrs" not in ign and not (is_root and "root_xattrs" in ign):
            xa, xb = filt_x(ea.xattrs), filt_x(eb.xattrs)
            if xa != xb:
                only_a = {k: v for k, v in xa.items() if k not in xb}
                only_b = {k: v for k, v in xb.items() if k not in xa}
                changed = sorted(k for k in xa.keys() & xb.keys() if xa[k] != xb[k])
                parts = []
                if only_a:
                    parts.append(f"only in a {_fmt_xattrs(only_a)}")
                if only_b:
                    parts.append(f"only in b {_fmt_xattrs(only_b)}")
                for k in changed:
                    parts.append(f"{k.decode(errors='replace')}: {xa[k]!r:.60} != {xb[k]!r:.60}")
                diffs.append(f"{name}: xattrs differ: " + "; ".join(parts))
        if ea.links != eb.links and "links" not in ign:
            la = [_fmt_path(x) for x in ea.links] or ["(single)"]
            lb = [_fmt_path(x) for x in eb.links] or ["(single)"]
            d("hard-link group", la, lb)
    if limit is not None and len(diffs) > limit:
        extra = len(diffs) - limit
        diffs = [*diffs[:limit], f"... and {extra} more differences"]
    return diffs


#: What to ignore when comparing a source tree with an image made by mkfs.erofs 1.5
#: (and mounted): directory mtimes/root metadata follow the source, so nothing needed
#: beyond these.  Kept here so tests document it in one place.
MKFS_EROFS_15_IGNORE: frozenset[str] = frozenset()


# ---------------------------------------------------------------------------------------
# Tar writing and reference extraction
# ---------------------------------------------------------------------------------------


def _walk_sorted(rootb: bytes) -> Iterator[tuple[bytes, os.stat_result]]:
    """(relpath, lstat) in deterministic order: a directory, then its children by name."""
    st = os.lstat(rootb)
    yield b".", st
    stack: list[bytes] = [b"."]
    while stack:
        rel = stack.pop()
        full = rootb if rel == b"." else rootb + b"/" + rel
        names = sorted(os.listdir(full))
        subdirs: list[bytes] = []
        for n in names:
            crel = n if rel == b"." else rel + b"/" + n
            cst = os.lstat(rootb + b"/" + crel)
            yield crel, cst
            if stat.S_ISDIR(cst.st_mode):
                subdirs.append(crel)
        # depth-first after the listing: push in reverse so the first subdir comes next
        stack.extend(reversed(subdirs))


def _mtime_pax(ns: int) -> str:
    sec, frac = divmod(ns, 10**9)
    return f"{sec}.{frac:09d}" if frac else str(sec)


def write_tar(
    root: PathLike,
    out_path: PathLike,
    *,
    gzip: bool = False,
    format: int = tarfile.PAX_FORMAT,
    root_entry: bool = True,
    prefix: str = "",
) -> list[bytes]:
    """Write a deterministic tar of ``root``; returns the paths left out (sockets).

    PAX: xattrs as ``SCHILY.xattr.<name>`` (binary values via hdrcharset=BINARY),
    nanosecond mtimes, big uids, long and non-UTF-8 names.  GNU: long names via
    ././@LongLink, integer mtimes, no xattrs.  Hard links become LNKTYPE members
    pointing at the first path of their group in archive order.  Names are relative
    (``etc/passwd``); with ``root_entry`` the root directory is the member ``./``.
    ``gzip`` output has mtime 0 and no file name, so it is byte-reproducible.
    """
    rootb = os.fsencode(os.fspath(root))
    skipped: list[bytes] = []
    seen: dict[tuple[int, int], str] = {}
    raw = open(os.fspath(out_path), "wb")  # noqa: SIM115
    fileobj: IO[bytes] = raw
    gz: gzip_mod.GzipFile | None = None
    if gzip:
        gz = gzip_mod.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6)
        fileobj = gz  # type: ignore[assignment]
    try:
        with tarfile.open(
            fileobj=fileobj,
            mode="w|",
            format=format,
            encoding="utf-8",
            errors="surrogateescape",
        ) as tf:
            for rel, st in _walk_sorted(rootb):
                full = rootb if rel == b"." else rootb + b"/" + rel
                if rel == b"." and not root_entry:
                    continue
                name = prefix + ("./" if rel == b"." else os.fsdecode(rel))
                ti = tarfile.TarInfo(name)
                ti.mode = stat.S_IMODE(st.st_mode)
                ti.uid, ti.gid = st.st_uid, st.st_gid
                ti.uname = ti.gname = ""
                ti.mtime = st.st_mtime_ns // 10**9
                pax: dict[str, str] = {}
                if format == tarfile.PAX_FORMAT:
                    if st.st_mtime_ns % 10**9:
                        pax["mtime"] = _mtime_pax(st.st_mtime_ns)
                    for k, v in _read_xattrs(full):
                        pax["SCHILY.xattr." + k.decode("utf-8", "surrogateescape")] = v.decode(
                            "utf-8", "surrogateescape"
                        )
                fmt = stat.S_IFMT(st.st_mode)
                key = (st.st_dev, st.st_ino)
                data: IO[bytes] | None = None
                if fmt != stat.S_IFDIR and st.st_nlink > 1 and key in seen:
                    ti.type = tarfile.LNKTYPE
                    ti.linkname = seen[key]
                elif fmt == stat.S_IFREG:
                    ti.type = tarfile.REGTYPE
                    ti.size = st.st_size
                    data = open(full, "rb")  # noqa: SIM115
                elif fmt == stat.S_IFDIR:
                    ti.type = tarfile.DIRTYPE
                elif fmt == stat.S_IFLNK:
                    ti.type = tarfile.SYMTYPE
                    ti.linkname = os.fsdecode(os.readlink(full))
                elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
                    ti.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
                    ti.devmajor, ti.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
                elif fmt == stat.S_IFIFO:
                    ti.type = tarfile.FIFOTYPE
                else:
                    skipped.append(rel)
                    continue
                if fmt != stat.S_IFDIR and st.st_nlink > 1 and key not in seen:
                    seen[key] = name
                ti.pax_headers = dict(sorted(pax.items()))
                try:
                    tf.addfile(ti, data)
                finally:
                    if data is not None:
                        data.close()
    finally:
        if gz is not None:
            gz.close()
        raw.close()
    return skipped


def write_gnu_tar(root: PathLike, out_path: PathLike, **kw: Any) -> list[bytes]:
    """GNU-format variant of :func:`write_tar` (long names, no xattrs, second mtimes)."""
    return write_tar(root, out_path, format=tarfile.GNU_FORMAT, **kw)


def extract_tar(tar_path: PathLike, dest: PathLike) -> None:
    """Reference extractor: applies everything :func:`snapshot_tar` describes.

    Owners, modes (after chown, so setuid survives), xattrs, nanosecond mtimes
    (directories last), hard links to any type (without following symlinks), devices.
    Must run as root for owners, devices and trusted./security. xattrs.
    """
    destb = os.fsencode(os.fspath(dest))
    os.makedirs(destb, exist_ok=True)
    dirs: list[tuple[bytes, int, tuple[tuple[bytes, bytes], ...]]] = []
    with tarfile.open(
        os.fsdecode(os.fspath(tar_path)), "r:*", encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for ti in tf:
            rel = _tar_name(ti.name)
            if rel.startswith(b"/") or b"/../" in b"/" + rel + b"/":
                raise ValueError(f"unsafe member name {rel!r}")
            full = destb if rel == b"." else destb + b"/" + rel
            xattrs = tuple(
                sorted(
                    (k[len("SCHILY.xattr.") :].encode(), v.encode("utf-8", "surrogateescape"))
                    for k, v in ti.pax_headers.items()
                    if k.startswith("SCHILY.xattr.")
                )
            )
            mtime_ns = _pax_mtime_ns(ti)
            if ti.isdir():
                os.makedirs(full, exist_ok=True)
                dirs.append((full, mtime_ns, xattrs))
                os.chown(full, ti.uid, ti.gid)
                os.chmod(full, ti.mode & 0o7777)
                continue
            if os.path.lexists(full):
                os.unlink(full)
            if ti.islnk():
                tgt = _tar_name(ti.linkname)
                os.link(destb + b"/" + tgt, full, follow_symlinks=False)
                continue
            if ti.isreg():
                f = tf.extractfile(ti)
                assert f is not None
                fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    off = 0
                    while True:
                        chunk = _read_full(f, HASH_BLOCK)
                        if not chunk:
                            break
                        if chunk != _ZERO_BLOCK[: len(chunk)]:
                            os.pwrite(fd, chunk, off)
                        off += len(chunk)
                    os.ftruncate(fd, off)
                finally:
                    os.close(fd)
            elif ti.issym():
                os.symlink(ti.linkname.encode("utf-8", "surrogateescape"), full)
            elif ti.ischr() or ti.isblk():
                kind = stat.S_IFCHR if ti.ischr() else stat.S_IFBLK
                os.mknod(full, kind | 0o600, os.makedev(ti.devmajor, ti.devminor))
            elif ti.isfifo():
                os.mkfifo(full, 0o600)
            else:
                raise ValueError(f"unsupported member type {ti.type!r}")
            os.chown(full, ti.uid, ti.gid, follow_symlinks=False)
            if not ti.issym():
                os.chmod(full, ti.mode & 0o7777)
            for k, v in xattrs:
                os.setxattr(full, k, v, follow_symlinks=False)
            os.utime(full, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
    for full, mtime_ns, xattrs in reversed(dirs):
        for k, v in xattrs:
            os.setxattr(full, k, v, follow_symlinks=False)
        os.utime(full, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


# ---------------------------------------------------------------------------------------
# Synthetic tree
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Manifest:
    """Where :func:`make_synthetic_tree` put its special cases (relative bytes paths)."""

    root: Path
    big: bool
    files_by_size: dict[int, bytes] = dataclasses.field(default_factory=dict)
    hardlink_groups: list[tuple[bytes, ...]] = dataclasses.field(default_factory=list)
    dedup_groups: list[tuple[bytes, ...]] = dataclasses.field(default_factory=list)
    shared_block_files: list[bytes] = dataclasses.field(default_factory=list)
    sparse_files: dict[bytes, list[tuple[int, int]]] = dataclasses.field(default_factory=dict)
    big_sparse: bytes | None = None
    compressible: list[bytes] = dataclasses.field(default_factory=list)
    chunk_multiple_files: list[bytes] = dataclasses.field(default_factory=list)
    symlinks: dict[bytes, bytes] = dataclasses.field(default_factory=dict)
    devices: dict[bytes, tuple[str, int, int]] = dataclasses.field(default_factory=dict)
    fifos: list[bytes] = dataclasses.field(default_factory=list)
    sockets: list[bytes] = dataclasses.field(default_factory=list)
    empty_dirs: list[bytes] = dataclasses.field(default_factory=list)
    deep_dir: bytes = b""
    deep_levels: int = 0
    wide_dir: bytes = b""
    wide_count: int = 0
    owners: dict[bytes, tuple[int, int]] = dataclasses.field(default_factory=dict)
    modes: dict[bytes, int] = dataclasses.field(default_factory=dict)
    mtimes: dict[bytes, int] = dataclasses.field(default_factory=dict)
    xattr_files: dict[bytes, dict[bytes, bytes]] = dataclasses.field(default_factory=dict)
    acl_paths: list[bytes] = dataclasses.field(default_factory=list)
    long_names: list[bytes] = dataclasses.field(default_factory=list)
    non_utf8_names: list[bytes] = dataclasses.field(default_factory=list)
    odd_names: list[bytes] = dataclasses.field(default_factory=list)

    def path(self, rel: bytes) -> bytes:
        return os.fsencode(self.root) + b"/" + rel


SEED = 0x5EED_E20F

# POSIX ACL xattr (user-space format, version 2): le32 version, then {le16 tag, le16 perm, le32 id}
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = (
    0x01,
    0x02,
    0x04,
    0x08,
    0x10,
    0x20,
)
_ACL_UNDEFINED_ID = 0xFFFFFFFF


def posix_acl_bytes(entries: Iterable[tuple[int, int, int]]) -> bytes:
    """Encode (tag, perm, id) entries as a system.posix_acl_* xattr value."""
    out = bytearray(struct.pack("<I", 2))
    for tag, perm, ident in sorted(entries, key=lambda e: (e[0], e[2])):
        out += struct.pack("<HHI", tag, perm, ident)
    return bytes(out)


def _cap_v2(permitted: int, inheritable: int = 0, effective: bool = True) -> bytes:
    magic = 0x02000000 | (1 if effective else 0)
    return struct.pack(
        "<IIIII",
        magic,
        permitted & 0xFFFFFFFF,
        inheritable & 0xFFFFFFFF,
        permitted >> 32,
        inheritable >> 32,
    )


def _write(path: bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def make_synthetic_tree(root: PathLike, *, big: bool = False, wide_count: int = 30000) -> Manifest:
    """Create the synthetic tree under ``root`` (created; must be empty if it exists).

    Deterministic (seeded) content, names, owners, modes, mtimes and xattrs.  Needs root
    (owners, devices, trusted./security. xattrs) and a filesystem with xattrs (ext4 /tmp).
    ``big`` adds a 5 GiB sparse file with data near its end.
    """
    rootp = Path(os.fsdecode(os.fspath(root)))
    rootp.mkdir(parents=True, exist_ok=True)
    if any(rootp.iterdir()):
        raise FileExistsError(f"{rootp} is not empty")
    R = os.fsencode(rootp)
    rng = random.Random(SEED)
    m = Manifest(root=rootp, big=big)

    def P(rel: bytes) -> bytes:
        return R + b"/" + rel

    def mkdir(rel: bytes) -> None:
        os.makedirs(P(rel), exist_ok=True)

    def rbytes(n: int) -> bytes:
        return rng.randbytes(n)

    # --- regular files of many sizes --------------------------------------------------
    mkdir(b"sizes")
    for size in (0, 1, 4095, 4096, 4097, 65535, 65536, 65537, MiB - 1, MiB, MiB + 1):
        rel = b"sizes/f%d" % size
        _write(P(rel), rbytes(size))
        m.files_by_size[size] = rel
    rel = b"sizes/random_3m"
    _write(P(rel), rbytes(3 * MiB + 12345))
    m.files_by_size[3 * MiB + 12345] = rel
    for nmib in (2, 4):
        rel = b"sizes/chunks_%dm" % nmib
        _write(P(rel), rbytes(nmib * MiB))
        m.chunk_multiple_files.append(rel)
    m.chunk_multiple_files.append(m.files_by_size[MiB])

    # --- dedup: identical files, identical 1 MiB blocks ---------------------------------
    mkdir(b"dedup")
    mkdir(b"dedup/sub")
    same = rbytes(MiB + 777)
    group = (b"dedup/copy_a", b"dedup/copy_b", b"dedup/sub/copy_c")
    for rel in group:
        _write(P(rel), same)
    m.dedup_groups.append(group)
    blk = rbytes(MiB)
    other = rbytes(MiB)
    _write(P(b"dedup/blocks_aab"), blk + blk + other)
    _write(P(b"dedup/blocks_ba"), other + blk + b"tail")
    m.shared_block_files += [b"dedup/blocks_aab", b"dedup/blocks_ba"]
    zeros = bytes(2 * MiB)
    _write(P(b"dedup/zeros_2m_dense"), zeros)  # dense zeros (not sparse)
    m.chunk_multiple_files.append(b"dedup/zeros_2m_dense")

    # --- compressible text ------------------------------------------------------------
    mkdir(b"text")
    words = [b"erofs", b"nydus", b"chunk", b"blob", b"bootstrap", b"kernel", b"lorem", b"ipsum"]
    lines = []
    for i in range(60000):
        lines.append(b"%06d " % i + b" ".join(rng.choice(words) for _ in range(8)) + b"\n")
    _write(P(b"text/words.txt"), b"".join(lines))
    _write(P(b"text/aaaa.txt"), b"a" * (MiB + 3))
    m.compressible += [b"text/words.txt", b"text/aaaa.txt"]

    # --- sparse files -----------------------------------------------------------------
    mkdir(b"sparse")
    islands = [(0, 4096), (5 * MiB, 100 * KiB), (10 * MiB + 1234, 777), (20 * MiB - 1, 1)]
    fd = os.open(P(b"sparse/sparse_20m"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 20 * MiB)
        for off, ilen in islands:
            os.pwrite(fd, rbytes(ilen), off)
    finally:
        os.close(fd)
    m.sparse_files[b"sparse/sparse_20m"] = islands
    fd = os.open(P(b"sparse/hole_only_8m"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.ftruncate(fd, 8 * MiB)
    os.close(fd)
    m.sparse_files[b"sparse/hole_only_8m"] = []
    if big:
        size = 5 * GiB + 4321
        isl = [(size - MiB - 17, MiB + 17), (4 * GiB - 10, 20)]
        fd = os.open(P(b"sparse/big_5g"), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, size)
            for off, ilen in isl:
                os.pwrite(fd, rbytes(ilen), off)
        finally:
            os.close(fd)
        m.sparse_files[b"sparse/big_5g"] = isl
        m.big_sparse = b"sparse/big_5g"

    # --- empty files and directories --------------------------------------------------
    mkdir(b"empty")
    for i, mode in enumerate((0o644, 0o600, 0o755)):
        rel = b"empty/e%d" % i
        _write(P(rel), b"")
        m.modes[rel] = mode
    for rel in (b"empty/dir", b"empty/dir2/nested_empty"):
        mkdir(rel)
        m.empty_dirs.append(rel)

    deep = b"deep"
    for i in range(64):
        deep += b"/d%02d" % i
    mkdir(deep)
    _write(P(deep + b"/leaf"), b"bottom of the deep tree\n")
    m.deep_dir, m.deep_levels = deep, 65

    m.wide_dir, m.wide_count = b"wide", wide_count
    mkdir(b"wide")
    for i in range(wide_count):
        name = b"%05d_" % i + b"x" * (i % 37)
        fd = os.open(P(b"wide/" + name), os.O_WRONLY | os.O_CREAT, 0o644)
        if i % 1000 == 0:
            os.write(fd, b"%d\n" % i)
        os.close(fd)

    # --- symlinks ---------------------------------------------------------------------
    mkdir(b"links")
    long_target = (b"long/" * 820)[:4094] + b"T"
    assert len(long_target) == 4095
    syms = {
        b"links/short": b"../sizes/f1",
        b"links/dir_link": b"../dedup",
        b"links/long_target": long_target,
        b"links/dangling": b"does/not/exist",
        b"links/absolute": b"/etc/passwd",
        b"links/self_loop": b"self_loop",
        b"links/dot": b".",
    }
    for rel, tgt in syms.items():
        os.symlink(tgt, P(rel))
    m.symlinks.update(syms)

    # --- hard links -------------------------------------------------------------------
    mkdir(b"hard")
    mkdir(b"hard/other")
    _write(P(b"hard/h2_a"), b"two names\n")
    os.link(P(b"hard/h2_a"), P(b"hard/h2_b"))
    _write(P(b"hard/h3_a"), rbytes(5000))
    os.link(P(b"hard/h3_a"), P(b"hard/other/h3_b"))
    os.link(P(b"hard/h3_a"), P(b"sizes/h3_c_in_sizes"))
    _write(P(b"hard/empty_h2_a"), b"")
    os.link(P(b"hard/empty_h2_a"), P(b"hard/other/empty_h2_b"))
    os.symlink(b"h2_a", P(b"hard/sym_h_a"))
    os.link(P(b"hard/sym_h_a"), P(b"hard/sym_h_b"), follow_symlinks=False)
    os.mkfifo(P(b"hard/fifo_h_a"), 0o640)
    os.link(P(b"hard/fifo_h_a"), P(b"hard/other/fifo_h_b"))
    m.hardlink_groups += [
        (b"hard/h2_a", b"hard/h2_b"),
        (b"hard/h3_a", b"hard/other/h3_b", b"sizes/h3_c_in_sizes"),
        (b"hard/empty_h2_a", b"hard/other/empty_h2_b"),
        (b"hard/sym_h_a", b"hard/sym_h_b"),
        (b"hard/fifo_h_a", b"hard/other/fifo_h_b"),
    ]

    # --- devices, fifo, socket --------------------------------------------------------
    mkdir(b"dev")
    devs = {
        b"dev/null": ("chr", 1, 3),
        b"dev/tty4": ("chr", 4, 4),
        b"dev/c_minor300": ("chr", 136, 300),
        b"dev/c_big": ("chr", 511, 1048575),
        b"dev/sda": ("blk", 8, 0),
        b"dev/nvme_minor65536": ("blk", 259, 65536),
        b"dev/b_zero": ("blk", 0, 0),
    }
    for rel, (kind, ma, mi) in devs.items():
        fmt = stat.S_IFCHR if kind == "chr" else stat.S_IFBLK
        os.mknod(P(rel), fmt | 0o660, os.makedev(ma, mi))
    m.devices.update(devs)
    os.mkfifo(P(b"dev/fifo"), 0o644)
    m.fifos.append(b"dev/fifo")
    dfd = os.open(P(b"dev"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(f"/proc/self/fd/{dfd}/socket")
        finally:
            s.close()
    finally:
        os.close(dfd)
    m.sockets.append(b"dev/socket")

    # --- names ------------------------------------------------------------------------
    mkdir(b"names")
    long_ascii = b"n" * 255
    long_utf8 = "é".encode() * 127 + b"x"
    assert len(long_utf8) == 255
    for rel in (b"names/" + long_ascii, b"names/" + long_utf8):
        _write(P(rel), rel[-20:])
        m.long_names.append(rel)
    mkdir(b"names/" + b"D" * 255)
    _write(P(b"names/" + b"D" * 255 + b"/" + b"f" * 255), b"long dir, long file\n")
    m.long_names.append(b"names/" + b"D" * 255 + b"/" + b"f" * 255)
    for n in (b"bad\xff\xfename", b"latin1-\xe9t\xe9", b"\x80"):
        _write(P(b"names/" + n), n)
        m.non_utf8_names.append(b"names/" + n)
    mkdir(b"names/dir-\xc3(")
    _write(P(b"names/dir-\xc3(/inside"), b"in a non-utf8 dir\n")
    m.non_utf8_names.append(b"names/dir-\xc3(")
    odd = [
        b"-x",
        b"!",
        b"~",
        b".hidden",
        b"..a",
        b"a.b",
        b"a-b",
        b"a0",
        b"A",
        b"a",
        b"a\x01",
        b"space name",
        b"tab\tname",
        b"new\nline",
        b"back\\slash",
        b"quote\"'",
        b"\x7f",
        b"#",
        b"%",
        b"=",
        b"[x]",
        b"{y}",
        b"$HOME",
        b"*",
    ]
    for n in odd:
        _write(P(b"names/" + n), n)
        m.odd_names.append(b"names/" + n)
    # a directory whose names straddle '.' and '/' (0x2E, 0x2F) in sort order
    mkdir(b"sortdir")
    for n in (b"a", b"a-", b"a.", b"a0", b"a-1", b"a.1", b"a01", b"ab", b"a~", b"b"):
        _write(P(b"sortdir/" + n), n)

    # --- owners, modes ----------------------------------------------------------------
    mkdir(b"perm")
    owner_cases = {
        b"perm/uid1000": (1000, 1000),
        b"perm/uid65535": (65535, 65535),
        b"perm/uid65536": (65536, 65537),
        b"perm/uid_big": (4000000000, 3000000000),
        b"perm/uid0_gid100000": (0, 100000),
    }
    for rel, (u, g) in owner_cases.items():
        _write(P(rel), rel)
        os.chown(P(rel), u, g)
        m.owners[rel] = (u, g)
    mode_cases = {
        b"perm/setuid": 0o4755,
        b"perm/setgid": 0o2755,
        b"perm/setuid_setgid_sticky": 0o7777,
        b"perm/mode0000": 0o000,
        b"perm/mode0777": 0o777,
        b"perm/mode0400": 0o400,
        b"perm/mode1644": 0o1644,
    }
    for rel, mode in mode_cases.items():
        _write(P(rel), rel)
        m.modes[rel] = mode
    for rel, mode in (
        (b"perm/sticky_dir", 0o1777),
        (b"perm/setgid_dir", 0o2775),
        (b"perm/dir0700", 0o700),
        (b"perm/dir0000", 0o000),
    ):
        mkdir(rel)
        m.modes[rel] = mode
    _write(P(b"perm/dir0700/inside"), b"x")
    os.chown(P(b"perm/setuid"), 1000, 1000)  # chown before chmod: chown clears setuid
    m.owners[b"perm/setuid"] = (1000, 1000)
    os.chown(P(b"links/short"), 1234, 5678, follow_symlinks=False)
    m.owners[b"links/short"] = (1234, 5678)
    os.chown(P(b"dev/tty4"), 0, 5)
    m.owners[b"dev/tty4"] = (0, 5)
    os.chown(P(b"perm/sticky_dir"), 70000, 70000)
    m.owners[b"perm/sticky_dir"] = (70000, 70000)

    # --- xattrs (after content: writes and chown clear security.capability) --------------
    mkdir(b"xattr")
    xcases: dict[bytes, dict[bytes, bytes]] = {
        b"xattr/user_several": {
            b"user.a": b"1",
            b"user.empty": b"",
            b"user.long_value": bytes(rng.randrange(256) for _ in range(1000)),
            b"user.binary": b"\x00\x01\xff\xfe\x00",
            b"user." + b"k" * 200: b"long name",
        },
        b"xattr/trusted": {b"trusted.overlay.opaque": b"y", b"trusted.foo": b"bar"},
        b"xattr/security_cap": {b"security.capability": _cap_v2(1 << 13 | 1 << 10)},
        b"xattr/security_other": {
            b"security.ima": b"\x03\x02" + bytes(32),
            b"security.test": b"label",
        },
        b"xattr/mixed": {b"user.m": b"m", b"trusted.t": b"t", b"security.s": b"s"},
        b"xattr/dir_with_xattr": {b"user.dir": b"yes", b"trusted.overlay.opaque": b"y"},
        b"links/absolute": {b"trusted.on_symlink": b"1"},
        b"dev/null": {b"trusted.on_device": b"2"},
        b"dev/fifo": {b"trusted.on_fifo": b"3"},
        b"sizes/f4097": {b"user.on_data_file": b"x" * 300},
        b".": {b"user.root": b"root xattr"},
    }
    for rel in xcases:
        if not os.path.lexists(P(rel)):
            if rel.startswith(b"xattr/dir"):
                mkdir(rel)
            else:
                _write(P(rel), rel)
    # many xattrs on one file (shared-xattr candidates across files)
    for i in range(8):
        rel = b"xattr/shared_%d" % i
        _write(P(rel), b"%d" % i)
        xcases[rel] = {b"user.shared": b"same value on many files", b"user.idx": b"%d" % i}
    m.xattr_files.update(xcases)

    # POSIX ACLs
    mkdir(b"acl")
    _write(P(b"acl/file"), b"acl\n")
    mkdir(b"acl/dir")
    acl_access = posix_acl_bytes(
        [
            (_ACL_USER_OBJ, 6, _ACL_UNDEFINED_ID),
            (_ACL_USER, 4, 1000),
            (_ACL_USER, 6, 70000),
            (_ACL_GROUP_OBJ, 4, _ACL_UNDEFINED_ID),
            (_ACL_GROUP, 4, 100),
            (_ACL_MASK, 6, _ACL_UNDEFINED_ID),
            (_ACL_OTHER, 0, _ACL_UNDEFINED_ID),
        ]
    )
    acl_default = posix_acl_bytes(
        [
            (_ACL_USER_OBJ, 7, _ACL_UNDEFINED_ID),
            (_ACL_GROUP_OBJ, 5, _ACL_UNDEFINED_ID),
            (_ACL_GROUP, 7, 4242),
            (_ACL_MASK, 7, _ACL_UNDEFINED_ID),
            (_ACL_OTHER, 5, _ACL_UNDEFINED_ID),
        ]
    )
    m.acl_paths += [b"acl/file", b"acl/dir"]

    # --- apply metadata in an order that keeps it ---------------------------------------
    for rel, mode in m.modes.items():
        os.chmod(P(rel), mode)
    for rel, xs in xcases.items():
        for k, v in xs.items():
            os.setxattr(P(rel) if rel != b"." else R, k, v, follow_symlinks=False)
    os.setxattr(P(b"acl/file"), "system.posix_acl_access", acl_access)
    os.setxattr(P(b"acl/dir"), "system.posix_acl_access", acl_access)
    os.setxattr(P(b"acl/dir"), "system.posix_acl_default", acl_default)

    # --- mtimes: deterministic with nanoseconds; directories bottom-up, root last ---------
    mtime_special = {
        b"perm/uid1000": 0,
        b"perm/uid65535": 1,
        b"perm/mode0777": 2**31 - 1,
        b"perm/mode0400": (2**32 + 12345) * 10**9 + 999_999_999,
        b"links/short": 1_600_000_000 * 10**9 + 123_456_789,
    }
    base_ns = 1_700_000_000 * 10**9
    all_paths: list[tuple[bytes, bool]] = []
    for dirpath, dirnames, filenames in os.walk(R):
        reld = dirpath[len(R) + 1 :] if dirpath != R else b"."
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            all_paths.append((n if reld == b"." else reld + b"/" + n, False))
        all_paths.append((reld, True))
    all_paths.sort(key=lambda x: (x[1], x[0] == b".", -x[0].count(b"/"), x[0]))
    for i, (rel, _is_dir) in enumerate(all_paths):
        if rel in mtime_special:
            ns = mtime_special[rel]
        else:
            ns = base_ns + i * 1_000_003_001 + (i * 7919) % 10**9
        if rel == b".":
            ns = base_ns + 42 * 10**9 + 424242
        full = R if rel == b"." else P(rel)
        os.utime(full, ns=(ns, ns), follow_symlinks=False)
    for rel, _is_dir in all_paths:
        m.mtimes[rel] = os.lstat(R if rel == b"." else P(rel)).st_mtime_ns
    return m


def sparse_extent_count(path: PathLike) -> int:
    """Number of data extents SEEK_DATA reports (a sanity check that a file is sparse)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return sum(1 for _ in _data_extents(fd, os.fstat(fd).st_size))
    finally:
        os.close(fd)
