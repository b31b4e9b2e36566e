"""Inside the fscache VM: the real containerd + nydus-snapshotter stack with
``fs_driver = "fscache"`` and our ``nydusd singleton --fscache`` (issue 13).

The host builds and converts the image into a docker-registry's storage (under /tmp, which
the guest sees through its /tmp overlay); :func:`fscache_stack` serves that storage with a
docker-registry on the guest's loopback, starts containerd (Debian 12) and
containerd-nydus-grpc (0.13.4) on the scratch disk (cachefiles refuses tmpfs), pulls through
CRI ``PullImage``, reads files in a container of the image, removes the image and reports
what is left.  Only the standard library, grpcio (cri_client) and this tree are imported.

A container is run with ``ctr run`` when the guest kernel can host runc (cgroups and the
UTS/IPC/PID/network namespaces).  The VM kernel (vm/kernel.config) has neither: then the
container is created with ``ctr containers create`` (containerd asks the snapshotter to
prepare its rootfs, which is where the fscache mount happens), its rootfs is mounted with
the mounts containerd would hand runc (``ctr snapshots mounts``), and the image's own
programs run in it under ``chroot``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from containerd_support import Stack
from cri_client import CRIImages

REGISTRY_BIN = "/usr/bin/docker-registry"


def runc_blocker() -> str | None:
    """What this kernel lacks for runc (None if nothing): cgroups, namespaces."""
    missing = []
    if not os.path.exists("/proc/self/cgroup"):
        missing.append("cgroups (CONFIG_CGROUPS: no /proc/self/cgroup)")
    for ns in ("uts", "ipc", "pid", "net"):
        if not os.path.exists(f"/proc/self/ns/{ns}"):
            missing.append(f"{ns} namespaces (CONFIG_NAMESPACES: no /proc/self/ns/{ns})")
    return "; ".join(missing) or None


def _wait(cond: Callable[[], object], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.3)
    return False


def _registry_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _erofs_mounts(base: Path) -> list[dict[str, str]]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            r = line.split()
            sep = r.index("-")
            if r[sep + 1] == "erofs" and r[4].startswith(str(base)):
                out.append({"mountpoint": r[4], "options": r[sep + 3]})
    return out


def _files_under(d: Path) -> list[str]:
    if not d.exists():
        return []
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if not p.is_dir())


def _mount_rootfs(stack: Stack, ref: str, name: str, out: dict[str, Any]) -> Path:
    """A container of `ref` created by containerd (the snapshotter prepares its rootfs),
    with that rootfs mounted the way containerd hands it to runc."""
    stack.ctr("containers", "create", "--snapshotter", "nydus", ref, name, timeout=600)
    rootfs = stack.base / f"rootfs-{name}"
    rootfs.mkdir(exist_ok=True)
    mount_cmd = stack.ctr("snapshots", "--snapshotter", "nydus", "mounts", str(rootfs),
                          name).stdout.strip()
    out.setdefault("rootfs_mounts", []).append(mount_cmd)
    subprocess.run(["sh", "-c", mount_cmd], check=True, capture_output=True, timeout=120)
    return rootfs


def _chroot(rootfs: Path, *cmd: str) -> str:
    return subprocess.run(["chroot", str(rootfs), *cmd], check=True, capture_output=True,
                          text=True, timeout=600).stdout


def _drop_rootfs(stack: Stack, name: str) -> None:
    subprocess.run(["umount", str(stack.base / f"rootfs-{name}")], check=False,
                   capture_output=True)
    stack.ctr("containers", "rm", name, check=False)


def _in_container(stack: Stack, ref: str, name: str, cmds: list[list[str]],
                  out: dict[str, Any]) -> list[str]:
    """Each command's output, run in a new container of `ref` (see the module doc)."""
    why = runc_blocker()
    out["runc_blocker"] = why
    if why is None:
        return [stack.run(ref, f"{name}-{i}", *cmd, timeout=600) for i, cmd in enumerate(cmds)]
    # what `ctr run` says on this kernel, for the record
    p = stack.ctr("run", "--rm", "--snapshotter", "nydus", ref, f"{name}-run", *cmds[0],
                  timeout=600, check=False)
    out["ctr_run"] = [p.returncode, (p.stdout + p.stderr)[-1000:]]
    stack.ctr("containers", "rm", f"{name}-run", check=False)
    rootfs = _mount_rootfs(stack, ref, name, out)
    try:
        return [_chroot(rootfs, *cmd) for cmd in cmds]
    finally:
        _drop_rootfs(stack, name)


