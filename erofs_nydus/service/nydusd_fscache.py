"""`nydusd singleton --fscache DIR`: nydus-snapshotter's fscache mode on our fscache daemon.

nydus-snapshotter (``fs_driver = "fscache"``) starts one nydusd for the host and, per image:

1. ``PUT /api/v2/blobs`` with a blob cache entry (``id`` = its fscache id for the snapshot,
   ``domain_id``, ``config.metadata_path`` = the bootstrap, the backend);
2. ``mount -t erofs -o [domain_id=D,]fsid=<id> none M`` *itself*;
3. on removal ``DELETE /api/v2/blobs?domain_id=D[&blob_id=<id>]``, ``umount M``, then
   ``DELETE /api/v2/blobs?blob_id=<id>`` (drop the bootstrap's cache file), and for a data blob
   no image uses any more ``DELETE ?blob_id=<blob>``.

Here DIR is the cache dir of our fscache daemon (started on the first entry through
:class:`~erofs_nydus.service.fscache_client.FscacheClient`; cachefiles' own files are in
``DIR/fscache``).  Each entry registers its bootstrap under the snapshotter's id (the
``fsid`` of the register request), so the kernel's OPEN of that cookie finds it; the image's
data blobs are tagged by blob id as always.  The daemon's mountpoint for an entry is a label,
``/nydusd-fscache/<domain>/<id>`` (the mount is the snapshotter's): this process keeps no
state of its own, so a restarted nydusd answers for what its predecessor registered.

The daemon outlives this process: SIGTERM forgets the entries whose mount is gone and stops
the daemon when nothing is left, while mounts that are still up keep being served.  If the
daemon dies, this process exits (status 1) so that the snapshotter's recovery starts.

"Gone" is the kernel's view, kept by the daemon: an entry whose mount was unmounted while its
superblock lives on (the snapshotter's restart recovery unmounts every entry's mountpoint,
also one an overlay still has as a lower layer, and its mount again then fails with EBUSY)
still has cachefiles objects open, so the daemon keeps it *lingering* - served, and
counted as a mount so that nothing stops the daemon - until the kernel closes them.  A
removed entry's files (bootstrap copy, cachefiles' file) and a removed blob's files are
culled once nothing uses them: at once, by the daemon when its last user goes, or here when
no daemon runs - a snapshotter DELETE that finds no daemon still leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from erofs_nydus.errors import DaemonError, ErofsNydusError, UsageError
from erofs_nydus.service.client import DaemonUnreachable, request_started, wait_stopped
from erofs_nydus.service.nydusd_config import BlobRequest

__all__ = ["LABEL_ROOT", "FscacheBindings", "fscache_unusable"]

log = logging.getLogger("erofs_nydus.nydusd")

LABEL_ROOT = "/nydusd-fscache"
CULL_WAIT = 20.0  # seconds a DELETE waits for a starting / stopping daemon


def fscache_unusable(cache_dir: str) -> str | None:
    """One line saying why `nydusd singleton --fscache cache_dir` cannot work, or None."""
    from erofs_nydus.fscache.device import fs_type_of, unavailable_reason

    why = unavailable_reason()
    if why is not None:
        return f"nydusd: fscache mode is not available here: {why}"
    parent = cache_dir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if fs_type_of(parent) == "tmpfs":
        return (f"nydusd: cachefiles needs ext4/xfs/btrfs for its cache: {cache_dir} is on "
                "tmpfs (no sync_fs)")
    return None


def _label(domain: str, fsid: str) -> str:
    for what, v in (("domain_id", domain), ("id", fsid)):
        if not v or "/" in v or v in (".", ".."):
            raise UsageError(f"blob request {what} {v!r} is not a usable name")
    return f"{LABEL_ROOT}/{domain}/{fsid}"


class FscacheBindings:
    """The blob entries of one fscache cache dir, kept in its daemon."""

    def __init__(self, cache_dir: str) -> None:
        self.cache_dir = os.path.abspath(cache_dir)
        self.started = False  # we have registered something: the daemon must stay up

    def client(self) -> Any:
        from erofs_nydus.service.fscache_client import FscacheClient

        return FscacheClient(self.cache_dir)

    def entries(self) -> dict[str, dict[str, Any]]:
        """label -> image (as in the daemon's status) for our entries; {} without daemon."""
        c = self.client()
        if not c.alive():
            return {}
        out: dict[str, dict[str, Any]] = {}
        for img in c.request("status", timeout=10.0).get("images", []):
            for mp in img.get("mountpoints", []):
                if mp.startswith(LABEL_ROOT + "/"):
                    out[mp] = img
        return out

    def status(self) -> dict[str, Any]:
        """The daemon's status; {} without daemon."""
        c = self.client()
        if not c.alive():
            return {}
        st: dict[str, Any] = c.request("status", timeout=10.0)
        return st

    def bind(self, req: BlobRequest) -> None:
        """Register the entry's bootstrap as fsid `req.id` (idempotent for the same one)."""
        from erofs_nydus.fsutil import private_dir

        label = _label(req.domain_id, req.id)
        private_dir(self.cache_dir)
        try:  # a missing bootstrap: said before any daemon starts
            with open(req.bootstrap, "rb"):
                pass
        except OSError as exc:
            raise UsageError(f"bootstrap {req.bootstrap}: {exc.strerror}") from None
        req.config.write_credentials()
        c = self.client()
        if c.alive():
            img = self.entries().get(label)
            if img is not None and img.get("fsid") == req.id:
                # (a lingering entry - unmounted, its superblock still alive - is in use
                # again: the daemon forgets that it was to go)
                c.request("revive", mountpoint=label)
                log.info("blob entry %s (domain %s) is registered already", req.id[:12],
                         req.domain_id[:12])
                self.started = True
                return
        self.started = True
        # (a daemon started for a registration that fails is stopped again)
        info, _ = request_started(c, "register", mode="fscache", bootstrap=req.bootstrap,
                                  backend=req.config.backend, mountpoint=label,
                                  domain_id=req.domain_id, fsid=req.id, prefetch=req.prefetch)
        if info.get("fsid") != req.id:
            raise DaemonError(f"the fscache daemon of {self.cache_dir} registered the image as "
                              f"{info.get('fsid')!r}, not {req.id!r}: it predates named fsids")
        log.info("blob entry %s (domain %s): %s, %d blobs", req.id[:12], req.domain_id[:12],
                 req.bootstrap, info.get("blobs", 0))

    def unbind(self, domain_id: str | None, blob_id: str | None) -> None:
        """nydusd's three DELETE forms: domain (every entry in it), domain + id (that
        entry), id alone (that entry, then its cache files, or a data blob's).  A daemon
        that stops by itself meanwhile (the kernel closed its last image's objects: the
        snapshotter has just unmounted) is waited for, and the removal done without it."""
        if not domain_id and not blob_id:
            raise UsageError("DELETE /api/v2/blobs needs domain_id or blob_id")
        try:
            self._unbind(domain_id, blob_id)
        except DaemonUnreachable:
            wait_stopped(self.client(), CULL_WAIT)
            self._unbind(domain_id, blob_id)

    def _unbind(self, domain_id: str | None, blob_id: str | None) -> None:
        entries = self.entries()
        if domain_id and not blob_id:
            gone = [lb for lb in entries if lb.startswith(_label(domain_id, "x")[:-1])]
        elif domain_id:
            gone = [lb for lb in entries if lb == _label(domain_id, str(blob_id))]
        else:
            gone = [lb for lb in entries if lb.rsplit("/", 1)[1] == blob_id]
        if not entries and domain_id:  # no daemon: the entries its state file names
            prefix = _label(domain_id, "x")[:-1]
            gone = [lb for lb in self.saved_entries() if lb.startswith(prefix)
                    and (not blob_id or lb == _label(domain_id, blob_id))]
        c = self.client()
        for lb in gone:
            if lb in entries:  # the daemon keeps it while the kernel uses it
                c.request("detach", mountpoint=lb)
            log.info("blob entry %s removed", lb[len(LABEL_ROOT) + 1:])
        # a removed entry's bootstrap files, a removed blob's files: once nothing uses them
        for name in sorted({lb.rsplit("/", 1)[1] for lb in gone} | {blob_id or ""} - {""}):
            self._cull(name)
        self.stop_if_idle()

    def saved_entries(self) -> list[str]:
        """Our labels in the daemon's state file (what a daemon that is not running
        registered and did not detach: it died, or it lingered on to the end)."""
        from erofs_nydus.daemon.images import STATE_FILE
        from erofs_nydus.fsutil import open_private

        try:
            with os.fdopen(open_private(os.path.join(self.cache_dir, STATE_FILE),
                                        os.O_RDONLY), encoding="utf-8") as f:
                doc = json.load(f)
            images = doc.get("images", []) if isinstance(doc, dict) else []
            return [mp for img in images if isinstance(img, dict)
                    for mp in img.get("mountpoints", [])
                    if isinstance(mp, str) and mp.startswith(LABEL_ROOT + "/")]
        except (OSError, ValueError):
            return []

    def _cull(self, name: str) -> None:
        """Remove the files kept for fsid / blob id `name` once nothing serves, mounts or
        opens it: the daemon does it (now, or when its last user goes); without a daemon
        we do, unless a mount has it."""
        from erofs_nydus.service.fscache_daemon import (
            cull_files,
            mounted_as,
            mounted_fsids,
            usable_name,
        )

        if not usable_name(name):
            return
        c = self.client()
        deadline = time.monotonic() + CULL_WAIT
        while True:
            if c.alive():
                try:
                    if c.request("cull", name=name).get("pending"):
                        log.info("%s is still in use: its files go when the last user does",
                                 name[:12])
                    return
                except DaemonUnreachable:  # it stopped meanwhile
                    pass
            # a daemon starting or stopping holds the lock: its answer, or its end
            if not c.supervisor_running() or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if mounted_as(name, mounted_fsids()):
            return
        if c.supervisor_running():
            log.warning("%s: the fscache daemon neither answers nor stops; its files stay",
                        name[:12])
            return
        cull_files(self.cache_dir, name)

    def stop_if_idle(self) -> bool:
        """Stop the daemon if it serves nothing; True if it is (now) stopped."""
        c = self.client()
        if not c.alive():
            self.started = False
            return True
        try:
            if c.request("ping").get("mounts"):
                return False
            c.shutdown()
        except DaemonUnreachable:  # it stopped by itself meanwhile (its last image went)
            pass
        except DaemonError:  # registered meanwhile
            return False
        self.started = False
        return True

    def release_unmounted(self) -> None:
        """On exit: forget entries whose mount is gone; stop the daemon if nothing is left
        (mounts still up stay served)."""
        from erofs_nydus.service.fscache_daemon import mounted_fsids

        try:
            live = mounted_fsids()
            c = self.client()
            for lb, img in self.entries().items():
                if img.get("fsid") not in live:
                    c.request("detach", mountpoint=lb)
            self.stop_if_idle()
        except ErofsNydusError as exc:
            log.error("releasing fscache entries: %s", exc)

    def daemon_gone(self) -> bool:
        """True if we registered entries and the daemon serving them died (one that
        stopped because nothing was left - its last lingering entry went - did not)."""
        if not self.started or self.client().supervisor_running():
            return False
        if not self.saved_entries():
            self.started = False
            return False
        return True
