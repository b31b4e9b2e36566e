"""fscache mode end to end in the QEMU VM: the project's daemon (supervisor + worker
over /dev/cachefiles on-demand) serving `erofs-nydus mount --mode fscache`.

Scenarios ported from erofs-utils' fscache tests (premature close of the anon fd,
daemon killed with requests pending, closing in the wrong order, remount with a warm
cache, two mounts sharing a domain) plus tree comparison, concurrent readers, a
corrupted blob, an unknown cookie and a tmpfs cache dir.  Images are built on the host;
each group is one VM boot running one function of ``fscache_guest.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import vm_support as vs

from erofs_nydus.service.fscache_client import BUFFERED_READ_AHEAD_KB

pytestmark = [
    pytest.mark.vm,
    pytest.mark.skipif(vs.vm_skip_reason() is not None, reason=str(vs.vm_skip_reason())),
    pytest.mark.timeout(1800),
]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import fscache_guest as g

    vs.ensure_kernel()
    work = tmp_path_factory.mktemp("fscache")
    spec = g.build_images(work)
    path = work / "images.json"
    path.write_text(json.dumps(spec))
    return path


def _run_group(name: str, images: Path, timeout: float = 900) -> dict[str, Any]:
    res = vs.run_python_in_vm(
        "import json, fscache_guest as g\n"
        f"g.run_group(g.{name}, json.load(open({str(images)!r})))\n",
        timeout=timeout,
    )
    assert res.returncode == 0, res.stdout[-12000:]
    out: dict[str, Any] = vs.vm_result(res.stdout)
    print(f"{name}: {json.dumps(out)}", file=sys.stderr)
    return out


def test_fscache_mount_scenarios(images: Path) -> None:
    r = _run_group("group_main", images)
    spec = json.loads(images.read_text())
    # a cache dir on tmpfs: a clear error, no daemon left behind
    assert "cachefiles needs ext4/xfs/btrfs" in r["tmpfs"] and "tmpfs" in r["tmpfs"]
    assert r["tmpfs_daemon"] is False
    # CLI mount; concurrent cold readers get the right bytes
    assert r["cli_mount"]["rc"] == 0, r["cli_mount"]
    assert "fscache" in r["cli_mount"]["stdout"]
    assert r["concurrent"] == {"reads": 32, "errors": [], "wrong": []}
    # premature close of every anon fd: the kernel reopens (new OPEN), data still right
    pc = r["premature_close"]
    assert pc["dropped"] == 2 and pc["read_ok"] is True and pc["new_opens"] >= 1, pc
    # full tree: every file type, hard links, xattrs, multi-chunk file
    assert r["tree_diffs"] == []
    # unknown cookie: copen -ENOENT, the mount fails, the daemon keeps serving
    assert r["unknown_mount"] != "mounted?!" and r["unknown_refused"] >= 1
    # CLI umount stops the daemon and releases the device
    assert r["cli_umount"]["rc"] == 0 and "daemon stopped" in r["cli_umount"]["stdout"]
    assert r["stopped_after_umount"] and r["fd_released"]
    # warm remount: same tree, and no READ reaches the daemon (only OPENs)
    assert r["warm_diffs"] == []
    assert r["warm"]["reads"] == 0 and r["warm"]["opens"] == 2, r["warm"]
    assert r["warm_remaining"] == 0
    # corrupted blob: EIO for files in bad chunks, never wrong bytes; daemon kept serving
    files = r["corrupt"]["files"]
    assert "WRONG" not in files.values(), files
    assert "EIO" in files.values() and "ok" in files.values(), files
    assert set(files.values()) <= {"ok", "EIO"}, files
    assert r["corrupt"]["read_failed"] >= 1 and r["corrupt"]["digest_failures"] >= 1
    # domain: a's blob is shared by b -> one OPEN for it; umount in mount order works
    d = r["domain"]
    shared = {p.name for p in Path(spec["a"]["blob_dir"]).iterdir()}
    assert len(shared) == 1
    (shared_blob,) = shared
    assert d["opens_by_key"][shared_blob] == 1, d
    assert len(d["opens_by_key"]) == 4  # two bootstraps, the shared blob, b's own blob
    assert d["a_read"] is True
    assert d["remaining_after_a"] == 1 and d["closes_after_a"] == 1  # only a's bootstrap
    assert d["b_diffs"] == []  # shared blob still served after a's umount
    assert d["remaining_after_b"] == 0 and d["closes_after_b"] == 4
    assert d["stopped"] is True


def test_fscache_failover(images: Path) -> None:
    r = _run_group("group_failover", images)
    k = r["kill9"]
    assert k["pending_at_kill"] >= 3, k
    assert k["alive_threads"] == 0
    assert set(k["results"].values()) == {True}, k  # every pending read completed, right bytes
    assert k["new_pid"] is True and k["restores"] == 1
    # SIGTERM with a mount live is refused (issue 11 item 1), reads go on
    assert r["sigterm"] == {"refused_logged": True, "supervisor_alive": True, "reads": True}
    # a SIGSTOPped daemon is replaced; its READ is re-delivered and served (item 1, (g))
    assert r["stuck"] == {"result": True, "blocked": False, "replaced": True}, r["stuck"]
    d = r["device_closed"]
    assert d["cached_before"] is True
    # device gone under a live mount: uncached reads fail, never zeros, never hang
    assert d["cold_after"] in {"ENOBUFS", "EIO"}, d
    assert d["umount"] == "ok"
    assert d.get("remount_error") is None, d
    assert d["remount_diffs"] == [] and d["stopped"] is True


def test_fscache_control_api_trace_and_prefetch(images: Path) -> None:
    r = _run_group("group_control", images)
    assert r["mount"][0] == 0, r["mount"]
    assert r["workload_ok"] is True
    assert r["info"]["mode"] == "fscache" and r["info"]["images"] == 1, r["info"]
    m = r["metrics"]
    assert m["erofs_nydus_requests_total"] > 0  # fscache READs
    assert m["erofs_nydus_backend_requests_total"] == r["cold_backend_requests"] > 0
    assert r["trace"][0] == 0 and r["trace_accesses"] >= 3, r["trace"]
    assert r["optimize"][0] == 0, r["optimize"]
    assert r["opt_mount"][0] == 0, r["opt_mount"]
    p = r["prefetch"]
    assert p["state"] == "done" and p["failed_chunks"] == 0, p
    assert p["done_chunks"] == p["total_chunks"] >= r["trace_accesses"], p
    # the workload's chunks were prefetched: it sends nothing more to the backend,
    # and prefetch needed fewer backend reads than the unoptimized cold run
    assert r["opt_workload_ok"] is True
    assert r["opt_foreground_requests"] == 0, r
    assert 0 < r["opt_prefetch_requests"] < r["cold_backend_requests"], r
    assert r["stopped"] == [True, True]


def test_fscache_buffered_cache(images: Path) -> None:
    r = _run_group("group_buffered", images)
    d, b = r["direct"], r["buffered"]
    for res in (d, b):  # the right bytes cold and warm, no READ reaches the daemon warm
        assert res["cold_diffs"] == [] and res["warm_diffs"] == [], res
        assert res["warm_reads"] == 0 and res["remaining"] == 0 and res["stopped"], res
    # default on a delalloc ext4: mounted, nothing marked, one line says why and how
    # not to try
    c = r["delalloc_cli"]
    assert c["rc"] == 0 and c["buffered"] is False and c["dir_journaled"] is False, c
    (line,) = [ln for ln in c["stderr"].splitlines() if "page cache" in ln]
    assert "nodelalloc" in line and "--no-buffered-cache" in line, c
    # turned off: cachefiles reads its backing files with O_DIRECT, none of the blob cached
    assert d["buffered"] is False and d["journaled"] == 0 and d["blob_resident"] == 0, d
    # the default on nodelalloc: every backing file journaled, read through the page cache
    assert b["buffered"] is True, b
    assert b["journaled"] == b["backing_files"] >= 2, b
    assert b["blob_resident"] > 0, b
    # the CLI: on by default there, silent; --no-buffered-cache: off, nothing marked
    c = r["nodelalloc_cli"]
    assert c["rc"] == 0 and c["buffered"] is True and c["dir_journaled"] is True, c
    assert "page cache" not in c["stderr"], c
    c = r["off_cli"]
    assert c["rc"] == 0 and c["buffered"] is False and c["dir_journaled"] is False, c
    assert "page cache" not in c["stderr"], c
    # bdi readahead: the mount's own bdi (erofs-<n>, one new per mount) read back from
    # sysfs: kernel default without a buffered cache, the environment's value when set,
    # BUFFERED_READ_AHEAD_KB on buffered mounts
    for m in (d["cold_mount"], d["warm_mount"], b["cold_mount"], b["warm_mount"]):
        assert len(m["new_bdis"]) == 1 and m["new_bdis"][0].startswith("erofs-"), m
    assert d["cold_mount"]["bdi"] is None and d["cold_mount"]["read_ahead_kb"] is None
    assert d["cold_mount"]["sysfs_kb"] == 128, d
    w = d["warm_mount"]
    assert w["bdi"] == w["new_bdis"][0] and w["read_ahead_kb"] == w["sysfs_kb"] == 512, w
    for m in (b["cold_mount"], b["warm_mount"]):
        assert m["bdi"] == m["new_bdis"][0], m
        assert m["read_ahead_kb"] == m["sysfs_kb"] == BUFFERED_READ_AHEAD_KB, m


@pytest.mark.slow
def test_fscache_debootstrap_rootfs(tmp_path: Path) -> None:
    import fscache_guest as g
    from fixtures_trees import ensure_debootstrap_rootfs

    vs.ensure_kernel()
    spec = g.build_rootfs_image(ensure_debootstrap_rootfs(), tmp_path / "rootfs")
    path = tmp_path / "rootfs.json"
    path.write_text(json.dumps(spec))
    r = _run_group("group_rootfs", path, timeout=1500)
    assert r["diffs"] == []
    assert r["requests"]["read_failed"] == 0 and r["requests"]["read"] > 0
    assert r["remaining"] == 0 and r["stopped"] is True
