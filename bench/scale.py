#!/usr/bin/env python3
"""Scale benchmark: generated trees of 50k / 100k / 200k files (~10 KiB a file, 2 GiB at
200k), fanotify mode, local blobs.

    python3 bench/scale.py [--files 50000,100000,200000] [--file-bytes 10240] [--layers 20]

Per tree size, each step timed once (figures are linear-in-files checks, reported as
microseconds per file next to the totals):
  create       wall time and peak RSS of `erofs-nydus create`
  bootstrap    bytes per inode
  merge        the same files built as N layer bootstraps (directories dealt round-robin),
               then `erofs-nydus merge` of all of them
  mount        `erofs-nydus mount` starting the daemon, then a second mount of the same
               image with the daemon up
  daemon       memory of every daemon process (found from the pid in the cache dir's
               `daemon.lock` and its process tree): after mount, after reading 10% of the
               files (every 10th); PSS sums to what they cost together
  check -D     `erofs-nydus check BOOT -D BLOBS` (every chunk digest)
Also: create's peak RSS for 200 files each of 1 KiB, 1 MiB and 4 MiB (it must stop
growing past a chunk: the pipeline's window bounds it).  Targets (issue 16): daemon
< 100 MiB for all processes (moonshot 50), every step linear in files.

Measured 2026-12-06 on the 2-core AMD EPYC KVM guest shared with other sessions (load
2-10 during the runs: times are single runs and noisy, memory and bytes are not);
50k/100k from one run, 200k from a second run after the trace fix (f9ee2b6):

   files   create  peak RSS B/inode  merge   mount  mount(up)  daemon PSS mounted/read10%  check -D
   50000   32.0 s   130 MiB    194   3.2 s  0.87 s   0.29 s      49.8 / 56.2 MiB         2.7 s
  100000   44.8 s   228 MiB    194   9.3 s  2.15 s   0.78 s      51.7 / 61.2 MiB        13.8 s
  200000   54.1 s   427 MiB    194   9.4 s  1.17 s   0.69 s      59.5 / 67.1 MiB         9.8 s

Daemon at 200k files, RSS: supervisor 35.1 MiB, keeper 17.7 MiB, worker 49.9 MiB (summed
100.1 / 102.6 MiB, which counts the pages the worker shares with the supervisor after
fork twice; PSS is the fair sum).  Before the packed chunk index, the heap trim and the
packed trace (same bench, same machine): worker 74.7 MiB RSS and 90.3 MiB PSS in all at
50k files, ~700 B per chunk, on course for ~230 MiB at 200k.  create peak RSS: 27.7 /
50.2 / 51.2 MiB for 200 files of 1 KiB / 1 MiB / 4 MiB (independent of file size past the
1 MiB window; it grows ~2 KiB per file with the file count: the builder holds the tree).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import daemon_memory, fmt_bytes, run_rusage, run_timed, supervisor_pid

CLI = [sys.executable, "-m", "erofs_nydus.cli"]
PER_DIR = 1000


def run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-2000:]}")


def generate(root: Path, files: int, file_bytes: int, seed: int = 7) -> list[Path]:
    """`files` files in directories of PER_DIR, sizes spread around `file_bytes`, each
    with a unique header so no two share a chunk.  Returns the relative file paths."""
    rng = random.Random(seed)
    pool = rng.randbytes(1 << 20)
    rels = []
    for j in range(files):
        d = root / f"d{j // PER_DIR:04d}"
        if j % PER_DIR == 0:
            d.mkdir(parents=True)
        size = max(16, int(rng.expovariate(1 / file_bytes)))
        off = rng.randrange(0, len(pool) - min(size, len(pool)) + 1)
        body = f"file {j}\n".encode() + pool[off : off + size]
        while len(body) < size:
            body += pool[: size - len(body)]
        rel = Path(d.name) / f"f{j}"
        (root / rel).write_bytes(body[:size])
        rels.append(rel)
    return rels


def split_layers(src: Path, dest: Path, layers: int) -> list[Path]:
    """Hard-link src's directories into `layers` trees, dealt round-robin."""
    out = [dest / f"layer{i:02d}" for i in range(layers)]
    for p in out:
        p.mkdir(parents=True)
    for k, d in enumerate(sorted(src.iterdir())):
        target = out[k % layers] / d.name
        target.mkdir()
        for f in d.iterdir():
            os.link(f, target / f.name)
    return out


def timed(argv: list[str]) -> float:
    return run_rusage(argv)[0]


