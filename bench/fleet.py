#!/usr/bin/env python3
"""Fleet cold start: N nodes mounting the same image at once, direct vs mirror vs proxy.

    python3 bench/fleet.py [--nodes 2,4] [--rate 100mbit] [--modes direct,mirror,warm,proxy]

The debootstrap minbase rootfs is pushed as a one-layer OCI image to a docker-registry on
127.0.0.1 and converted with `erofs-nydus convert`.  Then a small network is built from
network namespaces created here:

    origin ns (docker-registry on the same storage) --veth shaped with tbf RATE--+
                                                                               bridge (hub ns:
    node ns 1..N --veth-- ... ------------------------------------------------+  mirror, proxy)

Each node runs its own `erofs-nydus mount REF` (own daemon, own cache dir) in its
namespace and then `chroot MNT /bin/sh -c WORKLOAD`; all N start together.  Modes:

  direct   every node reads from the origin;
  mirror   through a docker-registry pull-through cache in the hub (--mirror), cold;
  warm     the same mirror, filled first with `erofs-nydus warm REF --mirrors-only`;
  proxy    through nginx in the hub caching 1 MiB slices (proxy_cache_lock on), cold.

Reported per mode and N: origin egress (tx bytes of the origin's veth, the only shaped
link; for `warm` with and without the warming, counted until the origin is quiet), and
p50/p99/max seconds from mount to workload done over the N nodes; the nodes' CPU
seconds (user + sys of everything they run, from a cgroup v2 made here: mount,
supervisor and daemon, workload, umount) and how much of the burst some node waited for
a core (the cgroup's CPU pressure), the servers' CPU, how busy the whole machine and the
origin link were; then each mode against issue 14's targets.  Needs root, Linux >=
6.14, docker-registry, skopeo, umoci, nginx, iproute2.  Every node is a daemon: at N = 32
on 2 cores the burst is CPU-bound, which the CPU figures show.

Figures (`--nodes 1,8,16,32`, about 7 minutes; 2026-12-06, 2-vCPU AMD EPYC VM shared
with other work, load 2 at the start; 59.3 MiB of Nydus data, 4.3 MiB read per node;
origin egress, p99 s; README "Fleets" has the full table):

    N    direct            cold mirror        warmed mirror              nginx proxy
    1      4.7 MiB  1.1     44.5 MiB  4.0*    1.3 KiB (+69 MiB)  0.9     12.7 MiB  2.1
    8     37.9 MiB  4.9     95.7 MiB  9.3*   11 KiB  (+69 MiB)  4.7     12.8 MiB  4.3
    16    76.2 MiB 12.6    134.5 MiB 13.9*   22 KiB (+128 MiB) 11.2     12.8 MiB  8.8
    32   152.8 MiB 22.9    211.8 MiB 29.5    43 KiB  (+69 MiB) 14.4     12.8 MiB 14.5

(* re-measured with `--nodes 1,8,16 --modes mirror` once a mirror storing a blob is
passed over, medians of 4-5 runs at load 3-12; the code before: 65.6 / 100.5 / 129.3
MiB, p99 6.0 / 10.1 / 14.5 s in the same session.)

The proxy and the warmed mirror keep the origin at about one working set whatever N;
p99 at N = 32 is 7-21x N = 1 because 32 nodes need 28-36 CPU seconds on 2 cores (the
machine 99 % busy, the origin link 0-7 % busy through the proxy): not a network limit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import drop_caches, fmt_bytes, rootfs  # noqa: E402
from netns import CLI, push_rootfs, sh  # noqa: E402
from registry_fixture import REGISTRY_BIN, start_registry, stop_registry  # noqa: E402

# No /dev/null inside the image: mounts are nodev by default (output is captured instead).
WORKLOAD = "dpkg -l; ls /usr/bin"
SUBNET = "10.213.9"
ORIGIN, HUB = f"{SUBNET}.1", f"{SUBNET}.2"
MIRROR_PORT, PROXY_PORT = 5001, 8080

NGINX_CONF = """
user root;
worker_processes 2;
daemon off;
error_log {d}/error.log;
pid {d}/nginx.pid;
worker_rlimit_nofile 16384;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/t1; proxy_temp_path {d}/t2; fastcgi_temp_path {d}/t3;
  uwsgi_temp_path {d}/t4; scgi_temp_path {d}/t5;
  proxy_cache_path {d}/cache levels=1:2 keys_zone=blobs:8m max_size=4g inactive=1h
                   use_temp_path=off;
  server {{
    listen {hub}:{port};
    location / {{
      slice 1m;
      proxy_cache blobs;
      proxy_cache_key $host$uri$slice_range;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 60s;
      proxy_set_header Range $slice_range;
      proxy_http_version 1.1;
      proxy_cache_valid 200 206 1h;
      proxy_pass http://{origin}:5000;
    }}
  }}
}}
"""


class CpuGroup:
    """A cgroup (v2 hierarchy, no controller needed) holding processes we start, for
    their CPU time (user + sys, children and the daemons they spawn included) and CPU
    pressure (time some of them were runnable but waiting for a core).  Without a
    writable cgroup2 mount the figures are None."""

    def __init__(self, name: str) -> None:
        self.path: Path | None = None
        for line in Path("/proc/mounts").read_text().splitlines():
            f = line.split()
            if f[2] == "cgroup2":
                try:
                    path = Path(f[1]) / name
                    path.mkdir()
                    self.path = path
                except OSError:
                    pass
                break

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv`, run inside this group."""
        if self.path is None:
            return argv
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"),
                *argv]  # fmt: skip

    def join(self, pid: int) -> None:
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def usage(self) -> tuple[float, float] | None:
        """(CPU seconds user + sys, seconds some task waited for a CPU) so far."""
        if self.path is None:
            return None
        stat = dict(ln.split() for ln in (self.path / "cpu.stat").read_text().splitlines())
        wait = 0.0
        for ln in (self.path / "cpu.pressure").read_text().splitlines():
            if ln.startswith("some "):
                wait = int(ln.rsplit("total=", 1)[1]) / 1e6
        return int(stat["usage_usec"]) / 1e6, wait

    def close(self) -> None:
        if self.path is None:
            return
        end = time.monotonic() + 20
        while True:
            try:
                self.path.rmdir()
                return
            except OSError:
                pids = (self.path / "cgroup.procs").read_text().split()
                if time.monotonic() > end:
                    print(f"left in {self.path}: {pids}", file=sys.stderr)
                    return
                time.sleep(0.2)


