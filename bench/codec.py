#!/usr/bin/env python3
"""Chunk codecs on the debootstrap image: zstd vs lz4 (and none), to pick the default.

    python3 bench/codec.py [--chunk-size 0x100000] [--rate-mbit 100] [--limit-mib 0]

Every regular file of the cached debootstrap minbase rootfs is cut into chunks as the
builder does (one file's chunks, last one short), each chunk is compressed with the
project's own codec (`rafs.codec.compress_chunk`: stored raw when not smaller) and
decompressed + verified with `rafs.codec.decode_chunk` (the daemon's path), with the
sha256 and blake3 digesters.  Reported per compressor:

- stored bytes (the blob's chunk data) and ratio;
- compression throughput (build cost), decompress+verify throughput (MB/s of output)
  and the median decode time per chunk and per full-size chunk;
- cold start, modelled: fetching every stored byte at RATE plus decoding it, for the
  whole image (an upper bound of a lazy start that reads everything) -- decode time
  is measured, the transfer is bytes / RATE (no protocol overhead).

No timed assertions; this prints figures for README's choice of the default.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from common import fmt_bytes, rootfs  # noqa: E402

from erofs_nydus.rafs.codec import compress_chunk, decode_chunk, digest  # noqa: E402
from erofs_nydus.rafs.image import ChunkInfo  # noqa: E402


def chunks_of(tree: Path, chunk_size: int, limit: int) -> list[bytes]:
    out: list[bytes] = []
    total = 0
    for dirpath, _dirs, files in sorted(os.walk(tree)):
        for name in sorted(files):
            p = os.path.join(dirpath, name)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            with open(p, "rb") as f:
                while piece := f.read(chunk_size):
                    out.append(piece)
                    total += len(piece)
            if limit and total >= limit:
                return out
    return out


def run(chunks: list[bytes], compressor: str, digester: str, rate: float) -> dict[str, float]:
    t0 = time.perf_counter()
    packed = [compress_chunk(c, compressor) for c in chunks]
    t_comp = time.perf_counter() - t0
    infos = []
    for i, (c, p) in enumerate(zip(chunks, packed, strict=True)):
        raw = c if p is None else p
        infos.append((raw, ChunkInfo(digest(c, digester), 0, i, 0, len(raw), 0, len(c),
                                     p is not None, compressor, digester)))
    per_chunk = []
    max_len = max(map(len, chunks))
    t0 = time.perf_counter()
    for raw, info in infos:
        t1 = time.perf_counter()
        decode_chunk(raw, info)
        per_chunk.append(time.perf_counter() - t1)
    t_dec = time.perf_counter() - t0
    plain = sum(len(c) for c in chunks)
    stored = sum(len(r) for r, _ in infos)
    full = [t for t, c in zip(per_chunk, chunks, strict=True) if len(c) == max_len] or [0.0]
    return {"plain": plain, "stored": stored, "comp_mbs": plain / t_comp / 1e6,
            "dec_mbs": plain / t_dec / 1e6, "chunk_ms": statistics.median(per_chunk) * 1e3,
            "full_ms": statistics.median(full) * 1e3,
            "dec_s": t_dec, "cold_s": stored / (rate / 8) + t_dec}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk-size", default="0x100000")
    ap.add_argument("--rate-mbit", type=float, default=100.0)
    ap.add_argument("--limit-mib", type=int, default=0, help="stop after this much data")
    args = ap.parse_args()
    chunk_size = int(args.chunk_size, 0)
    chunks = chunks_of(rootfs(), chunk_size, args.limit_mib << 20)
    print(f"debootstrap minbase: {len(chunks)} chunks of <= {chunk_size:#x}, "
          f"{fmt_bytes(sum(map(len, chunks)))}; transfer modelled at {args.rate_mbit:g} Mbit/s")
    print(f"{'codec':<16}{'stored':>12}{'ratio':>7}{'compress':>12}{'decode':>12}"
          f"{'chunk med':>11}{'full chunk':>12}{'cold (model)':>14}")
    for compressor in ("zstd", "lz4", "none"):
        for digester in ("blake3", "sha256"):
            r = run(chunks, compressor, digester, args.rate_mbit * 1e6)
            print(f"{compressor + '+' + digester:<16}{fmt_bytes(int(r['stored'])):>12}"
                  f"{r['stored'] / r['plain']:>7.3f}{r['comp_mbs']:>9.0f}MB/s"
                  f"{r['dec_mbs']:>9.0f}MB/s{r['chunk_ms']:>9.2f}ms{r['full_ms']:>10.2f}ms"
                  f"{r['cold_s']:>13.2f}s")


if __name__ == "__main__":
    main()
