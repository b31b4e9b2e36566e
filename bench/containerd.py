#!/usr/bin/env python3
"""containerd cold start: nydus-snapshotter + our nydusd (lazy) vs containerd's overlayfs.

    python3 bench/containerd.py [--runs N] [--rate 100mbit] [--no-netns]

The debootstrap minbase rootfs as a one-layer OCI image in a real docker-registry, and its
`erofs-nydus convert`.  Each run starts a fresh private containerd + nydus-snapshotter stack
(tests/containerd_support.py: own roots, sockets, empty caches; page cache dropped), then
times from the CRI PullImage request until the container's first output has arrived:

  lazy  = CRI PullImage of the Nydus image (snapshotter nydus) +
          `ctr run --snapshotter nydus REF c cat /etc/debian_version`
  pull  = CRI PullImage of the OCI original (containerd's overlayfs snapshotter: fetch and
          unpack every layer) + `ctr run --snapshotter overlayfs ...`

Bytes over the wire: veth counters on the shaped link; on loopback, the OCI image's size for
the pull, the bootstrap layer plus the daemon's backend bytes for the lazy path.
The whole stack runs in the client network namespace (bench/netns.py) on the shaped link.
Needs root, Linux >= 6.14, tools/containerd-deps, docker-registry, skopeo, umoci.
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
sys.path.insert(0, str(HERE.parent / "tests"))
from common import drop_caches, fmt_bytes, median, rootfs  # noqa: E402
from containerd_support import Stack, containerd_bin_dir  # noqa: E402
from cri_client import CRIImages  # noqa: E402
from netns import CLI, Net, daemon_bytes, manifest_sizes, push_rootfs, registry_nets, sh  # noqa: E402

CMD = ("/bin/cat", "/etc/debian_version")


def one_run(bindir: Path, net: Net, ref: str, work: Path, lazy: bool) -> tuple[float, int, str]:
    stack = Stack(work, bindir, net.host, prefix=net.prefix,
                  cri_snapshotter="nydus" if lazy else "overlayfs").start()
    try:
        drop_caches()
        rx0 = net.rx_bytes()
        t0 = time.perf_counter()
        with CRIImages(str(stack.sock)) as cri:
            cri.pull(ref)
        out = stack.run(ref, "bench", *CMD, snapshotter="nydus" if lazy else "overlayfs")
        elapsed = time.perf_counter() - t0
        rx1 = net.rx_bytes()
        if rx0 is not None and rx1 is not None:
            wire = rx1 - rx0
        elif lazy:
            wire = -1 if not stack.cache_dir.exists() else daemon_bytes(stack.cache_dir)
        else:
            wire = -1
        return elapsed, wire, out.strip()
    finally:
        stack.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--no-netns", action="store_true", help="loopback registry only")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/containerd.py: run as root")
    bindir = containerd_bin_dir()
    if bindir is None:
        sys.exit("bench/containerd.py: tools/containerd-deps failed")
    # short paths: the snapshotter's unix sockets live under the stack's root
    work = Path(tempfile.mkdtemp(prefix="bctd-", dir="/tmp"))
    try:
        with registry_nets(work, rate=args.rate, netns=not args.no_netns) as (server, nets):
            tree = rootfs()
            src, _layer = push_rootfs(server, tree, work / "img", "bench/rootfs:v1")
            sh([*CLI, "convert", "--source", src, "--target",
                server.ref("bench/rootfs-nydus:v1"), "--plain-http", "-q", "--cache-dir",
                str(work / "conv-cache")])
            oci_bytes, _ = manifest_sizes(server, "bench/rootfs:v1")
            nydus_bytes, boot_layer = manifest_sizes(server, "bench/rootfs-nydus:v1")
            print(f"image: {tree.name}: OCI {fmt_bytes(oci_bytes)}, Nydus "
                  f"{fmt_bytes(nydus_bytes)} (bootstrap layer {fmt_bytes(boot_layer)})")
            print(f"time from CRI PullImage to the output of `{' '.join(CMD)}` in a fresh "
                  f"container, median of {args.runs}:")
            for n, net in enumerate(nets):
                res: dict[str, list[tuple[float, int]]] = {"lazy": [], "pull": []}
                for i in range(args.runs):
                    for kind, ref in (("lazy", "bench/rootfs-nydus:v1"),
                                      ("pull", "bench/rootfs:v1")):
                        t, wire, out = one_run(bindir, net, f"{net.host}/{ref}",
                                               work / f"s{n}{kind[0]}{i}", kind == "lazy")
                        if not out:
                            sys.exit(f"{kind}: the container printed nothing")
                        if kind == "lazy" and net.rx_bytes() is None:
                            wire += boot_layer
                        elif kind == "pull" and wire < 0:
                            wire = oci_bytes
                        res[kind].append((t, wire))
                print(f"  [{net.name}]")
                for kind, label in (("lazy", "nydus (lazy)     "),
                                    ("pull", "overlayfs (pull) ")):
                    ts = [t for t, _ in res[kind]]
                    ws = [float(w) for _, w in res[kind]]
                    print(f"    {label}: {median(ts):6.2f} s  wire {fmt_bytes(median(ws))}"
                          "   runs " + " ".join(f"{t:.2f}" for t in ts))
                lt = median([t for t, _ in res["lazy"]])
                pt = median([t for t, _ in res["pull"]])
                print(f"    speed-up {pt / lt:.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
