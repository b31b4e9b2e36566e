"""Run things inside the fscache QEMU VM (vm/run) from tests, plus tiny in-guest helpers.

Convention: a test that needs the VM is marked ``@pytest.mark.vm`` and calls

* :func:`run_in_vm` with an argv, e.g. ``[sys.executable, "-m", "pytest", "-p",
  "no:cacheprovider", "tests/guest/test_x.py"]`` (the guest sees the host's files read-only,
  cwd and environment are the host's; ``$SCRATCH`` is a fresh writable ext4), or
* :func:`run_python_in_vm` with a Python snippet (this module is importable in it as
  ``vm_support``, so guest-side helpers below can be called directly).

Skip with :func:`vm_skip_reason` when QEMU or root is missing.  Host-side helpers import
only the standard library; guest-side helpers (``guest_*``, :class:`MiniFscacheDaemon`)
need only the standard library and :mod:`erofs_nydus.fscache.protocol`.

:class:`MiniFscacheDaemon` is deliberately minimal (one thread, whole-file blobs from local
paths) and exists to prove the codec against the real kernel; the project's daemon is
elsewhere.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = ROOT / "tests"
VM_RUN = ROOT / "vm" / "run"
BUILD_KERNEL = ROOT / "vm" / "build-kernel"
RESULT_MARKER = "VM-RESULT "
PAGE = 4096


# ---- host side ---------------------------------------------------------------------------


def vm_skip_reason() -> str | None:
    """Why the VM cannot run here (None if it can)."""
    if os.geteuid() != 0:
        return "the fscache VM needs root (9p export of /, apt for the kernel build)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    return None


def ensure_kernel(timeout: float = 1800) -> Path:
    """Build or reuse the VM kernel; returns the bzImage path."""
    res = subprocess.run(
        [str(BUILD_KERNEL)], stdout=subprocess.PIPE, text=True, timeout=timeout, check=True
    )
    return Path(res.stdout.strip().splitlines()[-1])


def run_in_vm(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = 600,
    scratch_size: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` as root in a fresh VM; stdout and stderr come back merged in ``stdout``.

    ``returncode`` is the guest command's status (124: timed out, 125: VM failure).
    """
    cmd = [str(VM_RUN), "--timeout", str(timeout)]
    if scratch_size is not None:
        cmd += ["--scratch-size", scratch_size]
    cmd += ["--", *(os.fspath(a) for a in argv)]
    res = subprocess.run(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        cwd=cwd if cwd is not None else ROOT,
        env=dict(env) if env is not None else None,
        timeout=timeout + 120,
    )
    if check and res.returncode != 0:
        raise AssertionError(f"VM command failed ({res.returncode}):\n{res.stdout[-4000:]}")
    return res


