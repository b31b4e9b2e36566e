#!/usr/bin/env python3
"""Cold start from a registry: lazy `erofs-nydus mount REF` vs pull-and-unpack.

    python3 bench/coldstart.py [--runs N] [--rate 100mbit] [--rtt-ms 0] [--no-netns]

The debootstrap minbase rootfs is packed with umoci as a one-layer OCI image, pushed
with skopeo to a real docker-registry on 127.0.0.1, and converted with
`erofs-nydus convert`.  Then, median of N runs each:

(a) conversion: `erofs-nydus convert` (layer cache emptied) vs `skopeo copy` to an
    OCI layout (as bench/convert.py);
(b) cold start until `chroot ROOT /bin/sh -c 'dpkg -l; ls /usr/bin'` has finished
    (output captured: mounts are nodev, so no /dev/null in the image), page cache
    dropped first:
      lazy  = `erofs-nydus mount REF MNT` (bootstrap layer only) + the command
              (chunks fetched on demand with Range requests);
      pull  = `skopeo copy docker://REF oci:DIR` + `umoci unpack` + the command;
    bytes fetched = what crossed the wire (veth counters under a bandwidth limit;
    bootstrap layer + daemon's backend bytes, or the image's blobs, on loopback).

Two networks: the loopback registry, and (unless --no-netns) a second registry
process on the same storage inside a network namespace created here, reached from
another namespace created here over a veth pair shaped with `tc ... tbf rate RATE`
on both ends (netem with delay when --rtt-ms > 0), set up by bench/netns.py.  Both
paths' clients (skopeo, the mount command and the daemon it starts) run in the client
namespace via nsenter.
Needs root, Linux >= 6.14 (fanotify pre-content), docker-registry, skopeo, umoci.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import drop_caches, fmt_bytes, median, rootfs  # noqa: E402
from netns import (  # noqa: E402
    CLI,
    Keeper,
    Net,
    convert_bench,
    daemon_bytes,
    manifest_sizes,
    pull_run,
    push_rootfs,
    registry_nets,
    sh,
)
from registry_fixture import RegistryServer  # noqa: E402

# Output captured by `sh`, not sent to /dev/null: mounts are nosuid,nodev by default, so
# the image's /dev/null cannot be opened inside the chroot.
WORKLOAD = "dpkg -l; ls /usr/bin"


def lazy_run(net: Net, ref: str, work: Path, boot_layer: int,
             keeper: Keeper | None = None) -> tuple[float, int, float]:
    """(seconds, bytes fetched, seconds of the mount command alone)."""
    mnt = work / "mnt"
    cache = keeper.cache if keeper is not None else work / "cache"
    mnt.mkdir(parents=True)
    drop_caches()
    rx0 = net.rx_bytes()
    t0 = time.perf_counter()
    sh([*net.prefix, *CLI, "mount", ref, str(mnt), "--cache-dir", str(cache), "--plain-http"])
    try:
        t_mount = time.perf_counter() - t0
        sh(["chroot", str(mnt), "/bin/sh", "-c", WORKLOAD])
        dt = time.perf_counter() - t0
        rx1 = net.rx_bytes()
        if rx0 is not None and rx1 is not None:
            fetched = rx1 - rx0
        else:
            before = keeper.fetched if keeper is not None else 0
            fetched = boot_layer + daemon_bytes(cache) - before
    finally:
        # also when the workload failed: removing the work dir under a live mount
        # would orphan its daemon (socket and lock gone, mount still counted)
        sh([*CLI, "umount", str(mnt)])
    if keeper is not None:
        keeper.fetched = daemon_bytes(cache)
        keeper.evict()
    shutil.rmtree(work)
    return dt, fetched, t_mount


def bench(server: RegistryServer, nets: list[Net], work: Path, args: argparse.Namespace) -> None:
    tree = rootfs()
    src, layer = push_rootfs(server, tree, work / "img", "bench/rootfs:v1")
    print(f"image: {tree.name}, one layer of {fmt_bytes(layer.stat().st_size)} tar.gz "
          f"in a docker-registry")
    nydus = convert_bench(server, src, work, args.convert_runs or args.runs,
                          ("--compressor", args.compressor, "--digester", args.digester))
    print(f"chunks: {args.compressor} + {args.digester}")
    oci_bytes, _ = manifest_sizes(server, "bench/rootfs:v1")
    nydus_bytes, boot_layer = manifest_sizes(server, nydus)
    print(f"OCI image {fmt_bytes(oci_bytes)}; Nydus image {fmt_bytes(nydus_bytes)} "
          f"(bootstrap layer {fmt_bytes(boot_layer)})")
    print(f"(b) cold start until `chroot ROOT /bin/sh -c '{WORKLOAD}'` finishes, "
          f"median of {args.runs}:")
    for n, net in enumerate(nets):
        lazy: list[float] = []
        lazy_b: list[float] = []
        mount_t: list[float] = []
        pull: list[float] = []
        pull_b: list[float] = []
        warm: list[float] = []
        warm_m: list[float] = []
        keeper = Keeper(net, work / f"keeper{n}")
        try:
            for i in range(args.runs):
                t, b, m = lazy_run(net, f"{net.host}/{nydus}", work / f"lazy{i}", boot_layer)
                lazy.append(t)
                lazy_b.append(b)
                mount_t.append(m)
                t, b, m = lazy_run(net, f"{net.host}/{nydus}", work / f"warm{i}", boot_layer,
                                   keeper)
                warm.append(t)
                warm_m.append(m)
                t, b, _ = pull_run(net, f"{net.host}/bench/rootfs:v1", work / f"pull{i}",
                                   oci_bytes, WORKLOAD)
                pull.append(t)
                pull_b.append(b)
        finally:
            keeper.close()
        lt, pt = median(lazy), median(pull)
        lb, pb = median(lazy_b), median(pull_b)
        print(f"  [{net.name}]")
        print(f"    lazy mount + run : {lt:6.2f} s (mount {median(mount_t):.2f} s)  "
              f"fetched {fmt_bytes(lb)} = {100 * lb / nydus_bytes:.1f}% of the Nydus "
              f"image, {100 * lb / oci_bytes:.1f}% of the OCI image   runs "
              + " ".join(f"{t:.2f}" for t in lazy))
        print(f"    lazy, daemon up  : {median(warm):6.2f} s (mount {median(warm_m):.2f} s)"
              "  (daemon already running for the cache dir, data cold)   runs "
              + " ".join(f"{t:.2f}" for t in warm))
        print(f"    pull+unpack+run  : {pt:6.2f} s  fetched {fmt_bytes(pb)}   runs "
              + " ".join(f"{t:.2f}" for t in pull))
        print(f"    speed-up {pt / lt:.1f}x ({pt / median(warm):.1f}x with the daemon up), "
              f"bytes {100 * lb / pb:.1f}% of the pull")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--convert-runs", type=int, default=None,
                    help="runs for (a) (default: --runs)")
    ap.add_argument("--rate", default="100mbit", help="tc rate on the veth pair")
    ap.add_argument("--compressor", default="zstd", choices=["zstd", "lz4", "none"])
    ap.add_argument("--digester", default="blake3", choices=["blake3", "sha256"])
    ap.add_argument("--rtt-ms", type=float, default=0.0,
                    help="also add this round-trip delay (netem) on the veth pair")
    ap.add_argument("--no-netns", action="store_true", help="loopback registry only")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/coldstart.py: run as root (mounts, fanotify, network namespaces)")
    work = Path(tempfile.mkdtemp(prefix="bench-coldstart-"))
    try:
        with registry_nets(work, rate=args.rate, rtt_ms=args.rtt_ms,
                           netns=not args.no_netns) as (server, nets):
            bench(server, nets, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
