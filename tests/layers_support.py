"""Real OCI images made with umoci, layer by layer, for merge tests and benchmarks."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from erofs_nydus.builder import BuildOptions, create_image
from erofs_nydus.merge import merge_bootstraps
from erofs_nydus.reader import read_bootstrap_file


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
