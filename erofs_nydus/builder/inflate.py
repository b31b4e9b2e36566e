"""Read-ahead for tar sources: fetch and gunzip in a thread, the tar parser reads forward.

`ReadAhead(raw, gzip=...)` runs one background thread that reads `raw` (a file, stdin,
or a streaming HTTP body: its digest check then runs in that thread too), inflates it
when it is gzip, and hands blocks to the reader through a bounded queue, so memory
stays at `QUEUE_BLOCKS` x `BLOCK` whatever the layer size, and the inflate overlaps
the tar parsing and chunking on the caller's thread (zlib and ISA-L release the GIL).

The gzip stream is checked as gzip.GzipFile checks it: every member's CRC32 and length
(the inflater verifies the trailer), concatenated members, zero padding after the last
member, and an error for a stream that ends before its last member does.

Inflate library: ISA-L (`isal`) when installed: on the debootstrap layer (60 MiB of
tar.gz, 164 MiB of tar) it inflates in 0.22 s vs 0.46 s for zlib and 0.26 s for
zlib-ng's bindings on this machine kind; zlib otherwise.

The reader is forward-only but answers `tell()` and forward `seek()` (skipping), which
is all tarfile's "r:" mode needs: that mode reads member data straight from the
reader instead of through tarfile's stream buffer, about twice as fast as "r|".
"""

from __future__ import annotations

import importlib
import io
import queue
import threading
import types
import zlib
from collections.abc import Callable
from typing import Any


def _inflate_library() -> tuple[types.ModuleType, str, tuple[type[BaseException], ...]]:
    try:
        lib = importlib.import_module("isal.isal_zlib")
    except ImportError:  # isal is a dependency; zlib is the fallback
        return zlib, "zlib", (zlib.error,)
    return lib, "isal", (zlib.error, lib.error)


_inflate_lib, INFLATE_LIBRARY, INFLATE_ERRORS = _inflate_library()

BLOCK = 1 << 20  # most bytes one queue item holds (inflated)
READ = 1 << 18  # bytes read from the source at a time
QUEUE_BLOCKS = 8

_EOF = object()


class GzipError(OSError):
    """A gzip stream that is corrupt, truncated or fails its CRC / length check."""


def _inflate(read: Callable[[int], bytes], put: Callable[[bytes], None]) -> None:
    """Inflate the gzip members read by `read`, `put` each block of output."""
    d: Any = None
    tail = b""
    while True:
        data = tail or read(READ)
        tail = b""
        if not data:
            break
        if d is None:
            data = data.lstrip(b"\0")  # zero padding after a member, as gzip allows
            if not data:
                continue
            d = _inflate_lib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = d.decompress(data, BLOCK)
            while out:
                put(out)
                out = d.decompress(d.unconsumed_tail, BLOCK) if d.unconsumed_tail else b""
        except INFLATE_ERRORS as exc:
            raise GzipError(f"corrupt gzip data: {exc}") from exc
        if d.eof:
            tail, d = d.unused_data, None
    if d is not None:
        raise GzipError("unexpected end of gzip data (truncated stream)")


class ReadAhead(io.RawIOBase):
    """A forward-only binary reader over `raw`, filled by a background thread."""

    def __init__(self, raw: Any, *, gzip: bool, name: str = "read-ahead") -> None:
        super().__init__()
        self._q: queue.Queue[Any] = queue.Queue(QUEUE_BLOCKS)
        self._stop = threading.Event()
        self._blk = b""
        self._off = 0
        self._pos = 0
        self._done = False
        self._thread = threading.Thread(target=self._run, args=(raw, gzip), name=name,
                                        daemon=True)
        self._thread.start()

    # -- producer ---------------------------------------------------------------------------
    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _run(self, raw: Any, gzip: bool) -> None:
        try:
            if gzip:
                _inflate(raw.read, self._put)
            else:
                while True:
                    data = raw.read(BLOCK)
                    if not data:
                        break
                    self._put(data)
            self._put(_EOF)
        except _Stopped:
            pass
        except BaseException as exc:  # handed to the reader, raised there
            try:
                self._put(exc)
            except _Stopped:
                pass

    # -- consumer ---------------------------------------------------------------------------
    def _next_block(self) -> bool:
        if self._done:
            return False
        item = self._q.get()
        if item is _EOF:
            self._done = True
            return False
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._blk, self._off = item, 0
        return True

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True  # forward only; tarfile's "r:" mode asks

    def tell(self) -> int:
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        off = self._off
        if size is not None and 0 <= size <= len(self._blk) - off:  # within the block
            out = self._blk[off:off + size]  # (tar headers: one per member)
            self._off = off + size
            self._pos += size
            return out
        if size is None or size < 0:
            size = 1 << 62
        parts: list[bytes] = []
        want = size
        while want:
            avail = len(self._blk) - self._off
            if not avail:
                if not self._next_block():
                    break
                continue
            n = min(avail, want)
            if n == len(self._blk) and self._off == 0:
                parts.append(self._blk)
            else:
                parts.append(self._blk[self._off:self._off + n])
            self._off += n
            want -= n
        out = parts[0] if len(parts) == 1 else b"".join(parts)
        self._pos += len(out)
        return out

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("a read-ahead stream seeks forward only")
        if offset < self._pos:
            raise io.UnsupportedOperation(
                f"a read-ahead stream seeks forward only ({self._pos} -> {offset})")
        while self._pos < offset:
            if not self.read(min(offset - self._pos, BLOCK)):
                break
        return self._pos

    def close(self) -> None:
        """Stop the thread (it may finish one blocking read of the source first)."""
        if not self.closed:
            self._stop.set()
            while self._thread.is_alive():
                try:
                    self._q.get(timeout=0.1)
                except queue.Empty:
                    pass
            self._thread.join()
        super().close()


class _Stopped(Exception):
    pass
