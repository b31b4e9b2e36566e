"""Registries and networks for the cold-start benches (bench/coldstart.py, bench/prefetch.py).

* `registry_nets(work, ...)`: a real docker-registry on 127.0.0.1 and, unless disabled,
  a second registry process on the same storage inside a network namespace created here,
  reached from another namespace created here over a veth pair shaped with
  `tc ... tbf rate RATE` on both ends (netem with delay when rtt_ms > 0).  Yields the
  loopback server and the `Net`s to measure on; clients run in a `Net` through its
  `prefix` (nsenter into the client namespace), so the mount command and the daemon it
  starts, and skopeo, all see only the shaped link.
* `push_rootfs`: a directory tree as a one-layer OCI image (umoci) pushed with skopeo.
* `pull_run`: the pull-and-unpack baseline (`skopeo copy` + `umoci unpack` + workload).
* `manifest_sizes`: bytes of an image in the registry.
* `Keeper`: a daemon kept running for a cache dir (the "daemon already up" case).

Needs root, docker-registry, skopeo, umoci, iproute2 (ip, tc), curl.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import ROOT, drop_caches, installed_env, median, run_rusage
from layers_support import layer_paths, umoci_image
from registry_fixture import (
    REGISTRY_BIN,
    RegistryServer,
    skopeo_copy,
    start_registry,
    stop_registry,
)

SUBNET = "10.213.7"
CLI = [sys.executable, "-m", "erofs_nydus.cli"]


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
        """Bytes received by the client side so far (None: not measurable here)."""
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


@contextlib.contextmanager
def registry_nets(work: Path, *, rate: str = "100mbit", rtt_ms: float = 0.0,
                  netns: bool = True) -> Iterator[tuple[RegistryServer, list[Net]]]:
    """(loopback registry, [loopback Net, shaped Net unless not `netns`]); all stopped
    and the namespaces deleted on exit.  Both registries serve the same storage: push
    through the loopback one, measure on either."""
    server = start_registry(work / "registry")
    shaped: ShapedNet | None = None
    try:
        nets: list[Net] = [Net("loopback", server.host, [])]
        if netns:
            shaped = ShapedNet(server.storage, work, rate, rtt_ms)
            nets.append(shaped)
        yield server, nets
    finally:
        if shaped is not None:
            shaped.close()
        stop_registry(server)


def push_rootfs(server: RegistryServer, tree: Path, work: Path, repo_tag: str) -> tuple[str, Path]:
    """`tree` as a one-layer OCI image pushed to `server`: (reference, layer tar.gz path)."""

    def fill(r: Path) -> None:
        subprocess.run(["cp", "-a", f"{tree}/.", f"{r}/"], check=True)

    layout = umoci_image(work, [fill])
    ref = server.ref(repo_tag)
    skopeo_copy(f"oci:{layout}:latest", f"docker://{ref}")
    return ref, layer_paths(layout)[0]


def convert_bench(server: RegistryServer, src: str, work: Path, runs: int,
                  extra: tuple[str, ...] = (), target_repo: str = "bench/rootfs-nydus:v1",
                  baseline: Path | None = None) -> str:
    """`erofs-nydus convert` of `src` (layer cache emptied each run) vs `skopeo copy` of it
    to an OCI layout, interleaved run by run; medians of wall and CPU time (user + sys)
    and convert's peak RSS printed, with the ratios of the same run.  Convert runs with
    compiled bytecode, as installed (`installed_env`), after one untimed warm-up import.
    `baseline`: another checkout of the project whose convert runs interleaved too (an
    A/B under the same load).  Returns the converted image's repo:tag."""
    target = server.ref(target_repo)
    # each side imports its own checkout: run from `work`, not from a checkout's root
    sides: dict[str, dict[str, str]] = {
        "erofs-nydus convert": dict(installed_env(work), PYTHONPATH=str(ROOT))}
    if baseline is not None:
        sides[f"baseline ({baseline.name})"] = dict(installed_env(work),
                                                   PYTHONPATH=str(baseline.resolve()))
    for env in sides.values():
        subprocess.run([sys.executable, "-c",
                        "import erofs_nydus.cli, erofs_nydus.registry.convert"],
                       env=env, check=True, cwd=work)
    res: dict[str, list[tuple[float, float, int]]] = {k: [] for k in [*sides, "skopeo copy"]}
    digests: dict[str, set[str]] = {k: set() for k in sides}  # pushed manifest digests
    for i in range(runs):
        for name, env in sides.items():
            cache = work / f"conv-cache{i}"
            out = work / "convert-result.json"
            res[name].append(run_rusage(
                [*CLI, "convert", "--source", src, "--target", target, "--plain-http", "-q",
                 "--cache-dir", str(cache), "--output-json", str(out), *extra], env, cwd=work))
            digests[name].add(json.loads(out.read_text())["manifest_digest"])
            shutil.rmtree(cache)
        res["skopeo copy"].append(run_rusage(
            ["skopeo", "--insecure-policy", "copy", "-q", "--src-tls-verify=false",
             f"docker://{src}", f"oci:{work / f'copy{i}'}:v1"]))
        shutil.rmtree(work / f"copy{i}")

    def med(name: str, k: int) -> float:
        return median([x[k] for x in res[name]])

    print(f"(a) conversion, median of {runs} (wall / CPU user+sys; load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs):")
    for name in res:
        rss = f"   peak RSS {max(x[2] for x in res[name]) / 1024:.0f} MiB" \
            if name != "skopeo copy" else ""
        ratio = "" if name == "skopeo copy" else (
            f"   {med(name, 0) / med('skopeo copy', 0):.2f}x wall, "
            f"{med(name, 1) / med('skopeo copy', 1):.2f}x CPU of skopeo")
        print(f"    {name:22s}: {med(name, 0):6.2f} s / {med(name, 1):5.2f} s   runs "
              + " ".join(f"{x[0]:.2f}" for x in res[name]) + ratio + rss)
    for name, got in digests.items():
        print(f"    manifest pushed by {name}: {', '.join(sorted(got))}")
    if len(sides) > 1:
        same = len(set().union(*digests.values())) == 1
        print(f"    manifests {'identical' if same else 'DIFFER'} across the sides and runs")
    return target_repo


