"""The fscache object table: which anonymous fd the kernel gave us for which cookie.

An *object* is one cachefiles backing object, identified by the ``object_id`` of the
OPEN that created its anon fd (a reopen gets a new id and a new fd).  The daemon maps
the OPEN's ``(volume, cookie key)`` to a *target*: the image's bootstrap (cookie =
fsid, or ``<fsid>.<n>`` when the same image is mounted more than once) or a blob
(cookie = device-slot tag = blob id).

Thread-safe: the request loop adds and removes objects; READ workers look them up.
A worker holds an object's fd only while :meth:`ObjectTable.using` says so, and the
fd is closed when the last user lets go, so a CLOSE (or a deliberate drop) never
closes a descriptor a worker is still writing through.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["FsObject", "ObjectTable"]


@dataclass(eq=False)
class FsObject:
    object_id: int
    fd: int
    volume: str  # volume name without the "erofs," prefix: fsid or domain_id
    key: str  # cookie key
    kind: str  # "bootstrap" | "blob"
    target: str  # fsid (bootstrap) or blob id
    size: int  # what copen answered
    path: str = ""  # the file the bytes come from (bootstrap copy / blob cache file)
    users: int = 0
    closed: bool = False  # CLOSE received / dropped: close fd when users reach 0
    whole_written: bool = False  # bootstrap objects: everything written once
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class ObjectTable:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[int, FsObject] = {}
        self._by_key: dict[tuple[str, str], FsObject] = {}
        self.opens: Counter[str] = Counter()  # cookie key -> OPENs answered with a size

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_id)

    def add(self, obj: FsObject) -> FsObject | None:
        """Register ``obj``; if its (volume, key) is already open, return that object
        instead and register nothing."""
        with self._lock:
            old = self._by_key.get((obj.volume, obj.key))
            if old is not None and not old.closed:
                return old
            self._by_id[obj.object_id] = obj
            self._by_key[(obj.volume, obj.key)] = obj
            self.opens[obj.key] += 1
            return None

    def get(self, object_id: int) -> FsObject | None:
        with self._lock:
            return self._by_id.get(object_id)

    def snapshot(self) -> list[FsObject]:
        with self._lock:
            return list(self._by_id.values())

    @contextlib.contextmanager
    def using(self, object_id: int) -> Iterator[FsObject | None]:
        """The object, pinned (its fd stays open) for the duration of the block."""
        with self._lock:
            obj = self._by_id.get(object_id)
            if obj is not None:
                obj.users += 1
        try:
            yield obj
        finally:
            if obj is not None:
                with self._lock:
                    obj.users -= 1
                    close = obj.closed and obj.users == 0 and obj.fd >= 0
                    fd, obj.fd = (obj.fd, -1) if close else (obj.fd, obj.fd)
                if close:
                    os.close(fd)

    def remove(self, object_id: int) -> FsObject | None:
        """Forget an object (CLOSE, or dropping its fd); close the fd once unused."""
        with self._lock:
            obj = self._by_id.pop(object_id, None)
            if obj is None:
                return None
            if self._by_key.get((obj.volume, obj.key)) is obj:
                del self._by_key[(obj.volume, obj.key)]
            obj.closed = True
            close = obj.users == 0 and obj.fd >= 0
            fd = obj.fd
            if close:
                obj.fd = -1
        if close:
            os.close(fd)
        return obj

    def remove_all(self) -> int:
        ids = [o.object_id for o in self.snapshot()]
        for i in ids:
            self.remove(i)
        return len(ids)
