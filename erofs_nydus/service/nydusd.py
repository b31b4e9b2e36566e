"""`nydusd`: the entry point nydus-snapshotter starts, serving images with kernel EROFS.

nydus-snapshotter (containerd's remote snapshotter for Nydus images) runs `nydusd_path` with
nydusd's argv and drives it over nydusd's HTTP API on `--apisock`.  This module accepts those
argv forms and answers that API; the images are served the way `erofs-nydus mount` serves them:
the cache dir's daemon (started on demand, see `service.client`) registers each image, and a
file-backed EROFS mount at the asked mountpoint reads through it (fanotify pre-content), where
nydusd would mount FUSE.  The snapshotter only needs a directory tree there.

    nydusd fuse --config C --bootstrap B --mountpoint M --apisock S [...]   dedicated
    nydusd fuse --mountpoint ROOT --apisock S [...]                        shared: images
                                                                           come by the API
    nydusd singleton --fscache DIR --apisock S [...]                       fscache: images
                                                                           come by PUT
                                                                           /api/v2/blobs, the
                                                                           snapshotter mounts
                                                                           (service.nydusd_fscache;
                                                                           refused where the
                                                                           kernel lacks it)
    nydusd --version

Flags we have no use for (--thread-num, --log-rotation-size, --prefetch-files, ...) are
accepted and ignored.  This process is what the snapshotter watches (pid, and a hang-up of its
idle API connection): it exits when the cache dir's daemon that serves its mounts is gone, so the
snapshotter's recovery starts; killed itself, a restart with the same argv adopts the mounts
that are still served.

"Gone" means nothing holds the cache dir's lock any more: the keeper, the supervisor and the
worker all died (`systemctl kill`, a cgroup OOM kill).  The death of one of them is repaired
inside that group - the keeper holds the fanotify group and the lock and starts a new
supervisor, the supervisor a new worker - and the mounts keep serving the image's bytes
(readers caught in the gap get EIO), so that is not nydusd's death: exiting then would make
the snapshotter replace a working mount under running containers.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from erofs_nydus.errors import DaemonError, ErofsNydusError, UsageError
from erofs_nydus.service.nydusd_api import ApiError, NydusdApiServer
from erofs_nydus.service.nydusd_config import NydusdConfig, parse_nydusd_config

if TYPE_CHECKING:
    from erofs_nydus.service.nydusd_fscache import FscacheBindings

__all__ = ["NydusdService", "build_info", "main", "parse_argv"]

log = logging.getLogger("erofs_nydus.nydusd")

KERNEL_FANOTIFY = (6, 14)
_BUILD: dict[str, str] = {}


def build_info() -> dict[str, str]:
    """nydusd's `version` object (BuildTimeInfo): the same for `--version` and the API."""
    if _BUILD:
        return _BUILD
    from erofs_nydus.service.api import package_version

    here = os.path.dirname(os.path.abspath(__file__))
    commit = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=False)
        if out.returncode == 0 and out.stdout.strip():
            commit = out.stdout.strip()
    _BUILD.update({
        "package_ver": f"erofs-nydus {package_version()}",
        "git_commit": commit,
        "build_time": "",
        "profile": "release",
        "rustc": f"python {sys.version.split()[0]}",
    })
    return _BUILD


@dataclass
class Options:
    mode: str  # "fuse" | "singleton"
    apisock: str
    mountpoint: str | None = None
    bootstrap: str | None = None
    config: str | None = None
    fscache: str | None = None
    id: str | None = None
    supervisor: str | None = None
    upgrade: bool = False
    log_file: str | None = None
    log_level: str = "info"
    ignored: list[str] = field(default_factory=list)


