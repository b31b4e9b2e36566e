#!/usr/bin/env python3
"""How long `erofs-nydus mount` takes, and what it imports (fanotify mode, host kernel).

    python3 bench/mount_latency.py [--runs 5] [--no-ref] [--no-drop]

The debootstrap minbase rootfs is built into a local image (`create`), and (unless
--no-ref) packed as a one-layer OCI image, pushed to a real docker-registry on
127.0.0.1 and converted.  Median of N runs each, for the mount command alone
(the process from exec to exit; `umount` between runs is not counted):

  resident, local  : a daemon is up for the cache dir (`daemon --resident`); mount the
                     local bootstrap                         (target <= 0.10 s)
  resident, REF    : the same daemon; mount the REF whose bootstrap is not cached yet
                     (every file a REF mount added to the cache dir deleted between
                     runs)                                    (target <= 0.15 s)
  daemon start     : no daemon; `mount` starts it (and `umount` stops it), local
                     bootstrap, page cache warm               (target <= 0.40 s)
  start, dropped   : the same after `echo 3 > /proc/sys/vm/drop_caches` (unless
                     --no-drop: it slows everything else on the machine)

Besides wall time: the CPU seconds (user + sys) of the mount process and of the
daemon processes it started, and the modules the mount process imported (sys.modules
at exit): on a shared, loaded machine the counts are the figures to decide by.
The interpreter is `sys.executable` (not a shim script); site-packages `.pth` hooks of
the environment are part of every figure ("python -c pass" is printed as the floor).
Needs root and Linux >= 6.14 (fanotify pre-content); docker-registry, skopeo, umoci
for the REF case.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import ROOT, drop_caches, median, rootfs, run_rusage  # noqa: E402

CLI = [sys.executable, "-m", "erofs_nydus.cli"]
# the CLI as the console script runs it, writing its sys.modules at exit
HOOKED = [sys.executable, "-c", (
    "import atexit, json, os, sys\n"
    "atexit.register(lambda: json.dump(sorted(k for k, v in sys.modules.items() if v),"
    " open(os.environ['MODULES_OUT'], 'w')))\n"
    "from erofs_nydus.cli import run\nrun()\n")]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def sh(argv: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(argv)}\n"
                         f"{proc.stderr[-3000:]}")
    return proc


def timed(argv: list[str], modules_out: Path | None = None) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the process, modules imported) of one command."""
    env = dict(ENV)
    if modules_out is not None:
        env["MODULES_OUT"] = str(modules_out)
        argv = [*HOOKED, *argv[len(CLI):]]
    wall, cpu, _rss = run_rusage(argv, env=env)
    mods = len(json.loads(modules_out.read_text())) if modules_out is not None else 0
    return wall, cpu, mods


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + sys) a live process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_cpu(cache: Path) -> float:
    """CPU seconds of the supervisor and its worker for `cache` (found by pid)."""
    from erofs_nydus.service.client import DaemonClient

    c = DaemonClient(cache)
    pids = [p for p in (c.supervisor_pid(), c.request("ping")["pid"]) if p]
    return sum(proc_cpu(p) for p in pids)


def row(name: str, walls: list[float], cpus: list[float], mods: int, extra: str = "") -> None:
    print(f"  {name:<18}: {median(walls):6.3f} s wall  {median(cpus):6.3f} s CPU  "
          f"{mods:4d} modules{extra}   runs " + " ".join(f"{t:.3f}" for t in walls))


