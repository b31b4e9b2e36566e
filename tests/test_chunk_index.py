"""The packed chunk index (`rafs.image.ChunkList`): what a daemon keeps per chunk.

A registered image must cost the daemon a few dozen bytes per chunk, not a ChunkInfo
object each (issue 16: 200k-file images, daemon < 100 MiB): these tests pin that no
per-chunk objects outlive a registration or a fill, and that the packed values are
exactly the bootstrap's chunk table.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from daemon_support import BuiltImage, build_image, run_cli

from erofs_nydus.daemon.images import ImageTable
from erofs_nydus.layout import rafs as R
from erofs_nydus.rafs.image import ChunkInfo, ChunkList
from erofs_nydus.rafs.reader import BootstrapReader, load_image

FILES = 300


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    base = tmp_path_factory.mktemp("img")
    src = base / "src"
    for d in range(3):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(FILES // 3):
            (src / f"d{d}" / f"f{i}").write_bytes(f"file {d}/{i}\n".encode() * (i + 1))
    return build_image(src, base / "out")


def _table_chunks(data: bytes) -> list[ChunkInfo]:
    """The chunk table decoded straight from the bytes, one ChunkInfo per entry."""
    r = BootstrapReader(data)
    off, size = r.ext.s_chunk_table_offset, r.ext.s_chunk_table_size
    blobs = r.image.blobs
    out = []
    for digest, bi, flags, csize, usize, coff, uoff, _f, index, _c in R.CHUNK_INFO_PACK.iter_unpack(
            data[off:off + size]):
        out.append(ChunkInfo(digest, bi, index, coff, csize, uoff, usize,
                             bool(flags & R.CHUNK_FLAG_COMPRESSED), blobs[bi].compressor,
                             blobs[bi].digester))
    return out


def test_chunk_list_is_the_chunk_table(image: BuiltImage) -> None:
    data = image.bootstrap.read_bytes()
    img = load_image(data)
    (lst,) = img.chunks
    assert isinstance(lst, ChunkList)
    want = sorted(_table_chunks(data), key=lambda c: c.uncompressed_offset)
    assert len(want) == FILES and len(lst) == FILES
    assert list(lst) == want
    assert lst[5:9] == want[5:9] and lst[::7] == want[::7] and lst[-1] == want[-1]
    assert list(lst.starts) == [c.uncompressed_offset for c in want]
    assert list(lst.extents()) == [(c.index, c.uncompressed_offset, c.aligned_size)
                                   for c in want]
    assert lst.find(want[42].uncompressed_offset) == want[42]
    assert lst.find(want[42].uncompressed_offset + 1) is None
    with pytest.raises(IndexError):
        lst[FILES]
    # rebuilt from values in any order: the same packed records
    again = ChunkList.build(reversed(want))
    assert again.records() == lst.records() and list(again) == want
    # tools that tell chunks apart by identity: built once, kept
    kept = lst.materialize()
    assert lst[3] is kept[3] and next(iter(lst)) is kept[0]


def _live_chunk_infos() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, ChunkInfo))


def test_registered_image_keeps_no_chunk_objects(image: BuiltImage, tmp_path: Path) -> None:
    """After register and a fill, the daemon holds the packed index only: not one
    ChunkInfo per chunk (the old table kept FILES of them, plus a dict)."""
    before = _live_chunk_infos()
    (tmp_path / "cache").mkdir()
    table = ImageTable(str(tmp_path / "cache"), durable=False)
    try:
        table.register(str(image.bootstrap), {"type": "local", "dir": str(image.blob_dir)},
                       str(tmp_path / "mnt"))
        (srv,) = table.blobs.values()
        assert isinstance(srv.cache.chunks, ChunkList) and len(srv.cache.chunks) == FILES
        assert _live_chunk_infos() - before < 10
        srv.fill(0, srv.cache.size // 2)
        assert 0 < srv.cache.present_bytes() < srv.cache.size
        assert _live_chunk_infos() - before < 10
    finally:
        table.close()


def test_blob_shared_at_another_blob_index(tmp_path: Path) -> None:
    """A merged image names a layer's blob at another position of its blob table than
    the layer's own bootstrap: both register and share one server (the chunks are the
    same; only the table position differs)."""
    layers = []
    for name in ("a", "b"):
        src = tmp_path / f"src_{name}"
        src.mkdir()
        for i in range(20):
            (src / f"{name}{i}").write_bytes(f"{name} {i}\n".encode() * 500)
        layers.append(build_image(src, tmp_path / name))
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    for lay in layers:
        for f in lay.blob_dir.iterdir():
            (blob_dir / f.name).write_bytes(f.read_bytes())
    merged = tmp_path / "merged.boot"
    run_cli("merge", str(layers[1].bootstrap), str(layers[0].bootstrap), "-B", str(merged))
    a_blob = load_image(layers[0].bootstrap.read_bytes()).blobs[0].blob_id
    assert [b.blob_id for b in load_image(merged.read_bytes()).blobs].index(a_blob) == 1
    (tmp_path / "cache").mkdir()
    table = ImageTable(str(tmp_path / "cache"), durable=False)
    try:
        backend = {"type": "local", "dir": str(blob_dir)}
        table.register(str(layers[0].bootstrap), backend, str(tmp_path / "m1"))
        table.register(str(merged), backend, str(tmp_path / "m2"))
        assert len(table.blobs) == 2
        srv = table.blobs[a_blob]
        srv.fill_all()
        assert srv.cache.complete()
    finally:
        table.close()


_RSS_PROBE = """
import sys, threading
import httpcore, erofs_nydus.registry.backend, erofs_nydus.registry.resolve  # the preload's
from erofs_nydus.daemon.images import ImageTable
from erofs_nydus.daemon.prefetch import PrefetchManager

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))

