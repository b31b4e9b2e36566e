"""The QEMU fscache harness itself: status, streaming, cachefiles binding, and an end-to-end
fscache mount of an mkfs.erofs chunk-based image served by the codec in the real kernel."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import vm_support as vs

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(vs.vm_skip_reason() is not None, reason=str(vs.vm_skip_reason())),
    pytest.mark.timeout(1800),
]


@pytest.fixture(scope="module", autouse=True)
def vm_kernel() -> Path:
    """Build (first time: minutes) or reuse the kernel before timing-sensitive tests."""
    return vs.ensure_kernel()


@pytest.mark.parametrize("status", [0, 7, 255])
def test_exit_status_propagates(status: int) -> None:
    res = vs.run_in_vm(["sh", "-c", f"exit {status}"], timeout=300)
    assert res.returncode == status, res.stdout


def test_output_env_cwd_and_scratch(tmp_path: Path) -> None:
    env = dict(os.environ, VM_HARNESS_PROBE="probe value with spaces")
    script = (
        'echo "out:$VM_HARNESS_PROBE"; echo "err:stderr" >&2; echo "cwd:$(pwd)";'
        'echo "scratch:$SCRATCH"; echo "fs:$(stat -f -c %T "$SCRATCH")";'
        'echo "uid:$(id -u)"; cat host-file; echo guest > "$SCRATCH/w" && echo "w:ok";'
        'echo guest-tmp > /tmp/guest-wrote && echo "tmp:ok"'
    )
    (tmp_path / "host-file").write_text("host:visible\n")
    res = vs.run_in_vm(["sh", "-c", script], cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stdout
    lines = res.stdout.splitlines()
    for expected in (
        "out:probe value with spaces",
        "err:stderr",
        f"cwd:{tmp_path}",
        "scratch:/run/scratch",
        "fs:ext2/ext3",
        "uid:0",
        "host:visible",
        "w:ok",
        "tmp:ok",
    ):
        assert expected in lines, res.stdout
    assert not Path("/tmp/guest-wrote").exists()  # guest /tmp writes stay in the guest


def test_output_streams_live() -> None:
    cmd = [str(vs.VM_RUN), "--", "sh", "-c", "echo first; sleep 4; echo second"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    t_first = time.monotonic()
    rest = proc.stdout.read()
    proc.wait(300)
    t_end = time.monotonic()
    assert first == "first\n"
    assert rest == "second\n"
    assert t_end - t_first >= 3.0, "output was not streamed before the VM exited"


def test_timeout_kills_vm() -> None:
    t0 = time.monotonic()
    res = vs.run_in_vm(["sleep", "600"], timeout=10)
    assert res.returncode == 124, res.stdout
    assert time.monotonic() - t0 < 120


def test_cachefiles_binds_on_ext4_not_tmpfs() -> None:
    res = vs.run_python_in_vm(
        "import os, vm_support as v\n"
        "v.emit_result({\n"
        "  'dev': os.path.exists('/dev/cachefiles'),\n"
        "  'tmpfs': v.guest_try_bind('/dev/shm/cache'),\n"
        "  'ext4': v.guest_try_bind(os.environ['SCRATCH'] + '/cache'),\n"
        "  'layout': sorted(os.listdir(os.environ['SCRATCH'] + '/cache')),\n"
        "})\n",
        timeout=300,
    )
    assert res.returncode == 0, res.stdout
    assert vs.vm_result(res.stdout) == {
        "dev": True,
        "tmpfs": errno.EOPNOTSUPP,  # tmpfs has no ->sync_fs
        "ext4": 0,
        "layout": ["cache", "graveyard"],
    }


@pytest.fixture
def erofs_chunked_image(tmp_path: Path) -> dict[str, str]:
    if shutil.which("mkfs.erofs") is None:
        pytest.skip("mkfs.erofs missing (apt-get install erofs-utils)")
    return vs.make_chunked_image(tmp_path)


def test_fscache_end_to_end(erofs_chunked_image: dict[str, str]) -> None:
    a = erofs_chunked_image
    res = vs.run_python_in_vm(
        "import os, vm_support as v\n"
        "v.emit_result(v.guest_fscache_e2e(os.environ['SCRATCH'] + '/fscache', "
        f"{a['fsid']!r}, {a['image']!r}, {a['blob_tag']!r}, {a['blob']!r}, {a['src']!r}))\n",
        timeout=600,
    )
    assert res.returncode == 0, res.stdout
    r = vs.vm_result(res.stdout)
    print(f"fscache e2e: {r}", file=sys.stderr)
    assert r["errors"] == []
    assert r["checked"] == 4
    assert r["mismatched"] == []
    assert r["counts"]["open"] == 2  # the bootstrap (fsid) and the blob (device tag)
    assert r["counts"]["close"] == 2
    assert r["volumes"] == [a["fsid"], a["fsid"]]
    assert r["counts"]["read"] >= 4
    assert r["reads_after_warm"] == r["reads_after_cold"]  # warm reads stay in the kernel
