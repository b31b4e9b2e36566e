"""fscache-mode scenarios: images are built on the host (:func:`build_images`), the
scenario functions run inside the VM (one ``run_python_in_vm`` snippet per group) and
return plain dicts the host test asserts on.

Guest Python is 20-80x slower than the host (TCG), so images are small and the daemon
is driven in-process (``mount_fscache`` / ``FscacheClient``); one mount and one umount
go through the real CLI.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CHUNK = 0x10000  # 64 KiB chunks: small files still span several
CLI = [sys.executable, "-c", "from erofs_nydus.cli import run; run()"]


# ---- host side: trees and images ---------------------------------------------------------


def make_small_tree(root: Path, seed: int = 1, *, nfiles: int = 12) -> None:
    """Every file type, hard links, xattrs, a multi-chunk file, inline tails."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_text(f"hello fscache {seed}\n")
    (root / "page.bin").write_bytes(rng.randbytes(4096))
    multi = rng.randbytes(5 * CHUNK + 1234)  # 6 chunks, last one partial
    (root / "multi.bin").write_bytes(multi)
    text = (b"compressible line %d\n" % seed) * 9000
    (root / "dir" / "text.txt").write_bytes(text)
    for i in range(nfiles):
        (root / "dir" / "sub" / f"f{i:02d}").write_bytes(rng.randbytes(rng.randrange(1, 70000)))
    os.link(root / "multi.bin", root / "dir" / "multi-hardlink")
    os.link(root / "small.txt", root / "dir" / "sub" / "small-hardlink")
    os.symlink("../small.txt", root / "dir" / "link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.mkfifo(root / "fifo")
    os.mknod(root / "null-dev", 0o20644, os.makedev(1, 3))
    os.setxattr(root / "small.txt", "user.note", b"x" * 40)
    os.setxattr(root / "dir", "user.dirattr", b"v")
    os.setxattr(root / "dir" / "text.txt", "trusted.t", b"\x00\x01binary")
    os.chmod(root / "page.bin", 0o600)
    os.chown(root / "dir" / "sub", 1234, 5678)


def build(src: Path, work: Path, *, chunk_dict: Path | None = None) -> dict[str, str]:
    from erofs_nydus.builder.create import BuildOptions, create_image

    work.mkdir(parents=True, exist_ok=True)
    boot, blobs = work / "image.boot", work / "blobs"
    opts = BuildOptions(chunk_size=CHUNK, chunk_dicts=[str(chunk_dict)] if chunk_dict else [])
    create_image(str(src), str(boot), str(blobs), opts)
    return {"src": str(src), "bootstrap": str(boot), "blob_dir": str(blobs)}


def snapshot(src: Path, out: Path) -> str:
    import treeutil

    with open(out, "wb") as f:
        pickle.dump(treeutil.snapshot_tree(src), f)
    return str(out)


def corrupt_copy(img: dict[str, str], work: Path) -> dict[str, str]:
    """Same bootstrap, a blob dir whose blob has flipped bytes in its second half."""
    out = work / "bad-blobs"
    out.mkdir(parents=True)
    (blob,) = sorted(Path(img["blob_dir"]).iterdir())
    data = bytearray(blob.read_bytes())
    for pos in range(len(data) // 2, len(data) - 8192, 4099):
        data[pos] ^= 0x5A
    (out / blob.name).write_bytes(bytes(data))
    return {**img, "blob_dir": str(out)}


def build_images(work: Path) -> dict[str, Any]:
    """Everything the guest groups need, built on the host."""
    a_src = work / "tree-a"
    make_small_tree(a_src, 1)
    a = build(a_src, work / "img-a")
    a["snapshot"] = snapshot(a_src, work / "tree-a.pickle")
    # b: a second layer built against a's chunks (shares a's blob) -> domain sharing
    b_src = work / "tree-b"
    make_small_tree(b_src, 1, nfiles=14)  # same content as a, plus two files
    (b_src / "only-in-b").write_bytes(b"b" * 5000)
    b = build(b_src, work / "img-b", chunk_dict=Path(a["bootstrap"]))
    b["snapshot"] = snapshot(b_src, work / "tree-b.pickle")
    for blob in Path(a["blob_dir"]).iterdir():  # b's blob dir serves both of its blobs
        os.link(blob, Path(b["blob_dir"]) / blob.name)
    bad = corrupt_copy(a, work / "img-bad")
    return {"a": a, "b": b, "bad": bad, "mnt": "/run/fsc-mnt"}


# ---- guest side -------------------------------------------------------------------------


def emit(value: Any) -> None:
    print("VM-RESULT " + json.dumps(value), flush=True)


def run_group(fn: Any, spec: Any) -> None:
    """Run a group and emit its result; if it raises, first print the tail of every
    daemon.log under $SCRATCH (the VM keeps nothing once it powers off)."""
    try:
        result = fn(spec)
    except BaseException:
        for d, _s, names in os.walk(os.environ.get("SCRATCH", "/tmp")):
            if "daemon.log" in names:
                with open(os.path.join(d, "daemon.log"), errors="replace") as f:
                    tail = f.read()[-3000:]
                print(f"---- {d}/daemon.log (tail) ----\n{tail}", flush=True)
        raise
    emit(result)


def _client(cache: str) -> Any:
    from erofs_nydus.service.fscache_client import FscacheClient

    return FscacheClient(cache)


def status(cache: str) -> dict[str, Any]:
    st: dict[str, Any] = _client(cache).request("status")
    return st


def fcount(cache: str, key: str) -> int:
    return int(status(cache)["fscache"].get(key, 0))


def mount(img: dict[str, str], mp: str, cache: str, domain: str | None = None,
          buffered: bool | None = None) -> dict[str, Any]:
    from erofs_nydus.service.fscache_client import mount_fscache

    os.makedirs(mp, exist_ok=True)
    backend = {"type": "local", "dir": img["blob_dir"]}
    return mount_fscache(img["bootstrap"], mp, cache, backend, domain_id=domain,
                         buffered_cache=buffered)


def umount(mp: str, cache: str) -> int:
    from erofs_nydus.mount import umount as do_umount

    do_umount(mp)
    remaining: int = _client(cache).request("detach", mountpoint=mp)["remaining"]
    return remaining


def stop(cache: str, timeout: float = 30) -> bool:
    c = _client(cache)
    c.shutdown(timeout)
    return not c.supervisor_running()


def compare(img: dict[str, str], mp: str) -> list[str]:
    import treeutil

    with open(img["snapshot"], "rb") as f:
        snap = pickle.load(f)
    diffs: list[str] = treeutil.compare_trees(snap, mp, ignore={"root_mtime"}, limit=20)
    return diffs


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_all(mp: str) -> int:
    n = 0
    for dirpath, _dirs, files in os.walk(mp):
        for name in files:
            p = os.path.join(dirpath, name)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            with open(p, "rb") as f:
                n += len(f.read())
    return n


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300,
                          env=env, check=False)


def _timed(out: dict[str, Any], name: str, t0: float) -> None:
    out.setdefault("timings", {})[name] = round(time.monotonic() - t0, 2)


def group_main(images: dict[str, Any]) -> dict[str, Any]:
    """tmpfs refusal, CLI mount + tree compare, concurrent readers, unknown cookie,
    premature close, warm remount, corrupted blob, domain sharing + umount order."""
    a, b, bad = images["a"], images["b"], images["bad"]
    scratch = os.environ["SCRATCH"]
    cache = f"{scratch}/cache"
    mp = images["mnt"]
    os.makedirs(mp, exist_ok=True)
    out: dict[str, Any] = {}

    # 1. cache dir on tmpfs: a clear error, nothing left running
    t0 = time.monotonic()
    try:
        mount(a, mp, "/dev/shm/fsc-cache")
        out["tmpfs"] = "mounted?!"
    except Exception as exc:
        out["tmpfs"] = f"{type(exc).__name__}: {exc}"
    out["tmpfs_daemon"] = _client("/dev/shm/fsc-cache").supervisor_running()
    _timed(out, "tmpfs", t0)

    # 2. CLI mount, concurrent cold readers, full tree comparison
    t0 = time.monotonic()
    r = cli("mount", a["bootstrap"], mp, "--blob-dir", a["blob_dir"], "--cache-dir", cache,
            "--mode", "fscache")
    out["cli_mount"] = {"rc": r.returncode, "stdout": r.stdout.strip(),
                        "stderr": r.stderr.strip()[-800:]}
    if r.returncode != 0:
        return out
    _timed(out, "cli_mount", t0)
    t0 = time.monotonic()
    src = a["src"]
    names = ["multi.bin", "dir/text.txt", *(f"dir/sub/f{i:02d}" for i in range(12))]
    expected = {n: digest(os.path.join(src, n)) for n in names}
    got: dict[str, str] = {}
    errors: list[str] = []

    def reader(k: int) -> None:
        for n in names[k::2] + names[: k + 1]:
            try:
                got[f"{k}:{n}"] = digest(os.path.join(mp, n))
            except OSError as exc:
                errors.append(f"{n}: {exc}")

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["concurrent"] = {
        "reads": len(got), "errors": errors,
        "wrong": sorted(k for k, v in got.items() if v != expected[k.split(":", 1)[1]]),
    }
    _timed(out, "concurrent", t0)
    # 3. premature close: drop every anon fd; a later cold read reopens the object
    t0 = time.monotonic()
    opens_before = fcount(cache, "open")
    dropped = _client(cache).request("drop_fds")["dropped"]
    reopened_ok = digest(os.path.join(mp, "page.bin")) == digest(
        os.path.join(src, "page.bin"))
    out["premature_close"] = {"dropped": dropped, "read_ok": reopened_ok,
                              "new_opens": fcount(cache, "open") - opens_before}
    _timed(out, "premature", t0)

    t0 = time.monotonic()
    st = status(cache)["fscache"]
    out["after_concurrent"] = st
    out["tree_diffs"] = compare(a, mp)
    _timed(out, "tree", t0)

    # 4. unknown cookie: the daemon answers -ENOENT, the mount fails, the daemon serves on
    from erofs_nydus.mount import mount_erofs_fscache

    os.makedirs("/run/fsc-unknown", exist_ok=True)
    try:
        mount_erofs_fscache("/run/fsc-unknown", "no-such-image")
        out["unknown_mount"] = "mounted?!"
    except OSError as exc:
        out["unknown_mount"] = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    out["unknown_refused"] = fcount(cache, "open_refused")

    # 5. warm remount (CLI umount): nothing reaches the daemon but OPENs
    t0 = time.monotonic()
    r = cli("umount", mp)
    out["cli_umount"] = {"rc": r.returncode, "stdout": r.stdout.strip(),
                         "stderr": r.stderr.strip()[-400:]}
    deadline = time.monotonic() + 30
    while _client(cache).supervisor_running() and time.monotonic() < deadline:
        time.sleep(0.1)
    out["stopped_after_umount"] = not _client(cache).supervisor_running()
    out["fd_released"] = not os.path.exists(f"{cache}/daemon.sock")
    mount(a, mp, cache)
    reads0 = fcount(cache, "read")
    out["warm_diffs"] = compare(a, mp)
    out["warm"] = {"reads": fcount(cache, "read") - reads0, "opens": fcount(cache, "open")}
    _timed(out, "warm", t0)
    out["warm_remaining"] = umount(mp, cache)

    # 6. corrupted blob (another blob dir, same image: own cache dir so nothing is warm)
    t0 = time.monotonic()
    stop(cache)
    cache2 = f"{scratch}/cache-bad"
    mount(bad, mp, cache2)
    res: dict[str, Any] = {}
    for n in ["small.txt", "multi.bin", "dir/text.txt", *(f"dir/sub/f{i:02d}" for i in range(12))]:
        try:
            ok = digest(os.path.join(mp, n)) == digest(os.path.join(src, n))
            res[n] = "ok" if ok else "WRONG"
        except OSError as exc:
            res[n] = errno.errorcode.get(exc.errno or 0, "?")
    out["corrupt"] = {"files": res, "read_failed": fcount(cache2, "read_failed"),
                      "digest_failures": status(cache2)["metrics"]["digest_failures"]}
    umount(mp, cache2)
    stop(cache2)
    _timed(out, "corrupt", t0)

    # 7. two images in one domain share a's blob: one OPEN for it; umount a first
    t0 = time.monotonic()
    cache3 = f"{scratch}/cache-dom"
    mp_a, mp_b = "/run/fsc-dom-a", "/run/fsc-dom-b"
    ia = mount(a, mp_a, cache3, domain="dom1")
    ib = mount(b, mp_b, cache3, domain="dom1")
    st = status(cache3)
    out["domain"] = {
        "opens_by_key": st["fscache"]["opens_by_key"],
        "fsids": [ia["fsid"], ib["fsid"]],
        "blobs": {k: v["size"] for k, v in st["blobs"].items()},
    }
    out["domain"]["a_read"] = digest(os.path.join(mp_a, "dir/sub/f01")) == digest(
        os.path.join(src, "dir/sub/f01"))
    closes0 = fcount(cache3, "close")
    out["domain"]["remaining_after_a"] = umount(mp_a, cache3)  # the first mounted goes first
    time.sleep(0.5)
    out["domain"]["closes_after_a"] = fcount(cache3, "close") - closes0
    out["domain"]["b_diffs"] = compare(b, mp_b)  # shared blob still served, cold reads
    out["domain"]["remaining_after_b"] = umount(mp_b, cache3)
    time.sleep(0.5)
    out["domain"]["closes_after_b"] = fcount(cache3, "close") - closes0
    out["domain"]["stopped"] = stop(cache3)
    _timed(out, "domain", t0)
    return out


def group_control(images: dict[str, Any]) -> dict[str, Any]:
    """Issue 7 features in fscache mode: control API and metrics through the real unix
    socket, the access trace, and an optimized image prefetched before the workload."""
    a = images["a"]
    scratch = os.environ["SCRATCH"]
    cache, cache_opt = f"{scratch}/cache-ctl", f"{scratch}/cache-ctl-opt"
    mp = "/run/fsc-ctl"
    os.makedirs(mp, exist_ok=True)
    workload = ["dir/text.txt", "dir/sub/f03", "multi.bin"]
    out: dict[str, Any] = {}

    def run_workload() -> bool:
        return all(digest(os.path.join(mp, n)) == digest(os.path.join(a["src"], n))
                   for n in workload)

    r = cli("mount", a["bootstrap"], mp, "--blob-dir", a["blob_dir"], "--cache-dir", cache,
            "--mode", "fscache", "--amplify", "0")
    out["mount"] = [r.returncode, r.stderr.strip()[-600:]]
    if r.returncode != 0:
        return out
    out["workload_ok"] = run_workload()
    info = cli("ctl", "info", "--cache-dir", cache, "--json")
    out["info"] = json.loads(info.stdout) if info.returncode == 0 else info.stderr[-600:]
    metrics = cli("ctl", "metrics", "--cache-dir", cache)
    out["metrics"] = {ln.split()[0]: float(ln.split()[1]) for ln in metrics.stdout.splitlines()
                      if ln.startswith("erofs_nydus_") and " " in ln}
    trace = f"{scratch}/ctl.trace"
    r = cli("trace", mp, "-o", trace)
    out["trace"] = [r.returncode, r.stdout.strip() or r.stderr.strip()[-600:]]
    if r.returncode != 0:
        return out
    with open(trace) as f:
        out["trace_accesses"] = len(json.load(f)["accesses"])
    out["cold_backend_requests"] = status(cache)["metrics"]["backend_requests"]
    cli("umount", mp)

    opt = f"{scratch}/ctl-opt"
    os.makedirs(opt, exist_ok=True)  # optimize refuses a missing output folder
    r = cli("optimize", a["bootstrap"], "--blob-dir", a["blob_dir"], "--trace", trace,
            "-B", f"{opt}/image.boot", "--output-blob-dir", f"{opt}/blobs")
    out["optimize"] = [r.returncode, r.stdout.strip() or r.stderr.strip()[-600:]]
    if r.returncode != 0:
        return out
    r = cli("mount", f"{opt}/image.boot", mp, "--blob-dir", f"{opt}/blobs", "--cache-dir",
            cache_opt, "--mode", "fscache", "--amplify", "0")
    out["opt_mount"] = [r.returncode, r.stderr.strip()[-600:]]
    if r.returncode != 0:
        return out
    prefetch: dict[str, Any] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        r = cli("ctl", "mounts", mp, "--cache-dir", cache_opt, "--json")
        prefetch = json.loads(r.stdout).get("prefetch") or {} if r.returncode == 0 else {}
        if prefetch.get("state") in ("done", "failed", "cancelled"):
            break
        time.sleep(0.2)
    out["prefetch"] = prefetch
    before = status(cache_opt)["metrics"]["backend_requests"]
    out["opt_workload_ok"] = run_workload()
    out["opt_foreground_requests"] = status(cache_opt)["metrics"]["backend_requests"] - before
    out["opt_prefetch_requests"] = before
    cli("umount", mp)
    out["stopped"] = [stop(cache), stop(cache_opt)]
    return out


def group_failover(images: dict[str, Any]) -> dict[str, Any]:
    """kill -9 of the daemon with READs pending (restore), then the device closed under
    a live mount (supervisor and daemon killed), umount, and a fresh start."""
    a = images["a"]
    scratch = os.environ["SCRATCH"]
    cache = f"{scratch}/cache-fo"
    mp = images["mnt"]
    src = a["src"]
    out: dict[str, Any] = {}
    os.environ["EROFS_NYDUS_FSCACHE_READ_DELAY"] = "1.5"  # READs stay pending a while
    os.environ["EROFS_NYDUS_FSCACHE_CHUNK_WRITES"] = "0"
    os.environ["EROFS_NYDUS_READ_DEADLINE"] = "4"  # a stuck daemon is replaced soon
    t0 = time.monotonic()
    mount(a, mp, cache)
    _timed(out, "mount", t0)
    st = status(cache)
    pid0 = st["pid"]
    names = [f"dir/sub/f{i:02d}" for i in range(6)] + ["multi.bin"]
    got: dict[str, Any] = {}

    def reader(n: str) -> None:
        try:
            got[n] = digest(os.path.join(mp, n)) == digest(os.path.join(src, n))
        except OSError as exc:
            got[n] = errno.errorcode.get(exc.errno or 0, "?")

    threads = [threading.Thread(target=reader, args=(n,)) for n in names]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while fcount(cache, "read") - st["fscache"]["read"] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    pending = fcount(cache, "read") - st["fscache"]["read"]
    os.kill(pid0, signal.SIGKILL)
    t0 = time.monotonic()
    for t in threads:
        t.join(120)
    st2 = status(cache)
    out["kill9"] = {"pending_at_kill": pending, "results": got,
                    "new_pid": st2["pid"] != pid0, "restores": st2["fscache"].get("restores", 0),
                    "alive_threads": sum(t.is_alive() for t in threads)}
    _timed(out, "kill9_readers", t0)
    os.environ["EROFS_NYDUS_FSCACHE_READ_DELAY"] = "0"

    # SIGTERM to the supervisor with a mount live: refused, still serving
    c = _client(cache)
    sup = c.supervisor_pid()
    term: dict[str, Any] = {}
    if sup:
        os.kill(sup, signal.SIGTERM)
        time.sleep(2.0)
        log = open(c.paths.log, encoding="utf-8", errors="replace").read()  # noqa: SIM115
        term["refused_logged"] = "1 mounts live; umount first" in log
        term["supervisor_alive"] = c.supervisor_running() and c.supervisor_pid() == sup
        term["reads"] = digest(os.path.join(mp, "dir/sub/f06")) == digest(
            os.path.join(src, "dir/sub/f06"))
    out["sigterm"] = term

    # a SIGSTOPped (stuck) daemon: replaced after the deadline, its pending READ served
    stopped = status(cache)["pid"]
    os.kill(stopped, signal.SIGSTOP)
    stuck_got: dict[str, Any] = {}

    def stuck_reader() -> None:
        try:
            stuck_got["f08"] = digest(os.path.join(mp, "dir/sub/f08")) == digest(
                os.path.join(src, "dir/sub/f08"))
        except OSError as exc:
            stuck_got["f08"] = errno.errorcode.get(exc.errno or 0, "?")

    t = threading.Thread(target=stuck_reader)
    t.start()
    t.join(90)
    st2 = status(cache)
    out["stuck"] = {"result": stuck_got.get("f08"), "blocked": t.is_alive(),
                    "replaced": st2["pid"] != stopped}
    with contextlib.suppress(ProcessLookupError):
        os.kill(stopped, signal.SIGKILL)

    # the device closed under a live mount ("wrong order"): no hang, no zeros
    sup = c.supervisor_pid()
    pid1 = st2["pid"]
    cached_ok = digest(os.path.join(mp, "dir/sub/f00")) == digest(os.path.join(src, "dir/sub/f00"))
    if sup:
        os.kill(sup, signal.SIGKILL)
    os.kill(pid1, signal.SIGKILL)
    time.sleep(0.5)
    res: dict[str, Any] = {"cached_before": cached_ok}
    try:
        data = open(os.path.join(mp, "dir/sub/f10"), "rb").read()  # noqa: SIM115
        with open(os.path.join(src, "dir/sub/f10"), "rb") as f:
            res["cold_after"] = "ok" if data == f.read() else "WRONG"
    except OSError as exc:
        res["cold_after"] = errno.errorcode.get(exc.errno or 0, "?")
    from erofs_nydus.mount import umount as do_umount

    try:
        do_umount(mp)
        res["umount"] = "ok"
    except OSError as exc:
        res["umount"] = str(exc)
    # A new daemon binds once everything is released; the warm cache serves a remount.
    t0 = time.monotonic()
    try:
        mount(a, mp, cache)
        res["remount_diffs"] = compare(a, mp)
        umount(mp, cache)
        res["stopped"] = stop(cache)
    except Exception as exc:
        res["remount_error"] = f"{type(exc).__name__}: {exc}"
    _timed(out, "remount", t0)
    out["device_closed"] = res
    return out


def build_rootfs_image(rootfs: Path, work: Path) -> dict[str, Any]:
    """The debootstrap rootfs as one image (1 MiB chunks), with a host snapshot."""
    from erofs_nydus.builder.create import BuildOptions, create_image

    work.mkdir(parents=True, exist_ok=True)
    boot, blobs = work / "rootfs.boot", work / "blobs"
    create_image(str(rootfs), str(boot), str(blobs), BuildOptions())
    return {"src": str(rootfs), "bootstrap": str(boot), "blob_dir": str(blobs),
            "snapshot": snapshot(rootfs, work / "rootfs.pickle"), "mnt": "/run/fsc-rootfs"}


def group_rootfs(img: dict[str, Any]) -> dict[str, Any]:
    """The whole debootstrap tree through fscache: metadata, xattrs and every byte."""
    cache = f"{os.environ['SCRATCH']}/cache-rootfs"
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    mount(img, img["mnt"], cache)
    _timed(out, "mount", t0)
    t0 = time.monotonic()
    out["diffs"] = compare(img, img["mnt"])
    _timed(out, "compare", t0)
    st = status(cache)
    out["requests"] = {k: st["fscache"][k] for k in ("open", "read", "read_failed")}
    out["bytes_fetched"] = st["metrics"]["bytes_fetched"]
    out["remaining"] = umount(img["mnt"], cache)
    out["stopped"] = stop(cache)
    return out


def _drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def _backing_files(cache: str) -> list[str]:
    """cachefiles' backing files of ``cache``, the largest (the blob's) first."""
    from erofs_nydus.service.fscache_daemon import kernel_cache_dir

    found = [os.path.join(d, n) for d, _s, names in os.walk(kernel_cache_dir(cache))
             for n in names]
    return sorted(found, key=lambda p: -os.path.getsize(p))


def _journaled(path: str) -> bool:
    import fcntl
    import struct

    from erofs_nydus.service.fscache_client import FS_JOURNAL_DATA_FL

    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        buf = bytearray(struct.calcsize("l"))
        fcntl.ioctl(fd, 0x80086601, buf)  # FS_IOC_GETFLAGS
    finally:
        os.close(fd)
    return bool(struct.unpack("l", buf)[0] & FS_JOURNAL_DATA_FL)


def _resident(path: str) -> int:
    """Bytes of ``path`` in the page cache (util-linux fincore)."""
    r = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", path],
                       capture_output=True, text=True, check=True)
    return int(r.stdout.split()[0])


