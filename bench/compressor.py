#!/usr/bin/env python3
"""Chunk compressor and digester side by side on a registry image: which default to ship.

    python3 bench/compressor.py [--runs 3] [--variants lz4+sha256,zstd+blake3] [--rate 100mbit]
                                [--convert-runs 1] [--no-netns] [--skip-sizes] [--skip-cold]
                                [--skip-warm]

The debootstrap minbase rootfs is pushed as a one-layer OCI image to a real
docker-registry on 127.0.0.1 (and served on the same storage through a `tc tbf` veth
into a private network namespace, as bench/coldstart.py does), then converted once per
compressor + digester.  Printed, per variant, with the ratio to the first variant:

(a) sizes: blob bytes (the data layer), bootstrap layer bytes and the convert wall and
    CPU time (medians of --convert-runs, interleaved; layer cache emptied) of every
    combination (zstd/lz4/none x blake3/sha256);
(b) cold start on each network: `erofs-nydus mount REF` + `chroot MNT sh -c 'dpkg -l;
    ls /usr/bin'` (output captured: the mount is nodev), page cache dropped first, with
    the daemon started by `mount` ("cold daemon") and with a resident daemon up
    ("daemon up", its data evicted each run); bytes fetched from the registry;
(c) full read: on loopback, every file of the mounted image read once (cache filled by
    the daemon: fetch + decode + verify of every chunk), then with the page cache
    dropped and the cache file complete read again ("warm": the kernel reads the
    decompressed cache file; the requests that still reach the daemon are counted, 0
    expected -- so it should not depend on the compressor).

Runs are interleaved (A B A B ..., the order reversed every other round) so that load
from other processes hits every variant alike; medians of --runs.  Per-chunk decode
throughput: bench/codec.py.  Needs root, Linux >= 6.14 (fanotify pre-content),
docker-registry, skopeo, umoci, iproute2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from coldstart import WORKLOAD, lazy_run  # noqa: E402
from common import (  # noqa: E402
    drop_caches,
    fmt_bytes,
    median,
    process_tree,
    rootfs,
    run_rusage,
    supervisor_pid,
)
from netns import CLI, Keeper, Net, manifest_sizes, push_rootfs, registry_nets, sh  # noqa: E402
from registry_fixture import RegistryServer  # noqa: E402

ALL = [f"{c}+{d}" for c in ("lz4", "zstd", "none") for d in ("sha256", "blake3")]


def repo_of(variant: str) -> str:
    return f"bench/rootfs-{variant.replace('+', '-')}:v1"


def convert(server: RegistryServer, src: str, work: Path, variant: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system of the convert process)."""
    compressor, digester = variant.split("+")
    cache = work / f"conv-{variant}"
    dt, cpu, _rss = run_rusage([*CLI, "convert", "--source", src, "--target",
                                server.ref(repo_of(variant)), "--plain-http", "-q",
                                "--cache-dir", str(cache),
                                "--compressor", compressor, "--digester", digester])
    shutil.rmtree(cache)
    return dt, cpu


def layer_sizes(server: RegistryServer, repo_tag: str) -> list[int]:
    import httpx

    repo, tag = repo_tag.split(":")
    r = httpx.get(f"{server.url}/v2/{repo}/manifests/{tag}", headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})
    r.raise_for_status()
    return [int(x["size"]) for x in r.json()["layers"]]


def rounds(variants: list[str], runs: int) -> list[list[str]]:
    """A B, B A, A B, ...: each variant goes first as often as the others."""
    return [variants if i % 2 == 0 else variants[::-1] for i in range(runs)]


def runs_str(xs: list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in xs)


def ratio(x: float, base: float) -> str:
    return f"{x / base:5.2f}x" if base else "    -"


def daemon_cpu(cache: Path) -> float:
    """CPU seconds (user + system) used so far by the daemon serving `cache` and its
    live children, found by the pid in its lock file.  Less sensitive to the other
    sessions' load than wall time: what the compressor costs the daemon."""
    ticks = 0
    for pid in process_tree(supervisor_pid(cache)):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def read_tree(mnt: Path) -> float:
    """Seconds to read every regular file under `mnt` (`tar | cat`: GNU tar skips file
    data when it writes to /dev/null itself)."""
    return run_rusage(["sh", "-c", f"tar -C {mnt} -cf - . | cat > /dev/null"])[0]


