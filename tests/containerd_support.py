"""A private containerd + nydus-snapshotter (containerd-nydus-grpc) stack with our `nydusd`.

Everything lives under one directory: containerd's root/state dirs and sockets, the
snapshotter's root and socket, the nydusd config template and a `nydusd` wrapper script that
runs erofs_nydus.service.nydusd from this tree.  The real programs come from
tools/containerd-deps (containerd, ctr, runc from Debian 12; containerd-nydus-grpc unpacked
from Debian trixie's nydus-snapshotter package).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from registry_fixture import RegistryServer

REPO = Path(__file__).resolve().parent.parent
DEPS = REPO / "tools" / "containerd-deps"


def containerd_bin_dir() -> Path | None:
    """The bin dir tools/containerd-deps prints (None if it fails, e.g. offline)."""
    try:
        p = subprocess.run([str(DEPS)], capture_output=True, text=True, timeout=900,
                           check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        return None
    d = Path(lines[-1])
    return d if (d / "containerd-nydus-grpc").exists() else None


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    raise RuntimeError(f"{path} did not appear in {timeout} s:\n{log.read_text()[-4000:]}")


@dataclass
class Stack:
    base: Path
    bindir: Path
    registry_host: str
    daemon_mode: str = "dedicated"
    scheme: str = "http"
    recover_policy: str = "restart"
    cri_snapshotter: str = "nydus"  # what CRI pulls unpack into ("overlayfs": the default)
    prefix: list[str] = field(default_factory=list)  # e.g. nsenter into a network namespace
    auth: tuple[str, str] | None = None  # registry user/password (snapshotter's docker config)
    fs_driver: str = "fusedev"  # or "fscache" (EROFS over /dev/cachefiles: the VM only)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    # -- paths -------------------------------------------------------------------------------

    @property
    def sock(self) -> Path:
        return self.base / "containerd.sock"

    @property
    def snap_sock(self) -> Path:
        return self.base / "nydus.sock"

    @property
    def snap_root(self) -> Path:
        return self.base / "nydus"

    @property
    def cache_dir(self) -> Path:
        return self.snap_root / "cache"

    def log(self, name: str) -> Path:
        return self.base / f"{name}.log"

    # -- setup -------------------------------------------------------------------------------

    def write_configs(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        nydusd = self.base / "nydusd"
        nydusd.write_text(
            "#!/bin/sh\n"
            f"PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}}; export PYTHONPATH\n"
            f"exec {sys.executable} -m erofs_nydus.service.nydusd \"$@\"\n")
        nydusd.chmod(0o755)
        (self.base / "nydusd-config.json").write_text(json.dumps(self.nydusd_config(), indent=1))
        (self.base / "snapshotter.toml").write_text(f"""\
version = 1
root = "{self.snap_root}"
address = "{self.snap_sock}"
daemon_mode = "{self.daemon_mode}"
cleanup_on_close = false

[system]
enable = false

[daemon]
nydusd_config = "{self.base / 'nydusd-config.json'}"
nydusd_path = "{nydusd}"
fs_driver = "{self.fs_driver}"
recover_policy = "{self.recover_policy}"
threads_number = 2

[log]
log_to_stdout = true
level = "info"

[metrics]
address = ""

[remote.auth]
enable_kubeconfig_keychain = false
enable_cri_keychain = false

[snapshot]
enable_nydus_overlayfs = false
sync_remove = true

[cache_manager]
disable = false
gc_period = "24h"
""")
        (self.base / "containerd.toml").write_text(f"""\
version = 2
root = "{self.base / 'containerd-root'}"
state = "{self.base / 'containerd-state'}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
address = "{self.sock}"

[ttrpc]
address = "{self.base / 'containerd.sock.ttrpc'}"

[debug]
address = ""

[metrics]
address = ""

[proxy_plugins.nydus]
type = "snapshot"
address = "{self.snap_sock}"

[plugins."io.containerd.internal.v1.opt"]
path = "{self.base / 'opt'}"

[plugins."io.containerd.grpc.v1.cri"]
stream_server_address = "127.0.0.1"
stream_server_port = "0"
enable_cdi = false

[plugins."io.containerd.grpc.v1.cri".containerd]
snapshotter = "{self.cri_snapshotter}"
disable_snapshot_annotations = false

[plugins."io.containerd.grpc.v1.cri".cni]
bin_dir = "{self.base / 'cni-bin'}"
conf_dir = "{self.base / 'cni-conf'}"