MIB = 1 << 20


def _nydusd_running(stack: Stack) -> bool:
    """nydusd answers GET /api/v1/daemon on its API socket with state RUNNING."""
    for sock_path in stack.snap_root.glob("socket/*/api.sock"):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(str(sock_path))
                s.sendall(b"GET /api/v1/daemon HTTP/1.1\r\nHost: nydusd\r\n"
                          b"Connection: close\r\n\r\n")
                resp = b""
                while chunk := s.recv(65536):
                    resp += chunk
        except OSError:
            continue
        if b"RUNNING" in resp:
            return True
    return False


def _recovered(stack: Stack, n: int) -> bool:
    """The snapshotter's n-th restart of nydusd is over: nydusd runs and the entry was
    PUT and mounted again (or that mount found the old superblock still there: EBUSY,
    which the snapshotter takes for "mounted")."""
    parts = stack.log("snapshotter").read_text(errors="replace").split("Restart daemon")
    if len(parts) <= n or not _nydusd_running(stack):
        return False
    after = parts[n]
    return "Mount erofs to" in after and (
        "has been mounted" in after or "Failed to mount rafs instance" in after
        or bool(_erofs_mounts(stack.base)))


def _kill9_with_live_container(stack: Stack, ref: str, out: dict[str, Any]) -> None:
    """kill -9 of nydusd while a container's rootfs is mounted: the container reads a file
    it never touched (the fscache daemon serves the kernel, not nydusd), the snapshotter's
    restart policy starts nydusd again (its recovery unmounts the image's erofs mount,
    which the overlay keeps alive, and mounting again finds it busy) and the container
    keeps reading; then SIGTERM of that nydusd (its mount looks gone) must not stop the
    daemon the container's overlay still reads through."""
    rootfs = _mount_rootfs(stack, ref, "live", out)
    try:
        out["live_first"] = _chroot(rootfs, "/bin/cat", "/etc/greeting")
        (old,) = stack.nydusd_pids()
        os.kill(old, signal.SIGKILL)
        out["live_after_kill9"] = _chroot(
            rootfs, "/bin/sh", "-c", f"/bin/head -c {MIB} /data/other.bin | /usr/bin/sha256sum")
        out["nydusd_restarted"] = _wait(lambda: _recovered(stack, 1), 240)
        out["erofs_mounts_after_restart"] = _erofs_mounts(stack.base)
        out["entries_after_restart"] = _entries(stack)
        out["live_after_restart"] = _chroot(rootfs, "/bin/head", "-c", "20", "/etc/greeting")
        (second,) = stack.nydusd_pids()
        os.kill(second, signal.SIGTERM)
        out["nydusd_sigterm_exited"] = _wait(lambda: second not in stack.nydusd_pids(), 120)
        out["entries_after_sigterm"] = _entries(stack)
        out["nydusd_restarted_after_sigterm"] = _wait(lambda: _recovered(stack, 2), 240)
        # the rest of the file: never read before, served through the old superblock
        out["live_after_sigterm"] = _chroot(rootfs, "/usr/bin/sha256sum", "/data/other.bin")
    finally:
        _drop_rootfs(stack, "live")
    out["erofs_mounts_after_live"] = _erofs_mounts(stack.base)
    out["entries_after_live"] = _entries(stack)


