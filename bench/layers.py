#!/usr/bin/env python3
"""Layer benchmarks: chunk-dictionary dedup on real trees, and merge time vs size.

    python3 bench/layers.py [--runs N]

1. Dedup: build the debootstrap minbase tree (v1), then the tree with extra packages
   (v2) once alone and once with `--chunk-dict v1`; report bytes stored, next to the
   chunk-dict savings Nydus publishes for 10 versions (Redis 23.8 %, Ubuntu 54.5 %,
   Alpine 10.3 %).  Measured with 1 MiB and 64 KiB chunks.
2. Merge scaling: N layers (N = 5, 10, 20) of synthetic files totalling N*5000 files;
   reports the median merge time and time per file, which must stay flat (linear growth).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, ROOT, fmt_bytes, median, rootfs

from erofs_nydus.builder import BuildOptions, create_image
from erofs_nydus.builder.merge import merge_bootstraps


def extra_rootfs() -> Path:
    dest = CACHE / "rootfs" / "bookworm-minbase+less+procps+psmisc"
    if not dest.is_dir():
        subprocess.run([str(ROOT / "tools" / "debootstrap-rootfs"), "bookworm", "minbase",
                        "less,procps,psmisc"], check=True)
    return dest


def dedup(work: Path) -> None:
    v1, v2 = rootfs(), extra_rootfs()
    print(f"dedup: v1={v1.name} v2={v2.name}")
    for chunk in (0x100000, 0x10000):
        out = work / f"c{chunk}"
        r1 = create_image(str(v1), str(out / "v1.boot"), str(out / "b1"),
                          BuildOptions(chunk_size=chunk))
        alone = create_image(str(v2), str(out / "v2.boot"), str(out / "b2"),
                             BuildOptions(chunk_size=chunk))
        with_dict = create_image(str(v2), str(out / "v2d.boot"), str(out / "b3"),
                                 BuildOptions(chunk_size=chunk,
                                              chunk_dicts=[str(out / "v1.boot")]))
        s1 = r1.stats.bytes_stored_compressed
        sa = alone.stats.bytes_stored_compressed
        sd = with_dict.stats.bytes_stored_compressed
        print(f"  chunk {chunk // 1024} KiB: v1 stores {fmt_bytes(s1)}; v2 alone "
              f"{fmt_bytes(sa)}; v2 with --chunk-dict v1 {fmt_bytes(sd)} new "
              f"({with_dict.stats.chunks_from_dict} chunks reused)")
        print(f"    two versions: {fmt_bytes(s1 + sa)} without dict vs {fmt_bytes(s1 + sd)} "
              f"with: {1 - (s1 + sd) / (s1 + sa):.1%} saved "
              "(Nydus, 10 versions: Redis 23.8%, Ubuntu 54.5%, Alpine 10.3%)")


def merge_scaling(work: Path, runs: int) -> None:
    print("merge scaling (5000 files per layer, each layer deletes 100 lower files):")
    for n in (5, 10, 20):
        boots = []
        for i in range(n):
            src = work / f"m{n}" / f"src{i}"
            for j in range(5000):
                d = src / f"l{i}" / f"d{j % 50}"
                d.mkdir(parents=True, exist_ok=True)
                (d / f"f{j}").write_bytes(f"{i}/{j}".encode())
            if i:
                for j in range(100):
                    wd = src / f"l{i - 1}" / f"d{j % 50}"
                    wd.mkdir(parents=True, exist_ok=True)
                    (wd / f".wh.f{j}").write_bytes(b"")
            boot = work / f"m{n}" / f"{i}.boot"
            create_image(str(src), str(boot), str(work / f"m{n}" / "blobs"))
            boots.append(str(boot))
            shutil.rmtree(src)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            merge_bootstraps(boots, str(work / f"m{n}" / "merged.boot"))
            times.append(time.perf_counter() - t0)
        files = n * 5000
        print(f"  {n:>2} layers, {files:>6} files: median {median(times):.2f} s = "
              f"{median(times) / files * 1e6:.1f} us/file")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-layers-"))
    try:
        dedup(work)
        merge_scaling(work, args.runs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _ = os


if __name__ == "__main__":
    main()
