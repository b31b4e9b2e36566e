#!/usr/bin/env python3
"""fscache mode benchmark, side by side in one VM boot (QEMU TCG, vm/run).

    python3 bench/fscache.py [--source DIR] [--json FILE] [--no-buffered-cache]
                             [--delalloc] [--read-ahead-kb KIB]

Builds an image of SOURCE (default: the cached debootstrap rootfs) on the host, with
its blob also materialized (the whole uncompressed address space), then boots the VM
once and, with the page cache dropped before each pass, reads every file
(`find -type f | xargs cat`):

(a) cold: a fresh `erofs-nydus mount --mode fscache` (empty caches): every miss is a
    cachefiles READ served by the daemon (fill + verify + copy into the anon fd);
(b) warm: umount, remount the same image: the kernel's cachefiles objects are complete,
    so no READ may reach the daemon (its request counters are reported);
(c) materialized: the same bootstrap mounted file-backed from the materialized blob
    copied to the same scratch disk (no daemon at all).
The kinds of pass rotate (3 rounds) with both images mounted; the best of each is
compared.  Each pass also reports the scratch disk's read I/Os and KiB, and each mount
its bdi (/sys/class/bdi/erofs-<n>) and read_ahead_kb.

cachefiles reads its backing files with O_DIRECT: a warm pass costs one disk read per
file, where the materialized blob gets page-cache readahead across files.  By default
the scratch ext4 is remounted `nodelalloc` (the setup the fast path needs) and the
image mounted with the default settings: the buffered cache is then in effect (cachefiles
dir `chattr +j`), so ext4 serves those reads from the page cache (and the mount gets a
2048 KiB bdi readahead).  --no-buffered-cache mounts with it turned off (O_DIRECT);
--delalloc leaves the scratch ext4 as mounted (delalloc: the default cannot apply).
--read-ahead-kb N adds warm passes (`warm_ra`) with the mount's bdi readahead switched
to N KiB through sysfs.

Reports seconds per pass and the ratios warm/materialized (target <= 1.10) and
cold/materialized.  Numbers are TCG numbers: only the ratios mean something.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _disk_stat() -> tuple[int, int]:
    """(read I/Os, sectors read) of the scratch disk (vda) so far."""
    try:
        with open("/sys/block/vda/stat", encoding="ascii") as f:
            fields = f.read().split()
        return int(fields[0]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return 0, 0


def _read_all(mp: str, disk: list[dict[str, int]] | None = None) -> float:
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
    ios0, sec0 = _disk_stat()
    t0 = time.monotonic()
    subprocess.run(
        ["sh", "-c", f"cd {mp} && find . -type f -print0 | xargs -0 -r cat > /dev/null"],
        check=True,
    )
    dt = time.monotonic() - t0
    if disk is not None:
        ios1, sec1 = _disk_stat()
        disk.append({"ios": ios1 - ios0, "kib": (sec1 - sec0) // 2})
    return dt


def _new_bdi(before: set[str]) -> str | None:
    """The bdi (``erofs-<n>``) a mount created: the one new since ``before``."""
    from erofs_nydus.service.fscache_client import erofs_bdis

    new = sorted(erofs_bdis() - before)
    return new[0] if len(new) == 1 else None


def _bdi_path(bdi: str) -> str:
    return f"/sys/class/bdi/{bdi}/read_ahead_kb"


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _mount_evidence(mp: str, bdi: str | None) -> dict[str, Any]:
    """The mount's anon dev (what stat/mountinfo show) vs its bdi and its readahead."""
    dev = os.stat(mp).st_dev
    majmin = f"{os.major(dev)}:{os.minor(dev)}"
    return {"dev": majmin, "bdi_by_dev_exists": os.path.exists(f"/sys/class/bdi/{majmin}"),
            "bdi": bdi, "read_ahead_kb": _read_int(_bdi_path(bdi)) if bdi else None}


def _journal_flagged(root: str) -> list[int]:
    """[regular files, of which FS_JOURNAL_DATA_FL] under ``root`` (cachefiles' files)."""
    import fcntl
    import struct

    from erofs_nydus.service.fscache_client import FS_JOURNAL_DATA_FL

    counts = [0, 0]
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                buf = bytearray(struct.calcsize("l"))
                fcntl.ioctl(fd, 0x80086601, buf)  # FS_IOC_GETFLAGS
            finally:
                os.close(fd)
            counts[0] += 1
            counts[1] += bool(struct.unpack("l", buf)[0] & FS_JOURNAL_DATA_FL)
    return counts


