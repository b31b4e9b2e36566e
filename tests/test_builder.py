"""Builder and reader without the kernel: determinism, dedup, bad input, check."""

from __future__ import annotations

import gzip
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from erofs_nydus.builder import BuildOptions, create_image
from erofs_nydus.cli import main
from erofs_nydus.errors import ErofsNydusError, FormatError, SourceError, UsageError
from erofs_nydus.rafs.check import check_bootstrap
from erofs_nydus.rafs.reader import BootstrapReader, open_bootstrap
from erofs_nydus.rafs.tree import lookup


def _small_tree(root: Path) -> Path:
    (root / "d" / "e").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"hello\n")
    (root / "d" / "same1").write_bytes(b"x" * 70000)
    (root / "d" / "same2").write_bytes(b"x" * 70000)
    (root / "rand").write_bytes(os.urandom(300000))
    os.link(root / "a.txt", root / "d" / "e" / "hardlink")
    os.symlink("../a.txt", root / "d" / "sym")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "a.txt", "user.k", b"v")
    with open(root / "sparse", "wb") as f:
        f.truncate(3 << 20)
    return root


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    return _small_tree(tmp_path / "src")


def _build(src: Path | str, out: Path, **kw: object) -> tuple[bytes, dict[str, bytes]]:
    boot = out / "img.boot"
    blobs = out / "blobs"
    create_image(str(src), str(boot), str(blobs), BuildOptions(**kw))  # type: ignore[arg-type]
    return boot.read_bytes(), {p.name: p.read_bytes() for p in blobs.iterdir()}


def test_deterministic(small_tree: Path, tmp_path: Path) -> None:
    b1, blobs1 = _build(small_tree, tmp_path / "o1")
    b2, blobs2 = _build(small_tree, tmp_path / "o2")
    assert b1 == b2
    assert blobs1 == blobs2
    assert len(blobs1) == 1


def test_blob_named_by_sha256(small_tree: Path, tmp_path: Path) -> None:
    import hashlib

    _, blobs = _build(small_tree, tmp_path / "o")
    for name, data in blobs.items():
        assert hashlib.sha256(data).hexdigest() == name


def test_dedup_and_zero_chunks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    block = os.urandom(1 << 16)
    (src / "a").write_bytes(block * 4)
    (src / "b").write_bytes(block * 4)
    with open(src / "sparse", "wb") as f:
        f.truncate(8 << 16)
    res = create_image(str(src), str(tmp_path / "b"), str(tmp_path / "blobs"),
                       BuildOptions(chunk_size=1 << 16))
    s = res.stats
    assert s.chunks_referenced == 4 + 4 + 8
    assert s.chunks_stored == 2  # one random block, one zero block
    assert s.chunks_deduplicated == 14


def test_reader_tree_matches_source(small_tree: Path, tmp_path: Path) -> None:
    _build(small_tree, tmp_path / "o")
    r = open_bootstrap(str(tmp_path / "o" / "img.boot"))
    assert r.problems() == []
    root = r.tree()
    a = lookup(root, b"/a.txt")
    hl = lookup(root, b"/d/e/hardlink")
    assert a is not None and hl is not None and a.inode is hl.inode
    assert a.inode.xattrs == {b"user.k": b"v"}
    sym = lookup(root, b"/d/sym")
    assert sym is not None and sym.inode.target == b"../a.txt"
    fifo = lookup(root, b"/fifo")
    assert fifo is not None and stat.S_ISFIFO(fifo.inode.mode)
    st_ = os.stat(small_tree / "rand")
    rnd = lookup(root, b"/rand")
    assert rnd is not None and rnd.inode.size == st_.st_size
    assert rnd.inode.mtime * 10**9 + rnd.inode.mtime_nsec == st_.st_mtime_ns


def test_check_ok_and_detects_corrupt_blob(small_tree: Path, tmp_path: Path) -> None:
    boot, blobs = _build(small_tree, tmp_path / "o")
    blob_dir = tmp_path / "o" / "blobs"
    assert check_bootstrap(boot, "img", str(blob_dir)).ok
    (name,) = blobs
    data = bytearray(blobs[name])
    data[10] ^= 0xFF
    (blob_dir / name).write_bytes(bytes(data))
    report = check_bootstrap(boot, "img", str(blob_dir))
    assert not report.ok
    assert any("digest" in p or "sha256" in p or "lz4" in p for p in report.problems)


def test_check_detects_corrupt_bootstrap(small_tree: Path, tmp_path: Path) -> None:
    boot, _ = _build(small_tree, tmp_path / "o")
    bad = bytearray(boot)
    bad[1024 + 80] = 0x7F  # feature_incompat
    report = check_bootstrap(bytes(bad), "img")
    assert any("feature_incompat" in p for p in report.problems)


