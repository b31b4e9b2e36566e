#!/usr/bin/env python3
"""Cold start of a traced workload, side by side in one run (fanotify mode).

    python3 bench/prefetch.py [--runs N] [--rate 100mbit] [--rtt-ms 0]
                              [--no-local] [--no-registry] [--no-netns]

The workload is `chroot MNT sh -c '/bin/ls /; dpkg -l'` on the debootstrap minbase
image.  Three cold starts per run (fresh cache dir, page cache dropped), interleaved,
medians of N runs:

  unoptimized       mount the plain image, run the workload;
  optimized+pf      mount the image optimized by the workload's trace (prefetch starts
                    in the background at once), run the workload right away;
  full unpack       unpack the whole image first, then run the workload there (chroot).

With a registry, the two lazy cases also run with the daemon already up ("(up)": a
daemon kept running for the cache dir, as a node's snapshotter daemon is), so the
mount does not include starting it.

Local blob backend: the image is built with `create`, traced, rebuilt with `optimize`;
full unpack = `tar -xzf` of the layer tar.gz.

Registry (unless --no-registry): the rootfs as a one-layer OCI image in a real
docker-registry, `convert`ed; the workload is traced on a mount of that REF and the
optimized image published with `convert --prefetch-trace`; both mounted by REF; full
unpack = `skopeo copy` + `umoci unpack`.  Measured on the loopback registry and
(unless --no-netns) over a veth pair shaped to --rate between two network namespaces
(bench/netns.py).

Reported: wall time from the start (mount or unpack) to the workload's end, the
workload alone, backend requests (the daemon's metrics via its control API), bytes
fetched by the workload's end (veth counters when shaped, else the daemon's backend
bytes plus the bootstrap layer), and the ratios optimized / unoptimized.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import drop_caches, fmt_bytes, median, rootfs
from netns import Keeper, Net, manifest_sizes, pull_run, push_rootfs, registry_nets

from erofs_nydus.service.api_client import ApiClient

CLI = [sys.executable, "-m", "erofs_nydus.cli"]
# Output captured (run()), not sent to /dev/null: mounts are nosuid,nodev by default.
WORKLOAD = "/bin/ls /; dpkg -l"
REQ, BYTES = "erofs_nydus_backend_requests_total", "erofs_nydus_backend_fetched_bytes_total"


class Sample(NamedTuple):
    total: float  # s, mount (or unpack) start to workload end
    requests: float  # backend requests by then (nan: not a lazy mount)
    fetched: float  # bytes by then
    workload: float  # s, the workload alone


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


def lazy(mount: list[str], mnt: Path, cache: Path, net: Net | None = None,
         boot_layer: int = 0, keeper: Keeper | None = None) -> Sample:
    """`mount` (a mount command without MNT and --cache-dir) + workload, cold.  With a
    `keeper`, in its running daemon's cache dir (evicted afterwards)."""
    if keeper is not None:
        cache = keeper.cache
        m0 = metrics(cache)
    else:
        shutil.rmtree(cache, ignore_errors=True)
        m0 = {REQ: 0.0, BYTES: 0.0}
    drop_caches()
    rx0 = net.rx_bytes() if net else None
    t0 = time.perf_counter()
    run([*(net.prefix if net else []), *CLI, "mount", *mount[:1], str(mnt), *mount[1:],
         "--cache-dir", str(cache)])  # fmt: skip
    t1 = time.perf_counter()
    workload(mnt)
    t2 = time.perf_counter()
    rx1 = net.rx_bytes() if net else None
    m = metrics(cache)
    run([*CLI, "umount", str(mnt), "--cache-dir", str(cache)])
    if keeper is not None:
        keeper.evict()
    fetched = (rx1 - rx0 if rx0 is not None and rx1 is not None
               else boot_layer + m[BYTES] - m0[BYTES])  # fmt: skip
    return Sample(t2 - t0, m[REQ] - m0[REQ], fetched, t2 - t1)


def unpack(tgz: Path, dest: Path) -> Sample:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    drop_caches()
    t0 = time.perf_counter()
    run(["tar", "-xzf", str(tgz), "-C", str(dest)])
    t1 = time.perf_counter()
    workload(dest)
    t2 = time.perf_counter()
    return Sample(t2 - t0, float("nan"), tgz.stat().st_size, t2 - t1)


def report(title: str, res: dict[str, list[Sample]], runs: int) -> None:
    base = {k: median([getattr(s, k) for s in res["unoptimized"]]) for k in Sample._fields}
    print(f"\ncold start of `{WORKLOAD}`, median of {runs}: {title}")
    print(f"{'':18} {'total':>8} {'vs unopt':>9} {'workload':>9} {'vs unopt':>9} "
          f"{'requests':>9} {'fetched':>11} {'vs unopt':>9}")  # fmt: skip
    for name, rs in res.items():
        t, n, b, wl = (median([getattr(s, k) for s in rs]) for k in Sample._fields)
        reqs = "-" if math.isnan(n) else f"{n:.0f}"
        print(f"{name:18} {t:7.2f}s {t / base['total']:8.2f}x {wl:8.2f}s "
              f"{wl / base['workload']:8.2f}x {reqs:>9} {fmt_bytes(b):>11} "
              f"{b / base['fetched']:8.2f}x   runs " + " ".join(f"{s.total:.2f}" for s in rs))
    for suffix in ("", " (up)"):
        if f"unoptimized{suffix}" in res:
            u, o = (median([s.total for s in res[f"{k}{suffix}"]])
                    for k in ("unoptimized", "optimized+pf"))  # fmt: skip
            print(f"optimized+pf / unoptimized{suffix}: {o / u:.2f}x total time "
                  f"({100 * (1 - o / u):.0f}% less)")


