"""Bootstrap reader: parse, validate, and rebuild the file tree of a RAFS v6 image.

The checks mirror what the kernel and Nydus's `v6.rs` reject (reference/nydus-rafs-v6.md
section 7 and kernel-interfaces.md section C); `problems()` lists them one line each.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass

from erofs_nydus.errors import FormatError, SourceError, UnsupportedError
from erofs_nydus.layout import erofs as E
from erofs_nydus.layout import parse
from erofs_nydus.layout import rafs as R
from erofs_nydus.layout.common import BLOCK_BITS, BLOCK_SIZE
from erofs_nydus.rafs.image import PACKED_CHUNK, BlobInfo, ChunkInfo, ChunkList, RafsImage
from erofs_nydus.rafs.tree import Inode, Node

_BLOB_DATA_BITS = 40  # CI v1 comp_info stores 40-bit offsets: blob data below 1 TiB
_VALID_TYPES = {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                stat.S_IFIFO, stat.S_IFSOCK}
_FT_OF_TYPE = {stat.S_IFREG: E.FT_REG_FILE, stat.S_IFDIR: E.FT_DIR, stat.S_IFCHR: E.FT_CHRDEV,
               stat.S_IFBLK: E.FT_BLKDEV, stat.S_IFIFO: E.FT_FIFO, stat.S_IFSOCK: E.FT_SOCK,
               stat.S_IFLNK: E.FT_SYMLINK}


@dataclass(slots=True)
class RawInode:
    nid: int
    offset: int
    extended: bool
    datalayout: int
    xattr_icount: int
    mode: int
    size: int
    i_u: int
    ino: int
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int
    nlink: int
    reserved: int = 0

    @property
    def isize(self) -> int:
        return int(E.INODE_EXTENDED_SIZE if self.extended else E.INODE_COMPACT_SIZE)


class BootstrapReader:
    """Random access to one bootstrap held in memory."""

    def __init__(self, data: bytes, name: str = "bootstrap") -> None:
        self.data = data
        self.name = name
        if int.from_bytes(data[:4], "little") == R.RAFS_V5_MAGIC:
            raise UnsupportedError(f"{name}: RAFS v5 bootstrap: FUSE-only (nydusd fuse), the "
                                   "kernel can mount only RAFS v6")
        if len(data) < 2 * BLOCK_SIZE:
            raise FormatError(f"{name}: {len(data)} bytes is too small for a RAFS v6 bootstrap")
        self.sb = parse(E.SuperBlock, data, E.EROFS_SUPER_OFFSET, "EROFS superblock")
        if self.sb.magic != E.EROFS_SUPER_MAGIC:
            raise FormatError(f"{name}: not an EROFS image (magic {self.sb.magic:#010x})")
        self.ext = parse(R.SuperBlockExt, data, R.EXT_SUPERBLOCK_OFFSET, "RAFS ext superblock")
        self.meta_base = self.sb.meta_blkaddr * BLOCK_SIZE
        self._problems: list[str] = []
        self.refused: list[str] = []
        self._by_addr: dict[tuple[int, int], ChunkInfo] | None = None
        self.image = self._read_meta()

    # -- superblocks, blob table, chunk table -------------------------------------------------
    def _bad(self, msg: str) -> None:
        self._problems.append(msg)

    def _refuse(self, msg: str) -> None:
        """A valid image using a feature we do not implement: listed first, raised as
        UnsupportedError by `read_image_meta`."""
        if msg not in self.refused:
            self.refused.append(msg)
            self._problems.insert(len(self.refused) - 1, f"unsupported: {msg}")

    def _read_meta(self) -> RafsImage:
        sb, ext, bad = self.sb, self.ext, self._bad
        nblobs = sb.extra_devices
        devslot_end = R.DEVICE_TABLE_OFFSET + E.DEVICE_SLOT_SIZE * nblobs
        for msg in E.validate_superblock(sb, len(self.data), R.DEVT_SLOTOFF):
            bad(msg)
        for msg in R.validate_ext_superblock(ext, len(self.data), devslot_end):
            bad(msg)
        flags = ext.s_flags
        refused = R.refused_super_flags(flags)
        if refused:
            self._refuse(f"image uses {refused}")
        cs = ext.s_chunk_size
        if not (R.MIN_CHUNK_SIZE <= cs <= R.MAX_CHUNK_SIZE) or cs & (cs - 1):
            raise FormatError(f"{self.name}: ext superblock: chunk size {cs:#x} invalid")
        if nblobs > R.MAX_BLOBS:
            raise FormatError(f"{self.name}: {nblobs} blobs, at most {R.MAX_BLOBS} allowed")
        if ext.s_blob_table_size != R.BLOB_ENTRY_SIZE * nblobs:
            raise FormatError(f"{self.name}: blob table size {ext.s_blob_table_size} does not "
                              f"match {nblobs} devices")
        bt = ext.s_blob_table_offset
        if nblobs and (bt % BLOCK_SIZE or bt < devslot_end
                       or bt + ext.s_blob_table_size > len(self.data)):
            raise FormatError(f"{self.name}: blob table offset {bt:#x} invalid")
        blobs: list[BlobInfo] = []
        for i in range(nblobs):
            e = parse(R.BlobEntry, self.data, bt + R.BLOB_ENTRY_SIZE * i, f"blob table entry {i}")
            slot = parse(E.DeviceSlot, self.data, R.DEVICE_TABLE_OFFSET + E.DEVICE_SLOT_SIZE * i,
                         f"device slot {i}")
            blob_id = R.blob_id_str(e.blob_id)
            where = f"blob {i} ({blob_id[:12]})"
            refused = R.refused_blob_features(e.features, e.cipher_algo, e.compression_algo)
            if refused:
                self._refuse(f"{where} uses {refused}")
            for msg in R.validate_blob_entry(e, i, cs):
                bad(f"{where}: {msg}")
            for msg in R.validate_device_slot(slot, blob_id, e.uncompressed_size):
                bad(f"{where}: {msg}")
            compressor = R.COMPRESSOR_NAMES.get(e.compression_algo, "unknown")
            digester = R.DIGESTER_NAMES.get(e.digest_algo, "unknown")
            if digester != R.HASH_FLAGS.get(flags & (R.FLAG_HASH_BLAKE3 | R.FLAG_HASH_SHA256)):
                bad(f"{where}: digester {digester} differs from the image's hash flag")
            blobs.append(BlobInfo(
                blob_id=blob_id, blob_index=i, chunk_size=e.chunk_size,
                chunk_count=e.chunk_count, compressor=compressor, digester=digester,
                compressed_size=e.compressed_size, uncompressed_size=e.uncompressed_size,
                ci_offset=e.ci_offset, ci_compressed_size=e.ci_compressed_size,
                ci_uncompressed_size=e.ci_uncompressed_size, features=e.features,
                ci_compressor=R.COMPRESSOR_NAMES.get(e.ci_compressor, "unknown"),
                blob_toc_size=e.blob_toc_size, blob_toc_digest=e.blob_toc_digest,
                mapped_blkaddr=slot.mapped_blkaddr))
        self._check_blob_limits(blobs, cs)
        # Packed per blob (ChunkList), never one object per chunk: a daemon keeps them.
        packed = [bytearray() for _ in blobs]
        n_entries = ext.s_chunk_table_size // R.CHUNK_INFO_SIZE
        # a bit per CI index to find one used twice: no object per chunk, and never more
        # memory than the table's own size (a set where a blob claims far more chunks)
        indexes: list[bytearray | set[int]] = [
            bytearray((b.chunk_count + 7) >> 3) if b.chunk_count <= 64 * n_entries else set()
            for b in blobs]
        ct_off, ct_size = ext.s_chunk_table_offset, ext.s_chunk_table_size
        if ct_size % R.CHUNK_INFO_SIZE or ct_off + ct_size > len(self.data) or (
                ct_size and ct_off % BLOCK_SIZE):
            raise FormatError(f"{self.name}: chunk table at {ct_off:#x}+{ct_size} is invalid")
        prev_digest = b""
        pack = PACKED_CHUNK.pack
        max_chunk = R.MAX_CHUNK_SIZE
        # the hot loop of every register: a message is formatted only for a problem, and
        # no object is kept per chunk (a packed record each; the index set is transient)
        for i, (digest, blob_index, cflags, csize, usize, coff, uoff, _foff, index,
                _crc) in enumerate(R.CHUNK_INFO_PACK.iter_unpack(
                    memoryview(self.data)[ct_off:ct_off + ct_size])):
            if digest < prev_digest:
                bad(f"chunk table entry {i}: chunk table not sorted by digest")
            prev_digest = digest
            if blob_index >= len(blobs):
                bad(f"chunk table entry {i}: blob index {blob_index} >= {len(blobs)} blobs")
                continue
            b = blobs[blob_index]
            if uoff % BLOCK_SIZE or uoff + usize > b.uncompressed_size:
                bad(f"chunk table entry {i}: uncompressed range {uoff:#x}+{usize} outside blob")
                continue
            if not 0 < usize <= cs or not 0 < csize <= max_chunk:
                bad(f"chunk table entry {i}: chunk sizes {csize}/{usize} invalid")
                continue
            if cflags & ~R.CHUNK_FLAG_COMPRESSED:
                self._check_chunk_flags(i, blob_index, cflags)
            compressed = bool(cflags & R.CHUNK_FLAG_COMPRESSED)
            if compressed and b.compressor not in R.SUPPORTED_COMPRESSORS[1:]:
                bad(f"chunk table entry {i}: compressed chunk in a blob with compressor "
                    f"{b.compressor}")
            if not compressed and csize != usize:
                bad(f"chunk table entry {i}: uncompressed chunk with compressed size {csize} "
                    f"!= {usize}")
            if coff + csize > b.compressed_size or coff >> _BLOB_DATA_BITS:
                bad(f"chunk table entry {i}: compressed range {coff:#x}+{csize} outside blob "
                    "data")
                continue
            if index >= b.chunk_count:
                bad(f"chunk table entry {i}: chunk index {index} >= the blob's "
                    f"{b.chunk_count} chunks")
                continue
            seen = indexes[blob_index]
            if isinstance(seen, bytearray):
                byte, bit = index >> 3, 1 << (index & 7)
                twice = seen[byte] & bit
                seen[byte] |= bit
            else:
                twice = index in seen
                seen.add(index)
            if twice:
                # two records would share one presence bit in the daemon's chunk map
                bad(f"chunk table entry {i}: chunk index {index} used twice in blob "
                    f"{blob_index}")
                continue
            packed[blob_index] += pack(digest, uoff, coff, usize, csize, index, compressed)
        del indexes
        chunks = []
        for b, rec in zip(blobs, packed, strict=True):
            lst = ChunkList.from_unsorted(b.blob_index, b.compressor, b.digester, rec)
            end, prev_start, dup = -1, -1, False
            for _index, start, aligned in lst.extents():
                if start == prev_start:
                    bad(f"blob {b.blob_index}: two chunks at offset {start:#x}")
                    dup = True
                    continue
                if start < end:
                    bad(f"blob {b.blob_index}: chunks at {prev_start:#x} and {start:#x} overlap")
                prev_start, end = start, max(end, start + aligned)
            if dup:  # keep the first of each offset (table order: the sort is stable)
                lst = lst.without_repeated_starts()
            chunks.append(lst)
        return RafsImage(bootstrap_size=len(self.data), chunk_size=cs, flags=flags, blobs=blobs,
                         chunks=chunks, fsid=hashlib.sha256(self.data).hexdigest())

    def _check_blob_limits(self, blobs: list[BlobInfo], chunk_size: int) -> None:
        """Bounds the daemon sizes allocations by (chunk map bits, sparse cache file):
        fatal, so nothing downstream ever sees an unbounded count or size."""
        for b in blobs:
            where = f"{self.name}: blob {b.blob_index} ({b.blob_id[:12]})"
            if b.chunk_count > R.MAX_CHUNKS_PER_BLOB:
                raise FormatError(f"{where}: chunk count {b.chunk_count} exceeds the limit "
                                  f"{R.MAX_CHUNKS_PER_BLOB}")
            # 4 KiB-aligned layout: every chunk takes at most chunk_size bytes of the space
            if b.uncompressed_size > b.chunk_count * chunk_size:
                raise FormatError(f"{where}: uncompressed size {b.uncompressed_size} exceeds "
                                  f"{b.chunk_count} chunks of {chunk_size} bytes")
            if b.compressed_size >> _BLOB_DATA_BITS:
                raise FormatError(f"{where}: compressed size {b.compressed_size:#x} too large")

    def _check_chunk_flags(self, i: int, blob_index: int, cflags: int) -> None:
        for flag, what in R.REFUSED_CHUNK_FLAGS.items():
            if cflags & flag:
                self._refuse(f"blob {blob_index} has {what}")
        if cflags & ~R.CHUNK_FLAGS_KNOWN:
            self._bad(f"chunk table entry {i}: unknown chunk flags {cflags:#x}")

    @property
    def by_addr(self) -> dict[tuple[int, int], ChunkInfo]:
        """(blob index, uncompressed offset) -> chunk, every chunk built once and kept
        (tools that walk the whole tree; identities stay stable from then on)."""
        if self._by_addr is None:
            self._by_addr = {(c.blob_index, c.uncompressed_offset): c
                             for lst in self.image.chunks
                             for c in (lst.materialize() if isinstance(lst, ChunkList) else lst)}
        return self._by_addr

    def chunk_at(self, blob_index: int, offset: int) -> ChunkInfo | None:
        """The chunk of blob `blob_index` at uncompressed `offset`: from `by_addr` once
        built, else found in the packed list without building the others."""
        if self._by_addr is not None:
            return self._by_addr.get((blob_index, offset))
        if not 0 <= blob_index < len(self.image.chunks):
            return None
        lst = self.image.chunks[blob_index]
        if isinstance(lst, ChunkList):
            return lst.find(offset)
        return self.by_addr.get((blob_index, offset))

    # -- inodes and directories ---------------------------------------------------------------
    def inode(self, nid: int) -> RawInode:
        off = self.meta_base + (nid << E.ISLOT_BITS)
        if off + E.INODE_COMPACT_SIZE > len(self.data):
            raise FormatError(f"nid {nid}: inode offset {off:#x} beyond the bootstrap")
        fmt = int.from_bytes(self.data[off:off + 2], "little")
        if fmt >> 4:
            raise FormatError(f"nid {nid}: i_format {fmt:#x} has unknown bits")
        layout = E.datalayout_of(fmt)
        if fmt & 1:
            if off + E.INODE_EXTENDED_SIZE > len(self.data):
                raise FormatError(f"nid {nid}: inode beyond the bootstrap")
            (_f, icount, mode, reserved, size, i_u, ino, uid, gid, mtime, nsec, nlink,
             _r2) = E.INODE_EXTENDED_PACK.unpack_from(self.data, off)
        else:
            (_f, icount, mode, nlink, size, _r, i_u, ino, uid, gid,
             _r2) = E.INODE_COMPACT_PACK.unpack_from(self.data, off)
            mtime, nsec = self.sb.build_time, self.sb.build_time_nsec
            reserved = 0
        if stat.S_IFMT(mode) not in _VALID_TYPES:
            raise FormatError(f"nid {nid}: invalid file type in mode {mode:o}")
        if layout not in (E.DATALAYOUT_FLAT_PLAIN, E.DATALAYOUT_FLAT_INLINE,
                          E.DATALAYOUT_CHUNK_BASED):
            raise FormatError(f"nid {nid}: unsupported data layout {layout}")
        if size >> 63:
            raise FormatError(f"nid {nid}: negative size")
        return RawInode(nid, off, bool(fmt & 1), layout, icount, mode, size, i_u, ino, uid, gid,
                        mtime, nsec, nlink, reserved)

    def xattrs(self, ri: RawInode) -> dict[bytes, bytes]:
        if ri.xattr_icount == 0:
            return {}
        start = ri.offset + ri.isize
        total = E.xattr_ibody_size(ri.xattr_icount)
        body = self.data[start:start + total]
        if len(body) != total:
            raise FormatError(f"nid {ri.nid}: xattr body beyond the bootstrap")
        if body[4]:
            raise FormatError(f"nid {ri.nid}: shared xattrs are not allowed in RAFS v6")
        out: dict[bytes, bytes] = {}
        pos = E.XATTR_IBODY_HEADER_SIZE
        if pos == total:
            raise FormatError(f"nid {ri.nid}: xattr icount 1 (header only) is invalid")
        while pos < total:
            if pos + 4 > total:
                raise FormatError(f"nid {ri.nid}: truncated xattr entry")
            nlen, index, vlen = E.XATTR_ENTRY_PACK.unpack_from(body, pos)
            end = pos + 4 + nlen + vlen
            if end > total:
                raise FormatError(f"nid {ri.nid}: xattr entry overruns the xattr body")
            prefix = E.XATTR_PREFIXES.get(index)
            if prefix is None:
                raise FormatError(f"nid {ri.nid}: unknown xattr name index {index}")
            name = prefix + body[pos + 4:pos + 4 + nlen]
            out[name] = body[pos + 4 + nlen:end]
            pos = (end + 3) & ~3
        return out

    def flat_data(self, ri: RawInode) -> bytes:
        """Content of a FLAT_PLAIN / FLAT_INLINE inode (directory or symlink)."""
        size = ri.size
        if ri.datalayout == E.DATALAYOUT_CHUNK_BASED:
            raise FormatError(f"nid {ri.nid}: chunk-based directories/symlinks are not supported")
        if size > len(self.data):  # flat data lives in the bootstrap itself
            raise FormatError(f"nid {ri.nid}: flat inode of {size} bytes is longer than the "
                              "bootstrap")
        if ri.datalayout == E.DATALAYOUT_FLAT_PLAIN:
            head, tail = size, 0
        else:
            tail = size % BLOCK_SIZE or (BLOCK_SIZE if size else 0)
            if size % BLOCK_SIZE == 0:
                raise FormatError(f"nid {ri.nid}: FLAT_INLINE with a block-multiple size")
            head = size - tail
        out = b""
        if head:
            start = ri.i_u * BLOCK_SIZE
            out = self.data[start:start + head]
            if len(out) != head:
                raise FormatError(f"nid {ri.nid}: data blocks beyond the bootstrap")
        if tail:
            start = ri.offset + ri.isize + E.xattr_ibody_size(ri.xattr_icount)
            if start // BLOCK_SIZE != (start + tail - 1) // BLOCK_SIZE:
                raise FormatError(f"nid {ri.nid}: inline data crosses a block boundary")
            out += self.data[start:start + tail]
            if len(out) != size:
                raise FormatError(f"nid {ri.nid}: inline data beyond the bootstrap")
        return out

    def dirents(self, ri: RawInode) -> list[tuple[bytes, int, int]]:
        """(name, nid, file_type) of a directory, checked for order and bounds."""
        data = self.flat_data(ri)
        out: list[tuple[bytes, int, int]] = []
        prev = None
        for bstart in range(0, len(data), BLOCK_SIZE):
            blk = data[bstart:bstart + BLOCK_SIZE]
            blen = len(blk)
            nameoff0 = int.from_bytes(blk[8:10], "little")
            if nameoff0 == 0 or nameoff0 % E.DIRENT_SIZE or nameoff0 >= blen:
                raise FormatError(f"nid {ri.nid}: bad dirent nameoff {nameoff0} in block "
                                  f"{bstart // BLOCK_SIZE}")
            ents = list(E.DIRENT_PACK.iter_unpack(blk[:nameoff0]))
            n = len(ents)
            for i, (nid, nameoff, ftype, _r) in enumerate(ents):
                end = ents[i + 1][1] if i + 1 < n else blen
                if not nameoff0 <= nameoff < end <= blen:
                    raise FormatError(f"nid {ri.nid}: dirent {i} name offsets out of order")
                name = blk[nameoff:end]
                if i + 1 == n:
                    name = name.split(b"\0", 1)[0]
                if not name or len(name) > 255:
                    raise FormatError(f"nid {ri.nid}: dirent {i} has an invalid name length")
                if prev is not None and prev >= name:
                    raise FormatError(f"nid {ri.nid}: dirents not sorted ({prev!r} >= "
                                      f"{name!r})")
                prev = name
                out.append((name, nid, ftype))
        return out

    def chunk_refs(self, ri: RawInode, keep: bool = True) -> list[ChunkInfo]:
        """The chunks of a chunk-based inode, each checked against the chunk table.
        `keep=False`: checked only, from the packed lists (no object per chunk; an
        empty list is returned), for a walk that validates and throws the tree away."""
        chunk_size = self.image.chunk_size
        fmt = ri.i_u & 0xFFFF
        if not fmt & E.CHUNK_FORMAT_INDEXES or fmt & ~0x3F:
            raise FormatError(f"nid {ri.nid}: unsupported chunk format {fmt:#x} "
                              "(RAFS v6 needs 8-byte chunk indexes)")
        if (BLOCK_SIZE << (fmt & E.CHUNK_FORMAT_BLKBITS_MASK)) < chunk_size:
            raise FormatError(f"nid {ri.nid}: inode chunk size smaller than the image's")
        n = (ri.size + chunk_size - 1) // chunk_size
        start = ri.offset + ri.isize + E.xattr_ibody_size(ri.xattr_icount)
        start = (start + 7) & ~7
        if start + 8 * n > len(self.data):
            raise FormatError(f"nid {ri.nid}: chunk indexes beyond the bootstrap")
        mask = (1 << (self.sb.extra_devices).bit_length()) - 1 if self.sb.extra_devices else 0
        out: list[ChunkInfo] = []
        for i in range(n):
            _adv, dev, blkaddr = E.CHUNK_INDEX_PACK.unpack_from(self.data, start + 8 * i)
            dev &= mask
            c = self.chunk_at(dev - 1, blkaddr << BLOCK_BITS) if dev and keep else None
            if c is not None:
                usize: int | None = c.uncompressed_size
                out.append(c)
            else:
                usize = self._size_at(dev - 1, blkaddr << BLOCK_BITS) if dev and not keep \
                    else None
            if usize is None:
                raise FormatError(f"nid {ri.nid}: chunk {i} (device {dev}, block {blkaddr}) is "
                                  "not in the chunk table")
            want = min(chunk_size, ri.size - i * chunk_size)
            if usize != want:
                raise FormatError(f"nid {ri.nid}: chunk {i} holds {usize} bytes, "
                                  f"file needs {want}")
        return out

    def _size_at(self, blob_index: int, offset: int) -> int | None:
        if not 0 <= blob_index < len(self.image.chunks):
            return None
        lst = self.image.chunks[blob_index]
        if isinstance(lst, ChunkList):
            return lst.size_at(offset)
        c = self.chunk_at(blob_index, offset)
        return None if c is None else c.uncompressed_size

    # -- whole tree ---------------------------------------------------------------------------
    def tree(self, keep_chunks: bool = True) -> Node:
        """Rebuild the file tree; hard links share one `Inode`.  `keep_chunks=False`:
        files' chunks are checked but not listed (`chunk_refs`), for a validating walk."""
        root_ri = self.inode(self.sb.root_nid)
        if not stat.S_ISDIR(root_ri.mode):
            raise FormatError(f"root nid {self.sb.root_nid} is not a directory")
        if keep_chunks:
            self.by_addr  # noqa: B018  (builds every chunk once: files share them, as before)
        root = Node(b"", self._inode(root_ri, keep_chunks))
        seen: dict[int, Inode] = {self.sb.root_nid: root.inode}
        stack = [(root, root_ri, b"/")]
        while stack:
            node, ri, path = stack.pop()
            assert node.children is not None
            for name, nid, ftype in self.dirents(ri):
                if name in (b".", b".."):
                    continue
                cpath = path + name
                shared = seen.get(nid)
                if shared is not None:
                    if shared.is_dir:
                        raise FormatError(f"{cpath!r}: directory nid {nid} linked twice")
                    node.children[name] = Node(name, shared)
                    continue
                cri = self.inode(nid)
                if _FT_OF_TYPE[stat.S_IFMT(cri.mode)] != ftype:
                    self._bad(f"{cpath!r}: dirent file type {ftype} does not match the inode")
                child = Node(name, self._inode(cri, keep_chunks))
                seen[nid] = child.inode
                node.children[name] = child
                if child.children is not None:
                    stack.append((child, cri, cpath + b"/"))
        return root

    def _inode(self, ri: RawInode, keep_chunks: bool = True) -> Inode:
        ino = Inode(mode=ri.mode, uid=ri.uid, gid=ri.gid, mtime=ri.mtime,
                    mtime_nsec=ri.mtime_nsec, size=ri.size, xattrs=self.xattrs(ri),
                    implicit=bool(ri.reserved & E.I_RESERVED_IMPLICIT_DIR)
                    and stat.S_ISDIR(ri.mode))
        t = stat.S_IFMT(ri.mode)
        if t == stat.S_IFREG:
            if ri.datalayout != E.DATALAYOUT_CHUNK_BASED:
                raise FormatError(f"nid {ri.nid}: regular file is not chunk-based")
            ino.chunks = self.chunk_refs(ri, keep_chunks)
        elif t == stat.S_IFLNK:
            ino.target = self.flat_data(ri)
        elif t in (stat.S_IFCHR, stat.S_IFBLK):
            ino.rdev_major, ino.rdev_minor = E.decode_dev(ri.i_u)
            ino.size = 0
        return ino

    def tree_passes(self) -> bool:
        """True when `tree()` would find nothing wrong, decided without building the tree.

        The same checks as `tree()` and the methods it calls, in one loop: a regular
        file without xattrs (most inodes) is checked inline (its inode fields and
        chunk indexes); every other inode goes through `inode()` and `_inode()` as in
        `tree()`, directories through `dirents()`.  False at the first failed check
        (or any error): `tree()` then names the problem.  No check of `tree()` may be
        missing here - a False is only ever slower, a True skips `tree()`."""
        try:
            return self._tree_passes()
        except Exception:
            return False

    def _tree_passes(self) -> bool:
        data, size_total = self.data, len(self.data)
        meta_base = self.meta_base
        cs = self.image.chunk_size
        ndev = self.sb.extra_devices
        mask = (1 << ndev.bit_length()) - 1 if ndev else 0
        # by_addr as {device: {blkaddr: uncompressed size}} (int keys hash cheaply);
        # device 0 and devices without a blob map to {} (no chunk there)
        sizes: list[dict[int, int]] = [{} for _ in range(mask + 1)]
        if self._by_addr is not None:
            for (blob, uoff), c in self._by_addr.items():
                sizes[blob + 1][uoff >> BLOCK_BITS] = c.uncompressed_size
        else:  # from the packed lists: a daemon's image keeps no ChunkInfo per chunk
            for lst in self.image.chunks:
                if isinstance(lst, ChunkList):
                    at = sizes[lst.blob_index + 1]
                    for uoff, usize in lst.sizes():
                        at[uoff >> BLOCK_BITS] = usize
                else:
                    for c in lst:
                        sizes[c.blob_index + 1][c.uncompressed_offset >> BLOCK_BITS] = (
                            c.uncompressed_size)
        compact, extended = E.INODE_COMPACT_SIZE, E.INODE_EXTENDED_SIZE
        ext_unpack, compact_unpack = (E.INODE_EXTENDED_PACK.unpack_from,
                                      E.INODE_COMPACT_PACK.unpack_from)
        iter_index = E.CHUNK_INDEX_PACK.iter_unpack
        chunk_based, s_ifreg, s_ifmt = E.DATALAYOUT_CHUNK_BASED, stat.S_IFREG, stat.S_IFMT
        fmt_indexes, blkbits_mask = E.CHUNK_FORMAT_INDEXES, E.CHUNK_FORMAT_BLKBITS_MASK
        ft_of_type, is_dir_mode = _FT_OF_TYPE, stat.S_ISDIR
        root_nid = self.sb.root_nid
        root_ri = self.inode(root_nid)
        if not is_dir_mode(root_ri.mode):
            return False
        self._inode(root_ri)
        seen: dict[int, bool] = {root_nid: True}  # nid -> is a directory
        stack = [root_ri]
        while stack:
            for name, nid, ftype in self.dirents(stack.pop()):
                if name in (b".", b".."):
                    continue
                shared = seen.get(nid)
                if shared is not None:
                    if shared:  # a directory linked twice
                        return False
                    continue
                off = meta_base + (nid << 5)  # E.ISLOT_BITS
                if off + compact > size_total:
                    return False
                fmt = data[off] | data[off + 1] << 8
                if fmt & 1:
                    if off + extended > size_total:
                        return False
                    _f, icount, mode, _r, size, i_u = ext_unpack(data, off)[:6]
                    isize = extended
                else:
                    _f, icount, mode, _n, size, _r, i_u = compact_unpack(data, off)[:7]
                    isize = compact
                if (s_ifmt(mode) != s_ifreg or icount or fmt >> 4
                        or (fmt >> 1) & 7 != chunk_based or size >> 63):
                    # anything but a plain chunk-based regular file: as `tree()` does
                    cri = self.inode(nid)
                    if ft_of_type[s_ifmt(cri.mode)] != ftype:
                        return False
                    self._inode(cri)
                    isdir = is_dir_mode(cri.mode)
                    seen[nid] = isdir
                    if isdir:
                        stack.append(cri)
                    continue
                if ftype != E.FT_REG_FILE:
                    return False
                seen[nid] = False
                # chunk_refs(): 8-byte indexes, each naming a chunk of the right size
                cfmt = i_u & 0xFFFF
                if not cfmt & fmt_indexes or cfmt & ~0x3F or (
                        BLOCK_SIZE << (cfmt & blkbits_mask)) < cs:
                    return False
                n = (size + cs - 1) // cs
                start = (off + isize + 7) & ~7
                if start + 8 * n > size_total:
                    return False
                left = size
                for _adv, dev, blkaddr in iter_index(data[start:start + 8 * n]):
                    if sizes[dev & mask].get(blkaddr) != (cs if left > cs else left):
                        return False
                    left -= cs
        return True

    def problems(self, walk: bool = True) -> list[str]:
        """Everything wrong with the metadata, one line each.  `walk=False` lists only what
        opening the image found (superblocks, blob and chunk tables) without walking the
        whole tree."""
        if walk and not self.tree_passes():
            try:  # name the problem; checked from the packed lists: `image` stays packed
                self.tree(keep_chunks=False)
            except FormatError as exc:
                self._bad(str(exc))
        return list(self._problems)

    def prefetch_nids(self) -> list[int]:
        off, size = self.ext.s_prefetch_table_offset, self.ext.s_prefetch_table_size
        if not off or not size:
            return []
        raw = self.data[off:off + size]
        return [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw) - 3, 4)]


