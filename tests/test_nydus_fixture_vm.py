"""fscache mode inside the QEMU VM for the new formats: the nydus-image 2.2 fixture (zstd,
blake3, ToC blob, mapped_blkaddr 512) reads back as the Nydus sources, and our own
zstd + blake3 and none + sha256 images of the small guest tree read back identical."""

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
    for name, own in OWN.items():
        g.mount(own, mp, cache)
        out[name] = g.compare(own, mp)
        g.umount(mp, cache)
    out["stopped"] = g.stop(cache)
except Exception as exc:
    out["error"] = repr(exc)
g.emit(out)
"""


def _own_images(work: Path) -> dict[str, dict[str, str]]:
    import fscache_guest as g

    from erofs_nydus.builder.create import BuildOptions, create_image

    src = work / "tree"
    g.make_small_tree(src, 3)
    snap = g.snapshot(src, work / "tree.pickle")
    out = {}
    for comp, dig in (("zstd", "blake3"), ("none", "sha256")):
        d = work / f"{comp}-{dig}"
        d.mkdir()
        create_image(str(src), str(d / "image.boot"), str(d / "blobs"),
                     BuildOptions(chunk_size=g.CHUNK, compressor=comp, digester=dig))
        out[f"{comp}+{dig}"] = {"bootstrap": str(d / "image.boot"),
                                "blob_dir": str(d / "blobs"), "snapshot": snap}
    return out


def test_fscache_mounts_of_the_fixture_and_zstd_blake3_images(tmp_path: Path) -> None:
    vs.ensure_kernel()
    own = _own_images(tmp_path)
    code = f"BOOT, DATA, OWN = {str(BOOT)!r}, {str(DATA)!r}, {own!r}\n" + GUEST
    res = vs.run_python_in_vm(code, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:]
    out = vs.vm_result(res.stdout)
    print(out, file=sys.stderr)
    assert "error" not in out, out
    assert out["files"] == SOURCE_SHA256
    assert out["remaining"] == 0 and out["stopped"] is True
    assert out["zstd+blake3"] == [] and out["none+sha256"] == [], out
