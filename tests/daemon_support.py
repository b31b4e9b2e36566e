"""Helpers for daemon tests: synthetic blobs without the builder, a counting backend, CLI
mounts that are always cleaned up.

Fixture (a plugin of conftest.py): ``mounts`` -> :class:`Mounts` under the test's
tmp_path; at teardown every mount left is unmounted and each cache dir's daemon must
have stopped."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lz4.block
import pytest

from erofs_nydus.rafs.backend import LocalDirBackend
from erofs_nydus.rafs.image import BlobInfo, ChunkInfo, RafsImage

if TYPE_CHECKING:
    from erofs_nydus.service.client import DaemonClient


@dataclass
class SyntheticBlob:
    blob: BlobInfo
    chunks: list[ChunkInfo]
    payloads: list[bytes]  # uncompressed chunk data, by chunk position
    data: bytes  # the blob file

    def expected_cache(self) -> bytes:
        """What the fully filled cache file must contain."""
        out = bytearray(self.blob.uncompressed_size)
        for c, p in zip(self.chunks, self.payloads, strict=True):
            out[c.uncompressed_offset : c.uncompressed_offset + len(p)] = p
        return bytes(out)

    def image(self) -> RafsImage:
        return RafsImage(
            bootstrap_size=0,
            chunk_size=self.blob.chunk_size,
            flags=0,
            blobs=[self.blob],
            chunks=[self.chunks],
            fsid="0" * 64,
        )


def make_payloads(sizes: list[int], seed: int = 0) -> list[bytes]:
    """Chunk payloads: half compressible text, half random (stored raw)."""
    rng = random.Random(seed)
    out = []
    for i, n in enumerate(sizes):
        if i % 2:
            out.append(rng.randbytes(n))
        else:
            word = f"chunk {i} seed {seed} ".encode()
            out.append((word * (n // len(word) + 1))[:n])
    return out


def make_blob(
    payloads: list[bytes], *, chunk_size: int = 1 << 20, blob_index: int = 0
) -> SyntheticBlob:
    data = bytearray()
    chunks = []
    uoff = 0
    for i, p in enumerate(payloads):
        comp = lz4.block.compress(p, store_size=False)
        compressed = len(comp) < len(p)
        stored = comp if compressed else p
        chunks.append(
            ChunkInfo(
                digest=hashlib.sha256(p).digest(),
                blob_index=blob_index,
                index=i,
                compressed_offset=len(data),
                compressed_size=len(stored),
                uncompressed_offset=uoff,
                uncompressed_size=len(p),
                compressed=compressed,
            )
        )
        data += stored
        uoff += (len(p) + 4095) & ~4095
    blob_id = hashlib.sha256(bytes(data)).hexdigest()
    blob = BlobInfo(
        blob_id=blob_id,
        blob_index=blob_index,
        chunk_size=chunk_size,
        chunk_count=len(payloads),
        compressor="lz4",
        digester="sha256",
        compressed_size=len(data),
        uncompressed_size=uoff,
        ci_offset=len(data),
        ci_compressed_size=0,
        ci_uncompressed_size=0,
        features=1,
    )
    return SyntheticBlob(blob, chunks, payloads, bytes(data))


def write_blob(blob_dir: str | os.PathLike[str], sb: SyntheticBlob) -> str:
    path = os.path.join(os.fspath(blob_dir), sb.blob.blob_id)
    with open(path, "wb") as f:
        f.write(sb.data)
    return path


class CountingBackend(LocalDirBackend):
    """A LocalDirBackend that records every read and can be slowed down or gated."""

    def __init__(self, blob_dir: str | os.PathLike[str], delay: float = 0.0) -> None:
        super().__init__(blob_dir)
        self.calls: list[tuple[int, int]] = []
        self.delay = delay
        self.gate: threading.Event | None = None
        self._lock = threading.Lock()

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        with self._lock:
            self.calls.append((offset, length))
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay:
            threading.Event().wait(self.delay)
        return super().read_range(blob_id, offset, length)


# -- CLI-level helpers (mount tests) ---------------------------------------------------

CLI = [sys.executable, "-c", "from erofs_nydus.cli import run; run()"]


def run_cli(
    *args: str, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"erofs-nydus {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )
    return proc


@dataclass
class BuiltImage:
    bootstrap: Path
    blob_dir: Path

    @property
    def blobs(self) -> list[Path]:
        return sorted(self.blob_dir.iterdir())


def build_image(src: str | os.PathLike[str], work: Path, *extra: str) -> BuiltImage:
    work.mkdir(parents=True, exist_ok=True)
    boot = work / "image.boot"
    blob_dir = work / "blobs"
    run_cli("create", os.fspath(src), "--bootstrap", str(boot), "--blob-dir", str(blob_dir), *extra)
    return BuiltImage(boot, blob_dir)


def small_image(tmp_path: Path, nfiles: int = 40) -> tuple[Path, BuiltImage]:
    """`nfiles` random files of up to 300 kB (fixed seed) in tmp_path/src, built with
    64 KiB chunks into tmp_path/img: (source dir, image)."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(7)
    for i in range(nfiles):
        (src / f"f{i:03d}").write_bytes(rng.randbytes(rng.randrange(1, 300_000)))
    return src, build_image(src, tmp_path / "img", "--chunk-size", "0x10000")