def _mount_ra(a: dict[str, str], mp: str, cache: str, buffered: bool | None) -> dict[str, Any]:
    """Mount; the answer's buffered_cache/bdi/read_ahead_kb and what sysfs says of the
    bdi that appeared across the mount."""
    from erofs_nydus.service.fscache_client import erofs_bdis

    before = erofs_bdis()
    info = mount(a, mp, cache, buffered=buffered)
    new = sorted(erofs_bdis() - before)
    with open(f"/sys/class/bdi/{new[0]}/read_ahead_kb") as f:
        sysfs = int(f.read())
    return {"buffered": info["buffered_cache"], "bdi": info["bdi"],
            "read_ahead_kb": info["read_ahead_kb"], "new_bdis": new, "sysfs_kb": sysfs}


def _warm_pass(a: dict[str, str], mp: str, cache: str, buffered: bool | None,
               warm_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Cold mount + full compare, umount, warm remount (with ``warm_env`` set), drop
    caches, full compare."""
    cold = _mount_ra(a, mp, cache, buffered)
    res: dict[str, Any] = {"buffered": cold["buffered"], "cold_mount": cold,
                           "cold_diffs": compare(a, mp)}
    umount(mp, cache)
    saved = {k: os.environ.get(k) for k in warm_env or {}}
    os.environ.update(warm_env or {})
    try:
        res["warm_mount"] = _mount_ra(a, mp, cache, buffered)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _drop_caches()
    reads = fcount(cache, "read")
    res["warm_diffs"] = compare(a, mp)
    res["warm_reads"] = fcount(cache, "read") - reads
    files = _backing_files(cache)
    res["backing_files"] = len(files)
    res["journaled"] = sum(map(_journaled, files))
    res["blob_resident"] = _resident(files[0])  # read through the page cache or not
    res["remaining"] = umount(mp, cache)
    res["stopped"] = stop(cache)
    return res


def _cli_mount(a: dict[str, str], mp: str, cache: str, *flags: str) -> dict[str, Any]:
    """`erofs-nydus mount --mode fscache` with `flags`, umount, stop: what it said and
    whether the cachefiles dir got marked +j."""
    from erofs_nydus.service.fscache_daemon import kernel_cache_dir

    r = cli("mount", a["bootstrap"], mp, "--blob-dir", a["blob_dir"], "--cache-dir", cache,
            "--mode", "fscache", *flags)
    res = {"rc": r.returncode, "stdout": r.stdout.strip(), "stderr": r.stderr.strip()[-800:],
           "buffered": "buffered cache" in r.stdout,
           "dir_journaled": _journaled(kernel_cache_dir(cache))}
    cli("umount", mp)
    res["stopped"] = stop(cache)
    return res


def group_buffered(images: dict[str, Any]) -> dict[str, Any]:
    """buffered_cache (on by default): cachefiles' directory is marked ext4 data-journaled
    (chattr +j), so the O_DIRECT reads of its backing files fall back to page-cache reads;
    in effect only on an ext4 mounted nodelalloc, elsewhere one line says why.  Compared
    with it turned off (O_DIRECT) on the same disk.  Also the bdi readahead mount_fscache
    sets (buffered default, environment override)."""
    a = images["a"]
    scratch = os.environ["SCRATCH"]
    mp = images["mnt"]
    out: dict[str, Any] = {}
    os.makedirs(mp, exist_ok=True)
    # the default on the scratch ext4 as mounted (delalloc): not in effect, nothing marked
    t0 = time.monotonic()
    out["delalloc_cli"] = _cli_mount(a, mp, f"{scratch}/cache-delalloc")
    subprocess.run(["mount", "-o", "remount,nodelalloc", scratch], check=True)
    # turned off (--no-buffered-cache, fscache.buffered_cache = false): O_DIRECT
    out["direct"] = _warm_pass(a, mp, f"{scratch}/cache-direct", False,
                               {"EROFS_NYDUS_FSCACHE_READ_AHEAD_KB": "512"})
    _timed(out, "direct", t0)
    # the default on nodelalloc: in effect
    t0 = time.monotonic()
    out["buffered"] = _warm_pass(a, mp, f"{scratch}/cache-buffered", None)
    out["nodelalloc_cli"] = _cli_mount(a, mp, f"{scratch}/cache-cli")
    out["off_cli"] = _cli_mount(a, mp, f"{scratch}/cache-cli-off", "--no-buffered-cache")
    _timed(out, "buffered", t0)
    return out