def parse_argv(argv: list[str]) -> Options:
    """nydusd's argv (subcommand first, or none meaning `fuse`); UsageError if unusable."""
    ap = argparse.ArgumentParser(prog="nydusd", add_help=False, allow_abbrev=False)
    ap.add_argument("mode", nargs="?", default="fuse")
    for name in ("config", "bootstrap", "mountpoint", "apisock", "fscache", "id",
                 "supervisor", "log-file", "log-level"):
        ap.add_argument(f"--{name}", dest=name.replace("-", "_"))
    ap.add_argument("--upgrade", action="store_true")
    ns, rest = ap.parse_known_args(argv)
    if ns.mode not in ("fuse", "singleton", "daemon"):
        raise UsageError(f"nydusd: unsupported subcommand {ns.mode!r} (fuse or singleton)")
    if not ns.apisock:
        raise UsageError("nydusd: --apisock is required")
    mode = "fuse" if ns.mode == "daemon" else ns.mode
    if mode == "fuse" and not ns.mountpoint:
        raise UsageError("nydusd fuse: --mountpoint is required")
    if mode == "singleton" and not ns.fscache:
        raise UsageError("nydusd singleton: --fscache DIR is required (the only singleton "
                         "mode erofs-nydus serves)")
    if ns.bootstrap and not ns.config:
        raise UsageError("nydusd fuse: --bootstrap needs --config")
    return Options(mode=mode, apisock=ns.apisock, mountpoint=ns.mountpoint,
                   bootstrap=ns.bootstrap, config=ns.config, fscache=ns.fscache, id=ns.id,
                   supervisor=ns.supervisor, upgrade=ns.upgrade, log_file=ns.log_file,
                   log_level=(ns.log_level or "info"), ignored=list(rest))


@dataclass
class Mount:
    key: str  # the API's mountpoint ("/" for the argv image)
    target: str  # where EROFS is mounted
    bootstrap: str
    config: NydusdConfig
    fsid: str | None = None  # the image id in the daemon (its `<fsid>.boot` in the cache dir)
    made: list[str] = field(default_factory=list)  # directories we created for it, deepest first


