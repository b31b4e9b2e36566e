"""`convert`: an OCI image (registry or oci: layout) -> a Nydus RAFS v6 image.

Per source layer: stream the blob (digest-verified as it arrives, never unpacked to
disk) into the builder -> layer bootstrap + data blob.  Layer results are cached by
source digest and build options, so a layer converted once is not rebuilt.  Then the
layer bootstraps are merged, and pushed as Nydus expects (reference/nydus-rafs-v6.md 4.3):
one layer per data blob (`application/vnd.oci.image.layer.nydus.blob.v1`,
`containerd.io/snapshot/nydus-blob: "true"`), the bootstrap last as a tar.gz holding
`image/image.boot` (`containerd.io/snapshot/nydus-bootstrap: "true"`,
`containerd.io/snapshot/nydus-fs-version: "6"`), and a config whose
`rootfs.diff_ids` match those layers.

With an access trace (`ConvertOptions.prefetch_trace`, recorded by `erofs-nydus trace`
on a mount of this image converted without one) the merged bootstrap is optimized
before the push (optimize.py): one blob with the traced chunks first and a prefetch
table.  Conversion is deterministic, so the trace's fsid identifies the merged
bootstrap it was recorded on; a trace of any other image is refused.

Pipeline: up to `ConvertOptions.jobs` layers are converted at once (each one fetched and
inflated in a read-ahead thread, its chunks digested and compressed by a small pool: see
builder/inflate.py and builder/blob.py).  On a registry target each layer's new blob
is streamed up while it is written (`RegistryClient.push_blob_stream`); other blobs
(cached layers, chunk dictionaries, oci: targets, a failed stream) are uploaded by one
uploader thread as soon as their layer is done, while other layers convert and the
bootstraps merge.  A stream's end (its last bytes, the registry's digest check) runs in
a thread of its own, and the bootstrap layer and config are pushed meanwhile: only the
manifest waits for every blob.  A one-layer image without whiteouts skips the merge (the merged
bootstrap is that layer's, byte for byte).  The output does not depend on the timing:
layers are merged in manifest order, and every layer is built alone.  The first failure
stops the other layers' downloads, aborts streams, cancels queued uploads, and joins every
thread before it is raised; the manifest is only put when everything succeeded.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import io
import json
import os
import queue
import shutil
import tarfile
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from erofs_nydus.errors import UnsupportedError, UsageError
from erofs_nydus.rafs.codec import DEFAULT_COMPRESSOR, DEFAULT_DIGESTER
from erofs_nydus.registry.manifest import (
    ANNOTATION_NYDUS_BLOB,
    ANNOTATION_NYDUS_BOOTSTRAP,
    ANNOTATION_NYDUS_FS_VERSION,
    DOCKER_LAYER_GZIP,
    NYDUS_BLOB,
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_LAYER_TAR,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Descriptor,
    build_image_manifest,
    manifest_blobs,
    parse_json_document,
    sha256_digest,
)
from erofs_nydus.registry.reference import parse_layout_reference
from erofs_nydus.registry.store import ImageStore, open_image_store

if TYPE_CHECKING:
    from erofs_nydus.builder.merge import LoadedLayer
    from erofs_nydus.builder.optimize import OptimizeResult
    from erofs_nydus.rafs.image import RafsImage

# Imported where used, not before the first byte is fetched (~25 ms of a convert's
# serial start): the merge (loaded while the layers convert), the optimizer (only with
# a trace) and the resolver (`extract_bootstrap`, still importable from here).  The
# builder and the bootstrap reader (~50 ms) are imported by a thread `convert_image`
# starts first thing (`_import_builder`).


def __getattr__(name: str) -> Any:
    if name == "extract_bootstrap":  # the bounded bootstrap-layer reader
        from erofs_nydus.registry.resolve import extract_bootstrap

        return extract_bootstrap
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

BOOTSTRAP_NAME = "image/image.boot"
_TAR_LAYER_TYPES = {OCI_LAYER_TAR, OCI_LAYER_GZIP, DOCKER_LAYER_GZIP,
                    "application/vnd.docker.image.rootfs.diff.tar",
                    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"}
_ZSTD_LAYER_TYPES = {OCI_LAYER_ZSTD, "application/vnd.docker.image.rootfs.diff.tar.zstd"}


class IterStream(io.RawIOBase):
    """A readable file over an iterator of byte chunks (a streaming HTTP body)."""

    def __init__(self, it: Iterator[bytes]) -> None:
        self._it = it
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


@dataclass(slots=True)
class ConvertOptions:
    chunk_size: int = 0x100000
    compressor: str = DEFAULT_COMPRESSOR
    digester: str = DEFAULT_DIGESTER
    chunk_dicts: list[str] = field(default_factory=list)
    platform: str | None = None
    cache_dir: str = "/var/cache/erofs_nydus/convert"
    client_options: dict[str, Any] = field(default_factory=dict)
    prefetch_trace: str | None = None  # optimize by this access trace (see optimize.py)
    jobs: int = 2  # layers converted at once
    threads: int | None = None  # chunk digest + compress threads per layer (BuildOptions)


@dataclass(slots=True)
class ConvertResult:
    target: str
    manifest_digest: str
    bootstrap: str
    blobs: list[tuple[str, int]]  # (blob id, size) in layer order
    layers_converted: int
    layers_cached: int
    bootstrap_layer_digest: str
    prefetch: OptimizeResult | None = None  # with --prefetch-trace

    def to_json(self) -> dict[str, Any]:
        prefetch = None if self.prefetch is None else {
            "files": self.prefetch.prefetch_files, "chunks": self.prefetch.prefetch_chunks,
            "bytes": self.prefetch.prefetch_bytes}
        return {"target": self.target, "manifest_digest": self.manifest_digest,
                "bootstrap": self.bootstrap,
                "blobs": [{"digest": f"sha256:{b}", "size": s} for b, s in self.blobs],
                "layers_converted": self.layers_converted, "layers_cached": self.layers_cached,
                "bootstrap_layer": self.bootstrap_layer_digest, "prefetch": prefetch}


Progress = Callable[[str, int, int], None]  # (label, done, total)


def _import_builder() -> None:
    """Import the builder and the bootstrap reader (~50 ms: construct, the codecs, the
    tree and bootstrap code) in a thread while the main thread opens the registry
    clients (loading the CA bundle, ~20 ms, runs in OpenSSL without the GIL) and
    fetches the manifest and config; a layer thread's own import then only waits for
    what is left.  An import error is left for that import to raise."""
    try:
        import erofs_nydus.builder.create
        import erofs_nydus.rafs.reader  # noqa: F401
    except Exception:  # raised again, and reported, where the layer imports it
        pass


def read_bootstrap_file(path: str) -> RafsImage:
    from erofs_nydus.rafs.reader import read_bootstrap_file as read

    return read(path)


def bootstrap_layer_bytes(bootstrap: bytes) -> tuple[bytes, str]:
    """Deterministic tar.gz with `image/` and `image/image.boot`; returns (tgz, diff_id)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("image")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
        tf.addfile(d)
        f = tarfile.TarInfo(BOOTSTRAP_NAME)
        f.size, f.mode, f.mtime = len(bootstrap), 0o644, 0
        tf.addfile(f, io.BytesIO(bootstrap))
    tar = raw.getvalue()
    return gzip.compress(tar, compresslevel=6, mtime=0), sha256_digest(tar)


