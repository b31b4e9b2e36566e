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
link; for `warm` with and without the warming), and p50/p99/max seconds from mount to
workload done over the N nodes.  Needs root, Linux >= 6.14, docker-registry, skopeo,
umoci, nginx, iproute2.  Keep N small on a shared machine: every node is a daemon.
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
events {{ worker_connections 256; }}
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
            p = subprocess.Popen(["ip", "netns", "exec", ns, REGISTRY_BIN, "serve", str(path)],
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
        p = subprocess.Popen(["ip", "netns", "exec", self.ns_hub, nginx, "-c", str(conf), "-p",
                              str(d)], stdin=subprocess.DEVNULL)  # fmt: skip
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


def node_run(ns: str, ref: str, work: Path, extra: list[str], out: dict[str, object]) -> None:
    mnt, cache = work / "mnt", work / "cache"
    mnt.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        sh(["nsenter", f"--net=/run/netns/{ns}", *CLI, "mount", ref, str(mnt), "--cache-dir",
            str(cache), "--plain-http", *extra])  # fmt: skip
        sh(["chroot", str(mnt), "/bin/sh", "-c", WORKLOAD])
        out["seconds"] = time.perf_counter() - t0
        st = json.loads(sh([*CLI, "mount-stats", str(mnt), "--json"]).stdout)
        out["fetched"] = int(st["metrics"]["bytes_fetched"])
    except SystemExit as exc:
        out["error"] = str(exc)
    finally:
        subprocess.run([*CLI, "umount", str(mnt), "--cache-dir", str(cache)],
                       capture_output=True, check=False)  # fmt: skip


def burst(fleet: Fleet, ref: str, work: Path, n: int, extra: list[str]) -> list[dict[str, object]]:
    drop_caches()
    results: list[dict[str, object]] = [{} for _ in range(n)]
    threads = [threading.Thread(target=node_run, args=(fleet.nodes[i], ref, work / f"n{i}",
                                                       extra, results[i]))
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


def run_mode(fleet: Fleet, mode: str, ref: str, work: Path, n: int,
             data_blobs: list[str]) -> str:  # fmt: skip
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
            warm_bytes = fleet.origin_tx() - tx0
    elif mode == "proxy":
        server = fleet.start_nginx(work / "nginx")
        extra = ["--proxy", f"http://{HUB}:{PROXY_PORT}"]
    try:
        tx0 = fleet.origin_tx()
        results = burst(fleet, ref, work, n, extra)
        origin = fleet.origin_tx() - tx0
    finally:
        if server is not None:
            fleet.stop(server)
    secs = [float(r["seconds"]) for r in results]  # type: ignore[arg-type]
    per_node = sum(int(r["fetched"]) for r in results) / n  # type: ignore[call-overload]
    warm = f" (+{fmt_bytes(warm_bytes)} warming)" if mode == "warm" else ""
    return (f"  N={n:<3} {mode:<7} origin egress {fmt_bytes(origin):>10}{warm:<22} "
            f"node fetch {fmt_bytes(per_node):>10}  p50 {pct(secs, 50):6.2f} s  "
            f"p99 {pct(secs, 99):6.2f} s  max {max(secs):6.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="2,4", help="comma-separated N values")
    ap.add_argument("--rate", default="100mbit", help="tc rate of the origin's link")
    ap.add_argument("--modes", default="direct,mirror,warm,proxy")
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
        for n in ns_values:
            for mode in modes:
                print(run_mode(fleet, mode, ref, work / f"{mode}-{n}", n, data_blobs),
                      flush=True)
    finally:
        if fleet is not None:
            fleet.close()
        stop_registry(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
