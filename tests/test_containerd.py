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
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from containerd_support import Stack, containerd_bin_dir, push_nydus, rootfs_files
from cri_client import CRIImages
from daemon_support import fanotify_usable
from registry_fixture import RegistryServer, run

pytestmark = [pytest.mark.containerd, pytest.mark.kernel, pytest.mark.registry]

if not fanotify_usable():
    pytest.skip("needs root and pre-content fanotify (Linux >= 6.14)", allow_module_level=True)

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
    files = rootfs_files(work / "src")
    return push_nydus(registry, work, files, "ctd/app"), files


@pytest.fixture(scope="module")
def nydus_image2(registry: RegistryServer, tmp_path_factory: pytest.TempPathFactory,
                 nydus_image: tuple[str, dict[str, bytes]]) -> tuple[str, dict[str, bytes]]:
    """Same programs, other data: a second image with blobs of its own."""
    work = tmp_path_factory.mktemp("ctd-image2")
    files = {**nydus_image[1], "data/big.bin": nydus_image[1]["data/other.bin"][1:] + b"x",
             "etc/greeting": b"the second image\n"}
    return push_nydus(registry, work, files, "ctd/app2"), files


@pytest.fixture
def stack_factory(tmp_path: Path, bindir: Path, registry: RegistryServer,
                  ) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []
    # short paths: unix sockets under the snapshotter root must fit in 108 bytes
    base = Path(f"/tmp/ctd-{os.getpid()}-{tmp_path.name[-12:]}")

    def make(reg: RegistryServer = registry, **kwargs: object) -> Stack:
        s = Stack(base / str(len(stacks)), bindir, reg.host, **kwargs)  # type: ignore[arg-type]
        s.registry = reg  # type: ignore[attr-defined]
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