def guest(spec: dict[str, Any], passes: int = 3) -> dict[str, Any]:
    from erofs_nydus.mount import mounted, umount
    from erofs_nydus.service.fscache_client import FscacheClient, erofs_bdis, mount_fscache
    from erofs_nydus.service.fscache_daemon import kernel_cache_dir

    scratch = os.environ["SCRATCH"]
    cache, mp = f"{scratch}/bench-cache", "/run/bench-mnt"
    os.makedirs(mp, exist_ok=True)
    backend = {"type": "local", "dir": spec["blob_dir"]}
    client = FscacheClient(cache)
    # None: the default (on where the filesystem allows), False: turned off
    buffered = None if spec.get("buffered_cache", True) else False
    ra_kb = int(spec.get("read_ahead_kb") or 0)
    if spec.get("nodelalloc", True):
        subprocess.run(["mount", "-o", "remount,nodelalloc", scratch], check=True)
    with open("/proc/mounts", encoding="utf-8") as f:
        opts = [ln.split()[3] for ln in f if ln.split()[1] == scratch]
    out: dict[str, Any] = {
        "vda_read_ahead_kb": _read_int("/sys/block/vda/queue/read_ahead_kb"),
        "scratch_options": opts[-1] if opts else None,
    }

    before = erofs_bdis()
    t0 = time.monotonic()
    info = mount_fscache(spec["bootstrap"], mp, cache, backend, buffered_cache=buffered)
    out["mount_s"] = round(time.monotonic() - t0, 2)
    out["buffered_cache"] = info["buffered_cache"]
    out["cold_mount"] = _mount_evidence(mp, _new_bdi(before))
    st0 = client.request("status")["fscache"]
    disk: list[dict[str, int]] = []
    out["cold_s"] = round(_read_all(mp, disk), 2)
    out["cold_disk"] = disk[0]
    st1 = client.request("status")
    out["cold_requests"] = {k: st1["fscache"][k] - st0[k] for k in ("open", "read")}
    out["cold_bytes_fetched"] = st1["metrics"]["bytes_fetched"]
    umount(mp)
    client.request("detach", mountpoint=mp)
    out["cache_files_journaled"] = _journal_flagged(kernel_cache_dir(cache))

    print(f"partial: {json.dumps(out)}", file=sys.stderr, flush=True)
    # file-backed EROFS needs page-cache-backed files: copy both to the scratch ext4
    data, boot = f"{scratch}/materialized.blob.data", f"{scratch}/image.boot"
    t0 = time.monotonic()
    shutil.copyfile(spec["materialized"], data)
    shutil.copyfile(spec["bootstrap"], boot)
    os.sync()
    out["copy_materialized_s"] = round(time.monotonic() - t0, 2)

    # warm fscache and materialized side by side, passes interleaved (TCG timing is
    # noisy); with --read-ahead-kb also warm fscache at that bdi readahead, switched
    # through sysfs (a file takes its readahead from the bdi when opened)
    mp_mat = "/run/bench-mat"
    os.makedirs(mp_mat, exist_ok=True)
    before = erofs_bdis()
    mount_fscache(spec["bootstrap"], mp, cache, backend, buffered_cache=buffered)
    bdi = _new_bdi(before)
    out["warm_mount"] = _mount_evidence(mp, bdi)
    default_kb = out["warm_mount"]["read_ahead_kb"]
    st0 = client.request("status")["fscache"]
    series: dict[str, list[float]] = {"warm": [], "materialized": []}
    if ra_kb and bdi is not None and default_kb is not None:
        series["warm_ra"] = []
    disks: dict[str, list[dict[str, int]]] = {k: [] for k in series}
    before = erofs_bdis()
    with mounted(boot, mp_mat, [data]):
        out["materialized_mount"] = _mount_evidence(mp_mat, _new_bdi(before))
        for i in range(passes):
            order = list(series)
            order = order[i % len(order):] + order[:i % len(order)]
            for name in order:
                if "warm_ra" in series and name.startswith("warm"):
                    with open(_bdi_path(str(bdi)), "w", encoding="ascii") as f:
                        f.write(f"{ra_kb if name == 'warm_ra' else default_kb}\n")
                path = mp_mat if name == "materialized" else mp
                series[name].append(_read_all(path, disks[name]))
            print(f"pass {i}: {json.dumps({k: round(v[-1], 2) for k, v in series.items()})}",
                  file=sys.stderr, flush=True)
    st1 = client.request("status")["fscache"]
    for name, times in series.items():
        out[f"{name}_s"] = [round(t, 2) for t in times]
        out[f"{name}_disk"] = disks[name]
    out["warm_requests"] = {k: st1[k] - st0[k] for k in ("open", "read")}
    umount(mp)
    client.request("detach", mountpoint=mp)
    client.shutdown()
    best_mat = min(series["materialized"])
    out["warm_over_materialized"] = round(min(series["warm"]) / best_mat, 3)
    if "warm_ra" in series:
        out["warm_ra_kb"] = ra_kb
        out["warm_ra_over_materialized"] = round(min(series["warm_ra"]) / best_mat, 3)
    out["cold_over_materialized"] = round(out["cold_s"] / best_mat, 2)
    return out