def daemon_bytes(cache: Path) -> int:
    st = json.loads(sh([*CLI, "mount-stats", "--cache-dir", str(cache), "--json"]).stdout)
    return int(st["metrics"]["bytes_fetched"])


class Keeper:
    """A resident daemon for `cache` (`erofs-nydus daemon --resident`), as on a node
    whose snapshotter daemon is always up.  `evict()` deletes everything a REF mount
    added to the cache dir, so the next run starts with cold data again."""

    def __init__(self, net: Net, work: Path) -> None:
        from erofs_nydus.service.client import DaemonClient

        self.work, self.cache = work, work / "cache"
        work.mkdir(parents=True)
        self.log = open(work / "daemon.log", "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [*net.prefix, *CLI, "daemon", "--cache-dir", str(self.cache), "--resident"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        client = DaemonClient(self.cache)
        deadline = time.monotonic() + 30
        while not client.alive():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"resident daemon did not start; see {work / 'daemon.log'}")
            time.sleep(0.05)
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
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: a resident daemon stops cleanly
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.work, ignore_errors=True)


def manifest_sizes(server: RegistryServer, repo_tag: str) -> tuple[int, int]:
    """(sum of all layer sizes + config + manifest, size of the last layer) of an image."""
    import httpx

    repo, tag = repo_tag.split(":")
    r = httpx.get(f"{server.url}/v2/{repo}/manifests/{tag}", headers={"Accept": ", ".join([
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json"])})
    r.raise_for_status()
    m = r.json()
    layers = [int(x["size"]) for x in m["layers"]]
    return sum(layers) + int(m["config"]["size"]) + len(r.content), layers[-1]


def pull_run(net: Net, ref: str, work: Path, image_bytes: int,
             workload: str) -> tuple[float, int, float]:
    """`skopeo copy` + `umoci unpack` + `chroot ROOTFS sh -c WORKLOAD`, page cache dropped
    first: (seconds, bytes fetched, seconds of the workload alone).  Bytes: the veth
    counters where the net has them, else `image_bytes`."""
    layout, bundle = work / "oci", work / "bundle"
    work.mkdir(parents=True)
    drop_caches()
    rx0 = net.rx_bytes()
    t0 = time.perf_counter()
    sh([*net.prefix, "skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
        f"docker://{ref}", f"oci:{layout}:v1"])
    sh(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)])
    t1 = time.perf_counter()
    sh(["chroot", str(bundle / "rootfs"), "/bin/sh", "-c", workload])
    t2 = time.perf_counter()
    rx1 = net.rx_bytes()
    fetched = rx1 - rx0 if rx0 is not None and rx1 is not None else image_bytes
    shutil.rmtree(work)
    return t2 - t0, fetched, t2 - t1