def _wait(cond: Callable[[], object], what: str, stack: Stack, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{stack.tail()}")


def _exec(stack: Stack, container: str, exec_id: str, *cmd: str) -> str:
    return stack.ctr("task", "exec", "--exec-id", exec_id, container, *cmd).stdout


@pytest.mark.parametrize("policy", ["restart", "failover"])
def test_kill9_of_nydusd_and_snapshotter_restart_keep_live_containers(
        stack_factory: Callable[..., Stack], nydus_image: tuple[str, dict[str, bytes]],
        policy: str) -> None:
    ref, files = nydus_image
    stack = stack_factory(daemon_mode="dedicated", recover_policy=policy)
    _pull(stack, ref)
    stack.ctr("run", "-d", "--snapshotter", "nydus", ref, "live", "/bin/sleep", "600")
    _wait(stack.nydusd_pids, "nydusd", stack)
    (old,) = stack.nydusd_pids()
    os.kill(old, signal.SIGKILL)
    # the live container reads a file it never touched: correct bytes
    out = _exec(stack, "live", "e1", "/usr/bin/sha256sum", "/data/other.bin")
    assert out.split()[0] == hashlib.sha256(files["data/other.bin"]).hexdigest()
    # the snapshotter's recovery starts nydusd again with the same argv; it adopts the mount
    _wait(lambda: [p for p in stack.nydusd_pids() if p != old]
          and len(_erofs_mounts_under(stack.base)) == 1, "restarted nydusd", stack)
    if policy == "failover":  # 0.13.4: same argv plus --supervisor, then takeover + start
        assert "Do failover" in stack.log("snapshotter").read_text(), stack.tail()
    out = _exec(stack, "live", "e2", "/bin/head", "-c", "20", "/etc/greeting")
    assert out == files["etc/greeting"][:20].decode()
    # the snapshotter itself restarts (kill -9): it reconnects to the live nydusd
    stack.stop_process("snapshotter", signal.SIGKILL)
    stack.snap_sock.unlink(missing_ok=True)
    stack.start_snapshotter()
    # containerd's proxy-plugin connection comes back on its own, after a backoff
    _wait(lambda: stack.ctr("snapshots", "--snapshotter", "nydus", "ls",
                            check=False).returncode == 0, "containerd to reconnect", stack)
    out = stack.run(ref, "c2", "/usr/bin/sha256sum", "/data/big.bin")
    assert out.split()[0] == hashlib.sha256(files["data/big.bin"]).hexdigest()
    assert _exec(stack, "live", "e3", "/bin/cat", "/etc/greeting") == \
        files["etc/greeting"].decode()


def test_shared_mode(stack_factory: Callable[..., Stack],
                     nydus_image: tuple[str, dict[str, bytes]]) -> None:
    ref, files = nydus_image
    stack = stack_factory(daemon_mode="shared")
    _pull(stack, ref)
    out = stack.run(ref, "c1", "/bin/cat", "/etc/greeting")
    assert out == files["etc/greeting"].decode()
    out = stack.run(ref, "c2", "/usr/bin/sha256sum", "/data/big.bin")
    assert out.split()[0] == hashlib.sha256(files["data/big.bin"]).hexdigest()
    assert len(stack.nydusd_pids()) == 1
    # restart policy in shared mode: nydusd killed, restarted, every mount re-POSTed
    stack.ctr("run", "-d", "--snapshotter", "nydus", ref, "live", "/bin/sleep", "600")
    (old,) = stack.nydusd_pids()
    os.kill(old, signal.SIGKILL)
    _wait(lambda: [p for p in stack.nydusd_pids() if p != old], "restarted nydusd", stack)
    out = _exec(stack, "live", "e1", "/usr/bin/sha256sum", "/data/other.bin")
    assert out.split()[0] == hashlib.sha256(files["data/other.bin"]).hexdigest()


def test_image_removal_leaves_nothing(stack_factory: Callable[..., Stack],
                                      nydus_image: tuple[str, dict[str, bytes]]) -> None:
    ref, files = nydus_image
    stack = stack_factory(daemon_mode="dedicated")
    _pull(stack, ref)
    assert stack.run(ref, "c1", "/bin/cat", "/etc/greeting") == files["etc/greeting"].decode()
    with CRIImages(str(stack.sock)) as cri:
        cri.remove(ref)
    _wait(lambda: not _erofs_mounts_under(stack.base) and not stack.nydusd_pids(),
          "unmount and nydusd exit after image removal", stack)
    from erofs_nydus.service.client import DaemonClient

    _wait(lambda: not DaemonClient(stack.cache_dir).supervisor_running(),
          "the cache dir's daemon to stop", stack)
    left = sorted(p.name for p in stack.cache_dir.iterdir()) if stack.cache_dir.exists() else []
    blob_files = [n for n in left if n.split(".")[0] in
                  {d.split(":")[1] for d in _nydus_blobs(stack_registry(stack), ref)}]
    assert not blob_files, left
    # nor the image's stored bootstrap: only the (stopped) daemon's own files are left
    assert not [n for n in left if n.endswith((".boot", ".blob.data", ".chunk_map"))], left


def test_two_images_share_the_daemon_and_removal_of_one_spares_the_other(
        stack_factory: Callable[..., Stack], nydus_image: tuple[str, dict[str, bytes]],
        nydus_image2: tuple[str, dict[str, bytes]]) -> None:
    (ref1, files1), (ref2, files2) = nydus_image, nydus_image2
    stack = stack_factory(daemon_mode="dedicated")
    _pull(stack, ref1)
    _pull(stack, ref2)
    stack.ctr("run", "-d", "--snapshotter", "nydus", ref2, "live2", "/bin/sleep", "600")
    assert stack.run(ref1, "c1", "/bin/cat", "/etc/greeting") == files1["etc/greeting"].decode()
    _wait(lambda: len(stack.nydusd_pids()) == 2, "two dedicated nydusd", stack)
    with CRIImages(str(stack.sock)) as cri:
        cri.remove(ref1)
    _wait(lambda: len(stack.nydusd_pids()) == 1 and len(_erofs_mounts_under(stack.base)) == 1,
          "the first image's nydusd to go", stack)
    out = _exec(stack, "live2", "e1", "/usr/bin/sha256sum", "/data/big.bin")
    assert out.split()[0] == hashlib.sha256(files2["data/big.bin"]).hexdigest()
    assert _exec(stack, "live2", "e2", "/bin/cat", "/etc/greeting") == \
        files2["etc/greeting"].decode()


def test_registry_with_basic_auth(
        stack_factory: Callable[..., Stack], registry_htpasswd: RegistryServer,
        nydus_image: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:
    from registry_fixture import HTPASSWD_USER

    ref, files = nydus_image
    user, password = HTPASSWD_USER
    # copy the converted Nydus image as is into the registry that needs auth
    target = registry_htpasswd.ref("ctd/private:nydus")
    run(["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false",
         "--dest-tls-verify=false", "--dest-creds", f"{user}:{password}",
         f"docker://{ref}", f"docker://{target}"])
    stack = stack_factory(registry_htpasswd, daemon_mode="dedicated", auth=HTPASSWD_USER)
    with CRIImages(str(stack.sock)) as cri:
        cri.pull(target, user, password)
    out = stack.run(target, "c1", "/usr/bin/sha256sum", "/data/big.bin")
    assert out.split()[0] == hashlib.sha256(files["data/big.bin"]).hexdigest()
    # the snapshotter passed the credentials in nydusd's config (auth), and nydusd gave them
    # to the daemon as a private docker config
    from erofs_nydus.service.nydusd_config import AUTH_DIR

    assert list((stack.cache_dir / AUTH_DIR).glob("*/config.json"))


def test_death_of_the_serving_daemon_starts_the_snapshotters_recovery(
        stack_factory: Callable[..., Stack], nydus_image: tuple[str, dict[str, bytes]]) -> None:
    """The snapshotter takes a hang-up of nydusd's API socket as its death, and then
    restarts it, replacing the mount.  kill -9 of the cache dir's supervisor alone is
    repaired by the keeper (issue 11) with the mount serving on: nydusd stays, and a
    running container reads right bytes from a file it never touched.  kill -9 of the
    whole daemon (keeper, supervisor and worker: its process group, as `systemctl kill`
    or a cgroup OOM kill does) leaves nothing to serve the kernel: nydusd exits too, so
    the snapshotter restarts it and new containers of the image read right bytes.
    (Containers still running on the old mount then have no fanotify group behind it.)"""
    from erofs_nydus.service.client import DaemonClient

    ref, files = nydus_image
    stack = stack_factory(daemon_mode="dedicated")
    _pull(stack, ref)
    stack.ctr("run", "-d", "--snapshotter", "nydus", ref, "live", "/bin/sleep", "600")
    _wait(stack.nydusd_pids, "nydusd", stack)
    (old,) = stack.nydusd_pids()
    client = DaemonClient(stack.cache_dir)
    sup = client.supervisor_pid()
    assert sup
    # one process of the daemon dies: repaired inside, not a death for the snapshotter
    os.kill(sup, signal.SIGKILL)
    _wait(lambda: client.supervisor_pid() not in (None, sup) and client.supervisor_running(),
          "the keeper's new supervisor", stack)
    out = _exec(stack, "live", "e1", "/usr/bin/sha256sum", "/data/other.bin")
    assert out.split()[0] == hashlib.sha256(files["data/other.bin"]).hexdigest()
    assert stack.nydusd_pids() == [old]
    assert "died" not in stack.log("snapshotter").read_text()
    # the whole daemon dies: nydusd follows, the snapshotter's recovery starts
    new_sup = client.supervisor_pid()
    assert new_sup
    os.killpg(os.getpgid(new_sup), signal.SIGKILL)
    _wait(lambda: [p for p in stack.nydusd_pids() if p != old]
          and len(_erofs_mounts_under(stack.base)) == 1, "recovered nydusd", stack)
    assert "died" in stack.log("snapshotter").read_text()
    out = stack.run(ref, "c2", "/usr/bin/sha256sum", "/data/big.bin")
    assert out.split()[0] == hashlib.sha256(files["data/big.bin"]).hexdigest()
