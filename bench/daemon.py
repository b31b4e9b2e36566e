#!/usr/bin/env python3
"""Daemon benchmarks on the debootstrap image, side by side in one run (fanotify mode).

    python3 bench/daemon.py [--runs N]

(a) cold start: time and bytes fetched until `chroot MNT sh -c 'ls /usr/bin; dpkg -l'`
    finishes on a fresh lazy mount, vs copying the layer tar.gz and unpacking it first
    (`cp` + `tar -xzf`), then the same command;
(b) warm sequential read of every file (page cache dropped before each pass) through
    the lazy mount once its cache is complete, vs the same image mounted from fully
    materialized blob files (target >= 0.9x);
(c) daemon service time per miss (median, p99) from the daemon's own metrics, and the
    daemon's RSS with a 100k-file image mounted (target < 100 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import daemon_memory, drop_caches, fmt_bytes, median, rootfs, run_rusage

from erofs_nydus.mount import mounted
from erofs_nydus.rafs.backend import LocalDirBackend
from erofs_nydus.rafs.check import materialize_blob
from erofs_nydus.rafs.reader import read_bootstrap_file

CLI = [sys.executable, "-m", "erofs_nydus.cli"]
# Output captured (run()), not sent to /dev/null: mounts are nosuid,nodev by default.
WORKLOAD = "ls /usr/bin; dpkg -l"


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kw)  # type: ignore[call-overload]


def status(mnt: Path) -> dict[str, object]:
    return dict(json.loads(run([*CLI, "mount-stats", str(mnt), "--json"]).stdout))


def read_all(root: Path) -> float:
    # not `tar -cf /dev/null`: GNU tar skips reading file data when writing to /dev/null
    return run_rusage(["sh", "-c", f"tar -C {root} -cf - . | cat > /dev/null"])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tree = rootfs()
    work = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    try:
        boot, blobs = work / "img.boot", work / "blobs"
        run([*CLI, "create", str(tree), "-B", str(boot), "-D", str(blobs)])
        img = read_bootstrap_file(str(boot))
        image_bytes = sum(b.uncompressed_size for b in img.blobs)
        blob_bytes = sum(os.path.getsize(blobs / b.blob_id) for b in img.blobs)
        layer = work / "layer.tar.gz"
        subprocess.run(f"tar -C {tree} -cf - . | gzip -6 > {layer}", shell=True, check=True)
        print(f"image: {tree.name}, {fmt_bytes(image_bytes)} of data, blob "
              f"{fmt_bytes(blob_bytes)}, layer tar.gz {fmt_bytes(layer.stat().st_size)}")

        lazy, unpack, fetched, lat_med, lat_p99 = [], [], [], [], []
        for i in range(args.runs):
            mnt, cache = work / f"mnt{i}", work / f"cache{i}"
            mnt.mkdir()
            drop_caches()
            t0 = time.perf_counter()
            run([*CLI, "mount", str(boot), str(mnt), "--blob-dir", str(blobs), "--cache-dir",
                 str(cache)])
            run(["chroot", str(mnt), "/bin/sh", "-c", WORKLOAD])
            lazy.append(time.perf_counter() - t0)
            st = status(mnt)
            m = st["metrics"]
            assert isinstance(m, dict)
            fetched.append(float(m["bytes_fetched"]))
            lat_med.append(float(m.get("miss_latency_median_ms", 0)))
            lat_p99.append(float(m.get("miss_latency_p99_ms", 0)))
            run([*CLI, "umount", str(mnt)])
            dest = work / f"unpack{i}"
            dest.mkdir()
            drop_caches()
            t0 = time.perf_counter()
            shutil.copy(layer, work / "copy.tar.gz")
            subprocess.run(["tar", "-C", str(dest), "-xzf", str(work / "copy.tar.gz")],
                           check=True)
            run(["chroot", str(dest), "/bin/sh", "-c", WORKLOAD])
            unpack.append(time.perf_counter() - t0)
            shutil.rmtree(dest)
        print(f"(a) cold start, lazy mount + workload: median {median(lazy):.2f} s, fetched "
              f"{fmt_bytes(median(fetched))} ({median(fetched) / blob_bytes:.1%} of the blob)")
        print(f"    copy + unpack + workload:          median {median(unpack):.2f} s "
              f"-> lazy is {median(unpack) / median(lazy):.1f}x faster")
        print(f"(c) service time per miss: median {median(lat_med):.2f} ms, "
              f"p99 {median(lat_p99):.2f} ms (amplify 1 MiB)")

        # (b) warm sequential read: complete lazy cache vs materialized blobs
        mnt, cache = work / "warm", work / "cache-warm"
        mnt.mkdir()
        run([*CLI, "mount", str(boot), str(mnt), "--blob-dir", str(blobs), "--cache-dir",
             str(cache)])
        read_all(mnt)  # fills the whole cache through the daemon
        devs = []
        for b in img.blobs:
            dev = work / f"{b.blob_id}.blob.data"
            materialize_blob(LocalDirBackend(str(blobs)), b, img.chunks[b.blob_index], str(dev))
            devs.append(dev)
        (work / "eager").mkdir()
        warm, eager = [], []
        with mounted(boot, work / "eager", devs) as eroot:
            for _ in range(args.runs):
                drop_caches()
                warm.append(read_all(mnt))
                drop_caches()
                eager.append(read_all(eroot))
        print(f"(b) warm sequential read: lazy (cache complete) median {median(warm):.2f} s, "
              f"materialized {median(eager):.2f} s -> throughput ratio "
              f"{median(eager) / median(warm):.2f}x (target >= 0.9x)")
        run([*CLI, "umount", str(mnt)])

        # (c) RSS with a 100k-file image
        big = work / "100k"
        for j in range(100_000):
            d = big / f"d{j // 1000}"
            if j % 1000 == 0:
                d.mkdir(parents=True)
            (d / f"f{j}").write_bytes(f"file {j}\n".encode())
        run([*CLI, "create", str(big), "-B", str(work / "100k.boot"), "-D", str(blobs)])
        shutil.rmtree(big)
        mnt = work / "mnt100k"
        mnt.mkdir()
        run([*CLI, "mount", str(work / "100k.boot"), str(mnt), "--blob-dir", str(blobs),
             "--cache-dir", str(work / "cache100k")])
        for j in range(0, 100_000, 997):
            (mnt / f"d{j // 1000}" / f"f{j}").read_bytes()
        total, per = daemon_memory(work / "cache100k")
        detail = ", ".join(f"pid {pid} RSS {fmt_bytes(r)} PSS {fmt_bytes(p)}"
                           for pid, (r, p) in per.items())
        print(f"(c) daemon memory with a 100k-file image mounted: {fmt_bytes(total)} PSS, "
              f"all processes (target < 100 MiB): {detail}")
        run([*CLI, "umount", str(mnt)])
    finally:
        for m in work.glob("*"):
            if m.is_dir() and os.path.ismount(m):
                subprocess.run([*CLI, "umount", str(m)], check=False, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
