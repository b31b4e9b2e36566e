#!/usr/bin/env python3
"""Builder benchmark: erofs-nydus create vs `tar -c | gzip -6` vs `mkfs.erofs --blobdev`.

    python3 bench/build.py [--tree DIR] [--runs N]

Default tree: the debootstrap minbase rootfs.  Every tool reads the same tree from a
warm page cache (one untimed warm-up pass first); each is run N times and the median
wall time is reported, with ratios measured in this same run.  Also reports bootstrap
bytes per inode and peak RSS, and peak RSS for a tree with one 1 GiB file (memory
must not grow with file size).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_bytes, median, rootfs, run_timed

from erofs_nydus.rafs.reader import read_bootstrap_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tree", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tree = args.tree or rootfs()
    work = Path(tempfile.mkdtemp(prefix="bench-build-"))
    py = sys.executable
    try:
        tools = {
            "erofs-nydus create": lambda i: [py, "-m", "erofs_nydus.cli", "create", str(tree),
                                             "-B", str(work / f"n{i}.boot"), "-D",
                                             str(work / f"nblobs{i}")],
            "tar -c | gzip -6": lambda i: f"tar -C {tree} -cf - . | gzip -6 > {work}/l{i}.tgz",
            "mkfs.erofs --blobdev": lambda i: ["mkfs.erofs", "--chunksize=1048576",
                                               f"--blobdev={work}/m{i}.blob",
                                               str(work / f"m{i}.img"), str(tree)],
        }
        run_timed(["tar", "-C", str(tree), "-cf", "/dev/null", "."])  # warm the page cache
        results: dict[str, list[tuple[float, int]]] = {k: [] for k in tools}
        for i in range(args.runs):
            for name, argv in tools.items():
                cmd = argv(i)
                results[name].append(run_timed(cmd, shell=isinstance(cmd, str)))
                for p in work.iterdir():  # keep the disk tidy between runs, keep run 0
                    if p.name[1:].startswith(str(i)) and i > 0:
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
        med = {k: median([t for t, _ in v]) for k, v in results.items()}
        img = read_bootstrap_file(str(work / "n0.boot"))
        boot_size = os.path.getsize(work / "n0.boot")
        blob_bytes = sum(p.stat().st_size for p in (work / "nblobs0").iterdir())
        inodes = int.from_bytes((work / "n0.boot").read_bytes()[1040:1048], "little")
        print(f"tree: {tree} ({inodes} inodes)")
        print(f"{'tool':<24}{'median s':>10}{'peak RSS':>14}   runs")
        for k, v in results.items():
            print(f"{k:<24}{med[k]:>10.2f}{fmt_bytes(max(r for _, r in v) * 1024):>14}   "
                  + " ".join(f"{t:.2f}" for t, _ in v))
        ours = med["erofs-nydus create"]
        print(f"ratio tar+gzip / erofs-nydus: {med['tar -c | gzip -6'] / ours:.2f}x "
              "(target >= 2x)")
        print(f"ratio erofs-nydus / mkfs.erofs: {ours / med['mkfs.erofs --blobdev']:.2f}x "
              "(target <= 1.5x)")
        print(f"bootstrap: {boot_size} bytes = {boot_size / inodes:.1f} bytes/inode "
              "(target <= 200)")
        print(f"blob: {fmt_bytes(blob_bytes)} (lz4) vs layer tar.gz "
              f"{fmt_bytes(os.path.getsize(work / 'l0.tgz'))}, "
              f"{len(img.chunks[0]) if img.chunks else 0} unique chunks")
        # memory must not depend on file size: one 1 GiB file vs the tree above
        big = work / "bigtree"
        big.mkdir()
        with open(big / "big", "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(1024):
                f.write(block[:4096] * 64 + block[4096 * 64:])
        _, rss_big = run_timed([py, "-m", "erofs_nydus.cli", "create", str(big), "-B",
                                str(work / "big.boot"), "-D", str(work / "bigblobs")])
        rss_tree = max(r for _, r in results["erofs-nydus create"])
        print(f"peak RSS: 1 GiB single file {fmt_bytes(rss_big * 1024)} vs rootfs "
              f"{fmt_bytes(rss_tree * 1024)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