def _layer_key(digest: str, opts: ConvertOptions) -> str:
    dig = "" if opts.digester == "sha256" else f"|{opts.digester}"  # old keys stay valid
    h = hashlib.sha256(f"{digest}|{opts.chunk_size}|{opts.compressor}|v1{dig}".encode())
    for p in opts.chunk_dicts:
        with open(p, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


class _Cancelled(Exception):
    """Another layer failed: this one stops reading its source."""


class _StreamUpload:
    """A layer's new blob uploaded to a registry while the builder writes it
    (`RegistryClient.push_blob_stream`), fed in order from the blob writer through a
    bounded queue; the upload thread starts with the first byte.  The digest sent is
    the blob id the writer computed over the same bytes (`finish`): no second sha256
    (a wrong one would make the registry refuse the upload, and the file goes up)."""

    PIECE = 1 << 20  # bytes gathered per queue item
    _ABORT = object()

    def __init__(self, push: Callable[..., tuple[str, int]], label: str) -> None:
        self._push = push
        self.label = label
        self.digest: str | None = None  # the blob's, known once the writer is done
        self._q: queue.Queue[Any] = queue.Queue(8)
        self._buf = bytearray()
        self._done = threading.Event()  # the upload thread ended (success or not)
        self._thread: threading.Thread | None = None
        self.result: tuple[str, int] | None = None
        self.error: BaseException | None = None

    def feed(self, data: bytes) -> None:
        """The blob writer's tee: gather, hand over full pieces (blocks while full)."""
        if self._done.is_set():
            return
        if not self._buf and len(data) >= self.PIECE:  # the writer's pieces: no copy
            self._put(data)
            return
        self._buf += data
        if len(self._buf) >= self.PIECE:
            self._put(bytes(self._buf))
            self._buf.clear()

    def _put(self, item: Any) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"upload {self.label}",
                                            daemon=True)
            self._thread.start()
        while not self._done.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _pieces(self) -> Iterator[bytes]:
        while True:
            item = self._q.get()
            if item is None:
                return
            if item is self._ABORT:
                raise _Cancelled(self.label)
            yield item

    def _run(self) -> None:
        try:
            self.result = self._push(self._pieces(), digest=self._digest)
        except BaseException as exc:  # the caller falls back to a plain upload
            self.error = exc
        finally:
            self._done.set()

    def _digest(self) -> str:
        if self.digest is None:
            raise _Cancelled(f"{self.label}: no blob digest")
        return self.digest

    def finish(self, ok: bool, digest: str | None = None) -> tuple[str, int] | None:
        """End the upload: complete it (`ok`, the blob's `digest`) or abort it; join the
        thread.  Returns (digest, size) when the whole blob went up.  A blob smaller
        than a piece (no thread yet) goes up here when its digest is known."""
        if self._thread is None and not (ok and digest and self._buf):
            return None
        self.digest = digest
        if ok and self._buf:
            self._put(bytes(self._buf))
        self._buf.clear()
        self._put(None if ok else self._ABORT)
        assert self._thread is not None
        self._thread.join()
        return self.result if ok and self.error is None else None