def one_size(work: Path, files: int, file_bytes: int, layers: int) -> dict[str, float]:
    src = work / "src"
    t0 = time.perf_counter()
    rels = generate(src, files, file_bytes)
    gen = time.perf_counter() - t0
    data = sum((src / r).stat().st_size for r in rels)
    inodes = files + files // PER_DIR + 2
    print(f"\n== {files} files, {fmt_bytes(data)} (generated in {gen:.1f} s)", flush=True)
    boot, blobs = work / "img.boot", work / "blobs"
    r: dict[str, float] = {}
    r["create_s"], rss_kib = run_timed([*CLI, "create", str(src), "-B", str(boot), "-D",
                                        str(blobs)])
    r["create_rss"] = rss_kib * 1024
    r["boot_per_inode"] = boot.stat().st_size / inodes

    lay = split_layers(src, work / "layers", layers)
    lboots = []
    for i, ldir in enumerate(lay):
        lb = work / f"layer{i:02d}.boot"
        run([*CLI, "create", str(ldir), "-B", str(lb), "-D", str(work / "lblobs")])
        lboots.append(str(lb))
    shutil.rmtree(work / "layers")
    r["merge_s"] = timed([*CLI, "merge", *lboots, "-B", str(work / "merged.boot")])

    cache, mnt, mnt2 = work / "cache", work / "mnt", work / "mnt2"
    mnt.mkdir()
    mnt2.mkdir()
    try:
        r["mount_s"] = timed([*CLI, "mount", str(boot), str(mnt), "--blob-dir", str(blobs),
                              "--cache-dir", str(cache)])
        r["mount_up_s"] = timed([*CLI, "mount", str(boot), str(mnt2), "--blob-dir",
                                 str(blobs), "--cache-dir", str(cache)])
        r["daemon_mounted"], per = daemon_memory(cache)
        r["daemon_rss_mounted"] = sum(rss for rss, _ in per.values())
        t0 = time.perf_counter()
        for rel in rels[::10]:
            (mnt / rel).read_bytes()
        r["read10_s"] = time.perf_counter() - t0
        r["daemon_read10"], per = daemon_memory(cache)
        r["daemon_rss_read10"] = sum(rss for rss, _ in per.values())
        sup = supervisor_pid(cache)
        for pid, (rss, pss) in sorted(per.items(), key=lambda kv: kv[0] != sup):
            role = "supervisor" if pid == sup else "child"
            print(f"   daemon pid {pid} ({role}): RSS {fmt_bytes(rss)}, PSS {fmt_bytes(pss)}")
    finally:
        for m in (mnt2, mnt):
            if os.path.ismount(m):
                subprocess.run([*CLI, "umount", str(m)], capture_output=True, check=False)
    r["check_s"] = timed([*CLI, "check", str(boot), "-D", str(blobs)])
    us = 1e6 / files
    print(f"   create   {r['create_s']:7.2f} s ({r['create_s'] * us:6.1f} us/file), "
          f"peak RSS {fmt_bytes(r['create_rss'])}")
    print(f"   bootstrap {r['boot_per_inode']:.0f} B/inode")
    print(f"   merge of {layers} layers {r['merge_s']:6.2f} s ({r['merge_s'] * us:6.1f} us/file)")
    print(f"   mount    {r['mount_s']:7.2f} s starting the daemon, {r['mount_up_s']:.2f} s "
          f"with it up")
    print(f"   daemon   {fmt_bytes(r['daemon_mounted'])} PSS after mount, "
          f"{fmt_bytes(r['daemon_read10'])} after reading 10% of files "
          f"({r['read10_s']:.1f} s; target < 100 MiB); RSS summed (counts pages shared "
          f"after fork twice): {fmt_bytes(r['daemon_rss_mounted'])}, "
          f"{fmt_bytes(r['daemon_rss_read10'])}")
    print(f"   check -D {r['check_s']:7.2f} s ({r['check_s'] * us:6.1f} us/file)", flush=True)
    return r


SIZES = (("1 KiB", 1024), ("1 MiB", 1 << 20), ("4 MiB", 4 << 20))


def rss_vs_file_size(work: Path, files: int = 200) -> None:
    """create's peak RSS for `files` files of each size in SIZES (random bytes): the
    chunk pipeline's window bounds it, so it must stop growing past a chunk or two."""
    out = {}
    for label, size in SIZES:
        src = work / f"sz{size}"
        src.mkdir()
        rng = random.Random(size)
        for j in range(files):
            (src / f"f{j}").write_bytes(rng.randbytes(size))
        _, rss = run_timed([*CLI, "create", str(src), "-B", str(work / f"sz{size}.boot"),
                            "-D", str(work / f"szblobs{size}")])
        out[label] = rss * 1024
        shutil.rmtree(src)
        shutil.rmtree(work / f"szblobs{size}")
    print(f"\ncreate peak RSS, {files} files: "
          + ", ".join(f"of {label} {fmt_bytes(v)}" for label, v in out.items())
          + f" ({SIZES[-1][0]} / {SIZES[1][0]}: {out[SIZES[-1][0]] / out[SIZES[1][0]]:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", default="50000,100000,200000")
    ap.add_argument("--file-bytes", type=int, default=10 * 1024)
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--workdir", default=None,
                    help="parent of the scratch dir (default /tmp; 200k files need ~4 GiB: "
                    "use a disk, not tmpfs)")
    ap.add_argument("--no-size-check", action="store_true",
                    help="skip the create-RSS-vs-file-size runs")
    args = ap.parse_args()
    sizes = [int(s) for s in args.files.split(",")]
    results = {}
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"bench-scale-{n}-", dir=args.workdir))
        try:
            results[n] = one_size(work, n, args.file_bytes, args.layers)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if not args.no_size_check:
        work = Path(tempfile.mkdtemp(prefix="bench-scale-rss-", dir=args.workdir))
        try:
            rss_vs_file_size(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print("\n   files   create  peak RSS B/inode  merge   mount  mount(up)  daemon PSS "
          "mounted/read10%  check -D")
    for n, r in results.items():
        print(f"{n:8d} {r['create_s']:6.1f} s {r['create_rss'] / 2**20:5.0f} MiB "
              f"{r['boot_per_inode']:6.0f} {r['merge_s']:5.1f} s {r['mount_s']:5.2f} s "
              f"{r['mount_up_s']:6.2f} s {r['daemon_mounted'] / 2**20:11.1f} / "
              f"{r['daemon_read10'] / 2**20:4.1f} MiB {r['check_s']:9.1f} s")
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        print(f"\nlinearity, per-file cost at {hi} / at {lo} files (1.0 = linear):")
        for key in ("create_s", "merge_s", "check_s", "mount_s"):
            a, b = results[lo][key] / lo, results[hi][key] / hi
            print(f"   {key[:-2]:8s} {b / a:.2f}")


if __name__ == "__main__":
    main()
