"""The `erofs-nydus` command line.

Thin commands: parse options, call one core function, print the result.  Every
`ErofsNydusError` becomes a one-line message on stderr and the error's exit code;
nothing a user can cause ends in a traceback.

Command groups live in sibling modules (one per area) that register themselves on
`main` when imported; `COMMANDS` below is the only place that names them.  A run
imports only the module of the command it runs (all of them for the help listing):
`mount` and `umount` are the hot path of a container start and load nothing of the
builder's or the registry's commands.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from erofs_nydus import as_program
from erofs_nydus.errors import ErofsNydusError

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


class _Group(click.Group):
    """A click group that turns project errors into clean messages and exit codes, and
    imports a command's module when the command is looked up."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            _load_module(COMMANDS[cmd_name])
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        load_commands()
        return super().list_commands(ctx)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ErofsNydusError as exc:
            click.echo(f"erofs-nydus: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("erofs-nydus: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:
            sys.exit(141)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="erofs_nydus")
def main() -> None:
    """Build RAFS v6 (Nydus) images and mount them lazily with the Linux kernel.

    Images are an EROFS metadata "bootstrap" plus chunked, compressed data blobs.
    A daemon fills each blob's uncompressed address space on demand, through
    fanotify pre-content hooks (Linux >= 6.14) or /dev/cachefiles (fscache).
    """


def run() -> None:
    """Process entry point (console script, ``python -m erofs_nydus.cli``)."""
    as_program()
    main()


def _load_module(name: str) -> None:
    try:
        importlib.import_module(f"erofs_nydus.cli.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"erofs_nydus.cli.{name}":
            raise


def load_commands() -> None:
    """Register every command on `main` (what listing them needs)."""
    for name in COMMAND_MODULES:
        _load_module(name)
