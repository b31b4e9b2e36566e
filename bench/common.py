"""Helpers shared by the benchmark scripts: timing, medians, peak memory, the rootfs."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EROFS_NYDUS_CACHE", "/var/cache/erofs_nydus"))


def rootfs() -> Path:
    """The cached debootstrap --variant=minbase bookworm tree (built on first use)."""
    dest = CACHE / "rootfs" / "bookworm-minbase"
    if not dest.is_dir():
        subprocess.run([str(ROOT / "tools" / "debootstrap-rootfs")], check=True)
    return dest


def run_timed(argv: list[str] | str, *, shell: bool = False, env: dict[str, str] | None = None,
              before: Callable[[], None] | None = None) -> tuple[float, int]:
    """Run a command under /usr/bin/time; return (wall seconds, peak RSS KiB)."""
    if before:
        before()
    cmd = ["/usr/bin/time", "-f", "%M", *(["sh", "-c", argv] if shell else argv)]  # type: ignore[list-item]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=env, check=False)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed ({proc.returncode}): {argv}\n{proc.stderr[-2000:]}")
    rss = int(proc.stderr.strip().splitlines()[-1])
    return dt, rss


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def drop_caches() -> None:
    """Cold page cache, so every tool reads the source from disk alike."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
