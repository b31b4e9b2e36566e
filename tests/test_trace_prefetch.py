"""Access traces and background prefetch: the trace book, prefetch of an optimized
image's prefetch table (concurrency, bandwidth, failures), and on the host kernel the
whole loop: trace a workload, optimize, remount cold, fewer backend reads."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_support import (
    BuiltImage,
    build_image,
    daemon_metrics,
    daemon_status,
    fanotify_usable,
    metrics_after_prefetch,
    run_cli,
    wait_prefetch,
)

from erofs_nydus.builder.optimize import load_trace
from erofs_nydus.daemon.images import ImageTable, prefetch_settings
from erofs_nydus.daemon.prefetch import TokenBucket, prefetch_chunks
from erofs_nydus.daemon.trace import TraceBook
from erofs_nydus.errors import DigestMismatchError
from erofs_nydus.rafs.image import ChunkInfo
from erofs_nydus.rafs.reader import open_bootstrap
from erofs_nydus.rafs.tree import lookup
from erofs_nydus.service.api import ControlPlane

KiB = 1024


def _chunk(off: int) -> ChunkInfo:
    return ChunkInfo(b"\0" * 32, 0, off // 4096, off, 10, off, 4096, False)


# -- trace book ----------------------------------------------------------------------------


def test_trace_records_first_access_in_order_bounded() -> None:
    book = TraceBook(max_entries=3)
    book.add_image("f" * 64, ["b1", "b2"])
    book.add_image("e" * 64, ["b2"])  # shares b2
    book.on_access("b2", [_chunk(8192)])
    book.on_access("b1", [_chunk(0), _chunk(4096)])
    book.on_access("b2", [_chunk(8192)])  # again: not recorded twice
    book.on_access("zz", [_chunk(0)])  # unknown blob: ignored
    book.on_access("b1", [_chunk(12288)])  # beyond the bound: dropped, counted
    doc = book.document("f" * 64)
    assert doc is not None
    assert doc["version"] == 1 and doc["fsid"] == "f" * 64 and doc["blobs"] == ["b1", "b2"]
    assert [(a["blob"], a["offset"]) for a in doc["accesses"]] == [
        ("b2", 8192), ("b1", 0), ("b1", 4096)
    ]  # fmt: skip
    times = [a["t"] for a in doc["accesses"]]
    assert times == sorted(times) and times[0] >= 0
    assert doc["dropped"] == 1
    other = book.document("e" * 64)
    assert other is not None and [a["offset"] for a in other["accesses"]] == [8192]
    book.remove_image("f" * 64)
    assert book.document("f" * 64) is None
    book.on_access("b1", [_chunk(0)])  # no image traces b1 any more


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for i in range(24):
        d = src / f"d{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(50_000 + 997 * i))
    return src


def _optimized(tree: Path, work: Path, files: list[str]) -> tuple[BuiltImage, BuiltImage]:
    """(plain image, image optimized for `files`, blobs in the same dir)."""
    img = build_image(tree, work / "plain", "--chunk-size", "0x10000")
    (work / "list").write_text("\n".join(files) + "\n")
    opt = work / "opt.boot"
    run_cli("optimize", str(img.bootstrap), "-D", str(img.blob_dir), "--prefetch-list",
            str(work / "list"), "-B", str(opt))  # fmt: skip
    return img, BuiltImage(opt, img.blob_dir)


def _table_and_plane(cache: Path) -> tuple[ImageTable, ControlPlane]:
    cache.mkdir(parents=True, exist_ok=True)
    table = ImageTable(str(cache), durable=False)
    return table, ControlPlane(table)


def _wait_done(plane: ControlPlane, fsid: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        p = plane.prefetch.progress(fsid)
        assert p is not None
        if p["state"] != "running":
            return p
        assert time.monotonic() < deadline, p
        time.sleep(0.02)


def test_fill_and_lookup_are_traced_prefetch_is_not(tree: Path, tmp_path: Path) -> None:
    _img, opt = _optimized(tree, tmp_path, ["/d1/f4", "/d2/f5"])
    table, plane = _table_and_plane(tmp_path / "cache")
    info = table.register(str(opt.bootstrap), {"type": "local", "dir": str(opt.blob_dir)},
                          "/mnt/x")  # fmt: skip
    plane.registered(info["fsid"])
    fsid = info["fsid"]
    p = _wait_done(plane, fsid)
    assert p["state"] == "done" and p["total_chunks"] == p["done_chunks"] > 0
    assert p["failed_chunks"] == 0
    doc = plane.traces.document(fsid)
    assert doc is not None and doc["accesses"] == []  # prefetch is not an access
    (srv,) = table.blobs.values()
    r = open_bootstrap(str(opt.bootstrap))
    f7 = lookup(r.tree(), b"/d1/f7")
    assert f7 is not None
    c = f7.inode.chunks[0]
    srv.is_present(c.uncompressed_offset, 10)  # a kernel request answered from cache
    srv.fill(c.uncompressed_offset + 4096, 10)
    doc = plane.traces.document(fsid)
    assert doc is not None
    assert [a["offset"] for a in doc["accesses"]] == [c.uncompressed_offset]
    plane.detaching("/mnt/x")
    table.detach("/mnt/x")
    plane.detached()
    assert plane.traces.document(fsid) is None and not plane.prefetch.jobs
    plane.stop()


def test_prefetch_resolves_table_and_uses_few_backend_reads(tree: Path, tmp_path: Path) -> None:
    files = [f"/d{i % 3}/f{i}" for i in (3, 17, 8, 11)]
    _img, opt = _optimized(tree, tmp_path, files)
    chunks = prefetch_chunks(opt.bootstrap.read_bytes())
    r = open_bootstrap(str(opt.bootstrap))
    root = r.tree()
    want = [c for p in files for c in lookup(root, p.encode()).inode.chunks]  # type: ignore[union-attr]
    assert [(c.blob_index, c.uncompressed_offset) for c in chunks] == [
        (c.blob_index, c.uncompressed_offset) for c in want
    ]
    # optimized: contiguous from offset 0
    assert chunks[0].uncompressed_offset == 0
    table, plane = _table_and_plane(tmp_path / "cache")
    info = table.register(str(opt.bootstrap), {"type": "local", "dir": str(opt.blob_dir)},
                          "/mnt/x", prefetch=prefetch_settings({"prefetch_threads": 2}))
    plane.registered(info["fsid"])
    p = _wait_done(plane, info["fsid"])
    assert p["done_chunks"] == len(chunks) and p["threads"] == 2
    m = table.metrics.snapshot()
    total = sum(c.aligned_size for c in chunks)
    assert m["backend_requests"] <= total // (2 << 20) + 2  # a few large reads
    assert m["reads"] == 0  # prefetch is not counted as reads served
    (srv,) = table.blobs.values()
    data = Path(srv.cache.data_path).read_bytes()
    for path in files:
        node = lookup(root, path.encode())
        assert node is not None
        got = b"".join(
            data[k.uncompressed_offset : k.uncompressed_offset + k.uncompressed_size]
            for k in node.inode.chunks
        )
        assert got == (tree / path.lstrip("/")).read_bytes()
    plane.stop()
    table.close()


def test_no_prefetch_table_no_job_and_opt_out(tree: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import erofs_nydus.daemon.prefetch as prefetch

    img, opt = _optimized(tree, tmp_path, ["/d0/f0"])
    table, plane = _table_and_plane(tmp_path / "cache")
    info = table.register(str(img.bootstrap), {"type": "local", "dir": str(img.blob_dir)}, "/a")
    # no table: told by the ext superblock, the metadata is not parsed a second time
    with monkeypatch.context() as m:
        m.setattr(prefetch, "BootstrapReader", None)
        plane.registered(info["fsid"])
    assert plane.prefetch.progress(info["fsid"]) is None
    info2 = table.register(str(opt.bootstrap), {"type": "local", "dir": str(img.blob_dir)}, "/b",
                          prefetch=prefetch_settings({"prefetch": False}))
    plane.registered(info2["fsid"])
    assert plane.prefetch.progress(info2["fsid"]) is None
    plane.stop()
    table.close()


def test_token_bucket_limits_rate() -> None:
    stop = threading.Event()
    b = TokenBucket(rate=400 * KiB, burst=100 * KiB)
    t0 = time.monotonic()
    for _ in range(5):
        assert b.take(100 * KiB, stop)
    # 500 KiB with a 100 KiB burst at 400 KiB/s: at least ~0.75 s (debt of one take allowed)
    assert time.monotonic() - t0 >= 0.5
    drained = TokenBucket(rate=1, burst=1)
    assert drained.take(10, stop)  # debt of one take allowed
    stop.set()
    assert not drained.take(10, stop)  # stopped while waiting: gives up


def test_prefetch_bandwidth_limit_is_applied(tree: Path, tmp_path: Path) -> None:
    img, opt = _optimized(tree, tmp_path, [f"/d{i % 3}/f{i}" for i in range(12)])
    table, plane = _table_and_plane(tmp_path / "cache")
    info = table.register(str(opt.bootstrap), {"type": "local", "dir": str(img.blob_dir)}, "/a",
                          prefetch=prefetch_settings({"prefetch_bandwidth": 1 << 20}))
    t0 = time.monotonic()
    plane.registered(info["fsid"])
    p = _wait_done(plane, info["fsid"])
    assert p["state"] == "done" and p["bandwidth"] == 1 << 20
    # ~750 KB compressed-incompressible data, 2 MiB burst: no wait needed, just sanity
    assert time.monotonic() - t0 < 20
    plane.stop()
    table.close()


def _corrupt_first_prefetch_chunk(opt: BuiltImage) -> ChunkInfo:
    chunks = prefetch_chunks(opt.bootstrap.read_bytes())
    r = open_bootstrap(str(opt.bootstrap))
    bad = chunks[1]
    blob = opt.blob_dir / r.image.blobs[bad.blob_index].blob_id
    with open(blob, "r+b") as f:
        f.seek(bad.compressed_offset + 10)
        b = f.read(1)
        f.seek(bad.compressed_offset + 10)
        f.write(bytes([b[0] ^ 0xFF]))
    return bad


def test_prefetch_failure_is_counted_foreground_gets_error(tree: Path, tmp_path: Path) -> None:
    files = [f"/d{i % 3}/f{i}" for i in (3, 17, 8)]
    img, opt = _optimized(tree, tmp_path, files)
    bad = _corrupt_first_prefetch_chunk(opt)
    table, plane = _table_and_plane(tmp_path / "cache")
    info = table.register(str(opt.bootstrap), {"type": "local", "dir": str(img.blob_dir)}, "/a",
                          prefetch=prefetch_settings({"prefetch_threads": 3}))
    plane.registered(info["fsid"])
    p = _wait_done(plane, info["fsid"])
    assert p["state"] == "done" and p["failed_chunks"] >= 1
    assert p["done_chunks"] + p["failed_chunks"] == p["total_chunks"]
    assert table.metrics.snapshot()["digest_failures"] >= 1
    (srv,) = table.blobs.values()
    assert bad.index not in srv.cache.map
    with pytest.raises(DigestMismatchError):
        srv.fill(bad.uncompressed_offset, 1)  # the foreground read gets EIO, never junk
    root = open_bootstrap(str(opt.bootstrap)).tree()
    f8 = lookup(root, b"/d2/f8")
    assert f8 is not None
    if bad not in f8.inode.chunks:
        for c in f8.inode.chunks:
            srv.fill(c.uncompressed_offset, c.uncompressed_size)
            assert c.index in srv.cache.map
    plane.stop()
    table.close()


def test_optimize_rejects_trace_of_another_image_cli(tree: Path, tmp_path: Path) -> None:
    img, opt = _optimized(tree, tmp_path, ["/d0/f0"])
    r = open_bootstrap(str(opt.bootstrap))
    trace = {"version": 1, "fsid": r.image.fsid, "blobs": [b.blob_id for b in r.image.blobs],
             "accesses": [{"blob": r.image.blobs[0].blob_id, "offset": 0, "t": 0.0}]}
    (tmp_path / "t.json").write_text(json.dumps(trace))
    proc = run_cli(
        "optimize", str(img.bootstrap), "-D", str(img.blob_dir), "--trace",
        str(tmp_path / "t.json"), "-B", str(tmp_path / "o2.boot"), check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "another image" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "o2.boot").exists()


# -- host kernel -----------------------------------------------------------------------------

kernel = pytest.mark.skipif(
    not fanotify_usable(), reason="needs root and pre-content fanotify (Linux >= 6.14)"
)


def _mount(img: BuiltImage, mp: Path, cache: Path, *extra: str) -> None:
    mp.mkdir(parents=True, exist_ok=True)
    run_cli("mount", str(img.bootstrap), str(mp), "--blob-dir", str(img.blob_dir),
            "--cache-dir", str(cache), *extra)  # fmt: skip


def _umount(mp: Path, cache: Path) -> None:
    run_cli("umount", str(mp), "--cache-dir", str(cache), check=False)


@kernel
@pytest.mark.kernel
def test_prefetch_failure_on_mount_eio_for_bad_file_others_correct(
    tree: Path, tmp_path: Path
) -> None:
    files = [f"/d{i % 3}/f{i}" for i in (3, 17, 8)]
    _img, opt = _optimized(tree, tmp_path, files)
    bad = _corrupt_first_prefetch_chunk(opt)
    root = open_bootstrap(str(opt.bootstrap)).tree()
    bad_file = next(p for p in files if bad in lookup(root, p.encode()).inode.chunks)  # type: ignore[union-attr]
    cache, mp = tmp_path / "cache", tmp_path / "mp"
    _mount(opt, mp, cache)
    try:
        m = wait_prefetch(cache)
        assert m["prefetch"]["failed_chunks"] >= 1
        met = daemon_metrics(cache)
        assert met["erofs_nydus_prefetch_chunks{state=failed}"] >= 1
        assert met["erofs_nydus_digest_failures_total"] >= 1
        with pytest.raises(OSError):
            (mp / bad_file.lstrip("/")).read_bytes()
        for p in files:
            if p != bad_file:
                assert (mp / p.lstrip("/")).read_bytes() == (tree / p.lstrip("/")).read_bytes()
        assert (mp / "d0/f0").read_bytes() == (tree / "d0/f0").read_bytes()
    finally:
        _umount(mp, cache)


@kernel
@pytest.mark.kernel
def test_trace_cli_then_optimize_then_prefetch_on_small_tree(tree: Path, tmp_path: Path) -> None:
    img = build_image(tree, tmp_path / "plain", "--chunk-size", "0x10000")
    cache, mp = tmp_path / "cache", tmp_path / "mp"
    _mount(img, mp, cache, "--amplify", "0")
    workload = ["d2/f5", "d0/f12", "d1/f1"]
    try:
        for p in workload:
            assert (mp / p).read_bytes() == (tree / p).read_bytes()
        run_cli("trace", str(mp), "-o", str(tmp_path / "trace.json"))
    finally:
        _umount(mp, cache)
    trace = load_trace(str(tmp_path / "trace.json"))
    r = open_bootstrap(str(img.bootstrap))
    assert trace["fsid"] == r.image.fsid
    root = r.tree()
    want = [c.uncompressed_offset for p in workload
            for c in lookup(root, ("/" + p).encode()).inode.chunks]  # type: ignore[union-attr]
    got = [a["offset"] for a in trace["accesses"]]
    assert got[: len(want)] == want or sorted(got) == sorted(want)
    assert set(want) <= set(got)
    opt = BuiltImage(tmp_path / "opt.boot", img.blob_dir)
    run_cli("optimize", str(img.bootstrap), "-D", str(img.blob_dir), "--trace",
            str(tmp_path / "trace.json"), "-B", str(opt.bootstrap))  # fmt: skip
    cache2 = tmp_path / "cache2"
    _mount(opt, mp, cache2)
    try:
        m = wait_prefetch(cache2)
        assert m["prefetch"]["state"] == "done"
        assert m["prefetch"]["done_chunks"] == m["prefetch"]["total_chunks"] >= len(want)
        before = daemon_metrics(cache2)["erofs_nydus_backend_requests_total"]
        for p in workload:
            assert (mp / p).read_bytes() == (tree / p).read_bytes()
        after = daemon_metrics(cache2)["erofs_nydus_backend_requests_total"]
        assert after == before  # all prefetched
    finally:
        _umount(mp, cache2)


def _chroot_workload(mp: Path) -> None:
    ls = subprocess.run(["chroot", str(mp), "/bin/ls", "/"], capture_output=True, text=True,
                        timeout=300, check=False)  # fmt: skip
    assert ls.returncode == 0 and "usr" in ls.stdout.split(), ls.stderr
    dpkg = subprocess.run(["chroot", str(mp), "dpkg", "-l"], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert dpkg.returncode == 0 and "ii  dpkg " in dpkg.stdout, dpkg.stderr


@kernel
@pytest.mark.kernel
@pytest.mark.slow
def test_debootstrap_traced_optimized_cold_start_fetches_less(
    debootstrap_rootfs: Path, tmp_path: Path
) -> None:
    img = build_image(debootstrap_rootfs, tmp_path / "plain")
    mp = tmp_path / "rootfs"
    # 1. unoptimized, cold: the workload, traced
    cache1 = tmp_path / "cache1"
    _mount(img, mp, cache1)
    try:
        _chroot_workload(mp)
        plain = daemon_metrics(cache1)
        run_cli("trace", str(mp), "-o", str(tmp_path / "trace.json"))
    finally:
        _umount(mp, cache1)
    trace = load_trace(str(tmp_path / "trace.json"))
    assert len(trace["accesses"]) > 5
    # 2. optimize by the trace
    opt = BuiltImage(tmp_path / "opt.boot", tmp_path / "optblobs")
    run_cli("optimize", str(img.bootstrap), "-D", str(img.blob_dir), "--trace",
            str(tmp_path / "trace.json"), "-B", str(opt.bootstrap), "--output-blob-dir",
            str(opt.blob_dir))  # fmt: skip
    # 3. optimized, cold (fresh cache dir): let prefetch finish, then the workload
    cache2 = tmp_path / "cache2"
    _mount(opt, mp, cache2)
    try:
        after_prefetch = metrics_after_prefetch(cache2)
        _chroot_workload(mp)
        optimized = daemon_metrics(cache2)
    finally:
        _umount(mp, cache2)
    req = "erofs_nydus_backend_requests_total"
    byt = "erofs_nydus_backend_fetched_bytes_total"
    fg_requests = optimized[req] - after_prefetch[req]
    print(
        f"\nunoptimized: {plain[req]:.0f} backend requests, {plain[byt]:.0f} bytes; "
        f"optimized+prefetch: {optimized[req]:.0f} requests ({fg_requests:.0f} foreground), "
        f"{optimized[byt]:.0f} bytes"
    )
    assert optimized[req] < plain[req]
    assert optimized[byt] < plain[byt]
    assert fg_requests < plain[req] / 4  # the workload itself barely reaches the backend
    assert optimized["erofs_nydus_requests_denied_total"] == 0


@kernel
@pytest.mark.kernel
def test_prefetch_resumes_after_daemon_kill_9(tmp_path: Path) -> None:
    """The supervisor keeps each blob's cache-file fd (opened before the file was
    marked) and hands it to the restarted daemon, which resumes the prefetch of the
    restored image; the workload then reads everything from the cache."""
    src = tmp_path / "src"
    src.mkdir()
    files = [f"f{i:02d}" for i in range(32)]
    for name in files:
        (src / name).write_bytes(os.urandom(256 * KiB))
    _img, opt = _optimized(src, tmp_path, [f"/{n}" for n in files])
    cache, mp = tmp_path / "cache", tmp_path / "mp"
    _mount(opt, mp, cache, "--amplify", "0", "--prefetch-bandwidth", "1M")
    try:
        from erofs_nydus.service.api_client import ApiClient

        deadline = time.monotonic() + 30
        while True:  # part of the 8 MiB is prefetched, the rest waits for bandwidth
            (m,) = ApiClient(cache).get_json("/api/v1/mounts")
            p = m["prefetch"]
            assert p is not None and p["state"] == "running", p
            if p["done_chunks"] >= 8:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pid = daemon_status(cache)["pid"]
        os.kill(pid, 9)
        deadline = time.monotonic() + 30
        while True:
            try:
                if daemon_status(cache)["pid"] != pid:
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.05)
        m = wait_prefetch(cache)
        assert m["prefetch"] is not None, "the restarted daemon did not resume the prefetch"
        assert m["prefetch"]["state"] == "done" and m["prefetch"]["failed_chunks"] == 0
        st = daemon_status(cache)
        assert all(b["present"] == b["size"] for b in st["blobs"].values()), st["blobs"]
        before = daemon_metrics(cache)["erofs_nydus_backend_requests_total"]
        for name in files:
            assert (mp / name).read_bytes() == (src / name).read_bytes()
        assert daemon_metrics(cache)["erofs_nydus_backend_requests_total"] == before
    finally:
        _umount(mp, cache)
