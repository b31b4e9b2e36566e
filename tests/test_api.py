"""Control API over its real unix socket: endpoints, 404s, socket mode, Prometheus text;
in-process (no kernel) and through a real daemon with `erofs-nydus ctl`."""

from __future__ import annotations

import json
import os
import stat
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_support import BuiltImage, build_image, fanotify_usable, run_cli
from prometheus_client.parser import text_string_to_metric_families

from erofs_nydus.daemon.images import ImageTable
from erofs_nydus.errors import UsageError
from erofs_nydus.service.api import ControlPlane
from erofs_nydus.service.api_client import ApiClient
from erofs_nydus.service.paths import api_socket_path


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    base = tmp_path_factory.mktemp("apiimg")
    src = base / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(os.urandom(90_000 * (i + 1)))
    return build_image(src, base / "out", "--chunk-size", "0x10000")


@pytest.fixture
def served(image: BuiltImage, tmp_path: Path) -> Iterator[tuple[ControlPlane, str]]:
    cache = tmp_path / "cache"
    cache.mkdir()
    table = ImageTable(str(cache), durable=False)
    plane = ControlPlane(table, request_stats=lambda: {"events": 7, "hits": 3, "denied": 0})
    info = table.register(str(image.bootstrap), {"type": "local", "dir": str(image.blob_dir)},
                          "/mnt/api test")  # fmt: skip
    plane.registered(info["fsid"])
    plane.start()
    try:
        yield plane, str(info["fsid"])
    finally:
        plane.stop()
        table.close()