def local_bench(src: Path, w: Path, runs: int) -> None:
    w.mkdir()
    boot, blobs = w / "plain.boot", w / "blobs"
    run([*CLI, "create", str(src), "-B", str(boot), "-D", str(blobs)])
    tgz = w / "layer.tar.gz"
    run(["tar", "-czf", str(tgz), "-C", str(src), "."])
    mnt = w / "mnt"
    mnt.mkdir(exist_ok=True)
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
    res: dict[str, list[Sample]] = {"unoptimized": [], "optimized+pf": [], "full unpack": []}
    for _ in range(runs):  # interleaved: drift hits all three alike
        res["unoptimized"].append(lazy([str(boot), "--blob-dir", str(blobs)], mnt, w / "c1"))
        res["optimized+pf"].append(lazy([str(opt), "--blob-dir", str(optblobs)], mnt,
                                        w / "c2"))  # fmt: skip
        res["full unpack"].append(unpack(tgz, w / "unpacked"))
    report("local blob backend", res, runs)
    print(f"image: {fmt_bytes(sum(f.stat().st_size for f in blobs.iterdir()))} of blobs,"
          f" layer tar.gz {fmt_bytes(tgz.stat().st_size)}")


def registry_bench(src: Path, w: Path, args: argparse.Namespace) -> None:
    w.mkdir()
    with registry_nets(w, rate=args.rate, rtt_ms=args.rtt_ms,
                       netns=not args.no_netns) as (server, nets):  # fmt: skip
        oci, _ = push_rootfs(server, src, w / "img", "bench/rootfs:v1")
        plain, opt = "bench/rootfs-nydus:plain", "bench/rootfs-nydus:opt"
        conv = ["--plain-http", "-q", "--cache-dir", str(w / "conv")]
        run([*CLI, "convert", "--source", oci, "--target", server.ref(plain), *conv])
        # trace the workload on a mount of the converted image, publish the optimized one
        mnt, cache = w / "rmnt", w / "rcache-trace"
        mnt.mkdir()
        run([*CLI, "mount", server.ref(plain), str(mnt), "--cache-dir", str(cache),
             "--plain-http"])  # fmt: skip
        workload(mnt)
        run([*CLI, "trace", str(mnt), "-o", str(w / "rtrace.json")])
        run([*CLI, "umount", str(mnt), "--cache-dir", str(cache)])
        print(run([*CLI, "convert", "--source", oci, "--target", server.ref(opt), *conv,
                   "--prefetch-trace", str(w / "rtrace.json")]).strip())  # fmt: skip
        sizes = {r: manifest_sizes(server, r) for r in ("bench/rootfs:v1", plain, opt)}
        print(f"OCI image {fmt_bytes(sizes['bench/rootfs:v1'][0])}; Nydus image "
              f"{fmt_bytes(sizes[plain][0])} (bootstrap layer {fmt_bytes(sizes[plain][1])}), "
              f"optimized {fmt_bytes(sizes[opt][0])} (bootstrap layer "
              f"{fmt_bytes(sizes[opt][1])})")
        for n, net in enumerate(nets):
            res: dict[str, list[Sample]] = {
                k: [] for k in ("unoptimized", "optimized+pf", "unoptimized (up)",
                                "optimized+pf (up)", "pull+unpack")}  # fmt: skip
            keeper = Keeper(net, w / f"keeper{n}")
            try:
                for i in range(args.runs):  # interleaved: drift hits all alike
                    for suffix, k in (("", None), (" (up)", keeper)):
                        for name, ref in (("unoptimized", plain), ("optimized+pf", opt)):
                            res[name + suffix].append(lazy(
                                [f"{net.host}/{ref}", "--plain-http"], mnt, w / "rcache", net,
                                sizes[ref][1], k))  # fmt: skip
                    t, b, wl = pull_run(net, f"{net.host}/bench/rootfs:v1", w / f"pull{i}",
                                        sizes["bench/rootfs:v1"][0], WORKLOAD)  # fmt: skip
                    res["pull+unpack"].append(Sample(t, float("nan"), b, wl))
            finally:
                keeper.close()
            report(f"registry, {net.name}", res, args.runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", default="100mbit", help="tc rate on the shaped veth pair")
    ap.add_argument("--rtt-ms", type=float, default=0.0,
                    help="also add this round-trip delay (netem) on the veth pair")
    ap.add_argument("--no-local", action="store_true", help="skip the local blob backend")
    ap.add_argument("--no-registry", action="store_true", help="skip the registry")
    ap.add_argument("--no-netns", action="store_true",
                    help="registry on loopback only (no shaped network)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/prefetch.py: run as root (mounts, fanotify, network namespaces)")
    src = rootfs()
    with tempfile.TemporaryDirectory(prefix="bench-prefetch-") as tmp:
        w = Path(tmp)
        if not args.no_local:
            local_bench(src, w / "local", args.runs)
        if not args.no_registry:
            registry_bench(src, w / "registry", args)
    print(f"\n{os.cpu_count()} CPUs; total: from mount (daemon start included) or unpack "
          "start to the workload's end; workload: after the mount returned (or the unpack "
          "finished)")


if __name__ == "__main__":
    main()
