"""The real containerd + nydus-snapshotter in fscache mode, inside the QEMU VM (issue 13).

containerd 1.6.20 (Debian 12) and containerd-nydus-grpc 0.13.4 with ``fs_driver = "fscache"``,
``daemon_mode = "shared"`` and ``nydusd_path`` = our ``nydusd``: the snapshotter starts
``nydusd singleton --fscache <root>/cache``, registers the image by ``PUT /api/v2/blobs`` and
mounts ``erofs -o fsid=`` itself.  The image is built and converted on the host into a
docker-registry's storage that a docker-registry in the guest serves on its loopback; the
pull goes through CRI ``PullImage``; files read in a container of the image equal the
source, also after `kill -9` of our nydusd (the snapshotter restarts it, unmounting the
image's erofs mount under the live container) and after SIGTERM of the restarted one;
removing the image leaves no mount, no daemon and no blob file behind.
See tests/containerd_fscache_guest.py for how the container runs without runc when the VM
kernel cannot host it (it has no cgroups and no namespaces but the mount namespace).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import vm_support as vs
from containerd_support import containerd_bin_dir, push_nydus, rootfs_files
from registry_fixture import RegistryServer, skopeo_inspect

from erofs_nydus.daemon.images import VERDICT_FILE

pytestmark = [
    pytest.mark.vm,
    pytest.mark.containerd,
    pytest.mark.registry,
    pytest.mark.skipif(vs.vm_skip_reason() is not None, reason=str(vs.vm_skip_reason())),
    pytest.mark.timeout(1800),
]


def test_containerd_nydus_snapshotter_fscache_in_vm(registry: RegistryServer,
                                                    tmp_path: Path) -> None:
    _scenario(registry, tmp_path, kill9=False)


def test_containerd_fscache_kill9_of_nydusd_under_a_live_container(
        registry: RegistryServer, tmp_path: Path) -> None:
    _scenario(registry, tmp_path, kill9=True)


def _scenario(registry: RegistryServer, tmp_path: Path, kill9: bool) -> None:
    bindir = containerd_bin_dir()
    if bindir is None:
        pytest.skip("tools/containerd-deps failed (containerd/nydus-snapshotter unavailable)")
    vs.ensure_kernel()
    files = rootfs_files(tmp_path / "src")
    ref = push_nydus(registry, tmp_path, files, "ctdfs/app")
    manifest = skopeo_inspect(f"docker://{ref}", raw=True)
    blobs = [layer["digest"] for layer in manifest["layers"]
             if layer.get("annotations", {}).get("containerd.io/snapshot/nydus-blob") == "true"]
    assert blobs
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({
        "registry_config": str(registry.workdir / "config.yml"),
        "registry_host": registry.host, "bindir": str(bindir), "ref": ref, "blobs": blobs,
        "kill9": kill9}))
    res = vs.run_python_in_vm(
        # kernel messages (the kill -9 scenario's EBUSY remount) must not cut the result
        # line on the serial console
        "open('/proc/sys/kernel/printk', 'w').write('1')\n"
        "import json, fscache_guest as g, containerd_fscache_guest as cg\n"
        f"g.emit(cg.fscache_stack(json.load(open({str(spec)!r}))))\n",
        timeout=900, scratch_size="2G")
    assert res.returncode == 0, res.stdout[-6000:]
    r = vs.vm_result(res.stdout)
    tail = r.pop("tail", "")
    (tmp_path / "guest-logs.txt").write_text(tail)  # containerd, snapshotter, nydusd logs
    print(json.dumps(r, indent=1), file=sys.stderr)
    assert "error" not in r, (r["error"], tail)
    assert r["registry_up"] and r["image_ref"], tail
    # lazy: only the bootstrap layer entered containerd's content store
    assert not set(blobs) & set(r["content"]), r["content"]
    # the container read its files right, through the snapshotter's fscache mount
    assert r["greeting"] == files["etc/greeting"].decode(), tail
    assert r["big_sha256"] == hashlib.sha256(files["data/big.bin"]).hexdigest(), tail
    assert r["nydusd"] == 1, tail
    (m,) = r["erofs_mounts"]
    assert "fsid=" in m["options"], m
    if kill9:
        # kill -9 of nydusd with a live container: it reads a file it never touched right, the
        # snapshotter restarts nydusd, the container keeps reading
        other = files["data/other.bin"]
        assert r["live_after_kill9"].split()[0] == \
            hashlib.sha256(other[:1 << 20]).hexdigest(), tail
        assert r["nydusd_restarted"], tail
        assert r["live_after_restart"] == files["etc/greeting"][:20].decode(), tail
        # SIGTERM of the restarted nydusd: the entry's mount is gone but the overlay still
        # reads through its superblock, so the daemon keeps serving it (issue 13 item 4)
        assert r["nydusd_sigterm_exited"] and r["nydusd_restarted_after_sigterm"], tail
        assert r["live_after_sigterm"].split()[0] == hashlib.sha256(other).hexdigest(), tail
    # image removal: no mount, no daemon, no blob file, no snapshot left
    assert r["unmounted"] and r["daemon_stopped"], tail
    assert r["blob_files_left"] == [], r["cache_files_left"]
    assert {f"{h}.blob.data" for h in (d.split(":")[1] for d in blobs)} <= set(
        r["cache_files_in_use"]), r["cache_files_in_use"]  # the check above can see them
    # only the stopped daemon's own files (state, lock, log, the digests of bootstraps it
    # validated): no bootstrap copy, chunk map, cachefiles file
    assert set(r["cache_files_left"]) <= {"daemon-state.json", "daemon.lock", "daemon.log",
                                          VERDICT_FILE}, r["cache_files_left"]
    assert r["snapshots_left"] == [], r["snapshots_left"]