@settings(max_examples=200, deadline=None)
@given(pos=st.integers(0, 16383), val=st.integers(0, 255))
def test_bit_flips_raise_only_format_errors(pos: int, val: int) -> None:
    data = bytearray(_FLIP_BASE)
    if pos < len(data):
        data[pos] = val
    try:
        r = BootstrapReader(bytes(data))
        r.problems()
        r.tree()
    except FormatError:
        pass


@given(st.binary(max_size=20000))
@settings(max_examples=50, deadline=None)
def test_garbage_bootstrap_raises_format_error(buf: bytes) -> None:
    with pytest.raises(FormatError):
        BootstrapReader(buf).tree()


def _flip_base() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src = _small_tree(Path(d) / "src")
        return _build(src, Path(d))[0]


_FLIP_BASE = _flip_base()


# -- tar input ------------------------------------------------------------------------------

def _tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if gz else raw


def _reg(name: str, data: bytes, **kw: object) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, data


def test_tar_and_targz_equal_dir_tree(tmp_path: Path) -> None:
    members = [_reg("a", b"1" * 5000, mode=0o4755, uid=70000, gid=80000, mtime=12345),
               _reg("dir/b", os.urandom(100000))]
    link = tarfile.TarInfo("dir/c")
    link.type = tarfile.LNKTYPE
    link.linkname = "a"
    members.append((link, None))
    x = tarfile.TarInfo("x")
    x.size = 3
    x.pax_headers = {"SCHILY.xattr.user.k": "val", "SCHILY.xattr.security.capability": "\x01"}
    members.append((x, b"abc"))
    for gz in (False, True):
        path = tmp_path / f"l{gz}.tar"
        path.write_bytes(_tar_bytes(members, gz))
        out = tmp_path / f"o{gz}"
        create_image(str(path), str(out / "b"), str(out / "blobs"))
        r = open_bootstrap(str(out / "b"))
        assert r.problems() == []
        root = r.tree()
        a, c = lookup(root, b"/a"), lookup(root, b"/dir/c")
        assert a is not None and c is not None and a.inode is c.inode
        assert a.inode.uid == 70000 and a.inode.gid == 80000 and a.inode.mode & 0o7777 == 0o4755
        xn = lookup(root, b"/x")
        assert xn is not None
        assert xn.inode.xattrs == {b"user.k": b"val", b"security.capability": b"\x01"}
        d = lookup(root, b"/dir")
        assert d is not None and stat.S_ISDIR(d.inode.mode) and d.inode.mode & 0o777 == 0o755
    assert (tmp_path / "oFalse" / "b").read_bytes() == (tmp_path / "oTrue" / "b").read_bytes()


@pytest.mark.parametrize(("name", "message"), [
    ("../evil", "'..'"), ("/etc/passwd", "absolute"), ("a/../../b", "'..'"),
])
def test_tar_unsafe_paths_rejected(tmp_path: Path, name: str, message: str) -> None:
    path = tmp_path / "bad.tar"
    path.write_bytes(_tar_bytes([_reg(name, b"x")]))
    with pytest.raises(SourceError, match=message):
        create_image(str(path), str(tmp_path / "b"), str(tmp_path / "blobs"))
    _assert_nothing_left(tmp_path)


def _assert_nothing_left(tmp_path: Path) -> None:
    assert not (tmp_path / "b").exists()
    blob_dir = tmp_path / "blobs"
    assert not blob_dir.exists() or list(blob_dir.iterdir()) == []


def test_tar_hardlink_to_missing_target(tmp_path: Path) -> None:
    link = tarfile.TarInfo("c")
    link.type = tarfile.LNKTYPE
    link.linkname = "missing"
    path = tmp_path / "bad.tar"
    path.write_bytes(_tar_bytes([_reg("a", b"data" * 1000), (link, None)]))
    with pytest.raises(SourceError, match="missing target"):
        create_image(str(path), str(tmp_path / "b"), str(tmp_path / "blobs"))
    _assert_nothing_left(tmp_path)


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_stream(tmp_path: Path, gz: bool) -> None:
    raw = _tar_bytes([_reg("a", os.urandom(200000)), _reg("b", b"x" * 10)], gz)
    path = tmp_path / "t.tar"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SourceError, match=r"truncated or corrupt|unexpected end"):
        create_image(str(path), str(tmp_path / "b"), str(tmp_path / "blobs"))
    _assert_nothing_left(tmp_path)


