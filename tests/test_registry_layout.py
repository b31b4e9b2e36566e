"""OCI image layouts (oci:DIR:tag) through the ImageStore API, checked with umoci and skopeo."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from registry_fixture import (
    OciImage,
    RegistryServer,
    SampleImage,
    run,
    skopeo_copy,
    skopeo_inspect,
)

from erofs_nydus.errors import BackendError, DigestMismatchError, NotFoundError, UsageError
from erofs_nydus.registry import (
    ImageStore,
    LayoutReference,
    OCILayout,
    Platform,
    Reference,
    RegistryBackend,
    RegistryClient,
    open_image_store,
    parse_image_reference,
)
from erofs_nydus.registry.manifest import (
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    build_index,
    manifest_blobs,
    sha256_digest,
)


@pytest.fixture
def client() -> Iterator[RegistryClient]:
    with RegistryClient(plain_http=True, use_docker_config=False, backoff=0.01) as c:
        yield c


def copy_image(src: ImageStore, src_ref: Reference, dst: ImageStore, dst_ref: Reference) -> str:
    """What the converter will do, minus the conversion: the same code for both kinds."""
    manifest = src.get_manifest(src_ref, "linux/amd64")
    for desc in manifest_blobs(manifest.data):
        if not dst.blob_exists(dst_ref, desc.digest):
            dst.push_blob(dst_ref, src.get_blob(src_ref, desc.digest), desc.digest)
    return dst.put_manifest(dst_ref, manifest.media_type, manifest.data)


def test_read_umoci_layout(oci_image_factory: Callable[..., OciImage]) -> None:
    image = oci_image_factory([{"etc/a": b"A"}, {"etc/b": b"B"}], tag="v1")
    layout = OCILayout(image.layout)
    result = layout.get_manifest(LayoutReference(str(image.layout), "v1"))
    assert result.media_type == OCI_MANIFEST
    assert json.loads(result.data) == image.manifest()
    assert layout.get_manifest("v1") == result
    assert layout.get_manifest(None) == result  # the only image
    assert layout.get_manifest(f"oci:{image.layout}@{result.digest}").data == result.data
    assert list(layout.list_refs()) == ["v1"]
    for desc in manifest_blobs(result.data):
        data = layout.get_blob(None, desc.digest)
        assert len(data) == desc.size and sha256_digest(data) == desc.digest
        assert layout.blob_exists(None, desc.digest)
        assert layout.read_blob_range(None, desc.digest, 1, 3) == data[1:4]
    with pytest.raises(NotFoundError, match=r"no such tag \(available: v1\)"):
        layout.get_manifest("v2")
    oci_image_factory([{"x": b"x"}], tag="v2", layout=image.layout)
    with pytest.raises(NotFoundError, match="holds 2 images"):
        OCILayout(image.layout).get_manifest(None)
    with pytest.raises(UsageError):
        layout.get_manifest(parse_image_reference("registry.test/app:v1"))
    with pytest.raises(NotFoundError, match="not an OCI image layout"):
        OCILayout(image.layout / "blobs")


@pytest.mark.registry
def test_registry_to_layout_to_registry(
    sample_image: SampleImage, client: RegistryClient, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    dst_store, dst_ref = open_image_store(f"oci:{out}:copied", create=True)
    assert isinstance(dst_store, OCILayout)
    src_ref = open_image_store(sample_image.oci_ref, plain_http=True)[1]
    digest = copy_image(client, src_ref, dst_store, dst_ref)
    # skopeo and umoci accept the layout we wrote
    assert skopeo_inspect(f"oci:{out}:copied", raw=True) == json.loads(
        client.get_manifest(sample_image.oci_ref).data
    )
    bundle = tmp_path / "bundle"
    run(["umoci", "unpack", "--image", f"{out}:copied", str(bundle)])
    assert (bundle / "rootfs/etc/hello.txt").read_bytes() == b"hello again from layer 1\n"
    # and back to the registry through the same generic code
    back = sample_image.registry.ref("roundtrip/img:v1")
    back_store, back_ref = open_image_store(back, plain_http=True, use_docker_config=False)
    assert copy_image(dst_store, dst_ref, back_store, back_ref) == digest
    assert skopeo_inspect(f"docker://{back}")["Digest"] == digest
    back_store.close()
    # skopeo can push our layout too
    skopeo_copy(f"oci:{out}:copied", f"docker://{sample_image.registry.ref('roundtrip/skopeo:v1')}")
    assert client.get_manifest(sample_image.registry.ref("roundtrip/skopeo:v1")).digest == digest


@pytest.mark.registry
def test_layout_index_with_platforms(
    oci_image_factory: Callable[..., OciImage],
    registry: RegistryServer,
    client: RegistryClient,
    tmp_path: Path,
) -> None:
    amd = oci_image_factory([{"etc/arch": b"amd64"}], tag="amd64", architecture="amd64")
    arm = oci_image_factory([{"etc/arch": b"arm64"}], tag="arm64", architecture="arm64")
    layout = OCILayout(tmp_path / "multi", create=True)
    entries = []
    for image, arch in ((amd, "amd64"), (arm, "arm64")):
        copy_image(
            OCILayout(image.layout),
            LayoutReference("", image.tag),
            layout,
            LayoutReference("", None),
        )
        m = OCILayout(image.layout).get_manifest(image.tag)
        entries.append(
            Descriptor(m.media_type, m.digest, len(m.data), platform=Platform("linux", arch))
        )
    index = build_index(entries)
    layout.put_manifest("multi", OCI_INDEX, index)
    assert layout.get_manifest("multi").digest == entries[0].digest
    assert layout.get_manifest("multi", "linux/arm64").digest == entries[1].digest
    assert layout.get_manifest("multi", resolve=False).data == index
    with pytest.raises(NotFoundError, match="linux/riscv64"):
        layout.get_manifest("multi", "linux/riscv64")
    # skopeo copies the whole index to the registry
    dest = registry.ref("layout/multi:v1")
    skopeo_copy(f"oci:{tmp_path / 'multi'}:multi", f"docker://{dest}", all_images=True)
    assert client.get_manifest(dest, resolve=False).data == index
    assert client.get_manifest(dest, "linux/arm64").digest == entries[1].digest


def test_put_manifest_moves_tags_and_checks_digests(tmp_path: Path) -> None:
    layout = OCILayout(tmp_path / "l", create=True)
    assert json.loads((tmp_path / "l/oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    m1, m2 = b'{"schemaVersion":2,"n":1}', b'{"schemaVersion":2,"n":2}'
    d1 = layout.put_manifest("t", OCI_MANIFEST, m1)
    d2 = layout.put_manifest("t", OCI_MANIFEST, m2)
    assert layout.list_refs()["t"].digest == d2 != d1
    assert len(json.loads((tmp_path / "l/index.json").read_text())["manifests"]) == 1
    with pytest.raises(DigestMismatchError):
        layout.put_manifest(LayoutReference("", None, d1), OCI_MANIFEST, m2)
    with pytest.raises(DigestMismatchError):
        layout.push_blob(None, b"data", "sha256:" + "7" * 64)
    leftovers = [p for p in (tmp_path / "l/blobs/sha256").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    # a corrupted blob is caught on read
    path = layout.blob_path(d2)
    os.chmod(path, 0o644)
    path.write_bytes(m2.replace(b"2", b"3"))
    with pytest.raises(DigestMismatchError):
        layout.get_manifest("t")


def test_concurrent_tagging(tmp_path: Path) -> None:
    layout = OCILayout(tmp_path / "c", create=True)

    def tag(i: int) -> None:
        OCILayout(tmp_path / "c").put_manifest(f"t{i}", OCI_MANIFEST, f'{{"n":{i}}}'.encode())

    threads = [threading.Thread(target=tag, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(layout.list_refs()) == sorted(f"t{i}" for i in range(16))


@pytest.mark.registry
def test_registry_backend_reads_real_blob(registry: RegistryServer, client: RegistryClient) -> None:
    data = os.urandom(2 * 1024 * 1024)
    digest = client.push_blob(registry.ref("backend/blobs"), data)
    backend = RegistryBackend(client, registry.ref("backend/blobs"), deadline=10.0)
    blob_id = digest.removeprefix("sha256:")
    ranges = [(i * 65536 + i, 65536 - i) for i in range(32)]
    results: dict[int, bytes] = {}

    def read(i: int) -> None:
        off, n = ranges[i]
        results[i] = backend.read_range(blob_id, off, n)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(len(ranges))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (off, n) in enumerate(ranges):
        assert results[i] == data[off : off + n]
    with pytest.raises(BackendError):
        backend.read_range("0" * 64, 0, 10)
    with pytest.raises(BackendError):
        backend.read_range(blob_id, len(data) - 5, 10)
    backend.close()
