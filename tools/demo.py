"""The main job behind tools/demo (see there)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "erofs_nydus.cli"]


def sh(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, **kw)  # type: ignore[call-overload]


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def main() -> None:
    if os.geteuid() != 0:
        sys.exit("tools/demo: run as root (mounting EROFS and fanotify need it)")
    if len(sys.argv) > 1:
        source = Path(sys.argv[1]).resolve()
        chroot = False
    else:
        print("== preparing a Debian bookworm minbase rootfs (debootstrap, cached)")
        source = Path(sh([str(ROOT / "tools" / "debootstrap-rootfs")],
                         stdout=subprocess.PIPE).stdout.strip().splitlines()[-1])
        chroot = True
    work = Path(tempfile.mkdtemp(prefix="erofs-nydus-demo-"))
    mnt = work / "rootfs"
    mnt.mkdir()
    try:
        t0 = time.perf_counter()
        out = sh([*CLI, "create", str(source), "-B", str(work / "image.boot"), "-D",
                  str(work / "blobs"), "-J", "-"], stdout=subprocess.PIPE).stdout
        t_build = time.perf_counter() - t0
        info = json.loads(out)
        blob_bytes = sum(b["blob_file_size"] for b in info["blobs"])
        image_bytes = sum(b["uncompressed_size"] for b in info["blobs"])
        print(f"== built {source}: {info['inodes']} inodes, bootstrap "
              f"{mib(info['bootstrap_size'])}, blob {mib(blob_bytes)} ({info['compressor']}) "
              f"holding {mib(image_bytes)} of data, in {t_build:.1f} s")
        t0 = time.perf_counter()
        sh([*CLI, "mount", str(work / "image.boot"), str(mnt), "--blob-dir",
            str(work / "blobs"), "--cache-dir", str(work / "cache")])
        t_mount = time.perf_counter() - t0
        print(f"== mounted lazily in {t_mount:.2f} s; nothing fetched yet")
        t0 = time.perf_counter()
        if chroot:
            cmds = ["/bin/ls /usr/bin | wc -l", "dpkg -l | tail -n +6 | wc -l",
                    "head -n 3 /etc/os-release"]
            for c in cmds:
                res = sh(["chroot", str(mnt), "/bin/sh", "-c", c], stdout=subprocess.PIPE)
                print(f"   chroot$ {c}\n   {res.stdout.strip().replace(chr(10), chr(10) + '   ')}")
        else:
            files = sh(["find", str(mnt), "-type", "f"], stdout=subprocess.PIPE).stdout.split()
            for f in files[:20]:
                Path(f).read_bytes()
            print(f"   read {min(20, len(files))} of {len(files)} files")
        t_run = time.perf_counter() - t0
        stats = json.loads(sh([*CLI, "mount-stats", str(mnt), "--json"],
                              stdout=subprocess.PIPE).stdout)
        present = sum(b["present"] for b in stats["blobs"].values())
        m = stats.get("metrics", {})
        print(f"== workload took {t_run:.2f} s")
        print(f"== fetched {mib(present)} of {mib(image_bytes)} "
              f"({present / image_bytes:.1%} of the image) into the cache; "
              f"backend reads: {m.get('backend_requests', '?')} requests, "
              f"{mib(m.get('bytes_fetched', 0))} compressed")
    finally:
        if mnt.is_mount():
            subprocess.run([*CLI, "umount", str(mnt)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
