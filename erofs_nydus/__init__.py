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

    global PROGRAM
    PROGRAM = True
    sys.modules.setdefault("trio", None)  # type: ignore[arg-type]
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


PROGRAM = False  # as_program() was called: this process is one of our programs


def batch_gc() -> None:
    """Call in a program's one-shot build (convert) once its imports are done.

    A build keeps a few objects per file and per chunk until it ends (the tree, the
    chunk lists), so the cyclic GC's full collections rescan a growing heap again and
    again, holding the GIL the pipeline's threads need: about 0.15 s of CPU on the
    debootstrap image (6.7k files).  Freeze what the imports made (never garbage) and
    collect the young generation every 20k allocations instead of 700.  A no-op unless
    `as_program()` ran (a test or a library caller keeps its own GC settings).
    """
    if PROGRAM:
        import gc

        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
