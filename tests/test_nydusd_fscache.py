"""nydusd's fscache mode and registry_token on the host: the blob entry body the snapshotter
PUTs, images registered under a caller's fsid (what its `mount -o fsid=` needs), the one-line
refusal where the kernel has no cachefiles on-demand, and `registry_token` sent as a bearer
token to its registry only.  The mount itself runs in the VM (test_nydusd_fscache_vm.py)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from daemon_support import build_image
from fault_registry import FaultRegistry, digest_of, redirect

from erofs_nydus.daemon.images import ImageTable, requested_fsid
from erofs_nydus.errors import DaemonError, UsageError
from erofs_nydus.service.nydusd import parse_argv
from erofs_nydus.service.nydusd_config import parse_blob_request, parse_nydusd_config

NYDUSD = [sys.executable, "-m", "erofs_nydus.service.nydusd"]
FSID = "a" * 64


def entry(boot: str, backend: dict, **over: object) -> bytes:
    doc = {"type": "bootstrap", "id": FSID, "domain_id": "shared-d",
           "config": {"id": FSID, "backend_type": backend["type"],
                      "backend_config": backend["config"], "cache_type": "fscache",
                      "cache_config": {"work_dir": "/var/lib/snap/1/fs"},
                      "prefetch_config": {"enable": True, "threads_count": 8},
                      "metadata_path": boot}}
    doc.update(over)
    return json.dumps(doc).encode()


def test_blob_entry_body_as_the_snapshotter_sends_it(tmp_path: Path) -> None:
    token = "tok-123"
    body = entry("/snap/1/fs/image/image.boot", {"type": "registry", "config": {
        "host": "127.0.0.1:5000", "repo": "lib/app", "scheme": "http",
        "registry_token": token}})
    req = parse_blob_request(body, str(tmp_path / "cache"))
    assert (req.id, req.domain_id, req.bootstrap) == \
        (FSID, "shared-d", "/snap/1/fs/image/image.boot")
    assert req.prefetch is True
    # our cache dir, not the snapshot's work_dir; the token never enters the spec
    assert req.config.cache_dir == str(tmp_path / "cache")
    assert req.config.backend["repo"] == "127.0.0.1:5000/lib/app"
    assert token not in json.dumps(req.config.backend)
    # without domain_id the domain is the id (as the snapshotter defaults it)
    req2 = parse_blob_request(entry("/b", {"type": "localfs", "config": {"dir": "/x"}},
                                    domain_id=""), str(tmp_path))
    assert req2.domain_id == FSID and req2.config.backend == {"type": "local", "dir": "/x"}


@pytest.mark.parametrize("over, words", [
    ({"type": "datablob"}, "bootstrap"),
    ({"id": "", "config": {"metadata_path": "/b", "backend_type": "localfs",
                           "backend_config": {"dir": "/x"}}}, "lacks id"),
    ({"config": {"backend_type": "localfs", "backend_config": {"dir": "/x"}}}, "metadata_path"),
])
def test_bad_blob_entry_is_a_usage_error(over: dict, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        parse_blob_request(entry("/b", {"type": "localfs", "config": {"dir": "/x"}}, **over),
                           "/tmp")


def test_image_registered_under_the_callers_fsid(tmp_path: Path) -> None:
    srcs = []
    for name in ("a", "b"):
        src = tmp_path / f"src-{name}"
        src.mkdir()
        (src / "f").write_bytes(os.urandom(70_000))
        srcs.append(src)
    img = build_image(srcs[0], tmp_path / "a")
    other = build_image(srcs[1], tmp_path / "b")
    cache = tmp_path / "cache"
    cache.mkdir()
    table = ImageTable(str(cache))
    backend = {"type": "local", "dir": str(img.blob_dir)}
    info = table.register(str(img.bootstrap), backend, "/nydusd-fscache/d/x", fsid=FSID)
    assert info["fsid"] == FSID and FSID in table.images
    assert (cache / f"{FSID}.boot").read_bytes() == img.bootstrap.read_bytes()
    # the kernel's OPEN of cookie FSID gets the validated copy, also from a restarted
    # daemon (the name is not the content digest: the entry keeps that)
    assert table.stored_bootstrap(FSID) == str(cache / f"{FSID}.boot")
    restored = ImageTable(str(cache))
    restored.load_state()
    assert restored.stored_bootstrap(FSID) == str(cache / f"{FSID}.boot")
    restored.close()
    # another image under that name while registered: refused, the first one untouched
    with pytest.raises(DaemonError, match="registered for another image"):
        table.register(str(other.bootstrap), {"type": "local", "dir": str(other.blob_dir)},
                       "/nydusd-fscache/d/y", fsid=FSID)
    assert (cache / f"{FSID}.boot").read_bytes() == img.bootstrap.read_bytes()
    # once released, the name may name other bytes
    assert table.detach("/nydusd-fscache/d/x") == 0
    table.register(str(other.bootstrap), {"type": "local", "dir": str(other.blob_dir)},
                   "/nydusd-fscache/d/y", fsid=FSID)
    assert (cache / f"{FSID}.boot").read_bytes() == other.bootstrap.read_bytes()
    table.close()


@pytest.mark.parametrize("bad", ["", "a.1", "a/b", "x,y", 7, "z" * 129])
def test_requested_fsid_is_a_safe_name(bad: object) -> None:
    with pytest.raises(UsageError):
        requested_fsid({"fsid": bad})
    assert requested_fsid({}) is None and requested_fsid({"fsid": "ab-C_9"}) == "ab-C_9"


def test_singleton_argv_needs_fscache() -> None:
    with pytest.raises(UsageError, match="--fscache"):
        parse_argv(["singleton", "--apisock", "/s"])


@pytest.mark.skipif(os.path.exists("/dev/cachefiles"), reason="this kernel has cachefiles")
def test_singleton_without_cachefiles_is_one_line(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    p = subprocess.run([*NYDUSD, "singleton", "--fscache", str(tmp_path / "c"),
                        "--fscache-threads", "2", "--apisock", str(sock),
                        "--log-file", str(tmp_path / "nydusd.log")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0, p.stderr
    assert "fscache mode is not available here" in p.stderr and "cachefiles" in p.stderr
    assert p.stderr.strip() in (tmp_path / "nydusd.log").read_text()  # where the snapshotter
    assert not sock.exists()  # looks


def _ranged(data: bytes):  # type: ignore[no-untyped-def]
    def answer(h: BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range", "")
        lo, hi = 0, len(data) - 1
        if rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            lo, hi = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
        body = data[lo:hi + 1]
        h.send_response(206 if rng else 200)
        if rng:
            h.send_header("Content-Range", f"bytes {lo}-{hi}/{len(data)}")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    return answer


def _token_gate(token: str, then):  # type: ignore[no-untyped-def]
    def answer(h: BaseHTTPRequestHandler) -> None:
        if h.headers.get("Authorization") != f"Bearer {token}":
            h.send_response(401)
            h.send_header("WWW-Authenticate", 'Bearer realm="http://127.0.0.1:9/token"')
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        then(h)
    return answer


def test_registry_token_is_sent_to_its_registry_only(tmp_path: Path) -> None:
    from erofs_nydus.daemon.images import make_backend

    data = os.urandom(300_000)
    blob_id = digest_of(data).split(":", 1)[1]
    storage = FaultRegistry("127.0.0.2")  # where the registry redirects blob reads
    reg = FaultRegistry()
    try:
        storage.route("/store/*", _ranged(data))
        reg.route(f"/v2/lib/app/blobs/sha256:{blob_id}",
                  _token_gate("s3cr3t", redirect(f"http://{storage.host}/store/{blob_id}")))

        def config(token: str | None) -> bytes:
            inner: dict = {"host": reg.host, "repo": "lib/app", "scheme": "http"}
            if token is not None:
                inner["registry_token"] = token
            return entry("/b", {"type": "registry", "config": inner})

        req = parse_blob_request(config("s3cr3t"), str(tmp_path / "cache"))
        req.config.write_credentials()
        auth_dir = Path(req.config.backend["docker_config"])
        assert oct(auth_dir.stat().st_mode & 0o777) == "0o700"
        assert oct((auth_dir / "config.json").stat().st_mode & 0o777) == "0o600"
        backend = make_backend(req.config.backend)
        try:
            assert backend.read_range(blob_id, 4096, 8192) == data[4096:4096 + 8192]
        finally:
            backend.close()
        to_reg = [s for s in reg.requests if s.path.startswith("/v2/lib/")]
        assert to_reg and all(s.headers.get("Authorization") == "Bearer s3cr3t"
                              for s in to_reg)
        assert storage.requests and all("Authorization" not in s.headers
                                        for s in storage.requests)
        # a wrong token: one clear error, no retry loop with other credentials
        n = len(reg.requests)
        bad = parse_blob_request(config("wrong"), str(tmp_path / "cache"))
        bad.config.write_credentials()
        backend = make_backend(bad.config.backend)
        try:
            with pytest.raises(Exception, match=r"401|refused|denied"):
                backend.read_range(blob_id, 0, 4096)
        finally:
            backend.close()
        assert 1 <= len(reg.requests) - n <= 2
    finally:
        reg.close()
        storage.close()


def test_registry_token_and_auth_together_in_fusedev_config(tmp_path: Path) -> None:
    auth = base64.b64encode(b"u:p").decode()
    cfg = parse_nydusd_config(json.dumps({"device": {
        "backend": {"type": "registry", "config": {"host": "h:1", "repo": "r", "auth": auth,
                                                   "registry_token": "T"}},
        "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path)}}}}))
    cfg.write_credentials()
    doc = json.loads((Path(cfg.backend["docker_config"]) / "config.json").read_text())
    assert doc == {"auths": {"h:1": {"auth": auth, "registrytoken": "T"}}}
    with pytest.raises(UsageError, match="registry_token"):
        parse_nydusd_config(json.dumps({"backend": {"type": "registry", "config": {
            "host": "h:1", "repo": "r", "registry_token": "a b"}}}),
            default_cache_dir=str(tmp_path))


def test_delete_without_a_daemon_still_removes_the_files(tmp_path: Path) -> None:
    """The snapshotter's DELETEs that find no fscache daemon (it stopped, or died with
    entries in its state file) still remove what the entries and the blob kept."""
    from erofs_nydus.daemon.images import STATE_FILE
    from erofs_nydus.service.nydusd_fscache import FscacheBindings

    cache = tmp_path / "cache"
    kdir = cache / "fscache" / "cache" / "Ierofs,d" / "@4f"
    kdir.mkdir(parents=True)
    bid, other = "b" * 64, "c" * 64
    kept = [cache / f"{FSID}.boot", cache / f"{bid}.blob.data", cache / f"{bid}.chunk_map",
            kdir / f"D{FSID}", kdir / f"D{bid}"]
    for f in [*kept, cache / f"{other}.blob.data"]:
        f.write_bytes(b"x")
    (cache / STATE_FILE).write_text(json.dumps({"version": 1, "images": [
        {"fsid": FSID, "bootstrap": str(cache / f"{FSID}.boot"), "blob_ids": [bid],
         "backend": {}, "mountpoints": [f"/nydusd-fscache/d/{FSID}"]}]}))
    b = FscacheBindings(str(cache))
    b.started = True  # it registered entries, and its daemon died with them
    assert b.daemon_gone()
    b.unbind("d", FSID)  # the entry: its bootstrap copy and cachefiles' file
    assert not (cache / f"{FSID}.boot").exists() and not (kdir / f"D{FSID}").exists()
    b.unbind(None, bid)  # the data blob
    assert not any(f.exists() for f in kept), [f for f in kept if f.exists()]
    assert (cache / f"{other}.blob.data").exists()  # nobody asked for that one
    # a daemon that stopped with nothing left did not die: no reason to exit
    (cache / STATE_FILE).write_text(json.dumps({"version": 1, "images": []}))
    b.started = True
    assert not b.daemon_gone() and not b.started


def test_delete_while_the_daemon_stops_by_itself_removes_the_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshotter unmounts, then DELETEs: the kernel's last CLOSEs make the fscache
    daemon stop by itself, and a request of the DELETE finds its socket reset (seen in
    test_nydusd_fscache_vm: a 500 to the snapshotter).  The DELETE waits for it to go
    and removes the files without it (fault injection: the daemon is a stand-in)."""
    from erofs_nydus.service.client import DaemonUnreachable
    from erofs_nydus.service.nydusd_fscache import FscacheBindings

    cache = tmp_path / "cache"
    kdir = cache / "fscache" / "cache" / "Ierofs,d" / "@4f"
    kdir.mkdir(parents=True)
    kept = [cache / f"{FSID}.boot", kdir / f"D{FSID}"]
    for f in kept:
        f.write_bytes(b"x")

    class Stopping:
        """Alive at first; its next request is reset; then it is gone."""

        def __init__(self) -> None:
            self.stopped = False
            self.waited = 0

        def alive(self) -> bool:
            return not self.stopped

        def request(self, op: str, **args: object) -> dict:
            self.stopped = True
            raise DaemonUnreachable(f"{op}: [Errno 104] Connection reset by peer")

        def supervisor_running(self) -> bool:
            self.waited += 1
            return self.waited < 3  # it takes a moment to exit

    daemon = Stopping()
    b = FscacheBindings(str(cache))
    monkeypatch.setattr(b, "client", lambda: daemon)
    b.unbind(None, FSID)
    assert daemon.waited >= 3  # waited for it to go
    assert not any(f.exists() for f in kept), [f for f in kept if f.exists()]