def _convert_layer(store: ImageStore, ref: Any, layer: Descriptor, opts: ConvertOptions,
                   progress: Progress | None, label: str,
                   cancel: threading.Event | None = None,
                   stream: _StreamUpload | None = None,
                   blob_written: Callable[[str], None] | None = None,
                   ) -> tuple[str, bool, list[str], str | None]:
    """Layer bootstrap path for one source layer (cached); (path, was_cached, blob ids,
    the new blob's id).  `stream`: where the new blob is uploaded as it is written;
    `blob_written(blob_id)`: called when its last byte was (see `create_image`)."""
    if layer.media_type in _ZSTD_LAYER_TYPES:
        raise UnsupportedError(f"{label}: zstd-compressed layers are not supported yet "
                               f"({layer.media_type})")
    if layer.media_type and layer.media_type not in _TAR_LAYER_TYPES:
        raise UnsupportedError(f"{label}: unsupported layer media type {layer.media_type}")
    key = _layer_key(layer.digest, opts)
    boot = os.path.join(opts.cache_dir, "layers", key + ".boot")
    blob_dir = os.path.join(opts.cache_dir, "blobs")
    if os.path.exists(boot):
        img = read_bootstrap_file(boot)
        if all(os.path.exists(os.path.join(blob_dir, b.blob_id)) for b in img.blobs):
            return boot, True, [b.blob_id for b in img.blobs], None
    done = 0

    def counted() -> Iterator[bytes]:
        nonlocal done
        for piece in store.open_blob_stream(ref, layer.digest, size=layer.size):
            if cancel is not None and cancel.is_set():
                raise _Cancelled(label)
            done += len(piece)
            if progress:
                progress(label, done, layer.size)
            yield piece

    from erofs_nydus.builder import BuildOptions, create_image

    source = io.BufferedReader(IterStream(counted()), buffer_size=1 << 20)
    bopts = BuildOptions(chunk_size=opts.chunk_size, compressor=opts.compressor,
                         digester=opts.digester, chunk_dicts=opts.chunk_dicts,
                         threads=opts.threads)
    res = create_image(source, boot, blob_dir, bopts, label=label,
                       blob_tee=stream.feed if stream is not None else None,
                       blob_written=blob_written)
    return (boot, False, [b.blob_id for b in res.blobs],
            res.new_blob.blob_id if res.new_blob is not None else None)


