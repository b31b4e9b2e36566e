"""One error hierarchy for the whole project.

Library code raises these; only the CLI turns them into exit codes and one-line
messages.  Each error also inherits the builtin that fits, so callers that only
know the standard library can still catch it sensibly.
"""

from __future__ import annotations


class ErofsNydusError(Exception):
    """Base of every error this project raises on purpose."""

    exit_code = 1


class FormatError(ErofsNydusError, ValueError):
    """On-disk data (bootstrap, blob, chunk table) is corrupt or violates the format."""

    exit_code = 3


class UnsupportedError(ErofsNydusError):
    """Valid input that uses a feature this project does not support."""

    exit_code = 4


class SourceError(ErofsNydusError):
    """Bad build input: unreadable file, corrupt tar/gzip, unsafe path, dangling hard link."""

    exit_code = 2


class UsageError(ErofsNydusError):
    """Options that do not fit together, or arguments out of range."""

    exit_code = 2


class DigestMismatchError(ErofsNydusError):
    """Bytes whose sha256 differs from the digest that names them."""

    exit_code = 5


class ProtocolError(ErofsNydusError):
    """A kernel message (cachefiles, fanotify) that does not parse."""


class KernelError(ErofsNydusError, OSError):
    """A syscall the kernel refused (mount, fanotify_init, /dev/cachefiles...)."""


class DaemonError(ErofsNydusError):
    """The on-demand daemon could not start, serve, or be reached."""


class DaemonStopping(DaemonError):
    """The daemon is stopping (its last image went): the request was not served; a new
    daemon serves it."""


class BackendError(ErofsNydusError, OSError):
    """A blob backend (local dir, registry) could not deliver the requested bytes."""


class RegistryError(BackendError):
    """The OCI registry answered with an error or unexpected content."""


class AuthError(RegistryError):
    """Credentials missing or refused by the registry."""


class NotFoundError(RegistryError, FileNotFoundError):
    """Image, tag, manifest or blob does not exist."""


class UnsafePathError(ErofsNydusError, PermissionError):
    """A cache dir or a file in it that someone else could control: a symlink, a dir
    owned by another user or writable by group/others, a non-regular file."""
