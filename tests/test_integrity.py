"""Issue 11 item 2, invariants (b) and (f): no wrong byte from a crafted bootstrap or a
tampered cache.

Threat model (what these tests hold, and where it stops):

An image author controls every byte of a bootstrap.  They can make the reader refuse
it (one line: FormatError, `check` exit 1) or describe whatever files they like from
their own blobs.  They cannot make a read return bytes that are not a verified chunk
of the image (zeros over a hole, another chunk's data, bytes cached under another
bootstrap's digests), nor make the daemon allocate memory or disk beyond fixed limits
(2^24 chunks per blob, chunk_count * chunk_size of sparse cache, 1 GiB of bootstrap),
nor reach mount(2) with metadata the full reader has not walked.  Tests: the chunk
record tests, the fuzz campaign (in-process through ImageTable and a handful of real
fanotify mounts), `check -D` without tracebacks.

Whoever can leave files in the cache dir between daemon runs (a crash, a restored
backup, another tool, a bad disk) cannot make the daemon serve them unverified:
stored bootstraps must hash to their name (register, restore, fscache OPEN), chunk
maps count only with a seal proving the cache file unchanged since this daemon
verified it under the same chunk list, holes are found with SEEK_HOLE, and
`cache verify` re-digests everything and drops what fails, also under a live mount.

Not covered here: writes into a cache file *while* a daemon serves it are sealed
with the daemon's own on its next commit (only `cache verify` finds them); the path
of `<fsid>.boot` could be swapped between register and mount(2) in fanotify mode.
Both need write access to the cache dir, which invariant (d) (cachedir tests)
reserves to its owner.  root can do anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from erofs_nydus.builder import BuildOptions, create_image
from erofs_nydus.errors import DaemonError, FormatError
from erofs_nydus.layout import parse
from erofs_nydus.layout import rafs as R
from erofs_nydus.rafs.check import check_bootstrap
from erofs_nydus.rafs.reader import read_image_meta

CLI = [sys.executable, "-c", "from erofs_nydus.cli import run; run()"]
CHUNK = 0x10000


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    """A small image: (bootstrap bytes, blob dir); several files of several chunks."""
    base = tmp_path_factory.mktemp("img")
    src = base / "src"
    (src / "d").mkdir(parents=True)
    for i in range(4):
        (src / f"f{i}").write_bytes(hashlib.sha256(bytes([i])).digest() * (2500 * (i + 1)))
    (src / "d" / "small").write_bytes(b"hello\n")
    os.symlink("f0", src / "link")
    create_image(str(src), str(base / "img.boot"), str(base / "blobs"),
                 BuildOptions(chunk_size=CHUNK))
    return (base / "img.boot").read_bytes(), base / "blobs"


# -- patching helpers ------------------------------------------------------------------


def _ext(boot: bytes) -> Any:
    return parse(R.SuperBlockExt, boot, R.EXT_SUPERBLOCK_OFFSET, "ext superblock")


def _chunk_entry_off(boot: bytes, i: int) -> int:
    return int(_ext(boot).s_chunk_table_offset) + R.CHUNK_INFO_SIZE * i


def chunk_fields(boot: bytes, i: int) -> list[object]:
    return list(R.CHUNK_INFO_PACK.unpack_from(boot, _chunk_entry_off(boot, i)))


# field positions in CHUNK_INFO_PACK
C_DIGEST, C_BLOB, C_FLAGS, C_CSIZE, C_USIZE, C_COFF, C_UOFF, C_FOFF, C_INDEX = range(9)


def patch_chunk(boot: bytes, i: int, **fields: int) -> bytes:
    names = {"csize": C_CSIZE, "usize": C_USIZE, "coff": C_COFF, "uoff": C_UOFF,
             "index": C_INDEX, "blob": C_BLOB, "flags": C_FLAGS}
    vals = chunk_fields(boot, i)
    for k, v in fields.items():
        vals[names[k]] = v
    out = bytearray(boot)
    R.CHUNK_INFO_PACK.pack_into(out, _chunk_entry_off(boot, i), *vals)
    return bytes(out)


# (offset in the blob table entry, struct format)
BLOB_FIELDS = {"chunk_count": (72, "<I"), "compressed_size": (88, "<Q"),
               "uncompressed_size": (96, "<Q"), "ci_offset": (112, "<Q"),
               "ci_compressed_size": (120, "<Q"), "ci_uncompressed_size": (128, "<Q")}


def patch_blob(boot: bytes, **fields: int) -> bytes:
    out = bytearray(boot)
    bt = int(_ext(boot).s_blob_table_offset)
    for k, v in fields.items():
        off, fmt = BLOB_FIELDS[k]
        struct.pack_into(fmt, out, bt + off, v)
        if k == "uncompressed_size":  # keep the device slot in step
            struct.pack_into("<I", out, R.DEVICE_TABLE_OFFSET + 64, (v >> 12) & 0xFFFFFFFF)
    return bytes(out)


def n_chunks(boot: bytes) -> int:
    return int(_ext(boot).s_chunk_table_size) // R.CHUNK_INFO_SIZE


def refused(boot: bytes, words: str) -> None:
    """The strict reader (what the daemon uses) and `check` both name the problem."""
    with pytest.raises(FormatError, match=words):
        read_image_meta(boot)
    report = check_bootstrap(boot, "img")
    assert any(words in p for p in report.problems), report.problems
    assert all("\n" not in p for p in report.problems)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120,
                          check=False)


# -- item 1: chunk records ---------------------------------------------------------------


def test_pristine_image_is_clean(image: tuple[bytes, Path]) -> None:
    boot, blobs = image
    assert check_bootstrap(boot, "img", str(blobs)).ok
    assert n_chunks(boot) >= 6


def test_chunk_index_beyond_chunk_count(image: tuple[bytes, Path]) -> None:
    boot, _ = image
    count = read_image_meta(boot).blobs[0].chunk_count
    refused(patch_chunk(boot, 0, index=count), "chunks")
    refused(patch_chunk(boot, 0, index=0xFFFFFFFF), "chunks")


def test_duplicate_chunk_index(image: tuple[bytes, Path]) -> None:
    boot, _ = image
    other = chunk_fields(boot, 1)[C_INDEX]
    assert isinstance(other, int)
    refused(patch_chunk(boot, 0, index=other), "used twice")


def test_chunk_count_limit(image: tuple[bytes, Path]) -> None:
    boot, _ = image
    n = R.MAX_CHUNKS_PER_BLOB + 1
    refused(patch_blob(boot, chunk_count=n, ci_uncompressed_size=n * 16), "limit")
    n = 0xFFFFFFFF
    refused(patch_blob(boot, chunk_count=n, ci_uncompressed_size=n * 16), "limit")


def test_uncompressed_size_bounded_by_chunks(image: tuple[bytes, Path]) -> None:
    boot, _ = image
    blob = read_image_meta(boot).blobs[0]
    huge = (blob.chunk_count * CHUNK + 4096 * 1000) & ~4095
    refused(patch_blob(boot, uncompressed_size=huge), "exceeds")


def test_compressed_range_bounded(image: tuple[bytes, Path]) -> None:
    boot, _ = image
    blob = read_image_meta(boot).blobs[0]
    refused(patch_chunk(boot, 0, coff=blob.compressed_size), "outside blob data")
    refused(patch_blob(boot, compressed_size=1 << 63), "too large")


# -- item 2: check -D ends in one line per problem, never a traceback ----------------------


@pytest.mark.parametrize("patch", [
    {"blob": {"compressed_size": (1 << 64) - 1}, "chunk": {"coff": 1 << 63}},
    {"blob": {"ci_offset": 1 << 63}},
    {"blob": {"ci_offset": (1 << 64) - 4096}},
    {"blob": {"ci_compressed_size": 1 << 62}},
    {"chunk": {"csize": 0xFFFFFFFF}},
])
def test_check_blobs_never_tracebacks(image: tuple[bytes, Path], tmp_path: Path,
                                      patch: dict[str, dict[str, int]]) -> None:
    boot, blobs = image
    bad = patch_blob(boot, **patch.get("blob", {}))
    if "chunk" in patch:
        bad = patch_chunk(bad, 0, **patch["chunk"])
    p = tmp_path / "bad.boot"
    p.write_bytes(bad)
    res = cli("check", str(p), "-D", str(blobs))
    assert res.returncode == 1, res
    assert "Traceback" not in res.stderr and res.stderr.strip(), res.stderr
    for line in res.stderr.strip().splitlines():
        assert line.startswith(str(p)), line


# -- item 3: the daemon allocates only from bounded, validated values ---------------------


def test_blob_cache_refuses_unbounded_or_aliased_chunks(tmp_path: Path) -> None:
    from daemon_support import make_blob, make_payloads

    from erofs_nydus.daemon.blobcache import BlobCacheFile

    sb = make_blob(make_payloads([5000, 9000, 4096]), chunk_size=CHUNK)
    cache = tmp_path / "cache"
    cache.mkdir()
    huge = dataclasses.replace(sb.blob, chunk_count=R.MAX_CHUNKS_PER_BLOB + 1)
    with pytest.raises(DaemonError, match="chunk count"):
        BlobCacheFile(str(cache), huge, sb.chunks, durable=False)
    wide = dataclasses.replace(sb.blob, uncompressed_size=1 << 40)
    with pytest.raises(DaemonError, match="uncompressed size"):
        BlobCacheFile(str(cache), wide, sb.chunks, durable=False)
    alias = [sb.chunks[0], sb.chunks[1], dataclasses.replace(sb.chunks[2], index=1)]
    with pytest.raises(DaemonError, match="listed twice"):
        BlobCacheFile(str(cache), sb.blob, alias, durable=False)
    beyond = [sb.chunks[0], dataclasses.replace(sb.chunks[1], index=3)]
    with pytest.raises(DaemonError, match="out of range"):
        BlobCacheFile(str(cache), sb.blob, beyond, durable=False)
    assert not list(cache.iterdir())  # refused before any file was made
    bcf = BlobCacheFile(str(cache), sb.blob, sb.chunks[:2], durable=False)
    with pytest.raises(DaemonError, match="out of range"):
        bcf.add_chunks([dataclasses.replace(sb.chunks[2], index=7)])
    bcf.close()
    assert (cache / f"{sb.blob.blob_id}.chunk_map").stat().st_size == 72 + 1


# -- item 4: every bootstrap handed to mount(2) passed the full validation ---------------


def chunk_index_off(boot: bytes, name: bytes) -> int:
    """Offset of the first chunk index of the root-level regular file `name`."""
    from erofs_nydus.layout import erofs as E
    from erofs_nydus.rafs.reader import BootstrapReader

    r = BootstrapReader(boot)
    (nid,) = [n for nm, n, _t in r.dirents(r.inode(r.sb.root_nid)) if nm == name]
    ri = r.inode(nid)
    start = ri.offset + ri.isize + E.xattr_ibody_size(ri.xattr_icount)
    return (start + 7) & ~7


def tree_broken(boot: bytes) -> bytes:
    """Valid superblocks and tables, but /f1's first chunk index names no chunk."""
    out = bytearray(boot)
    struct.pack_into("<I", out, chunk_index_off(boot, b"f1") + 4, 0x00FFFFF0)
    return bytes(out)


