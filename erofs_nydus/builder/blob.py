"""Chunk store for one data blob: digest, dedup, compress, append.

Blob file layout (what `nydus-image create -D` writes, no ToC):
    chunk data (each chunk zstd/lz4-compressed, or raw when that is not smaller)
    | CI array (V1, 16 B per chunk; compressed like the chunks when that is smaller)
    | 4 KiB BlobCIHeader (magic 0xB10BB10B at 0 and 4092)
The blob id is the sha256 of the whole file.  Chunk i occupies
[uncompressed_offset, +round_up_4k(size)) of the uncompressed address space, which
`--blob-cache-dir` writes out as `<blob id>.blob.data` (sparse where all-zero).

Everything is written to temporary names in the target directories and renamed
only by `finish()`; `abort()` removes them.

With `threads` > 0, chunks are digested and compressed by a pool of that many threads
(hashlib, blake3, lz4 and zstd release the GIL) while the caller reads on: each chunk
is submitted in source order, and committed (dedup, append to the blob) in that same
order once its result is in, so the blob is byte-identical to a build without threads.
Chunks go to the pool in batches (about 1 MiB, or 256 small chunks); at most
`2 * threads + 2` batches are in flight, and the writer thread's queue holds at most 8
pieces of 1 MiB: memory is bounded by that window, not by file or layer size.  The
chunk lists `add_stream` / `add_file` return are filled in as their chunks commit; all
are complete after `flush()` (which `finish()` calls).
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import IO, Any, BinaryIO

from erofs_nydus.errors import ErofsNydusError, SourceError
from erofs_nydus.layout import build
from erofs_nydus.layout.common import BLOCK_SIZE, align
from erofs_nydus.layout.rafs import (
    BLOB_CI_HEADER_SIZE,
    BLOB_CI_MAGIC,
    BLOB_FEATURE_ALIGNED,
    CI_ENTRY_V1_PACK,
    COMPRESSOR_IDS,
    MAX_CHUNKS_PER_BLOB,
    BlobCIHeader,
    encode_ci_v1,
)
from erofs_nydus.rafs.codec import DEFAULT_DIGESTER, compress_chunk, digest_of
from erofs_nydus.rafs.image import BlobInfo, ChunkInfo

_ZEROS = bytes(16 << 20)
_UNSET = object()  # "not compressed yet" (distinct from None: "not smaller, store raw")
BATCH_BYTES = 1 << 20  # chunks go to the pool in batches of about this many bytes
BATCH_ITEMS = 256  # or of this many chunks (small files: fewer hand-offs)
SINK_PIECE = 1 << 20  # blob bytes gathered per hand-off to the writer thread
_Item = tuple[bytes, "bytes | None", "list[ChunkInfo]", str]


class _Sink:
    """One thread that runs the blob (and cache file) writes and the blob hash, in the
    order they were queued, behind a bounded queue; the first error stops it and is
    raised by the next `put` or `wait` (an OSError as `on_oserror(where, exc)`, `where`
    the entry the write was for)."""

    def __init__(self, on_oserror: Callable[[str, OSError], BaseException]) -> None:
        self._q: queue.Queue[tuple[Callable[..., None], tuple[Any, ...], str] | None] = \
            queue.Queue(8)
        self._on_oserror = on_oserror
        self._error: BaseException | None = None
        self._discard = False  # stop(discard=True): skip what is still queued
        self._thread = threading.Thread(target=self._run, name="blob-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                fn, args, where = item
                if self._error is None and not self._discard:
                    fn(*args)
            except OSError as exc:  # raised on the builder's thread
                self._error = self._on_oserror(where, exc)
            except BaseException as exc:
                self._error = exc
            finally:
                self._q.task_done()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, where: str, fn: Callable[..., None], *args: Any) -> None:
        self._check()
        self._q.put((fn, args, where))

    def wait(self) -> None:
        """Every queued write done (or its error raised)."""
        self._q.join()
        self._check()

    def stop(self, discard: bool = False) -> None:
        if self._thread.is_alive():
            self._discard = self._discard or discard
            self._q.put(None)
            self._thread.join()


@dataclass(slots=True)
class BlobStats:
    chunks_referenced: int = 0  # chunk references from files (incl. duplicates)
    bytes_referenced: int = 0  # uncompressed bytes referenced by files
    chunks_stored: int = 0
    bytes_stored_uncompressed: int = 0
    bytes_stored_compressed: int = 0
    chunks_deduplicated: int = 0
    chunks_from_dict: int = 0


class ChunkLookup:
    """Read-only digest -> chunk map from other images (the `--chunk-dict` feature)."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[bytes, int], ChunkInfo] = {}
        self.blobs: list[BlobInfo] = []

    def add_blob(self, blob: BlobInfo, chunks: Sequence[ChunkInfo]) -> None:
        """Register a dictionary blob; its chunks are relabelled with a lookup-wide index."""
        if any(b.blob_id == blob.blob_id for b in self.blobs):
            return
        index = len(self.blobs)
        self.blobs.append(replace(blob, blob_index=index))
        for c in chunks:
            self._by_key.setdefault((c.digest, c.uncompressed_size), replace(c, blob_index=index))

    def get(self, digest: bytes, size: int) -> ChunkInfo | None:
        return self._by_key.get((digest, size))

    def __len__(self) -> int:
        return len(self._by_key)


