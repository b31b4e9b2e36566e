"""optimize: traced chunks first and contiguous, prefetch table, traces from other images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import treeutil

from erofs_nydus.builder import BuildOptions, create_image
from erofs_nydus.builder.optimize import optimize_image
from erofs_nydus.errors import UsageError
from erofs_nydus.mount import mounted
from erofs_nydus.rafs.reader import open_bootstrap
from erofs_nydus.rafs.tree import lookup


@pytest.fixture
def image(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for i in range(20):
        d = src / f"d{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(100_000 + i))
    (src / "zeros").write_bytes(bytes(1 << 20))
    create_image(str(src), str(tmp_path / "img.boot"), str(tmp_path / "blobs"),
                 BuildOptions(chunk_size=0x10000))
    return tmp_path


def _trace(reader_path: Path, files: list[bytes]) -> dict[str, object]:
    r = open_bootstrap(str(reader_path))
    root = r.tree()
    accesses = []
    for t, p in enumerate(files):
        node = lookup(root, p)
        assert node is not None
        for c in node.inode.chunks:
            accesses.append({"blob": r.image.blobs[c.blob_index].blob_id,
                             "offset": c.uncompressed_offset, "t": t * 0.01})
    return {"version": 1, "fsid": r.image.fsid, "blobs": [b.blob_id for b in r.image.blobs],
            "accesses": accesses}


def test_traced_chunks_first_and_prefetch_table(image: Path) -> None:
    workload = [b"/d3/f19", b"/d0/f0", b"/d2/f6"]
    (image / "trace.json").write_text(json.dumps(_trace(image / "img.boot", workload)))
    res = optimize_image(str(image / "img.boot"), str(image / "blobs"), str(image / "opt.boot"),
                         str(image / "blobs2"), trace=str(image / "trace.json"))
    r = open_bootstrap(str(image / "opt.boot"))
    assert r.problems() == []
    root = r.tree()
    # the workload's chunks are the first ones of the new blob, in access order, contiguous
    offsets = [c.uncompressed_offset for p in workload
               for c in lookup(root, p).inode.chunks]  # type: ignore[union-attr]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert offsets[-1] < res.prefetch_bytes + 0x10000
    nids = r.prefetch_nids()
    assert len(nids) == 3 == res.prefetch_files
    # each prefetch nid is one of the traced files, in order
    for nid, path in zip(nids, workload, strict=True):
        ri = r.inode(nid)
        assert ri.size == os.path.getsize(image / "src" / path.decode().lstrip("/"))


def test_trace_from_another_image_is_rejected(image: Path, tmp_path: Path) -> None:
    trace = _trace(image / "img.boot", [b"/d0/f0"])
    trace["fsid"] = "0" * 64
    (image / "trace.json").write_text(json.dumps(trace))
    with pytest.raises(UsageError, match="another image"):
        optimize_image(str(image / "img.boot"), str(image / "blobs"), str(image / "o.boot"),
                       str(image / "b2"), trace=str(image / "trace.json"))
    assert not (image / "o.boot").exists()


def test_prefetch_list(image: Path) -> None:
    (image / "list").write_text("/d1\n")
    res = optimize_image(str(image / "img.boot"), str(image / "blobs"), str(image / "o.boot"),
                         str(image / "b2"), prefetch_list=str(image / "list"))
    assert res.prefetch_files == 5


@pytest.mark.kernel
def test_optimized_image_mounts(image: Path) -> None:
    (image / "trace.json").write_text(json.dumps(_trace(image / "img.boot", [b"/d2/f10"])))
    res = optimize_image(str(image / "img.boot"), str(image / "blobs"), str(image / "o.boot"),
                         str(image / "b2"), trace=str(image / "trace.json"))
    assert res.blob is not None
    from erofs_nydus.rafs.backend import LocalDirBackend
    from erofs_nydus.rafs.check import materialize_blob

    r = open_bootstrap(str(image / "o.boot"))
    dev = image / "o.blob.data"
    materialize_blob(LocalDirBackend(str(image / "b2")), r.image.blobs[0], r.image.chunks[0],
                     str(dev))
    (image / "mnt").mkdir()
    with mounted(image / "o.boot", image / "mnt", [dev]) as root:
        assert treeutil.compare_trees(image / "src", root, ignore={"root"}) == []
