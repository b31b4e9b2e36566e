"""`erofs-nydus cache ls|du|gc`: usage from the daemon state, gc of unused files only,
budgets oldest first; on the host kernel, gc next to a live mount never breaks it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from daemon_support import build_image, fanotify_usable, run_cli

from erofs_nydus.service.cache import gc_cache, scan_cache


def _blob(cache: Path, bid: str, nbytes: int, age: float) -> None:
    data = cache / f"{bid}.blob.data"
    with open(data, "wb") as f:
        f.truncate(1 << 20)
        f.write(os.urandom(nbytes))
    (cache / f"{bid}.chunk_map").write_bytes(b"\1" * 8)
    t = time.time() - age
    for p in (data, cache / f"{bid}.chunk_map"):
        os.utime(p, (t, t))


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    c = tmp_path / "cache"
    c.mkdir()
    a, b, o = "a" * 64, "b" * 64, "c" * 64
    _blob(c, a, 64 << 10, age=300)
    _blob(c, b, 128 << 10, age=200)
    _blob(c, o, 256 << 10, age=100)
    for fsid in ("1" * 64, "2" * 64):
        (c / f"{fsid}.boot").write_bytes(b"x" * 8192)
    state = {"version": 1, "images": [
        {"fsid": "1" * 64, "bootstrap": str(c / ("1" * 64 + ".boot")), "blob_ids": [a],
         "backend": {"type": "local", "dir": "/b"}, "amplify": 0,
         "mountpoints": [str(c / "not-mounted")]},
    ]}  # fmt: skip
    (c / "daemon-state.json").write_text(json.dumps(state))
    return c


def test_ls_reports_sizes_presence_and_users(cache: Path) -> None:
    rep = scan_cache(str(cache))
    assert not rep.daemon_running
    blobs = {e.id[0]: e for e in rep.entries if e.kind == "blob"}
    assert set(blobs) == {"a", "b", "c"}
    assert blobs["a"].size == 1 << 20 and 64 << 10 <= blobs["a"].present < 1 << 20
    assert blobs["a"].images == ["1" * 64] and blobs["a"].mounts == []  # not mounted: stale
    assert not any(e.in_use for e in rep.entries)
    out = run_cli("cache", "ls", "--cache-dir", str(cache)).stdout
    assert "blob aaaaaaaaaaaaaaaa" in out and "images 111111111111" in out and "total:" in out
    doc = json.loads(run_cli("cache", "ls", "--cache-dir", str(cache), "--json").stdout)
    assert doc["total_size"] == 3 * (1 << 20) + 2 * 8192 and len(doc["entries"]) == 5
    du = json.loads(run_cli("cache", "du", "--cache-dir", str(cache), "--json").stdout)
    assert du["in_use"] == 0 and du["reclaimable"] == du["disk"] > 0


def test_gc_budget_removes_oldest_unused_first(cache: Path) -> None:
    before = scan_cache(str(cache)).disk
    a_disk = next(e.disk for e in scan_cache(str(cache)).entries if e.id.startswith("a"))
    # a budget just below the total: only the oldest entry (blob a) goes
    proc = run_cli("cache", "gc", "--cache-dir", str(cache), "--budget", str(before - 1))
    assert "removed blob aaaaaaaaaaaaaaaa" in proc.stdout and "removed 1 entries" in proc.stdout
    assert not (cache / ("a" * 64 + ".blob.data")).exists()
    assert not (cache / ("a" * 64 + ".chunk_map")).exists()
    assert scan_cache(str(cache)).disk == before - a_disk
    # dry run says, does nothing
    out = run_cli("cache", "gc", "--cache-dir", str(cache), "--dry-run").stdout
    assert "would remove 4 entries" in out and (cache / ("b" * 64 + ".blob.data")).exists()
    _, gone = gc_cache(str(cache))
    assert len(gone) == 4
    assert sorted(os.listdir(cache)) == ["daemon-state.json"]


def test_missing_cache_dir_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("cache", "ls", "--cache-dir", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 2 and "no such cache dir" in proc.stderr
    assert proc.stderr.count("\n") == 1
    (tmp_path / "daemon-state.json").write_text("{broken")
    proc = run_cli("cache", "gc", "--cache-dir", str(tmp_path), check=False)
    assert proc.returncode == 2 and "unreadable daemon state" in proc.stderr


@pytest.mark.kernel
@pytest.mark.skipif(not fanotify_usable(), reason="needs root and pre-content fanotify")
def test_gc_next_to_a_live_mount(tmp_path: Path) -> None:
    srcs = []
    for n in ("one", "two"):
        src = tmp_path / f"src-{n}"
        src.mkdir()
        for i in range(4):
            (src / f"{n}{i}").write_bytes(os.urandom(200_000 + i))
        srcs.append(src)
    one = build_image(srcs[0], tmp_path / "img1")
    two = build_image(srcs[1], tmp_path / "img2")
    cache = tmp_path / "cache"
    conf = tmp_path / "c.toml"
    conf.write_text(f'[daemon]\ncache_dir = "{cache}"\n[prefetch]\nenable = false\n')
    mp1, mp2 = tmp_path / "mp1", tmp_path / "mp2"
    mp1.mkdir()
    mp2.mkdir()
    # cache dir from the config file, no --cache-dir flag
    run_cli("mount", str(one.bootstrap), str(mp1), "--blob-dir", str(one.blob_dir),
            "--config", str(conf))  # fmt: skip
    try:
        run_cli("mount", str(two.bootstrap), str(mp2), "--blob-dir", str(two.blob_dir),
                "--config", str(conf))  # fmt: skip
        assert (mp2 / "two1").read_bytes() == (srcs[1] / "two1").read_bytes()
        assert (mp1 / "one0").read_bytes() == (srcs[0] / "one0").read_bytes()
        run_cli("umount", str(mp2))
        rep = scan_cache(str(cache))
        assert rep.daemon_running
        used = {e.id for e in rep.entries if e.in_use}
        unused = {e.id for e in rep.entries if not e.in_use}
        assert len(used) == 2 and len(unused) == 2  # blob + bootstrap of each image
        ls = run_cli("cache", "ls", "--cache-dir", str(cache)).stdout
        assert f"mounted at {mp1}" in ls
        out = run_cli("cache", "gc", "--cache-dir", str(cache), "--budget", "0").stdout
        assert "removed 2 entries" in out and "the rest is in use" in out
        assert {e.id for e in scan_cache(str(cache)).entries} == used
        for i in range(4):  # the live mount still reads correctly, lazily
            assert (mp1 / f"one{i}").read_bytes() == (srcs[0] / f"one{i}").read_bytes()
    finally:
        run_cli("umount", str(mp1), "--cache-dir", str(cache), check=False)
        run_cli("umount", str(mp2), "--cache-dir", str(cache), check=False)


def test_gc_never_removes_what_a_starting_mount_just_took(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon registering an image between gc's scan and its removals (issue 11 item 7):
    the registration waits for gc, so the files it uses exist afterwards."""
    import threading

    from erofs_nydus.daemon.images import ImageTable
    from erofs_nydus.service import cache as cachemod

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x" * 200_000)
    img = build_image(src, tmp_path / "out")
    cdir = tmp_path / "cache"
    cdir.mkdir()
    backend = {"type": "local", "dir": str(img.blob_dir)}
    first = ImageTable(str(cdir), durable=False)
    first.register(str(img.bootstrap), backend, str(tmp_path / "m1"))
    first.detach(str(tmp_path / "m1"))
    first.close()
    (cdir / "daemon-state.json").unlink()  # no daemon, no image: everything is unused
    table = ImageTable(str(cdir), durable=False)
    registered = threading.Event()
    real_scan = cachemod.scan_cache

    def scan_then_race(cache_dir: str) -> cachemod.CacheReport:
        report = real_scan(cache_dir)

        def mount() -> None:
            table.register(str(img.bootstrap), backend, str(tmp_path / "m2"))
            registered.set()

        threading.Thread(target=mount, daemon=True).start()
        registered.wait(1.0)  # without the lock, the registration completes here
        return report

    monkeypatch.setattr(cachemod, "scan_cache", scan_then_race)
    _, removed = cachemod.gc_cache(str(cdir))
    assert removed  # gc did remove the unused files it saw
    assert registered.wait(30)
    (srv,) = table.blobs.values()
    st = os.stat(srv.cache.data_path)
    assert (st.st_dev, st.st_ino) == srv.cache.dev_ino
    (fsid,) = table.images
    assert (cdir / f"{fsid}.boot").exists()
    table.close()