@contextlib.contextmanager
def _cache_lock(cache_dir: str) -> Iterator[None]:
    """Serialise mount and unmount of all nydusd processes sharing a cache dir, so that one
    stopping the idle daemon (and removing what the image left) never races another that is
    registering an image with it."""
    import fcntl

    os.makedirs(cache_dir, exist_ok=True)
    fd = os.open(os.path.join(cache_dir, "nydusd.lock"),
                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _makedirs(path: str, root: str | None) -> list[str]:
    """`os.makedirs(path)`; returns the directories between `root` (excluded) and `path`,
    deepest first.  In shared mode nydusd's mountpoints are directories of its pseudo file
    system under the root, gone with the mount: ours are removed again on unmount (when
    empty).  A mount at the root itself (dedicated) removes nothing."""
    os.makedirs(path, exist_ok=True)
    made: list[str] = []
    if root is None:
        return made
    p = path
    while p != root and p.startswith(root + os.sep):
        made.append(p)
        p = os.path.dirname(p)
    return made


def _rmdirs(made: list[str]) -> None:
    for d in made:
        try:
            os.rmdir(d)
        except OSError:  # not empty (someone else's now), or gone already
            return


class NydusdService:
    """The state behind the API: our mounts, the daemon state the snapshotter polls."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.id = opts.id or str(uuid.uuid4())
        self.state = "INIT"
        self.root = os.path.abspath(opts.mountpoint) if opts.mountpoint else None
        self.mounts: dict[str, Mount] = {}
        self.lock = threading.RLock()
        self.stop_event = threading.Event()
        self.exit_code = 0
        self.keep_mounts = False  # PUT /daemon/exit: leave mounts for the next process
        self.fscache: FscacheBindings | None = None
        if opts.mode == "singleton":
            from erofs_nydus.service.nydusd_fscache import FscacheBindings

            self.fscache = FscacheBindings(os.path.abspath(opts.fscache or "."))

    # -- mounts --------------------------------------------------------------------------

    def target_of(self, key: str) -> str:
        if self.root is None:
            raise ApiError(400, "Unsupported", "fscache mode mounts nothing itself")
        if key in ("", "/"):
            return self.root
        rel = os.path.normpath(key).lstrip("/")
        if rel.startswith(".."):
            raise ApiError(400, "InvalidArgument", f"mountpoint {key!r} leaves the root")
        return os.path.join(self.root, rel)

    def mount(self, key: str, bootstrap: str, config: NydusdConfig) -> None:
        from erofs_nydus.mount import is_mountpoint, mount_erofs_file, umount
        from erofs_nydus.service.client import DaemonClient

        target = self.target_of(key)
        with self.lock, _cache_lock(config.cache_dir):
            if key in self.mounts:
                raise ApiError(409, "AlreadyExists", f"{key} is already mounted")
            config.write_credentials()
            client = DaemonClient(config.cache_dir)
            made = _makedirs(target, self.root)
            if is_mountpoint(target):
                fsid = self._served_fsid(client, target)
                if fsid is not None:  # we were restarted: the daemon still serves this mount
                    log.info("adopting %s (still served by the daemon)", target)
                    self.mounts[key] = Mount(key, target, bootstrap, config, fsid, made)
                    return
                log.warning("%s is mounted but not served: unmounting it", target)
                umount(target, lazy=True)
            try:
                info = self._register(client, bootstrap, config, target)
                try:
                    mount_erofs_file(info["bootstrap"], target, info["devices"])
                except BaseException:
                    self._detach(client, target, None)
                    raise
            except BaseException:
                _rmdirs(made)
                raise
            self.mounts[key] = Mount(key, target, bootstrap, config, str(info["fsid"]), made)
            log.info("mounted %s at %s (image %s)", bootstrap, target, info["fsid"][:12])

    @staticmethod
    def _register(client: Any, bootstrap: str, config: NydusdConfig,
                  target: str) -> dict[str, Any]:
        """Register the image with the cache dir's daemon (started if needed)."""
        from erofs_nydus.service.client import request_started

        info, _ = request_started(client, "register", bootstrap=bootstrap,
                                  backend=config.backend, mountpoint=target)
        return info

    @staticmethod
    def _served_fsid(client: Any, target: str) -> str | None:
        """The fsid of the image the cache dir's daemon serves at `target`, if any."""
        if not client.alive():
            return None
        for img in client.request("status").get("images", []):
            if target in img.get("mountpoints", []):
                return str(img["fsid"])
        return None

    def umount(self, key: str) -> None:
        with self.lock:
            m = self.mounts.pop(key, None)
            if m is None:
                raise ApiError(404, "NotFound", f"no mount at {key}")
            self._unmount(m)

    def _unmount(self, m: Mount) -> None:
        from erofs_nydus.errors import KernelError
        from erofs_nydus.mount import is_mountpoint, umount
        from erofs_nydus.service.client import DaemonClient

        with _cache_lock(m.config.cache_dir):
            if is_mountpoint(m.target):
                try:
                    umount(m.target, retries=3)
                except KernelError:
                    umount(m.target, lazy=True)
            client = DaemonClient(m.config.cache_dir)
            self._detach(client, m.target, m.fsid)
            if not is_mountpoint(m.target):
                _rmdirs(m.made)
        log.info("unmounted %s", m.target)

    @staticmethod
    def _detach(client: Any, target: str, fsid: str | None) -> None:
        """Tell the daemon a mount is gone; stop it when it serves nothing else, and then
        remove the image's stored bootstrap (the snapshotter removes the blobs' files)."""
        try:
            detached = client.request("detach", mountpoint=target)
        except DaemonError as exc:
            log.warning("detach %s: %s", target, exc)
            return
        if detached.get("remaining") == 0 and not detached.get("resident"):
            try:
                client.shutdown()
            except DaemonError:  # another user registered meanwhile: it keeps running
                return
            if fsid:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(client.paths.cache_dir, f"{fsid}.boot"))

    # -- fscache mode: blob entries ---------------------------------------------------------

    def _bindings(self) -> FscacheBindings:
        if self.fscache is None:
            raise ApiError(400, "Unsupported", "blob entries are for fscache mode "
                           "(nydusd singleton --fscache DIR)")
        return self.fscache

    def bind_blob(self, body: bytes) -> None:
        from erofs_nydus.service.nydusd_config import parse_blob_request

        b = self._bindings()
        req = parse_blob_request(body, b.cache_dir)
        with self.lock:
            b.bind(req)

    def unbind_blob(self, domain_id: str | None, blob_id: str | None) -> None:
        b = self._bindings()
        with self.lock:
            b.unbind(domain_id, blob_id)

    def blob_entries(self) -> list[dict[str, Any]]:
        from erofs_nydus.service.nydusd_fscache import LABEL_ROOT

        b = self._bindings()
        with self.lock:
            entries = b.entries()
        return [{"type": "bootstrap", "id": img["fsid"],
                 "domain_id": lb[len(LABEL_ROOT) + 1:].rsplit("/", 1)[0],
                 "config": {"metadata_path": img.get("bootstrap", "")}}
                for lb, img in sorted(entries.items())]

    def unmount_all(self) -> None:
        with self.lock:
            for key in list(self.mounts):
                m = self.mounts.pop(key)
                try:
                    self._unmount(m)
                except ErofsNydusError as exc:
                    log.error("unmount %s: %s", m.target, exc)

    def cache_dirs(self) -> set[str]:
        with self.lock:
            dirs = {m.config.cache_dir for m in self.mounts.values()}
            if self.fscache is not None and self.fscache.started:
                dirs.add(self.fscache.cache_dir)
            return dirs

    def takeover(self) -> None:
        """Failover (`--upgrade`): adopt the argv image's mount, still served by the cache
        dir's daemon (or mount it again); the snapshotter then sends `start`."""
        if self.opts.bootstrap and self.opts.config and "/" not in self.mounts:
            self.mount("/", os.path.abspath(self.opts.bootstrap), self.argv_config())
        self.state = "READY"

    def argv_config(self) -> NydusdConfig:
        assert self.opts.config is not None
        with open(self.opts.config, "rb") as f:
            return parse_nydusd_config(f.read())

    # -- status ----------------------------------------------------------------------------

    def daemon_info(self) -> dict[str, Any]:
        return {"id": self.id, "version": build_info(), "state": self.state,
                "backend_collection": {}}

    def status_of(self, cache_dir: str) -> dict[str, Any]:
        from erofs_nydus.service.client import DaemonClient

        try:
            return DaemonClient(cache_dir).request("status", timeout=10.0)
        except DaemonError:
            return {}

    def fs_metrics(self) -> dict[str, Any]:
        read = 0
        for cdir in self.cache_dirs():
            m = self.status_of(cdir).get("metrics", {})
            read += int(m.get("bytes_fetched", 0))
        return {"files_account_enabled": False, "access_pattern_enabled": False,
                "measure_latency": False, "id": self.id, "data_read": read,
                "block_count_read": [0] * 11, "fop_hits": [0] * 12, "fop_errors": [0] * 12,
                "fop_cumulative_latency_total": [0] * 12, "read_latency_dist": [0] * 8,
                "nr_opens": 0}

    def cache_metrics(self) -> dict[str, Any]:
        files: list[str] = []
        hits = total = 0
        store = ""
        for cdir in sorted(self.cache_dirs()):
            store = store or cdir
            st = self.status_of(cdir)
            files += [os.path.join(cdir, f"{b}.blob.data") for b in st.get("blobs", {})]
            m = st.get("metrics", {})
            hits += int(m.get("hits", 0))
            total += int(m.get("reads", 0))
        return {"id": self.id, "underlying_files": files, "store_path": store,
                "partial_hits": 0, "whole_hits": hits, "total": total,
                "entries_count": len(files), "prefetch_data_amount": 0,
                "prefetch_requests_count": 0, "prefetch_workers": 0,
                "prefetch_cumulative_time_millis": 0, "prefetch_begin_time_secs": 0,
                "prefetch_end_time_secs": 0, "buffered_backend_size": 0}

    # -- lifetime ------------------------------------------------------------------------

    def request_stop(self, code: int = 0, *, keep_mounts: bool = False) -> None:
        self.exit_code = code
        self.keep_mounts = keep_mounts
        self.stop_event.set()

    def watch_daemons(self, interval: float = 1.0) -> None:
        """Exit (so the snapshotter recovers) when a daemon serving our mounts is gone:
        no process holds its cache dir's lock (the keeper keeps it while it replaces a
        dead supervisor, which is no reason to exit)."""
        from erofs_nydus.service.client import DaemonClient

        while not self.stop_event.wait(interval):
            if self.fscache is not None:
                with self.lock:
                    gone = self.fscache.daemon_gone()
                if gone:
                    log.error("the fscache daemon for %s is gone: exiting so that the "
                              "snapshotter recovers", self.fscache.cache_dir)
                    self.request_stop(1, keep_mounts=True)
                    return
            for cdir in self.cache_dirs():
                if self.fscache is not None and cdir == self.fscache.cache_dir:
                    continue
                if not DaemonClient(cdir).supervisor_running():
                    log.error("the daemon for %s is gone: exiting so that the mounts are "
                              "recovered", cdir)
                    with self.lock:
                        for m in self.mounts.values():
                            if m.config.cache_dir == cdir:
                                from erofs_nydus.mount import umount

                                with contextlib.suppress(ErofsNydusError):
                                    umount(m.target, lazy=True)
                    self.request_stop(1, keep_mounts=True)
                    return


