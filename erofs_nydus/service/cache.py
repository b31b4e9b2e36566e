"""Cache dir management: what a cache dir holds, who uses it, and garbage collection.

A cache dir holds, per blob, `<blob id>.blob.data` (sparse, the uncompressed address
space) and `<blob id>.chunk_map`; per image, `<fsid>.boot` (the stored bootstrap); and
the daemon's `daemon-state.json` naming the images it serves, their blobs and their
mountpoints.

A blob or bootstrap is *in use* when an image of the state file that lists it has a
mountpoint that is mounted, or - while a daemon runs for the cache dir - when any
image of the state file lists it (a mount may be in progress).  `gc` removes only
files not in use: everything unused, or with a budget, unused files oldest first
(by last access or change) until the cache dir's disk usage fits the budget.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from erofs_nydus.errors import UsageError

__all__ = ["CacheEntry", "CacheReport", "gc_cache", "scan_cache", "verify_cache"]

STATE_FILE = "daemon-state.json"


@dataclass
class CacheEntry:
    kind: str  # "blob" or "bootstrap"
    id: str  # blob id or fsid
    files: list[str]
    size: int  # apparent size of the data file
    disk: int  # bytes allocated on disk (all files)
    present: int  # blob: bytes present in the cache file (allocated data)
    mtime: float
    images: list[str] = field(default_factory=list)  # fsids listing it
    mounts: list[str] = field(default_factory=list)  # their live mountpoints
    in_use: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class CacheReport:
    cache_dir: str
    daemon_running: bool
    entries: list[CacheEntry]

    @property
    def disk(self) -> int:
        return sum(e.disk for e in self.entries)

    def to_json(self) -> dict[str, Any]:
        return {
            "cache_dir": self.cache_dir,
            "daemon_running": self.daemon_running,
            "entries": [e.to_json() for e in self.entries],
            "total_size": sum(e.size for e in self.entries),
            "total_disk": self.disk,
            "total_present": sum(e.present for e in self.entries),
        }


def _disk(path: str) -> tuple[int, int, float]:
    """(apparent size, allocated bytes, last use time) of a file; zeros if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return 0, 0, 0.0
    return st.st_size, st.st_blocks * 512, max(st.st_mtime, st.st_atime)


def _live(mountpoint: str) -> bool:
    from erofs_nydus.mount import mount_fstype

    try:
        return mount_fstype(mountpoint) == "erofs"
    except OSError:
        return False


def _state(cache_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(cache_dir, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{path}: unreadable daemon state ({exc}); refusing to judge usage"
        ) from exc
    images = doc.get("images", []) if isinstance(doc, dict) else []
    return [i for i in images if isinstance(i, dict) and isinstance(i.get("fsid"), str)]


def scan_cache(cache_dir: str) -> CacheReport:
    from erofs_nydus.service.client import DaemonClient

    cdir = os.path.abspath(cache_dir)
    if not os.path.isdir(cdir):
        raise UsageError(f"{cdir}: no such cache dir")
    running = DaemonClient(cdir).supervisor_running()
    images = _state(cdir)
    blob_users: dict[str, list[dict[str, Any]]] = {}
    for img in images:
        for b in img.get("blob_ids", []):
            blob_users.setdefault(str(b), []).append(img)
    live_mps = {mp: _live(mp) for img in images for mp in img.get("mountpoints", [])}

    def usage(users: list[dict[str, Any]]) -> tuple[list[str], list[str], bool]:
        fsids = [str(u["fsid"]) for u in users]
        mounts = [mp for u in users for mp in u.get("mountpoints", []) if live_mps.get(mp)]
        in_use = bool(mounts) or (running and bool(users))
        return fsids, mounts, in_use

    entries: list[CacheEntry] = []
    names = sorted(os.listdir(cdir))
    blob_ids = sorted(
        {n[: -len(".blob.data")] for n in names if n.endswith(".blob.data")}
        | {n[: -len(".chunk_map")] for n in names if n.endswith(".chunk_map")}
    )
    for bid in blob_ids:
        files = [os.path.join(cdir, f"{bid}{s}") for s in (".blob.data", ".chunk_map")]
        files = [f for f in files if os.path.exists(f)]
        size, data_disk, mtime = _disk(os.path.join(cdir, f"{bid}.blob.data"))
        _s, map_disk, mt2 = _disk(os.path.join(cdir, f"{bid}.chunk_map"))
        fsids, mounts, in_use = usage(blob_users.get(bid, []))
        entries.append(
            CacheEntry(
                "blob", bid, files, size, data_disk + map_disk, data_disk,
                max(mtime, mt2), fsids, mounts, in_use,
            )
        )
    by_fsid = {str(i["fsid"]): i for i in images}
    for n in names:
        if not n.endswith(".boot"):
            continue
        fsid = n[: -len(".boot")]
        path = os.path.join(cdir, n)
        size, disk, mtime = _disk(path)
        users = [by_fsid[fsid]] if fsid in by_fsid else []
        fsids, mounts, in_use = usage(users)
        entries.append(
            CacheEntry("bootstrap", fsid, [path], size, disk, size, mtime, fsids, mounts, in_use)
        )
    return CacheReport(cdir, running, entries)


def gc_cache(cache_dir: str, budget: int | None = None, *, dry_run: bool = False) -> tuple[
    CacheReport, list[CacheEntry]
]:
    """Remove unused cache files (all, or oldest first until under `budget` bytes on
    disk).  Return the report before and the entries removed.

    Holds the cache dir's lock exclusively from the scan to the last removal, so a
    daemon registering an image (which holds it shared until its state file lists the
    image's files) never has a file removed that it has just decided to use.
    """
    from erofs_nydus.daemon.blobcache import cache_dir_lock

    if not os.path.isdir(cache_dir):
        raise UsageError(f"{os.path.abspath(cache_dir)}: no such cache dir")
    with cache_dir_lock(cache_dir, exclusive=True):
        return _gc_locked(cache_dir, budget, dry_run)


def _gc_locked(
    cache_dir: str, budget: int | None, dry_run: bool
) -> tuple[CacheReport, list[CacheEntry]]:
    report = scan_cache(cache_dir)
    unused = sorted((e for e in report.entries if not e.in_use), key=lambda e: e.mtime)
    if budget is not None:
        total = report.disk
        victims = []
        for e in unused:
            if total <= budget:
                break
            victims.append(e)
            total -= e.disk
    else:
        victims = unused
    if not dry_run:
        for e in victims:
            for f in e.files:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f)
    return report, victims


