"""Real OCI images made with umoci, layer by layer, for merge tests and benchmarks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from erofs_nydus.builder import BuildOptions, create_image
from erofs_nydus.builder.merge import merge_bootstraps
from erofs_nydus.rafs.reader import read_bootstrap_file


def run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {' '.join(argv)}\n"
                           f"{proc.stderr[-3000:]}")
    return proc.stdout


def umoci_image(workdir: Path, steps: list[Callable[[Path], None]], tag: str = "latest") -> Path:
    """One layer per step: unpack, let the step change the rootfs, repack (umoci computes
    the diff and writes OCI whiteouts).  Each state is also tagged `step<i>`.
    Returns the OCI layout directory."""
    layout = workdir / "layout"
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", f"{layout}:{tag}"])
    for i, step in enumerate(steps):
        bundle = workdir / f"bundle-{i}"
        run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)])
        step(bundle / "rootfs")
        run(["umoci", "repack", "--image", f"{layout}:{tag}", str(bundle)])
        run(["umoci", "tag", "--image", f"{layout}:{tag}", f"step{i}"])
        shutil.rmtree(bundle)
    return layout


def manifest(layout: Path, tag: str = "latest") -> dict[str, object]:
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return dict(json.loads(_blob(layout, m["digest"]).read_text()))
    raise KeyError(tag)


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def layer_paths(layout: Path, tag: str = "latest") -> list[Path]:
    layers = manifest(layout, tag)["layers"]
    assert isinstance(layers, list)
    return [_blob(layout, layer["digest"]) for layer in layers]


def umoci_unpack(layout: Path, dest: Path, tag: str = "latest") -> Path:
    run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(dest)])
    return dest / "rootfs"


def build_layers(layers: list[Path], out: Path, **opts: object) -> tuple[Path, list[Path]]:
    """create each layer (tar.gz streamed), merge them; returns (merged bootstrap, devices)."""
    boots = []
    for i, layer in enumerate(layers):
        boot = out / f"layer{i}.boot"
        create_image(str(layer), str(boot), str(out / "blobs"),
                     BuildOptions(blob_cache_dir=str(out / "cache"), **opts))  # type: ignore[arg-type]
        boots.append(str(boot))
    merged = out / "merged.boot"
    merge_bootstraps(boots, str(merged))
    img = read_bootstrap_file(str(merged))
    return merged, [out / "cache" / f"{b.blob_id}.blob.data" for b in img.blobs]


# A three-layer image exercising every OCI rule: deletes, opaque dirs, type changes,
# hard links across layers, xattr and mode changes, deep replacements.
def write_file(p: Path, data: bytes, mode: int = 0o644) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.chmod(p, mode)


def base_step(r: Path) -> None:
    write_file(r / "etc/keep", b"keep\n")
    write_file(r / "etc/gone", b"deleted later\n")
    write_file(r / "opaque/old1", b"o1")
    write_file(r / "opaque/sub/old2", b"o2")
    write_file(r / "file2dir", b"becomes a directory")
    write_file(r / "dir2file/child", b"directory becomes a file")
    write_file(r / "deep/a/b/c/d/e/leaf", os.urandom(300000))
    write_file(r / "hl/one", b"hard linked" * 1000)
    os.link(r / "hl/one", r / "hl/two")
    os.link(r / "hl/one", r / "hl/three")
    os.symlink("keep", r / "etc/link")
    write_file(r / "x/attrs", b"xattrs change")
    os.setxattr(r / "x/attrs", "user.v", b"1")
    os.setxattr(r / "x", "user.dir", b"old")
    write_file(r / "big", os.urandom(3 << 20))
    os.mkfifo(r / "fifo")
    os.chown(r / "etc/keep", 1000, 70000)


def upper_step(r: Path) -> None:
    os.unlink(r / "etc/gone")
    shutil.rmtree(r / "opaque")
    write_file(r / "opaque/new", b"only this survives")
    os.unlink(r / "file2dir")
    write_file(r / "file2dir/inside", b"now a dir")
    shutil.rmtree(r / "dir2file")
    write_file(r / "dir2file", b"now a file")
    shutil.rmtree(r / "deep/a/b")
    write_file(r / "deep/a/b/c/other", b"replaced deep tree")
    write_file(r / "hl/two.new", b"x")
    os.unlink(r / "hl/two")  # hard link group shrinks across layers
    os.setxattr(r / "x/attrs", "user.v", b"2")
    os.setxattr(r / "x/attrs", "trusted.t", b"added")
    os.removexattr(r / "x", "user.dir")
    os.chmod(r / "etc/keep", 0o4750)
    os.unlink(r / "etc/link")
    os.symlink("/elsewhere", r / "etc/link")


def top_step(r: Path) -> None:
    write_file(r / "etc/gone", b"resurrected\n")
    os.unlink(r / "fifo")
    os.mkdir(r / "fifo")
    write_file(r / "big", os.urandom(1 << 20) + (r / "big").read_bytes()[1 << 20:])
