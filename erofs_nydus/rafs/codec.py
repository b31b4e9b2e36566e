"""The chunk codec: compress, decompress and verify one chunk.

Shared by the builder (compress), the checker and the daemon core (decompress +
verify).  Pure functions over bytes; no I/O.

Compressors are nydus's: "lz4" is a raw LZ4 block without a size prefix (nydus's
`lz4_block`), "zstd" a zstd frame, "none" stored bytes.  Digesters: "sha256" and
"blake3" (32-byte output), the default of nydus-image and nydusify.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable

import blake3
import lz4.block
import zstandard

from erofs_nydus.errors import DigestMismatchError, FormatError, UsageError
from erofs_nydus.rafs.image import ChunkInfo

COMPRESSORS = ("zstd", "lz4", "none")
DIGESTERS = ("blake3", "sha256")
# What `create` and `convert` write unless told otherwise: nydus-image's and nydusify's
# defaults, chosen here by measurement (bench/compressor.py, README "Measured"): zstd
# blobs are 28% smaller and a lazy start fetches 23% fewer bytes, while decode + verify
# of a 1 MiB chunk costs the same as lz4 + sha256 (blake3 hashes ~2x faster than sha256).
DEFAULT_COMPRESSOR = "zstd"
DEFAULT_DIGESTER = "blake3"
ZSTD_LEVEL = 3  # zstd's default level; nydus-image uses the library default too


# One zstd compressor per thread, reused: making one per chunk (its context and tables)
# cost ~10% of convert's zstd time (bench/convert.py, README "Measured").  A
# ZstdCompressor is not thread-safe, hence per thread; `compress()` starts a new frame
# each call with parameters from the level and this input's size alone, so the bytes
# are those of a fresh compressor (tests/test_codec.py checks, also under threads).
_local = threading.local()


def _zstd_compress(data: bytes) -> bytes:
    cctx = getattr(_local, "zstd", None)
    if cctx is None:
        cctx = _local.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    out: bytes = cctx.compress(data)
    return out


def _lz4_compress(data: bytes) -> bytes:
    out: bytes = lz4.block.compress(data, mode="default", store_size=False)
    return out


_COMPRESS: dict[str, Callable[[bytes], bytes]] = {"zstd": _zstd_compress, "lz4": _lz4_compress}


def compress_chunk(data: bytes, compressor: str) -> bytes | None:
    """Compress one chunk; None when the result would not be smaller (store raw)."""
    if compressor == "none":
        return None
    fn = _COMPRESS.get(compressor)
    if fn is None:
        raise UsageError(f"compressor {compressor!r}: choose one of {', '.join(COMPRESSORS)}")
    out = fn(data)
    return out if len(out) < len(data) else None


def decompress(buf: bytes, compressor: str, size: int, what: str = "data") -> bytes:
    """Decompress `buf` that must expand to exactly `size` bytes, or FormatError."""
    try:
        if compressor == "none":
            data = buf
        elif compressor == "lz4":
            data = lz4.block.decompress(buf, uncompressed_size=size)
        elif compressor == "zstd":
            # max_output_size bounds memory for frames without a content size; a frame
            # that declares more than `size` fails here instead of allocating it.
            data = zstandard.ZstdDecompressor().decompress(buf, max_output_size=size)
        else:
            raise FormatError(f"{what}: unsupported compressor {compressor}")
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as exc:
        raise FormatError(f"{what}: {compressor} data corrupt: {exc}") from exc
    if len(data) != size:
        raise FormatError(f"{what}: {len(data)} bytes, expected {size}")
    return data


def decompress_chunk(buf: bytes, chunk: ChunkInfo) -> bytes:
    """The chunk's plain bytes, of exactly its uncompressed size, or FormatError."""
    return decompress(buf, chunk.compressor if chunk.compressed else "none",
                      chunk.uncompressed_size, f"chunk {chunk.digest.hex()[:16]}")


def digest(data: bytes, digester: str) -> bytes:
    """The 32-byte digest nydus stores for `data`."""
    if digester == "sha256":
        return hashlib.sha256(data).digest()
    if digester == "blake3":
        return blake3.blake3(data).digest()
    raise FormatError(f"unsupported digester {digester}")


def chunk_digest(data: bytes, digester: str = "sha256") -> bytes:
    return digest(data, digester)


digest_of = digest  # for modules whose own variables are called `digest`


def decode_chunk(raw: bytes, chunk: ChunkInfo) -> bytes:
    """Decompress and verify one chunk against its digest: plain bytes or an error.

    Raises DigestMismatchError for anything that is not the chunk's bytes (corrupt
    compressed data, wrong size, wrong digest), so callers treat them alike.
    """
    try:
        plain = decompress_chunk(raw, chunk)
    except FormatError as exc:
        raise DigestMismatchError(str(exc)) from exc
    got = digest(plain, chunk.digester)
    if got != chunk.digest:
        raise DigestMismatchError(
            f"chunk {chunk.index} {chunk.digester} {got.hex()[:16]}... != "
            f"{chunk.digest.hex()[:16]}..."
        )
    return plain
