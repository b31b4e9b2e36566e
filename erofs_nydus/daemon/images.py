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
import stat
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from erofs_nydus.daemon import heap
from erofs_nydus.daemon.blobcache import BlobCacheFile, cache_dir_lock, cache_paths
from erofs_nydus.daemon.core import DEFAULT_AMPLIFY, BlobServer, Metrics
from erofs_nydus.errors import (
    BackendError,
    DaemonError,
    FormatError,
    SourceError,
    UnsafePathError,
    UnsupportedError,
    UsageError,
)
from erofs_nydus.fsutil import atomic_write, open_private
from erofs_nydus.rafs.backend import BlobBackend, LocalDirBackend
from erofs_nydus.rafs.image import RafsImage
from erofs_nydus.rafs.reader import BootstrapReader, LoadedBootstrap

__all__ = ["REQUEST_LIMITS", "STATE_FILE", "VERDICT_FILE", "ImageEntry", "ImageTable",
           "TableSnapshot", "Verdicts", "make_backend", "read_bootstrap_bounded",
           "request_number", "requested_fsid", "validate_bootstrap"]

STATE_FILE = "daemon-state.json"
VERDICT_FILE = "verified-bootstraps"
MAX_BOOTSTRAP_SIZE = 1 << 30  # metadata of tens of millions of files
_STORED_BOOT = re.compile(r"[0-9a-f]{64}\.boot")
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
#: seconds a new daemon waits before loading the registry stack in the background: the
#: mount that started it registers first, without sharing the interpreter with ~0.3 s
#: of imports it does not need (a `mount REF` meanwhile imports what it needs itself)
PRELOAD_DELAY = 0.5


def _preload_registry() -> None:
    """Import the registry client and resolver (httpx, httpcore: ~0.3 s) in the
    background once per process, shortly after start, so that a `mount REF` (the
    daemon resolves references) or a registry image registered later finds them
    loaded."""
    if _preloaded.is_set():
        return
    _preloaded.set()

    def load() -> None:
        try:
            import httpcore  # noqa: F401  (httpx imports it on the first Client)

            import erofs_nydus.registry.backend
            import erofs_nydus.registry.resolve  # noqa: F401
        except Exception as exc:  # reported again, properly, when a backend is made
            log.debug("registry client preload failed: %s", exc)

    timer = threading.Timer(PRELOAD_DELAY, load)
    timer.name = "registry-preload"
    timer.daemon = True
    timer.start()


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


class Verdicts:
    """sha256 digests of bootstraps that passed the full reader validation.

    Kept in memory and in `<cache-dir>/verified-bootstraps` (one digest a line), so a
    remount - also by a restarted daemon - skips the tree walk.  The file is trusted
    only as far as the cache dir is: it must be a regular file owned by this user and
    writable by nobody else, else it is ignored (and rewritten).  Whoever could write
    it could as well replace the state file or the bootstrap copies.
    """

    def __init__(self, cache_dir: str) -> None:
        self.path = os.path.join(cache_dir, VERDICT_FILE)
        self._ok: set[str] = set()
        self._lock = threading.Lock()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return
        try:
            st = os.fstat(fd)
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid()
                    or st.st_mode & 0o022 or st.st_size > 1 << 20):
                log.warning("ignoring %s: not a private file of ours", self.path)
                return
            raw = os.read(fd, st.st_size).decode("ascii", "replace")
        finally:
            os.close(fd)
        self._ok = {w for w in raw.split() if re.fullmatch(r"[0-9a-f]{64}", w)}

    def __contains__(self, digest: str) -> bool:
        with self._lock:
            return digest in self._ok

    def add(self, digest: str) -> None:
        with self._lock:
            if digest in self._ok:
                return
            self._ok.add(digest)
            doc = "".join(f"{d}\n" for d in sorted(self._ok)).encode()
        try:
            atomic_write(self.path, doc, mode=0o600)
        except OSError as exc:  # the verdict stays in memory
            log.warning("cannot save %s: %s", self.path, exc)


