"""Shell-level scenarios run unchanged in both modes (issue 11 item 8): fanotify on the
host (`test_shell_modes.py`), fscache in the QEMU VM (`fscache_guest.group_shell`).

Both modes run in one process shell (`erofs_nydus.service.shell`); these scenarios hold
it shut against drift: each returns plain data, and `check` asserts the same about it
whatever the mode.  Only the standard library and erofs_nydus here (the VM guest imports
this file from the read-only host tree).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CLI = [sys.executable, "-c", "from erofs_nydus.cli import run; run()"]
FILES = 8
FILE_SIZE = 192 << 10
#: the read deadline the scenarios' daemon runs with (a stuck worker is replaced soon)
DEADLINE = "4"


def make_tree(root: Path) -> None:
    """FILES files of random bytes, each in its own chunk range."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(11)
    for i in range(FILES):
        (root / f"f{i}").write_bytes(rng.randbytes(FILE_SIZE))


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _read(mp: str, src: str, name: str) -> Any:
    """True for the image's bytes, "WRONG" for others, the errno name on failure."""
    try:
        return _digest(os.path.join(mp, name)) == _digest(os.path.join(src, name)) or "WRONG"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, "?")


def _client(cache: str) -> Any:
    from erofs_nydus.service.client import DaemonClient

    return DaemonClient(cache)


