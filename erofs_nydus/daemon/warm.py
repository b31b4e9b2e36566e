"""Pre-warming: fill an image's cache files (or a mirror) before the burst.

`warm_image` reads the chunks of the image's prefetch table (or all of them) through
the image's backend - so through its mirrors and proxy too - verifies them and writes
them into the blob cache files of a cache dir, exactly as the daemon's own fills do.
A daemon started on that cache dir later adopts the files (it re-checks them) and
serves those chunks without a fetch.  Warming into a throw-away cache dir fills only
the mirrors and proxies the reads went through: a pull-through registry caches each
blob it is asked for, a slicing proxy every range.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from erofs_nydus.daemon.blobcache import BlobCacheFile
from erofs_nydus.daemon.core import BlobServer, Metrics
from erofs_nydus.daemon.images import make_backend
from erofs_nydus.daemon.prefetch import prefetch_chunks
from erofs_nydus.errors import ErofsNydusError
from erofs_nydus.fsutil import private_dir
from erofs_nydus.rafs.image import ChunkInfo
from erofs_nydus.rafs.reader import load_image, read_bootstrap_bytes

__all__ = ["WarmResult", "warm_image"]

log = logging.getLogger(__name__)

UNIT = 2 << 20  # uncompressed bytes per fill: one backend read for neighbouring chunks


def _units(chunks: list[ChunkInfo]) -> list[tuple[int, int]]:
    """(offset, length) spans of the uncompressed address space covering `chunks`."""
    out: list[tuple[int, int]] = []
    for c in sorted(chunks, key=lambda c: c.uncompressed_offset):
        end = c.uncompressed_offset + c.aligned_size
        if out and end - out[-1][0] <= UNIT and c.uncompressed_offset - sum(out[-1]) <= 0:
            out[-1] = (out[-1][0], max(end - out[-1][0], out[-1][1]))
        else:
            out.append((c.uncompressed_offset, c.aligned_size))
    return out


@dataclass
class WarmResult:
    scope: str  # "prefetch table" | "all chunks"
    chunks: int = 0  # chunks asked for
    present: int = 0  # of those, already in the cache before
    bytes_fetched: int = 0  # compressed bytes read from the backend
    bytes_filled: int = 0  # uncompressed bytes written
    errors: list[str] = field(default_factory=list)


def warm_image(
    bootstrap: str,
    backend_spec: dict[str, Any],
    cache_dir: str,
    *,
    everything: bool = False,
    threads: int = 4,
    retry_for: float = 0.0,
) -> WarmResult:
    """Fill `cache_dir` with the prefetch table's chunks (all chunks with `everything`,
    or when the image has no prefetch table).  Chunk errors are collected, not raised.
    `retry_for`: seconds to keep retrying what failed, a round a second (a pull-through
    mirror read with the origin off serves a blob only once it has stored it)."""
    data = read_bootstrap_bytes(bootstrap)  # bounded, regular files only
    image = load_image(data)
    wanted: dict[int, list[ChunkInfo]] = defaultdict(list)
    scope = "all chunks"
    if not everything:
        for c in prefetch_chunks(data):
            wanted[c.blob_index].append(c)
        scope = "prefetch table"
    if not wanted:
        scope = "all chunks" if everything else "all chunks (no prefetch table)"
        for idx in range(len(image.blobs)):
            wanted[idx] = list(image.chunks_for_blob(idx))
    cache_dir = private_dir(cache_dir)
    result = WarmResult(scope)
    metrics = Metrics()
    for idx, chunks in sorted(wanted.items()):
        cache = BlobCacheFile(cache_dir, image.blobs[idx], image.chunks_for_blob(idx))
        backend = make_backend(backend_spec)
        srv = BlobServer(cache, backend, amplify=0, metrics=metrics)
        result.chunks += len(chunks)
        result.present += sum(1 for c in chunks if cache.present(c))

        def fill(unit: tuple[int, int], srv: BlobServer = srv) -> str | None:
            try:
                srv.fill(unit[0], unit[1], record=False)
            except (ErofsNydusError, OSError) as exc:
                return f"blob {srv.blob_id[:12]} at {unit[0]}+{unit[1]}: {exc}"
            return None

        try:
            pending = _units(chunks)
            end = time.monotonic() + retry_for
            if retry_for > 0 and len(pending) > 1:
                # A pull-through mirror answers each read of a blob it is still storing
                # with a fresh fetch from the origin (dropped by us, paid for by the
                # origin): one read starts the store, then one probe a round, the unit
                # farthest into the blob, waits for it; the rest follow in parallel.
                first, probe = pending[0], pending[-1]
                missed = [first] if fill(first) is not None else []
                while (err := fill(probe)) is not None and time.monotonic() + 1 <= end:
                    time.sleep(1)
                if err is not None:
                    result.errors.append(err)
                    result.errors += [f"blob {srv.blob_id[:12]}: {len(pending) - 1} more "
                                      "ranges not tried"]  # fmt: skip
                    continue
                pending = missed + pending[1:-1]
            with ThreadPoolExecutor(max(1, threads)) as pool:
                while pending:
                    errors = list(pool.map(fill, pending))
                    pending = [u for u, e in zip(pending, errors, strict=True) if e is not None]
                    if not pending or time.monotonic() + 1 > end:
                        result.errors += [e for e in errors if e is not None]
                        break
                    time.sleep(1)
        finally:
            srv.close()
            backend.close()
    snap = metrics.snapshot()
    result.bytes_fetched = int(snap["bytes_fetched"])
    result.bytes_filled = int(snap["bytes_filled"])
    return result
