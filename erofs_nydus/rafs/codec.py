"""The chunk codec: compress, decompress and verify one chunk.

Shared by the builder (compress), the checker and the daemon core (decompress +
verify).  Pure functions over bytes; no I/O.
"""

from __future__ import annotations

import hashlib

import lz4.block

from erofs_nydus.errors import DigestMismatchError, FormatError
from erofs_nydus.rafs.image import ChunkInfo


def compress_chunk(data: bytes, compressor: str) -> bytes | None:
    """Compress one chunk; None when the result would not be smaller (store raw)."""
    if compressor == "none":
        return None
    out: bytes = lz4.block.compress(data, mode="default", store_size=False)
    return out if len(out) < len(data) else None


def decompress_chunk(buf: bytes, chunk: ChunkInfo) -> bytes:
    """The chunk's plain bytes, of exactly its uncompressed size, or FormatError."""
    if not chunk.compressed:
        data = buf
    else:
        try:
            data = lz4.block.decompress(buf, uncompressed_size=chunk.uncompressed_size)
        except lz4.block.LZ4BlockError as exc:
            raise FormatError(f"chunk {chunk.digest.hex()[:16]}: lz4 data corrupt: {exc}") from exc
    if len(data) != chunk.uncompressed_size:
        raise FormatError(
            f"chunk {chunk.digest.hex()[:16]}: {len(data)} bytes, "
            f"expected {chunk.uncompressed_size}"
        )
    return data


def chunk_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def decode_chunk(raw: bytes, chunk: ChunkInfo) -> bytes:
    """Decompress and verify one chunk against its digest: plain bytes or an error.

    Raises DigestMismatchError for anything that is not the chunk's bytes (corrupt
    compressed data, wrong size, wrong digest), so callers treat them alike.
    """
    try:
        plain = decompress_chunk(raw, chunk)
    except FormatError as exc:
        raise DigestMismatchError(str(exc)) from exc
    got = chunk_digest(plain)
    if got != chunk.digest:
        raise DigestMismatchError(
            f"chunk {chunk.index} sha256 {got.hex()[:16]}... != {chunk.digest.hex()[:16]}..."
        )
    return plain
