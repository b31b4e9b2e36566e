"""`nydusd singleton --fscache` driven the way nydus-snapshotter drives it, inside the VM:
PUT /api/v2/blobs, `mount -t erofs -o [domain_id=D,]fsid=<id>` by the caller, read and
compare every file, the info and metrics endpoints, DELETE in the snapshotter's order,
SIGTERM.  Images are built on the host (:func:`build_images`)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fscache_guest as g

NYDUSD = [sys.executable, "-m", "erofs_nydus.service.nydusd"]


def build_images(work: Path) -> dict[str, Any]:
    src = work / "tree"
    g.make_small_tree(src, 3)
    img = g.build(src, work / "img")
    img["snapshot"] = g.snapshot(src, work / "tree.pickle")
    img["blob_ids"] = sorted(p.name for p in Path(img["blob_dir"]).iterdir())
    return {"a": img}


class _Conn(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=300)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


def api(sock: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    c = _Conn(sock)
    try:
        data = None if body is None else json.dumps(body).encode()
        c.request(method, path, body=data)
        r = c.getresponse()
        raw = r.read()
        return r.status, (json.loads(raw) if raw else None)
    finally:
        c.close()


def fscache_id(snapshot_id: str) -> str:
    """nydus-snapshotter's fsid for a snapshot."""
    return hashlib.sha256(f"nydus-snapshot-{snapshot_id}".encode()).hexdigest()


def blob_entry(img: dict[str, Any], fsid: str, domain: str, work_dir: str) -> dict[str, Any]:
    """The body nydus-snapshotter PUTs (its fscache config template, supplemented)."""
    return {"type": "bootstrap", "id": fsid, "domain_id": domain,
            "config": {"id": fsid, "backend_type": "localfs",
                       "backend_config": {"dir": img["blob_dir"]},
                       "cache_type": "fscache", "cache_config": {"work_dir": work_dir},
                       "prefetch_config": {"enable": False, "threads_count": 2,
                                           "merging_size": 1048576},
                       "metadata_path": img["bootstrap"]}}


def _wait_running(sock: str, proc: subprocess.Popen[bytes], timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return {"exited": proc.returncode}
        try:
            st, info = api(sock, "GET", "/api/v1/daemon")
            if st == 200 and info["state"] == "RUNNING":
                return info
        except OSError:
            pass
        time.sleep(0.2)
    return {"timeout": True}


def group_singleton(images: dict[str, Any]) -> dict[str, Any]:
    from erofs_nydus.mount import mount_erofs_fscache, umount
    from erofs_nydus.service.fscache_client import FscacheClient
    from erofs_nydus.service.fscache_daemon import kernel_cache_dir

    a = images["a"]
    scratch = os.environ["SCRATCH"]
    cache = f"{scratch}/nydusd-cache"
    sock = "/run/nydusd/api.sock"
    mp = "/run/nydusd-mnt"
    os.makedirs(mp, exist_ok=True)
    out: dict[str, Any] = {}
    proc = subprocess.Popen([*NYDUSD, "singleton", "--fscache", cache, "--fscache-threads", "2",
                             "--apisock", sock, "--log-level", "info",
                             "--log-file", f"{scratch}/nydusd.log"])
    try:
        out["info"] = _wait_running(sock, proc)
        fsid = fscache_id("7")
        # a bootstrap that does not exist: one error answer, nothing registered
        bad = blob_entry({**a, "bootstrap": "/nonexistent/image.boot"}, fscache_id("8"),
                         fscache_id("8"), f"{scratch}/snap8/fs")
        out["bad_put"] = api(sock, "PUT", "/api/v2/blobs", bad)
        st, _ = api(sock, "PUT", "/api/v2/blobs", blob_entry(a, fsid, fsid, f"{scratch}/s7"))
        out["put"] = st
        out["put_again"] = api(sock, "PUT", "/api/v2/blobs",
                               blob_entry(a, fsid, fsid, f"{scratch}/s7"))[0]
        out["entries"] = api(sock, "GET", "/api/v2/blobs")
        mount_erofs_fscache(mp, fsid)  # what the snapshotter does itself
        out["diffs"] = g.compare(a, mp)
        out["read"] = g.read_all(mp)
        out["metrics"] = api(sock, "GET", "/api/v1/metrics")
        out["blobcache"] = api(sock, "GET", "/api/v1/metrics/blobcache")
        out["inflight"] = api(sock, "GET", "/api/v1/metrics/inflight")[0]
        out["info_after"] = api(sock, "GET", "/api/v1/daemon")
        kdir = kernel_cache_dir(cache)

        def cookies() -> list[str]:  # cachefiles links its files in when a cookie goes
            return sorted(n for _d, _s, fs in os.walk(kdir) for n in fs)

        # the snapshotter's removal: unbind (domain == id: domain only), umount, cull
        out["delete_domain"] = api(sock, "DELETE", f"/api/v2/blobs?domain_id={fsid}")[0]
        umount(mp)
        out["cookies_after_umount"] = cookies()
        out["delete_boot"] = api(sock, "DELETE", f"/api/v2/blobs?blob_id={fsid}")[0]
        out["boot_copy_after"] = os.path.exists(f"{cache}/{fsid}.boot")
        for bid in a["blob_ids"]:  # image removal: the data blobs' caches
            api(sock, "DELETE", f"/api/v2/blobs?blob_id={bid}")
        out["cookies_after_delete"] = cookies()
        out["blob_files_after"] = sorted(n for n in os.listdir(cache) if any(
            n.startswith(b) for b in a["blob_ids"]))
        out["daemon_after_delete"] = FscacheClient(cache).supervisor_running()
        # mount again, then SIGTERM with the mount up: the mount stays served
        api(sock, "PUT", "/api/v2/blobs", blob_entry(a, fsid, fsid, f"{scratch}/s7"))
        mount_erofs_fscache(mp, fsid)
        proc.send_signal(signal.SIGTERM)
        out["sigterm_rc"] = proc.wait(120)
        out["served_after_sigterm"] = g.compare(a, mp) == []
        umount(mp)
        # a restarted nydusd releases what is no longer mounted, then SIGTERM stops all
        proc = subprocess.Popen([*NYDUSD, "singleton", "--fscache", cache, "--apisock", sock,
                                 "--log-file", f"{scratch}/nydusd.log"])
        _wait_running(sock, proc)
        out["entries_restarted"] = len(api(sock, "GET", "/api/v2/blobs")[1])
        proc.send_signal(signal.SIGTERM)
        out["sigterm2_rc"] = proc.wait(120)
        out["daemon_after_sigterm"] = FscacheClient(cache).supervisor_running()
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
        try:
            with open(f"{scratch}/nydusd.log") as f:
                out["log_tail"] = f.read()[-3000:]
        except OSError:
            pass
    return out