def _table(cache: Path) -> Any:
    from erofs_nydus.daemon.images import ImageTable

    return ImageTable(str(cache), durable=False)


def test_register_runs_full_validation_and_remembers(image: tuple[bytes, Path],
                                                      tmp_path: Path) -> None:
    from erofs_nydus.daemon.images import VERDICT_FILE

    boot, blobs = image
    bad = tmp_path / "bad.boot"
    bad.write_bytes(tree_broken(boot))
    read_image_meta(bad.read_bytes())  # the tables alone look fine
    cache = tmp_path / "cache"
    cache.mkdir()
    t = _table(cache)
    backend = {"type": "local", "dir": str(blobs)}
    with pytest.raises(FormatError, match="not in the chunk table"):
        t.register(str(bad), backend, str(tmp_path / "m0"))
    assert not t.images and not list(cache.glob("*.boot"))
    good = tmp_path / "good.boot"
    good.write_bytes(boot)
    t.register(str(good), backend, str(tmp_path / "m1"))
    digest = hashlib.sha256(boot).hexdigest()
    assert digest in t.verdicts
    vf = cache / VERDICT_FILE
    assert vf.read_text().split() == [digest] and vf.stat().st_mode & 0o777 == 0o600
    # a restarted daemon trusts its own verdict file, but not one others could write
    assert digest in _table(cache).verdicts
    vf.chmod(0o666)
    assert digest not in _table(cache).verdicts
    t.close()


