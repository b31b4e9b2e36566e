"""convert: real OCI image in the real registry -> Nydus image; skopeo reads it back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import treeutil
from layers_support import base_step, top_step, umoci_image, umoci_unpack, upper_step
from registry_fixture import RegistryServer, skopeo_copy, skopeo_inspect

from erofs_nydus.errors import NotFoundError, UnsupportedError
from erofs_nydus.mount import mounted
from erofs_nydus.rafs.backend import LocalDirBackend
from erofs_nydus.rafs.check import materialize_blob
from erofs_nydus.rafs.reader import BootstrapReader
from erofs_nydus.registry import RegistryClient
from erofs_nydus.registry.convert import ConvertOptions, convert_image, extract_bootstrap
from erofs_nydus.registry.manifest import OCI_LAYER_ZSTD, manifest_blobs
from erofs_nydus.registry.remote_check import check_remote

pytestmark = pytest.mark.registry


@pytest.fixture(scope="module")
def source_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return umoci_image(tmp_path_factory.mktemp("src"), [base_step, upper_step, top_step])


@pytest.fixture(scope="module")
def pushed(source_layout: Path, registry: RegistryServer) -> str:
    ref = registry.ref("src/app:v1")
    skopeo_copy(f"oci:{source_layout}:latest", f"docker://{ref}", fmt="v2s2")
    return ref


def _opts(tmp_path: Path, **kw: object) -> ConvertOptions:
    return ConvertOptions(cache_dir=str(tmp_path / "cache"),
                          client_options={"plain_http": True}, **kw)  # type: ignore[arg-type]


def test_convert_conventions_and_skopeo(pushed: str, registry: RegistryServer,
                                        tmp_path: Path) -> None:
    target = registry.ref("nydus/app:v1")
    res = convert_image(pushed, target, _opts(tmp_path))
    assert res.layers_converted == 3 and res.layers_cached == 0
    raw = skopeo_inspect(f"docker://{target}", raw=True)
    layers = raw["layers"]
    assert layers[-1]["annotations"] == {"containerd.io/snapshot/nydus-bootstrap": "true",
                                         "containerd.io/snapshot/nydus-fs-version": "6"}
    for layer in layers[:-1]:
        assert layer["mediaType"] == "application/vnd.oci.image.layer.nydus.blob.v1"
        assert layer["annotations"] == {"containerd.io/snapshot/nydus-blob": "true"}
    # skopeo can copy the converted image
    out = tmp_path / "copy"
    skopeo_copy(f"docker://{target}", f"oci:{out}:nydus")
    index = json.loads((out / "index.json").read_text())
    assert index["manifests"][0]["digest"] == res.manifest_digest
    # our checker agrees, including a full tree comparison with the source image
    report = check_remote(target, pushed, client_options={"plain_http": True})
    assert report.ok, report.problems
    assert report.entries_compared > 20 and report.chunks_verified > 0


@pytest.mark.kernel
def test_converted_image_mounts_like_umoci(pushed: str, registry: RegistryServer,
                                           source_layout: Path, tmp_path: Path) -> None:
    target = registry.ref("nydus/app:mount")
    convert_image(pushed, target, _opts(tmp_path))
    client = RegistryClient(plain_http=True)
    man = client.get_manifest(target)
    descs = manifest_blobs(man.data)
    boot = extract_bootstrap(client.get_blob(target, descs[-1].digest))
    reader = BootstrapReader(boot)
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    for b in reader.image.blobs:
        (blob_dir / b.blob_id).write_bytes(client.get_blob(target, f"sha256:{b.blob_id}"))
    devices = []
    for b in reader.image.blobs:
        dev = tmp_path / f"{b.blob_id}.blob.data"
        materialize_blob(LocalDirBackend(blob_dir), b, reader.image.chunks[b.blob_index],
                         str(dev))
        devices.append(dev)
    (tmp_path / "image.boot").write_bytes(boot)
    expected = umoci_unpack(source_layout, tmp_path / "bundle")
    (tmp_path / "mnt").mkdir()
    with mounted(tmp_path / "image.boot", tmp_path / "mnt", devices) as root:
        diffs = treeutil.compare_trees(expected, root, ignore={"root"}, limit=30)
        assert diffs == [], "\n".join(diffs)


def test_convert_reuses_converted_layers(pushed: str, registry: RegistryServer,
                                         tmp_path: Path) -> None:
    first = convert_image(pushed, registry.ref("nydus/app:a"), _opts(tmp_path))
    second = convert_image(pushed, registry.ref("nydus/app:b"), _opts(tmp_path))
    assert second.layers_cached == 3 and second.layers_converted == 0
    assert first.manifest_digest == second.manifest_digest  # deterministic


def test_convert_oci_layout_to_oci_layout(source_layout: Path, tmp_path: Path) -> None:
    res = convert_image(f"oci:{source_layout}:latest", f"oci:{tmp_path / 'out'}:nydus",
                        _opts(tmp_path))
    assert len(res.blobs) >= 1
    report = check_remote(f"oci:{tmp_path / 'out'}:nydus", f"oci:{source_layout}:latest")
    assert report.ok, report.problems


def test_cli_convert_and_check(pushed: str, registry: RegistryServer, tmp_path: Path) -> None:
    target = registry.ref("nydus/app:cli")
    cmd = [sys.executable, "-m", "erofs_nydus.cli"]
    proc = subprocess.run([*cmd, "convert", "--source", pushed, "--target", target,
                           "--plain-http", "--cache-dir", str(tmp_path / "c"), "-J", "-"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["layers_converted"] == 3
    proc = subprocess.run([*cmd, "check", target, "--source", pushed, "--plain-http"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
    proc = subprocess.run([*cmd, "check", pushed, "--plain-http"], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 1 and "nydus-bootstrap" in proc.stderr


def test_convert_unknown_tag(registry: RegistryServer, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        convert_image(registry.ref("src/app:nope"), registry.ref("x/y:z"), _opts(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "erofs_nydus.cli", "convert", "--source",
                           registry.ref("src/app:nope"), "--target", registry.ref("x/y:z"),
                           "--cache-dir", str(tmp_path / "c")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "src/app" in proc.stderr


def test_convert_rejects_zstd_layers(source_layout: Path, tmp_path: Path) -> None:
    from erofs_nydus.registry.layout import OCILayout
    from erofs_nydus.registry.manifest import Descriptor, build_image_manifest

    lay = OCILayout(tmp_path / "z", create=True)
    blob = b"\x28\xb5\x2f\xfd" + b"\0" * 20
    cfg = b'{"rootfs":{"type":"layers","diff_ids":[]}}'
    d_blob = Descriptor(OCI_LAYER_ZSTD, lay.push_blob(None, blob), len(blob))
    d_cfg = Descriptor("application/vnd.oci.image.config.v1+json", lay.push_blob(None, cfg),
                       len(cfg))
    lay.put_manifest("zst", "application/vnd.oci.image.manifest.v1+json",
                     build_image_manifest(d_cfg, [d_blob]))
    with pytest.raises(UnsupportedError, match="zstd"):
        convert_image(f"oci:{tmp_path / 'z'}:zst", f"oci:{tmp_path / 'o'}:x", _opts(tmp_path))
