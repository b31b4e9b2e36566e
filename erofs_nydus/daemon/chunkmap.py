"""Persisted chunk-presence bitmap: `<cache-dir>/<blob_id>.chunk_map`.

Layout: a 72-byte header `{b"ENCM", u32 version=2, u32 nbits, u32 reserved,
u64 seal_ino, i64 seal_ctime_ns, u64 seal_size, u8[32] listed}` followed by
ceil(nbits/8) bytes, bit i (LSB first) = chunk with CI index i is present in the
cache file.  A bit is set only after the chunk's bytes were verified, written and
synced to the cache file; on open the caller re-checks every set bit against the
file's allocated extents, so a bit is never trusted alone.

The *seal* is the cache file's (inode, ctime, size) as the daemon last saw it when
every byte in it was one the daemon had verified.  Any write to the file since
(by anyone) changes its ctime, which nobody but root can set back: a matching seal
proves the present chunks are still the verified bytes, a stale one makes the next
daemon re-digest them (`BlobCacheFile.recheck`).  The seal is renewed on every
commit and on close, so it cannot tell a foreign write made *while* a daemon serves
the file from the daemon's own: the cache dir admits no one else (issue 11 (d)),
and `erofs-nydus cache verify` re-digests every present chunk regardless.

`listed` fingerprints the chunk list (indexes, offsets, sizes, digests) the present
chunks were verified against: a bootstrap that describes the blob differently has
them re-digested too.  A map of another version is foreign and starts empty.

Not thread-safe: the owner serializes access with its own lock.
"""

from __future__ import annotations

import os
import struct

from erofs_nydus.fsutil import open_private

__all__ = ["ChunkMap"]

_MAGIC = b"ENCM"
_VERSION = 2
_HEADER = struct.Struct("<4sIIIQqQ32s")
_SEAL = struct.Struct("<QqQ")
_SEAL_OFFSET = 16
_LISTED_OFFSET = 40
MAX_BITS = 1 << 24  # layout.rafs.MAX_CHUNKS_PER_BLOB

Seal = tuple[int, int, int]  # (st_ino, st_ctime_ns, st_size) of the cache file


class ChunkMap:
    def __init__(self, fd: int, nbits: int, bits: bytearray, seal: Seal | None = None,
                 listed: bytes = bytes(32)) -> None:
        self._fd = fd
        self.nbits = nbits
        self._bits = bits
        self.seal = seal
        self.listed = listed

    @classmethod
    def open(cls, path: str, nbits: int) -> ChunkMap:
        """Open or create the map; a missing, foreign or mis-sized file starts empty."""
        if not 0 <= nbits <= MAX_BITS:
            raise ValueError(f"chunk map of {nbits} bits exceeds {MAX_BITS}")
        fd = open_private(path, os.O_RDWR | os.O_CREAT)  # 0600, no symlink
        try:
            nbytes = (nbits + 7) // 8
            raw = os.pread(fd, _HEADER.size + nbytes, 0)
            bits: bytearray | None = None
            seal: Seal | None = None
            listed = bytes(32)
            if len(raw) == _HEADER.size + nbytes:
                magic, version, stored, _, ino, ctime, size, listed = _HEADER.unpack_from(raw)
                if magic == _MAGIC and version == _VERSION and stored == nbits:
                    bits = bytearray(raw[_HEADER.size :])
                    seal = (ino, ctime, size) if ino else None
            if bits is None:
                bits = bytearray(nbytes)
                listed = bytes(32)
                os.ftruncate(fd, 0)
                os.pwrite(fd, _HEADER.pack(_MAGIC, _VERSION, nbits, 0, 0, 0, 0, listed)
                          + bytes(bits), 0)
            return cls(fd, nbits, bits, seal, listed)
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

    def set_seal(self, seal: Seal | None) -> None:
        """Record (or with None, withdraw) the proof that the file holds verified bytes."""
        if seal == self.seal:
            return
        self.seal = seal
        os.pwrite(self._fd, _SEAL.pack(*(seal or (0, 0, 0))), _SEAL_OFFSET)

    def set_listed(self, fingerprint: bytes) -> None:
        """Record the chunk list the present chunks were verified against."""
        if fingerprint == self.listed:
            return
        self.listed = fingerprint
        os.pwrite(self._fd, fingerprint, _LISTED_OFFSET)

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self._bits)

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
