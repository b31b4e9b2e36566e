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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import fmt_bytes, median, rootfs  # noqa: E402
from layers_support import layer_paths, umoci_image  # noqa: E402
from registry_fixture import skopeo_copy, start_registry, stop_registry  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-convert-"))
    server = start_registry(work / "registry")
    try:
        tree = rootfs()

        def fill(r: Path) -> None:
            subprocess.run(["cp", "-a", f"{tree}/.", f"{r}/"], check=True)

        layout = umoci_image(work / "img", [fill])
        layer = layer_paths(layout)[0]
        src = server.ref("bench/rootfs:v1")
        skopeo_copy(f"oci:{layout}:latest", f"docker://{src}")
        print(f"source image: {tree.name}, one layer of {fmt_bytes(layer.stat().st_size)} "
              f"(tar.gz) in {server.host}")
        conv, copy = [], []
        for i in range(args.runs):
            cache = work / f"cache{i}"
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "erofs_nydus.cli", "convert", "--source", src,
                            "--target", server.ref(f"bench/rootfs-nydus:v{i}"), "--plain-http",
                            "-q", "--cache-dir", str(cache)], check=True,
                           stdout=subprocess.DEVNULL)
            conv.append(time.perf_counter() - t0)
            shutil.rmtree(cache)
            t0 = time.perf_counter()
            skopeo_copy(f"docker://{src}", f"oci:{work / f'copy{i}'}:v1")
            copy.append(time.perf_counter() - t0)
            shutil.rmtree(work / f"copy{i}")
        print(f"erofs-nydus convert : median {median(conv):.2f} s  runs "
              + " ".join(f"{t:.2f}" for t in conv))
        print(f"skopeo copy (pull)  : median {median(copy):.2f} s  runs "
              + " ".join(f"{t:.2f}" for t in copy))
        print(f"ratio convert / skopeo copy: {median(conv) / median(copy):.2f}x")
    finally:
        stop_registry(server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