def requests_of(status: dict[str, Any]) -> int:
    """Requests that reached the daemon so far (fanotify events + reads), from the
    `mount-stats --json` status."""
    return int(status.get("fanotify", {}).get("events", 0)) + int(status["metrics"]["reads"])


def full_read(net: Net, ref: str, work: Path) -> tuple[float, float, float, float, int]:
    """(first full read, warm full read, fraction of the cache file filled, daemon CPU
    seconds for its start and the first read, requests that reached the daemon during
    the warm read)."""
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir(parents=True)
    drop_caches()
    sh([*net.prefix, *CLI, "mount", ref, str(mnt), "--cache-dir", str(cache), "--plain-http"])
    try:
        first = read_tree(mnt)
        cpu = daemon_cpu(cache)
        st = json.loads(sh([*CLI, "mount-stats", "--cache-dir", str(cache), "--json"]).stdout)
        size = sum(b["size"] for b in st["blobs"].values())
        present = sum(b["present"] for b in st["blobs"].values())
        drop_caches()
        warm = read_tree(mnt)
        st2 = json.loads(sh([*CLI, "mount-stats", "--cache-dir", str(cache), "--json"]).stdout)
        reached = requests_of(st2) - requests_of(st)
    finally:
        sh([*CLI, "umount", str(mnt)])
    shutil.rmtree(work)
    return first, warm, present / size if size else 0.0, cpu, reached


def print_rows(title: str, variants: list[str], rows: dict[str, list[float]],
               extra: dict[str, str] | None = None) -> None:
    """Median and its ratio to the first variant's median, then the median of the
    per-round ratios (each run against the first variant's run of the same round:
    the two ran back to back, so they saw about the same load)."""
    base = median(rows[variants[0]])
    print(f"    {title}")
    for v in variants:
        m = median(rows[v])
        paired = median([x / b for x, b in zip(rows[v], rows[variants[0]], strict=True) if b])
        tail = f"  {extra[v]}" if extra else ""
        print(f"      {v:<13} {m:6.2f} s  {ratio(m, base)} (paired {paired:4.2f}x)   runs "
              f"{runs_str(rows[v])}{tail}")