def wait_for(pred: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Mounts:
    """Mount helper that always cleans up and checks nothing is left running."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.active: list[tuple[Path, Path]] = []
        self.caches: set[Path] = set()

    def mount(self, img: BuiltImage, name: str, cache: Path | None = None, *extra: str) -> Path:
        from erofs_nydus.mount import is_mountpoint

        mp = self.base / name
        mp.mkdir(parents=True, exist_ok=True)
        cache = cache or self.base / "cache"
        run_cli(
            "mount", str(img.bootstrap), str(mp), "--blob-dir", str(img.blob_dir),
            "--cache-dir", str(cache), *extra,
        )  # fmt: skip
        assert is_mountpoint(mp)
        self.active.append((mp, cache))
        self.caches.add(cache)
        return mp

    def umount(self, mp: Path) -> str:
        from erofs_nydus.mount import is_mountpoint

        out = run_cli("umount", str(mp)).stdout
        self.active = [(m, c) for m, c in self.active if m != mp]
        assert not is_mountpoint(mp)
        return out

    def close(self) -> None:
        from erofs_nydus.service.client import DaemonClient

        for mp, cache in list(self.active):
            run_cli("umount", str(mp), "--cache-dir", str(cache), check=False)
        for cache in self.caches:
            client = DaemonClient(cache)
            wait_for(lambda c=client: not c.supervisor_running(), 20,
                     f"the daemon for {cache} to stop")
            assert not os.path.exists(client.paths.socket)


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    with contextlib.closing(Mounts(tmp_path)) as m:
        yield m


_READER = """
import os, sys
try:
    with open(sys.argv[1], "rb") as f:
        sys.stdout.buffer.write(f.read())
except OSError as exc:
    sys.stderr.write(str(exc.errno))
    sys.exit(3)
"""


def read_or_fail(path: Path, timeout: float = 60.0) -> bytes:
    """Read `path` in a child process, so that a read the daemon never answers fails
    the test after `timeout` instead of hanging it (fanotify permission waits are
    killable); an I/O error comes back as OSError with the reader's errno."""
    try:
        r = subprocess.run([sys.executable, "-c", _READER, str(path)], capture_output=True,
                           timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {path} hung for {timeout:.0f} s")
    if r.returncode == 3:
        raise OSError(int(r.stderr), os.strerror(int(r.stderr)), str(path))
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout


def daemon_status(cache_dir: Path) -> dict[str, Any]:
    from erofs_nydus.service.client import DaemonClient

    return DaemonClient(cache_dir).request("status")


def kill_daemon(client: DaemonClient) -> None:
    """Teardown: kill -9 the cache dir's daemon if it still runs, every process of it at
    once (keeper, supervisor, worker: one process group), as the keeper would replace a
    lone supervisor."""
    if client.supervisor_running():
        pid = client.supervisor_pid()
        if pid:
            with contextlib.suppress(OSError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)


def fanotify_usable() -> bool:
    from erofs_nydus.cli.mounting import fanotify_works

    return os.geteuid() == 0 and fanotify_works()


def daemon_metrics(cache: Path) -> dict[str, float]:
    """The daemon's Prometheus metrics via its control API: `name{label=value,...}` -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    from erofs_nydus.service.api_client import ApiClient

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(ApiClient(cache).metrics()):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                            + "}" if s.labels else "")  # fmt: skip
            out[key] = s.value
    return out


def wait_prefetch(cache: Path, timeout: float = 120) -> dict[str, Any]:
    """The only mount of `cache`'s daemon once its prefetch is no longer running."""
    from erofs_nydus.service.api_client import ApiClient

    deadline = time.monotonic() + timeout
    while True:
        (m,) = ApiClient(cache).get_json("/api/v1/mounts")
        if m["prefetch"] is None or m["prefetch"]["state"] != "running":
            return dict(m)
        assert time.monotonic() < deadline
        time.sleep(0.05)


def metrics_after_prefetch(cache: Path) -> dict[str, float]:
    """Wait until the mount's prefetch is done, without failed chunks; then the metrics."""
    m = wait_prefetch(cache)
    assert m["prefetch"]["state"] == "done" and m["prefetch"]["failed_chunks"] == 0, m
    return daemon_metrics(cache)