def host(args: argparse.Namespace) -> dict[str, Any]:
    from erofs_nydus.builder.create import BuildOptions, create_image

    src = Path(args.source) if args.source else None
    if src is None:
        sys.path.insert(0, str(ROOT / "bench"))
        from common import rootfs

        src = rootfs()
    work = Path(tempfile.mkdtemp(prefix="bench-fscache-"))
    try:
        t0 = time.monotonic()
        res = create_image(str(src), str(work / "image.boot"), str(work / "blobs"),
                           BuildOptions(blob_cache_dir=str(work / "mat")))
        (blob,) = res.blobs
        spec = {
            "buffered_cache": not args.no_buffered_cache,
            "nodelalloc": not args.delalloc,
            "read_ahead_kb": args.read_ahead_kb,
            "bootstrap": str(work / "image.boot"),
            "blob_dir": str(work / "blobs"),
            "materialized": str(work / "mat" / f"{blob.blob_id}.blob.data"),
        }
        info = {"source": str(src), "build_s": round(time.monotonic() - t0, 1),
                "blob_uncompressed": blob.uncompressed_size,
                "blob_compressed": blob.compressed_size, "chunks": blob.chunk_count}
        t0 = time.monotonic()
        proc = subprocess.run(
            [str(ROOT / "vm" / "run"), "--timeout", str(args.timeout), "--scratch-size", "4G",
             "--", sys.executable, str(Path(__file__).resolve()), "--guest",
             json.dumps(spec)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, check=False,
        )  # fmt: skip
        info["vm_wall_s"] = round(time.monotonic() - t0, 1)
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith("BENCH-RESULT "):
                return {**info, **json.loads(line[len("BENCH-RESULT "):])}
        raise SystemExit(f"no result from the VM (rc {proc.returncode}):\n{proc.stdout[-4000:]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", help="directory to build the image from (default: rootfs)")
    ap.add_argument("--timeout", type=int, default=1500)
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--no-buffered-cache", action="store_true",
                    help="mount with the buffered cache turned off (O_DIRECT warm reads)")
    ap.add_argument("--delalloc", action="store_true",
                    help="leave the scratch ext4 delalloc (where the default cannot apply)")
    ap.add_argument("--read-ahead-kb", type=int, default=0,
                    help="also measure warm passes with this bdi readahead (KiB)")
    ap.add_argument("--guest", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.guest:
        print("BENCH-RESULT " + json.dumps(guest(json.loads(args.guest))), flush=True)
        return
    result = host(args)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    ratio = result["warm_over_materialized"]
    extra = (f" ({result['warm_ra_over_materialized']:.3f} at read_ahead_kb "
             f"{result['warm_ra_kb']})" if "warm_ra_kb" in result else "")
    print(f"warm fscache / materialized = {ratio:.3f}{extra} (target <= 1.10; "
          f"buffered cache: {result['buffered_cache']}); "
          f"cold / materialized = {result['cold_over_materialized']:.2f}; "
          f"warm READs reaching the daemon: {result['warm_requests']['read']}")


if __name__ == "__main__":
    main()