def validate_bootstrap(data: bytes, verdicts: Verdicts | None = None,
                       name: str = "bootstrap") -> RafsImage:
    """Parse `data` with the full reader validation (superblocks, tables and the whole
    tree: what the kernel will walk once it is mounted); raise UnsupportedError for a
    refused feature, FormatError naming the first problem.  A digest in `verdicts` skips
    the tree walk; a pass is added."""
    digest = hashlib.sha256(data).hexdigest()
    reader = BootstrapReader(data, name)
    if reader.refused:  # a feature that changes what a byte means: not ours to serve
        raise UnsupportedError(f"{name}: unsupported: {reader.refused[0]}")
    if verdicts is not None and digest in verdicts:
        problems = reader.problems(walk=False)
    else:
        problems = reader.problems()
    if problems:
        raise FormatError(f"{name}: {problems[0]}")
    if verdicts is not None:
        verdicts.add(digest)
    return reader.image


def read_bootstrap_bounded(path: str, *, private: bool = False) -> bytes:
    """A bootstrap's bytes: a regular file of at most MAX_BOOTSTRAP_SIZE (the daemon
    holds it in memory; /dev/zero or a runaway file must not take it down).  `private`:
    a file in our cache dir, opened relative to its directory without following a
    symlink (`fsutil.open_private`)."""
    try:
        fd = (open_private(path, os.O_RDONLY) if private
              else os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))  # FIFO: no hang
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SourceError(f"{path}: a bootstrap must be a regular file")
            data = b"" if st.st_size > MAX_BOOTSTRAP_SIZE else f.read(MAX_BOOTSTRAP_SIZE + 1)
            if st.st_size > MAX_BOOTSTRAP_SIZE or len(data) > MAX_BOOTSTRAP_SIZE:
                raise FormatError(f"{path}: bootstrap larger than {MAX_BOOTSTRAP_SIZE} bytes")
    except UnsafePathError:
        raise
    except OSError as exc:  # unreadable is not corrupt (as reader.read_bootstrap_bytes)
        raise SourceError(f"{path}: cannot read bootstrap: {exc.strerror}") from exc
    return data


