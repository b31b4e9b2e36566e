"""The nydus-image 2.2 fixture (zstd, blake3, ToC blob, mapped_blkaddr 512) mounted in
fscache mode inside the QEMU VM: the files read back as the Nydus sources."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import vm_support as vs
from test_nydus_formats import BOOT, DATA, SOURCE_SHA256

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(vs.vm_skip_reason() is not None, reason=str(vs.vm_skip_reason())),
    pytest.mark.timeout(900),
]

GUEST = """
import hashlib, json, os, fscache_guest as g
scratch = os.environ["SCRATCH"]
cache, mp = scratch + "/cache-nydus", "/run/nydus-mnt"
img = {"bootstrap": BOOT, "blob_dir": DATA}
out = {}
try:
    out["mount"] = str(g.mount(img, mp, cache))
    out["files"] = {n: hashlib.sha256(open(os.path.join(mp, n), "rb").read()).hexdigest()
                    for n in sorted(os.listdir(mp))}
    out["remaining"] = g.umount(mp, cache)
    out["stopped"] = g.stop(cache)
except Exception as exc:
    out["error"] = repr(exc)
g.emit(out)
"""


def test_fixture_fscache_mount_reads_the_nydus_sources() -> None:
    vs.ensure_kernel()
    code = f"BOOT, DATA = {str(BOOT)!r}, {str(DATA)!r}\n" + GUEST
    res = vs.run_python_in_vm(code, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:]
    out = vs.vm_result(res.stdout)
    print(out, file=sys.stderr)
    assert "error" not in out, out
    assert out["files"] == SOURCE_SHA256
    assert out["remaining"] == 0 and out["stopped"] is True
    assert Path(BOOT).exists()
