"""Persisted chunk-presence bitmap: `<cache-dir>/<blob_id>.chunk_map`.

Layout: a 16-byte header `{b"ENCM", u32 version=1, u32 nbits, u32 reserved}`
followed by ceil(nbits/8) bytes, bit i (LSB first) = chunk with CI index i is
present in the cache file.  A bit is set only after the chunk's bytes were
written (and synced) to the cache file; on open the caller re-checks every set
bit against the file's allocated extents, so a bit is never trusted alone.

Not thread-safe: the owner serializes access with its own lock.
"""

from __future__ import annotations

import os
import struct

from erofs_nydus.fsutil import open_private

__all__ = ["ChunkMap"]

_MAGIC = b"ENCM"
_VERSION = 1
_HEADER = struct.Struct("<4sIII")


class ChunkMap:
    def __init__(self, fd: int, nbits: int, bits: bytearray) -> None:
        self._fd = fd
        self.nbits = nbits
        self._bits = bits

    @classmethod
    def open(cls, path: str, nbits: int) -> ChunkMap:
        """Open or create the map; a missing, foreign or mis-sized file starts empty."""
        fd = open_private(path, os.O_RDWR | os.O_CREAT)  # 0600, no symlink
        try:
            nbytes = (nbits + 7) // 8
            raw = os.pread(fd, _HEADER.size + nbytes, 0)
            bits: bytearray | None = None
            if len(raw) == _HEADER.size + nbytes:
                magic, version, stored, _ = _HEADER.unpack_from(raw)
                if magic == _MAGIC and version == _VERSION and stored == nbits:
                    bits = bytearray(raw[_HEADER.size :])
            if bits is None:
                bits = bytearray(nbytes)
                os.ftruncate(fd, 0)
                os.pwrite(fd, _HEADER.pack(_MAGIC, _VERSION, nbits, 0) + bytes(bits), 0)
            return cls(fd, nbits, bits)
        except BaseException:
            os.close(fd)
            raise

    def __contains__(self, i: int) -> bool:
        return 0 <= i < self.nbits and bool(self._bits[i >> 3] & (1 << (i & 7)))

    def _store(self, byte_index: int) -> None:
        os.pwrite(
            self._fd, bytes(self._bits[byte_index : byte_index + 1]), _HEADER.size + byte_index
        )

    def set(self, i: int) -> None:
        if not 0 <= i < self.nbits:
            raise IndexError(i)
        self._bits[i >> 3] |= 1 << (i & 7)
        self._store(i >> 3)

    def set_many(self, indexes: list[int]) -> None:
        touched = set()
        for i in indexes:
            if not 0 <= i < self.nbits:
                raise IndexError(i)
            self._bits[i >> 3] |= 1 << (i & 7)
            touched.add(i >> 3)
        if touched:
            lo, hi = min(touched), max(touched)
            os.pwrite(self._fd, bytes(self._bits[lo : hi + 1]), _HEADER.size + lo)

    def clear(self, i: int) -> None:
        if 0 <= i < self.nbits:
            self._bits[i >> 3] &= ~(1 << (i & 7)) & 0xFF
            self._store(i >> 3)

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self._bits)

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
