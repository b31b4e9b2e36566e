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


def run_rusage(argv: list[str], env: dict[str, str] | None = None,
               cwd: Path | None = None) -> tuple[float, float, int]:
    """Run a command; return (wall seconds, CPU seconds (user + sys), peak RSS KiB).
    CPU time is the steadier figure on a shared machine: others' load stretches the
    wall time, hardly the CPU time."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            cwd=cwd)
    _, status, ru = os.wait4(proc.pid, 0)
    dt = time.perf_counter() - t0
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"benchmark command failed ({proc.returncode}): {argv}\n{err[-2000:]}")
    return dt, ru.ru_utime + ru.ru_stime, ru.ru_maxrss


def installed_env(work: Path) -> dict[str, str]:
    """The environment for timing our programs as an installed package runs them: with
    compiled bytecode (pip writes it at install time).  A session that sets
    PYTHONDONTWRITEBYTECODE would otherwise make every run compile every module again
    (about 0.1 s of CPU for the convert path); the bytecode goes under `work`."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


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


def supervisor_pid(cache_dir: Path) -> int:
    """The pid the cache dir's supervisor wrote into its flock'ed `daemon.lock`."""
    text = (Path(cache_dir) / "daemon.lock").read_text().split()
    if not text or not text[0].isdigit():
        sys.exit(f"no daemon pid in {cache_dir}/daemon.lock")
    return int(text[0])


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (by parent pid, from /proc/<pid>/stat)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def memory_of(pids: list[int]) -> dict[int, tuple[int, int]]:
    """pid -> (RSS bytes, PSS bytes).  PSS splits pages shared after fork between the
    processes, so the PSS column sums to what the processes cost together."""
    out = {}
    for pid in pids:
        rss = pss = 0
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
        except OSError:
            continue
        out[pid] = (rss, pss)
    return out


def daemon_memory(cache_dir: Path) -> tuple[int, dict[int, tuple[int, int]]]:
    """(PSS total, per-process (RSS, PSS)) of the daemon serving `cache_dir`, found by
    the pid in its lock file and its process tree, never by a name pattern."""
    per = memory_of(process_tree(supervisor_pid(cache_dir)))
    if not per:
        sys.exit(f"daemon of {cache_dir} not found")
    return sum(p for _, p in per.values()), per
