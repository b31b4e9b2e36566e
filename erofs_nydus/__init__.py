"""erofs_nydus: RAFS v6 (Nydus) images and an on-demand EROFS daemon."""

__version__ = "0.1.0"


def as_program() -> None:
    """Call first in a process this package starts as a program (the CLI, the daemon).

    httpcore imports trio at import time when it is installed, only to detect it: about
    0.15 s warm and 0.4 s with a cold page cache on every process that reaches the HTTP
    stack.  Nothing here runs on trio (anyio uses asyncio), so such a process marks it
    absent.  Importing the package as a library does not.
    """
    import sys

    sys.modules.setdefault("trio", None)  # type: ignore[arg-type]