[plugins."io.containerd.grpc.v1.cri".registry.mirrors."{self.registry_host}"]
endpoint = ["http://{self.registry_host}"]
""")

    def nydusd_config(self) -> dict[str, object]:
        """The snapshotter's nydusd config template (it fills in host, repo, auth...)."""
        backend = {"scheme": self.scheme, "timeout": 5, "connect_timeout": 5, "retry_limit": 2}
        if self.fs_driver == "fscache":  # nydusd's fscache (blob entry) config shape
            return {"type": "bootstrap", "config": {
                "backend_type": "registry", "backend_config": backend,
                "cache_type": "fscache", "prefetch_config": {"enable": False}}}
        return {
            "device": {
                "backend": {"type": "registry", "config": backend},
                "cache": {"type": "blobcache", "config": {"work_dir": str(self.cache_dir)}},
            },
            "mode": "direct", "digest_validate": False, "iostats_files": False,
            "enable_xattr": True, "fs_prefetch": {"enable": False},
        }

    def start(self) -> Stack:
        self.write_configs()
        self.env = {**os.environ, "PATH": f"{self.bindir}:{os.environ.get('PATH', '')}",
                    "HOME": str(self.base / "home")}
        (self.base / "home").mkdir(exist_ok=True)
        if self.auth is not None:
            import base64

            d = self.base / "home" / ".docker"
            d.mkdir(mode=0o700, exist_ok=True)
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            (d / "config.json").write_text(json.dumps(
                {"auths": {self.registry_host: {"auth": token}}}))
        self.start_snapshotter()
        self._start("containerd", [str(self.bindir / "containerd"), "--config",
                                   str(self.base / "containerd.toml")], self.sock)
        return self

    def start_snapshotter(self) -> None:
        self._start("snapshotter", [str(self.bindir / "containerd-nydus-grpc"), "--config",
                                    str(self.base / "snapshotter.toml"), "--log-to-stdout"],
                    self.snap_sock)

    def _start(self, name: str, argv: list[str], sock: Path) -> None:
        with open(self.log(name), "ab") as logf:
            proc = subprocess.Popen([*self.prefix, *argv], stdout=logf, stderr=logf, env=self.env,
                                    cwd=self.base, start_new_session=True)
        self.procs[name] = proc
        _wait_socket(sock, proc, self.log(name))

    def stop_process(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    # -- use ---------------------------------------------------------------------------------

    def ctr(self, *args: str, timeout: float = 180, check: bool = True,
            ) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([str(self.bindir / "ctr"), "--address", str(self.sock), "-n",
                            "k8s.io", *args], capture_output=True, text=True, timeout=timeout,
                           env=self.env, check=False)
        if check and p.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({p.returncode}):\n"
                                 f"{p.stdout}{p.stderr}\n{self.tail()}")
        return p

    def run(self, image: str, name: str, *cmd: str, timeout: float = 180,
            snapshotter: str = "nydus") -> str:
        """`ctr run --rm --snapshotter nydus IMAGE NAME CMD...`: the container's output."""
        return self.ctr("run", "--rm", "--snapshotter", snapshotter, image, name, *cmd,
                        timeout=timeout).stdout

    def tail(self, n: int = 3000) -> str:
        out = []
        for name in ("containerd", "snapshotter"):
            with contextlib.suppress(OSError):
                out.append(f"--- {name} log ---\n{self.log(name).read_text()[-n:]}")
        logs = [*self.snap_root.glob("logs/*/stderr.log"), self.cache_dir / "daemon.log",
                *self.snap_root.glob("config/*/config.json")] if self.snap_root.exists() else []
        for f in logs:
            with contextlib.suppress(OSError):
                out.append(f"--- {f} ---\n{f.read_text()[-n:]}")
        return "\n".join(out)

    def nydusd_pids(self) -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"erofs_nydus.service.nydusd" in cmd and any(
                    str(self.base).encode() in a for a in cmd):
                pids.append(int(d.name))
        return pids

    def close(self) -> None:
        with contextlib.suppress(Exception):
            out = self.ctr("containers", "ls", "-q", check=False).stdout.split()
            for c in out:
                self.ctr("task", "kill", "-s", "SIGKILL", c, check=False)
                self.ctr("task", "rm", "-f", c, check=False)
                self.ctr("containers", "rm", c, check=False)
        self.stop_process("containerd")
        self.stop_process("snapshotter")
        for pid in self.nydusd_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while self.nydusd_pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.nydusd_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        # whatever is still mounted under our base (overlay, erofs, shm), innermost first
        with open("/proc/self/mountinfo") as f:
            mps = [ln.split()[4] for ln in f]
        for mp in sorted((m for m in mps if m.startswith(str(self.base))), key=len,
                         reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
        from daemon_support import kill_daemon

        from erofs_nydus.service.client import DaemonClient
        from erofs_nydus.service.fscache_client import FscacheClient

        cls = FscacheClient if self.fs_driver == "fscache" else DaemonClient
        kill_daemon(cls(self.cache_dir))

    def remove_tree(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


# -- a small image: the host's sh/cat/sha256sum and 12 MiB of data ------------------------

DATA_SIZE = 6 << 20


def rootfs_files(root: Path) -> dict[str, bytes]:
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


def build_oci(work: Path, files: dict[str, bytes]) -> str:
    """umoci image with one layer holding `files` (programs executable); oci:LAYOUT:TAG."""
    from registry_fixture import run

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


def push_nydus(registry: RegistryServer, work: Path, files: dict[str, bytes],
               repo: str) -> str:
    """`files` as an OCI image REPO:oci in `registry`, converted by us to REPO:nydus."""
    from registry_fixture import run

    oci = build_oci(work, files)
    src = registry.ref(f"{repo}:oci")
    run(["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", oci,
         f"docker://{src}"])
    target = registry.ref(f"{repo}:nydus")
    run([sys.executable, "-m", "erofs_nydus.cli", "convert", "--source", src, "--target",
         target, "--plain-http", "-q", "--cache-dir", str(work / "convert-cache")],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    return target
