"""The click group `main` every command module registers on."""

from __future__ import annotations

import sys
from typing import Any

import click

from erofs_nydus.cli import COMMANDS, load_commands, load_module
from erofs_nydus.errors import ErofsNydusError

__all__ = ["main"]


class _Group(click.Group):
    """A click group that turns project errors into clean messages and exit codes, and
    imports a command's module when the command is looked up."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            load_module(COMMANDS[cmd_name])
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