def bench(work: Path, args: argparse.Namespace, ref: str | None) -> None:
    boot, blobs = work / "img" / "boot", work / "img" / "blobs"
    blobs.mkdir(parents=True)
    sh([*CLI, "create", str(rootfs()), "-B", str(boot), "-D", str(blobs)])
    print(f"image: {rootfs().name}, bootstrap {boot.stat().st_size >> 10} KiB")
    floor = [timed([sys.executable, "-c", "pass"]) for _ in range(args.runs)]
    base = sh([sys.executable, "-c", "import sys; print(len(sys.modules))"]).stdout.strip()
    print(f"  python -c pass    : {median([f[0] for f in floor]):6.3f} s wall  "
          f"{median([f[1] for f in floor]):6.3f} s CPU  {int(base):4d} modules "
          "(the interpreter's own floor)")
    mnt = work / "mnt"
    mnt.mkdir()
    local = ["mount", str(boot), str(mnt), "--blob-dir", str(blobs)]

    # a resident daemon
    cache = work / "resident"
    log = open(work / "resident.log", "wb")  # noqa: SIM115 (closed below)
    daemon = subprocess.Popen([*CLI, "daemon", "--cache-dir", str(cache), "--resident"],
                              stdout=log, stderr=subprocess.STDOUT, env=ENV)
    try:
        from erofs_nydus.service.client import DaemonClient

        client = DaemonClient(cache)
        end = time.monotonic() + 60
        while not client.alive():
            if daemon.poll() is not None or time.monotonic() > end:
                raise SystemExit(f"resident daemon did not start: {work / 'resident.log'}")
            time.sleep(0.05)
        time.sleep(2)  # its background loading of the registry stack is done
        keep = {p.name for p in cache.iterdir()}
        walls, cpus, mods = [], [], 0
        for i in range(args.runs):
            w, c, mods = timed([*CLI, *local, "--cache-dir", str(cache)], work / f"m{i}.json")
            walls.append(w)
            cpus.append(c)
            sh([*CLI, "umount", str(mnt)])
        row("resident, local", walls, cpus, mods)
        if ref is not None:
            walls, cpus = [], []
            for i in range(args.runs):
                w, c, mods = timed([*CLI, "mount", ref, str(mnt), "--cache-dir", str(cache),
                                    "--plain-http"], work / f"r{i}.json")
                walls.append(w)
                cpus.append(c)
                sh([*CLI, "umount", str(mnt)])
                for p in cache.iterdir():  # the next run fetches the bootstrap again
                    if p.name not in keep and not p.name.startswith("daemon"):
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
            row("resident, REF", walls, cpus, mods, " (bootstrap not cached)")
    finally:
        daemon.terminate()
        daemon.wait(30)
        log.close()

    # `mount` starts the daemon
    for name, drop in (("daemon start", False), ("start, dropped", True)):
        if drop and args.no_drop:
            continue
        walls, cpus, dcpu = [], [], []
        for i in range(args.runs):
            cache = work / f"start{int(drop)}{i}"
            if drop:
                drop_caches()
            w, c, mods = timed([*CLI, *local, "--cache-dir", str(cache)], work / f"s{i}.json")
            walls.append(w)
            cpus.append(c)
            dcpu.append(daemon_cpu(cache))
            sh([*CLI, "umount", str(mnt)])
        row(name, walls, cpus, mods, f" (+ daemon {median(dcpu):.3f} s CPU by then)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--no-ref", action="store_true", help="skip the registry (REF) case")
    ap.add_argument("--no-drop", action="store_true", help="skip the dropped-cache case")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/mount_latency.py: run as root (mounts, fanotify)")
    # byte-compiled as an installed package is (PYTHONDONTWRITEBYTECODE would leave the
    # CLI compiling every module at every run)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "erofs_nydus")],
                   stdout=subprocess.DEVNULL, check=True)
    work = Path(tempfile.mkdtemp(prefix="bench-mount-"))
    print(f"median of {args.runs}; load average {os.getloadavg()[0]:.1f} at start")
    try:
        if args.no_ref:
            bench(work, args, None)
        else:
            from netns import convert_bench, push_rootfs, registry_nets

            with registry_nets(work, netns=False) as (server, _nets):
                src, _layer = push_rootfs(server, rootfs(), work / "oci", "bench/rootfs:v1")
                with open(os.devnull, "w") as quiet:
                    saved, sys.stdout = sys.stdout, quiet
                    try:
                        nydus = convert_bench(server, src, work, 1)
                    finally:
                        sys.stdout = saved
                bench(work, args, f"{server.host}/{nydus}")
    finally:
        subprocess.run(["umount", "-l", str(work / "mnt")], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
