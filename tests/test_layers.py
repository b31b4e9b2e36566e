"""Merging layer bootstraps, checked against `umoci unpack` of the same OCI image."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import treeutil
from layers_support import (
    base_step,
    build_layers,
    layer_paths,
    top_step,
    umoci_image,
    umoci_unpack,
    upper_step,
    write_file,
)

from erofs_nydus.builder import BuildOptions, create_image
from erofs_nydus.builder.merge import merge_bootstraps
from erofs_nydus.errors import FormatError, UsageError
from erofs_nydus.mount import mounted
from erofs_nydus.rafs.reader import open_bootstrap
from erofs_nydus.rafs.stats import image_stats
from erofs_nydus.rafs.tree import lookup

# umoci sets the rootfs directory's own metadata from the image config, not from a layer
IGNORE = frozenset({"root"})


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return umoci_image(tmp_path_factory.mktemp("img"), [base_step, upper_step, top_step])


@pytest.mark.kernel
def test_merge_matches_umoci(three_layers: Path, tmp_path: Path) -> None:
    expected = umoci_unpack(three_layers, tmp_path / "bundle")
    merged, devices = build_layers(layer_paths(three_layers), tmp_path / "out")
    assert open_bootstrap(str(merged)).problems() == []
    (tmp_path / "mnt").mkdir()
    with mounted(merged, tmp_path / "mnt", devices) as root:
        diffs = treeutil.compare_trees(expected, root, ignore=IGNORE, limit=40)
        assert diffs == [], "\n".join(diffs)
        assert (root / "opaque" / "new").read_bytes() == b"only this survives"
        assert not (root / "opaque" / "old1").exists()
        assert os.stat(root / "hl/one").st_nlink == 2


def test_merge_blob_table_keeps_referenced_blobs(three_layers: Path, tmp_path: Path) -> None:
    merged, _ = build_layers(layer_paths(three_layers), tmp_path / "out")
    reader = open_bootstrap(str(merged))
    order = [b.blob_id for i in range(3)
             for b in open_bootstrap(str(tmp_path / "out" / f"layer{i}.boot")).image.blobs]
    kept = [b.blob_id for b in reader.image.blobs]
    # a subsequence of the layers' blobs, bottom to top ...
    assert kept == [bid for bid in order if bid in kept]
    # ... holding exactly the blobs some surviving file still reads
    used = {c.blob_index for _, n in reader.tree().walk() for c in n.inode.chunks}
    assert used == set(range(len(kept)))
    # layer 0's data was all replaced or deleted by the upper layers
    assert order[0] not in kept
    big = lookup(reader.tree(), b"/big")
    assert big is not None and {c.blob_index for c in big.inode.chunks} == {len(kept) - 1}


def test_merge_drops_unreferenced_blob(tmp_path: Path) -> None:
    low, up = tmp_path / "low", tmp_path / "up"
    write_file(low / "data", os.urandom(10000))
    write_file(up / ".wh.data", b"")
    write_file(up / "other", b"")  # empty file: the upper layer has no blob at all
    boots = []
    for name, src in (("l", low), ("u", up)):
        create_image(str(src), str(tmp_path / f"{name}.boot"), str(tmp_path / "blobs"))
        boots.append(str(tmp_path / f"{name}.boot"))
    merge_bootstraps(boots, str(tmp_path / "m.boot"))
    r = open_bootstrap(str(tmp_path / "m.boot"))
    assert r.image.blobs == []
    assert sorted(r.tree().children or {}) == [b"other"]


@pytest.mark.parametrize(("upper", "message"), [
    ({".wh.nothing": b""}, "nothing below"),
    ({".wh..wh..opq": b""}, "opaque marker in the root"),
])
def test_merge_bad_whiteouts(tmp_path: Path, upper: dict[str, bytes], message: str) -> None:
    low, up = tmp_path / "low", tmp_path / "up"
    write_file(low / "a", b"a")
    for name, data in upper.items():
        write_file(up / name, data)
    boots = []
    for name, src in (("l", low), ("u", up)):
        create_image(str(src), str(tmp_path / f"{name}.boot"), str(tmp_path / "blobs"))
        boots.append(str(tmp_path / f"{name}.boot"))
    with pytest.raises(FormatError, match=message):
        merge_bootstraps(boots, str(tmp_path / "m.boot"))
    assert not (tmp_path / "m.boot").exists()


def test_merge_rejects_mismatched_chunk_size(tmp_path: Path) -> None:
    write_file(tmp_path / "a/f", b"x" * 10000)
    create_image(str(tmp_path / "a"), str(tmp_path / "1.boot"), str(tmp_path / "blobs"))
    create_image(str(tmp_path / "a"), str(tmp_path / "2.boot"), str(tmp_path / "blobs"),
                 BuildOptions(chunk_size=0x10000))
    with pytest.raises(UsageError, match="chunk size"):
        merge_bootstraps([str(tmp_path / "1.boot"), str(tmp_path / "2.boot")],
                         str(tmp_path / "m.boot"))
    assert not (tmp_path / "m.boot").exists()


@pytest.mark.parametrize("validate", [True, False])
def test_merge_rejects_corrupt_layer(tmp_path: Path, validate: bool) -> None:
    write_file(tmp_path / "a/f", b"x" * 10000)
    create_image(str(tmp_path / "a"), str(tmp_path / "1.boot"), str(tmp_path / "blobs"))
    data = bytearray((tmp_path / "1.boot").read_bytes())
    data[1024 + 88] = 3  # devt_slotoff
    (tmp_path / "1.boot").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="fails check: superblock: devt_slotoff"):
        merge_bootstraps([str(tmp_path / "1.boot")], str(tmp_path / "m.boot"), validate=validate)


def test_overlayfs_whiteouts_become_oci(tmp_path: Path) -> None:
    low, up = tmp_path / "low", tmp_path / "up"
    write_file(low / "gone", b"g")
    write_file(low / "op/hidden", b"h")
    write_file(up / "op/visible", b"v")
    os.mknod(up / "gone", 0o600 | 0o020000, os.makedev(0, 0))
    os.setxattr(up / "op", "trusted.overlay.opaque", b"y")
    create_image(str(low), str(tmp_path / "l.boot"), str(tmp_path / "blobs"))
    create_image(str(up), str(tmp_path / "u.boot"), str(tmp_path / "blobs"),
                 BuildOptions(whiteout_spec="overlayfs"))
    merge_bootstraps([str(tmp_path / "l.boot"), str(tmp_path / "u.boot")],
                     str(tmp_path / "m.boot"))
    root = open_bootstrap(str(tmp_path / "m.boot")).tree()
    assert lookup(root, b"/gone") is None
    assert lookup(root, b"/op/hidden") is None
    op = lookup(root, b"/op")
    assert op is not None and b"trusted.overlay.opaque" not in op.inode.xattrs
    assert lookup(root, b"/op/visible") is not None


def test_chunk_dict_dedup_across_images(tmp_path: Path) -> None:
    shared = os.urandom(4 << 20)
    write_file(tmp_path / "v1/lib.so", shared)
    write_file(tmp_path / "v2/lib.so", shared)
    write_file(tmp_path / "v2/new", os.urandom(1 << 20))
    r1 = create_image(str(tmp_path / "v1"), str(tmp_path / "v1.boot"), str(tmp_path / "blobs"))
    r2 = create_image(str(tmp_path / "v2"), str(tmp_path / "v2.boot"), str(tmp_path / "blobs"),
                      BuildOptions(chunk_dicts=[str(tmp_path / "v1.boot")]))
    assert r2.stats.chunks_from_dict == 4
    assert r2.stats.chunks_stored == 1
    assert r2.new_blob is not None and r1.new_blob is not None
    assert [b.blob_id for b in r2.blobs] == [r1.new_blob.blob_id, r2.new_blob.blob_id]
    info = image_stats([str(tmp_path / "v1.boot"), str(tmp_path / "v2.boot")])
    assert info["total"]["unique_blobs"] == 2
    assert info["total"]["bytes_stored"] < info["total"]["bytes_referenced"] * 0.6


@pytest.mark.kernel
def test_chunk_dict_image_mounts(tmp_path: Path) -> None:
    shared = os.urandom(3 << 20)
    write_file(tmp_path / "v1/a", shared)
    write_file(tmp_path / "v2/a", shared)
    write_file(tmp_path / "v2/b", b"new" * 5000)
    create_image(str(tmp_path / "v1"), str(tmp_path / "v1.boot"), str(tmp_path / "blobs"),
                 BuildOptions(blob_cache_dir=str(tmp_path / "cache")))
    r2 = create_image(str(tmp_path / "v2"), str(tmp_path / "v2.boot"), str(tmp_path / "blobs"),
                      BuildOptions(chunk_dicts=[str(tmp_path / "v1.boot")],
                                   blob_cache_dir=str(tmp_path / "cache")))
    devices = [tmp_path / "cache" / f"{b.blob_id}.blob.data" for b in r2.blobs]
    (tmp_path / "mnt").mkdir()
    with mounted(tmp_path / "v2.boot", tmp_path / "mnt", devices) as root:
        assert treeutil.compare_trees(tmp_path / "v2", root, ignore={"root"}) == []


def test_chunk_dict_rejects_other_chunk_size(tmp_path: Path) -> None:
    write_file(tmp_path / "v1/a", b"x" * 100)
    create_image(str(tmp_path / "v1"), str(tmp_path / "v1.boot"), str(tmp_path / "blobs"))
    with pytest.raises(UsageError, match="chunk size"):
        create_image(str(tmp_path / "v1"), str(tmp_path / "v2.boot"), str(tmp_path / "blobs"),
                     BuildOptions(chunk_dicts=[str(tmp_path / "v1.boot")], chunk_size=0x10000))
    with pytest.raises(UsageError, match="compressor"):
        create_image(str(tmp_path / "v1"), str(tmp_path / "v3.boot"), str(tmp_path / "blobs"),
                     BuildOptions(chunk_dicts=[str(tmp_path / "v1.boot")], compressor="none"))


def test_too_many_blobs(tmp_path: Path) -> None:
    boots = []
    for i in range(255):
        write_file(tmp_path / f"s{i}/f{i}", f"layer {i}".encode() * 10)
        create_image(str(tmp_path / f"s{i}"), str(tmp_path / f"{i}.boot"), str(tmp_path / "b"))
        boots.append(str(tmp_path / f"{i}.boot"))
    with pytest.raises(UsageError, match="at most 254"):
        merge_bootstraps(boots, str(tmp_path / "m.boot"))
    assert not (tmp_path / "m.boot").exists()


def _sync_from(tree: Path) -> Callable[[Path], None]:
    def step(rootfs: Path) -> None:
        for child in rootfs.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        subprocess.run(["cp", "-a", f"{tree}/.", f"{rootfs}/"], check=True)
    return step


@pytest.mark.kernel
@pytest.mark.slow
def test_debootstrap_install_and_remove_layers(debootstrap_rootfs: Path,
                                               debootstrap_rootfs_extra: Path,
                                               tmp_path: Path) -> None:
    """base rootfs, + a layer installing packages, + a layer removing them again."""
    layout = umoci_image(tmp_path / "img", [_sync_from(debootstrap_rootfs),
                                            _sync_from(debootstrap_rootfs_extra),
                                            _sync_from(debootstrap_rootfs)])
    layers = layer_paths(layout)
    assert len(layers) == 3
    # the middle layer is small (only what the packages add), the top one is whiteouts
    assert os.path.getsize(layers[1]) < os.path.getsize(layers[0]) / 3
    expected = umoci_unpack(layout, tmp_path / "bundle")
    merged, devices = build_layers(layers, tmp_path / "out")
    (tmp_path / "mnt").mkdir()
    with mounted(merged, tmp_path / "mnt", devices) as root:
        diffs = treeutil.compare_trees(expected, root, ignore=IGNORE, limit=40)
        assert diffs == [], "\n".join(diffs)
        assert not (root / "usr/bin/less").exists()
    # and the two-layer state (packages installed) matches umoci's view of it
    expected2 = umoci_unpack(layout, tmp_path / "bundle2", tag="step1")
    two, devices2 = build_layers(layers[:2], tmp_path / "out2")
    (tmp_path / "mnt2").mkdir()
    with mounted(two, tmp_path / "mnt2", devices2) as root:
        diffs = treeutil.compare_trees(expected2, root, ignore=IGNORE, limit=40)
        assert diffs == [], "\n".join(diffs)
        assert (root / "usr/bin/less").exists()


def test_cli_merge_and_stat(tmp_path: Path) -> None:
    import json as _json

    from click.testing import CliRunner

    from erofs_nydus.cli import main

    low, up = tmp_path / "low", tmp_path / "up"
    write_file(low / "a", os.urandom(5000))
    write_file(low / "b", b"b")
    write_file(up / ".wh.b", b"")
    write_file(up / "c", os.urandom(5000))
    runner = CliRunner()
    for name, src in (("l", low), ("u", up)):
        res = runner.invoke(main, ["create", str(src), "-B", str(tmp_path / f"{name}.boot"),
                                   "-D", str(tmp_path / "blobs")])
        assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["merge", str(tmp_path / "l.boot"), str(tmp_path / "u.boot"),
                               "-B", str(tmp_path / "m.boot"), "-J", "-"])
    assert res.exit_code == 0, res.output
    assert len(_json.loads(res.output)["blobs"]) == 2
    res = runner.invoke(main, ["stat", str(tmp_path / "m.boot"), "--json"])
    assert res.exit_code == 0
    info = _json.loads(res.output)
    assert info["images"][0]["files"] == 2 and info["images"][0]["unique_chunks"] == 2
    res = runner.invoke(main, ["merge", str(tmp_path / "u.boot"), "-B", str(tmp_path / "x")])
    assert res.exit_code != 0 and "nothing below" in res.output
    res = runner.invoke(main, ["merge", str(tmp_path / "u.boot"), "-B", str(tmp_path / "x"),
                               "--allow-missing-whiteouts"])
    assert res.exit_code == 0 and "warning" in res.output
