#!/usr/bin/env python3
"""Conversion benchmark on a loopback registry: `erofs-nydus convert` vs `skopeo copy`.

    python3 bench/convert.py [--runs N] [--layers 1,5] [--profile] [--baseline DIR]
                             [-- CONVERT-OPTIONS]

The debootstrap minbase rootfs is packed with umoci as a one-layer OCI image, and as a
five-layer one (the rootfs split by top-level directories, /usr by its subdirectories,
into five groups of similar size), and pushed to a real docker-registry on 127.0.0.1
(started here).  Side by side, median of N runs per image: (a) erofs-nydus convert
(layer cache emptied each run) pulling from and pushing to that registry, with its
peak RSS; (b) skopeo copy of the same image to an OCI layout (pull + write); wall and
CPU time (user + sys: steadier on a shared machine) of each, with the ratios.
`--baseline DIR`: the convert of another checkout (e.g. `git worktree add DIR main`),
interleaved with ours run by run, for an A/B under the same load.
`--profile`: also one in-process convert of each image under pyinstrument (installed
separately), its call tree printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import fmt_bytes, rootfs  # noqa: E402
from layers_support import layer_paths, umoci_image  # noqa: E402
from netns import convert_bench, push_rootfs  # noqa: E402
from registry_fixture import (  # noqa: E402
    RegistryServer,
    skopeo_copy,
    start_registry,
    stop_registry,
)


def _du(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def split_groups(tree: Path, n: int) -> list[list[str]]:
    """Top-level entries of `tree` (and /usr's children in place of /usr) in `n` groups
    of similar size: largest first, each into the smallest group so far."""
    entries = [e for e in sorted(os.listdir(tree)) if e != "usr"]
    if (tree / "usr").is_dir():
        entries += [f"usr/{e}" for e in sorted(os.listdir(tree / "usr"))]
    sized = sorted(((_du(tree / e), e) for e in entries), reverse=True)
    groups: list[tuple[int, list[str]]] = [(0, []) for _ in range(n)]
    for size, e in sized:
        groups.sort(key=lambda g: g[0])
        groups[0] = (groups[0][0] + size, [*groups[0][1], e])
    return [sorted(g) for _, g in groups if g]


def push_layered(server: RegistryServer, tree: Path, work: Path, n: int,
                 repo_tag: str) -> tuple[str, list[Path]]:
    """`tree` as an `n`-layer OCI image (one umoci layer per group) pushed to `server`."""

    def step(group: list[str]) -> object:
        def fill(r: Path) -> None:
            subprocess.run(["cp", "-a", "--parents", *group, str(r)], cwd=tree, check=True)
        return fill

    layout = umoci_image(work, [step(g) for g in split_groups(tree, n)])  # type: ignore[misc]
    ref = server.ref(repo_tag)
    skopeo_copy(f"oci:{layout}:latest", f"docker://{ref}")
    return ref, layer_paths(layout)


def profile(server: RegistryServer, src: str, work: Path, extra: list[str]) -> None:
    import pyinstrument  # type: ignore[import-not-found]

    from erofs_nydus.cli import main as cli_main

    prof = pyinstrument.Profiler(interval=0.002)
    argv = ["convert", "--source", src, "--target", server.ref("bench/profile-nydus:v1"),
            "--plain-http", "-q", "--cache-dir", str(work / "profile-cache"), *extra]
    prof.start()
    try:
        cli_main(argv, standalone_mode=False)
    finally:
        prof.stop()
        shutil.rmtree(work / "profile-cache", ignore_errors=True)
    print(prof.output_text(unicode=False, color=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--layers", default="1,5", help="layer counts of the source images")
    ap.add_argument("--profile", action="store_true", help="profile one convert per image")
    ap.add_argument("--baseline", type=Path, metavar="DIR",
                    help="another checkout of the project: its convert runs interleaved too")
    ap.add_argument("extra", nargs="*", help="options passed to erofs-nydus convert")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    server = start_registry(work / "registry")
    try:
        tree = rootfs()
        for n in (int(x) for x in args.layers.split(",")):
            if n == 1:
                src, layer = push_rootfs(server, tree, work / "img1", "bench/rootfs:v1")
                layers = [layer]
            else:
                src, layers = push_layered(server, tree, work / f"img{n}", n,
                                           f"bench/rootfs{n}:v1")
            total = sum(p.stat().st_size for p in layers)
            print(f"source image: {tree.name}, {len(layers)} layer(s), {fmt_bytes(total)} "
                  f"(tar.gz) in {server.host}")
            if args.profile:
                profile(server, src, work, args.extra)
            convert_bench(server, src, work, args.runs, tuple(args.extra),
                          target_repo=f"bench/rootfs{n}-nydus:v1", baseline=args.baseline)
    finally:
        stop_registry(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
