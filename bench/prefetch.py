#!/usr/bin/env python3
"""Cold start of a traced workload, side by side in one run (fanotify mode, local blobs).

    python3 bench/prefetch.py [--runs N]

The workload is `chroot MNT sh -c '/bin/ls /; dpkg -l'` on the debootstrap minbase
image.  Once, up front: build the image, run the workload on a lazy mount, save the
daemon's access trace (`erofs-nydus trace`) and `optimize` by it.  Then per run, each
from a cold start (fresh cache dir, page cache dropped):

  unoptimized       mount the plain image, run the workload;
  optimized+pf      mount the optimized image (prefetch starts in the background at
                    once), run the workload right away;
  full unpack       `tar -xzf` the layer tar.gz into a directory, run the workload
                    there (chroot).

Reported: median wall time from the start (mount or unpack) to the workload's end,
backend requests and compressed bytes fetched by then (the daemon's own metrics via
its control API), and ratios against unoptimized.
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
from common import drop_caches, fmt_bytes, median, rootfs

from erofs_nydus.daemon.api import ApiClient

CLI = [sys.executable, "-m", "erofs_nydus.cli"]
WORKLOAD = "/bin/ls / >/dev/null; dpkg -l >/dev/null"


def run(argv: list[str]) -> str:
    proc = subprocess.run(argv, text=True, capture_output=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr[-2000:]}")
    return proc.stdout


def workload(root: Path) -> None:
    run(["chroot", str(root), "sh", "-c", WORKLOAD])


def metrics(cache: Path) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(ApiClient(cache).metrics()):
        for s in fam.samples:
            if not s.labels:
                out[s.name] = s.value
    return out


def lazy(boot: Path, blobs: Path, mnt: Path, cache: Path) -> tuple[float, float, float, float]:
    """(seconds, backend requests, bytes fetched, workload seconds) for mount + workload."""
    shutil.rmtree(cache, ignore_errors=True)
    drop_caches()
    t0 = time.perf_counter()
    run([*CLI, "mount", str(boot), str(mnt), "--blob-dir", str(blobs), "--cache-dir", str(cache)])
    t1 = time.perf_counter()
    workload(mnt)
    dt = time.perf_counter() - t0
    wl = time.perf_counter() - t1
    m = metrics(cache)
    run([*CLI, "umount", str(mnt), "--cache-dir", str(cache)])
    return (dt, m["erofs_nydus_backend_requests_total"],
            m["erofs_nydus_backend_fetched_bytes_total"], wl)  # fmt: skip


def unpack(tgz: Path, dest: Path) -> tuple[float, float, float, float]:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    drop_caches()
    t0 = time.perf_counter()
    run(["tar", "-xzf", str(tgz), "-C", str(dest)])
    t1 = time.perf_counter()
    workload(dest)
    t2 = time.perf_counter()
    return t2 - t0, 1, tgz.stat().st_size, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    src = rootfs()
    with tempfile.TemporaryDirectory(prefix="bench-prefetch-") as tmp:
        w = Path(tmp)
        boot, blobs = w / "plain.boot", w / "blobs"
        run([*CLI, "create", str(src), "-B", str(boot), "-D", str(blobs)])
        tgz = w / "layer.tar.gz"
        run(["tar", "-czf", str(tgz), "-C", str(src), "."])
        mnt = w / "mnt"
        mnt.mkdir()
        # trace the workload once, then optimize by the trace
        cache = w / "cache-trace"
        run([*CLI, "mount", str(boot), str(mnt), "--blob-dir", str(blobs),
             "--cache-dir", str(cache)])  # fmt: skip
        workload(mnt)
        run([*CLI, "trace", str(mnt), "-o", str(w / "trace.json")])
        run([*CLI, "umount", str(mnt), "--cache-dir", str(cache)])
        opt, optblobs = w / "opt.boot", w / "optblobs"
        print(run([*CLI, "optimize", str(boot), "-D", str(blobs), "--trace",
                   str(w / "trace.json"), "-B", str(opt), "--output-blob-dir",
                   str(optblobs)]).strip())  # fmt: skip
        res: dict[str, list[tuple[float, float, float, float]]] = {"unoptimized": [],
                                                             "optimized+pf": [],
                                                             "full unpack": []}  # fmt: skip
        for _ in range(args.runs):  # interleaved: drift hits all three alike
            res["unoptimized"].append(lazy(boot, blobs, mnt, w / "c1"))
            res["optimized+pf"].append(lazy(opt, optblobs, mnt, w / "c2"))
            res["full unpack"].append(unpack(tgz, w / "unpacked"))
        base = median([r[0] for r in res["unoptimized"]])
        base_b = median([r[2] for r in res["unoptimized"]])
        print(f"\ncold start of `{WORKLOAD}` (median of {args.runs}, local blob backend)")
        base_w = median([r[3] for r in res["unoptimized"]])
        print(f"{'':14} {'total':>8} {'vs unopt':>9} {'workload':>9} {'vs unopt':>9} "
              f"{'requests':>9} {'fetched':>11} {'vs unopt':>9}")  # fmt: skip
        for name, rs in res.items():
            t = median([r[0] for r in rs])
            n = median([r[1] for r in rs])
            b = median([r[2] for r in rs])
            wl = median([r[3] for r in rs])
            print(f"{name:14} {t:7.2f}s {t / base:8.2f}x {wl:8.2f}s {wl / base_w:8.2f}x "
                  f"{n:9.0f} {fmt_bytes(b):>11} {b / base_b:8.2f}x")  # fmt: skip
        print("total: from mount (daemon start included) or unpack start to the workload's "
              "end;\nworkload: after the mount returned (or tar finished)")
        print(f"\nimage: {fmt_bytes(sum(f.stat().st_size for f in blobs.iterdir()))} of blobs,"
              f" layer tar.gz {fmt_bytes(tgz.stat().st_size)}; {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
