#!/usr/bin/env python3
"""Conversion benchmark on a loopback registry: `erofs-nydus convert` vs `skopeo copy`.

    python3 bench/convert.py [--runs N]

The debootstrap minbase rootfs is packed with umoci as a one-layer OCI image and pushed
to a real docker-registry on 127.0.0.1 (started here).  Side by side, median of N runs:
(a) erofs-nydus convert (layer cache emptied each run) pulling from and pushing to that
registry; (b) skopeo copy of the same image to an OCI layout (pull + write).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import fmt_bytes, rootfs  # noqa: E402
from netns import convert_bench, push_rootfs  # noqa: E402
from registry_fixture import start_registry, stop_registry  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    server = start_registry(work / "registry")
    try:
        tree = rootfs()
        src, layer = push_rootfs(server, tree, work / "img", "bench/rootfs:v1")
        print(f"source image: {tree.name}, one layer of {fmt_bytes(layer.stat().st_size)} "
              f"(tar.gz) in {server.host}")
        convert_bench(server, src, work, args.runs)
    finally:
        stop_registry(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
