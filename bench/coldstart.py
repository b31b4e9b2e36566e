#!/usr/bin/env python3
"""Cold start from a registry: lazy `erofs-nydus mount REF` vs pull-and-unpack.

    python3 bench/coldstart.py [--runs N] [--rate 100mbit] [--rtt-ms 0] [--no-netns]

The debootstrap minbase rootfs is packed with umoci as a one-layer OCI image, pushed
with skopeo to a real docker-registry on 127.0.0.1, and converted with
`erofs-nydus convert`.  Then, median of N runs each:

(a) conversion: `erofs-nydus convert` (layer cache emptied) vs `skopeo copy` to an
    OCI layout (as bench/convert.py);
(b) cold start until `chroot ROOT /bin/sh -c 'dpkg -l >/dev/null; ls /usr/bin >/dev/null'`
    has finished, page cache dropped first:
      lazy  = `erofs-nydus mount REF MNT` (bootstrap layer only) + the command
              (chunks fetched on demand with Range requests);
      pull  = `skopeo copy docker://REF oci:DIR` + `umoci unpack` + the command;
    bytes fetched = what crossed the wire (veth counters under a bandwidth limit;
    bootstrap layer + daemon's backend bytes, or the image's blobs, on loopback).

Two networks: the loopback registry, and (unless --no-netns) a second registry
process on the same storage inside a network namespace created here, reached from
another namespace created here over a veth pair shaped with `tc ... tbf rate RATE`
on both ends (netem with delay when --rtt-ms > 0).  Both paths' clients (skopeo, the
mount command and the daemon it starts) run in the client namespace via nsenter.
Needs root, Linux >= 6.14 (fanotify pre-content), docker-registry, skopeo, umoci.
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
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import drop_caches, fmt_bytes, median, rootfs  # noqa: E402
from layers_support import layer_paths, umoci_image  # noqa: E402
from registry_fixture import (  # noqa: E402
    REGISTRY_BIN,
    RegistryServer,
    skopeo_copy,
    start_registry,
    stop_registry,
)

CLI = [sys.executable, "-m", "erofs_nydus.cli"]
WORKLOAD = "dpkg -l >/dev/null; ls /usr/bin >/dev/null"
SUBNET = "10.213.7"


def sh(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(argv)}\n"
                         f"{proc.stderr[-3000:]}{proc.stdout[-1000:]}")
    return proc


class Net:
    """Where the clients run and how they reach the registry."""

    def __init__(self, name: str, host: str, prefix: list[str]) -> None:
        self.name, self.host, self.prefix = name, host, prefix

    def rx_bytes(self) -> int | None:
        return None


class ShapedNet(Net):
    """Two network namespaces joined by a shaped veth pair; a registry in one."""

    def __init__(self, storage: Path, work: Path, rate: str, rtt_ms: float) -> None:
        tag = str(os.getpid() % 100000)
        self.ns_reg, self.ns_cli = f"nyreg{tag}", f"nycli{tag}"
        self.if_reg, self.if_cli = f"nyr{tag}", f"nyc{tag}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._up = False
        try:
            for ns in (self.ns_reg, self.ns_cli):
                sh(["ip", "netns", "add", ns])
            self._up = True
            sh(["ip", "link", "add", self.if_cli, "netns", self.ns_cli, "type", "veth",
                "peer", "name", self.if_reg, "netns", self.ns_reg])
            for ns, dev, addr in ((self.ns_cli, self.if_cli, f"{SUBNET}.1/24"),
                                  (self.ns_reg, self.if_reg, f"{SUBNET}.2/24")):
                sh(["ip", "-n", ns, "addr", "add", addr, "dev", dev])
                sh(["ip", "-n", ns, "link", "set", "lo", "up"])
                sh(["ip", "-n", ns, "link", "set", dev, "up"])
                if rtt_ms > 0:
                    sh(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay",
                        f"{rtt_ms / 2:g}ms", "rate", rate, "limit", "100000"])
                else:
                    sh(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                        "burst", "256kb", "latency", "100ms"])
            port = 5000
            cfg = {
                "version": "0.1",
                "log": {"level": "warn"},
                "storage": {"filesystem": {"rootdirectory": str(storage)},
                            "maintenance": {"uploadpurging": {"enabled": False}}},
                "http": {"addr": f"{SUBNET}.2:{port}", "secret": "bench"},
                "health": {"storagedriver": {"enabled": False}},
            }
            cfg_path = work / "netns-registry.yml"
            cfg_path.write_text(json.dumps(cfg))
            with open(work / "netns-registry.log", "wb") as log:
                self.proc = subprocess.Popen(
                    ["ip", "netns", "exec", self.ns_reg, REGISTRY_BIN, "serve", str(cfg_path)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            prefix = ["nsenter", f"--net=/run/netns/{self.ns_cli}"]
            super().__init__(f"veth {rate}" + (f" rtt {rtt_ms:g} ms" if rtt_ms else ""),
                             f"{SUBNET}.2:{port}", prefix)
            end = time.monotonic() + 20
            while True:
                r = subprocess.run([*prefix, "curl", "-s", "-o", "/dev/null", "-w",
                                    "%{http_code}", f"http://{self.host}/v2/"],
                                   capture_output=True, text=True, check=False)
                if r.stdout.strip() in ("200", "401"):
                    break
                if time.monotonic() > end or self.proc.poll() is not None:
                    raise SystemExit("the registry in the network namespace did not start")
                time.sleep(0.1)
        except BaseException:
            self.close()
            raise

    def rx_bytes(self) -> int:
        out = sh(["ip", "-n", self.ns_cli, "-j", "-s", "link", "show", self.if_cli]).stdout
        return int(json.loads(out)[0]["stats64"]["rx"]["bytes"])

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._up:
            for ns in (self.ns_cli, self.ns_reg):
                subprocess.run(["ip", "netns", "del", ns], check=False)
            self._up = False


def daemon_bytes(cache: Path) -> int:
    st = json.loads(sh([*CLI, "mount-stats", "--cache-dir", str(cache), "--json"]).stdout)
    return int(st["metrics"]["bytes_fetched"])


class Keeper:
    """A daemon kept running for `cache` (a tiny local image mounted there), as on a node
    whose snapshotter daemon is always up.  `evict()` deletes everything a REF mount
    added to the cache dir, so the next run starts with cold data again."""

    def __init__(self, net: Net, work: Path) -> None:
        self.work, self.cache, self.mnt = work, work / "cache", work / "mnt"
        (work / "tiny").mkdir(parents=True)
        (work / "tiny" / "hello").write_text("hello\n")
        self.mnt.mkdir()
        sh([*CLI, "create", str(work / "tiny"), "-B", str(work / "tiny.boot"), "-D",
            str(work / "blobs")])
        sh([*net.prefix, *CLI, "mount", str(work / "tiny.boot"), str(self.mnt), "--blob-dir",
            str(work / "blobs"), "--cache-dir", str(self.cache)])
        self.keep = {p.name for p in self.cache.iterdir()}
        self.fetched = 0

    def evict(self) -> None:
        for p in self.cache.iterdir():
            if p.name in self.keep or p.name.startswith("daemon"):
                continue
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()

    def close(self) -> None:
        subprocess.run([*CLI, "umount", str(self.mnt)], capture_output=True, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


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
    t_mount = time.perf_counter() - t0
    sh(["chroot", str(mnt), "/bin/sh", "-c", WORKLOAD])
    dt = time.perf_counter() - t0
    rx1 = net.rx_bytes()
    if rx0 is not None and rx1 is not None:
        fetched = rx1 - rx0
    else:
        before = keeper.fetched if keeper is not None else 0
        fetched = boot_layer + daemon_bytes(cache) - before
    sh([*CLI, "umount", str(mnt)])
    if keeper is not None:
        keeper.fetched = daemon_bytes(cache)
        keeper.evict()
    shutil.rmtree(work)
    return dt, fetched, t_mount


def pull_run(net: Net, ref: str, work: Path, image_bytes: int) -> tuple[float, int]:
    layout, bundle = work / "oci", work / "bundle"
    work.mkdir(parents=True)
    drop_caches()
    rx0 = net.rx_bytes()
    t0 = time.perf_counter()
    sh([*net.prefix, "skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
        f"docker://{ref}", f"oci:{layout}:v1"])
    sh(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)])
    sh(["chroot", str(bundle / "rootfs"), "/bin/sh", "-c", WORKLOAD])
    dt = time.perf_counter() - t0
    rx1 = net.rx_bytes()
    fetched = rx1 - rx0 if rx0 is not None and rx1 is not None else image_bytes
    shutil.rmtree(work)
    return dt, fetched


def convert_bench(server: RegistryServer, src: str, work: Path, runs: int) -> str:
    conv, copy = [], []
    target = server.ref("bench/rootfs-nydus:v1")
    for i in range(runs):
        cache = work / f"conv-cache{i}"
        t0 = time.perf_counter()
        sh([*CLI, "convert", "--source", src, "--target", target, "--plain-http", "-q",
            "--cache-dir", str(cache)])
        conv.append(time.perf_counter() - t0)
        shutil.rmtree(cache)
        t0 = time.perf_counter()
        skopeo_copy(f"docker://{src}", f"oci:{work / f'copy{i}'}:v1")
        copy.append(time.perf_counter() - t0)
        shutil.rmtree(work / f"copy{i}")
    print(f"(a) conversion, median of {runs}:")
    print(f"    erofs-nydus convert : {median(conv):6.2f} s   runs "
          + " ".join(f"{t:.2f}" for t in conv))
    print(f"    skopeo copy (pull)  : {median(copy):6.2f} s   runs "
          + " ".join(f"{t:.2f}" for t in copy))
    print(f"    ratio convert / skopeo copy: {median(conv) / median(copy):.2f}x")
    return "bench/rootfs-nydus:v1"


def manifest_sizes(server: RegistryServer, repo_tag: str) -> tuple[int, int]:
    """(sum of all layer sizes + config, size of the last layer) of an image."""
    import httpx

    repo, tag = repo_tag.split(":")
    r = httpx.get(f"{server.url}/v2/{repo}/manifests/{tag}", headers={"Accept": ", ".join([
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json"])})
    r.raise_for_status()
    m = r.json()
    layers = [int(x["size"]) for x in m["layers"]]
    return sum(layers) + int(m["config"]["size"]) + len(r.content), layers[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--convert-runs", type=int, default=None,
                    help="runs for (a) (default: --runs)")
    ap.add_argument("--rate", default="100mbit", help="tc rate on the veth pair")
    ap.add_argument("--rtt-ms", type=float, default=0.0,
                    help="also add this round-trip delay (netem) on the veth pair")
    ap.add_argument("--no-netns", action="store_true", help="loopback registry only")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/coldstart.py: run as root (mounts, fanotify, network namespaces)")
    work = Path(tempfile.mkdtemp(prefix="bench-coldstart-"))
    server = start_registry(work / "registry")
    shaped: ShapedNet | None = None
    try:
        tree = rootfs()

        def fill(r: Path) -> None:
            subprocess.run(["cp", "-a", f"{tree}/.", f"{r}/"], check=True)

        layout = umoci_image(work / "img", [fill])
        layer = layer_paths(layout)[0]
        src = server.ref("bench/rootfs:v1")
        skopeo_copy(f"oci:{layout}:latest", f"docker://{src}")
        print(f"image: {tree.name}, one layer of {fmt_bytes(layer.stat().st_size)} tar.gz "
              f"in a docker-registry")
        nydus = convert_bench(server, src, work, args.convert_runs or args.runs)
        oci_bytes, _ = manifest_sizes(server, "bench/rootfs:v1")
        nydus_bytes, boot_layer = manifest_sizes(server, nydus)
        print(f"OCI image {fmt_bytes(oci_bytes)}; Nydus image {fmt_bytes(nydus_bytes)} "
              f"(bootstrap layer {fmt_bytes(boot_layer)})")
        nets: list[Net] = [Net("loopback", server.host, [])]
        if not args.no_netns:
            shaped = ShapedNet(server.storage, work, args.rate, args.rtt_ms)
            nets.append(shaped)
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
            for i in range(args.runs):
                t, b, m = lazy_run(net, f"{net.host}/{nydus}", work / f"lazy{i}", boot_layer)
                lazy.append(t)
                lazy_b.append(b)
                mount_t.append(m)
                t, b, m = lazy_run(net, f"{net.host}/{nydus}", work / f"warm{i}", boot_layer,
                                   keeper)
                warm.append(t)
                warm_m.append(m)
                t, b = pull_run(net, f"{net.host}/bench/rootfs:v1", work / f"pull{i}",
                                oci_bytes)
                pull.append(t)
                pull_b.append(b)
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
            keeper.close()
    finally:
        if shaped is not None:
            shaped.close()
        stop_registry(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