class BlobWriter:
    """Appends unique chunks of one build to a new blob (and its cache file)."""

    def __init__(self, blob_dir: str, *, chunk_size: int, compressor: str, blob_index: int = 0,
                 cache_dir: str | None = None, chunk_dict: ChunkLookup | None = None,
                 digester: str = DEFAULT_DIGESTER, threads: int = 0,
                 tee: Callable[[bytes], None] | None = None) -> None:
        self.blob_dir = blob_dir
        self.cache_dir = cache_dir
        self.chunk_size = chunk_size
        self.compressor = compressor
        self.digester = digester  # chunk digests: "sha256" | "blake3"
        self.blob_index = blob_index
        self.chunk_dict = chunk_dict
        self.stats = BlobStats()
        self.used_dict_chunks: dict[tuple[bytes, int], ChunkInfo] = {}
        self._chunks: list[ChunkInfo] = []
        self._dedup: dict[tuple[bytes, int], ChunkInfo] = {}
        self._coff = 0
        self._uoff = 0
        self._hash = hashlib.sha256()
        self._zero_digests: dict[int, bytes] = {}
        self._blob_f: BinaryIO | None = None
        self._cache_f: BinaryIO | None = None
        self._tmp_paths: list[str] = []
        self._current = ""  # the entry being chunked, for error messages
        self.created: list[str] = []  # files finish() created that did not exist before
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        # batches of (data, digest, the list the chunk goes to, entry name) in source
        # order, with the future of their (digest, compressed) results
        self._batch: list[_Item] = []
        self._batch_bytes = 0
        self._pending: deque[tuple[Future[list[tuple[bytes, object]]], list[_Item]]] = deque()
        self._window = 2 * threads + 2
        self._sink: _Sink | None = None
        self._tee = tee  # sees every byte of the blob, in order, as it is written
        # blob pieces not yet handed to the sink (a list: one join in the writer thread
        # instead of growing and copying a bytearray on the builder's)
        self._blob_buf: list[bytes] = []
        self._blob_buf_bytes = 0
        self._cache_buf = bytearray()
        self._installer: threading.Thread | None = None  # finish(background=True)
        self._install_error: BaseException | None = None

    # -- temp files -------------------------------------------------------------------------
    def _open_tmp(self, directory: str, suffix: str) -> BinaryIO:
        try:
            os.makedirs(directory, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix=".erofs-nydus-", suffix=suffix, dir=directory)
        except OSError as exc:
            raise SourceError(f"cannot create a file in {directory}: {exc.strerror}") from exc
        self._tmp_paths.append(path)
        return os.fdopen(fd, "wb")

    def _ensure_open(self) -> None:
        if self._blob_f is None:
            self._blob_f = self._open_tmp(self.blob_dir, ".blob")
            if self.cache_dir is not None:
                self._cache_f = self._open_tmp(self.cache_dir, ".blob.data")
            if self.threads > 0:
                self._sink = _Sink(self._write_error)

    def _write_blob(self, data: bytes) -> None:
        if self._sink is not None:  # gathered: one hand-off per SINK_PIECE bytes
            self._blob_buf.append(data)
            self._blob_buf_bytes += len(data)
            if self._blob_buf_bytes >= SINK_PIECE:
                self._sink.put(self._current, self._write_blob_pieces, self._blob_buf)
                self._blob_buf, self._blob_buf_bytes = [], 0
        else:
            self._write_blob_now(data)

    def _write_blob_pieces(self, pieces: list[bytes]) -> None:
        self._write_blob_now(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def _write_blob_now(self, data: bytes) -> None:
        assert self._blob_f is not None
        self._blob_f.write(data)
        self._hash.update(data)
        if self._tee is not None:
            self._tee(data)

    def _write_cache(self, data: bytes | None, size: int) -> None:
        """Append one chunk to the cache file: `data` padded to 4 KiB, or a hole."""
        if self._sink is None:
            self._write_cache_now(data, size)
        elif data is None:
            self._flush_cache_buf()
            self._sink.put(self._current, self._write_cache_now, None, size)
        else:
            self._cache_buf += data
            self._cache_buf += _ZEROS[:align(size, BLOCK_SIZE) - size]
            if len(self._cache_buf) >= SINK_PIECE:
                self._flush_cache_buf()

    def _flush_cache_buf(self) -> None:
        if self._cache_buf and self._sink is not None:
            data = bytes(self._cache_buf)
            self._sink.put(self._current, self._write_cache_now, data, len(data))
            self._cache_buf.clear()

    def _flush_bufs(self) -> None:
        """Hand what is gathered for the blob and cache file to the writer thread."""
        if self._sink is not None:
            if self._blob_buf:
                self._sink.put(self._current, self._write_blob_pieces, self._blob_buf)
                self._blob_buf, self._blob_buf_bytes = [], 0
            self._flush_cache_buf()

    def _write_cache_now(self, data: bytes | None, size: int) -> None:
        assert self._cache_f is not None
        if data is None:
            self._cache_f.seek(align(size, BLOCK_SIZE), os.SEEK_CUR)
        else:
            self._cache_f.write(data)
            pad = align(size, BLOCK_SIZE) - size
            if pad:
                self._cache_f.write(_ZEROS[:pad])

    def _write_error(self, where: str, exc: OSError) -> SourceError:
        where = f"{where}: " if where else ""
        err = SourceError(f"{where}cannot write the blob in {self.blob_dir}: {exc.strerror}")
        err.__cause__ = exc
        return err

    # -- chunks -----------------------------------------------------------------------------
    def zero_digest(self, size: int) -> bytes:
        d = self._zero_digests.get(size)
        if d is None:
            d = self._zero_digests[size] = digest_of(_ZEROS[:size], self.digester)
        return d

    # -- the pipeline ----------------------------------------------------------------------
    def _prepare(self, items: list[_Item]) -> list[tuple[bytes, object]]:
        """[(digest, compressed or None or _UNSET)]: the part of each chunk that needs
        no order; compression is skipped for a chunk already known (a dedup hit)."""
        out: list[tuple[bytes, object]] = []
        for data, digest, _, _ in items:
            if digest is None:
                digest = digest_of(data, self.digester)
            key = (digest, len(data))
            if key in self._dedup or (self.chunk_dict is not None
                                      and self.chunk_dict.get(*key) is not None):
                out.append((digest, _UNSET))
            else:
                out.append((digest, compress_chunk(data, self.compressor)))
        return out

    def _submit(self, data: bytes, digest: bytes | None, out: list[ChunkInfo],
                name: str) -> None:
        """Queue one chunk whose ChunkInfo goes to `out` when it commits (in order)."""
        if self.threads <= 0:
            out.append(self._commit(data, digest, _UNSET))
            return
        self._batch.append((data, digest, out, name))
        self._batch_bytes += len(data)
        if self._batch_bytes >= BATCH_BYTES or len(self._batch) >= BATCH_ITEMS:
            self._send_batch()

    def _send_batch(self) -> None:
        if not self._batch:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="chunk")
        items, self._batch, self._batch_bytes = self._batch, [], 0
        self._pending.append((self._pool.submit(self._prepare, items), items))
        while len(self._pending) > self._window:
            self._commit_oldest()

    def _commit_oldest(self) -> None:
        future, items = self._pending.popleft()
        for (data, _, out, name), (digest, packed) in zip(items, future.result(), strict=True):
            self._current = name
            out.append(self._commit(data, digest, packed))

    def flush(self) -> None:
        """Commit every chunk in flight (the chunk lists handed out are then complete)."""
        self._send_batch()
        while self._pending:
            self._commit_oldest()
        if self._sink is not None:
            self._flush_bufs()
            self._sink.wait()

    def _stop_threads(self) -> None:
        for future, _ in self._pending:
            future.cancel()
        self._pending.clear()
        self._batch.clear()
        self._blob_buf, self._blob_buf_bytes = [], 0
        self._cache_buf.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._sink is not None:  # after flush() nothing is queued; else: an abort
            self._sink.stop(discard=True)
            self._sink = None

    def add_chunk(self, data: bytes, file_offset: int, digest: bytes | None = None) -> ChunkInfo:
        """Store (or deduplicate) one chunk and return where it lives (after the chunks
        still in flight)."""
        self.flush()
        return self._commit(data, digest, _UNSET)

    def _commit(self, data: bytes, digest: bytes | None, packed: object) -> ChunkInfo:
        size = len(data)
        if digest is None:
            digest = digest_of(data, self.digester)
        self.stats.chunks_referenced += 1
        self.stats.bytes_referenced += size
        key = (digest, size)
        found = self._dedup.get(key)
        if found is not None:
            self.stats.chunks_deduplicated += 1
            return found
        if self.chunk_dict is not None:
            found = self.chunk_dict.get(digest, size)
            if found is not None:
                self.stats.chunks_from_dict += 1
                self.used_dict_chunks[key] = found
                self._dedup[key] = found
                return found
        if len(self._chunks) >= MAX_CHUNKS_PER_BLOB:
            raise SourceError(f"more than {MAX_CHUNKS_PER_BLOB} unique chunks in one blob; "
                              "use a larger --chunk-size")
        self._ensure_open()
        try:
            return self._store(data, digest, key, packed)
        except OSError as exc:
            raise self._write_error(self._current, exc) from exc

    def _store(self, data: bytes, digest: bytes, key: tuple[bytes, int],
               packed: object = _UNSET) -> ChunkInfo:
        size = len(data)
        if packed is _UNSET:
            packed = compress_chunk(data, self.compressor)
        assert packed is None or isinstance(packed, bytes)
        stored = packed if packed is not None else data
        chunk = ChunkInfo(
            digest=digest, blob_index=self.blob_index, index=len(self._chunks),
            compressed_offset=self._coff, compressed_size=len(stored),
            uncompressed_offset=self._uoff, uncompressed_size=size,
            compressed=packed is not None, compressor=self.compressor, digester=self.digester,
        )
        self._write_blob(stored)
        if self._cache_f is not None:
            self._write_cache(None if data == _ZEROS[:size] else data, size)
        self._coff += len(stored)
        self._uoff += align(size, BLOCK_SIZE)
        self._chunks.append(chunk)
        self._dedup[key] = chunk
        self.stats.chunks_stored += 1
        self.stats.bytes_stored_uncompressed += size
        self.stats.bytes_stored_compressed += len(stored)
        return chunk

    def add_stream(self, read: IO[bytes], size: int, name: str) -> list[ChunkInfo]:
        """Chunk `size` bytes read sequentially from a file object."""
        self._current = name
        chunks: list[ChunkInfo] = []
        off = 0
        while off < size:
            want = min(self.chunk_size, size - off)
            try:
                data = read.read(want)
            except OSError as exc:
                raise SourceError(f"{name}: read error: {exc}") from exc
            if len(data) != want:
                raise SourceError(f"{name}: unexpected end of data at byte {off + len(data)} "
                                  f"of {size}")
            self._submit(data, None, chunks, name)
            off += want
        return chunks

    def add_file(self, path: bytes, size: int, name: str) -> list[ChunkInfo]:
        """Chunk a file on disk, skipping holes of sparse files without reading them."""
        self._current = name
        chunks: list[ChunkInfo] = []
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NOATIME", 0))
        except PermissionError:
            fd = -1
        except OSError as exc:
            raise SourceError(f"{name}: cannot open: {exc.strerror}") from exc
        try:
            if fd < 0:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            next_data: int | None = -1
            off = 0
            while off < size:
                want = min(self.chunk_size, size - off)
                if next_data is not None and next_data < off:
                    next_data = _seek_data(fd, off)
                if next_data is None or next_data >= off + want:
                    self._submit(_ZEROS[:want], self.zero_digest(want), chunks, name)
                else:
                    data = os.pread(fd, want, off)
                    if len(data) != want:
                        raise SourceError(f"{name}: file shrank while reading "
                                          f"(EOF at {off + len(data)} of {size})")
                    self._submit(data, None, chunks, name)
                off += want
        except OSError as exc:
            raise SourceError(f"{name}: read error: {exc.strerror}") from exc
        finally:
            if fd >= 0:
                os.close(fd)
        return chunks

    # -- finish -----------------------------------------------------------------------------
    def finish(self, written: Callable[[str], None] | None = None, *,
               background: bool = False) -> BlobInfo | None:
        """Write the CI table and header, rename into place; None if no chunk was stored.

        `written(blob_id)` is called once the blob's last byte went to the file (and to
        the tee), before the fsync and the rename: a streamed upload can end while the
        blob is synced and the bootstrap is built.  The blob is in place once this
        returns, or with `background`, once `installed()` returns: the fsync (tens of
        ms of I/O wait for a layer's blob) and the rename then run in a thread while the
        caller goes on (create_image plans the bootstrap meanwhile)."""
        try:
            self.flush()
        except OSError as exc:
            self.abort()
            raise SourceError(f"cannot write the blob in {self.blob_dir}: {exc.strerror}") from exc
        except BaseException:
            self.abort()
            raise
        finally:
            self._stop_threads()
        if self._blob_f is None:
            self.abort()
            return None
        ci_raw = b"".join(
            CI_ENTRY_V1_PACK.pack(*encode_ci_v1(c.uncompressed_offset, c.uncompressed_size,
                                                c.compressed_offset, c.compressed_size))
            for c in self._chunks
        )
        ci_packed = compress_chunk(ci_raw, self.compressor)
        ci_compressor = self.compressor if ci_packed is not None else "none"
        ci_bytes = ci_packed if ci_packed is not None else ci_raw
        ci_offset = self._coff
        header = build(BlobCIHeader, {
            "magic": BLOB_CI_MAGIC, "features": BLOB_FEATURE_ALIGNED,
            "ci_compressor": COMPRESSOR_IDS[ci_compressor], "ci_entries": len(self._chunks),
            "ci_offset": ci_offset, "ci_compressed_size": len(ci_bytes),
            "ci_uncompressed_size": len(ci_raw), "zran_offset": 0, "zran_size": 0,
            "zran_count": 0, "reserved": bytes(4032), "magic2": BLOB_CI_MAGIC,
        })
        assert len(header) == BLOB_CI_HEADER_SIZE
        try:
            self._current = "chunk-info table"
            self._write_blob(ci_bytes)
            self._write_blob(header)
            blob_id = self._hash.hexdigest()
            if written is not None:
                written(blob_id)
            if background:
                self._installer = threading.Thread(target=self._install_in_thread,
                                                   args=(blob_id,), name="blob-sync",
                                                   daemon=True)
                self._installer.start()
            else:
                self._sync_and_install(blob_id)
        except OSError as exc:
            self.abort()
            raise SourceError(f"cannot write the blob in {self.blob_dir}: {exc.strerror}") from exc
        return BlobInfo(
            blob_id=blob_id, blob_index=self.blob_index, chunk_size=self.chunk_size,
            chunk_count=len(self._chunks), compressor=self.compressor, digester=self.digester,
            compressed_size=self._coff, uncompressed_size=self._uoff, ci_offset=ci_offset,
            ci_compressed_size=len(ci_bytes), ci_uncompressed_size=len(ci_raw),
            features=BLOB_FEATURE_ALIGNED, ci_compressor=ci_compressor,
        )

    def _sync_and_install(self, blob_id: str) -> None:
        self._close_files(sync=True)
        blob_tmp = self._tmp_paths[0]
        os.chmod(blob_tmp, 0o644)
        self._install(blob_tmp, os.path.join(self.blob_dir, blob_id))
        if self.cache_dir is not None:
            cache_tmp = self._tmp_paths[1]
            os.chmod(cache_tmp, 0o644)
            self._install(cache_tmp, os.path.join(self.cache_dir, blob_id + ".blob.data"))
        self._tmp_paths.clear()

    def _install_in_thread(self, blob_id: str) -> None:
        try:
            self._sync_and_install(blob_id)
        except BaseException as exc:  # raised by installed(), on the builder's thread
            self._install_error = exc

    def installed(self) -> None:
        """Wait for the sync and rename `finish(background=True)` started; on failure,
        remove the temporary files (`abort`) and raise it as SourceError."""
        t, self._installer = self._installer, None
        if t is not None:
            t.join()
        exc, self._install_error = self._install_error, None
        if exc is not None:
            self.abort()
            if isinstance(exc, OSError):
                raise SourceError(f"cannot write the blob in {self.blob_dir}: "
                                  f"{exc.strerror}") from exc
            raise exc

    def _install(self, tmp: str, final: str) -> None:
        if not os.path.exists(final):
            self.created.append(final)
        os.replace(tmp, final)

    def remove_created(self) -> None:
        """Undo finish(): remove the files it created (used when a later step fails)."""
        for path in self.created:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.created.clear()

    @property
    def chunks(self) -> list[ChunkInfo]:
        return self._chunks

    def _close_files(self, sync: bool) -> None:
        for f in (self._blob_f, self._cache_f):
            if f is None or f.closed:
                continue
            if sync:
                if f is self._cache_f:
                    f.truncate(self._uoff)
                f.flush()
                os.fsync(f.fileno())
            f.close()

    def abort(self) -> None:
        """Remove every temporary file; safe to call more than once."""
        if self._installer is not None:  # a background sync + rename: let it end first
            self._installer.join()
            self._installer = None
        self._stop_threads()
        try:
            self._close_files(sync=False)
        except (OSError, ErofsNydusError):
            pass
        for path in self._tmp_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self._tmp_paths.clear()