def _families(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = [(s.name, dict(s.labels), s.value) for s in fam.samples]
    return out


def test_socket_is_private_and_endpoints_answer(served: tuple[ControlPlane, str]) -> None:
    plane, fsid = served
    path = api_socket_path(plane.table.cache_dir)
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    api = ApiClient(plane.table.cache_dir)
    d = api.get_json("/api/v1/daemon")
    assert d["pid"] == os.getpid() and d["state"] == "running" and d["mode"] == "fanotify"
    assert d["mounts"] == ["/mnt/api test"] and d["version"]
    (m,) = api.get_json("/api/v1/mounts")
    assert m["fsid"] == fsid and m["mountpoints"] == ["/mnt/api test"]
    by_mp = api.get_json(ApiClient.mount_path("/mnt/api test"))
    by_fsid = api.get_json(ApiClient.mount_path(fsid[:16]))
    assert by_mp["fsid"] == by_fsid["fsid"] == fsid
    blobs = api.get_json("/api/v1/blobs")
    (b,) = blobs.values()
    assert b["present"] == 0 and b["size"] > 0 and b["fill_ratio"] == 0
    (srv,) = plane.table.blobs.values()
    srv.fill(0, 1)
    (b,) = api.get_json("/api/v1/blobs").values()
    assert b["present"] > 0
    tr = api.get_json(ApiClient.mount_path("/mnt/api test") + "/trace")
    assert tr["version"] == 1 and tr["fsid"] == fsid and tr["accesses"][0]["offset"] == 0


def test_unknown_mount_is_404_with_message(served: tuple[ControlPlane, str]) -> None:
    plane, _ = served
    api = ApiClient(plane.table.cache_dir)
    for key in ("/no/such/mount", "deadbeefdeadbeef", "x"):
        status, body = api.get(ApiClient.mount_path(key))
        assert status == 404
        doc = json.loads(body)
        assert doc["code"] == 404 and "no" in doc["error"]
    status, body = api.get("/api/v1/nothing")
    assert status == 404 and "no such endpoint" in json.loads(body)["error"]
    with pytest.raises(UsageError, match="no image is mounted at /no/such"):
        api.get_json(ApiClient.mount_path("/no/such/mount"))
    status, _ = api.get("/api/v1/mounts/" + urllib.parse.quote("/nope", safe="") + "/trace")
    assert status == 404


def test_metrics_parse_as_prometheus_text(served: tuple[ControlPlane, str]) -> None:
    plane, _ = served
    (srv,) = plane.table.blobs.values()
    srv.fill(0, 1)
    srv.fill(0, 1)  # a hit
    fams = _families(ApiClient(plane.table.cache_dir).metrics())
    def value(fam: str, sample: str | None = None, **labels: str) -> float:
        for name, lab, v in fams[fam]:
            if name == (sample or fam) and all(lab.get(k) == x for k, x in labels.items()):
                return v
        raise KeyError(fam)

    assert value("erofs_nydus_requests", "erofs_nydus_requests_total") == 7
    assert value("erofs_nydus_cache_hits", "erofs_nydus_cache_hits_total") == 3
    assert value("erofs_nydus_fills", "erofs_nydus_fills_total") == 2
    assert value("erofs_nydus_backend_requests", "erofs_nydus_backend_requests_total") >= 1
    assert value("erofs_nydus_backend_fetched_bytes", "erofs_nydus_backend_fetched_bytes_total") > 0
    assert value("erofs_nydus_digest_failures", "erofs_nydus_digest_failures_total") == 0
    assert value("erofs_nydus_backend_retries", "erofs_nydus_backend_retries_total") == 0
    lat = "erofs_nydus_fetch_latency_seconds"
    assert value(lat, f"{lat}_count") == 1
    assert value(lat, f"{lat}_bucket", le="+Inf") == 1
    assert value("erofs_nydus_prefetch_chunks", state="total") == 0
    assert value("erofs_nydus_mounts") == 1
    assert value("erofs_nydus_blob_cache_bytes", kind="present") > 0


def test_no_daemon_is_a_one_line_error(tmp_path: Path) -> None:
    proc = run_cli("ctl", "info", "--cache-dir", str(tmp_path), check=False)
    assert proc.returncode != 0 and "no daemon serves" in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.kernel
@pytest.mark.skipif(not fanotify_usable(), reason="needs root and pre-content fanotify")
def test_ctl_against_a_real_daemon(image: BuiltImage, tmp_path: Path) -> None:
    cache, mp = tmp_path / "cache", tmp_path / "mp"
    mp.mkdir()
    run_cli("mount", str(image.bootstrap), str(mp), "--blob-dir", str(image.blob_dir),
            "--cache-dir", str(cache))  # fmt: skip
    try:
        assert (mp / "f2").read_bytes() == (image.bootstrap.parent.parent / "src/f2").read_bytes()
        sock = api_socket_path(cache)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        info = json.loads(run_cli("ctl", "info", "--cache-dir", str(cache), "--json").stdout)
        assert info["mounts"] == [str(mp)] and info["pid"] != os.getpid()
        mounts = run_cli("ctl", "mounts", "--cache-dir", str(cache)).stdout
        assert str(mp) in mounts and "trace:" in mounts
        one = json.loads(run_cli("ctl", "mounts", str(mp), "--cache-dir", str(cache),
                                 "--json").stdout)  # fmt: skip
        assert one["mountpoints"] == [str(mp)] and one["trace"]["chunks"] > 0
        bad = run_cli("ctl", "mounts", "/nowhere", "--cache-dir", str(cache), check=False)
        assert bad.returncode != 0 and "no image is mounted at /nowhere" in bad.stderr
        text = run_cli("ctl", "metrics", "--cache-dir", str(cache)).stdout
        fams = _families(text)
        (req,) = fams["erofs_nydus_requests"]
        assert req[2] > 0
        (bf,) = fams["erofs_nydus_backend_fetched_bytes"]
        assert bf[2] > 0
        blobs = run_cli("ctl", "blobs", "--cache-dir", str(cache)).stdout
        assert "%" in blobs
    finally:
        run_cli("umount", str(mp), "--cache-dir", str(cache), check=False)
    assert not os.path.exists(api_socket_path(cache))  # removed with the daemon


@pytest.mark.kernel
@pytest.mark.skipif(not fanotify_usable(), reason="needs root and pre-content fanotify")
def test_api_comes_back_after_kill_9_with_restored_trace(image: BuiltImage, tmp_path: Path) -> None:
    import signal
    import time

    cache, mp = tmp_path / "cache", tmp_path / "mp"
    mp.mkdir()
    run_cli("mount", str(image.bootstrap), str(mp), "--blob-dir", str(image.blob_dir),
            "--cache-dir", str(cache), "--amplify", "0")  # fmt: skip
    src = image.bootstrap.parent.parent / "src"
    try:
        assert (mp / "f1").read_bytes() == (src / "f1").read_bytes()
        api = ApiClient(cache)
        pid = api.get_json("/api/v1/daemon")["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            try:
                d = api.get_json("/api/v1/daemon")
                if d["pid"] != pid:
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, "API did not come back"
            time.sleep(0.1)
        assert stat.S_IMODE(os.stat(api_socket_path(cache)).st_mode) == 0o600
        assert (mp / "f4").read_bytes() == (src / "f4").read_bytes()
        (m,) = api.get_json("/api/v1/mounts")
        assert m["mountpoints"] == [str(mp)] and m["trace"]["chunks"] > 0  # traced again
    finally:
        run_cli("umount", str(mp), "--cache-dir", str(cache), check=False)
