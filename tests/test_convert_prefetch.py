"""`convert --prefetch-trace`: publish an image optimized for a traced workload.

A real two-layer OCI image (umoci) in the real docker-registry is converted, a
workload's access trace on that image is fed back to `convert`, and the pushed image
must follow the Nydus conventions, carry the prefetch table, pass `check REF`, and (on
the host kernel) serve the traced workload after a cold mount without foreground
backend reads, counted by the daemon's own metrics.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from pathlib import Path

import pytest
from daemon_support import daemon_metrics, fanotify_usable, metrics_after_prefetch, run_cli
from layers_support import umoci_image, umoci_unpack, write_file
from registry_fixture import RegistryServer, skopeo_copy, skopeo_inspect

from erofs_nydus.daemon.prefetch import prefetch_chunks
from erofs_nydus.errors import NotFoundError
from erofs_nydus.rafs.reader import BootstrapReader
from erofs_nydus.rafs.tree import lookup
from erofs_nydus.registry import RegistryClient
from erofs_nydus.registry.convert import ConvertOptions, convert_image, extract_bootstrap
from erofs_nydus.registry.manifest import manifest_blobs

pytestmark = pytest.mark.registry

CHUNK = "0x10000"
WORKLOAD = ["d2/f29", "d0/f3", "d1/f16", "d2/f8", "d0/f0"]


def _files(r: Path) -> None:
    for i in range(30):
        write_file(r / f"d{i % 3}" / f"f{i}", os.urandom(90_000 + 4_001 * i))


def _update(r: Path) -> None:
    write_file(r / "d0/f3", os.urandom(200_000))
    (r / "d1/f4").unlink()


@pytest.fixture(scope="module")
def source(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    layout = umoci_image(tmp_path_factory.mktemp("src"), [_files, _update])
    ref = registry.ref("pf/src:v1")
    skopeo_copy(f"oci:{layout}:latest", f"docker://{ref}")
    return ref


@pytest.fixture(scope="module")
def expected(registry: RegistryServer, source: str,
             tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("expected")
    skopeo_copy(f"docker://{source}", f"oci:{work / 'lay'}:v1")
    return umoci_unpack(work / "lay", work / "bundle", tag="v1")


def _opts(cache: Path, trace: Path | None = None) -> ConvertOptions:
    return ConvertOptions(chunk_size=int(CHUNK, 16), cache_dir=str(cache),
                          client_options={"plain_http": True},
                          prefetch_trace=str(trace) if trace else None)  # fmt: skip


def _convert_cli(source: str, target: str, cache: Path, *extra: str,
                 check: bool = True) -> dict[str, object]:
    proc = run_cli("convert", "--source", source, "--target", target, "--plain-http",
                   "--chunk-size", CHUNK, "--cache-dir", str(cache), "-q", *extra,
                   check=check)  # fmt: skip
    return {"rc": proc.returncode, "stderr": proc.stderr,
            "json": json.loads(proc.stdout) if "-J" in extra and proc.returncode == 0 else None}


def _pushed_bootstrap(ref: str) -> tuple[dict[str, object], bytes]:
    client = RegistryClient(plain_http=True)
    try:
        man = client.get_manifest(ref)
        descs = manifest_blobs(man.data)
        return json.loads(man.data), extract_bootstrap(client.get_blob(ref, descs[-1].digest))
    finally:
        client.close()


def _synthetic_trace(merged: str, paths: list[str], dest: Path) -> Path:
    """A trace as the daemon writes it, of `paths` read in order on the merged image."""
    data = Path(merged).read_bytes()
    reader = BootstrapReader(data)
    root = reader.tree()
    blobs = [b.blob_id for b in reader.image.blobs]
    accesses = []
    for p in paths:
        node = lookup(root, ("/" + p).encode())
        assert node is not None
        accesses += [{"blob": blobs[c.blob_index], "offset": c.uncompressed_offset, "t": 0.0}
                     for c in node.inode.chunks]  # fmt: skip
    dest.write_text(json.dumps({"version": 1, "fsid": hashlib.sha256(data).hexdigest(),
                                "blobs": blobs, "accesses": accesses}))  # fmt: skip
    return dest


def test_convert_with_trace_pushes_optimized_image(source: str, registry: RegistryServer,
                                                   tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    plain = convert_image(source, registry.ref("pf/nydus:plain"), _opts(cache))
    assert len(plain.blobs) == 2 and plain.prefetch is None
    trace = _synthetic_trace(plain.bootstrap, WORKLOAD, tmp_path / "trace.json")
    target = registry.ref("pf/nydus:opt")
    out = _convert_cli(source, target, cache, "--prefetch-trace", str(trace), "-J", "-")
    res = out["json"]
    assert isinstance(res, dict)
    assert res["layers_cached"] == 2
    assert res["prefetch"]["files"] == len(WORKLOAD) and res["prefetch"]["chunks"] > 0
    # Nydus conventions: one (new) blob layer, then the bootstrap layer
    raw = skopeo_inspect(f"docker://{target}", raw=True)
    assert [x["mediaType"] for x in raw["layers"]] == [
        "application/vnd.oci.image.layer.nydus.blob.v1",
        "application/vnd.oci.image.layer.v1.tar+gzip",
    ]
    assert raw["layers"][0]["digest"] == res["blobs"][0]["digest"]
    assert raw["layers"][0]["digest"] not in {f"sha256:{b}" for b, _ in plain.blobs}
    # the prefetch table names the workload's files, their chunks first in the blob
    _, boot = _pushed_bootstrap(target)
    chunks = prefetch_chunks(boot)
    root = BootstrapReader(boot).tree()
    want = [c for p in WORKLOAD for c in lookup(root, ("/" + p).encode()).inode.chunks]  # type: ignore[union-attr]
    assert [c.uncompressed_offset for c in chunks] == [c.uncompressed_offset for c in want]
    assert chunks[0].uncompressed_offset == 0
    span = sorted(chunks, key=lambda c: c.uncompressed_offset)
    assert all(a.uncompressed_offset + a.aligned_size == b.uncompressed_offset
               for a, b in itertools.pairwise(span))  # one contiguous span
    # check REF: conventions, every chunk, and the whole tree against the source image
    proc = run_cli("check", target, "--source", source, "--plain-http")
    assert "OK" in proc.stdout
    # deterministic: the same trace gives the same image
    again = convert_image(source, registry.ref("pf/nydus:opt2"), _opts(cache, trace))
    assert again.manifest_digest == res["manifest_digest"]


def test_convert_refuses_trace_of_another_image(source: str, registry: RegistryServer,
                                                tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # a trace recorded on the image converted with another chunk size
    other = convert_image(source, registry.ref("pf/nydus:other"), ConvertOptions(
        chunk_size=0x20000, cache_dir=str(cache), client_options={"plain_http": True}))
    trace = _synthetic_trace(other.bootstrap, ["d0/f0"], tmp_path / "other.json")
    target = registry.ref("pf/nydus:refused")
    out = _convert_cli(source, target, cache, "--prefetch-trace", str(trace), check=False)
    err = str(out["stderr"])
    assert out["rc"] != 0 and "Traceback" not in err and err.count("\n") == 1
    assert "another image" in err and "--chunk-size" in err
    with pytest.raises(NotFoundError):
        _pushed_bootstrap(target)  # nothing pushed under the tag
    # not a trace at all: refused before any layer is converted
    (tmp_path / "bad.json").write_text('{"version": 99}')
    out = _convert_cli(source, target, tmp_path / "cache2", "--prefetch-trace",
                       str(tmp_path / "bad.json"), check=False)  # fmt: skip
    assert out["rc"] != 0 and "not an erofs-nydus trace" in str(out["stderr"])
    assert not (tmp_path / "cache2" / "layers").exists()


kernel = pytest.mark.skipif(
    not fanotify_usable(), reason="needs root and pre-content fanotify (Linux >= 6.14)"
)


def _mount(ref: str, mp: Path, cache: Path) -> None:
    mp.mkdir(parents=True, exist_ok=True)
    run_cli("mount", ref, str(mp), "--cache-dir", str(cache), "--plain-http")
    assert os.path.ismount(mp)


def _umount(mp: Path, cache: Path) -> None:
    run_cli("umount", str(mp), "--cache-dir", str(cache), check=False)


@kernel
@pytest.mark.kernel
def test_traced_workload_on_optimized_ref_needs_no_foreground_reads(
    source: str, registry: RegistryServer, expected: Path, tmp_path: Path
) -> None:
    REQ = "erofs_nydus_backend_requests_total"
    cache = tmp_path / "conv"
    plain_ref = registry.ref("pf/nydus:traced")
    _convert_cli(source, plain_ref, cache)
    # 1. the unoptimized image, mounted by REF, cold: run the workload and trace it
    mp, c1 = tmp_path / "mp", tmp_path / "cache1"
    _mount(plain_ref, mp, c1)
    try:
        for p in WORKLOAD:
            assert (mp / p).read_bytes() == (expected / p).read_bytes()
        plain = daemon_metrics(c1)
        run_cli("trace", str(mp), "-o", str(tmp_path / "trace.json"))
    finally:
        _umount(mp, c1)
    assert plain[REQ] >= 3
    # 2. convert again with the trace: the optimized image goes to the registry
    opt_ref = registry.ref("pf/nydus:optimized")
    _convert_cli(source, opt_ref, cache, "--prefetch-trace", str(tmp_path / "trace.json"))
    run_cli("check", opt_ref, "--plain-http")
    _, boot = _pushed_bootstrap(opt_ref)
    assert len(prefetch_chunks(boot)) > 0
    # 3. the optimized image by REF, cold (fresh cache dir): prefetch, then the workload
    c2 = tmp_path / "cache2"
    _mount(opt_ref, mp, c2)
    try:
        before = metrics_after_prefetch(c2)
        for p in WORKLOAD:
            assert (mp / p).read_bytes() == (expected / p).read_bytes()
        after = daemon_metrics(c2)
        # everything else still reads correctly, on demand
        assert (mp / "d1/f1").read_bytes() == (expected / "d1/f1").read_bytes()
    finally:
        _umount(mp, c2)
    foreground = after[REQ] - before[REQ]
    print(f"\nunoptimized: {plain[REQ]:.0f} backend requests; optimized+prefetch: "
          f"{before[REQ]:.0f} prefetch, {foreground:.0f} foreground")
    assert foreground == 0 < plain[REQ]
    assert before[REQ] < plain[REQ]  # prefetch reads the traced span in a few large reads
    assert after["erofs_nydus_requests_denied_total"] == 0