class DigestOnlyWriter(BlobWriter):
    """A BlobWriter that stores nothing: files get chunk digests, for tree comparison
    (`check REF --source` chunks the source image's layers with it).

    Every chunk of `add_stream` / `add_file` / `add_chunk` (pipelined or not) commits
    through `_commit`, overridden here: no dedup, no blob, no cache file, and it never
    creates its blob directory or a temp file in it.  Each reference gets its own
    uncompressed offset (merge_trees tells chunks apart by blob and offset)."""

    def _commit(self, data: bytes, digest: bytes | None, packed: object) -> ChunkInfo:
        if digest is None:
            digest = digest_of(data, self.digester)
        n = self.stats.chunks_referenced
        self.stats.chunks_referenced += 1
        self.stats.bytes_referenced += len(data)
        return ChunkInfo(digest, 0, n, 0, len(data), n << 12, len(data), False,
                         compressor="none", digester=self.digester)

    def _prepare(self, items: list[_Item]) -> list[tuple[bytes, object]]:
        """Digests only (in the pool): nothing is compressed."""
        return [(digest_of(data, self.digester) if digest is None else digest, _UNSET)
                for data, digest, _, _ in items]

    def _ensure_open(self) -> None:
        raise AssertionError("DigestOnlyWriter never opens a blob")


def _seek_data(fd: int, off: int) -> int | None:
    """Next offset >= off holding data, None if only a hole follows."""
    try:
        return os.lseek(fd, off, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        return off