def push_nydus_image(store: ImageStore, ref: Any, bootstrap: str, blob_dir: str,
                     config: dict[str, Any], progress: Progress | None = None,
                     uploads: Mapping[str, Future[Any]] | None = None,
                     blob_ids: list[str] | None = None,
                     ) -> tuple[str, list[tuple[str, int]], str]:
    """Push a Nydus image: each blob of `bootstrap` (from `blob_dir`) as a nydus-blob
    layer, the bootstrap as the last tar.gz layer, `config` with matching rootfs and
    history, then the manifest.  `uploads`: blob id -> its upload already under way
    (waited for here, not pushed again).  The bootstrap layer and the config go up
    first, while those uploads finish: only the manifest needs every blob in place.
    `blob_ids`: the bootstrap's blob table, in order, when the caller knows it (else
    the bootstrap is parsed for it).
    Returns (manifest digest, [(blob id, size)], bootstrap layer digest)."""
    if blob_ids is None:
        blob_ids = [b.blob_id for b in read_bootstrap_file(bootstrap).blobs]
    layer_descs: list[Descriptor] = []
    blob_sizes: list[tuple[str, int]] = []
    for blob_id in blob_ids:
        size = os.path.getsize(os.path.join(blob_dir, blob_id))
        layer_descs.append(Descriptor(NYDUS_BLOB, f"sha256:{blob_id}", size,
                                      {ANNOTATION_NYDUS_BLOB: "true"}))
        blob_sizes.append((blob_id, size))
    with open(bootstrap, "rb") as f:
        boot_bytes = f.read()
    tgz, diff_id = bootstrap_layer_bytes(boot_bytes)
    boot_digest = store.push_blob(ref, tgz, sha256_digest(tgz))
    layer_descs.append(Descriptor(OCI_LAYER_GZIP, boot_digest, len(tgz), {
        ANNOTATION_NYDUS_BOOTSTRAP: "true", ANNOTATION_NYDUS_FS_VERSION: "6"}))
    config = dict(config)
    config["rootfs"] = {"type": "layers",
                        "diff_ids": [d.digest for d in layer_descs[:-1]] + [diff_id]}
    config["history"] = [{"created_by": "erofs-nydus convert: Nydus blob layer",
                          "comment": "nydus blob"} for _ in layer_descs[:-1]] + [
        {"created_by": "erofs-nydus convert: Nydus Bootstrap Layer",
         "comment": "nydus bootstrap"}]
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    cfg_digest = store.push_blob(ref, config_bytes, sha256_digest(config_bytes))
    for blob_id, size in blob_sizes:
        started = uploads.get(blob_id) if uploads is not None else None
        if started is not None:
            started.result()
        else:
            if progress:
                progress(f"push blob {blob_id[:12]}", 0, size)
            store.push_blob(ref, os.path.join(blob_dir, blob_id), f"sha256:{blob_id}")
            if progress:
                progress(f"push blob {blob_id[:12]}", size, size)
    manifest = build_image_manifest(Descriptor(OCI_CONFIG, cfg_digest, len(config_bytes)),
                                    layer_descs, media_type=OCI_MANIFEST)
    return store.put_manifest(ref, OCI_MANIFEST, manifest), blob_sizes, boot_digest


def _optimize_merged(merged: str, opts: ConvertOptions,
                     trace: dict[str, Any]) -> tuple[str, OptimizeResult]:
    """The merged bootstrap rebuilt by `opts.prefetch_trace`: traced chunks first in one
    new blob (in the layer cache's blob dir), with a prefetch table."""
    assert opts.prefetch_trace is not None
    with open(merged, "rb") as f:
        fsid = hashlib.sha256(f.read()).hexdigest()
    if trace.get("fsid") != fsid:
        raise UsageError(
            f"{opts.prefetch_trace}: the trace was recorded on another image (fsid "
            f"{str(trace.get('fsid'))[:12]}, this conversion gives {fsid[:12]}); trace a mount "
            f"of this source converted without --prefetch-trace and with the same "
            f"--chunk-size, --compressor and --chunk-dict")
    with open(opts.prefetch_trace, "rb") as f:
        key = hashlib.sha256(fsid.encode() + f.read()).hexdigest()
    out = os.path.join(os.path.dirname(merged), f"{key}.opt.boot")
    blob_dir = os.path.join(opts.cache_dir, "blobs")
    from erofs_nydus.builder.optimize import optimize_image

    res = optimize_image(merged, blob_dir, out, blob_dir, trace=opts.prefetch_trace)
    return out, res


