"""fscache mode's buffered cache on the host: where ext4 would serve cachefiles'
O_DIRECT reads from the page cache, the cache dir is marked `chattr +j`; elsewhere
nothing is marked and the reason is one line.  Real loop-mounted ext4 and tmpfs
(the whole fscache path runs in the VM: tests/test_fscache_vm.py)."""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from erofs_nydus.service.fscache_client import (
    FS_JOURNAL_DATA_FL,
    buffered_cache_env,
    buffered_cache_unsupported,
    enable_buffered_cache,
)
from erofs_nydus.service.fscache_daemon import kernel_cache_dir

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop and tmpfs mounts)"),
]


def _flags(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = bytearray(struct.calcsize("l"))
        fcntl.ioctl(fd, 0x80086601, buf)  # FS_IOC_GETFLAGS
        return int(struct.unpack("l", buf)[0])
    finally:
        os.close(fd)


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status", encoding="ascii") as f:
        eff = next(ln for ln in f if ln.startswith("CapEff:")).split()[1]
    return bool(int(eff, 16) >> 24 & 1)  # CAP_SYS_RESOURCE = 24


def _mount(args: list[str], mp: Path) -> None:
    mp.mkdir()
    subprocess.run(["mount", *args, str(mp)], check=True)


@pytest.fixture
def ext4(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(image file, mountpoint) of a small ext4 (mounted by the test)."""
    img = tmp_path / "fs.ext4"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    mp = tmp_path / "mnt"
    try:
        yield img, mp
    finally:
        if (mp.is_dir() and os.path.ismount(mp)
                and subprocess.run(["umount", str(mp)], check=False).returncode != 0):
            subprocess.run(["umount", "-l", str(mp)], check=False)


def test_marked_where_ext4_honours_it(ext4: tuple[Path, Path]) -> None:
    img, mp = ext4
    _mount(["-o", "loop,nodelalloc", str(img)], mp)
    cache = mp / "cache"
    why = enable_buffered_cache(str(cache))
    kdir = kernel_cache_dir(str(cache))
    if not _has_cap_sys_resource():  # setting the flag needs it (a container without)
        assert why is not None and "CAP_SYS_RESOURCE" in why and "\n" not in why, why
        return
    assert why is None
    assert _flags(kdir) & FS_JOURNAL_DATA_FL
    # what cachefiles creates below it inherits the flag
    os.makedirs(os.path.join(kdir, "cache", "vol"))
    with open(os.path.join(kdir, "cache", "vol", "obj"), "wb") as f:
        f.write(b"x" * 4096)
    assert _flags(os.path.join(kdir, "cache", "vol", "obj")) & FS_JOURNAL_DATA_FL


def test_delalloc_ext4_is_left_alone_with_one_reason(ext4: tuple[Path, Path]) -> None:
    img, mp = ext4
    _mount(["-o", "loop", str(img)], mp)
    cache = mp / "cache"
    why = enable_buffered_cache(str(cache))
    assert why is not None and "delalloc" in why and "nodelalloc" in why and "\n" not in why
    assert not _flags(kernel_cache_dir(str(cache))) & FS_JOURNAL_DATA_FL


def test_not_ext4_gives_one_reason(tmp_path: Path) -> None:
    mp = tmp_path / "tmpfs"
    _mount(["-t", "tmpfs", "-o", "size=1m", "none"], mp)
    try:
        why = buffered_cache_unsupported(str(mp))
        assert why is not None and "tmpfs, not ext4" in why
    finally:
        subprocess.run(["umount", str(mp)], check=True)


def test_environment_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, want in (("1", True), ("on", True), ("0", False), ("off", False), ("", None),
                        ("maybe", None)):
        monkeypatch.setenv("EROFS_NYDUS_FSCACHE_BUFFERED", value)
        assert buffered_cache_env() is want, value