def test_register_validates_a_handed_over_parse_unless_it_was_the_full_one(
        image: tuple[bytes, Path], tmp_path: Path) -> None:
    """`register(loaded=...)` (the parse `resolve` made for `mount REF`) skips the
    validation only for a parse that was the full one: a `load_image` parse (no tree
    walk) of a broken tree is still refused, and nothing is registered."""
    from erofs_nydus.daemon.images import validate_bootstrap
    from erofs_nydus.rafs.reader import load_bootstrap_file

    boot, blobs = image
    bad = tmp_path / "bad.boot"
    bad.write_bytes(tree_broken(boot))
    partial = load_bootstrap_file(str(bad))  # the tables alone look fine
    assert not partial.full
    t = _table(tmp_path / "cache")
    backend = {"type": "local", "dir": str(blobs)}
    with pytest.raises(FormatError, match="not in the chunk table"):
        t.register(str(bad), backend, str(tmp_path / "m0"), loaded=partial)
    assert not t.images
    # the full validation, made before the register (as the daemon's resolve does),
    # refuses the same bytes there
    with pytest.raises(FormatError, match="not in the chunk table"):
        load_bootstrap_file(str(bad), lambda d, n: validate_bootstrap(d, t.verdicts, n))
    t.close()


def test_register_refuses_unsupported_features_as_unsupported(image: tuple[bytes, Path],
                                                               tmp_path: Path) -> None:
    """A feature that changes what a byte means (here: encrypted chunks) is refused by
    the daemon's validation as UnsupportedError, like the reader's strict load: its own
    exit code, not "corrupt"."""
    from erofs_nydus.errors import UnsupportedError

    boot, blobs = image
    out = bytearray(boot)
    at = int(_ext(boot).s_blob_table_offset) + 84  # blob entry features
    struct.pack_into("<I", out, at, struct.unpack_from("<I", out, at)[0]
                     | R.BLOB_FEATURE_ENCRYPTED)
    bad = tmp_path / "enc.boot"
    bad.write_bytes(bytes(out))
    t = _table(tmp_path / "cache")
    with pytest.raises(UnsupportedError, match="uses encrypted chunks"):
        t.register(str(bad), {"type": "local", "dir": str(blobs)}, str(tmp_path / "m"))
    assert not t.images
    t.close()