class _LayoutUndo:
    """What `convert` creates for an ``oci:DIR`` target, removed again when it fails:
    the directories that did not exist (the topmost one, recursively), or in an existing
    directory the layout skeleton files it did not hold.  Registry targets: nothing."""

    SKELETON = ("oci-layout", "index.json", "blobs")

    def __init__(self, target: str) -> None:
        self.top: str | None = None
        self.new_files: list[str] = []
        if not target.startswith("oci:"):
            return
        path = os.path.abspath(parse_layout_reference(target).path)
        probe = path
        while not os.path.lexists(probe):
            self.top, probe = probe, os.path.dirname(probe)
        if self.top is None and os.path.isdir(path):
            self.new_files = [os.path.join(path, n) for n in self.SKELETON
                              if not os.path.lexists(os.path.join(path, n))]

    def run(self) -> None:
        if self.top is not None:
            shutil.rmtree(self.top, ignore_errors=True)
        for p in self.new_files:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(p)


class _Uploads:
    """Blob uploads on one thread, started as layers finish; `futures`: blob id -> upload.
    A layer's streamed upload is ended by a thread of its own (`finish_stream`), so the
    layer's thread goes on while the registry takes the last bytes."""

    def __init__(self, store: ImageStore, ref: Any, blob_dir: str,
                 progress: Progress | None, lock: threading.Lock) -> None:
        self.store, self.ref, self.blob_dir = store, ref, blob_dir
        self.progress, self.lock = progress, lock
        self.cancel = threading.Event()
        self.futures: dict[str, Future[Any]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="upload")
        self._enders: list[threading.Thread] = []

    def start(self, blob_id: str) -> None:
        with self.lock:
            if blob_id not in self.futures:
                self.futures[blob_id] = self._pool.submit(self._upload, blob_id)

    def finish_stream(self, stream: _StreamUpload, blob_ids: list[str],
                      new_blob: str | None, installed: threading.Event | None = None) -> None:
        """`stream` carried the whole of `blob_ids` (`new_blob`, the layer's new one): end
        it in a thread; a blob it did not carry whole goes up from its file there, once
        `installed` is set (the layer's files are in place; unset: they already are)."""
        pending: dict[str, Future[Any]] = {}
        with self.lock:
            for blob_id in blob_ids:
                if blob_id not in self.futures:
                    pending[blob_id] = self.futures[blob_id] = Future()
        t = threading.Thread(target=self._end_stream,
                             args=(stream, pending, new_blob, installed),
                             name=f"upload end {stream.label}", daemon=True)
        with self.lock:
            self._enders.append(t)
        t.start()

    def _end_stream(self, stream: _StreamUpload, pending: dict[str, Future[Any]],
                    new_blob: str | None, installed: threading.Event | None) -> None:
        streamed = stream.finish(True, f"sha256:{new_blob}" if new_blob else None)
        for blob_id, fut in pending.items():
            if streamed is not None and streamed[0] == f"sha256:{blob_id}":
                fut.set_result(streamed[0])
                continue
            if installed is not None:
                installed.wait()  # set when the layer's build returned or failed
            try:  # not streamed (or the stream failed): from the file, as `start` does
                fut.set_result(self._upload(blob_id))
            except BaseException as exc:
                fut.set_exception(exc)

    def _upload(self, blob_id: str) -> str:
        if self.cancel.is_set():
            raise _Cancelled(blob_id)
        path = os.path.join(self.blob_dir, blob_id)
        size = os.path.getsize(path)
        if self.progress:
            with self.lock:
                self.progress(f"push blob {blob_id[:12]}", 0, size)
        out = self.store.push_blob(self.ref, path, f"sha256:{blob_id}")
        if self.progress:
            with self.lock:
                self.progress(f"push blob {blob_id[:12]}", size, size)
        return out

    def close(self) -> None:
        """Cancel what has not started, wait for what has (joins the threads)."""
        self.cancel.set()
        with self.lock:
            enders = list(self._enders)
        for t in enders:
            t.join()
        self._pool.shutdown(wait=True, cancel_futures=True)


