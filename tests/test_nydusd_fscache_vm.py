"""`nydusd singleton --fscache` in the QEMU VM, driven over its API socket the way
nydus-snapshotter drives it (PUT /api/v2/blobs, its own `mount -t erofs -o fsid=`, DELETE,
SIGTERM): every file read back equal, the info and metrics endpoints answering, the
bootstrap's and the blobs' cache files gone after the snapshotter's removal calls."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import vm_support as vs

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(vs.vm_skip_reason() is not None, reason=str(vs.vm_skip_reason())),
    pytest.mark.timeout(1800),
]


def test_nydusd_singleton_fscache_like_the_snapshotter(tmp_path: Path) -> None:
    import nydusd_fscache_guest as ng

    vs.ensure_kernel()
    images = tmp_path / "images.json"
    images.write_text(json.dumps(ng.build_images(tmp_path)))
    res = vs.run_python_in_vm(
        "import json, fscache_guest as g, nydusd_fscache_guest as ng\n"
        f"g.emit(ng.group_singleton(json.load(open({str(images)!r}))))\n",
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-6000:]
    r = vs.vm_result(res.stdout)
    print(json.dumps({k: v for k, v in r.items() if k != "log_tail"}), file=sys.stderr)
    log = r.get("log_tail", "")
    assert r["info"]["state"] == "RUNNING", (r["info"], log)
    assert r["info"]["version"]["git_commit"]
    # a bad entry: one error answer with nydusd's {code, message}
    status, err = r["bad_put"]
    assert 400 <= status < 500 and set(err) == {"code", "message"}, r["bad_put"]
    assert "/nonexistent/image.boot" in err["message"]
    assert r["put"] == 204 and r["put_again"] == 204, log
    status, entries = r["entries"]
    assert status == 200 and [e["id"] for e in entries] == [ng.fscache_id("7")]
    # the caller's fsid= mount reads every file right
    assert r["diffs"] == [] and r["read"] > 0, (r["diffs"], log)
    status, m = r["metrics"]
    assert status == 200 and m["data_read"] > 0, r["metrics"]
    status, bc = r["blobcache"]
    assert status == 200 and len(bc["underlying_files"]) == 1, r["blobcache"]
    assert r["inflight"] == 200
    assert r["info_after"][1]["state"] == "RUNNING"
    # the snapshotter's removal calls: entry, kernel cache file, bootstrap copy, blob caches
    fsid, blobs = ng.fscache_id("7"), json.loads(images.read_text())["a"]["blob_ids"]
    assert {f"D{fsid}", *(f"D{b}" for b in blobs)} <= set(r["cookies_after_umount"]), r
    assert r["delete_domain"] == 204 and r["delete_boot"] == 204, log
    assert r["cookies_after_delete"] == [] and r["boot_copy_after"] is False
    assert r["blob_files_after"] == [], r["blob_files_after"]
    assert r["daemon_after_delete"] is False  # nothing left to serve: no idle daemon
    # SIGTERM with the snapshotter's mount up: exits 0, the mount keeps being served
    assert r["sigterm_rc"] == 0 and r["served_after_sigterm"] is True, log
    # the restarted nydusd sees its predecessor's entry; SIGTERM after the umount stops all
    assert r["entries_restarted"] == 1
    assert r["sigterm2_rc"] == 0 and r["daemon_after_sigterm"] is False, log