def _wait(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _oom_adj(pid: int) -> int:
    with open(f"/proc/{pid}/oom_score_adj") as f:
        return int(f.read())


def _nofile(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    return -1


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EROFS_NYDUS_READ_DEADLINE": DEADLINE}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300,
                          env=env, check=False)


# -- scenarios -----------------------------------------------------------------------------


def process_settings(cache: str) -> dict[str, Any]:
    c = _client(cache)
    sup = c.supervisor_pid()
    worker = c.request("ping")["pid"]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    can_lower = subprocess.run(["sh", "-c", "echo -1000 > /proc/self/oom_score_adj"],
                               capture_output=True, check=False).returncode == 0
    return {"supervisor_oom": _oom_adj(sup) if can_lower else -1000,  # not allowed here
            "worker_oom": _oom_adj(worker),
            "worker_is_child": _ppid(worker) == sup,
            "nofile_raised": _nofile(sup) >= want and _nofile(worker) >= want}


def control_line_bound(cache: str) -> dict[str, Any]:
    """A control line over 1 MiB: refused with a reason, the same worker serves on."""
    c = _client(cache)
    pid = c.request("ping")["pid"]
    line = b'{"op": "ping", "pad": "' + b"x" * (2 << 20) + b'"}\n'
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(c.paths.socket)
        s.settimeout(60)

        def send() -> None:
            with contextlib.suppress(OSError):  # the daemon drops the connection
                s.sendall(line)

        t = threading.Thread(target=send)
        t.start()
        buf = b""
        while not buf.endswith(b"\n"):
            part = s.recv(65536)
            if not part:
                break
            buf += part
        t.join(60)
    reply = json.loads(buf) if buf else {}
    return {"refused": reply.get("ok") is False and "longer than 1048576" in reply.get("error", ""),
            "same_worker": c.request("ping")["pid"] == pid}


def resolve_register(cache: str, ref: str, mode: str, mp: str) -> dict[str, Any]:
    """`resolve` an image reference through the daemon, register what it answers."""
    c = _client(cache)
    remote = c.request("resolve", ref=ref, plain_http=True, deadline=30)
    boot = str(remote["bootstrap"])
    os.makedirs(mp, exist_ok=True)
    info = c.request("register", mode=mode, bootstrap=boot, backend=remote["backend"],
                     mountpoint=mp)
    registered = mp in c.request("ping")["mounts"]
    c.request("detach", mountpoint=mp)
    return {"bootstrap_in_cache": os.path.dirname(boot) == os.path.abspath(cache)
            and os.path.isfile(boot),
            "blobs": len(remote["blob_ids"]), "fsid": bool(info.get("fsid")),
            "registered": registered, "detached": mp not in c.request("ping")["mounts"]}


def sigterm_refused(cache: str, mp: str, src: str) -> dict[str, Any]:
    c = _client(cache)
    sup = c.supervisor_pid()
    log = Path(c.paths.log)
    refused = "not stopping: 1 mounts live; umount first"
    before = log.read_text(errors="replace").count(refused)
    os.kill(sup, signal.SIGTERM)
    logged = _wait(lambda: log.read_text(errors="replace").count(refused) > before, 30)
    return {"refused_logged": logged, "supervisor_alive": c.supervisor_pid() == sup
            and c.supervisor_running(), "read": _read(mp, src, "f1")}


def stuck_worker_replaced(cache: str, mp: str, src: str) -> dict[str, Any]:
    """SIGSTOP the worker, then read a file never read: after the read deadline the
    worker is replaced; the reader gets the image's bytes or EIO, and is not left blocked."""
    c = _client(cache)
    stopped = c.request("ping")["pid"]
    os.kill(stopped, signal.SIGSTOP)
    got: dict[str, Any] = {}
    t = threading.Thread(target=lambda: got.update(r=_read(mp, src, "f2")))
    t.start()
    t.join(90)
    blocked = t.is_alive()
    replaced = _wait(lambda: c.alive() and c.request("ping", timeout=10)["pid"] != stopped, 60)
    with contextlib.suppress(ProcessLookupError):
        os.kill(stopped, signal.SIGKILL)
    return {"read": got.get("r"), "blocked": blocked, "replaced": replaced,
            "after": _read(mp, src, "f3")}


def run_all(mode: str, boot: str, blob_dir: str, src: str, ref: str, work: str) -> dict[str, Any]:
    """Every scenario in order against one daemon serving one mount at `work`/mnt."""
    cache = os.path.join(work, "cache")
    mp = os.path.join(work, "mnt")
    os.makedirs(mp, exist_ok=True)
    out: dict[str, Any] = {}
    r = cli("mount", boot, mp, "--blob-dir", blob_dir, "--cache-dir", cache, "--mode", mode,
            "--amplify", "0")
    out["mount"] = {"rc": r.returncode, "err": r.stderr[-2000:]}
    if r.returncode:
        return out
    try:
        out["first_read"] = _read(mp, src, "f0")
        out["settings"] = process_settings(cache)
        out["control_line"] = control_line_bound(cache)
        out["resolve"] = resolve_register(cache, ref, mode, os.path.join(work, "mnt-ref"))
        out["sigterm"] = sigterm_refused(cache, mp, src)
        out["stuck"] = stuck_worker_replaced(cache, mp, src)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        r = cli("umount", mp, "--cache-dir", cache)
        out["umount"] = {"rc": r.returncode, "out": r.stdout + r.stderr}
        out["stopped"] = _wait(lambda: not _client(cache).supervisor_running(), 30)
    return out


def check(r: dict[str, Any]) -> None:
    """What both modes must show (the test's assertions, shared)."""
    assert r["mount"]["rc"] == 0, r["mount"]
    assert "error" not in r, r.get("error")
    assert r["first_read"] is True
    s = r["settings"]
    assert s == {"supervisor_oom": -1000, "worker_oom": 0, "worker_is_child": True,
                 "nofile_raised": True}, s
    assert r["control_line"] == {"refused": True, "same_worker": True}, r["control_line"]
    res = r["resolve"]
    assert res["bootstrap_in_cache"] and res["blobs"] >= 1 and res["fsid"], res
    assert res["registered"] and res["detached"], res
    assert r["sigterm"] == {"refused_logged": True, "supervisor_alive": True,
                            "read": True}, r["sigterm"]
    st = r["stuck"]
    assert st["read"] in (True, "EIO") and not st["blocked"] and st["replaced"], st
    assert st["after"] is True, st
    assert r["umount"]["rc"] == 0 and "daemon stopped" in r["umount"]["out"], r["umount"]
    assert r["stopped"] is True
