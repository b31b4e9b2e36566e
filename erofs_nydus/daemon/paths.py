"""Where a daemon for a cache dir keeps its run files."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

__all__ = ["RunPaths"]

_SUN_PATH_MAX = 107


@dataclass(frozen=True)
class RunPaths:
    cache_dir: str

    @classmethod
    def of(cls, cache_dir: str | os.PathLike[str]) -> RunPaths:
        return cls(os.path.abspath(os.fspath(cache_dir)))

    @property
    def lock(self) -> str:
        """flock'ed by the supervisor while it runs; holds its pid."""
        return os.path.join(self.cache_dir, "daemon.lock")

    @property
    def log(self) -> str:
        return os.path.join(self.cache_dir, "daemon.log")

    @property
    def socket(self) -> str:
        """Control socket (in the cache dir unless that path is too long for AF_UNIX)."""
        p = os.path.join(self.cache_dir, "daemon.sock")
        if len(os.fsencode(p)) <= _SUN_PATH_MAX:
            return p
        h = hashlib.sha256(os.fsencode(self.cache_dir)).hexdigest()[:24]
        return os.path.join("/run/erofs-nydus", f"{h}.sock")