def single_layer_merge_is_identity(boots: list[str], opts: ConvertOptions) -> bool:
    """True when merging `boots` gives back the one layer bootstrap byte for byte: one
    layer, no chunk dictionary, and no whiteout name anywhere in it (names are stored
    verbatim in directory blocks, so a bootstrap without the bytes ".wh." has none; a
    false positive only costs a real merge).  The merge of such a layer applies it onto
    an empty tree and keeps every blob and chunk (tests/test_convert_pipeline.py checks
    the identity)."""
    if len(boots) != 1 or opts.chunk_dicts:
        return False
    with open(boots[0], "rb") as f:
        return b".wh." not in f.read()


def _convert_layers(store: ImageStore, ref: Any, layers: list[Descriptor], opts: ConvertOptions,
                    progress: Progress | None, lock: threading.Lock,
                    uploads: _Uploads | None,
                    layer_done: Callable[[str], None] | None = None,
                    ) -> tuple[list[str], int, dict[str, list[str]]]:
    """Convert `layers`, up to `opts.jobs` at once; with `uploads`, start uploading each
    layer's blobs as soon as the layer is done.  On the first failure the other layers
    stop reading their sources and every layer thread is joined before it is raised.
    `layer_done(bootstrap)` runs on the calling thread as each layer is done, while
    the others convert.  Returns (layer bootstraps in manifest order, how many were
    cached, each layer bootstrap's blob ids in its blob table's order)."""
    cancel = threading.Event()

    def locked_progress(label: str, done: int, total: int) -> None:
        assert progress is not None
        with lock:
            progress(label, done, total)

    def one(i: int, layer: Descriptor) -> tuple[str, bool, list[str]]:
        label = f"layer {i + 1}/{len(layers)} {layer.digest[7:19]}"
        push_stream = getattr(uploads.store, "push_blob_stream", None) if uploads else None
        stream = None
        if uploads is not None and push_stream is not None:
            stream = _StreamUpload(functools.partial(push_stream, uploads.ref), label)
        installed = threading.Event()  # this layer's build returned (or failed)
        ended: list[str] = []

        def blob_written(blob_id: str) -> None:
            # the new blob's last byte is in the stream: the registry checks its digest
            # while the builder syncs the blob and builds the layer bootstrap
            assert uploads is not None and stream is not None
            ended.append(blob_id)
            uploads.finish_stream(stream, [blob_id], blob_id, installed)

        try:
            boot, was_cached, blob_ids, new_blob = _convert_layer(
                store, ref, layer, opts, locked_progress if progress else None, label, cancel,
                stream, blob_written if stream is not None else None)
        except BaseException:
            installed.set()
            if stream is not None and not ended:
                stream.finish(False)  # aborted, its thread joined
            raise
        installed.set()
        if stream is not None and not ended:
            assert uploads is not None
            uploads.finish_stream(stream, blob_ids, new_blob)  # in a thread of its own
        elif uploads is not None:
            for blob_id in blob_ids:  # the streamed blob's upload is already registered
                uploads.start(blob_id)
        return boot, was_cached, blob_ids

    # a layer digest listed twice is converted once
    unique = {layer.digest: (i, layer) for i, layer in reversed(list(enumerate(layers)))}
    futures: dict[str, Future[tuple[str, bool, list[str]]]] = {}
    failed = True
    with ThreadPoolExecutor(min(opts.jobs, max(1, len(unique))),
                            thread_name_prefix="layer") as pool:
        try:
            # largest layer first (then manifest order): the last layers to start are the
            # small ones, so the jobs end together instead of one big layer converting
            # alone at the end; the output does not depend on the order
            for digest, (i, layer) in sorted(unique.items(),
                                             key=lambda kv: (-kv[1][1].size, kv[1][0])):
                futures[digest] = pool.submit(one, i, layer)
            # what the end needs, loaded while the layers convert (not before they start)
            import erofs_nydus.builder.merge  # noqa: F401
            running = set(futures.values())
            while running:
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for f in futures.values():
                    if f.done() and not f.cancelled() and f.exception() is not None:
                        raise f.exception()  # type: ignore[misc]
                if layer_done is not None:
                    for f in done:
                        layer_done(f.result()[0])
            results = {d: f.result() for d, f in futures.items()}
            failed = False
        finally:
            if failed:
                cancel.set()
                for f in futures.values():
                    f.cancel()
    boots = [results[layer.digest][0] for layer in layers]
    cached = sum(results[layer.digest][1] for layer in layers)
    return boots, cached, {boot: blobs for boot, _, blobs in results.values()}