def has_prefetch_table(data: bytes) -> bool:
    """Whether a bootstrap names a prefetch table, read from its ext superblock alone
    (what `prefetch_nids` would find non-empty), without parsing the rest: a daemon asks
    this of every image it registers, most of which have none."""
    where = R.EXT_SUPERBLOCK_OFFSET + 40  # s_prefetch_table_offset, then its size
    if len(data) < where + 12:
        return False
    off, size = struct.unpack_from("<QI", data, where)
    return bool(off and size)


def read_image_meta(data: bytes, name: str = "bootstrap", strict: bool = True) -> RafsImage:
    r = BootstrapReader(data, name)
    if strict and r.refused:
        raise UnsupportedError(f"{name}: unsupported: {r.refused[0]}")
    problems = r.problems(walk=False) if strict else []
    if problems:
        raise FormatError(f"{name}: {problems[0]}")
    return r.image


MAX_BOOTSTRAP_SIZE = 512 * 1024 * 1024  # a bootstrap we read whole (regular files only)


def read_bootstrap_bytes(path: str) -> bytes:
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:  # FIFOs: no hang
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(f"{path}: not a regular file")
            if st.st_size > MAX_BOOTSTRAP_SIZE:
                raise FormatError(f"{path}: larger than {MAX_BOOTSTRAP_SIZE >> 20} MiB "
                                  "(MAX_BOOTSTRAP_SIZE)")
            return f.read()
    except OSError as exc:  # unreadable is not corrupt: its own message and exit code
        raise SourceError(f"{path}: cannot read bootstrap: {exc.strerror}") from exc