def verify_cache(cache_dir: str) -> dict[str, Any]:
    """Re-digest every cached chunk of `cache_dir`; drop bad ones (clear their bits,
    punch their ranges) so they are fetched again.

    With a daemon running for the cache dir it does the work (it holds the chunk maps
    and re-marks a blob that is no longer complete); without one, chunk lists come from
    the stored bootstraps whose content matches their sha256 name.  Returns
    {"blobs", "chunks", "dropped": {blob id: [chunk index]}, "unverifiable": [blob id]}.
    """
    from erofs_nydus.service.client import DaemonClient

    cdir = os.path.abspath(cache_dir)
    if not os.path.isdir(cdir):
        raise UsageError(f"{cdir}: no such cache dir")
    from erofs_nydus.daemon.blobcache import cache_dir_lock
    from erofs_nydus.fsutil import private_dir

    client = DaemonClient(cdir)
    if not client.supervisor_running():
        private_dir(cdir)  # we are about to write its chunk maps and cache files
        # exclusive, as `cache gc`: a daemon starting now waits before it opens a file
        with cache_dir_lock(cdir, exclusive=True):
            if not client.supervisor_running():
                return _verify_offline(cdir)
    out = client.request("verify", timeout=3600.0)
    out.setdefault("unverifiable", [])
    return out


def _verify_offline(cdir: str) -> dict[str, Any]:
    import hashlib

    from erofs_nydus.daemon.blobcache import BlobCacheFile
    from erofs_nydus.daemon.images import read_bootstrap_bounded, validate_bootstrap
    from erofs_nydus.errors import ErofsNydusError
    from erofs_nydus.rafs.image import BlobInfo, ChunkInfo

    blobs: dict[str, tuple[BlobInfo, dict[int, ChunkInfo]]] = {}
    names = sorted(os.listdir(cdir))
    for n in names:
        fsid = n[: -len(".boot")]
        if not n.endswith(".boot") or len(fsid) != 64:
            continue
        try:
            data = read_bootstrap_bounded(os.path.join(cdir, n), private=True)
            if hashlib.sha256(data).hexdigest() != fsid:
                continue  # not what its name says: never a source of digests
            image = validate_bootstrap(data, name=n)
        except (OSError, ErofsNydusError):
            continue
        for b in image.blobs:
            _info, chunks = blobs.setdefault(b.blob_id, (b, {}))
            for c in image.chunks_for_blob(b.blob_index):
                chunks.setdefault(c.index, c)
    out: dict[str, Any] = {"blobs": 0, "chunks": 0, "dropped": {}, "unverifiable": []}
    for n in names:
        if not n.endswith(".blob.data"):
            continue
        bid = n[: -len(".blob.data")]
        if bid not in blobs:
            out["unverifiable"].append(bid)
            continue
        info, by_index = blobs[bid]
        # opening re-digests already unless the daemon's seal still holds; then again
        cache = BlobCacheFile(cdir, info, list(by_index.values()))
        try:
            dropped = list(cache.dropped)
            out["chunks"] += len(dropped) + sum(1 for c in cache.chunks if cache.present(c))
            if not cache.rechecked:
                dropped = cache.recheck()
        finally:
            cache.close()
        out["blobs"] += 1
        if dropped:
            out["dropped"][bid] = [c.index for c in dropped]
    return out
