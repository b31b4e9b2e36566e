"""The `erofs-nydus` command line.

Thin commands: parse options, call one core function, print the result.  Every
`ErofsNydusError` becomes a one-line message on stderr and the error's exit code;
nothing a user can cause ends in a traceback.

Command groups live in sibling modules (one per area) that register themselves on
`main` (the click group, `cli.group`) when imported; `COMMANDS` below is the only
place that names them.  A run imports only the module of the command it runs (all of
them for the help listing).  `mount` and `umount` are the hot path of a container
start: `run` first offers the arguments to `cli.fast`, which runs them without
importing click when it understands every one of them; anything else (help, an
unknown or rarer option, a value click would refuse) goes to click, so the output
and errors are click's.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from erofs_nydus import as_program

if TYPE_CHECKING:  # at run time made on first use (`__getattr__`)
    from erofs_nydus.cli.group import main as main

# command name -> sibling module defining it
COMMANDS = {
    "create": "build", "check": "build", "inspect": "build", "merge": "build",
    "stat": "build", "optimize": "build",
    "mount": "runtime", "umount": "runtime", "mount-stats": "runtime", "daemon": "runtime",
    "warm": "runtime",
    "convert": "registry",
    "trace": "ops", "ctl": "ops", "config": "ops", "cache": "ops",
}  # fmt: skip
COMMAND_MODULES = tuple(dict.fromkeys(COMMANDS.values()))


def __getattr__(name: str) -> Any:
    """`main` (the click group) is made on first use: the lean entry never needs it."""
    if name == "main":
        from erofs_nydus.cli.group import main as main

        return main
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run() -> None:
    """Process entry point (console script, ``python -m erofs_nydus.cli``)."""
    as_program()
    from erofs_nydus.cli.fast import run_fast

    if run_fast(sys.argv[1:]):
        return
    from erofs_nydus.cli.group import main as main

    main()


def load_module(name: str) -> None:
    """Import the command module `name` (registering its commands)."""
    try:
        importlib.import_module(f"erofs_nydus.cli.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"erofs_nydus.cli.{name}":
            raise


def load_commands() -> None:
    """Register every command on `main` (what listing them needs)."""
    for name in COMMAND_MODULES:
        load_module(name)
