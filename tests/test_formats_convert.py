"""`convert --compressor zstd --digester blake3` of a real OCI image (umoci, pushed with
skopeo to a real docker-registry), `check REF --source`, and a lazy `mount REF`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import treeutil
from daemon_support import fanotify_usable, run_cli
from layers_support import base_step, top_step, umoci_image, umoci_unpack, upper_step
from registry_fixture import RegistryServer, skopeo_copy

from erofs_nydus.mount import is_mountpoint
from erofs_nydus.rafs.reader import read_bootstrap_file

pytestmark = [pytest.mark.registry, pytest.mark.kernel]


@pytest.mark.skipif(not fanotify_usable(), reason="needs root and pre-content fanotify")
def test_convert_zstd_blake3_check_and_mount_ref(registry: RegistryServer,
                                                 tmp_path: Path) -> None:
    layout = umoci_image(tmp_path / "src", [base_step, upper_step, top_step])
    expected = umoci_unpack(layout, tmp_path / "unpacked" / "bundle")
    src = registry.ref("fmt/src:v1")
    skopeo_copy(f"oci:{layout}:latest", f"docker://{src}", fmt="v2s2")
    target = registry.ref("fmt/nydus:zstd")
    out = run_cli("convert", "--source", src, "--target", target, "--plain-http",
                  "--compressor", "zstd", "--digester", "blake3", "--cache-dir",
                  str(tmp_path / "conv"), "-J", "-").stdout
    assert json.loads(out)["layers_converted"] == 3
    boots = sorted((tmp_path / "conv" / "layers").glob("*.boot"))
    assert len(boots) == 3
    for boot in boots:
        for b in read_bootstrap_file(str(boot)).blobs:
            assert (b.compressor, b.digester) == ("zstd", "blake3")
    assert "OK" in run_cli("check", target, "--source", src, "--plain-http").stdout
    mp = tmp_path / "mnt"
    mp.mkdir()
    cache = tmp_path / "cache"
    run_cli("mount", target, str(mp), "--cache-dir", str(cache), "--plain-http")
    try:
        assert is_mountpoint(mp)
        diffs = treeutil.compare_trees(expected, mp, ignore={"root"}, limit=30)
        assert diffs == [], "\n".join(diffs)
    finally:
        run_cli("umount", str(mp), "--cache-dir", str(cache), check=False)
    assert not is_mountpoint(mp)
