"""The daemon's blob backend over a registry: `read_range` maps to a Range GET.

blob_id is the blob's sha256 in hex; the registry names the blob ``sha256:<blob_id>``
in the repository given at construction.  Every read runs under `deadline` seconds
(retries included) and raises BackendError past it, never hangs.
"""

from __future__ import annotations

import re
from typing import Any

from erofs_nydus.errors import BackendError, ErofsNydusError, UsageError
from erofs_nydus.registry.client import RegistryClient
from erofs_nydus.registry.reference import ImageReference, as_image_reference

_BLOB_ID_RE = re.compile(r"^[0-9a-f]{64}$")


class RegistryBackend:
    """`BlobBackend` reading blobs of one repository through a `RegistryClient`.

    `repo`: an ImageReference or ``host[:port]/repo`` (a tag or digest is ignored).
    `deadline`: seconds per read_range, retries included.  `owns_client`: close the
    client in `close()`.
    """

    def __init__(
        self,
        client: RegistryClient,
        repo: ImageReference | str,
        *,
        deadline: float = 60.0,
        owns_client: bool = False,
    ) -> None:
        self.client = client
        self.repo = as_image_reference(repo)
        self.deadline = deadline
        self.owns_client = owns_client

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> RegistryBackend:
        """Build from a daemon backend spec (JSON-able, no secrets)::

            {"type": "registry", "repo": "host:port/name", "plain_http": false | true |
             "loopback", "deadline": 60, "timeout": 30, "retries": 5,
             "docker_config": "/path/to/dir" | null, "verify": true | "/ca.pem"}

        Credentials come from Docker's config.json at run time, never from the spec.
        """
        if spec.get("type") != "registry" or not isinstance(spec.get("repo"), str):
            raise UsageError(f"not a registry backend spec: {spec!r}")
        deadline = float(spec.get("deadline", 60.0))
        client = RegistryClient(
            plain_http=spec.get("plain_http", False),
            verify=spec.get("verify", True),
            docker_config=spec.get("docker_config"),
            timeout=float(spec.get("timeout", min(30.0, deadline))),
            retries=int(spec.get("retries", 5)),
            deadline=deadline,
        )
        return cls(client, spec["repo"], deadline=deadline, owns_client=True)

    def spec(self) -> dict[str, Any]:
        """The spec `from_spec` takes (client options that matter for reads)."""
        return {
            "type": "registry",
            "repo": self.repo.name,
            "plain_http": self.client.plain_http,
            "deadline": self.deadline,
            "timeout": self.client.timeout,
            "retries": self.client.retries,
        }

    def read_range(self, blob_id: str, offset: int, length: int) -> bytes:
        if not _BLOB_ID_RE.match(blob_id):
            raise BackendError(f"invalid blob id {blob_id!r}: expected 64 lower-case hex digits")
        try:
            data = self.client.read_blob_range(
                self.repo, f"sha256:{blob_id}", offset, length, deadline=self.deadline
            )
        except BackendError:
            raise
        except ErofsNydusError as exc:  # DigestMismatchError, UsageError
            raise BackendError(f"blob {blob_id} in {self.repo.name}: {exc}") from exc
        except Exception as exc:  # never let a library error escape the daemon's contract
            raise BackendError(
                f"blob {blob_id} in {self.repo.name}: {type(exc).__name__}: {exc}"
            ) from exc
        if len(data) != length:
            raise BackendError(
                f"blob {blob_id}: short read at {offset}+{length} (got {len(data)} bytes)"
            )
        return data

    def close(self) -> None:
        if self.owns_client:
            self.client.close()