boot, blobs, cache = sys.argv[1:4]
table = ImageTable(cache, durable=False)
for t in threading.enumerate():  # let the (delayed) preload finish: its modules are loaded
    if t.name == "registry-preload":
        t.join()
before = rss()
info = table.register(boot, {"type": "local", "dir": blobs}, cache + "/mnt")
with open(boot, "rb") as f:
    PrefetchManager().start(info["fsid"], f.read(), {})
print(rss() - before)
"""


def test_register_returns_the_parse_memory(tmp_path: Path) -> None:
    """What a daemon keeps of a 40k-chunk image is the packed index (~70 B a chunk), not
    the memory its parses used: the bootstrap (3.6 MB) is read and parsed twice (register
    and the prefetch table); before heap.py the worker kept ~6 times the index."""
    import subprocess
    import sys

    chunks = 40_000
    src = tmp_path / "src"
    src.mkdir()
    block = bytes(range(256)) * 16
    with open(src / "big", "wb") as f:
        for i in range(chunks):  # unique 4 KiB chunks: no dedup
            f.write(i.to_bytes(8, "little") + block[8:])
    img = build_image(src, tmp_path / "out", "--chunk-size", "0x1000")
    (src / "big").unlink()
    (tmp_path / "cache").mkdir()
    proc = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(img.bootstrap),
                           str(img.blob_dir), str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=300, check=True)
    kept = int(proc.stdout.strip().splitlines()[-1])
    assert kept < 120 * chunks, f"{kept} bytes kept for {chunks} chunks"


def test_trace_entries_are_packed() -> None:
    """The access trace (on for every registered image) costs ~20 bytes per recorded chunk
    (was ~220: a tuple and a set key each): a workload reading all of a 200k-file image
    would otherwise add ~45 MB to the daemon."""
    import tracemalloc

    from erofs_nydus.daemon.trace import TraceBook

    n = 20_000
    chunks = [ChunkInfo(b"\0" * 32, 0, i, i * 4096, 10, i * 4096, 4096, False)
              for i in range(n)]
    book = TraceBook()
    book.add_image("f" * 64, ["b1"])
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(0, n, 4):
            book.on_access("b1", chunks[i:i + 4])
            book.on_access("b1", chunks[i:i + 2])  # seen already: nothing recorded
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert book.summary("f" * 64) == {"chunks": n, "dropped": 0}
    assert grown < 40 * n, f"{grown} bytes for {n} entries"
    doc = book.document("f" * 64)
    assert doc is not None and [a["offset"] for a in doc["accesses"]] == [
        c.uncompressed_offset for c in chunks]


def test_repeated_offset_keeps_the_first_record_only(image: BuiltImage) -> None:
    """Two chunk-table records at one offset (a bad table): reported, and the packed list
    keeps the first in table order, as the by-address table did, so nothing downstream
    sees two chunks in one place."""
    data = bytearray(image.bootstrap.read_bytes())
    r = BootstrapReader(bytes(data))
    off = r.ext.s_chunk_table_offset
    first = R.CHUNK_INFO_PACK.unpack_from(data, off)
    second = list(R.CHUNK_INFO_PACK.unpack_from(data, off + R.CHUNK_INFO_SIZE))
    second[6] = first[6]  # its uncompressed offset: the first record's
    R.CHUNK_INFO_PACK.pack_into(data, off + R.CHUNK_INFO_SIZE, *second)
    bad = BootstrapReader(bytes(data))
    assert any("two chunks at offset" in p for p in bad.problems(walk=False))
    (lst,) = bad.image.chunks
    assert len(lst) == FILES - 1 and len(set(lst.starts)) == FILES - 1
    at = lst.find(first[6])
    assert at is not None and at.digest == first[0] and at.index == first[8]