def machine_busy() -> tuple[float, float]:
    """(CPU seconds all processes of the machine spent busy, cores) from /proc/stat."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = f[3] + f[4]
    return (sum(f[:8]) - idle) / hz, float(os.cpu_count() or 1)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


class Fleet:
    """The namespaces: origin (shaped link), hub (bridge, mirror, proxy), N nodes."""

    def __init__(self, storage: Path, work: Path, nodes: int, rate: str) -> None:
        tag = str(os.getpid() % 10000)
        self.tag, self.work, self.rate = tag, work, rate
        self.ns_origin, self.ns_hub = f"flo{tag}", f"flh{tag}"
        self.if_origin = f"flo{tag}"
        self.nodes: list[str] = []
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        # CPU of the nodes (mount, daemon, workload) and of the servers (origin, mirror, proxy)
        self.cpu_nodes, self.cpu_servers = CpuGroup(f"fleet{tag}n"), CpuGroup(f"fleet{tag}s")
        try:
            self._setup(storage, nodes)
        except BaseException:
            self.close()
            raise

    def _ns(self, name: str) -> None:
        sh(["ip", "netns", "add", name])
        self.namespaces.append(name)
        sh(["ip", "-n", name, "link", "set", "lo", "up"])

    def _setup(self, storage: Path, nodes: int) -> None:
        self._ns(self.ns_hub)
        sh(["ip", "-n", self.ns_hub, "link", "add", "br0", "type", "bridge"])
        sh(["ip", "-n", self.ns_hub, "addr", "add", f"{HUB}/24", "dev", "br0"])
        sh(["ip", "-n", self.ns_hub, "link", "set", "br0", "up"])
        self._ns(self.ns_origin)
        self._link(self.ns_origin, self.if_origin, f"flob{self.tag}", ORIGIN)
        for ns, dev in ((self.ns_origin, self.if_origin), (self.ns_hub, f"flob{self.tag}")):
            sh(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", self.rate,
                "burst", "256kb", "latency", "100ms"])
        for i in range(nodes):
            ns = f"fln{i}x{self.tag}"
            self._ns(ns)
            self._link(ns, f"fln{i}x{self.tag}", f"flb{i}x{self.tag}", f"{SUBNET}.{10 + i}")
            self.nodes.append(ns)
        cfg = {
            "version": "0.1", "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(storage)},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": f"{ORIGIN}:5000", "secret": "bench"},
            "health": {"storagedriver": {"enabled": False}},
        }  # fmt: skip
        self.origin = self._serve(self.ns_origin, "origin", cfg)
        self._wait(f"http://{ORIGIN}:5000/v2/")

    def _link(self, ns: str, dev: str, peer: str, addr: str) -> None:
        sh(["ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", peer,
            "netns", self.ns_hub])  # fmt: skip
        sh(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev])
        sh(["ip", "-n", ns, "link", "set", dev, "up"])
        sh(["ip", "-n", self.ns_hub, "link", "set", peer, "master", "br0"])
        sh(["ip", "-n", self.ns_hub, "link", "set", peer, "up"])

    def _serve(self, ns: str, name: str, cfg: dict[str, object]) -> subprocess.Popen[bytes]:
        path = self.work / f"{name}.yml"
        path.write_text(json.dumps(cfg))
        with open(self.work / f"{name}.log", "wb") as log:
            p = subprocess.Popen(self.cpu_servers.wrap(["ip", "netns", "exec", ns, REGISTRY_BIN,
                                                        "serve", str(path)]),
                                 stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(p)
        return p

    def _wait(self, url: str) -> None:
        end = time.monotonic() + 20
        while time.monotonic() < end:
            r = subprocess.run(["ip", "netns", "exec", self.ns_hub, "curl", "-s", "-o",
                                "/dev/null", "-w", "%{http_code}", url],
                               capture_output=True, text=True, check=False)  # fmt: skip
            if r.stdout.strip() in ("200", "301", "401", "404", "502"):
                return
            time.sleep(0.1)
        raise SystemExit(f"{url} did not answer")

    def origin_tx(self) -> int:
        out = sh(["ip", "-n", self.ns_origin, "-j", "-s", "link", "show", self.if_origin]).stdout
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def start_mirror(self, storage: Path) -> subprocess.Popen[bytes]:
        cfg = {
            "version": "0.1", "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(storage)},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": f"{HUB}:{MIRROR_PORT}", "secret": "bench"},
            "health": {"storagedriver": {"enabled": False}},
            "proxy": {"remoteurl": f"http://{ORIGIN}:5000"},
        }  # fmt: skip
        p = self._serve(self.ns_hub, "mirror", cfg)
        self._wait(f"http://{HUB}:{MIRROR_PORT}/v2/")
        return p

    def start_nginx(self, d: Path) -> subprocess.Popen[bytes]:
        d.mkdir(parents=True)
        conf = d / "nginx.conf"
        conf.write_text(NGINX_CONF.format(d=d, hub=HUB, port=PROXY_PORT, origin=ORIGIN))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        p = subprocess.Popen(self.cpu_servers.wrap(["ip", "netns", "exec", self.ns_hub, nginx,
                                                    "-c", str(conf), "-p", str(d)]),
                             stdin=subprocess.DEVNULL)  # fmt: skip
        self.procs.append(p)
        self._wait(f"http://{HUB}:{PROXY_PORT}/v2/")
        return p

    def stop(self, p: subprocess.Popen[bytes]) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def close(self) -> None:
        for p in self.procs:
            self.stop(p)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], check=False)
        self.cpu_nodes.close()
        self.cpu_servers.close()


def node_run(ns: str, ref: str, work: Path, extra: list[str], out: dict[str, object],
             cpu: CpuGroup) -> None:  # fmt: skip
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        sh(cpu.wrap(["nsenter", f"--net=/run/netns/{ns}", *CLI, "mount", ref, str(mnt),
                     "--cache-dir", str(cache), "--plain-http", *extra]))  # fmt: skip
        sh(cpu.wrap(["chroot", str(mnt), "/bin/sh", "-c", WORKLOAD]))
        out["seconds"] = time.perf_counter() - t0
        st = json.loads(sh(cpu.wrap([*CLI, "mount-stats", str(mnt), "--json"])).stdout)
        out["fetched"] = int(st["metrics"]["bytes_fetched"])
    except SystemExit as exc:
        out["error"] = str(exc)
    finally:
        subprocess.run(cpu.wrap([*CLI, "umount", str(mnt), "--cache-dir", str(cache)]),
                       capture_output=True, check=False)  # fmt: skip


def burst(fleet: Fleet, ref: str, work: Path, n: int, extra: list[str]) -> list[dict[str, object]]:
    drop_caches()
    results: list[dict[str, object]] = [{} for _ in range(n)]
    threads = [threading.Thread(target=node_run, args=(fleet.nodes[i], ref, work / f"n{i}",
                                                       extra, results[i], fleet.cpu_nodes))
               for i in range(n)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in enumerate(results):
        if "error" in r:
            raise SystemExit(f"node {i}: {r['error']}")
    return results


def wait_mirror_filled(storage: Path, digests: list[str], timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    for d in digests:
        h = d.split(":", 1)[1]
        p = storage / "docker/registry/v2/blobs/sha256" / h[:2] / h / "data"
        while not p.exists():
            if time.monotonic() > end:
                raise SystemExit(f"the mirror did not store {d}")
            time.sleep(0.2)


def wait_quiet(fleet: Fleet, quiet: float = 2.0, timeout: float = 120) -> None:
    """Until the origin's link has sent nothing for `quiet` seconds: a pull-through
    mirror may still stream copies of a blob it has already stored (one per concurrent
    miss), and those bytes belong to the warming, not to the burst."""
    end = time.monotonic() + timeout
    last, since = fleet.origin_tx(), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < end:
        time.sleep(0.25)
        now = fleet.origin_tx()
        if now != last:
            last, since = now, time.monotonic()


def run_mode(fleet: Fleet, mode: str, ref: str, work: Path, n: int,
             data_blobs: list[str]) -> dict[str, float]:  # fmt: skip
    """One burst of `n` nodes in `mode`; prints its figures and returns them."""
    work.mkdir(parents=True)
    extra: list[str] = []
    server = None
    warm_bytes = 0
    if mode in ("mirror", "warm"):
        storage = work / "mirror-storage"
        server = fleet.start_mirror(storage)
        extra = ["--mirror", f"http://{HUB}:{MIRROR_PORT}"]
        if mode == "warm":
            tx0 = fleet.origin_tx()
            sh(["nsenter", f"--net=/run/netns/{fleet.nodes[0]}", *CLI, "warm", ref,
                "--mirrors-only", "--plain-http", *extra])  # fmt: skip
            wait_mirror_filled(storage, data_blobs)
            wait_quiet(fleet)
            warm_bytes = fleet.origin_tx() - tx0
    elif mode == "proxy":
        server = fleet.start_nginx(work / "nginx")
        extra = ["--proxy", f"http://{HUB}:{PROXY_PORT}"]
    try:
        tx0 = fleet.origin_tx()
        cn0, cs0, m0 = fleet.cpu_nodes.usage(), fleet.cpu_servers.usage(), machine_busy()
        t0 = time.perf_counter()
        results = burst(fleet, ref, work, n, extra)
        wall = time.perf_counter() - t0
        cn1, cs1, m1 = fleet.cpu_nodes.usage(), fleet.cpu_servers.usage(), machine_busy()
        origin = fleet.origin_tx() - tx0
    finally:
        if server is not None:
            fleet.stop(server)
    secs = [float(r["seconds"]) for r in results]  # type: ignore[arg-type]
    per_node = sum(int(r["fetched"]) for r in results) / n  # type: ignore[call-overload]
    fig = {"origin": float(origin), "warming": float(warm_bytes), "node_fetch": per_node,
           "p50": pct(secs, 50), "p99": pct(secs, 99), "max": max(secs), "burst": wall}
    warm = f" (+{fmt_bytes(warm_bytes)} warming)" if mode == "warm" else ""
    print(f"  N={n:<3} {mode:<7} origin egress {fmt_bytes(origin):>10}{warm:<22} "
          f"node fetch {fmt_bytes(per_node):>10}  p50 {fig['p50']:6.2f} s  "
          f"p99 {fig['p99']:6.2f} s  max {fig['max']:6.2f} s")
    cpu = ""
    if cn0 and cn1 and cs0 and cs1:
        fig["cpu_nodes"], fig["cpu_servers"] = cn1[0] - cn0[0], cs1[0] - cs0[0]
        fig["starved"] = cn1[1] - cn0[1]
        cpu = (f"nodes CPU {fig['cpu_nodes']:6.1f} s ({fig['cpu_nodes'] / n:4.2f} s a node; "
               f"some node starved of a core {fig['starved'] / wall:4.0%} of the burst)  "
               f"servers CPU {fig['cpu_servers']:5.1f} s\n{'':14}")
    cores = m1[1]
    fig["busy"] = (m1[0] - m0[0]) / (wall * cores)
    fig["link"] = origin * 8 / (parse_rate(fleet.rate) * max(secs))  # while any node read
    print(f"{'':14}burst {wall:6.2f} s (mount to umount)  {cpu}machine busy "
          f"{fig['busy']:4.0%} of {cores:.0f} cores  origin link busy {fig['link']:4.0%} "
          f"(until the last node finished)  load {os.getloadavg()[0]:.1f}", flush=True)
    return fig


def summary(figs: dict[tuple[str, int], dict[str, float]], rate: str) -> None:
    """The targets of issue 14: origin egress about one working set whatever N through
    a mirror or proxy, and p99 at the largest N within 2x of N = 1."""
    ns = sorted({n for _, n in figs})
    print(f"\nvs the targets (working set = one node's fetch; link {rate}):")
    for mode in dict.fromkeys(m for m, _ in figs):
        f1 = figs.get((mode, 1))
        parts = []
        for n in ns:
            f = figs.get((mode, n))
            if f is None:
                continue
            ratio = f" ({f['p99'] / f1['p99']:.1f}x N=1)" if f1 and n > 1 else ""
            cpu_floor = f.get("cpu_nodes", 0.0) / (os.cpu_count() or 1)
            link_floor = f["origin"] * 8 / parse_rate(rate)
            parts.append(f"N={n}: origin {f['origin'] / f['node_fetch']:.1f} working sets, "
                         f"p99 {f['p99']:.1f} s{ratio}; nodes' CPU / cores {cpu_floor:.1f} s, "
                         f"origin bytes / link {link_floor:.1f} s")
        print(f"  {mode:<7} " + f"\n  {'':<7} ".join(parts))
    print("  (the nodes' CPU seconds, mount to umount, spread over every core of the machine, "
          "and the origin's bytes at the link's rate: a p99 near the first is CPU-bound, "
          "near the second network-bound)")


def parse_rate(rate: str) -> float:
    """tc's rate ("100mbit", "1gbit", "500kbit") in bits per second."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for unit, mult in units.items():
        if rate.lower().endswith(unit):
            return float(rate[: -len(unit)]) * mult
    return float(rate)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="2,4", help="comma-separated N values")
    ap.add_argument("--rate", default="100mbit", help="tc rate of the origin's link")
    ap.add_argument("--modes", default="direct,mirror,warm,proxy")
    ap.add_argument("--json", metavar="FILE",
                    help="also write the figures there (per MODE/N, and the image's sizes)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/fleet.py: run as root (mounts, fanotify, network namespaces)")
    ns_values = [int(x) for x in args.nodes.split(",")]
    modes = args.modes.split(",")
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    server = start_registry(work / "registry")
    fleet: Fleet | None = None
    try:
        src, _ = push_rootfs(server, rootfs(), work / "img", "bench/rootfs:v1")
        target = server.ref("bench/rootfs-nydus:v1")
        sh([*CLI, "convert", "--source", src, "--target", target, "--plain-http", "-q",
            "--cache-dir", str(work / "conv")])  # fmt: skip
        import httpx

        m = httpx.get(f"{server.url}/v2/bench/rootfs-nydus/manifests/v1", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"}).json()  # fmt: skip
        layers = m["layers"]
        data_blobs = [x["digest"] for x in layers[:-1]]
        data_size = sum(x["size"] for x in layers[:-1])
        print(f"image: debootstrap minbase, Nydus data {fmt_bytes(data_size)}"
              f", bootstrap layer {fmt_bytes(layers[-1]['size'])}; origin link {args.rate}; "
              f"workload `{WORKLOAD}`")  # fmt: skip
        fleet = Fleet(server.storage, work, max(ns_values), args.rate)
        ref = f"{ORIGIN}:5000/bench/rootfs-nydus:v1"
        figs: dict[tuple[str, int], dict[str, float]] = {}
        for n in ns_values:
            for mode in modes:
                figs[mode, n] = run_mode(fleet, mode, ref, work / f"{mode}-{n}", n, data_blobs)
        summary(figs, args.rate)
        if args.json:
            Path(args.json).write_text(json.dumps({
                "data_size": data_size, "rate": args.rate,
                "figures": {f"{mode}/{n}": fig for (mode, n), fig in figs.items()}}))
    finally:
        if fleet is not None:
            fleet.close()
        stop_registry(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
