"""OCI image layouts on disk (``oci:DIR[:tag]``), with the same API as `RegistryClient`.

A layout is ``DIR/oci-layout`` (``{"imageLayoutVersion": "1.0.0"}``), ``DIR/index.json``
(an image index whose entries carry ``org.opencontainers.image.ref.name`` = tag) and
``DIR/blobs/sha256/<hex>``.  Blobs are written to a temporary file, verified and
renamed into place; index.json is replaced atomically under an flock of DIR, so
concurrent writers (threads or processes) do not lose each other's tags.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from erofs_nydus.errors import (
    DigestMismatchError,
    NotFoundError,
    RegistryError,
    SourceError,
    UsageError,
)
from erofs_nydus.fsutil import atomic_write
from erofs_nydus.registry.client import (
    DEFAULT_CHUNK,
    MAX_CONFIG_SIZE,
    MAX_MANIFEST_SIZE,
    BlobData,
    BlobSource,
    blob_bound,
    note_limit,
)
from erofs_nydus.registry.manifest import (
    ANNOTATION_REF_NAME,
    INDEX_TYPES,
    OCI_INDEX,
    Descriptor,
    ManifestResult,
    Platform,
    detect_media_type,
    select_platform,
    sha256_digest,
)
from erofs_nydus.registry.reference import (
    ImageReference,
    Reference,
    check_digest,
    parse_layout_reference,
)

LAYOUT_VERSION = "1.0.0"


class OCILayout:
    """Read and write one OCI image layout directory.

    `create`: make the directory and its skeleton when missing (for writing).
    The `repo` / `ref` arguments mirror `RegistryClient`; a layout reference's
    path is not re-checked (this object is bound to its directory), only its tag
    and digest are used.
    """

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False) -> None:
        self.path = Path(path)
        marker = self.path / "oci-layout"
        if not marker.exists():
            if not create:
                raise NotFoundError(f"{self.path}: not an OCI image layout (no oci-layout file)")
            (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            atomic_write(marker, json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode())
        else:
            try:
                version = json.loads(marker.read_bytes()).get("imageLayoutVersion")
            except (ValueError, AttributeError, OSError) as exc:
                raise SourceError(f"{marker}: unreadable oci-layout file ({exc})") from None
            if not isinstance(version, str) or not version.startswith("1."):
                raise SourceError(f"{marker}: unsupported imageLayoutVersion {version!r}")
        if not (self.path / "index.json").exists():
            if not create:
                raise NotFoundError(f"{self.path}: OCI layout without index.json")
            (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            self._write_index({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})

    # -- helpers ----------------------------------------------------------------

    def __enter__(self) -> OCILayout:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def blob_path(self, digest: str) -> Path:
        check_digest(digest)
        return self.path / "blobs" / "sha256" / digest[len("sha256:") :]

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_index(self) -> dict[str, Any]:
        path = self.path / "index.json"
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_MANIFEST_SIZE + 1)
            if len(data) > MAX_MANIFEST_SIZE:
                raise SourceError(f"{path}: larger than {MAX_MANIFEST_SIZE >> 20} MiB "
                                  "(MAX_MANIFEST_SIZE)")
            obj = json.loads(data)
        except FileNotFoundError:
            raise NotFoundError(f"{self.path}: OCI layout without index.json") from None
        except (ValueError, OSError) as exc:
            raise SourceError(f"{path}: unreadable ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("manifests", []), list):
            raise SourceError(f"{path}: not an image index")
        obj.setdefault("manifests", [])
        return obj

    def _write_index(self, index: dict[str, Any]) -> None:
        data = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
        atomic_write(self.path / "index.json", data)

    def list_refs(self) -> dict[str, Descriptor]:
        """Tag -> descriptor for every named entry of index.json."""
        out: dict[str, Descriptor] = {}
        for entry in self._read_index()["manifests"]:
            desc = Descriptor.from_json(entry)
            name = desc.annotations.get(ANNOTATION_REF_NAME)
            if name:
                out[name] = desc
        return out

    def _tag_and_digest(self, ref: Reference | str | None) -> tuple[str | None, str | None]:
        if ref is None:
            return None, None
        if isinstance(ref, str):
            if ref.startswith("oci:"):
                ref = parse_layout_reference(ref)
            elif ref.startswith("sha256:"):
                return None, check_digest(ref)
            else:
                return ref, None
        if isinstance(ref, ImageReference):
            raise UsageError(f"{ref} is a registry image, not an OCI layout reference")
        return ref.tag, ref.digest

    def _resolve(self, ref: Reference | str | None) -> Descriptor:
        tag, digest = self._tag_and_digest(ref)
        entries = [Descriptor.from_json(e) for e in self._read_index()["manifests"]]
        if digest is not None:
            for e in entries:
                if e.digest == digest:
                    return e
            path = self.blob_path(digest)
            if not path.exists():
                raise NotFoundError(f"oci:{self.path}@{digest}: manifest not found")
            data = self.get_blob(
                None, digest, max_size=MAX_MANIFEST_SIZE, limit_name="MAX_MANIFEST_SIZE"
            )
            return Descriptor(detect_media_type(data), digest, len(data))
        if tag is None:
            if len(entries) == 1:
                return entries[0]
            names = sorted(e.annotations.get(ANNOTATION_REF_NAME, e.digest) for e in entries)
            raise NotFoundError(
                f"oci:{self.path}: holds {len(entries)} images, name one with oci:DIR:TAG "
                f"(available: {', '.join(names) or 'none'})"
            )
        matches = [e for e in entries if e.annotations.get(ANNOTATION_REF_NAME) == tag]
        if not matches:
            names = sorted(self.list_refs())
            raise NotFoundError(
                f"oci:{self.path}:{tag}: no such tag (available: {', '.join(names) or 'none'})"
            )
        return matches[-1]

    # -- manifests --------------------------------------------------------------

    def _manifest_blob(self, desc: Descriptor) -> ManifestResult:
        data = self.get_blob(
            None, desc.digest, max_size=MAX_MANIFEST_SIZE, limit_name="MAX_MANIFEST_SIZE"
        )
        media_type = desc.media_type or detect_media_type(data)
        return ManifestResult(media_type, data, desc.digest)

    def get_manifest(
        self,
        ref: Reference | str | None = None,
        platform: str | Platform | None = None,
        *,
        resolve: bool = True,
        deadline: float | None = None,
    ) -> ManifestResult:
        """The manifest named by `ref`'s tag or digest (None: the layout's only image)."""
        result = self._manifest_blob(self._resolve(ref))
        if resolve and result.media_type in INDEX_TYPES:
            entry = select_platform(result.data, platform, name=f"oci:{self.path}")
            result = self._manifest_blob(entry)
        return result

    def put_manifest(
        self,
        ref: Reference | str | None,
        media_type: str,
        data: bytes,
        *,
        platform: Platform | None = None,
        annotations: dict[str, str] | None = None,
        deadline: float | None = None,
    ) -> str:
        """Store the manifest blob and point `ref`'s tag at it in index.json."""
        tag, want = self._tag_and_digest(ref)
        digest = sha256_digest(data)
        if want is not None and want != digest:
            raise DigestMismatchError(f"manifest for oci:{self.path}: content has digest {digest}")
        self.push_blob(None, data, digest)
        notes = dict(annotations or {})
        if tag is not None:
            notes[ANNOTATION_REF_NAME] = tag
        entry = Descriptor(media_type, digest, len(data), notes, platform).to_json()
        with self._locked():
            index = self._read_index()
            kept = []
            for e in index["manifests"]:
                if not isinstance(e, dict):
                    continue
                name = (e.get("annotations") or {}).get(ANNOTATION_REF_NAME)
                if tag is not None and name == tag:
                    continue  # the tag moves to the new manifest
                if tag is None and name is None and e.get("digest") == digest:
                    continue
                kept.append(e)
            kept.append(entry)
            index["manifests"] = kept
            index.setdefault("schemaVersion", 2)
            self._write_index(index)
        return digest

    # -- blobs ------------------------------------------------------------------

    def blob_size(
        self, repo: Reference | str | None, digest: str, *, deadline: float | None = None
    ) -> int | None:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def blob_exists(
        self, repo: Reference | str | None, digest: str, *, deadline: float | None = None
    ) -> bool:
        return self.blob_size(repo, digest) is not None

    def open_blob_stream(
        self,
        repo: Reference | str | None,
        digest: str,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        deadline: float | None = None,
        max_size: int | None = None,
        size: int | None = None,
        limit_name: str | None = None,
    ) -> Iterator[bytes]:
        """Iterate the blob; sha256 is checked, a mismatch raises at the end.

        Bounds as `RegistryClient.open_blob_stream`: a blob file larger than
        `max_size` or the descriptor's `size` is refused before it is read."""
        path = self.blob_path(digest)
        if chunk_size <= 0:
            raise UsageError("chunk_size must be positive")
        what = f"oci:{self.path}: blob {digest}"
        bound = blob_bound(what, max_size, size, limit_name)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError:
            raise NotFoundError(f"{what} not found") from None
        try:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SourceError(f"{what} is not a regular file")
            if bound is not None and st.st_size > bound[0]:
                raise note_limit("blob", f"{what}: {st.st_size} bytes exceed {bound[1]}")
        except BaseException:
            f.close()
            raise
        return self._stream(f, digest, chunk_size)

    def _stream(self, f: Any, digest: str, chunk_size: int) -> Iterator[bytes]:
        hasher = hashlib.sha256()
        with f:
            while piece := f.read(chunk_size):
                hasher.update(piece)
                yield piece
        actual = "sha256:" + hasher.hexdigest()
        if actual != digest:
            raise DigestMismatchError(f"oci:{self.path}: blob {digest} has digest {actual}")

    def get_blob(
        self,
        repo: Reference | str | None,
        digest: str,
        *,
        deadline: float | None = None,
        max_size: int = MAX_CONFIG_SIZE,
        size: int | None = None,
        limit_name: str | None = None,
    ) -> bytes:
        if limit_name is None and max_size == MAX_CONFIG_SIZE:
            limit_name = "MAX_CONFIG_SIZE"
        return b"".join(
            self.open_blob_stream(
                repo, digest, max_size=max_size, size=size, limit_name=limit_name
            )
        )

    def read_blob_range(
        self,
        repo: Reference | str | None,
        digest: str,
        offset: int,
        length: int,
        *,
        deadline: float | None = None,
    ) -> bytes:
        if offset < 0 or length < 0:
            raise UsageError(f"invalid range {offset}+{length}")
        path = self.blob_path(digest)
        try:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            raise NotFoundError(f"oci:{self.path}: blob {digest} not found") from None
        if len(data) != length:
            raise RegistryError(f"oci:{self.path}: blob {digest}: short read at {offset}+{length}")
        return data

    def push_blob(
        self,
        repo: Reference | str | None,
        data: BlobData,
        digest: str | None = None,
        *,
        mount_from: Iterable[Reference | str] = (),
        chunk_size: int | None = None,
        deadline: float | None = None,
    ) -> str:
        """Copy the blob into blobs/sha256 (verified); returns its digest."""
        if digest is not None:
            check_digest(digest)
            if self.blob_exists(repo, digest):
                return digest
        source = BlobSource(data)
        blob_dir = self.path / "blobs" / "sha256"
        blob_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=blob_dir, prefix=".upload-")
        try:
            hasher = hashlib.sha256()
            with os.fdopen(fd, "wb") as f:
                for piece in source.iter(0, source.size):
                    hasher.update(piece)
                    f.write(piece)
                f.flush()
                os.fsync(f.fileno())
            actual = "sha256:" + hasher.hexdigest()
            if digest is not None and actual != digest:
                raise DigestMismatchError(f"blob for oci:{self.path}: data has digest {actual}")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.blob_path(actual))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return actual