def bench(server: RegistryServer, nets: list[Net], work: Path, args: argparse.Namespace) -> None:
    variants: list[str] = args.variants.split(",")
    for v in variants:
        if v not in ALL:
            sys.exit(f"unknown variant {v!r}: one of {', '.join(ALL)}")
    tree = rootfs()
    src, layer = push_rootfs(server, tree, work / "img", "bench/rootfs:v1")
    oci_bytes, _ = manifest_sizes(server, "bench/rootfs:v1")
    print(f"image: {tree.name}, one layer of {fmt_bytes(layer.stat().st_size)} tar.gz; "
          f"OCI image {fmt_bytes(oci_bytes)}")
    sized = ALL if not args.skip_sizes else variants
    sized = variants + [v for v in sized if v not in variants]
    print(f"(a) sizes, and convert time (median of {args.convert_runs}; ratio to "
          f"{variants[0]}):")
    conv: dict[str, list[float]] = {v: [] for v in sized}
    conv_cpu: dict[str, list[float]] = {v: [] for v in sized}
    for order in rounds(sized, args.convert_runs):
        for v in order:
            wall, cpu = convert(server, src, work, v)
            conv[v].append(wall)
            conv_cpu[v].append(cpu)
    print(f"      {'variant':<13} {'blob':>10} {'ratio':>6} {'bootstrap':>11} {'convert':>9}"
          f" {'ratio':>6} {'CPU':>8} {'ratio':>6}   runs (wall)")
    base_blob = 0
    for v in sized:
        layers = layer_sizes(server, repo_of(v))
        blob, boot = sum(layers[:-1]), layers[-1]  # data layer(s), then the bootstrap layer
        base_blob = base_blob or blob
        wall, cpu = median(conv[v]), median(conv_cpu[v])
        print(f"      {v:<13} {fmt_bytes(blob):>10} {ratio(blob, base_blob):>6} "
              f"{fmt_bytes(boot):>11} {wall:7.2f} s {ratio(wall, median(conv[sized[0]]))} "
              f"{cpu:6.2f} s {ratio(cpu, median(conv_cpu[sized[0]]))}   runs {runs_str(conv[v])}")

    if not args.skip_cold:
        print(f"(b) cold start: mount REF + `{WORKLOAD}`, page cache dropped, "
              f"median of {args.runs}, interleaved:")
    boots = {v: layer_sizes(server, repo_of(v))[-1] for v in variants}
    for n, net in enumerate([] if args.skip_cold else nets):
        keeper = Keeper(net, work / f"keeper{n}")
        cold: dict[str, list[float]] = {v: [] for v in variants}
        up: dict[str, list[float]] = {v: [] for v in variants}
        fetched: dict[str, list[float]] = {v: [] for v in variants}
        up_cpu: dict[str, list[float]] = {v: [] for v in variants}
        try:
            for i, order in enumerate(rounds(variants, args.runs)):
                for v in order:
                    ref = f"{net.host}/{repo_of(v)}"
                    t, b, _ = lazy_run(net, ref, work / f"cold{i}", boots[v])
                    cold[v].append(t)
                    fetched[v].append(b)
                    c0 = daemon_cpu(keeper.cache)
                    t, _, _ = lazy_run(net, ref, work / f"up{i}", boots[v], keeper)
                    up[v].append(t)
                    up_cpu[v].append(daemon_cpu(keeper.cache) - c0)
        finally:
            keeper.close()
        print(f"  [{net.name}]")
        print_rows("cold daemon (mount starts it):", variants, cold,
                   {v: f"fetched {fmt_bytes(median(fetched[v]))}" for v in variants})
        print_rows("daemon up (resident, data cold):", variants, up)
        print_rows("daemon up: the daemon's CPU for mount + workload + umount:", variants,
                   up_cpu)

    if args.skip_warm:
        return
    print(f"(c) full read of the mounted tree on loopback, median of {args.runs}, interleaved:")
    first: dict[str, list[float]] = {v: [] for v in variants}
    warm: dict[str, list[float]] = {v: [] for v in variants}
    first_cpu: dict[str, list[float]] = {v: [] for v in variants}
    filled: dict[str, float] = {}
    reached: dict[str, int] = {}
    for i, order in enumerate(rounds(variants, args.runs)):
        for v in order:
            f, w, filled[v], c, n = full_read(nets[0], f"{nets[0].host}/{repo_of(v)}",
                                           work / f"full{i}")
            first[v].append(f)
            first_cpu[v].append(c)
            reached[v] = reached.get(v, 0) + n
            warm[v].append(w)
    print_rows("first read (daemon fetches, decodes, verifies every chunk):", variants, first,
               {v: f"cache filled {100 * filled[v]:.1f}%" for v in variants})
    print_rows("daemon CPU for its start + the first read (user + system):", variants,
               first_cpu)
    print_rows("warm read (page cache dropped, cache file complete):", variants, warm,
               {v: f"daemon reached {reached[v]} times" for v in variants})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--variants", default="lz4+sha256,zstd+blake3",
                    help=f"comma-separated, timed in (b) and (c); the first is the base "
                    f"of the ratios (of {', '.join(ALL)})")
    ap.add_argument("--convert-runs", type=int, default=1, help="converts per variant in (a)")
    ap.add_argument("--rate", default="100mbit", help="tc rate on the veth pair")
    ap.add_argument("--no-netns", action="store_true", help="loopback registry only")
    ap.add_argument("--skip-sizes", action="store_true",
                    help="(a) only for --variants, not every combination")
    ap.add_argument("--skip-cold", action="store_true", help="no (b)")
    ap.add_argument("--skip-warm", action="store_true", help="no (c)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/compressor.py: run as root (mounts, fanotify, network namespaces)")
    work = Path(tempfile.mkdtemp(prefix="bench-compressor-"))
    try:
        with registry_nets(work, rate=args.rate, netns=not args.no_netns) as (server, nets):
            bench(server, nets, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