def _holds(path: str, data: bytes) -> bool:
    """`path` in our cache dir is a regular file of ours holding exactly `data` (a
    symlink or a foreign file does not: atomic_write replaces it)."""
    try:
        with os.fdopen(open_private(path, os.O_RDONLY), "rb") as f:
            return f.read(len(data) + 1) == data
    except OSError:
        return False


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
    # sha256 of the validated bootstrap when `fsid` is a caller's name for it (nydusd
    # singleton); "" when the fsid is that digest itself
    digest: str = ""

    @property
    def content_digest(self) -> str:
        return self.digest or self.fsid


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
        # set by a restarted daemon: the fanotify group survived, so a cache file it
        # reopens itself (not adopted) may be marked and cannot be read back at start-up
        self.restarted = False
        self.mark = mark
        self.unmark = unmark
        self.durable = durable
        self.metrics = Metrics()
        self.images: dict[str, ImageEntry] = {}
        self.blobs: dict[str, BlobServer] = {}
        self.marked: set[str] = set()
        self.verdicts = Verdicts(self.cache_dir)
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
                self.cache_dir, info, image.chunks_for_blob(idx), fd=fd, durable=self.durable,
                readable=fd is not None or not self.restarted,
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
        """A stored bootstrap of the state file (opened without following a symlink),
        checked against its name and validated."""
        data = read_bootstrap_bounded(entry.bootstrap, private=True)
        if hashlib.sha256(data).hexdigest() != entry.content_digest:
            raise FormatError(f"{entry.bootstrap}: content does not match image {entry.fsid}")
        return validate_bootstrap(data, self.verdicts, os.path.basename(entry.bootstrap))

    def _check_stored(self, path: str, data: bytes) -> None:
        """A `<sha256>.boot` in our cache dir must hold what its name says (a planted or
        damaged copy would be mounted as the image the name promises)."""
        name = os.path.basename(path)
        if os.path.dirname(os.path.abspath(path)) != self.cache_dir or not _STORED_BOOT.fullmatch(
                name):
            return
        if hashlib.sha256(data).hexdigest() != name[:-len(".boot")]:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise FormatError(f"{path}: stored bootstrap does not match its sha256 name "
                              "(removed; mount again to fetch it)")

    def register(
        self,
        bootstrap: str,
        backend: dict[str, Any],
        mountpoint: str,
        *,
        amplify: int = DEFAULT_AMPLIFY,
        prefetch: dict[str, Any] | None = None,
        fsid: str | None = None,
        loaded: LoadedBootstrap | None = None,
    ) -> dict[str, Any]:
        """Validate and register an image for `mountpoint`; return what to mount.

        `fsid`: register the image under this name instead of its content digest (see
        :func:`requested_fsid`).  A name registered for other bytes is refused while it
        has mounts, and replaced when it has none.

        `loaded`: the same file read already (by `resolve` in this process), taken
        while the file is unchanged instead of reading it again; its parse is taken
        only when it was the full validation (``loaded.full``), else `data` is
        validated here as any other bootstrap.  What is registered and stored is
        always the bytes that were validated.

        Raises FormatError for a bootstrap that fails validation, BackendError when a
        local blob is missing or truncated; nothing is registered then.
        """
        try:
            return self._register(bootstrap, backend, mountpoint, amplify=amplify,
                                  prefetch=prefetch, fsid=fsid, loaded=loaded)
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
        loaded: LoadedBootstrap | None,
    ) -> dict[str, Any]:
        if loaded is not None and loaded.matches(bootstrap):
            data = loaded.data
            self._check_stored(bootstrap, data)
            image = (loaded.image if loaded.full else
                     validate_bootstrap(data, self.verdicts, os.path.basename(bootstrap)))
        else:
            data = read_bootstrap_bounded(bootstrap)
            self._check_stored(bootstrap, data)
            image = validate_bootstrap(data, self.verdicts, os.path.basename(bootstrap))
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
            if not _holds(boot, data):  # missing, or planted / damaged: ours replaces it
                atomic_write(boot, data, mode=0o600)
            entry = self.images.get(fsid)
            new = entry is None
            if entry is None:
                sha = hashlib.sha256(data).hexdigest()
                entry = ImageEntry(
                    fsid, boot, [b.blob_id for b in image.blobs], dict(backend), amplify,
                    prefetch=dict(prefetch or {}), digest="" if sha == fsid else sha,
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

    def stored_bootstrap(self, fsid: str) -> str | None:
        """Path of a registered image's bootstrap copy if it still holds the bytes that
        were validated (its sha256 is the entry's content digest); None otherwise
        (logged)."""
        entry = self.images.get(fsid)
        if entry is None:
            return None
        try:
            with os.fdopen(open_private(entry.bootstrap, os.O_RDONLY), "rb") as f:
                ok = hashlib.file_digest(f, "sha256").hexdigest() == entry.content_digest
        except OSError as exc:
            log.error("stored bootstrap %s: %s", entry.bootstrap, exc)
            return None
        if not ok:
            log.error("stored bootstrap %s changed since it was validated: not served",
                      entry.bootstrap)
            return None
        return entry.bootstrap

    def verify_cached(self) -> dict[str, Any]:
        """Re-digest every present chunk of every blob served; drop bad ones for re-fetch
        (and mark their blob again so the next read of them is filled)."""
        out: dict[str, Any] = {"blobs": 0, "chunks": 0, "dropped": {}}
        with self._lock:
            servers = list(self.blobs.values())
        for srv in servers:
            with srv.cache.lock:
                present = sum(1 for index, _, _ in srv.cache.chunks.extents()
                              if index in srv.cache.map)
            dropped = srv.cache.recheck()
            out["blobs"] += 1
            out["chunks"] += present
            if not dropped:
                continue
            out["dropped"][srv.blob_id] = [c.index for c in dropped]
            log.warning("blob %s: %d cached chunks failed their digest; dropped for re-fetch",
                        srv.blob_id[:12], len(dropped))
            with self._lock:
                if srv.blob_id not in self.marked and self.mark is not None:
                    self.mark(srv)
                    self.marked.add(srv.blob_id)
        return out

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