def convert_image(source: str, target: str, opts: ConvertOptions,
                  progress: Progress | None = None,
                  warn: Callable[[str], None] | None = None) -> ConvertResult:
    # a bad trace file fails now, not after converting every layer
    trace = None
    if opts.prefetch_trace:
        from erofs_nydus.builder.optimize import load_trace

        trace = load_trace(opts.prefetch_trace)
    undo = _LayoutUndo(target)
    threading.Thread(target=_import_builder, name="import builder", daemon=True).start()
    src_store, src_ref = open_image_store(source, **opts.client_options)
    try:
        dst_store, dst_ref = open_image_store(target, create=True, **opts.client_options)
    except BaseException:
        src_store.close()
        undo.run()
        raise
    uploads: _Uploads | None = None
    try:
        man = src_store.get_manifest(src_ref, opts.platform)
        descs = manifest_blobs(man.data)
        config_desc, layers = descs[0], descs[1:]
        config = parse_json_document(
            src_store.get_blob(src_ref, config_desc.digest, size=config_desc.size))
        if opts.jobs < 1:
            raise UsageError(f"--jobs {opts.jobs}: must be at least 1")
        lock = threading.Lock()
        if trace is None:  # with a trace the optimized image has other blobs
            uploads = _Uploads(dst_store, dst_ref, os.path.join(opts.cache_dir, "blobs"),
                               progress, lock)
        # the merge's reading of each layer bootstrap (and its tree) is done as the layer
        # is built, while the others convert: the merge after the last one is shorter
        ahead: dict[str, LoadedLayer] = {}
        layer_done = None
        if len(layers) > 1 or opts.chunk_dicts:
            def layer_done(boot: str) -> None:
                from erofs_nydus.builder.merge import preload

                if boot not in ahead:
                    got = preload(boot, validate=False)
                    if got is not None:
                        ahead[boot] = got

        boots, cached, layer_blobs = _convert_layers(src_store, src_ref, layers, opts,
                                                     progress, lock, uploads, layer_done)
        work = os.path.join(opts.cache_dir, "images")
        os.makedirs(work, exist_ok=True)
        merged = os.path.join(work, hashlib.sha256(
            "|".join([man.digest, *boots]).encode()).hexdigest() + ".boot")
        if not single_layer_merge_is_identity(boots, opts):
            # layer bootstraps come from our own cache: skip re-validating each one
            from erofs_nydus.builder.merge import merge_bootstraps

            res = merge_bootstraps(boots, merged, warn or (lambda m: None), validate=False,
                                   loaded=ahead)
            blob_ids: list[str] | None = [b.blob_id for b in res.blobs]
        else:
            from erofs_nydus.builder.create import write_file_atomic

            with open(boots[0], "rb") as f:
                write_file_atomic(merged, f.read())
            blob_ids = layer_blobs[boots[0]]
        boot, optimized = merged, None
        if trace is not None:
            boot, optimized = _optimize_merged(merged, opts, trace)
            blob_ids = None  # other blobs: read from the optimized bootstrap
        digest, blob_sizes, boot_digest = push_nydus_image(
            dst_store, dst_ref, boot, os.path.join(opts.cache_dir, "blobs"), config, progress,
            uploads.futures if uploads is not None else None, blob_ids)
        return ConvertResult(target=target, manifest_digest=digest, bootstrap=boot,
                             blobs=blob_sizes, layers_converted=len(layers) - cached,
                             layers_cached=cached, bootstrap_layer_digest=boot_digest,
                             prefetch=optimized)
    except BaseException:
        if uploads is not None:
            uploads.close()  # before the store closes and the layout is undone
        dst_store.close()
        undo.run()
        raise
    finally:
        if uploads is not None:
            uploads.close()
        src_store.close()
        dst_store.close()
