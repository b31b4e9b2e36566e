#!/usr/bin/env python3
"""fscache mode benchmark, side by side in one VM boot (QEMU TCG, vm/run).

    python3 bench/fscache.py [--source DIR] [--json FILE]

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
Warm and materialized passes alternate (3 each) with both mounted; the best of each
is compared.

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


def _read_all(mp: str) -> float:
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
    t0 = time.monotonic()
    subprocess.run(
        ["sh", "-c", f"cd {mp} && find . -type f -print0 | xargs -0 -r cat > /dev/null"],
        check=True,
    )
    return time.monotonic() - t0


def guest(spec: dict[str, Any], passes: int = 3) -> dict[str, Any]:
    from erofs_nydus.fscache.client import FscacheClient, mount_fscache
    from erofs_nydus.mount import mounted, umount

    scratch = os.environ["SCRATCH"]
    cache, mp = f"{scratch}/bench-cache", "/run/bench-mnt"
    os.makedirs(mp, exist_ok=True)
    backend = {"type": "local", "dir": spec["blob_dir"]}
    client = FscacheClient(cache)
    out: dict[str, Any] = {}

    t0 = time.monotonic()
    mount_fscache(spec["bootstrap"], mp, cache, backend)
    out["mount_s"] = round(time.monotonic() - t0, 2)
    st0 = client.request("status")["fscache"]
    out["cold_s"] = round(_read_all(mp), 2)
    st1 = client.request("status")
    out["cold_requests"] = {k: st1["fscache"][k] - st0[k] for k in ("open", "read")}
    out["cold_bytes_fetched"] = st1["metrics"]["bytes_fetched"]
    umount(mp)
    client.request("detach", mountpoint=mp)

    print(f"partial: {json.dumps(out)}", file=sys.stderr, flush=True)
    # file-backed EROFS needs page-cache-backed files: copy both to the scratch ext4
    data, boot = f"{scratch}/materialized.blob.data", f"{scratch}/image.boot"
    t0 = time.monotonic()
    shutil.copyfile(spec["materialized"], data)
    shutil.copyfile(spec["bootstrap"], boot)
    os.sync()
    out["copy_materialized_s"] = round(time.monotonic() - t0, 2)

    # warm fscache and materialized side by side, passes interleaved (TCG timing is noisy)
    mp_mat = "/run/bench-mat"
    os.makedirs(mp_mat, exist_ok=True)
    mount_fscache(spec["bootstrap"], mp, cache, backend)
    st0 = client.request("status")["fscache"]
    warm: list[float] = []
    mat: list[float] = []
    with mounted(boot, mp_mat, [data]):
        for _ in range(passes):
            warm.append(_read_all(mp))
            mat.append(_read_all(mp_mat))
    st1 = client.request("status")["fscache"]
    out["warm_s"] = [round(w, 2) for w in warm]
    out["materialized_s"] = [round(m, 2) for m in mat]
    out["warm_requests"] = {k: st1[k] - st0[k] for k in ("open", "read")}
    umount(mp)
    client.request("detach", mountpoint=mp)
    client.shutdown()
    best_warm, best_mat = min(warm), min(mat)
    out["warm_over_materialized"] = round(best_warm / best_mat, 3)
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
    print(f"warm fscache / materialized = {ratio:.3f} (target <= 1.10); "
          f"cold / materialized = {result['cold_over_materialized']:.2f}; "
          f"warm READs reaching the daemon: {result['warm_requests']['read']}")


if __name__ == "__main__":
    main()