def test_corrupt_gzip(tmp_path: Path) -> None:
    raw = bytearray(_tar_bytes([_reg("a", os.urandom(50000))], gz=True))
    raw[len(raw) // 2] ^= 0xFF
    path = tmp_path / "t.tar.gz"
    path.write_bytes(bytes(raw))
    with pytest.raises(SourceError):
        create_image(str(path), str(tmp_path / "b"), str(tmp_path / "blobs"))
    _assert_nothing_left(tmp_path)


def test_not_a_tar(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"this is not a tar file at all" * 100)
    with pytest.raises(SourceError):
        create_image(str(path), str(tmp_path / "b"), str(tmp_path / "blobs"))


def test_unsupported_xattr_namespace_in_tar(tmp_path: Path) -> None:
    x = tarfile.TarInfo("x")
    x.size = 1
    x.pax_headers = {"SCHILY.xattr.system.nfs4_acl": "zz"}
    path = tmp_path / "t.tar"
    path.write_bytes(_tar_bytes([(x, b"a")]))
    with pytest.raises(SourceError, match="unsupported xattr namespace"):
        create_image(str(path), str(tmp_path / "b"), str(tmp_path / "blobs"))


def test_unreadable_file(tmp_path: Path) -> None:
    """Root reads everything: drop CAP_DAC_* with setpriv so the permission check bites."""
    import shutil
    import subprocess
    import sys

    assert shutil.which("setpriv"), "setpriv (util-linux) is needed"
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok").write_bytes(b"fine" * 100)
    (src / "secret").write_bytes(b"x")
    os.chown(src / "secret", 65534, 65534)
    os.chmod(src / "secret", 0)
    out = tmp_path / "out"
    out.mkdir()  # create refuses to make -B's folder
    argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-m",
            "erofs_nydus.cli", "create", str(src), "-B", str(out / "b"), "-D", str(out / "blobs")]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "secret" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (out / "b").exists()
    assert not (out / "blobs").exists() or os.listdir(out / "blobs") == []


# -- CLI ------------------------------------------------------------------------------------

def test_cli_create_check_inspect(small_tree: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    boot, blobs, js = tmp_path / "b", tmp_path / "blobs", tmp_path / "out.json"
    res = runner.invoke(main, ["create", str(small_tree), "-B", str(boot), "-D", str(blobs),
                               "--output-json", str(js), "--chunk-size", "64K"])
    assert res.exit_code == 0, res.output
    info = json.loads(js.read_text())
    assert info["chunk_size"] == 65536 and len(info["blobs"]) == 1
    assert info["dedup"]["chunks_deduplicated"] > 0
    res = runner.invoke(main, ["check", str(boot), "--blob-dir", str(blobs)])
    assert res.exit_code == 0 and "OK" in res.output
    res = runner.invoke(main, ["inspect", str(boot), "/d/same1", "--json"])
    assert res.exit_code == 0
    assert json.loads(res.output)["size"] == 70000
    res = runner.invoke(main, ["inspect", str(boot)])
    assert "/d/e/hardlink" in res.output
    res = runner.invoke(main, ["inspect", str(boot), "/nope"])
    assert res.exit_code == 2 and "no such path" in res.output


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["create", str(tmp_path / "missing"), "-B", "x", "-D", "y"])
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    res = runner.invoke(main, ["create", str(tmp_path), "-B", "x", "-D", "y",
                               "--chunk-size", "12345"])
    assert res.exit_code == 2 and "power of two" in res.output
    (tmp_path / "junk").write_bytes(b"\0" * 9000)
    res = runner.invoke(main, ["check", str(tmp_path / "junk")])
    assert res.exit_code != 0 and "Traceback" not in res.output


def test_stdin_source(small_tree: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    tar = subprocess.run(["tar", "-C", str(small_tree), "-czf", "-", "."], capture_output=True,
                         check=True).stdout
    proc = subprocess.run([sys.executable, "-m", "erofs_nydus.cli", "create", "-", "-B",
                           str(tmp_path / "b"), "-D", str(tmp_path / "blobs")], input=tar,
                          capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    r = open_bootstrap(str(tmp_path / "b"))
    assert r.problems() == []
    assert lookup(r.tree(), b"/d/sym") is not None


def test_usage_errors_are_ours() -> None:
    with pytest.raises(UsageError):
        BuildOptions(chunk_size=3).validate()
    assert issubclass(SourceError, ErofsNydusError)


def test_full_disk(tmp_path: Path) -> None:
    """A blob dir on a 1 MiB tmpfs: one clear line naming the entry, nothing left behind."""
    import subprocess
    import sys

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        src = tmp_path / "src"
        src.mkdir()
        (src / "a").write_bytes(b"small")
        (src / "big-random").write_bytes(os.urandom(3 << 20))
        proc = subprocess.run([sys.executable, "-m", "erofs_nydus.cli", "create", str(src),
                               "-B", str(small / "b"), "-D", str(small / "blobs")],
                              capture_output=True, text=True, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "big-random" in proc.stderr and "No space left" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert os.listdir(small / "blobs") == []
        assert not (small / "b").exists()
    finally:
        subprocess.run(["umount", str(small)], check=False)