def test_planted_stored_bootstrap_is_hash_checked(image: tuple[bytes, Path],
                                                  tmp_path: Path) -> None:
    from erofs_nydus.builder import BuildOptions, create_image

    boot, blobs = image
    src = tmp_path / "other"
    src.mkdir()
    (src / "evil").write_bytes(b"not the image\n")
    create_image(str(src), str(tmp_path / "other.boot"), str(blobs), BuildOptions())
    other = (tmp_path / "other.boot").read_bytes()
    cache = tmp_path / "cache"
    cache.mkdir()
    fsid = hashlib.sha256(boot).hexdigest()
    planted = cache / f"{fsid}.boot"
    planted.write_bytes(other)  # a valid image, but not the one the name promises
    backend = {"type": "local", "dir": str(blobs)}
    t = _table(cache)
    # handed the planted copy itself (what a resolved REF mount does): refused, removed
    with pytest.raises(FormatError, match="does not match its sha256 name"):
        t.register(str(planted), backend, str(tmp_path / "m0"))
    assert not planted.exists()
    # registering the real bootstrap replaces a planted copy instead of mounting it
    planted.write_bytes(other)
    src_boot = tmp_path / "img.boot"
    src_boot.write_bytes(boot)
    info = t.register(str(src_boot), backend, str(tmp_path / "m1"))
    assert info["bootstrap"] == str(planted) and planted.read_bytes() == boot
    t.close()
    # a restarted daemon does not restore an image whose stored copy changed under it
    planted.write_bytes(other)
    t2 = _table(cache)
    t2.load_state()
    assert not t2.images
    t2.close()


# -- item 5: cached bytes are trusted only as far as this daemon verified them -----------


def _registered(image: tuple[bytes, Path], tmp_path: Path) -> tuple[Path, Any, Path]:
    """A cache dir with the image registered and its blob filled completely, closed."""
    boot, blobs = image
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    src = tmp_path / "img.boot"
    src.write_bytes(boot)
    t = _table(cache)
    t.register(str(src), {"type": "local", "dir": str(blobs)}, str(tmp_path / "mnt"))
    (srv,) = t.blobs.values()
    srv.fill_all()
    expected = Path(srv.cache.data_path).read_bytes()
    t.close()
    return cache, expected, Path(srv.cache.data_path)


def _flip(path: Path, pos: int) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x55]))


def _restored(cache: Path) -> Any:
    t = _table(cache)
    t.load_state()
    assert len(t.images) == 1
    (srv,) = t.blobs.values()
    return t, srv


def test_restart_trusts_only_a_matching_seal(image: tuple[bytes, Path], tmp_path: Path) -> None:
    from erofs_nydus.daemon.blobcache import punch_hole

    cache, expected, data = _registered(image, tmp_path)
    t, srv = _restored(cache)  # untouched since the daemon sealed it: nothing re-read
    assert srv.cache.complete() and srv.cache.rechecked == 0
    t.close()
    first, second = sorted(srv.cache.chunks, key=lambda c: c.uncompressed_offset)[:2]
    _flip(data, first.uncompressed_offset + 100)  # a changed byte in a present chunk
    fd = os.open(data, os.O_RDWR)
    try:  # and a hole in another one
        assert punch_hole(fd, second.uncompressed_offset, 4096)
    finally:
        os.close(fd)
    t, srv = _restored(cache)
    assert srv.cache.rechecked > 0
    assert not srv.cache.present(first) and not srv.cache.present(second)
    assert not srv.cache.complete()
    srv.fill_all()
    assert data.read_bytes() == expected
    t.close()


