"""erofs_nydus: RAFS v6 (Nydus) images and an on-demand EROFS daemon."""

__version__ = "0.1.0"


def as_program() -> None:
    """Call first in a process this package starts as a program (the CLI, the daemon).

    httpcore imports trio at import time when it is installed, only to detect it: about
    0.15 s warm and 0.4 s with a cold page cache on every process that reaches the HTTP
    stack.  httpx's package imports its command-line tool (`httpx._main`: click, rich,
    pygments; about 0.05 s) only to offer it as `httpx.main`.  Nothing here runs on trio
    (anyio uses asyncio) or calls `httpx.main`, so such a process marks both absent
    (httpx then defines a stub `main`).  Importing the package as a library does not.
    """
    import sys

    sys.modules.setdefault("trio", None)  # type: ignore[arg-type]
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