def read_bootstrap_file(path: str) -> RafsImage:
    return read_image_meta(read_bootstrap_bytes(path), os.path.basename(path))


def open_bootstrap(path: str) -> BootstrapReader:
    return BootstrapReader(read_bootstrap_bytes(path), os.path.basename(path))


def load_image(data: bytes) -> RafsImage:
    """Parse and validate a bootstrap; raise `FormatError` naming the first problem."""
    return read_image_meta(data)


@dataclass(frozen=True)
class LoadedBootstrap:
    """A bootstrap file read and parsed, with the identity of the file it was read
    from, so that a later user of the same path in the same process can take the parse
    instead of repeating it (`matches`).

    `full`: the parse was the full validation a mount needs (the daemon's
    ``validate_bootstrap``: superblocks, tables and the whole tree, or a verdict that
    these bytes passed it); False: only `load_image`'s checks (no tree walk), so a
    mount must still validate `data` fully.  Made in-process only, never from a
    request."""

    path: str
    data: bytes
    image: RafsImage
    ident: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns
    full: bool = False

    def matches(self, path: str) -> bool:
        """True while `path` is still the file this was read from, unchanged."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (os.path.abspath(path) == self.path
                and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) == self.ident)


def load_bootstrap_file(
    path: str, validate: Callable[[bytes, str], RafsImage] | None = None
) -> LoadedBootstrap:
    """`load_image` of the file at `path`, kept with the file's identity.  `validate`
    (data, name) -> image: the caller's full validation instead (``full`` is then
    True: pass only a function that walks the whole tree or knows these bytes did)."""
    try:
        st = os.stat(path)
    except OSError:
        st = None
    data = read_bootstrap_bytes(path)  # its one-line errors (and this one's) first
    if st is None:
        st = os.stat(path)
    return bootstrap_from_bytes(path, data, st, validate)


def bootstrap_from_bytes(
    path: str, data: bytes, st: os.stat_result,
    validate: Callable[[bytes, str], RafsImage] | None = None,
) -> LoadedBootstrap:
    """`load_bootstrap_file` for bytes the caller already read from `path` (whose
    `os.stat`/`os.fstat` is `st`): parsed once, not read again."""
    image = validate(data, os.path.basename(path)) if validate else load_image(data)
    return LoadedBootstrap(os.path.abspath(path), data, image,
                           (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns),
                           full=validate is not None)