def _entries(stack: Stack) -> object:
    """What the fscache daemon serves: its images' mountpoints and open objects."""
    from erofs_nydus.service.fscache_client import FscacheClient

    client = FscacheClient(stack.cache_dir)
    if not client.alive():
        return "no daemon"
    try:
        st = client.request("status")
    except Exception as e:  # reported, asserted on the host
        return f"{type(e).__name__}: {e}"
    return {"images": [[i.get("fsid", "")[:12], i.get("mountpoints")]
                       for i in st.get("images", [])],
            "objects": st.get("fscache", {}).get("objects")}


def fscache_stack(spec: dict[str, Any]) -> dict[str, Any]:
    """Pull, read, remove through the real stack; spec: registry_config, registry_host,
    bindir, ref, blobs (the image's data blob digests), kill9 (also kill -9 nydusd under a
    live container before the removal)."""
    from erofs_nydus.service.fscache_client import FscacheClient

    scratch = Path(os.environ["SCRATCH"])
    out: dict[str, Any] = {"t": {}}
    t0 = time.monotonic()

    def mark(what: str) -> None:
        out["t"][what] = round(time.monotonic() - t0, 1)

    reglog = open(scratch / "registry.log", "wb")  # noqa: SIM115 - owned by the process
    reg = subprocess.Popen([REGISTRY_BIN, "serve", spec["registry_config"]], stdout=reglog,
                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    reglog.close()
    stack = Stack(scratch / "ctd", Path(spec["bindir"]), spec["registry_host"],
                  daemon_mode="shared", fs_driver="fscache")
    ref = spec["ref"]
    try:
        out["registry_up"] = _wait(
            lambda: _registry_up(f"http://{spec['registry_host']}/v2/"), 120)
        mark("registry")
        stack.start()
        mark("stack")
        with CRIImages(str(stack.sock), timeout=900) as cri:
            out["image_ref"] = cri.pull(ref)
        mark("pull")
        out["content"] = stack.ctr("content", "ls", "-q").stdout.split()
        greeting, big = _in_container(stack, ref, "c1", [
            ["/bin/cat", "/etc/greeting"], ["/usr/bin/sha256sum", "/data/big.bin"]], out)
        mark("container")
        out["greeting"] = greeting
        out["big_sha256"] = big.split()[0] if big else ""
        out["erofs_mounts"] = _erofs_mounts(stack.base)
        out["nydusd"] = len(stack.nydusd_pids())
        client = FscacheClient(stack.cache_dir)
        try:
            st = client.request("status")
            out["blobs_status"] = {k: {"present": v.get("present"), "size": v.get("size")}
                                   for k, v in st.get("blobs", {}).items()}
        except Exception as e:  # reported, asserted on the host
            out["blobs_status"] = f"{type(e).__name__}: {e}"
        out["cache_files_in_use"] = _files_under(stack.cache_dir)
        if spec.get("kill9"):
            _kill9_with_live_container(stack, ref, out)
            mark("kill9")
        with CRIImages(str(stack.sock), timeout=600) as cri:
            cri.remove(ref)
        out["unmounted"] = _wait(lambda: not _erofs_mounts(stack.base), 240)
        out["daemon_stopped"] = _wait(lambda: not client.supervisor_running(), 240)
        mark("remove")
        out["snapshots_left"] = stack.ctr("snapshots", "--snapshotter", "nydus", "ls",
                                          check=False).stdout.splitlines()[1:]
        out["cache_files_left"] = _files_under(stack.cache_dir)
        blob_hexes = {d.split(":")[1] for d in spec["blobs"]}
        out["blob_files_left"] = [n for n in out["cache_files_left"]
                                  if any(h in n for h in blob_hexes)]
    except Exception as e:  # reported with the logs
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        out["tail"] = stack.tail(8000)
        stack.close()
        reg.terminate()
        reg.wait(30)
    return out