def run_python_in_vm(code: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet in the guest with this module importable as ``vm_support``."""
    prelude = f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r})\n"
    return run_in_vm([sys.executable, "-c", prelude + code], **kwargs)


def vm_result(output: str) -> Any:
    """The JSON value a guest snippet printed with :func:`emit_result`."""
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    raise AssertionError(f"no {RESULT_MARKER.strip()} line in VM output:\n{output[-4000:]}")


def make_chunked_image(workdir: Path) -> dict[str, str]:
    """mkfs.erofs (1.5) chunk-based image, 1 MiB chunks, data in a separate blob device.

    mkfs.erofs 1.5 leaves the device slot tag empty, which fscache mode refuses; mount with
    ``device=<blob_tag>`` (the cookie key then comes from the option).  fsid and tag are
    content digests so a reused cache can never serve stale bytes.
    """
    import hashlib
    import random

    mkfs = shutil.which("mkfs.erofs")
    if mkfs is None:
        raise FileNotFoundError("mkfs.erofs missing (apt-get install erofs-utils)")
    src = workdir / "src"
    (src / "sub").mkdir(parents=True)
    rng = random.Random(1234)
    (src / "big.bin").write_bytes(rng.randbytes(3 * 1024 * 1024 + 123))
    (src / "sub" / "small.txt").write_text("hello fscache\n" * 10)
    (src / "sub" / "edge.bin").write_bytes(rng.randbytes(1024 * 1024))
    (src / "empty").write_bytes(b"")
    image, blob = workdir / "image.erofs", workdir / "blob.bin"
    subprocess.run(
        [mkfs, "--quiet", "--chunksize=1048576", f"--blobdev={blob}", str(image), str(src)],
        check=True,
    )
    return {
        "image": str(image),
        "blob": str(blob),
        "src": str(src),
        "fsid": hashlib.sha256(image.read_bytes()).hexdigest()[:32],
        "blob_tag": hashlib.sha256(blob.read_bytes()).hexdigest(),
    }


# ---- guest side --------------------------------------------------------------------------


def emit_result(value: Any) -> None:
    """Print one JSON result line for :func:`vm_result` on the host."""
    print(RESULT_MARKER + json.dumps(value), flush=True)


def cachefiles_bind(cache_dir: str | os.PathLike[str]) -> int:
    """Open /dev/cachefiles, ``dir`` + ``bind ondemand``; returns the device fd."""
    from erofs_nydus.fscache import protocol as p

    fd = os.open("/dev/cachefiles", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.write(fd, p.cmd_dir(os.path.abspath(cache_dir)))
        os.write(fd, p.cmd_bind_ondemand())
    except BaseException:
        os.close(fd)
        raise
    return fd


def guest_try_bind(cache_dir: str) -> int:
    """0, or the errno of the failing ``dir``/``bind``; the device is closed again after."""
    os.makedirs(cache_dir, exist_ok=True)
    try:
        fd = cachefiles_bind(cache_dir)
    except OSError as exc:
        return exc.errno or -1
    os.close(fd)
    return 0


@dataclass
class MiniFscacheDaemon:
    """Serve /dev/cachefiles requests from whole local files, one thread, no prefetch.

    ``blobs`` maps a cookie key (the fsid for the bootstrap, the device tag for a blob) to
    the file holding its bytes.
    """

    devfd: int
    blobs: Mapping[bytes, str]
    #: cookie keys whose READs are completed without writing data (the reader gets EIO)
    fail_reads: frozenset[bytes] = frozenset()
    counts: dict[str, int] = field(default_factory=lambda: {"open": 0, "read": 0, "close": 0})
    volumes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _objects: dict[int, tuple[int, str, bytes]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mini-fscache", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for fd, _, _ in self._objects.values():
            os.close(fd)
        self._objects.clear()

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self.devfd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(50):
                continue
            while True:
                try:
                    raw = os.read(self.devfd, 4096)
                except BlockingIOError:
                    break
                if not raw:
                    break
                try:
                    self._handle(raw)
                except Exception as exc:  # keep serving; the test inspects .errors
                    self.errors.append(repr(exc))

    def _handle(self, raw: bytes) -> None:
        from erofs_nydus.fscache import protocol as p

        msg = p.parse_message(raw)
        if isinstance(msg, p.OpenRequest):
            self.counts["open"] += 1
            self.volumes.append(p.volume_name(msg.volume_key))
            path = self.blobs.get(msg.cookie_key)
            if path is None:
                os.close(msg.fd)
                os.write(self.devfd, p.copen(msg.msg_id, -errno.ENOENT))
                return
            self._objects[msg.object_id] = (msg.fd, path, msg.cookie_key)
            os.write(self.devfd, p.copen(msg.msg_id, os.path.getsize(path)))
        elif isinstance(msg, p.ReadRequest):
            self.counts["read"] += 1
            fd, path, key = self._objects[msg.object_id]
            padded = -(-msg.length // PAGE) * PAGE
            with mmap.mmap(-1, padded) as buf, open(path, "rb") as src:
                src.seek(msg.offset)
                # for fail_reads write nothing: completing a READ over a hole fails it (EIO)
                got = 0 if key in self.fail_reads else src.readinto(buf)
                if got:
                    os.pwrite(fd, memoryview(buf)[: -(-got // PAGE) * PAGE], msg.offset)
            import fcntl

            fcntl.ioctl(fd, p.READ_COMPLETE_IOCTL, msg.msg_id)
        else:
            self.counts["close"] += 1
            entry = self._objects.pop(msg.object_id, None)
            if entry is not None:
                os.close(entry[0])


def guest_fscache_e2e(
    cache_dir: str, fsid: str, image: str, blob_tag: str, blob: str, src_dir: str
) -> dict[str, Any]:
    """Mount ``image`` via fscache (fsid + one blob device), compare every file with
    ``src_dir``, re-read warm, unmount; returns counters for the host to check."""
    os.makedirs(cache_dir, exist_ok=True)
    devfd = cachefiles_bind(cache_dir)
    daemon = MiniFscacheDaemon(devfd, {fsid.encode(): image, blob_tag.encode(): blob})
    daemon.start()
    mnt = "/run/e2e-mnt"
    os.makedirs(mnt, exist_ok=True)
    out: dict[str, Any] = {}
    try:
        subprocess.run(
            ["mount", "-t", "erofs", "-o", f"fsid={fsid},device={blob_tag}", "none", mnt],
            check=True,
            timeout=120,
        )
        mismatched: list[str] = []
        checked = 0
        t0 = time.monotonic()
        for dirpath, _dirs, files in os.walk(src_dir):
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), src_dir)
                with (
                    open(os.path.join(src_dir, rel), "rb") as a,
                    open(os.path.join(mnt, rel), "rb") as b,
                ):
                    if a.read() != b.read():
                        mismatched.append(rel)
                checked += 1
        cold = time.monotonic() - t0
        reads_after_cold = daemon.counts["read"]
        t0 = time.monotonic()
        for dirpath, _dirs, files in os.walk(mnt):
            for name in files:
                with open(os.path.join(dirpath, name), "rb") as f:
                    f.read()
        warm = time.monotonic() - t0
        out.update(
            checked=checked,
            mismatched=mismatched,
            cold_s=round(cold, 3),
            warm_s=round(warm, 3),
            reads_after_cold=reads_after_cold,
            reads_after_warm=daemon.counts["read"],
        )
        subprocess.run(["umount", mnt], check=True, timeout=60)
        deadline = time.monotonic() + 10
        while daemon.counts["close"] < daemon.counts["open"] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        daemon.stop()
        os.close(devfd)
    out.update(counts=daemon.counts, volumes=daemon.volumes, errors=daemon.errors)
    return out


def guest_fscache_error_paths(
    cache_dir: str, fsid: str, image: str, blob_tag: str, blob: str
) -> dict[str, Any]:
    """Refused OPEN -> mount fails; READ completed without data -> reader gets EIO."""
    os.makedirs(cache_dir, exist_ok=True)
    devfd = cachefiles_bind(cache_dir)
    daemon = MiniFscacheDaemon(
        devfd,
        {fsid.encode(): image, blob_tag.encode(): blob},
        fail_reads=frozenset({blob_tag.encode()}),
    )
    daemon.start()
    mnt = "/run/err-mnt"
    os.makedirs(mnt, exist_ok=True)
    out: dict[str, Any] = {}
    try:
        refused = subprocess.run(
            ["mount", "-t", "erofs", "-o", "fsid=no-such-image", "none", mnt],
            capture_output=True,
            text=True,
            timeout=120,
        )
        out["refused_mount_rc"] = refused.returncode
        out["opens_after_refusal"] = daemon.counts["open"]
        subprocess.run(
            ["mount", "-t", "erofs", "-o", f"fsid={fsid},device={blob_tag}", "none", mnt],
            check=True,
            timeout=120,
        )
        out["listing"] = sorted(os.listdir(mnt))
        try:
            with open(os.path.join(mnt, "big.bin"), "rb") as f:
                f.read(4096)
            out["read_error"] = None
        except OSError as exc:
            out["read_error"] = exc.errno
        subprocess.run(["umount", mnt], check=True, timeout=60)
    finally:
        daemon.stop()
        os.close(devfd)
    out.update(counts=daemon.counts, errors=daemon.errors)
    return out
