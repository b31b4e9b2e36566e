"""Bootstrap writer: plan every offset first, then emit (the composefs way).

File map (block size 4096; see reference/nydus-rafs-v6.md 1.1):
    0..1024            zero
    1024..1152         EROFS superblock
    1152..1408         RAFS v6 extended superblock
    1408..+128*N       device slots, one per blob (tag = blob id)
    align4k(above)     blob table (256 B per blob), then the prefetch table (u32 nids)
    root_off           = align4k(above): the root inode.  meta_blkaddr = root_off/4096 - 1,
                       so the root nid is always 128 and no inode gets nid 0.
    ...                inode records: inode (extended, 64 B) + xattr ibody
                       + chunk indexes (8 B each, 8-aligned) or an inline tail
    data blocks        full directory/symlink blocks (FLAT_PLAIN or the head of FLAT_INLINE)
    align4k            chunk table (80 B per unique chunk, sorted by digest)
    pad to 4 KiB
Placement order: a directory's record, then its non-directory children, then each
subdirectory (sorted) recursively.  Records with an inline tail never cross a block
boundary; gaps left by that are reused first-fit, deterministically.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field

from erofs_nydus.errors import FormatError, UsageError
from erofs_nydus.layout import build
from erofs_nydus.layout import erofs as E
from erofs_nydus.layout import rafs as R
from erofs_nydus.layout.common import BLOCK_BITS, BLOCK_SIZE, align
from erofs_nydus.rafs.codec import DEFAULT_DIGESTER
from erofs_nydus.rafs.image import BlobInfo, ChunkInfo
from erofs_nydus.rafs.tree import Inode, Node

ROOT_NID = 128


def file_type(mode: int) -> int:
    return {
        stat.S_IFREG: E.FT_REG_FILE, stat.S_IFDIR: E.FT_DIR, stat.S_IFCHR: E.FT_CHRDEV,
        stat.S_IFBLK: E.FT_BLKDEV, stat.S_IFIFO: E.FT_FIFO, stat.S_IFSOCK: E.FT_SOCK,
        stat.S_IFLNK: E.FT_SYMLINK,
    }.get(stat.S_IFMT(mode), E.FT_UNKNOWN)


def encode_xattrs(xattrs: dict[bytes, bytes]) -> bytes:
    """Inline xattr ibody (header + entries), or b"" when there are none."""
    if not xattrs:
        return b""
    entries = []
    for name, value in xattrs.items():
        split = E.split_xattr_name(name)
        if split is None:
            raise FormatError(f"unsupported xattr namespace: {name!r}")
        index, suffix = split
        entries.append((index, suffix, value))
    entries.sort()
    out = bytearray(E.XATTR_IBODY_HEADER_SIZE)
    for index, suffix, value in entries:
        ent = build(E.XattrEntry, {"e_name_len": len(suffix), "e_name_index": index,
                                   "e_value_size": len(value)}) + suffix + value
        out += ent + bytes(align(len(ent), 4) - len(ent))
    return bytes(out)


def dirent_blocks(names: list[bytes]) -> list[list[bytes]]:
    """Split sorted names into dir blocks: each holds 12 B per entry plus the names."""
    blocks: list[list[bytes]] = [[]]
    used = 0
    for name in names:
        need = E.DIRENT_SIZE + len(name)
        if used + need > BLOCK_SIZE:
            blocks.append([])
            used = 0
        blocks[-1].append(name)
        used += need
    return blocks


@dataclass(eq=False, slots=True)
class _Rec:
    inode: Inode
    node: Node  # the first name met (for directories: the directory itself)
    parent: Node
    ino: int
    nlink: int = 1
    xattr: bytes = b""
    datalayout: int = E.DATALAYOUT_FLAT_PLAIN
    size: int = 0
    data: bytes = b""  # dir/symlink content
    head_blocks: int = 0  # full blocks stored in the data area
    tail: bytes = b""  # inline tail
    nchunks: int = 0
    chunk_bits: int = 0
    rec_size: int = 0
    must_fit: bool = False
    offset: int = 0
    blkaddr: int = 0
    dir_blocks: list[list[bytes]] = field(default_factory=list)


class _Allocator:
    """Sequential 32-byte-slot allocator with first-fit reuse of in-block gaps."""

    def __init__(self, start: int) -> None:
        self.pos = start
        self.gaps: list[tuple[int, int]] = []

    def alloc(self, size: int, must_fit: bool) -> int:
        size32 = align(size, 32)
        for i, (start, end) in enumerate(self.gaps):
            if end - start >= size32:
                if end - start == size32:
                    del self.gaps[i]
                else:
                    self.gaps[i] = (start + size32, end)
                return start
        if must_fit and (self.pos % BLOCK_SIZE) + size > BLOCK_SIZE:
            nxt = align(self.pos + 1, BLOCK_SIZE)
            if nxt - self.pos >= 64:
                self.gaps.append((self.pos, nxt))
            self.pos = nxt
        start = self.pos
        self.pos += size32
        return start


@dataclass(slots=True)
class BootstrapPlan:
    data: bytes
    inode_count: int
    root_nid: int


def _collect(root: Node) -> list[_Rec]:
    recs: list[_Rec] = []
    by_inode: dict[int, _Rec] = {}

    def add(node: Node, parent: Node) -> None:
        rec = by_inode.get(id(node.inode))
        if rec is not None:
            rec.nlink += 1
            return
        rec = _Rec(inode=node.inode, node=node, parent=parent, ino=len(recs) + 1)
        recs.append(rec)
        by_inode[id(node.inode)] = rec

    add(root, root)
    stack: list[Node] = [root]
    while stack:
        d = stack.pop()
        subdirs = []
        for child in d.sorted_children():
            if child.children is not None:
                subdirs.append(child)
            else:
                add(child, d)
        for sub in subdirs:
            add(sub, d)
        stack.extend(reversed(subdirs))
    # recs for directories must be placed when recursed into: reorder to DFS placement
    return _placement_order(root, recs, by_inode)


def _placement_order(root: Node, recs: list[_Rec], by_inode: dict[int, _Rec]) -> list[_Rec]:
    out: list[_Rec] = []
    seen: set[int] = set()
    stack: list[Node] = [root]
    while stack:
        d = stack.pop()
        out.append(by_inode[id(d.inode)])
        subdirs = []
        for child in d.sorted_children():
            if child.children is not None:
                subdirs.append(child)
            elif id(child.inode) not in seen:
                seen.add(id(child.inode))
                out.append(by_inode[id(child.inode)])
        stack.extend(reversed(subdirs))
    for i, rec in enumerate(out):
        rec.ino = i + 1
    return out


def _plan_record(rec: _Rec, chunk_size: int) -> None:
    ino = rec.inode
    rec.xattr = encode_xattrs(ino.xattrs)
    base = E.INODE_EXTENDED_SIZE + len(rec.xattr)
    mode = ino.mode
    if stat.S_ISDIR(mode):
        node = rec.node
        assert node.children is not None
        names = sorted([b".", b"..", *node.children])
        rec.dir_blocks = dirent_blocks(names)
        last = rec.dir_blocks[-1]
        last_len = len(last) * E.DIRENT_SIZE + sum(len(n) for n in last)
        rec.size = (len(rec.dir_blocks) - 1) * BLOCK_SIZE + last_len
        rec.nlink = 2 + sum(1 for c in node.children.values() if c.children is not None)
        _plan_flat(rec, base)
    elif stat.S_ISLNK(mode):
        rec.data = ino.target
        rec.size = len(ino.target)
        _plan_flat(rec, base)
    elif stat.S_ISREG(mode):
        rec.size = ino.size
        rec.datalayout = E.DATALAYOUT_CHUNK_BASED
        rec.nchunks = (ino.size + chunk_size - 1) // chunk_size
        if len(ino.chunks) != rec.nchunks:
            raise FormatError(f"inode {rec.ino}: {len(ino.chunks)} chunks for size {ino.size}")
        rec.chunk_bits = chunk_size.bit_length() - 1
        if _contiguous(ino.chunks, chunk_size) and ino.size > chunk_size:
            rec.chunk_bits = max((ino.size - 1).bit_length(), rec.chunk_bits)
        rec.rec_size = align(base, 8) + E.CHUNK_INDEX_SIZE * rec.nchunks
    else:
        rec.rec_size = base


def _contiguous(chunks: list[ChunkInfo], chunk_size: int) -> bool:
    first = chunks[0] if chunks else None
    if first is None:
        return False
    for i, c in enumerate(chunks):
        if c.blob_index != first.blob_index or \
                c.uncompressed_offset != first.uncompressed_offset + i * chunk_size:
            return False
    return True


def _plan_flat(rec: _Rec, base: int) -> None:
    tail_len = rec.size % BLOCK_SIZE
    if tail_len and base + tail_len <= BLOCK_SIZE:
        rec.datalayout = E.DATALAYOUT_FLAT_INLINE
        rec.head_blocks = rec.size // BLOCK_SIZE
        rec.rec_size = base + tail_len
        rec.must_fit = True
    else:
        rec.datalayout = E.DATALAYOUT_FLAT_PLAIN
        rec.head_blocks = (rec.size + BLOCK_SIZE - 1) // BLOCK_SIZE
        rec.rec_size = base


def write_bootstrap(root: Node, blobs: list[BlobInfo], chunk_table: list[ChunkInfo], *,
                    chunk_size: int, compressor: str, digester: str = DEFAULT_DIGESTER,
                    prefetch: list[Node] | None = None) -> BootstrapPlan:
    """Lay out and encode a bootstrap for `root` whose chunks live in `blobs`."""
    if root.children is None:
        raise UsageError("the image root must be a directory")
    if len(blobs) > R.MAX_BLOBS:
        raise UsageError(f"an image can reference at most {R.MAX_BLOBS} blobs, got {len(blobs)}")
    for i, b in enumerate(blobs):
        if b.blob_index != i:
            raise FormatError(f"blob {b.blob_id}: blob_index {b.blob_index} at position {i}")
    recs = _collect(root)
    for rec in recs:
        _plan_record(rec, chunk_size)

    nblobs = len(blobs)
    devslot_end = R.DEVICE_TABLE_OFFSET + E.DEVICE_SLOT_SIZE * nblobs
    blob_table_off = align(devslot_end, BLOCK_SIZE)
    blob_table_size = R.BLOB_ENTRY_SIZE * nblobs
    rec_of = {id(r.inode): r for r in recs}
    prefetch_nodes = prefetch or []
    prefetch_off = blob_table_off + blob_table_size
    prefetch_size = 4 * len(prefetch_nodes)
    root_off = align(prefetch_off + prefetch_size, BLOCK_SIZE)
    if root_off == 0:
        root_off = BLOCK_SIZE
    meta_blkaddr = root_off // BLOCK_SIZE - 1
    meta_base = meta_blkaddr * BLOCK_SIZE

    alloc = _Allocator(root_off)
    for rec in recs:
        rec.offset = alloc.alloc(rec.rec_size, rec.must_fit)
    data_blk = align(alloc.pos, BLOCK_SIZE) // BLOCK_SIZE
    for rec in recs:
        if rec.head_blocks:
            rec.blkaddr = data_blk
            data_blk += rec.head_blocks
    chunk_table_off = data_blk * BLOCK_SIZE
    chunk_table = sorted(chunk_table, key=lambda c: (c.digest, c.blob_index, c.index))
    total = align(chunk_table_off + R.CHUNK_INFO_SIZE * len(chunk_table), BLOCK_SIZE)

    def nid_of(inode: Inode) -> int:
        return (rec_of[id(inode)].offset - meta_base) >> E.ISLOT_BITS

    if nid_of(root.inode) != ROOT_NID:
        raise FormatError("internal: root inode not at nid 128")

    out = bytearray(total)
    comp_flag = {v: k for k, v in R.COMPRESSION_FLAGS.items()}.get(compressor)
    hash_flag = {v: k for k, v in R.HASH_FLAGS.items()}.get(digester)
    if comp_flag is None or hash_flag is None:
        raise UsageError(f"cannot write a bootstrap for compressor {compressor!r}, "
                         f"digester {digester!r}")
    flags = hash_flag | R.FLAG_EXPLICIT_UID_GID | R.FLAG_ENCRYPTION_NONE | comp_flag
    if any(r.inode.xattrs for r in recs):
        flags |= R.FLAG_HAS_XATTR

    for rec in recs:
        _emit_record(out, rec, meta_base, nid_of, chunk_size)

    # device slots, blob table, prefetch table
    for b in blobs:
        slot = build(E.DeviceSlot, {"tag": R.blob_id_bytes(b.blob_id),
                                    "blocks": b.uncompressed_size >> BLOCK_BITS,
                                    "mapped_blkaddr": 0, "reserved": bytes(56)})
        off = R.DEVICE_TABLE_OFFSET + E.DEVICE_SLOT_SIZE * b.blob_index
        out[off:off + len(slot)] = slot
        ent = build(R.BlobEntry, {
            "blob_id": R.blob_id_bytes(b.blob_id), "blob_index": b.blob_index,
            "chunk_size": chunk_size, "chunk_count": b.chunk_count,
            "compression_algo": R.COMPRESSOR_IDS[b.compressor],
            "digest_algo": R.DIGESTER_IDS[b.digester], "features": b.features,
            "compressed_size": b.compressed_size, "uncompressed_size": b.uncompressed_size,
            "blob_toc_size": 0, "ci_compressor": R.COMPRESSOR_IDS[_ci_compressor(b)],
            "ci_offset": b.ci_offset, "ci_compressed_size": b.ci_compressed_size,
            "ci_uncompressed_size": b.ci_uncompressed_size, "blob_toc_digest": bytes(32),
            "blob_meta_digest": bytes(32), "blob_meta_size": 0, "cipher_iv": bytes(8),
            "cipher_algo": 0, "reserved": bytes(36),
        })
        off = blob_table_off + R.BLOB_ENTRY_SIZE * b.blob_index
        out[off:off + len(ent)] = ent
    for i, node in enumerate(prefetch_nodes):
        nid = nid_of(node.inode)
        out[prefetch_off + 4 * i:prefetch_off + 4 * i + 4] = nid.to_bytes(4, "little")
    for i, c in enumerate(chunk_table):
        ent = R.CHUNK_INFO_PACK.pack(
            c.digest, c.blob_index, R.CHUNK_FLAG_COMPRESSED if c.compressed else 0,
            c.compressed_size, c.uncompressed_size, c.compressed_offset,
            c.uncompressed_offset, 0, c.index, 0)
        off = chunk_table_off + R.CHUNK_INFO_SIZE * i
        out[off:off + len(ent)] = ent

    ext = build(R.SuperBlockExt, {
        "s_flags": flags, "s_blob_table_offset": blob_table_off,
        "s_blob_table_size": blob_table_size, "s_chunk_size": chunk_size,
        "s_chunk_table_offset": chunk_table_off,
        "s_chunk_table_size": R.CHUNK_INFO_SIZE * len(chunk_table),
        "s_prefetch_table_offset": prefetch_off if prefetch_nodes else 0,
        "s_prefetch_table_size": prefetch_size, "s_padding": 0, "s_reserved": bytes(200),
    })
    out[R.EXT_SUPERBLOCK_OFFSET:R.EXT_SUPERBLOCK_OFFSET + len(ext)] = ext
    sb = build(E.SuperBlock, {
        "magic": E.EROFS_SUPER_MAGIC, "checksum": 0, "feature_compat": E.COMPAT_RAFS_V6,
        "blkszbits": BLOCK_BITS, "sb_extslots": 0, "root_nid": ROOT_NID, "inos": len(recs),
        # nydusd refuses blocks other than 0 (or 4096, an old bug) without extra devices
        "build_time": 0, "build_time_nsec": 0, "blocks": total // BLOCK_SIZE if nblobs else 0,
        "meta_blkaddr": meta_blkaddr, "xattr_blkaddr": 0, "uuid": bytes(16),
        "volume_name": bytes(16),
        "feature_incompat": E.INCOMPAT_CHUNKED_FILE | E.INCOMPAT_DEVICE_TABLE, "u1": 0,
        "extra_devices": nblobs, "devt_slotoff": R.DEVT_SLOTOFF, "dirblkbits": 0,
        "xattr_prefix_count": 0, "xattr_prefix_start": 0, "packed_nid": 0,
        "xattr_filter_reserved": 0, "reserved2": bytes(23),
    })
    out[E.EROFS_SUPER_OFFSET:E.EROFS_SUPER_OFFSET + len(sb)] = sb
    return BootstrapPlan(data=bytes(out), inode_count=len(recs), root_nid=ROOT_NID)


def _ci_compressor(b: BlobInfo) -> str:
    if b.ci_compressed_size == b.ci_uncompressed_size:
        return "none"
    return b.ci_compressor if b.ci_compressor != "none" else b.compressor


def _emit_record(out: bytearray, rec: _Rec, meta_base: int, nid_of: object,
                 chunk_size: int) -> None:
    ino = rec.inode
    assert callable(nid_of)
    content = b""
    if rec.dir_blocks:
        node = rec.node
        assert node.children is not None
        blocks = []
        for names in rec.dir_blocks:
            ents = bytearray()
            nameoff = E.DIRENT_SIZE * len(names)
            for name in names:
                if name == b".":
                    nid, ft = nid_of(ino), E.FT_DIR
                elif name == b"..":
                    nid, ft = nid_of(rec.parent.inode), E.FT_DIR
                else:
                    child = node.children[name]
                    nid, ft = nid_of(child.inode), file_type(child.inode.mode)
                ents += E.DIRENT_PACK.pack(nid, nameoff, ft, 0)
                nameoff += len(name)
            blocks.append(bytes(ents) + b"".join(names))
        content = b"".join(b.ljust(BLOCK_SIZE, b"\0") for b in blocks[:-1]) + blocks[-1]
        assert len(content) == rec.size
    elif rec.data:
        content = rec.data
    mode = ino.mode
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        i_u = E.encode_dev(ino.rdev_major, ino.rdev_minor)
    elif rec.datalayout == E.DATALAYOUT_CHUNK_BASED:
        i_u = E.CHUNK_FORMAT_INDEXES | (rec.chunk_bits - BLOCK_BITS)
    elif rec.head_blocks:
        i_u = rec.blkaddr
    elif rec.datalayout == E.DATALAYOUT_FLAT_INLINE:
        i_u = E.NULL_ADDR
    else:
        i_u = 0
    for field_name, value, limit in (("uid", ino.uid, 0xFFFFFFFF), ("gid", ino.gid, 0xFFFFFFFF),
                                     ("mtime", ino.mtime, (1 << 64) - 1)):
        if not 0 <= value <= limit:
            raise FormatError(f"inode {rec.ino}: {field_name} {value} out of range")
    icount = 0 if not rec.xattr else (len(rec.xattr) - E.XATTR_IBODY_HEADER_SIZE) // 4 + 1
    if icount > 0xFFFF:
        raise FormatError(f"inode {rec.ino}: too many xattr bytes")
    raw = E.INODE_EXTENDED_PACK.pack(
        E.i_format(rec.datalayout), icount, mode & 0xFFFF,
        E.I_RESERVED_IMPLICIT_DIR if ino.implicit and ino.is_dir else 0, rec.size, i_u, rec.ino,
        ino.uid, ino.gid, ino.mtime, ino.mtime_nsec, rec.nlink, bytes(16))
    off = rec.offset
    out[off:off + len(raw)] = raw
    off += len(raw)
    out[off:off + len(rec.xattr)] = rec.xattr
    off += len(rec.xattr)
    if rec.datalayout == E.DATALAYOUT_CHUNK_BASED:
        off = align(off, 8)
        idx = b"".join(
            E.CHUNK_INDEX_PACK.pack(c.index & 0xFFFF,
                                    (c.blob_index + 1) | (((c.index >> 16) & 0xFF) << 8),
                                    c.uncompressed_offset >> BLOCK_BITS)
            for c in ino.chunks)
        out[off:off + len(idx)] = idx
        off += len(idx)
    elif content:
        head = rec.head_blocks * BLOCK_SIZE
        if rec.head_blocks:
            start = rec.blkaddr * BLOCK_SIZE
            chunk = content[:head]
            out[start:start + len(chunk)] = chunk
        if rec.datalayout == E.DATALAYOUT_FLAT_INLINE:
            tail = content[head:]
            out[off:off + len(tail)] = tail
            off += len(tail)
    if off > rec.offset + align(rec.rec_size, 32):
        raise FormatError(f"internal: inode {rec.ino} overflowed its record")
