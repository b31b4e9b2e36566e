"""The process shell around the fanotify daemon (issue 11 items 1 and 6, invariants (a)
and (g)): no signal to, or death of, one of our processes lets a read of a mounted
image return bytes that are not the image's.  Readers get the right bytes or EIO,
never zeros, and nothing stays blocked."""

from __future__ import annotations

import errno
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_support import build_image, daemon_status, fanotify_usable, run_cli
from test_daemon_mount import Mounts

from erofs_nydus.service.client import DaemonClient

pytestmark = pytest.mark.kernel

if not fanotify_usable():
    pytest.skip("needs root and pre-content fanotify (Linux >= 6.14)", allow_module_level=True)


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    m = Mounts(tmp_path)
    try:
        yield m
    finally:
        m.close()


def _wait_for(pred: object, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _big_file_image(tmp_path: Path, size: int = 8 << 20) -> tuple[Path, Path, object]:
    src = tmp_path / "src"
    src.mkdir()
    big = src / "big"
    big.write_bytes(random.Random(3).randbytes(size))
    return src, big, build_image(src, tmp_path / "img")


def test_sigterm_with_live_mounts_is_refused(tmp_path: Path, mounts: Mounts) -> None:
    """SIGTERM (what `systemctl stop` sends) must not let the fanotify group close
    under a mount: the supervisor refuses, logs why and keeps serving."""
    _src, big, img = _big_file_image(tmp_path)
    mp = mounts.mount(img, "mnt", None, "--amplify", "0")  # type: ignore[arg-type]
    cache = mounts.base / "cache"
    client = DaemonClient(cache)
    want = big.read_bytes()
    with open(mp / "big", "rb") as f:
        assert f.read(1 << 20) == want[: 1 << 20]
    sup = client.supervisor_pid()
    assert sup is not None
    os.kill(sup, signal.SIGTERM)
    log = Path(client.paths.log)
    refused = "not stopping: 1 mounts live; umount first"
    _wait_for(lambda: refused in log.read_text(), what="refusal log")
    assert _alive(sup) and client.alive()
    assert (mp / "big").read_bytes() == want  # never zeros
    os.kill(sup, signal.SIGINT)
    _wait_for(lambda: log.read_text().count(refused) >= 2,
              what="second refusal")
    assert (mp / "big").read_bytes() == want
    assert daemon_status(cache)["fanotify"]["denied"] == 0
    assert "daemon stopped" in mounts.umount(mp)


def test_sigterm_without_mounts_stops(tmp_path: Path) -> None:
    client = DaemonClient(tmp_path / "cache")
    assert client.ensure_running() is True
    sup = client.supervisor_pid()
    assert sup is not None
    os.kill(sup, signal.SIGTERM)
    _wait_for(lambda: not client.supervisor_running(), what="supervisor exit")
    assert not os.path.exists(client.paths.socket)
    client.shutdown()  # reaps the process we started


def _unused(*_: object) -> None:  # keep imports used by later tests in this module
    _ = (errno, threading, run_cli)
