"""What a daemon serves: registered images, their blobs, and the persisted state.

Kernel-interface independent apart from two hooks (`mark`, `unmark`) the request
source supplies: fanotify marks each incomplete cache file before it is mounted and
unmarks it once complete; fscache would pass no-ops.

State lives in `<cache-dir>/daemon-state.json` (written atomically after every change)
and names, per image: the bootstrap copy `<cache-dir>/<fsid>.boot`, the backend spec,
the amplification size and the mountpoints using it.  A restarted daemon rebuilds
everything from it: cache files and chunk maps are re-verified, marks re-added.
Blobs are shared: two images (or two mounts of one image) naming the same blob id
use one cache file and one `BlobServer`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from erofs_nydus.daemon import heap
from erofs_nydus.daemon.blobcache import BlobCacheFile, cache_dir_lock, cache_paths
from erofs_nydus.daemon.core import DEFAULT_AMPLIFY, BlobServer, Metrics
from erofs_nydus.errors import BackendError, DaemonError, UnsupportedError, UsageError
from erofs_nydus.fsutil import atomic_write, open_private
from erofs_nydus.rafs.backend import BlobBackend, LocalDirBackend
from erofs_nydus.rafs.image import RafsImage
from erofs_nydus.rafs.reader import load_image

__all__ = ["REQUEST_LIMITS", "STATE_FILE", "ImageEntry", "ImageTable", "TableSnapshot",
           "make_backend", "request_number", "requested_fsid"]

STATE_FILE = "daemon-state.json"
log = logging.getLogger("erofs_nydus.daemon")

Hook = Callable[[BlobServer], None]


def make_backend(spec: dict[str, Any]) -> BlobBackend:
    kind = spec.get("type")
    if kind == "local":
        return LocalDirBackend(str(spec["dir"]))
    if kind == "registry":
        from erofs_nydus.registry.backend import RegistryBackend  # httpx only when used

        return RegistryBackend.from_spec(spec)
    raise UnsupportedError(f"unknown blob backend {kind!r}")


_preloaded = threading.Event()


def _preload_registry() -> None:
    """Import the registry client (httpx, httpcore: ~0.5 s) in the background once per
    process, so the first registry image registers without that wait (the CLI starts
    the daemon while it fetches the bootstrap)."""
    if _preloaded.is_set():
        return
    _preloaded.set()

    def load() -> None:
        try:
            import httpcore  # noqa: F401  (httpx imports it on the first Client)

            import erofs_nydus.registry.backend  # noqa: F401
        except Exception as exc:  # reported again, properly, when a backend is made
            log.debug("registry client preload failed: %s", exc)

    threading.Thread(target=load, name="registry-preload", daemon=True).start()


def _check_backend(spec: dict[str, Any], blob_id: str, compressed_size: int) -> None:
    """Refuse early what cannot work: a local blob that is missing or too short."""
    if spec.get("type") != "local":
        return
    path = os.path.join(str(spec["dir"]), blob_id)
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise BackendError(f"blob {blob_id} not found in {spec['dir']}: {exc.strerror}") from exc
    if size < compressed_size:
        raise BackendError(
            f"blob {path} is truncated: {size} bytes, the image needs {compressed_size}"
        )


@dataclass
class ImageEntry:
    fsid: str
    bootstrap: str  # the copy in the cache dir
    blob_ids: list[str]
    backend: dict[str, Any]
    amplify: int = DEFAULT_AMPLIFY
    mountpoints: list[str] = field(default_factory=list)
    # prefetch settings of the register request ("enable", "threads", "bandwidth"), so a
    # restarted daemon resumes prefetching the way the mount asked
    prefetch: dict[str, Any] = field(default_factory=dict)


# Bounds of the numbers a control request may carry (inclusive).  Requests come from
# local clients: a negative amplification or a million prefetch threads is refused
# with one line instead of reaching the core.
REQUEST_LIMITS: dict[str, tuple[float, float]] = {
    "amplify": (0, 1 << 30),
    "prefetch_threads": (1, 256),
    "prefetch_bandwidth": (0, 1 << 48),
    "deadline": (0.1, 24 * 3600.0),
    "retries": (0, 100),
}


def request_number(req: dict[str, Any], key: str, default: float, *, integer: bool = True,
                   ) -> Any:
    """`req[key]` (or `default`) checked against REQUEST_LIMITS; UsageError otherwise."""
    raw = req.get(key, default)
    lo, hi = REQUEST_LIMITS[key]
    ok_type = isinstance(raw, int) if integer else isinstance(raw, int | float)
    if isinstance(raw, bool) or not ok_type:
        raise UsageError(f"{key}={raw!r}: expected {'an integer' if integer else 'a number'}")
    if not lo <= raw <= hi:  # also refuses NaN
        raise UsageError(f"{key}={raw!r} is out of range [{lo:g}, {hi:g}]")
    return int(raw) if integer else float(raw)


_FSID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def requested_fsid(req: dict[str, Any]) -> str | None:
    """The register request's ``fsid``: the name the caller's mount will use for the image
    (nydus-snapshotter mounts ``fsid=<its id>`` itself), or None for the content digest.
    Letters, digits, ``-`` and ``_`` only: it becomes a mount option value, a cookie key
    (``.`` separates a second mount's suffix) and a file name."""
    raw = req.get("fsid")
    if raw is None:
        return None
    if not isinstance(raw, str) or not _FSID.fullmatch(raw):
        raise UsageError(f"fsid={raw!r}: 1-128 letters, digits, '-' or '_'")
    return raw


def prefetch_settings(req: dict[str, Any]) -> dict[str, Any]:
    """The prefetch part of a register request, as stored with the image."""
    return {"enable": bool(req.get("prefetch", True)),
            "threads": request_number(req, "prefetch_threads", 4),
            "bandwidth": request_number(req, "prefetch_bandwidth", 0)}


@dataclass(frozen=True)
class TableSnapshot:
    """The table's maps copied in one go under its lock (`ImageTable.snapshot`): readers
    iterate them without holding the lock.  Entries and servers are the live objects."""

    images: dict[str, ImageEntry]
    blobs: dict[str, BlobServer]
    marked: frozenset[str]


class ImageTable:
    """Thread-safe registry of images and blob servers for one cache dir."""

    def __init__(
        self,
        cache_dir: str,
        *,
        mark: Hook | None = None,
        unmark: Hook | None = None,
        durable: bool = True,
    ) -> None:
        self.cache_dir = os.path.abspath(cache_dir)
        # Cache-file fds a restarted daemon got back from the supervisor (blob id -> fd):
        # opened before their file was marked, so writes through them raise no events.
        self.kept_fds: dict[str, int] = {}
        self.adopted: set[str] = set()  # blobs opened from kept_fds
        self.mark = mark
        self.unmark = unmark
        self.durable = durable
        self.metrics = Metrics()
        self.images: dict[str, ImageEntry] = {}
        self.blobs: dict[str, BlobServer] = {}
        self.marked: set[str] = set()
        self._by_dev_ino: dict[tuple[int, int], BlobServer] = {}
        self._lock = threading.RLock()
        heap.configure()  # bootstraps' buffers go back to the system when freed
        _preload_registry()

    # -- lookups (hot path) ------------------------------------------------------------

    def lookup(self, dev: int, ino: int) -> BlobServer | None:
        return self._by_dev_ino.get((dev, ino))

    def mountpoints(self) -> list[str]:
        with self._lock:
            return [mp for e in self.images.values() for mp in e.mountpoints]

    def snapshot(self) -> TableSnapshot:
        """Images, blob servers and marked blob ids, consistent with each other."""
        with self._lock:
            return TableSnapshot(dict(self.images), dict(self.blobs), frozenset(self.marked))

    # -- blobs -------------------------------------------------------------------------

    def _open_blob(self, image: RafsImage, idx: int, entry: ImageEntry) -> BlobServer:
        info = image.blobs[idx]
        srv = self.blobs.get(info.blob_id)
        if srv is not None:
            added = srv.add_chunks(image.chunks_for_blob(idx))
            if (
                added
                and info.blob_id not in self.marked
                and not srv.cache.complete()
                and self.mark is not None
            ):
                self.mark(srv)
                self.marked.add(info.blob_id)
            return srv
        fd = self._adopt_fd(info.blob_id)
        try:
            cache = BlobCacheFile(
                self.cache_dir, info, image.chunks_for_blob(idx), fd=fd, durable=self.durable
            )
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        if fd is not None:
            self.adopted.add(info.blob_id)
        srv = BlobServer(
            cache, make_backend(entry.backend), amplify=entry.amplify, metrics=self.metrics
        )
        self.blobs[info.blob_id] = srv
        self._by_dev_ino[cache.dev_ino] = srv
        if cache.complete():
            if self.unmark is not None:
                self.unmark(srv)  # a stale mark from before a crash costs every read
        elif self.mark is not None:
            self.mark(srv)
            self.marked.add(info.blob_id)
        return srv

    def _adopt_fd(self, blob_id: str) -> int | None:
        """The kept fd for `blob_id` if it is still the cache file's (not replaced)."""
        fd = self.kept_fds.pop(blob_id, None)
        if fd is None:
            return None
        data_path, _ = cache_paths(self.cache_dir, blob_id)
        try:
            a, b = os.fstat(fd), os.stat(data_path)
            if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
                return fd
        except OSError:
            pass
        os.close(fd)
        return None

    def close_kept_fds(self) -> None:
        """Close kept fds no restored blob took."""
        for fd in self.kept_fds.values():
            os.close(fd)
        self.kept_fds.clear()

    def blob_complete(self, srv: BlobServer) -> None:
        """Called by the request source after a fill left the blob complete."""
        with self._lock:
            if srv.blob_id in self.marked and srv.cache.complete():
                self.marked.discard(srv.blob_id)
                if self.unmark is not None:
                    self.unmark(srv)
                log.info("blob %s complete: unmarked", srv.blob_id[:12])

    def _release_blob(self, blob_id: str, *, unmark: bool = True) -> None:
        srv = self.blobs.pop(blob_id)
        self._by_dev_ino.pop(srv.cache.dev_ino, None)
        if blob_id in self.marked and unmark:
            self.marked.discard(blob_id)
            if self.unmark is not None:
                self.unmark(srv)
        srv.backend.close()
        srv.close()

    # -- images ------------------------------------------------------------------------

    def _load(self, entry: ImageEntry) -> RafsImage:
        with os.fdopen(open_private(entry.bootstrap, os.O_RDONLY), "rb") as f:
            data = f.read()
        return load_image(data)

    def register(
        self,
        bootstrap: str,
        backend: dict[str, Any],
        mountpoint: str,
        *,
        amplify: int = DEFAULT_AMPLIFY,
        prefetch: dict[str, Any] | None = None,
        fsid: str | None = None,
    ) -> dict[str, Any]:
        """Validate and register an image for `mountpoint`; return what to mount.

        `fsid`: register the image under this name instead of its content digest (see
        :func:`requested_fsid`).  A name registered for other bytes is refused while it
        has mounts, and replaced when it has none.

        Raises FormatError for a bootstrap that fails validation, BackendError when a
        local blob is missing or truncated; nothing is registered then.
        """
        try:
            return self._register(bootstrap, backend, mountpoint, amplify=amplify,
                                  prefetch=prefetch, fsid=fsid)
        finally:
            heap.trim()  # the bootstrap and its parse are garbage now (heap.py)

    def _register(
        self,
        bootstrap: str,
        backend: dict[str, Any],
        mountpoint: str,
        *,
        amplify: int,
        prefetch: dict[str, Any] | None,
        fsid: str | None,
    ) -> dict[str, Any]:
        with open(bootstrap, "rb") as f:
            data = f.read()
        image = load_image(data)
        named = fsid is not None
        fsid = fsid or image.fsid or hashlib.sha256(data).hexdigest()
        for b in image.blobs:
            _check_backend(backend, b.blob_id, b.compressed_size)
        mountpoint = os.path.abspath(mountpoint)
        with cache_dir_lock(self.cache_dir, exclusive=False), self._lock:
            for e in self.images.values():
                if mountpoint in e.mountpoints:
                    if self._is_our_mount(mountpoint, e):
                        raise DaemonError(
                            f"{mountpoint} is already mounted from image {e.fsid[:12]}"
                        )
                    self.detach(mountpoint)  # left over from a failed mount
                    break
            boot = os.path.join(self.cache_dir, f"{fsid}.boot")
            if named:
                self._replace_named(fsid, boot, data)
            if not os.path.exists(boot):
                atomic_write(boot, data, mode=0o600)
            entry = self.images.get(fsid)
            new = entry is None
            if entry is None:
                entry = ImageEntry(
                    fsid, boot, [b.blob_id for b in image.blobs], dict(backend), amplify,
                    prefetch=dict(prefetch or {}),
                )
            opened: list[str] = []
            try:
                for idx, b in enumerate(image.blobs):
                    if b.blob_id not in self.blobs:
                        opened.append(b.blob_id)
                    self._open_blob(image, idx, entry)
            except BaseException:
                for bid in opened:
                    if bid in self.blobs:
                        self._release_blob(bid)
                raise
            entry.mountpoints.append(mountpoint)
            if new:
                self.images[fsid] = entry
            try:
                self.save_state()
            except DaemonError:
                self.detach(mountpoint)
                raise
            return {
                "fsid": fsid,
                "bootstrap": boot,
                "devices": [self.blobs[b].cache.data_path for b in entry.blob_ids],
            }

    def _replace_named(self, fsid: str, boot: str, data: bytes) -> None:
        """A caller-named image whose stored bootstrap differs from `data`: refused while
        mounted, else forgotten (its copy is rewritten by the caller)."""
        try:
            with os.fdopen(open_private(boot, os.O_RDONLY), "rb") as f:
                same = f.read() == data
        except FileNotFoundError:
            same = True
        if same:
            return
        entry = self.images.get(fsid)
        if entry is not None and entry.mountpoints:
            raise DaemonError(f"fsid {fsid} is registered for another image "
                              f"(mounts: {', '.join(entry.mountpoints)})")
        if entry is not None:
            del self.images[fsid]
        log.info("fsid %.12s now names another image", fsid)
        os.unlink(boot)

    def detach(self, mountpoint: str) -> int:
        """Forget `mountpoint`; release images and blobs nobody uses.  Return mounts left."""
        mountpoint = os.path.abspath(mountpoint)
        with self._lock:
            for fsid, e in list(self.images.items()):
                if mountpoint in e.mountpoints:
                    e.mountpoints.remove(mountpoint)
                    if not e.mountpoints:
                        del self.images[fsid]
                    break
            else:
                raise DaemonError(f"{mountpoint} is not served by this daemon")
            used = {b for e in self.images.values() for b in e.blob_ids}
            released = [b for b in self.blobs if b not in used]
            for bid in released:
                self._release_blob(bid)
            self.save_state(strict=False)
            if released:
                heap.trim()  # their chunk indexes
            return len(self.mountpoints())

    def _is_our_mount(self, mountpoint: str, entry: ImageEntry) -> bool:
        from erofs_nydus.mount import mount_fstype

        return mount_fstype(mountpoint) == "erofs"

    def prune_stale(self) -> list[str]:
        """Forget mountpoints that are not mounted (e.g. after a reboot); return them."""
        stale = [
            mp
            for e in list(self.images.values())
            for mp in e.mountpoints
            if not self._is_our_mount(mp, e)
        ]
        for mp in stale:
            log.info("forgetting stale mountpoint %s", mp)
            self.detach(mp)
        return stale

    # -- persistence -------------------------------------------------------------------

    @property
    def state_path(self) -> str:
        return os.path.join(self.cache_dir, STATE_FILE)

    def save_state(self, *, strict: bool = True) -> None:
        """Write the state file atomically.  `strict=False` logs a failure instead
        (a detach must complete even on a full disk; the stale entry is pruned on
        the next fresh start)."""
        with self._lock:
            doc = {"version": 1, "images": [asdict(e) for e in self.images.values()]}
            try:
                atomic_write(self.state_path, json.dumps(doc, indent=1).encode(), mode=0o600)
            except OSError as exc:
                if strict:
                    raise DaemonError(f"cannot save {self.state_path}: {exc.strerror}") from exc
                log.error("cannot save %s: %s", self.state_path, exc)

    def load_state(self) -> None:
        """Rebuild images and blob servers after a daemon (re)start."""
        try:
            self._load_state()
        finally:
            heap.trim()  # the bootstraps and their parses are garbage now (heap.py)

    def _load_state(self) -> None:
        try:
            with os.fdopen(open_private(self.state_path, os.O_RDONLY), encoding="utf-8") as f:
                doc = json.load(f)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            aside = f"{self.state_path}.corrupt"
            log.error("unreadable state file %s (%s); moved to %s", self.state_path, exc, aside)
            with contextlib.suppress(OSError):
                os.replace(self.state_path, aside)
            return
        with cache_dir_lock(self.cache_dir, exclusive=False), self._lock:
            for raw in doc.get("images", []):
                try:
                    entry = ImageEntry(**raw)
                    image = self._load(entry)
                    for idx in range(len(image.blobs)):
                        self._open_blob(image, idx, entry)
                except Exception as exc:
                    what = raw.get("fsid", "?") if isinstance(raw, dict) else raw
                    log.error("cannot restore image %.12s: %s", what, exc)
                    continue
                self.images[entry.fsid] = entry
                log.info(
                    "restored image %s (%d blobs, mounts %s)",
                    entry.fsid[:12],
                    len(entry.blob_ids),
                    entry.mountpoints,
                )

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "images": [asdict(e) for e in self.images.values()],
                "blobs": {
                    bid: {
                        "size": s.cache.size,
                        "present": s.cache.present_bytes(),
                        "complete": s.cache.complete(),
                        "marked": bid in self.marked,
                        "path": s.cache.data_path,
                    }
                    for bid, s in self.blobs.items()
                },
                "metrics": self.metrics.snapshot(),
            }

    def close(self) -> None:
        """Close files.  Marks stay: a mount may outlive this daemon, and only the
        group fd's owner (the supervisor) may let its reads through."""
        with self._lock:
            self.close_kept_fds()
            for bid in list(self.blobs):
                self._release_blob(bid, unmark=False)
