"""ImageTable: registration, sharing, persistence and restore (no kernel needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from daemon_support import BuiltImage, build_image

from erofs_nydus.daemon.core import BlobServer
from erofs_nydus.daemon.images import STATE_FILE, ImageTable
from erofs_nydus.errors import BackendError, DaemonError, FormatError


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    base = tmp_path_factory.mktemp("img")
    src = base / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(bytes([i]) * (70_000 * (i + 1)))
    return build_image(src, base / "out", "--chunk-size", "0x10000")


class Hooks:
    def __init__(self) -> None:
        self.marked: list[str] = []
        self.unmarked: list[str] = []

    def table(self, cache: Path) -> ImageTable:
        return ImageTable(
            str(cache),
            mark=lambda s: self.marked.append(s.blob_id),
            unmark=lambda s: self.unmarked.append(s.blob_id),
            durable=False,
        )


def _backend(img: BuiltImage) -> dict[str, str]:
    return {"type": "local", "dir": str(img.blob_dir)}


def test_register_share_detach_restore(image: BuiltImage, tmp_path: Path) -> None:
    h = Hooks()
    t = h.table(tmp_path)
    info = t.register(str(image.bootstrap), _backend(image), "/mnt/a")
    (dev,) = info["devices"]
    assert Path(dev).stat().st_size > 0 and Path(info["bootstrap"]).read_bytes() == (
        image.bootstrap.read_bytes()
    )
    assert len(h.marked) == 1
    info2 = t.register(str(image.bootstrap), _backend(image), "/mnt/b")
    assert info2 == info and len(h.marked) == 1  # shared blob, one mark
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["images"][0]["mountpoints"] == ["/mnt/a", "/mnt/b"]
    # fill the blob, then a restored table sees it complete and unmarks instead of marking
    (srv,) = t.blobs.values()
    srv.fill_all()
    t.blob_complete(srv)
    assert h.unmarked == [srv.blob_id]
    t.close()
    h2 = Hooks()
    t2 = h2.table(tmp_path)
    t2.load_state()
    assert t2.mountpoints() == ["/mnt/a", "/mnt/b"]
    (srv2,) = t2.blobs.values()
    assert isinstance(srv2, BlobServer) and srv2.cache.complete()
    assert h2.marked == [] and h2.unmarked == [srv2.blob_id]
    st = srv2.cache.data_path
    assert t2.lookup(*srv2.cache.dev_ino) is srv2
    assert t2.detach("/mnt/a") == 1
    assert t2.detach("/mnt/b") == 0
    assert t2.blobs == {} and t2.lookup(*srv2.cache.dev_ino) is None
    with pytest.raises(DaemonError):
        t2.detach("/mnt/b")
    assert Path(st).exists()  # the cache stays for the next mount
    # stale mountpoints (not mounted) are pruned on a fresh start
    t2.register(str(image.bootstrap), _backend(image), "/nonexistent/mp")
    assert t2.prune_stale() == ["/nonexistent/mp"] and t2.mountpoints() == []


def test_register_refuses_bad_input(image: BuiltImage, tmp_path: Path) -> None:
    t = Hooks().table(tmp_path / "c")
    (tmp_path / "c").mkdir()
    bad = tmp_path / "bad.boot"
    bad.write_bytes(b"\0" * 8192)
    with pytest.raises(FormatError):
        t.register(str(bad), _backend(image), "/mnt/x")
    with pytest.raises(BackendError, match="not found"):
        t.register(str(image.bootstrap), {"type": "local", "dir": str(tmp_path)}, "/mnt/x")
    assert t.images == {} and t.blobs == {}
    assert not (tmp_path / "c" / STATE_FILE).exists()


def test_corrupt_state_file_is_moved_aside(image: BuiltImage, tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text("{not json")
    t = Hooks().table(tmp_path)
    t.load_state()
    assert t.images == {} and (tmp_path / f"{STATE_FILE}.corrupt").exists()
    (tmp_path / STATE_FILE).write_text('{"images": [{"bogus": 1}, 7]}')
    t.load_state()
    assert t.images == {}


def test_register_takes_a_parse_already_made(image: BuiltImage, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`mount REF`: the daemon's `resolve` reads the bootstrap with the full validation,
    and its `register` takes that parse instead of reading and parsing again - only
    while the file is unchanged.  A parse without the full validation (`load_image`,
    no tree walk) spares the read only: register still validates the bytes."""
    import os

    import erofs_nydus.daemon.images as images
    from erofs_nydus.rafs.reader import load_bootstrap_file

    boot = tmp_path / "copy.boot"
    boot.write_bytes(image.bootstrap.read_bytes())
    (tmp_path / "cache").mkdir()
    t = Hooks().table(tmp_path / "cache")
    full = load_bootstrap_file(str(boot), lambda d, n: images.validate_bootstrap(d, t.verdicts, n))
    assert full.full and full.image.blobs and full.matches(str(boot))

    calls: list[str] = []
    real_validate, real_read = images.validate_bootstrap, images.read_bootstrap_bounded

    def validate(data: bytes, verdicts: object = None, name: str = "") -> object:
        calls.append("validate")
        return real_validate(data, t.verdicts, name)

    def read(path: str, **kw: object) -> bytes:
        calls.append("read")
        return real_read(path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(images, "validate_bootstrap", validate)
    monkeypatch.setattr(images, "read_bootstrap_bounded", read)
    info = t.register(str(boot), _backend(image), "/mnt/a", loaded=full)
    assert info["fsid"] == full.image.fsid and len(info["devices"]) == 1
    assert calls == []  # neither read nor parsed a second time
    # a parse without the tree walk: the bytes are taken, the validation is not
    partial = load_bootstrap_file(str(boot))
    assert not partial.full
    t.register(str(boot), _backend(image), "/mnt/b", loaded=partial)
    assert calls == ["validate"]
    # the file changed since (same bytes, new mtime): read and validated again
    st = boot.stat()
    os.utime(boot, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert not full.matches(str(boot))
    calls.clear()
    t.register(str(boot), _backend(image), "/mnt/c", loaded=full)
    assert calls == ["read", "validate"]
    t.close()


def test_snapshot_is_a_consistent_copy(image: BuiltImage, tmp_path: Path) -> None:
    t = Hooks().table(tmp_path)
    info = t.register(str(image.bootstrap), _backend(image), "/mnt/a")
    snap = t.snapshot()
    assert list(snap.images) == [info["fsid"]] and snap.images[info["fsid"]].mountpoints == [
        "/mnt/a"]
    (bid,) = snap.blobs
    assert snap.blobs[bid] is t.blobs[bid] and snap.marked == {bid}
    t.detach("/mnt/a")
    assert not t.snapshot().images and not t.snapshot().blobs
    assert list(snap.images) == [info["fsid"]] and bid in snap.blobs  # the copy stays
    t.close()