def _fanotify_unsupported() -> str | None:
    import platform

    parts = [int("".join(c for c in p if c.isdigit()) or 0)
             for p in platform.release().split(".")[:2]]
    ver = [*parts, 0, 0][:2]
    if tuple(ver) < KERNEL_FANOTIFY:
        return (f"nydusd: Linux {ver[0]}.{ver[1]} lacks fanotify pre-content events "
                "(needs >= 6.14): erofs-nydus cannot serve fusedev mounts on this kernel")
    return None


def _setup_logging(opts: Options) -> None:
    level = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
             "warn": logging.WARNING, "error": logging.ERROR}.get(opts.log_level.lower(),
                                                                  logging.INFO)
    handler: logging.Handler
    if opts.log_file:
        os.makedirs(os.path.dirname(os.path.abspath(opts.log_file)), exist_ok=True)
        handler = logging.FileHandler(opts.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s nydusd[%(process)d] "
                                           "%(message)s"))
    root = logging.getLogger("erofs_nydus")
    root.addHandler(handler)
    root.setLevel(level)


def run(opts: Options) -> int:
    svc = NydusdService(opts)
    if svc.fscache is not None:
        from erofs_nydus.service.nydusd_fscache import fscache_unusable

        why_not = fscache_unusable(svc.fscache.cache_dir)
    else:
        why_not = _fanotify_unsupported()
    if why_not is not None:
        raise UsageError(why_not)
    server = NydusdApiServer(opts.apisock, svc)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: svc.request_stop(0))
    server.start()
    try:
        if opts.bootstrap and opts.config and not opts.upgrade:
            svc.mount("/", os.path.abspath(opts.bootstrap), svc.argv_config())
        if not opts.upgrade:
            svc.state = "RUNNING"
        else:
            svc.state = "INIT"  # waits for takeover + start
        watcher = threading.Thread(target=svc.watch_daemons, name="watch", daemon=True)
        watcher.start()
        while not svc.stop_event.wait(3600):
            pass
    finally:
        if not svc.keep_mounts:
            svc.unmount_all()
            if svc.fscache is not None:
                with svc.lock:
                    svc.fscache.release_unmounted()
        svc.state = "DESTROYED"
        server.stop()
    return svc.exit_code


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("--version", "-V", "-v"):
        info = build_info()
        print(f"Version: \t{info['package_ver']}")
        print(f"Git Commit: \t{info['git_commit']}")
        print(f"Build Time: \t{info['build_time']}")
        print(f"Profile: \t{info['profile']}")
        print(f"Rustc: \t\t{info['rustc']}")
        sys.exit(0)
    try:
        opts = parse_argv(args)
        _setup_logging(opts)
        log.info("started: nydusd %s", " ".join(args))
        code = run(opts)
    except (ErofsNydusError, OSError) as exc:
        msg = str(exc)
        msg = msg if msg.startswith("nydusd") else f"nydusd: {msg}"
        if any(isinstance(h, logging.FileHandler)
               for h in logging.getLogger("erofs_nydus").handlers):
            log.error("%s", msg)  # the snapshotter shows the log file, not our stderr
        print(msg, file=sys.stderr)
        sys.exit(1)
    time.sleep(0)
    sys.exit(code)


if __name__ == "__main__":
    main()
