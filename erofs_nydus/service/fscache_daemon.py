"""fscache mode daemon: /dev/cachefiles on-demand requests served by the daemon core.

Process model: the shell both modes share (:mod:`erofs_nydus.service.shell`: cache-dir
lock, control socket, worker restarts, SIGTERM policy, read deadline, process limits),
with this request source:

* the **supervisor** (:class:`FscacheShell`) opens ``/dev/cachefiles``, sends ``dir``
  and ``bind ondemand`` and hands the device fd to the worker in its hello.  It keeps
  the device fd for as long as it lives, so a worker killed with ``kill -9`` loses
  nothing: its anon fds close (the objects go to the CLOSE state), the queued requests
  stay queued, and the next worker sends ``restore`` - the kernel re-delivers them,
  reopening the objects with fresh OPENs first (Linux 6.8+).  A worker reporting
  ``shutdown`` (no mounts left) ends it: the device is closed.  The worker does not
  die with the supervisor: it holds the device too and serves on.
* the **worker** restores the image table (:class:`~erofs_nydus.daemon.images.ImageTable`:
  bootstrap copies, blob cache files, chunk maps) from the cache dir, reads requests in
  its main thread and answers them:

  - OPEN: cookie = fsid (or ``<fsid>.<n>`` for a second mount of one image) -> the
    bootstrap copy, ``copen <id>,<bootstrap length>``; cookie = device tag = blob id ->
    ``copen <id>,<uncompressed size>``; anything else -> ``copen <id>,-ENOENT`` and the
    anon fd is closed; a cookie that is already open -> ``-EALREADY``, fd closed.
  - READ (in a thread pool): ``BlobServer.fill`` verifies the chunks into the daemon's
    own cache file, then whole 4 KiB pages are copied from it into the anon fd through
    a page-aligned buffer (the whole chunks the request touches: fewer READs), and the
    READ is always completed with ``CACHEFILES_IOC_READ_COMPLETE`` - on failure without
    data, so the reader gets EIO.  The bootstrap object is written whole on its first READ.
  - CLOSE: the object's fd is closed (once no READ worker is using it).

  An image stays registered while the kernel uses it.  ``detach`` of a mount that is
  gone while objects of its image are still open (a superblock that outlives its mount
  point: ``umount`` under an overlay that still has it as a lower layer, as
  nydus-snapshotter's restart recovery does) only marks it *lingering*: it is served
  on, still counts as a mount (``shutdown`` and SIGTERM refuse), and is detached when
  the kernel has closed its objects and no mount has its fsid; with nothing left the
  worker then stops.  ``cull`` removes the files kept for an fsid or blob id
  (:func:`cull_files`) as soon as nothing registers, mounts or opens it - at once, or
  when the last user goes.

  The control socket has the shell's operations (``ping``, ``resolve``, ``register``
  - which also picks the fsid to mount with -, ``detach``, ``status``, ``shutdown``)
  and ``drop_fds`` (close every anon fd: the kernel reopens on the next READ).
  Mounting happens in the CLI process, never here.

Kernel cache files live in ``<cache-dir>/fscache`` (the ``dir`` of cachefiles); the
cache dir must be on ext4/xfs/btrfs.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import mmap
import os
import select
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from erofs_nydus.daemon.images import ImageTable
from erofs_nydus.errors import DaemonError, DaemonStopping, ErofsNydusError, ProtocolError
from erofs_nydus.fscache import protocol as p
from erofs_nydus.fscache.device import bind_ondemand, open_device
from erofs_nydus.fscache.objects import FsObject, ObjectTable
from erofs_nydus.fsutil import atomic_write, open_private, private_dir
from erofs_nydus.rafs.reader import LoadedBootstrap
from erofs_nydus.service import channel
from erofs_nydus.service.api import ControlPlane
from erofs_nydus.service.paths import RunPaths
from erofs_nydus.service.shell import (
    MAX_REQUEST,
    ControlOps,
    Shell,
    control_reply,
    receive_hello,
    setup_logging,
    start_shell,
    too_long,
)

__all__ = ["FscacheShell", "FscacheWorker", "cull_files", "kernel_cache_dir", "mounted_as",
           "mounted_fsids", "pointer_path", "run_supervisor", "run_worker", "usable_name"]

log = logging.getLogger("erofs_nydus.fscache")

PAGE = 4096
COPY_PIECE = 1 << 20
WHOLE_BOOTSTRAP_MAX = 64 << 20
FATAL_PREFIX = "FATAL: "
LINGER_SETTLE = 5.0  # seconds a shutdown waits for the CLOSEs of an image just unmounted
_POINTER = "/run/erofs-nydus/fscache-daemon.json"


def kernel_cache_dir(cache_dir: str) -> str:
    """The directory cachefiles is bound to (``dir``) for a daemon cache dir."""
    return os.path.join(os.path.abspath(cache_dir), "fscache")


def pointer_path() -> str:
    """Where the (single, system-wide) fscache supervisor records its cache dir."""
    return os.environ.get("EROFS_NYDUS_FSCACHE_POINTER", _POINTER)


def usable_name(name: str) -> bool:
    """An fsid or blob id that can name files in a cache dir (no path of its own)."""
    return bool(name) and "/" not in name and name not in (".", "..")


def mounted_as(name: str, mounted: set[str]) -> bool:
    """Whether a mount in `mounted` (fsid= values) has fsid `name` or ``<name>.<n>``."""
    return any(k == name or k.startswith(name + ".") for k in mounted)


def cull_files(cache_dir: str, name: str) -> list[str]:
    """Remove what a cache dir keeps for an fsid or blob id `name`: our bootstrap copy,
    our blob cache files and cachefiles' backing file of that cookie (an image later
    registered under the same name must not read these bytes).  The caller has made
    sure nothing uses `name`.  Returns the paths removed."""
    from erofs_nydus.daemon.blobcache import cache_paths

    if not usable_name(name):
        return []
    removed = []
    for path in (os.path.join(cache_dir, f"{name}.boot"), *cache_paths(cache_dir, name)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    for dirpath, _dirs, files in os.walk(kernel_cache_dir(cache_dir)):
        if f"D{name}" in files:  # cachefiles: "D" + a printable cookie key
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(dirpath, f"D{name}"))
                removed.append(os.path.join(dirpath, f"D{name}"))
    if removed:
        log.info("culled the files of %.12s: %s", name,
                 ", ".join(os.path.basename(p) for p in removed))
    return removed


def _round_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


def mounted_fsids() -> set[str]:
    """fsid= values of the erofs mounts in this namespace (their super options); empty
    if mountinfo cannot be read."""
    from erofs_nydus.mount import mount_table

    try:
        mounts = mount_table()
    except OSError:
        return set()
    return {o[5:] for m in mounts if m.fstype == "erofs" for o in m.options
            if o.startswith("fsid=")}


class FscacheWorker(ControlOps):
    mode = "fscache"

    def __init__(
        self, devfd: int, listener: socket.socket, cache_dir: str, *, threads: int = 8,
        chan: socket.socket | None = None,
    ) -> None:
        self.devfd = devfd
        self.chan = chan
        self.sender = channel.Sender(chan) if chan is not None else None
        self.listener = listener
        self.cache_dir = os.path.abspath(cache_dir)
        os.makedirs(self.cache_dir, exist_ok=True)
        self.table = ImageTable(cache_dir)
        self.objects = ObjectTable()
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fscache-read")
        self.stats: Counter[str] = Counter()
        self._stats_lock = threading.Lock()
        self.keys: dict[str, tuple[str, str | None]] = {}  # mountpoint -> (mount fsid, domain)
        self._keys_lock = threading.Lock()
        # mountpoint -> fsid: detached while the kernel still used the image (see the doc)
        self.lingering: dict[str, str] = {}
        self.pending_culls: set[str] = set()  # fsids / blob ids to cull once unused
        # also the gate (ControlOps): a registration and the decision to stop when the
        # last lingering image goes never interleave
        self._linger_lock = self.gate = threading.RLock()
        self._closed = threading.Event()  # a CLOSE came: re-check the lingering images
        self.stop = threading.Event()
        self.started = time.time()
        self.read_delay = float(os.environ.get("EROFS_NYDUS_FSCACHE_READ_DELAY", "0") or 0)
        self.chunk_writes = os.environ.get("EROFS_NYDUS_FSCACHE_CHUNK_WRITES", "1") != "0"
        self._local = threading.local()
        # traces, prefetch, HTTP control API and metrics, as in fanotify mode
        self.plane = ControlPlane(self.table, mode="fscache", request_stats=self._request_stats)

    def _request_stats(self) -> dict[str, float]:
        with self._stats_lock:
            return {"events": self.stats["read"], "denied": self.stats["read_failed"]}

    def count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    # -- the supervisor channel ------------------------------------------------------

    def tell(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        if self.sender is not None:
            self.sender.put(msg, fds)

    def serve_channel(self) -> None:
        """Liveness pings and stop requests from the supervisor (a thread)."""
        assert self.chan is not None
        self.chan.setblocking(True)
        while not self.stop.is_set():
            try:
                msg, fds = channel.recv(self.chan)
            except (OSError, ProtocolError) as exc:
                log.error("channel from the supervisor: %s", exc)
                msg, fds = None, []
            for fd in fds:
                os.close(fd)
            if msg is None:
                # This process holds the device too: keep serving what it queues.
                log.error("supervisor gone; serving /dev/cachefiles on")
                return
            op = msg.get("op")
            if op == "ping":
                self.tell({"op": "pong"})
            elif op == "stop":  # SIGTERM/SIGINT to the supervisor
                if self.on_stop():
                    self.stop.set()
            else:
                log.error("unknown supervisor message %r", op)

    def close_channel(self) -> None:
        if self.sender is not None:
            self.sender.close()

    # -- the device ------------------------------------------------------------------

    def restore(self) -> None:
        try:
            os.write(self.devfd, p.cmd_restore())
            self.count("restores")
            log.info("sent 'restore': pending requests re-delivered")
        except OSError as exc:
            log.error("'restore' failed: %s (kernel < 6.8?)", exc.strerror)

    def _reply(self, cmd: bytes) -> None:
        try:
            os.write(self.devfd, cmd)
        except OSError as exc:
            log.warning("%s failed: %s", cmd.decode(errors="replace"), exc.strerror)
            raise

    def serve_device(self) -> None:
        poller = select.poll()
        poller.register(self.devfd, select.POLLIN)
        while not self.stop.is_set():
            if not poller.poll(250):
                continue
            while True:
                try:
                    raw = os.read(self.devfd, 4096)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    if exc.errno == errno.EIO:  # cache dead: nothing more will come
                        log.error("/dev/cachefiles: cache is dead (EIO); stopping")
                        self.stop.set()
                        return
                    # e.g. EMFILE creating an OPEN's anon fd: that OPEN failed in the kernel
                    log.error("read /dev/cachefiles: %s", exc.strerror)
                    self.count("read_errors")
                    break
                if not raw:
                    break
                try:
                    msg = p.parse_message(raw)
                except ProtocolError as exc:
                    log.error("bad cachefiles message: %s", exc)
                    self.count("bad_messages")
                    continue
                if isinstance(msg, p.OpenRequest):
                    self.on_open(msg)
                elif isinstance(msg, p.ReadRequest):
                    self.count("read")
                    self.pool.submit(self.on_read, msg)
                else:
                    self.count("close")
                    self.objects.remove(msg.object_id)
                    self._closed.set()

    # -- OPEN ------------------------------------------------------------------------

    def _resolve(self, key: str) -> tuple[str, str, int, str] | None:
        """(kind, target, size, path) for a cookie key, or None."""
        fsid = key.split(".", 1)[0]
        entry = self.table.images.get(fsid)
        if entry is not None and (key == fsid or key[len(fsid) + 1 :].isdigit()):
            boot = self.table.stored_bootstrap(fsid)  # still the validated bytes
            if boot is None:
                return None
            try:
                size = os.path.getsize(boot)
            except OSError:
                return None
            return "bootstrap", fsid, size, boot
        srv = self.table.blobs.get(key)
        if srv is not None:
            return "blob", key, srv.cache.size, srv.cache.data_path
        return None

    def on_open(self, m: p.OpenRequest) -> None:
        self.count("open")
        key = m.cookie_key.decode("utf-8", "surrogateescape")
        try:
            volume = p.volume_name(m.volume_key)
            target = self._resolve(key)
        except ProtocolError:
            target, volume = None, m.volume_key
        if target is None:
            log.warning("OPEN of unknown cookie %r (volume %r): -ENOENT", key[:80], volume)
            self.count("open_refused")
            os.close(m.fd)
            with contextlib.suppress(OSError):
                self._reply(p.copen(m.msg_id, -errno.ENOENT))
            return
        kind, name, size, path = target
        obj = FsObject(m.object_id, m.fd, volume, key, kind, name, size, path)
        old = self.objects.add(obj)
        if old is not None:
            log.warning("OPEN of %s %.12s which is already open (object %d): -EALREADY",
                        kind, key, old.object_id)
            self.count("open_refused")
            os.close(m.fd)
            with contextlib.suppress(OSError):
                self._reply(p.copen(m.msg_id, -errno.EALREADY))
            return
        try:
            self._reply(p.copen(m.msg_id, size))
        except OSError:
            self.objects.remove(m.object_id)
            return
        log.debug("OPEN %s %.12s -> object %d, %d bytes", kind, key, m.object_id, size)

    # -- READ ------------------------------------------------------------------------

    def on_read(self, m: p.ReadRequest) -> None:
        with self.objects.using(m.object_id) as obj:
            if obj is None:
                # Only possible for a READ of an object we never opened; nothing to
                # complete it on (the kernel cancels it when the object goes).
                log.error("READ for unknown object %d (msg %d)", m.object_id, m.msg_id)
                self.count("read_orphans")
                return
            try:
                if self.read_delay:
                    time.sleep(self.read_delay)
                self._serve(obj, m)
            except Exception as exc:
                self.count("read_failed")
                log.error("READ %s %.12s %d+%d failed (reader gets EIO): %s",
                          obj.kind, obj.target, m.offset, m.length, exc)
            finally:
                try:
                    fcntl.ioctl(obj.fd, p.READ_COMPLETE_IOCTL, m.msg_id)
                except OSError as exc:
                    # withdrawn meanwhile (CLOSE / umount): the kernel already failed it
                    log.info("READ_COMPLETE %d: %s", m.msg_id, exc.strerror)

    def _serve(self, obj: FsObject, m: p.ReadRequest) -> None:
        if obj.kind == "bootstrap":
            with os.fdopen(open_private(obj.path, os.O_RDONLY), "rb", buffering=0) as f:
                src = f.fileno()
                if obj.size <= WHOLE_BOOTSTRAP_MAX:
                    with obj.lock:
                        if not obj.whole_written:
                            self._copy(src, obj.fd, 0, obj.size)
                            obj.whole_written = True
                    return
                if m.offset >= obj.size:
                    raise DaemonError(f"READ at {m.offset} beyond the bootstrap ({obj.size})")
                self._copy(src, obj.fd, m.offset, min(m.end, obj.size))
            return
        srv = self.table.blobs.get(obj.target)
        if srv is None:
            raise DaemonError(f"blob {obj.target[:12]} is no longer served")
        size = srv.cache.size
        if m.offset >= size:
            raise DaemonError(f"READ at {m.offset} beyond blob {obj.target[:12]} ({size} bytes)")
        end = min(m.end, size)
        srv.fill(m.offset, end - m.offset)
        lo, hi = m.offset, end
        if self.chunk_writes:
            chunks = srv.chunks_in_range(lo, hi - lo)
            if chunks:
                lo = min(lo, chunks[0].uncompressed_offset)
                hi = min(size, max(hi, chunks[-1].uncompressed_offset + chunks[-1].aligned_size))
        self._copy(srv.cache.fd, obj.fd, lo, hi)

    def _buffer(self) -> mmap.mmap:
        buf: mmap.mmap | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = mmap.mmap(-1, COPY_PIECE)  # page-aligned, as O_DIRECT writes want
            self._local.buf = buf
        return buf

    def _copy(self, src: int, dst: int, start: int, end: int) -> None:
        """Copy [start, end) of ``src`` into the anon fd in whole, aligned pages."""
        if start % PAGE:
            raise DaemonError(f"unaligned READ offset {start}")
        view = memoryview(self._buffer())  # per thread, never closed
        pos = start
        while pos < end:
            n = min(COPY_PIECE, _round_up(end - pos))
            got = os.preadv(src, [view[:n]], pos)
            if got < n:
                view[got:n] = bytes(n - got)  # past the end of the source: zeros
            done = 0
            while done < n:
                w = os.pwrite(dst, view[done:n], pos + done)
                if w <= 0 or (w % PAGE and done + w < n):
                    raise DaemonError(f"short write to the cache object at {pos + done}")
                done += w
            pos += n

    # -- control ---------------------------------------------------------------------

    def _mount_key(self, fsid: str, mountpoint: str, domain: str | None) -> str:
        with self._keys_lock:
            used = mounted_fsids() | {k for mp, (k, _) in self.keys.items() if mp != mountpoint}
            key, n = fsid, 0
            while key in used:
                n += 1
                key = f"{fsid}.{n}"
            self.keys[mountpoint] = (key, domain)
            return key

    def register(self, req: dict[str, Any], loaded: LoadedBootstrap | None) -> dict[str, Any]:
        """Refused once the worker stops for any reason (the cache died too).  Under the
        gate: without it, a CLOSE of the image just unmounted, reaped between the table's
        register and ``registered_hook``, detached the new registration of the same
        mountpoint and stopped the worker under the mount being made."""
        with self.gate:
            if self.stop.is_set():
                raise DaemonStopping(f"the fscache daemon for {self.cache_dir} is stopping")
            return super().register(req, loaded)

    def registered_hook(self, info: dict[str, Any], req: dict[str, Any],
                        mountpoint: str) -> dict[str, Any]:
        domain = req.get("domain_id")
        key = self._mount_key(info["fsid"], mountpoint, None if domain is None else str(domain))
        with self._linger_lock:  # registered again: used again, nothing to cull
            self.lingering.pop(mountpoint, None)
            self._keep(info["fsid"])
        return {"fsid": info["fsid"], "mount_fsid": key, "domain_id": domain,
                "blobs": len(info["devices"]), "bootstrap": info["bootstrap"]}

    # -- liveness: an image is in use while mounted or while the kernel holds its objects

    def kernel_uses(self, fsid: str, mounted: set[str] | None = None) -> bool:
        """True while a mount has `fsid` (or ``<fsid>.<n>``) or the kernel holds an
        object of that image: its bootstrap, or a blob of it no other image serves."""
        mounted = mounted_fsids() if mounted is None else mounted
        if mounted_as(fsid, mounted):
            return True
        entry = self.table.images.get(fsid)
        others = {b for f, e in list(self.table.images.items()) if f != fsid
                  and f not in self.lingering.values() for b in e.blob_ids}
        own = set(entry.blob_ids) - others if entry is not None else set()
        return any((o.kind == "bootstrap" and o.target == fsid)
                   or (o.kind == "blob" and o.target in own) for o in self.objects.snapshot())

    def in_use(self, name: str, mounted: set[str] | None = None) -> bool:
        """An fsid or blob id that is registered, mounted or open in the kernel."""
        mounted = mounted_fsids() if mounted is None else mounted
        return (name in self.table.images or name in self.table.blobs
                or mounted_as(name, mounted)
                or any(o.target == name for o in self.objects.snapshot()))

    def _sole_image_of(self, mountpoint: str) -> str | None:
        """The fsid of the image at `mountpoint` if no other mountpoint uses it."""
        for fsid, e in list(self.table.images.items()):
            if mountpoint in e.mountpoints:
                return fsid if e.mountpoints == [mountpoint] else None
        return None

    def detach_hook(self, mountpoint: str) -> dict[str, Any]:
        with self._linger_lock:
            if mountpoint in self.lingering:
                return {"remaining": len(self.table.mountpoints()), "lingering": True}
            fsid = self._sole_image_of(mountpoint)
            if fsid is not None and self.kernel_uses(fsid):
                # its superblock lives on (e.g. an overlay's lower layer after umount):
                # forgetting the image now would fail its reads, stopping would too
                self.lingering[mountpoint] = fsid
                log.info("%s detached while the kernel still uses image %.12s: serving it "
                         "until its objects are closed", mountpoint, fsid)
                return {"remaining": len(self.table.mountpoints()), "lingering": True}
            return self._detach_now(mountpoint)

    def _detach_now(self, mountpoint: str) -> dict[str, Any]:
        resp = super().detach_hook(mountpoint)
        with self._keys_lock:
            self.keys.pop(mountpoint, None)
        with self._linger_lock:
            self.lingering.pop(mountpoint, None)
        self.run_culls()
        return resp

    def reap_lingering(self) -> bool:
        """Detach the lingering images the kernel let go of; True if that left nothing
        registered (the worker then stops)."""
        with self._linger_lock:
            if not self.lingering:
                return False
            mounted = mounted_fsids()
            for mp, fsid in list(self.lingering.items()):
                if self.kernel_uses(fsid, mounted):
                    continue
                log.info("%s: image %.12s no longer used by the kernel; detaching", mp, fsid)
                try:
                    self._detach_now(mp)
                except DaemonError as exc:
                    log.warning("deferred detach of %s: %s", mp, exc)
                    self.lingering.pop(mp, None)
            return not self.lingering and not self.table.images

    def settle(self, timeout: float = LINGER_SETTLE) -> None:
        """An image unmounted a moment ago lingers until the kernel's CLOSEs for its
        objects arrive, right after umount(2) returns: a `shutdown` that follows the
        last umount waits for them (bounded) instead of refusing on a race.  An image
        whose superblock really lives on (an overlay's lower layer) stays lingering and
        the shutdown is refused, as it must be."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._linger_lock:
                if not self.lingering:
                    return
            self.reap_lingering()
            time.sleep(0.05)

    def revive(self, mountpoint: str) -> dict[str, Any]:
        """A lingering image registered again at `mountpoint` is in use again."""
        with self._linger_lock:
            fsid = self.lingering.pop(mountpoint, None)
            if fsid is not None:
                self._keep(fsid)
                log.info("%s: image %.12s is registered again", mountpoint, fsid)
            return {"revived": fsid is not None}

    def _keep(self, fsid: str) -> None:
        """Image `fsid` is in use again: its files and its blobs' are not to be culled."""
        entry = self.table.images.get(fsid)
        self.pending_culls.discard(fsid)
        self.pending_culls.difference_update(entry.blob_ids if entry else [])

    def cull(self, name: str) -> dict[str, Any]:
        """Remove the files of fsid / blob id `name` now if unused, else once unused."""
        if not usable_name(name):
            raise DaemonError(f"cull: {name!r} is not a usable name")
        with self._linger_lock:
            self.pending_culls.add(name)
            self.run_culls()
            return {"culled": name not in self.pending_culls,
                    "pending": name in self.pending_culls}

    def run_culls(self) -> None:
        with self._linger_lock:
            if not self.pending_culls:
                return
            mounted = mounted_fsids()
            for name in sorted(self.pending_culls):
                if not self.in_use(name, mounted):
                    self.pending_culls.discard(name)
                    cull_files(self.cache_dir, name)

    def _linger_watch(self) -> None:
        """Finish deferred detaches when the kernel closes objects (or a mount goes)."""
        while not self.stop.is_set():
            self._closed.wait(1.0)
            self._closed.clear()
            if self.stop.is_set():
                return
            if not self.stop_when(lambda: self.reap_lingering() and not self.resident):
                continue
            log.info("no images left; stopping")
            self.stop.set()
            self.tell({"op": "shutdown"})
            return

    def status_hook(self, st: dict[str, Any]) -> None:
        with self._stats_lock:
            counters = dict(self.stats)
        st["fscache"] = {
            **{k: counters.get(k, 0) for k in ("open", "read", "close", "open_refused",
                                               "read_failed", "restores")},
            **counters,
            "objects": len(self.objects),
            "opens_by_key": dict(self.objects.opens),
        }
        with self._linger_lock:
            st["lingering"] = sorted(self.lingering)
            st["pending_culls"] = sorted(self.pending_culls)

    def mode_op(self, op: Any, req: dict[str, Any]) -> dict[str, Any]:
        if op == "drop_fds":
            return {"dropped": self.objects.remove_all()}
        if op == "cull":
            return self.cull(str(req.get("name", "")))
        if op == "revive":
            return self.revive(os.path.abspath(str(req.get("mountpoint", ""))))
        return super().mode_op(op, req)

    def _serve_conn(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            while True:
                line = f.readline(MAX_REQUEST + 1)
                if not line:
                    return
                if len(line) > MAX_REQUEST:  # refused unread: the connection is dropped
                    with contextlib.suppress(OSError):
                        f.write(json.dumps(too_long()).encode() + b"\n")
                        f.flush()
                    return
                resp, shutdown = control_reply(line, self.dispatch)
                try:
                    f.write(json.dumps(resp).encode() + b"\n")
                    f.flush()
                except OSError:
                    return
                if shutdown and resp["ok"]:
                    log.info("shutdown requested")
                    self.stop.set()
                    return

    def serve_control(self) -> None:
        self.listener.settimeout(0.5)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.stop.is_set():
                    return
                time.sleep(0.1)
                continue
            conn.settimeout(None)
            threading.Thread(target=self._serve_conn, args=(conn,), daemon=True).start()

    def _idle_watch(self, idle_timeout: float) -> None:
        idle_since = time.monotonic()
        while not self.stop.wait(min(2.0, idle_timeout)):
            if self.table.images:
                idle_since = time.monotonic()
            elif (time.monotonic() - idle_since >= idle_timeout
                  and self.stop_when(lambda: not self.table.images)):
                log.info("no images for %.0f s; exiting", idle_timeout)
                self.stop.set()

    def run(self) -> None:
        self.plane.start()
        threading.Thread(target=self.serve_control, name="control", daemon=True).start()
        if self.chan is not None:
            threading.Thread(target=self.serve_channel, name="channel", daemon=True).start()
        idle = float(os.environ.get("EROFS_NYDUS_IDLE_EXIT", "60"))
        if idle > 0:
            threading.Thread(target=self._idle_watch, args=(idle,), daemon=True).start()
        threading.Thread(target=self._linger_watch, name="linger", daemon=True).start()
        try:
            self.serve_device()
        finally:
            self.stop.set()
            # After umount the kernel sends CLOSEs; give them a moment, then close anyway.
            deadline = time.monotonic() + 2.0
            while len(self.objects) and time.monotonic() < deadline:
                self._drain_closes()
                time.sleep(0.05)
            self.plane.stop()
            self.pool.shutdown(wait=True)
            self.run_culls()  # what the kernel let go of meanwhile
            self.objects.remove_all()
            self.table.close()

    def _drain_closes(self) -> None:
        while True:
            try:
                raw = os.read(self.devfd, 4096)
            except OSError:
                return
            if not raw:
                return
            try:
                msg = p.parse_message(raw)
            except ProtocolError:
                continue
            if isinstance(msg, p.CloseRequest):
                self.objects.remove(msg.object_id)
                self._closed.set()
            elif isinstance(msg, p.OpenRequest):
                os.close(msg.fd)
                with contextlib.suppress(OSError):
                    self._reply(p.copen(msg.msg_id, -errno.ENOENT))
            else:
                self.on_read(msg)  # completes it (the object may be gone: EIO)


def run_worker(channel_fd: int) -> int:
    """The worker (forked by the shell): serve the device it gets in the hello until no
    mount is left; a restarted one first asks the kernel to re-deliver (``restore``)."""
    setup_logging("fscache-daemon")
    chan = socket.socket(fileno=channel_fd)
    hello = receive_hello(chan)
    if hello is None:
        return 2
    for fd in hello.extra_fds:
        os.close(fd)
    worker = FscacheWorker(hello.source_fd, hello.listener, hello.cache_dir, chan=chan)
    worker.table.load_state()  # before any request: OPENs name restored images
    if not hello.restart:
        worker.table.prune_stale()
    else:
        worker.restore()
    worker.plane.restored()
    worker.report_deadline()
    log.info("serving %s (%d images)%s", hello.cache_dir, len(worker.table.images),
             " after a restart" if hello.restart else "")
    try:
        worker.run()
        worker.tell({"op": "shutdown"})  # no mounts left, idle, or the cache is dead
    finally:
        worker.close_channel()
    return 0


class FscacheShell(Shell):
    """The fscache mode's supervisor: holds /dev/cachefiles (bound on-demand); the
    worker reads the requests itself.  A worker killed with requests pending loses
    nothing: they stay queued in the kernel and its successor's ``restore`` has them
    re-delivered.  The worker outlives the supervisor (it holds the device too)."""

    role = "fscache-supervisor"
    worker_dies_with_supervisor = False

    def worker_main(self, channel_fd: int) -> int:
        return run_worker(channel_fd)

    def worker_keeps(self) -> set[int]:
        return {self.lock_fd}  # serving on after the supervisor's death, it holds the lock

    def release(self) -> None:
        with contextlib.suppress(OSError, ValueError), open(pointer_path(), encoding="utf-8") as f:
            if json.load(f).get("pid") == os.getpid():
                os.unlink(pointer_path())


def _write_pointer(cache_dir: str) -> None:
    path = pointer_path()
    with contextlib.suppress(OSError):  # in a dir of ours only: the CLI trusts it
        private_dir(os.path.dirname(path), what="pointer dir")
        atomic_write(path, json.dumps({"cache_dir": cache_dir, "pid": os.getpid()}).encode(),
                     mode=0o600)


def _open_bound_device(paths: RunPaths) -> int | None:
    """/dev/cachefiles bound on-demand to the cache dir; None (said in a ``FATAL:``
    line the CLI shows) when it cannot be."""
    try:
        devfd = open_device()
        try:
            bind_ondemand(devfd, kernel_cache_dir(paths.cache_dir))
        except BaseException:
            os.close(devfd)
            raise
    except ErofsNydusError as exc:
        print(f"{FATAL_PREFIX}{exc}", file=sys.stderr, flush=True)
        return None
    log.info("bound /dev/cachefiles on %s (on-demand)", kernel_cache_dir(paths.cache_dir))
    return devfd


def run_supervisor(cache_dir: str) -> int:
    """Hold /dev/cachefiles for ``cache_dir`` and keep a worker serving it (the shell:
    :mod:`erofs_nydus.service.shell`)."""
    setup_logging(FscacheShell.role, RunPaths.of(cache_dir).log)

    def make(paths: RunPaths, devfd: int, listener: socket.socket, lock_fd: int) -> Shell:
        _write_pointer(paths.cache_dir)
        return FscacheShell(paths, devfd, listener, lock_fd=lock_fd)

    return start_shell(cache_dir, _open_bound_device, make)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m erofs_nydus.service.fscache_daemon")
    ap.add_argument("--cache-dir", required=True)
    args = ap.parse_args(argv)
    sys.exit(run_supervisor(args.cache_dir))


if __name__ == "__main__":
    main()