@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_recheck_uses_the_blobs_digester(tmp_path: Path, compressor: str) -> None:
    """blake3 images (nydus-image's default): a re-check digests each cached chunk the
    way its blob does.  With sha256 for every blob, an unchanged cache file of a
    blake3 image lost every chunk after a crash, and `cache verify` reported them all
    as failed."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}").write_bytes(hashlib.sha256(bytes([i])).digest() * (3000 * (i + 1)))
    create_image(str(src), str(tmp_path / "b3.boot"), str(tmp_path / "blobs"),
                 BuildOptions(chunk_size=CHUNK, compressor=compressor, digester="blake3"))
    boot = (tmp_path / "b3.boot").read_bytes()
    assert read_image_meta(boot).blobs[0].digester == "blake3"
    cache, expected, data = _registered((boot, tmp_path / "blobs"), tmp_path)
    os.chmod(data, 0o600)  # ctime moves, bytes do not: the seal no longer vouches
    t, srv = _restored(cache)
    assert srv.cache.rechecked > 0 and srv.cache.dropped == [] and srv.cache.complete()
    t.close()
    res = cli("cache", "verify", "--cache-dir", str(cache))
    assert res.returncode == 0 and "0 dropped" in res.stdout, res
    assert data.read_bytes() == expected


def test_cache_verify_offline_drops_and_refetches(image: tuple[bytes, Path],
                                                  tmp_path: Path) -> None:
    cache, expected, data = _registered(image, tmp_path)
    res = cli("cache", "verify", "--cache-dir", str(cache))
    assert res.returncode == 0 and "0 dropped" in res.stdout, res
    chunks = read_image_meta(image[0]).chunks[0]
    victim = chunks[len(chunks) // 2]
    _flip(data, victim.uncompressed_offset + victim.uncompressed_size - 1)
    res = cli("cache", "verify", "--cache-dir", str(cache))
    assert res.returncode == 1, res
    assert "1 chunk(s) failed their digest" in res.stdout and "1 dropped" in res.stdout, res
    assert "Traceback" not in res.stderr
    t, srv = _restored(cache)
    assert not srv.cache.present(victim)
    srv.fill(victim.uncompressed_offset, 1)
    assert data.read_bytes() == expected
    t.close()
    res = cli("cache", "verify", "--cache-dir", str(tmp_path / "nonexistent"))
    assert res.returncode != 0 and "Traceback" not in res.stderr


def test_cache_verify_offline_trusts_the_cache_dir_only_as_a_cache_dir(
        image: tuple[bytes, Path], tmp_path: Path) -> None:
    """Offline `cache verify` writes chunk maps and punches holes: a cache dir others
    can write is refused (one line), and a stored bootstrap is read only as a regular
    file of ours, bounded (a planted FIFO hung it, /dev/zero would exhaust memory)."""
    cache, _expected, _data = _registered(image, tmp_path)
    os.mkfifo(cache / f"{'0' * 64}.boot")
    res = cli("cache", "verify", "--cache-dir", str(cache))
    assert res.returncode == 0 and "0 dropped" in res.stdout, res
    os.chmod(cache, 0o777)
    res = cli("cache", "verify", "--cache-dir", str(cache))
    assert res.returncode != 0 and "writable by group or others" in res.stderr, res
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_verify_in_a_live_table_remarks_the_blob(image: tuple[bytes, Path],
                                                 tmp_path: Path) -> None:
    from erofs_nydus.daemon.images import ImageTable

    cache, expected, data = _registered(image, tmp_path)
    marked: list[str] = []
    t = ImageTable(str(cache), mark=lambda s: marked.append(s.blob_id), durable=False)
    t.load_state()
    (srv,) = t.blobs.values()
    assert srv.cache.complete() and not marked  # complete: served without events
    victim = srv.cache.chunks[1]
    _flip(data, victim.uncompressed_offset)
    out = t.verify_cached()
    assert out["dropped"] == {srv.blob_id: [victim.index]}
    assert marked == [srv.blob_id]  # reads of the dropped range raise events again
    srv.fill(victim.uncompressed_offset, 1)
    assert data.read_bytes() == expected
    t.close()


# -- item 6: fuzzing a small bootstrap through the daemon path ----------------------------

FUZZ_SEED = 11
FUZZ_COUNT = 300
FUZZ_MEMORY = 2 << 30  # address space of the fuzzing process
FUZZ_CPU_SECONDS = 240  # the whole run (a mutant that spins would exhaust it)


def _limits() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (FUZZ_MEMORY, FUZZ_MEMORY))
    resource.setrlimit(resource.RLIMIT_CPU, (FUZZ_CPU_SECONDS, FUZZ_CPU_SECONDS))


@pytest.fixture(scope="module")
def fuzzed(image: tuple[bytes, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[
        dict[str, Any], Path]:
    boot, blobs = image
    work = tmp_path_factory.mktemp("fuzz")
    src = work / "img.boot"
    src.write_bytes(boot)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(
        [sys.executable, "-c", "import fuzz_support; fuzz_support.main()", str(src),
         str(blobs), str(work), str(FUZZ_SEED), str(FUZZ_COUNT)],
        capture_output=True, text=True, timeout=600, check=False, env=env,
        preexec_fn=_limits)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), work


def test_fuzz_mutants_refused_or_served_right(fuzzed: tuple[dict[str, Any], Path]) -> None:
    summary, _work = fuzzed
    assert summary["violations"] == []
    assert summary["mutants"] >= FUZZ_COUNT * 0.9
    # the campaign reaches both outcomes and reads real data from accepted mutants
    assert summary["refused"] > 0 and summary["accepted"] > 0 and summary["chunks_ok"] > 0
    assert summary["cli_checked"] > 0


def _kernel_ok() -> bool:
    from daemon_support import fanotify_usable

    return fanotify_usable()


def _expected_files(boot: bytes, known: dict[bytes, bytes]) -> dict[bytes, bytes | None]:
    """Path -> content a mount must return (None: only an error is right)."""
    from erofs_nydus.rafs.reader import BootstrapReader

    out: dict[bytes, bytes | None] = {}
    stack = [(b"", BootstrapReader(boot).tree())]
    while stack:
        path, node = stack.pop()
        if node.children is not None:
            stack.extend((path + b"/" + n, c) for n, c in node.children.items())
        elif node.inode.chunks is not None and stat.S_ISREG(node.inode.mode):
            parts = [known.get(c.digest) for c in node.inode.chunks]
            out[path] = None if None in parts else b"".join(p or b"" for p in parts)
    return out


@pytest.mark.kernel
def test_fuzz_real_mounts(image: tuple[bytes, Path], fuzzed: tuple[dict[str, Any], Path],
                          tmp_path: Path) -> None:
    """A handful of accepted mutants mounted for real: each file reads as the image's
    bytes or fails; a refused one is never mounted."""
    if not _kernel_ok():
        pytest.skip("needs root and pre-content fanotify (Linux >= 6.14)")
    from fuzz_support import known_chunks

    from erofs_nydus.mount import is_mountpoint

    boot, blobs = image
    _summary, work = fuzzed
    known = known_chunks(boot, str(blobs))
    cache = tmp_path / "cache"
    mp = tmp_path / "mnt"
    mp.mkdir()
    accepted = sorted(work.glob("accepted-*.boot"))[:4]
    assert accepted
    bad = tmp_path / "refused.boot"
    bad.write_bytes(tree_broken(boot))
    for mutant in [*accepted, bad]:
        res = cli("mount", str(mutant), str(mp), "--blob-dir", str(blobs), "--cache-dir",
                  str(cache), "--mode", "fanotify")
        if mutant == bad:
            assert res.returncode != 0 and not is_mountpoint(mp), res
            assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
            continue
        assert res.returncode == 0, res
        try:
            for rel, want in _expected_files(mutant.read_bytes(), known).items():
                p = os.fsencode(mp) + rel
                try:
                    with open(p, "rb") as f:
                        got = f.read()
                except OSError:
                    continue  # an error is always allowed
                assert got == want, f"{mutant.name}: {rel!r} read other bytes"
        finally:
            _umount(mp, cache)
    _daemon_gone(cache)


def _umount(mp: Path, cache: Path) -> None:
    res = cli("umount", str(mp), "--cache-dir", str(cache))
    assert res.returncode == 0, res


def _daemon_gone(cache: Path) -> None:
    """The last umount stops the daemon: wait for it (and fail if it stays)."""
    from daemon_support import wait_for

    from erofs_nydus.service.client import DaemonClient

    client = DaemonClient(cache)
    # 90 s: a loaded 2-core machine
    wait_for(lambda: not client.supervisor_running(), 90, f"the daemon of {cache} to stop")


def test_cached_chunks_rechecked_for_an_image_that_describes_them_differently(
        image: tuple[bytes, Path], tmp_path: Path) -> None:
    """Found by the real-mount fuzzing: bits set under one bootstrap were trusted for
    another claiming other digests for the same chunk indexes (shared cache dir)."""
    from erofs_nydus.errors import DigestMismatchError

    boot, blobs = image
    cache, _expected, _data = _registered(image, tmp_path)
    # entry 2 claims entry 3's digest (order kept): its cached bytes are not that
    out = bytearray(boot)
    off2, off3 = _chunk_entry_off(boot, 2), _chunk_entry_off(boot, 3)
    out[off2:off2 + 32] = boot[off3:off3 + 32]
    liar = tmp_path / "liar.boot"
    liar.write_bytes(bytes(out))
    victim = read_image_meta(bytes(out)).chunks[0]
    (c,) = [c for c in victim if c.digest == boot[off3:off3 + 32] and
            c.index == chunk_fields(boot, 2)[C_INDEX]]
    t = _table(cache)
    t.register(str(liar), {"type": "local", "dir": str(blobs)}, str(tmp_path / "m2"))
    (srv,) = t.blobs.values()
    assert not srv.cache.present(c)
    with pytest.raises(DigestMismatchError):
        srv.fill(c.uncompressed_offset, 1)
    t.close()


def test_fscache_open_serves_only_the_validated_bootstrap(tmp_path: Path) -> None:
    """fscache mode reads the stored copy when the kernel opens the image: a copy
    changed after registration is refused, not handed to the kernel."""
    import errno

    from test_fscache_daemon import Harness, _open_msg

    h = Harness(tmp_path)
    try:
        fsid = h.info["fsid"]
        stored = Path(h.info["bootstrap"])
        fd, _ = h.anon()
        h.handle(_open_msg(1, 10, fsid, fsid, fd))
        assert h.replies() == [f"1,{stored.stat().st_size}".encode()]
        h.worker.objects.remove(10)
        stored.write_bytes(stored.read_bytes()[:-1] + b"\x01")  # planted after register
        fd, _ = h.anon()
        h.handle(_open_msg(2, 11, fsid, fsid, fd))
        assert h.replies() == [f"2,-{errno.ENOENT}".encode()]
    finally:
        h.close()


@contextlib.contextmanager
def _live_mount(image: tuple[bytes, Path], tmp_path: Path, *extra: str) -> Iterator[
        tuple[Path, Path]]:
    """`image` mounted in fanotify mode through the CLI, without prefetch: (mountpoint,
    cache dir).  Unmounted after, which must succeed; then the daemon must stop."""
    boot, blobs = image
    src = tmp_path / "img.boot"
    src.write_bytes(boot)
    cache, mp = tmp_path / "cache", tmp_path / "mnt"
    mp.mkdir()
    res = cli("mount", str(src), str(mp), "--blob-dir", str(blobs), "--cache-dir", str(cache),
              "--mode", "fanotify", "--no-prefetch", *extra)
    assert res.returncode == 0, res
    try:
        yield mp, cache
    finally:
        _umount(mp, cache)
    _daemon_gone(cache)


def _read_uncached(path: Path) -> bytes:
    """Read a file of a mount after dropping its page cache (what a later reader sees)."""
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return f.read()


@pytest.mark.kernel
def test_cache_verify_live_mount(image: tuple[bytes, Path], tmp_path: Path) -> None:
    """A flipped byte in a complete cache file under a live fanotify mount: served as
    is (the blob is complete, reads no longer reach the daemon) until `cache verify`
    drops the chunk; then the next read is filled and correct."""
    if not _kernel_ok():
        pytest.skip("needs root and pre-content fanotify (Linux >= 6.14)")
    from daemon_support import daemon_status

    boot, _blobs = image
    with _live_mount(image, tmp_path) as (mp, cache):
        want = {n: (mp / n).read_bytes() for n in ("f0", "f1", "f2", "f3")}
        (blob,) = daemon_status(cache)["blobs"].values()
        assert blob["complete"] and not blob["marked"]
        meta = read_image_meta(boot)
        from erofs_nydus.rafs.reader import BootstrapReader

        f2 = BootstrapReader(boot).tree().children[b"f2"].inode.chunks
        assert f2 is not None
        victim = f2[1]
        _flip(Path(blob["path"]), victim.uncompressed_offset + 7)
        pos = meta.chunk_size + 7  # f2's chunk 1, byte 7
        assert _read_uncached(mp / "f2")[pos] != want["f2"][pos]  # the problem
        res = cli("cache", "verify", "--cache-dir", str(cache))
        assert res.returncode == 1 and "1 dropped" in res.stdout, res
        assert daemon_status(cache)["blobs"][meta.blobs[0].blob_id]["marked"]
        for n, data in want.items():
            assert _read_uncached(mp / n) == data, n
        res = cli("cache", "verify", "--cache-dir", str(cache))
        assert res.returncode == 0 and "0 dropped" in res.stdout, res


@pytest.mark.kernel
def test_restarted_daemon_does_not_read_a_marked_cache_file_back(
        image: tuple[bytes, Path], tmp_path: Path) -> None:
    """kill -9 of the supervisor: the keeper's new supervisor has none of the cache fds
    the old one kept, so the new daemon reopens a blob the surviving group still marks.
    Re-digesting it then (stale seal) would raise pre-content events the daemon itself
    must answer, before it serves any: readers and the daemon hung for good.  It drops
    the unvouched chunks instead; every file then reads back right."""
    if not _kernel_ok():
        pytest.skip("needs root and pre-content fanotify (Linux >= 6.14)")
    import signal
    import threading
    import time

    from erofs_nydus.service.client import DaemonClient

    with _live_mount(image, tmp_path, "--amplify", "0") as (mp, cache):
        client = DaemonClient(cache)
        want = {n: hashlib.sha256(bytes([i])).digest() * (2500 * (i + 1))
                for i, n in enumerate(("f0", "f1", "f2", "f3"))}
        assert (mp / "f0").read_bytes() == want["f0"]  # some chunks present, blob marked
        data = next(cache.glob("*.blob.data"))
        os.chmod(data, 0o600)  # ctime moves: the seal no longer vouches for the chunks
        sup = client.supervisor_pid()
        assert sup is not None
        os.kill(sup, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while client.supervisor_pid() in (None, sup):
            assert time.monotonic() < deadline, "no new supervisor"
            time.sleep(0.05)
        got: dict[str, bytes] = {}

        def read_all() -> None:
            for n in want:
                got[n] = _read_uncached(mp / n)

        reader = threading.Thread(target=read_all, daemon=True)
        reader.start()
        reader.join(120)  # a liveness bound, not a timing assertion
        assert not reader.is_alive(), "readers hang behind the restarted daemon"
        assert got == want
        log = (cache / "daemon.log").read_text(errors="replace")
        assert "not re-digested" in log


def test_cache_file_beyond_the_filesystem_limit_is_one_line(tmp_path: Path) -> None:
    """The largest size the limits allow (2^24 chunks of 16 MiB: 256 TiB) exceeds
    ext4's file size limit: a DaemonError (one line to the CLI), not an OSError."""
    from daemon_support import make_blob, make_payloads

    from erofs_nydus.daemon.blobcache import BlobCacheFile

    sb = make_blob(make_payloads([5000]), chunk_size=R.MAX_CHUNK_SIZE)
    big = dataclasses.replace(sb.blob, chunk_count=R.MAX_CHUNKS_PER_BLOB,
                              uncompressed_size=R.MAX_CHUNKS_PER_BLOB * R.MAX_CHUNK_SIZE)
    try:
        bcf = BlobCacheFile(str(tmp_path), big, sb.chunks, durable=False)
    except DaemonError as exc:
        assert "cache file" in str(exc) and "\n" not in str(exc)
    else:  # a filesystem that takes it: sparse, nothing allocated
        assert os.stat(bcf.data_path).st_blocks == 0
        bcf.close()


def test_register_reads_bounded_regular_bootstraps_only(tmp_path: Path) -> None:
    """The daemon holds a bootstrap in memory: /dev/zero or a runaway file is refused
    before it is read, not read until the host runs out of memory."""
    from erofs_nydus.daemon.images import MAX_BOOTSTRAP_SIZE
    from erofs_nydus.errors import SourceError

    t = _table(tmp_path)
    backend = {"type": "local", "dir": str(tmp_path)}
    with pytest.raises(SourceError, match="regular file"):
        t.register("/dev/zero", backend, str(tmp_path / "m"))
    huge = tmp_path / "huge.boot"
    with open(huge, "wb") as f:
        f.truncate(MAX_BOOTSTRAP_SIZE + 1)
    with pytest.raises(FormatError, match="larger than"):
        t.register(str(huge), backend, str(tmp_path / "m"))
    with pytest.raises(SourceError, match="cannot read"):
        t.register(str(tmp_path / "missing.boot"), backend, str(tmp_path / "m"))
    t.close()
