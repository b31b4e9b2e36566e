"""One blob's cache file: the blob's uncompressed, 4 KiB-aligned address space.

`<cache-dir>/<blob_id>.blob.data` is a sparse file of `uncompressed_size` bytes;
chunk i lives at its `uncompressed_offset`, zero-padded to 4 KiB.  Which chunks are
present is recorded in `<blob_id>.chunk_map` (see `chunkmap.py`) and re-verified on
open: a set bit whose extent has a hole in the file (SEEK_DATA/SEEK_HOLE) is cleared,
so a chunk is never trusted without data behind it; and unless the map's seal proves
the file unchanged since this daemon verified it, under the same chunk list, every
present chunk is re-digested (`recheck`), bad ones dropped for re-fetch.

Writes must never generate pre-content events (the daemon would wait on itself).
The kernel decides at open time whether an open file reports them, so a descriptor
opened before the file was marked is safe, and so is the fd a fanotify event
carries; `write_chunk` takes the latter when a request source has one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import itertools
import logging
import os
import struct
import threading
from array import array
from collections.abc import Iterable, Iterator, Sequence

from erofs_nydus.daemon.chunkmap import ChunkMap, Seal
from erofs_nydus.errors import DaemonError, FormatError
from erofs_nydus.fsutil import open_private
from erofs_nydus.layout.rafs import MAX_CHUNKS_PER_BLOB
from erofs_nydus.rafs.codec import chunk_digest
from erofs_nydus.rafs.image import PACKED_CHUNK, BlobInfo, ChunkInfo, ChunkList

__all__ = ["BlobCacheFile", "cache_dir_lock", "cache_paths", "punch_hole"]

_ZEROS = bytes(4096)
_LISTED = struct.Struct("<IQIQI?32s")
log = logging.getLogger("erofs_nydus.daemon")


def cache_paths(cache_dir: str, blob_id: str) -> tuple[str, str]:
    """(data file, chunk map) paths of a blob in `cache_dir`."""
    return (
        os.path.join(cache_dir, f"{blob_id}.blob.data"),
        os.path.join(cache_dir, f"{blob_id}.chunk_map"),  # nydusd's name: the snapshotter
        # removes `<blob>.blob.data` and `<blob>.chunk_map` with an image
    )


@contextlib.contextmanager
def cache_dir_lock(cache_dir: str, *, exclusive: bool) -> Iterator[None]:
    """flock the cache dir itself: shared while a daemon opens or creates files in it
    for an image (until the state file lists them), exclusive while `cache gc` decides
    what is unused and removes it.  No file of its own: nothing to plant or leave."""
    fd = os.open(cache_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # drops the lock


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc: ctypes.CDLL | None = None


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate [offset, offset+length) (reads as zeros, drops its page cache).
    False where the filesystem cannot; the caller has cleared the chunk's bit anyway."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fallocate = _libc.fallocate
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    rc = fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length)
    if rc != 0:
        log.warning("cannot punch a hole at %d+%d: %s", offset, length,
                    os.strerror(ctypes.get_errno()))
    return bool(rc == 0)


def _digest_or_none(data: bytes, digester: str) -> bytes | None:
    try:
        return chunk_digest(data, digester)
    except FormatError:  # a digester we cannot compute proves nothing
        return None


def _has_hole(fd: int, start: int, end: int) -> bool:
    """True if [start, end) of the file is not entirely backed by data."""
    try:
        data = os.lseek(fd, start, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data at or after start
            return True
        raise
    if data > start:
        return True
    hole = os.lseek(fd, start, os.SEEK_HOLE)
    return hole < end


class BlobCacheFile:
    """Cache file + presence map of one blob.  Thread-safe."""

    def __init__(
        self,
        cache_dir: str,
        blob: BlobInfo,
        chunks: Sequence[ChunkInfo],
        *,
        fd: int | None = None,
        durable: bool = True,
        readable: bool = True,
    ) -> None:
        """`readable`: reading the file's fd raises no fanotify pre-content event (it
        was opened before the file was marked, or nothing marks it).  A restarted daemon
        that reopened a file the surviving group may still mark passes False: its own
        read would wait for an answer that only it could give once it serves, so
        present chunks the seal does not vouch for are dropped for a verified re-fetch
        instead of being re-digested (nothing unverified is served either way)."""
        self.blob = blob
        self.blob_id = blob.blob_id
        self.size = blob.uncompressed_size
        self.data_path, self.map_path = cache_paths(cache_dir, blob.blob_id)
        self.durable = durable
        self.lock = threading.Lock()
        self._users = 0  # fills writing through self.fd right now (see acquire)
        self._closing = False
        # packed, sorted by offset: the one per-chunk structure a daemon keeps
        self.chunks = ChunkList.build(chunks, blob.blob_index, blob.compressor, blob.digester)
        self._check_blob()
        self._check_chunks(self.chunks)
        nbits = blob.chunk_count  # bounded by _check_blob; every index is below it
        own_fd = fd is None
        if fd is None:
            fd = open_private(self.data_path, os.O_RDWR | os.O_CREAT)  # 0600, no symlink
        self.fd = fd
        try:
            st = os.fstat(fd)
            self.dev_ino = (st.st_dev, st.st_ino)
            fresh = st.st_size != self.size
            if fresh:
                # Unknown content: start from an all-hole file of the right size.
                os.ftruncate(fd, 0)
                try:
                    os.ftruncate(fd, self.size)
                except OSError as exc:  # EFBIG: the filesystem's file size limit
                    raise DaemonError(f"blob {self.blob_id}: cannot make a {self.size}-byte "
                                      f"cache file {self.data_path}: {exc.strerror}") from exc
                for p in (self.map_path,):
                    if os.path.exists(p):
                        os.unlink(p)
            self.map = ChunkMap.open(self.map_path, nbits)
            self._missing = sum(1 for i, _, _ in self.chunks.extents() if i not in self.map)
            self.verify()
            # Present chunks are trusted only as far as this daemon verified them: a
            # seal that no longer matches the file (a crash, or a write by anyone else
            # since) means every present chunk is re-digested before it is served.
            self.rechecked = 0
            self.dropped: list[ChunkInfo] = []  # by that re-check
            listed = self._listed()
            if self.map.count() and (self.map.seal != self._seal() or self.map.listed != listed):
                if readable:
                    self.rechecked = len(self.chunks) - self._missing
                    self.dropped = self.recheck()
                    if self.dropped:
                        log.warning("blob %s: %d cached chunks failed their digest; dropped "
                                    "for re-fetch", self.blob_id[:12], len(self.dropped))
                else:
                    self.dropped = self._drop_present()
                    log.warning("blob %s: %d cached chunks not re-digested (the file may be "
                                "marked); dropped for re-fetch", self.blob_id[:12],
                                len(self.dropped))
            self.map.set_seal(self._seal())
            self.map.set_listed(listed)
        except BaseException:
            if own_fd:
                os.close(fd)
            raise

    def _check_blob(self) -> None:
        """What sizes this file and its map must be within fixed limits (the reader
        refuses such bootstraps already; this holds for any caller)."""
        b = self.blob
        if not 0 < b.chunk_count <= MAX_CHUNKS_PER_BLOB:
            raise DaemonError(f"blob {self.blob_id}: chunk count {b.chunk_count} outside "
                              f"1..{MAX_CHUNKS_PER_BLOB}")
        if not 0 < self.size <= b.chunk_count * b.chunk_size or self.size % 4096:
            raise DaemonError(f"blob {self.blob_id}: uncompressed size {self.size} does not "
                              f"fit {b.chunk_count} chunks of {b.chunk_size} bytes")

    def _check_chunks(self, chunks: ChunkList) -> None:
        end = 0
        count = self.blob.chunk_count
        seen = bytearray((count + 7) >> 3)  # a bit per index: the size of the chunk map
        for index, start, aligned in chunks.extents():
            if not 0 <= index < count or seen[index >> 3] & (1 << (index & 7)):
                # one presence bit per chunk: an alias would report a hole as present
                raise DaemonError(f"blob {self.blob_id}: chunk index {index} out of range "
                                  "or listed twice")
            seen[index >> 3] |= 1 << (index & 7)
            if start % 4096 or start < end:
                raise DaemonError(
                    f"blob {self.blob_id}: chunk {index} at {start} overlaps "
                    "or is not 4 KiB aligned"
                )
            end = start + aligned
        if end > self.size:
            raise DaemonError(
                f"blob {self.blob_id}: chunks end at {end}, past uncompressed size {self.size}"
            )

    def add_chunks(self, chunks: Sequence[ChunkInfo]) -> list[ChunkInfo]:
        """Merge chunks another image lists for this blob; return the new ones.

        Two bootstraps may list different subsets of one blob's chunks (a merged
        image drops chunks only whited-out files used); serving the union keeps a
        range from ever being answered without its chunk.  The blob's position in
        the other image's blob table does not matter (`ChunkList.records`).
        """
        other = ChunkList.build(chunks, self.blob.blob_index, self.blob.compressor,
                                self.blob.digester)
        self._check_chunks(other)  # on its own first: no index twice, none out of range
        with self.lock:
            if other.records() == self.chunks.records():  # the same image again
                return []
            pos = {index: p for p, (index, _, _) in enumerate(self.chunks.extents())}
            mine = self.chunks.records()
            size = PACKED_CHUNK.size
            new = []
            added = bytearray()
            for p, c in enumerate(other):
                old = pos.get(c.index)
                rec = other.records()[p * size:(p + 1) * size]
                if old is None:
                    new.append(c)
                    pos[c.index] = -1
                    added += rec
                elif old >= 0 and mine[old * size:(old + 1) * size] != rec:
                    raise DaemonError(f"blob {self.blob_id}: images disagree about chunk {c.index}")
            if not new:
                return []
            merged = ChunkList.from_unsorted(self.chunks.blob_index, self.chunks.compressor,
                                             self.chunks.digester, bytes(mine) + bytes(added))
            self._check_chunks(merged)
            self.chunks = merged
            self._missing += sum(1 for c in new if c.index not in self.map)
            present = [c for c in new if c.index in self.map]
        # present already, but verified against another image's list: re-digest them
        dropped = self.recheck(present) if present else []
        if dropped:
            log.warning("blob %s: %d cached chunks do not match the new image's digests; "
                        "dropped for re-fetch", self.blob_id[:12], len(dropped))
        with self.lock:
            self.map.set_listed(self._listed())
        return new

    def verify(self) -> int:
        """Clear map bits whose chunk has a hole in the file; return how many were cleared."""
        cleared = 0
        with self.lock:
            for index, start, aligned in self.chunks.extents():
                if index in self.map and _has_hole(self.fd, start, start + aligned):
                    self.map.clear(index)
                    self._missing += 1
                    cleared += 1
        return cleared

    def _listed(self) -> bytes:
        """Fingerprint of the chunk list: what present bits were verified against."""
        h = hashlib.sha256()
        recs = self.chunks.records()
        size = PACKED_CHUNK.size
        indexes = array("I", (index for index, _, _ in self.chunks.extents()))
        order: Iterable[int] = range(len(indexes))  # usually in offset order already
        if any(a > b for a, b in itertools.pairwise(indexes)):
            order = sorted(order, key=indexes.__getitem__)
        for p in order:  # by CI index, one record at a time (no ChunkInfo per chunk)
            digest, uoff, coff, usize, csize, index, flag = PACKED_CHUNK.unpack_from(
                recs, p * size)
            h.update(_LISTED.pack(index, uoff, usize, coff, csize, bool(flag), digest))
        return h.digest()

    def _seal(self) -> Seal:
        st = os.fstat(self.fd)
        return (st.st_ino, st.st_ctime_ns, st.st_size)

    def recheck(self, chunks: list[ChunkInfo] | None = None) -> list[ChunkInfo]:
        """Re-digest every present chunk (of `chunks`, default all) from the cache file;
        drop bad ones (clear the bit, punch the range) so they are fetched again.
        Return the dropped chunks."""
        dropped = []
        for c in self.chunks if chunks is None else chunks:  # a ChunkList is immutable
            with self.lock:
                if c.index not in self.map:
                    continue
                try:
                    data = os.pread(self.fd, c.aligned_size, c.uncompressed_offset)
                except OSError as exc:
                    log.warning("blob %s: cannot read chunk %d back: %s", self.blob_id[:12],
                                c.index, exc)
                    data = b""
                n = c.uncompressed_size
                if len(data) == c.aligned_size and not any(data[n:]) and (
                        _digest_or_none(data[:n], c.digester) == c.digest):
                    continue
                self.map.clear(c.index)
                self._missing += 1
                punch_hole(self.fd, c.uncompressed_offset, c.aligned_size)
                dropped.append(c)
        if dropped:
            with self.lock:
                self.map.set_seal(self._seal())
        return dropped

    def _drop_present(self) -> list[ChunkInfo]:
        """Clear every present chunk's bit without reading the file (they are fetched,
        verified and written again on their next read); return them."""
        with self.lock:
            dropped = [c for c in self.chunks if c.index in self.map]
            for c in dropped:
                self.map.clear(c.index)
            self._missing += len(dropped)
        return dropped

    def present(self, chunk: ChunkInfo) -> bool:
        return chunk.index in self.map

    def complete(self) -> bool:
        """All listed chunks present (O(1): a counter kept with the map)."""
        return self._missing == 0

    def present_bytes(self) -> int:
        with self.lock:
            return sum(aligned for index, _, aligned in self.chunks.extents()
                       if index in self.map)

    def write_chunk(self, chunk: ChunkInfo, data: bytes, fd: int | None = None) -> None:
        """pwrite verified chunk bytes (zero-padded to 4 KiB) at the chunk's offset.

        `fd` overrides the file's own descriptor: the fanotify source passes the
        event's fd, which the kernel opened without notification.
        """
        fd = self.fd if fd is None else fd
        pad = chunk.aligned_size - len(data)
        buf = data + _ZEROS[:pad] if pad else data
        off = chunk.uncompressed_offset
        view = memoryview(buf)
        while view:
            n = os.pwrite(fd, view, off)
            view = view[n:]
            off += n

    def commit(self, chunks: list[ChunkInfo]) -> None:
        """Make written chunks durable, then record them as present."""
        if not chunks:
            return
        if self.durable:
            os.fdatasync(self.fd)
        with self.lock:
            fresh = [c.index for c in chunks if c.index not in self.map]
            self.map.set_many(fresh)
            self._missing -= len(set(fresh))
            # every byte written so far was verified first: the file is ours as it is
            self.map.set_seal(self._seal())

    def acquire(self) -> None:
        """Hold the file open for one fill; DaemonError once close() was called.

        close() under a running fill (a prefetch unit outliving its cancel timeout, an
        image unregistered mid-read) only takes effect when the last fill releases, so a
        fill never writes through a descriptor number that was closed and reused for
        another file.
        """
        with self.lock:
            if self._closing or self.fd < 0:
                raise DaemonError(f"blob {self.blob_id}: cache file closed")
            self._users += 1

    def release(self) -> None:
        with self.lock:
            self._users -= 1
            last = self._closing and self._users == 0
        if last:
            self._close_now()

    def close(self) -> None:
        with self.lock:
            self._closing = True
            if self._users:
                return  # the last release() closes
        self._close_now()

    def _close_now(self) -> None:
        with self.lock:
            if self.fd >= 0:  # renew the seal: every byte in the file was verified
                with contextlib.suppress(OSError):
                    self.map.set_seal(self._seal())
            fd, self.fd = self.fd, -1
        self.map.close()
        if fd >= 0:
            os.close(fd)
