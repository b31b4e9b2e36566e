"""containerd runs containers lazily through the real nydus-snapshotter with our `nydusd`.

A private containerd (Debian 12), runc and containerd-nydus-grpc (nydus-snapshotter 0.13.4
from Debian trixie's package) started under tmp_path, a real docker-registry, our `convert`;
the image is pulled the way kubelet pulls (CRI ImageService/PullImage), and
`ctr -n k8s.io run --snapshotter nydus` prints files of the image.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from containerd_support import Stack, containerd_bin_dir
from cri_client import CRIImages
from daemon_support import fanotify_usable
from registry_fixture import RegistryServer, run

pytestmark = [pytest.mark.containerd, pytest.mark.kernel, pytest.mark.registry]

if not fanotify_usable():
    pytest.skip("needs root and pre-content fanotify (Linux >= 6.14)", allow_module_level=True)

DATA_SIZE = 6 << 20


def _rootfs(root: Path) -> dict[str, bytes]:
    """A minimal root: /bin/sh, /bin/cat, /usr/bin/sha256sum and their libraries."""
    files: dict[str, bytes] = {}
    for prog in ("/bin/sh", "/bin/cat", "/usr/bin/sha256sum", "/bin/head", "/bin/sleep"):
        real = os.path.realpath(prog)
        files[prog.lstrip("/")] = Path(real).read_bytes()
        out = subprocess.run(["ldd", real], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            parts = line.split()
            path = parts[2] if "=>" in parts and len(parts) > 2 else parts[0]
            if path.startswith("/"):
                files[path.lstrip("/")] = Path(os.path.realpath(path)).read_bytes()
    rnd = hashlib.sha256(b"seed").digest()
    data = b"".join(hashlib.sha256(rnd + i.to_bytes(4, "little")).digest()
                    for i in range(DATA_SIZE // 32))
    files["data/big.bin"] = data
    files["data/other.bin"] = data[::-1]
    files["etc/greeting"] = b"hello from a lazy nydus container\n"
    return files


def _build_oci(work: Path, files: dict[str, bytes]) -> str:
    """umoci image with one layer holding `files` (programs executable); oci:LAYOUT:TAG."""
    layout = work / "layout"
    run(["umoci", "init", "--layout", str(layout)])
    run(["umoci", "new", "--image", f"{layout}:v1"])
    bundle = work / "bundle"
    run(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)])
    rootfs = bundle / "rootfs"
    for rel, content in files.items():
        target = rootfs / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(0o755 if rel.startswith(("bin/", "usr/bin/", "lib")) else 0o644)
    (rootfs / "lib64").mkdir(exist_ok=True)
    run(["umoci", "repack", "--image", f"{layout}:v1", str(bundle)])
    run(["umoci", "config", "--image", f"{layout}:v1", "--config.cmd", "/bin/cat",
         "--config.cmd", "/etc/greeting"])
    return f"oci:{layout}:v1"


@pytest.fixture(scope="module")
def bindir() -> Path:
    d = containerd_bin_dir()
    if d is None:
        pytest.skip("tools/containerd-deps failed (containerd/nydus-snapshotter unavailable)")
    return d


@pytest.fixture(scope="module")
def nydus_image(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory,
                ) -> tuple[str, dict[str, bytes]]:
    work = tmp_path_factory.mktemp("ctd-image")
    files = _rootfs(work / "src")
    oci = _build_oci(work, files)
    src = registry.ref("ctd/app:oci")
    run(["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", oci,
         f"docker://{src}"])
    target = registry.ref("ctd/app:nydus")
    run([sys.executable, "-m", "erofs_nydus.cli", "convert", "--source", src, "--target",
         target, "--plain-http", "-q", "--cache-dir", str(work / "convert-cache")],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    return target, files


@pytest.fixture
def stack_factory(tmp_path: Path, bindir: Path, registry: RegistryServer,
                  ) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []
    # short paths: unix sockets under the snapshotter root must fit in 108 bytes
    base = Path(f"/tmp/ctd-{os.getpid()}-{tmp_path.name[-12:]}")

    def make(**kwargs: object) -> Stack:
        s = Stack(base / str(len(stacks)), bindir, registry.host, **kwargs)  # type: ignore[arg-type]
        s.registry = registry  # type: ignore[attr-defined]
        stacks.append(s)
        return s.start()

    yield make
    for s in stacks:
        s.close()
    for s in stacks:
        s.remove_tree()
    shutil.rmtree(base, ignore_errors=True)


def stack_registry(stack: Stack) -> RegistryServer:
    return stack.registry  # type: ignore[attr-defined, no-any-return]


def _pull(stack: Stack, ref: str) -> str:
    with CRIImages(str(stack.sock)) as cri:
        return cri.pull(ref)


def _nydus_blobs(registry: RegistryServer, ref: str) -> list[str]:
    """Digests of the image's nydus data blobs (not the bootstrap layer)."""
    from registry_fixture import skopeo_inspect

    manifest = skopeo_inspect(f"docker://{ref}", raw=True)
    return [layer["digest"] for layer in manifest["layers"]
            if layer.get("annotations", {}).get("containerd.io/snapshot/nydus-blob") == "true"]


def _cache_fill(stack: Stack) -> tuple[int, int]:
    """(present, size) bytes over the blobs of the cache dir's daemon."""
    from erofs_nydus.service.client import DaemonClient

    st = DaemonClient(stack.cache_dir).request("status")
    blobs = st["blobs"].values()
    return sum(b["present"] for b in blobs), sum(b["size"] for b in blobs)


def _erofs_mounts_under(base: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        rows = [ln.split() for ln in f]
    return [r[4] for r in rows if r[4].startswith(str(base)) and r[r.index("-") + 1] == "erofs"]


def test_dedicated_run_lazily(stack_factory: Callable[..., Stack],
                              nydus_image: tuple[str, dict[str, bytes]]) -> None:
    ref, files = nydus_image
    stack = stack_factory(daemon_mode="dedicated")
    try:
        image_ref = _pull(stack, ref)
    except Exception as exc:
        raise AssertionError(f"CRI pull failed: {exc}\n{stack.tail()}") from exc
    assert image_ref
    out = stack.run(ref, "c1", "/bin/cat", "/etc/greeting")
    assert out == files["etc/greeting"].decode()
    # the data blobs never entered containerd's content store: only the bootstrap layer did
    content = stack.ctr("content", "ls", "-q").stdout.split()
    blobs = _nydus_blobs(stack_registry(stack), ref)
    assert blobs and not set(blobs) & set(content)
    present, size = _cache_fill(stack)
    assert present < size // 2, (present, size)  # lazy: the 12 MiB of data were not read
    digest = hashlib.sha256(files["data/big.bin"]).hexdigest()
    out = stack.run(ref, "c2", "/usr/bin/sha256sum", "/data/big.bin")
    assert out.split()[0] == digest
    assert stack.nydusd_pids(), stack.tail()
    assert _erofs_mounts_under(stack.base)

