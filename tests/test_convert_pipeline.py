"""The pipelined build and convert (issue 16 item 1): read-ahead + inflate thread, chunk
digest + compress pool, concurrent layers, uploads as layers finish.

Invariants: the output is byte-identical to a single-threaded build whatever the thread
and job counts; a failure in the middle (corrupt gzip, failing upload, failing layer)
leaves no partial output, does not hang, and leaves no thread behind; memory is bounded
by the pipeline's window, not by file or layer size.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from layers_support import base_step, top_step, umoci_image, upper_step
from registry_fixture import RegistryServer, skopeo_copy

from erofs_nydus.builder import BuildOptions, create_image
from erofs_nydus.builder.blob import BlobWriter, DigestOnlyWriter
from erofs_nydus.builder.inflate import ReadAhead
from erofs_nydus.builder.source import tree_from_dir, tree_from_tar
from erofs_nydus.errors import (
    DigestMismatchError,
    ErofsNydusError,
    NotFoundError,
    RegistryError,
    SourceError,
)
from erofs_nydus.rafs.tree import Node
from erofs_nydus.registry import RegistryClient
from erofs_nydus.registry.convert import ConvertOptions, convert_image

# -- helpers ---------------------------------------------------------------------------------


def _pipeline_threads() -> set[threading.Thread]:
    """Threads the pipeline starts (by the names it gives them)."""
    prefixes = ("read ", "chunk", "blob-writer", "layer", "upload")
    return {t for t in threading.enumerate() if t.name.startswith(prefixes)}


@pytest.fixture
def no_leaked_threads() -> Iterator[None]:
    before = _pipeline_threads()
    yield
    assert _pipeline_threads() - before == set()


def _tar_gz(entries: list[tuple[str, bytes]], level: int = 6) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=level, mtime=0)


def _mixed_entries(seed: int = 16) -> list[tuple[str, bytes]]:
    """Small files, repeats (dedup), zeros, and files spanning several chunks."""
    rnd = random.Random(seed)
    block = rnd.randbytes(300_000)
    out = [(f"small/{i:03d}", rnd.randbytes(rnd.randrange(0, 9000))) for i in range(150)]
    out += [(f"dup/{i}", block) for i in range(4)]
    out += [("zeros", bytes(3 * 65536 + 17)),
            ("big/random", rnd.randbytes(5 * 65536 + 123)),
            ("big/text", b"".join(b"line %d of a text file\n" % i for i in range(40_000)))]
    return out


def _build(src: str | Path, out: Path, **opts: object) -> tuple[bytes, dict[str, bytes]]:
    res = create_image(str(src), str(out / "b.boot"), str(out / "blobs"),
                       BuildOptions(chunk_size=65536, **opts))  # type: ignore[arg-type]
    blobs = {b.blob_id: (out / "blobs" / b.blob_id).read_bytes() for b in res.blobs}
    return (out / "b.boot").read_bytes(), blobs


# -- determinism -------------------------------------------------------------------------------


@pytest.mark.parametrize(("compressor", "digester"), [
    ("lz4", "sha256"), ("zstd", "blake3"), ("none", "blake3"), ("zstd", "sha256")])
def test_pipelined_tar_build_is_byte_identical(tmp_path: Path, compressor: str,
                                               digester: str, no_leaked_threads: None) -> None:
    src = tmp_path / "src.tar.gz"
    src.write_bytes(_tar_gz(_mixed_entries()))
    ref = _build(src, tmp_path / "t0", threads=0, compressor=compressor, digester=digester)
    for threads in (1, 3, 8):
        got = _build(src, tmp_path / f"t{threads}", threads=threads, compressor=compressor,
                     digester=digester)
        assert got == ref, f"threads={threads}"


def test_pipelined_dir_build_is_byte_identical(tmp_path: Path, no_leaked_threads: None) -> None:
    tree = tmp_path / "tree"
    for name, data in _mixed_entries(7):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    with open(tree / "sparse", "wb") as f:  # holes go through the pipeline as zero chunks
        f.truncate(4 * 65536)
        f.seek(65536 + 5)
        f.write(b"data")
    ref = _build(tree, tmp_path / "t0", threads=0, blob_cache_dir=str(tmp_path / "c0"))
    got = _build(tree, tmp_path / "t4", threads=4, blob_cache_dir=str(tmp_path / "c4"))
    assert got == ref
    (blob_id,) = ref[1]
    cache = f"{blob_id}.blob.data"
    assert (tmp_path / "c0" / cache).read_bytes() == (tmp_path / "c4" / cache).read_bytes()


def _digests(root: Node) -> dict[bytes, list[bytes]]:
    return {p: [c.digest for c in n.inode.chunks] for p, n in root.walk()}


@pytest.mark.parametrize("threads", [0, 3])
def test_digest_only_writer_goes_through_the_pipeline_storing_nothing(
        tmp_path: Path, threads: int, no_leaked_threads: None) -> None:
    """`check REF --source` chunks source layers with DigestOnlyWriter: the pipelined
    add_stream / add_file commit each chunk through its hook, so it stores no chunk,
    creates no file, gives each reference its own offset (merge_trees tells chunks apart
    by offset), and the digests a real zstd+blake3 build gives."""
    entries = _mixed_entries(3)
    tgz = _tar_gz(entries)
    tree = tmp_path / "tree"
    for name, data in entries:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    target = tmp_path / "never"
    got = {}
    for kind in ("tar", "dir"):
        writer = DigestOnlyWriter(str(target), chunk_size=65536, compressor="none",
                                  digester="blake3", threads=threads)
        try:
            if kind == "tar":
                root = tree_from_tar(io.BufferedReader(io.BytesIO(tgz)),  # type: ignore[arg-type]
                                     writer, label="t")
            else:
                root = tree_from_dir(str(tree), writer)
            writer.flush()
        finally:
            writer.abort()
        assert writer.chunks == [] and writer.stats.chunks_stored == 0, kind
        refs = [c for _, n in root.walk() for c in n.inode.chunks]
        assert len(refs) == writer.stats.chunks_referenced > len({c.digest for c in refs})
        assert len({c.uncompressed_offset for c in refs}) == len(refs)
        got[kind] = _digests(root)
    assert not target.exists()
    real = BlobWriter(str(tmp_path / "blobs"), chunk_size=65536, compressor="zstd",
                      digester="blake3")
    try:
        want = _digests(tree_from_tar(io.BufferedReader(io.BytesIO(tgz)),  # type: ignore[arg-type]
                                      real, label="t"))
    finally:
        real.abort()
    assert got["tar"] == want
    assert {p: d for p, d in got["dir"].items() if d} == {p: d for p, d in want.items() if d}


def test_multi_member_gzip_and_zero_padding(tmp_path: Path) -> None:
    """Concatenated gzip members and trailing zeros read as gzip.GzipFile reads them."""
    tar = gzip.decompress(_tar_gz(_mixed_entries()))
    cut = len(tar) // 3
    multi = gzip.compress(tar[:cut], mtime=0) + gzip.compress(tar[cut:], mtime=0) + bytes(700)
    (tmp_path / "one.tar.gz").write_bytes(gzip.compress(tar, mtime=0))
    (tmp_path / "multi.tar.gz").write_bytes(multi)
    assert _build(tmp_path / "one.tar.gz", tmp_path / "a") == _build(
        tmp_path / "multi.tar.gz", tmp_path / "b")


@pytest.fixture(scope="module")
def source_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return umoci_image(tmp_path_factory.mktemp("src"), [base_step, upper_step, top_step])


def _opts(tmp_path: Path, name: str, **kw: object) -> ConvertOptions:
    return ConvertOptions(cache_dir=str(tmp_path / name), client_options={"plain_http": True},
                          **kw)  # type: ignore[arg-type]


@pytest.mark.registry
def test_convert_same_image_whatever_jobs_and_threads(source_layout: Path, tmp_path: Path,
                                                      no_leaked_threads: None) -> None:
    src = f"oci:{source_layout}:latest"
    ref = convert_image(src, f"oci:{tmp_path / 'o1'}:n", _opts(tmp_path, "c1", jobs=1,
                                                                threads=0))
    for jobs, threads in ((3, 4), (2, 1)):
        got = convert_image(src, f"oci:{tmp_path / f'o{jobs}'}:n",
                            _opts(tmp_path, f"c{jobs}", jobs=jobs, threads=threads))
        assert got.layers_converted == 3
        assert got.manifest_digest == ref.manifest_digest
        assert got.blobs == ref.blobs


@pytest.mark.registry
def test_cli_jobs_1_and_4_push_identical_zstd_blake3_images(
        pushed: str, registry: RegistryServer, source_layout: Path, tmp_path: Path) -> None:
    """`convert --jobs 1` and `--jobs 4` with zstd + blake3 (streamed uploads, pooled
    chunks) push the same manifest, blobs and bootstrap as a serial in-process build
    (one layer at a time, no chunk threads); `check --source` passes on it."""
    import json

    serial = convert_image(f"oci:{source_layout}:latest", f"oci:{tmp_path / 'serial'}:n",
                           _opts(tmp_path, "c0", jobs=1, threads=0, compressor="zstd",
                                 digester="blake3"))
    results = {}
    for jobs in (1, 4):
        target = registry.ref(f"pipeline/zb{jobs}:v1")
        proc = subprocess.run(
            [sys.executable, "-m", "erofs_nydus.cli", "convert", "--source", pushed,
             "--target", target, "--plain-http", "--cache-dir", str(tmp_path / f"j{jobs}"),
             "--compressor", "zstd", "--digester", "blake3", "--jobs", str(jobs), "-q",
             "-J", "-"], capture_output=True, text=True, check=False, timeout=300)
        assert proc.returncode == 0, proc.stderr
        results[jobs] = json.loads(proc.stdout)
        assert results[jobs]["layers_converted"] == 3
    for jobs, res in results.items():
        assert res["manifest_digest"] == serial.manifest_digest, jobs
        assert [(b["digest"][7:], b["size"]) for b in res["blobs"]] == serial.blobs, jobs
        assert Path(res["bootstrap"]).read_bytes() == Path(serial.bootstrap).read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "erofs_nydus.cli", "check", registry.ref("pipeline/zb4:v1"),
         "--source", pushed, "--plain-http"], capture_output=True, text=True, check=False,
        timeout=300)
    assert proc.returncode == 0, proc.stderr


# -- failures in the middle of the pipeline ---------------------------------------------------


def _corrupt(data: bytes, where: str) -> bytes:
    buf = bytearray(data)
    if where == "crc":
        buf[-6] ^= 0x55  # the member's CRC32: every deflate block is still valid
    elif where == "deflate":
        for i in range(len(buf) // 2, len(buf) // 2 + 64):
            buf[i] ^= 0xA5
    else:  # truncated
        del buf[len(buf) * 2 // 3:]
    return bytes(buf)


@pytest.mark.parametrize("where", ["crc", "deflate", "truncated"])
@pytest.mark.parametrize("threads", [0, 3])
def test_corrupt_gzip_fails_cleanly(tmp_path: Path, where: str, threads: int,
                                    no_leaked_threads: None) -> None:
    src = tmp_path / "bad.tar.gz"
    src.write_bytes(_corrupt(_tar_gz(_mixed_entries()), where))
    with pytest.raises(SourceError, match=r"corrupt|truncated|unexpected end"):
        create_image(str(src), str(tmp_path / "b.boot"), str(tmp_path / "blobs"),
                     BuildOptions(chunk_size=65536, threads=threads))
    assert not (tmp_path / "b.boot").exists()
    blobs = tmp_path / "blobs"
    assert not blobs.exists() or os.listdir(blobs) == []


def test_read_ahead_stops_when_the_reader_gives_up(no_leaked_threads: None) -> None:
    """Closing the reader early (an error in the tar parser) stops the thread even
    when it is blocked on a full queue."""
    endless = io.BufferedReader(io.BytesIO(bytes(64 << 20)))
    r = ReadAhead(endless, gzip=False, name="read test")
    assert r.read(10) == bytes(10)
    r.close()


def _create_cli_error(tmp_path: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "erofs_nydus.cli", "create", str(tmp_path / "bad.tar.gz"),
         "-B", str(tmp_path / "cli.boot"), "-D", str(tmp_path / "cli-blobs")],
        capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode != 0
    return proc.stderr


def test_corrupt_gzip_cli_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "bad.tar.gz").write_bytes(_corrupt(_tar_gz(_mixed_entries()), "crc"))
    err = _create_cli_error(tmp_path)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "corrupt" in err


@pytest.fixture(scope="module")
def pushed(source_layout: Path, registry: RegistryServer) -> str:
    ref = registry.ref("pipeline/src:v1")
    skopeo_copy(f"oci:{source_layout}:latest", f"docker://{ref}")
    return ref


def _break_stream_uploads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """RegistryClient.push_blob_stream fails after its first piece (fault injection)."""
    failed: list[str] = []

    def failing(self: RegistryClient, repo: object, pieces: Iterator[bytes],
                **kw: object) -> tuple[str, int]:
        next(iter(pieces), None)
        failed.append(str(repo))
        raise RegistryError("injected: connection reset while streaming a blob")

    monkeypatch.setattr(RegistryClient, "push_blob_stream", failing)
    return failed


@pytest.mark.registry
def test_failed_stream_upload_falls_back_to_the_file(
        pushed: str, registry: RegistryServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, no_leaked_threads: None) -> None:
    from erofs_nydus.registry.remote_check import check_remote

    failed = _break_stream_uploads(monkeypatch)
    target = registry.ref("pipeline/fallback:v1")
    ref = convert_image(pushed, target, _opts(tmp_path, "c", jobs=3))
    # every layer's new blob (a tiny one too) was streamed, failed, went up from its file
    assert len(failed) == ref.layers_converted == 3
    monkeypatch.undo()
    report = check_remote(target, pushed, client_options={"plain_http": True})
    assert report.ok, report.problems
    again = convert_image(pushed, registry.ref("pipeline/streamed:v1"), _opts(tmp_path, "d"))
    assert again.manifest_digest == ref.manifest_digest


@pytest.mark.registry
def test_stream_upload_with_the_callers_digest(registry: RegistryServer) -> None:
    """push_blob_stream(digest=...) sends the digest its caller computed (the blob
    writer's) instead of hashing again; a wrong one is refused by the registry, in one
    line, and nothing is stored under either digest."""
    import hashlib

    data = random.Random(7).randbytes(3 * 65536 + 11)
    pieces = [data[i:i + 65536] for i in range(0, len(data), 65536)]
    right = "sha256:" + hashlib.sha256(data).hexdigest()
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    with RegistryClient(plain_http=True) as client:
        repo = registry.ref("pipeline/stream-digest")
        assert client.push_blob_stream(repo, iter(pieces), digest=lambda: right) == (
            right, len(data))
        assert client.get_blob(repo, right, max_size=len(data)) == data
        other = registry.ref("pipeline/stream-wrong")
        with pytest.raises(DigestMismatchError) as err:
            client.push_blob_stream(other, iter(pieces), digest=lambda: wrong)
        assert "\n" not in str(err.value)
        assert not client.blob_exists(other, wrong) and not client.blob_exists(other, right)


def test_blob_written_before_sync_and_bootstrap(tmp_path: Path,
                                                 no_leaked_threads: None) -> None:
    """create_image(blob_written=...) names the new blob once its last byte is written,
    before it is renamed into place and before the bootstrap exists; never when the
    build stores no new blob."""
    src = tmp_path / "src.tar.gz"
    src.write_bytes(_tar_gz(_mixed_entries()))
    seen: list[tuple[str, bool, bool]] = []
    blobs, boot = tmp_path / "blobs", tmp_path / "b.boot"

    def written(blob_id: str) -> None:
        seen.append((blob_id, (blobs / blob_id).exists(), boot.exists()))

    res = create_image(str(src), str(boot), str(blobs), BuildOptions(chunk_size=65536),
                       blob_written=written)
    assert res.new_blob is not None
    assert seen == [(res.new_blob.blob_id, False, False)]
    empty = tmp_path / "empty.tar.gz"
    empty.write_bytes(_tar_gz([]))
    seen.clear()
    res = create_image(str(empty), str(tmp_path / "e.boot"), str(blobs), BuildOptions(),
                       blob_written=written)
    assert res.new_blob is None and seen == []


def test_blob_sync_overlaps_the_bootstrap_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               no_leaked_threads: None) -> None:
    """The new blob's fsync runs while the bootstrap is planned (the fsync waits, up to
    60 s, for the plan to start; before, it ran first), and the bootstrap file is only
    written once the blob is in place."""
    import erofs_nydus.builder.create as create_mod

    src = tmp_path / "src.tar.gz"
    src.write_bytes(_tar_gz(_mixed_entries()))
    planning = threading.Event()
    synced_during_plan: list[bool] = []
    real_fsync, real_plan = os.fsync, create_mod.write_bootstrap
    blobs = tmp_path / "blobs"

    def fsync(fd: int) -> None:
        if threading.current_thread().name == "blob-sync":
            synced_during_plan.append(planning.wait(60))
        real_fsync(fd)

    def plan(*a: object, **kw: object) -> object:
        planning.set()
        return real_plan(*a, **kw)  # type: ignore[arg-type]

    def write(path: str, data: bytes) -> None:  # the blob is in place by now
        assert [p.name for p in blobs.iterdir() if not p.name.startswith(".")] == [
            res_id[0]]
        real_write(path, data)

    res_id: list[str] = []
    real_write = create_mod.write_file_atomic
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(create_mod, "write_bootstrap", plan)
    monkeypatch.setattr(create_mod, "write_file_atomic", write)
    res = create_image(str(src), str(tmp_path / "b.boot"), str(blobs),
                       BuildOptions(chunk_size=65536), blob_written=res_id.append)
    assert synced_during_plan == [True]
    assert res.new_blob is not None and res_id == [res.new_blob.blob_id]


def test_failed_background_blob_sync_leaves_nothing(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    no_leaked_threads: None) -> None:
    """fsync of the new blob fails (fault injection: EIO) in its background thread: one
    SourceError, no blob, no temporary file, no bootstrap."""
    import errno

    src = tmp_path / "src.tar.gz"
    src.write_bytes(_tar_gz(_mixed_entries()))

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", eio)
    with pytest.raises(SourceError, match=r"cannot write the blob in .*Input/output error"):
        create_image(str(src), str(tmp_path / "b.boot"), str(tmp_path / "blobs"),
                     BuildOptions(chunk_size=65536))
    assert list((tmp_path / "blobs").iterdir()) == []
    assert not (tmp_path / "b.boot").exists()


@pytest.mark.registry
def test_stream_upload_ends_while_the_layer_bootstrap_is_built(
        pushed: str, registry: RegistryServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, no_leaked_threads: None) -> None:
    """A layer's streamed blob is completed in the registry (its digest checked there)
    while the builder still builds the layer bootstrap, not after: the layer bootstrap
    waits (up to 60 s) for the registry to have the layer's new blob.  Also a blob
    smaller than one stream piece (the top layer's, ~100 bytes)."""
    import time

    import erofs_nydus.builder.create as create_mod

    target = registry.ref("pipeline/early-end:v1")
    real = create_mod.write_bootstrap
    found: list[bool] = []
    client = RegistryClient(plain_http=True)

    def waiting(root: Node, blobs: list[object], *a: object, **kw: object) -> object:
        blob_id = blobs[-1].blob_id  # type: ignore[attr-defined]
        end = time.monotonic() + 60
        while not client.blob_exists(target, f"sha256:{blob_id}") and time.monotonic() < end:
            time.sleep(0.02)
        found.append(client.blob_exists(target, f"sha256:{blob_id}"))
        return real(root, blobs, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(create_mod, "write_bootstrap", waiting)
    try:
        res = convert_image(pushed, target, _opts(tmp_path, "c", jobs=2))
    finally:
        client.close()
    assert found == [True] * 3 and res.layers_converted == 3
    monkeypatch.undo()
    again = convert_image(pushed, registry.ref("pipeline/early-end2:v1"), _opts(tmp_path, "d"))
    assert again.manifest_digest == res.manifest_digest


@pytest.mark.registry
def test_failing_upload_leaves_no_manifest(pushed: str, registry: RegistryServer,
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           no_leaked_threads: None) -> None:
    """The registry refuses every data blob but the first, streamed and from its file
    (fault injection): convert fails with that error, the target tag never appears,
    and every thread is joined."""
    _break_stream_uploads(monkeypatch)
    real = RegistryClient.push_blob
    calls = []

    def failing(self: RegistryClient, repo: object, data: object, digest: str | None = None,
                **kw: object) -> str:
        if isinstance(data, str):  # data blobs are pushed from files
            calls.append(digest)
            if len(calls) >= 2:
                raise RegistryError(f"injected: upload of {digest} refused")
        return real(self, repo, data, digest, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(RegistryClient, "push_blob", failing)
    target = registry.ref("pipeline/out:v1")
    with pytest.raises(RegistryError, match="injected: upload"):
        convert_image(pushed, target, _opts(tmp_path, "c", jobs=3))
    monkeypatch.undo()
    client = RegistryClient(plain_http=True)
    try:
        with pytest.raises(NotFoundError):
            client.get_manifest(target)
    finally:
        client.close()


@pytest.mark.registry
def test_failing_layer_stops_the_others(source_layout: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        no_leaked_threads: None) -> None:
    """One layer's download fails half-way while others convert: the error is that
    layer's, nothing is written to the oci: target, no thread is left behind."""
    from erofs_nydus.registry.layout import OCILayout

    real = OCILayout.open_blob_stream
    sizes = sorted(p.stat().st_size for p in (source_layout / "blobs" / "sha256").iterdir())

    def failing(self: OCILayout, repo: object, digest: str, **kw: object) -> Iterator[bytes]:
        it = real(self, repo, digest, **kw)  # type: ignore[arg-type]
        if kw.get("size") != sizes[-1]:  # the largest blob: a layer
            return it

        def broken() -> Iterator[bytes]:
            yield next(it)[:1000]
            raise RegistryError("injected: connection reset in the middle of a layer")
        return broken()

    monkeypatch.setattr(OCILayout, "open_blob_stream", failing)
    with pytest.raises(ErofsNydusError, match="injected"):
        convert_image(f"oci:{source_layout}:latest", f"oci:{tmp_path / 'out'}:n",
                      _opts(tmp_path, "c", jobs=3))
    assert not (tmp_path / "out").exists()


# -- memory bound -------------------------------------------------------------------------------


def _huge_tar_gz(size: int) -> Iterator[bytes]:
    """A tar.gz of one `size`-byte file, made of gzip members compressed once each
    (header, one repeated 1 MiB random block, trailer), so it streams at no cost."""
    block = random.Random(3).randbytes(1 << 20)
    info = tarfile.TarInfo("huge")
    info.size, info.mode, info.mtime = size, 0o644, 0
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    pad = (-size) % 512
    yield gzip.compress(header, mtime=0)
    member = gzip.compress(block, compresslevel=1, mtime=0)
    for _ in range(size // len(block)):
        yield member
    yield gzip.compress(bytes(pad + 1024), mtime=0)


@pytest.mark.slow
def test_huge_file_converts_under_an_rss_limit(tmp_path: Path) -> None:
    """A 1 GiB file streamed through `create -` (stdin): the child's peak RSS stays far
    below the file size (the pipeline's window, not the file, bounds memory)."""
    size = 1 << 30
    # measured by /usr/bin/time: wait4() here would count this (test) process's RSS too,
    # as a child spawned from it inherits its peak until exec
    proc = subprocess.Popen(
        ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "erofs_nydus.cli", "create", "-",
         "-B", str(tmp_path / "b"), "-D", str(tmp_path / "blobs"), "--compressor", "lz4"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    try:
        for piece in _huge_tar_gz(size):
            proc.stdin.write(piece)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    assert proc.stderr is not None
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait() == 0, err
    peak_mib = int(err.strip().splitlines()[-1]) / 1024  # KiB
    assert peak_mib < 200, f"peak RSS {peak_mib:.0f} MiB for a 1 GiB file"
    assert (tmp_path / "b").exists()


# -- the one-layer merge shortcut ----------------------------------------------------------------


def _odd_layer() -> bytes:
    """Implicit parent dirs, a hard link, a symlink, a fifo, xattrs, an empty file, a
    repeated directory entry."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        def add(info: tarfile.TarInfo, data: bytes = b"") -> None:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)

        f = tarfile.TarInfo("deep/er/file")
        f.pax_headers = {"SCHILY.xattr.user.k": "v"}
        add(f, b"x" * 70000)
        h = tarfile.TarInfo("deep/link")
        h.type, h.linkname = tarfile.LNKTYPE, "deep/er/file"
        add(h)
        s = tarfile.TarInfo("sym")
        s.type, s.linkname = tarfile.SYMTYPE, "deep/er/file"
        add(s)
        p = tarfile.TarInfo("fifo")
        p.type = tarfile.FIFOTYPE
        add(p)
        add(tarfile.TarInfo("empty"))
        for mode in (0o700, 0o755):
            d = tarfile.TarInfo("deep")
            d.type, d.mode = tarfile.DIRTYPE, mode
            add(d)
    return gzip.compress(raw.getvalue(), mtime=0)


def test_one_layer_merge_is_the_layer(source_layout: Path, tmp_path: Path) -> None:
    """Where convert skips the merge of a one-layer image, merging gives the same bytes."""
    from layers_support import layer_paths

    from erofs_nydus.builder.merge import merge_bootstraps
    from erofs_nydus.registry.convert import single_layer_merge_is_identity

    (tmp_path / "odd.tar.gz").write_bytes(_odd_layer())
    (tmp_path / "mixed.tar.gz").write_bytes(_tar_gz(_mixed_entries()))
    sources = [*layer_paths(source_layout), tmp_path / "odd.tar.gz", tmp_path / "mixed.tar.gz"]
    identity = 0
    for i, src in enumerate(sources):
        for comp in ("lz4", "zstd"):
            boot = tmp_path / f"l{i}{comp}.boot"
            create_image(str(src), str(boot), str(tmp_path / "blobs"),
                         BuildOptions(compressor=comp, chunk_size=65536))
            if not single_layer_merge_is_identity([str(boot)], ConvertOptions()):
                continue
            identity += 1
            merge_bootstraps([str(boot)], str(tmp_path / "m.boot"))
            assert (tmp_path / "m.boot").read_bytes() == boot.read_bytes(), src
    assert identity >= 6  # the base layer, the odd one and the mixed one at least


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_member_reads_like_tarfile(tmp_path: Path, fmt: str) -> None:
    """Sparse members (GNU tar --sparse) still go through tarfile's sparse map; plain
    members are read straight from the read-ahead reader: the files read back equal."""
    from erofs_nydus.rafs.backend import LocalDirBackend
    from erofs_nydus.rafs.check import read_chunk
    from erofs_nydus.rafs.reader import open_bootstrap
    from erofs_nydus.rafs.tree import lookup

    src = tmp_path / "src"
    src.mkdir()
    with open(src / "holes", "wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"middle")
        f.seek((3 << 20) - 5)
        f.write(b"tail!")
    (src / "after").write_bytes(b"plain member after a sparse one" * 1000)
    tar = tmp_path / "s.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(tar), "-C", str(src),
                    "holes", "after"], check=True)
    with tarfile.open(tar) as tf:
        assert tf.getmember("holes").issparse()
    create_image(str(tar), str(tmp_path / "b.boot"), str(tmp_path / "blobs"),
                 BuildOptions(threads=2))
    r = open_bootstrap(str(tmp_path / "b.boot"))
    backend = LocalDirBackend(str(tmp_path / "blobs"))
    root = r.tree()
    for name in ("holes", "after"):
        node = lookup(root, b"/" + name.encode())
        assert node is not None and node.inode.chunks
        blob_id = r.image.blobs[node.inode.chunks[0].blob_index].blob_id
        got = b"".join(read_chunk(backend, blob_id, c, verify=True) for c in node.inode.chunks)
        assert got == (src / name).read_bytes(), name


def test_zlib_fallback_inflates_and_checks_the_crc(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Without isal the read-ahead inflates with zlib: same image, CRC still checked."""
    import zlib

    from erofs_nydus.builder import inflate

    good = _tar_gz(_mixed_entries())
    (tmp_path / "good.tar.gz").write_bytes(good)
    (tmp_path / "bad.tar.gz").write_bytes(_corrupt(good, "crc"))
    ref = _build(tmp_path / "good.tar.gz", tmp_path / "isal")
    monkeypatch.setattr(inflate, "_inflate_lib", zlib)
    monkeypatch.setattr(inflate, "INFLATE_ERRORS", (zlib.error,))
    assert _build(tmp_path / "good.tar.gz", tmp_path / "zlib") == ref
    with pytest.raises(SourceError, match="corrupt"):
        _build(tmp_path / "bad.tar.gz", tmp_path / "bad")


def test_convert_imports_only_what_its_start_needs() -> None:
    """Importing the convert module (what `convert` does before its first fetch) loads
    neither the merge, the optimizer, nor the resolver and its registry backend (~25 ms
    of serial start), nor the builder and the bootstrap reader (convert_image imports
    them in a thread while the clients load the CA bundle); `extract_bootstrap` is
    still importable from it."""
    code = (
        "import json, sys\n"
        "import erofs_nydus.registry.convert as c\n"
        "before = sorted(m for m in sys.modules if m.startswith('erofs_nydus'))\n"
        "from erofs_nydus.registry.convert import extract_bootstrap\n"
        "from erofs_nydus.registry import resolve\n"
        "print(json.dumps([before, extract_bootstrap is resolve.extract_bootstrap]))\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env)
    import json

    before, same = json.loads(out.stdout)
    late = {"erofs_nydus.builder.merge", "erofs_nydus.builder.optimize",
            "erofs_nydus.rafs.check", "erofs_nydus.registry.resolve",
            "erofs_nydus.registry.backend", "erofs_nydus.registry.mirrors",
            "erofs_nydus.builder", "erofs_nydus.builder.create", "erofs_nydus.rafs.reader",
            "erofs_nydus.layout"}
    assert late.isdisjoint(before), late & set(before)
    assert "erofs_nydus.registry.store" in before and same


@pytest.mark.registry
def test_layers_start_largest_first(source_layout: Path, tmp_path: Path) -> None:
    """Layers are started largest first (jobs end together rather than one big layer
    converting alone at the end); the image is the same as in manifest order."""
    from layers_support import layer_paths

    sizes = [p.stat().st_size for p in layer_paths(source_layout)]
    assert len(set(sizes)) == len(sizes) and sizes != sorted(sizes, reverse=True)
    started: list[int] = []

    def progress(label: str, done: int, total: int) -> None:
        if label.startswith("layer "):
            n = int(label.split()[1].split("/")[0])
            if n not in started:
                started.append(n)

    src = f"oci:{source_layout}:latest"
    got = convert_image(src, f"oci:{tmp_path / 'o'}:n", _opts(tmp_path, "c", jobs=1),
                        progress=progress)
    assert started == sorted(range(1, len(sizes) + 1), key=lambda n: -sizes[n - 1])
    ref = convert_image(src, f"oci:{tmp_path / 'r'}:n", _opts(tmp_path, "d", jobs=3))
    assert got.manifest_digest == ref.manifest_digest


def test_preloaded_layers_merge_to_the_same_bytes(source_layout: Path, tmp_path: Path) -> None:
    """merge_bootstraps(loaded=...) with layers read ahead (`preload`) writes the bytes
    of a merge that reads them itself, also with a layer listed twice (read again: the
    merge changes the trees) and a damaged layer (not preloaded: the merge reports it
    as before)."""
    from layers_support import layer_paths

    from erofs_nydus.builder.merge import merge_bootstraps, preload

    boots = []
    for i, src in enumerate(layer_paths(source_layout)):
        boot = tmp_path / f"l{i}.boot"
        create_image(str(src), str(boot), str(tmp_path / "blobs"), BuildOptions())
        boots.append(str(boot))
    for order in (boots, [boots[0], boots[1], boots[0], boots[2]]):
        merge_bootstraps(order, str(tmp_path / "plain.boot"))
        loaded = {}
        for b in order:
            got = preload(b)
            assert got is not None
            loaded[b] = got
        merge_bootstraps(order, str(tmp_path / "ahead.boot"), loaded=loaded)
        assert (tmp_path / "ahead.boot").read_bytes() == (tmp_path / "plain.boot").read_bytes()
        assert loaded == {}  # each used once
    bad = tmp_path / "bad.boot"
    bad.write_bytes(Path(boots[1]).read_bytes()[:5000])
    assert preload(str(bad)) is None
    errors = []
    for loaded in (None, {b: preload(b) for b in boots if b != str(bad)}):
        with pytest.raises(ErofsNydusError) as err:
            merge_bootstraps([boots[0], str(bad), boots[2]], str(tmp_path / "x.boot"),
                             loaded=loaded)  # type: ignore[arg-type]
        errors.append(str(err.value))
    assert errors[0] == errors[1]


@pytest.mark.registry
def test_convert_reads_each_layer_for_the_merge_as_it_is_built(
        source_layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge's reading of the layer bootstraps (their trees) happens while the
    layers convert: by the time the merge starts, every layer's tree is built, and the
    merge builds none itself."""
    import erofs_nydus.builder.merge as merge_mod
    from erofs_nydus.rafs.reader import BootstrapReader

    trees: list[str] = []
    real_tree, real_merge = BootstrapReader.tree, merge_mod.merge_bootstraps

    def tree(self: BootstrapReader, *a: object, **kw: object) -> Node:
        trees.append("merge" if in_merge else "ahead")
        return real_tree(self, *a, **kw)  # type: ignore[arg-type]

    in_merge = False

    def merge(*a: object, **kw: object) -> object:
        nonlocal in_merge
        in_merge = True
        return real_merge(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(BootstrapReader, "tree", tree)
    monkeypatch.setattr(merge_mod, "merge_bootstraps", merge)
    src = f"oci:{source_layout}:latest"
    got = convert_image(src, f"oci:{tmp_path / 'o'}:n", _opts(tmp_path, "c", jobs=2))
    assert in_merge and trees == ["ahead"] * 3
    monkeypatch.undo()
    ref = convert_image(src, f"oci:{tmp_path / 'r'}:n", _opts(tmp_path, "d", jobs=1))
    assert got.manifest_digest == ref.manifest_digest


@pytest.mark.registry
@pytest.mark.parametrize("n_layers", [1, 3])
def test_push_does_not_parse_the_bootstrap_again(tmp_path: Path, n_layers: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The push takes the image's blob table from the layer build (one layer) or the
    merge (several) instead of parsing the bootstrap it just wrote; the pushed image
    lists the same blobs as when it parsed it."""
    import erofs_nydus.registry.convert as convert_mod
    from erofs_nydus.rafs.reader import read_bootstrap_file

    layout = umoci_image(tmp_path / "src", [base_step, upper_step, top_step][:n_layers])
    parsed: list[str] = []

    def spy(path: str) -> object:
        parsed.append(path)
        return read_bootstrap_file(path)

    monkeypatch.setattr(convert_mod, "read_bootstrap_file", spy)
    got = convert_image(f"oci:{layout}:latest", f"oci:{tmp_path / 'o'}:n",
                        _opts(tmp_path, "c"))
    assert parsed == []
    want = [b.blob_id for b in read_bootstrap_file(got.bootstrap).blobs]
    assert [b for b, _ in got.blobs] == want and len(want) >= 1
