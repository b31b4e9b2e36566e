"""One blob's cache file: the blob's uncompressed, 4 KiB-aligned address space.

`<cache-dir>/<blob_id>.blob.data` is a sparse file of `uncompressed_size` bytes;
chunk i lives at its `uncompressed_offset`, zero-padded to 4 KiB.  Which chunks are
present is recorded in `<blob_id>.chunk_map` (see `chunkmap.py`) and re-verified on
open: a set bit whose extent has a hole in the file (SEEK_DATA/SEEK_HOLE) is cleared,
so a chunk is never trusted without data behind it.

Writes must never generate pre-content events (the daemon would wait on itself).
The kernel decides at open time whether an open file reports them, so a descriptor
opened before the file was marked is safe, and so is the fd a fanotify event
carries; `write_chunk` takes the latter when a request source has one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Iterator, Sequence

from erofs_nydus.daemon.chunkmap import ChunkMap
from erofs_nydus.errors import DaemonError
from erofs_nydus.fsutil import open_private
from erofs_nydus.rafs.image import PACKED_CHUNK, BlobInfo, ChunkInfo, ChunkList

__all__ = ["BlobCacheFile", "cache_dir_lock", "cache_paths"]

_ZEROS = bytes(4096)


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
    ) -> None:
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
        self._check_chunks(self.chunks)
        nbits = max([blob.chunk_count, *(i + 1 for i, _, _ in self.chunks.extents())])
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
                os.ftruncate(fd, self.size)
                for p in (self.map_path,):
                    if os.path.exists(p):
                        os.unlink(p)
            self.map = ChunkMap.open(self.map_path, nbits)
            self._missing = sum(1 for i, _, _ in self.chunks.extents() if i not in self.map)
            self.verify()
        except BaseException:
            if own_fd:
                os.close(fd)
            raise

    def _check_chunks(self, chunks: ChunkList) -> None:
        end = 0
        for index, start, aligned in chunks.extents():
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
                    if c.index >= self.map.nbits:
                        raise DaemonError(
                            f"blob {self.blob_id}: chunk index {c.index} beyond the blob's "
                            f"{self.map.nbits} chunks"
                        )
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
            fd, self.fd = self.fd, -1
        self.map.close()
        if fd >= 0:
            os.close(fd)
