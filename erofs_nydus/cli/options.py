"""The config file's command-line flags as click options (`config_options`), and the
SIZE parameter type.  The merging itself is click-free (`config.merge_flags`): the
lean entry of the hot commands (`cli.fast`) uses it without click."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import click

from erofs_nydus.config import (
    DEFAULT_CONFIG_PATH,
    ENV_VAR,
    SHARED_OPTIONS,
    Config,
    merge_flags,
    parse_size,
)

__all__ = ["SIZE", "SizeParam", "config_options", "effective_config"]


class SizeParam(click.ParamType[int]):
    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeParam()
F = TypeVar("F", bound=Callable[..., Any])

# Options that only exist for the config (mount has its own for the shared ones).
_OWN_OPTIONS: list[Callable[[F], F]] = [
    click.option("--config", "config_path", type=click.Path(dir_okay=False),
                 help=f"Settings file (default ${ENV_VAR}, else {DEFAULT_CONFIG_PATH})."),
    click.option("--prefetch/--no-prefetch", "cfg_prefetch", default=None,
                 help="Prefetch the image's prefetch table in the background [config: on]."),
    click.option("--prefetch-threads", "cfg_prefetch_threads", type=click.IntRange(1, 256),
                 help="Concurrent prefetch fills [config: 4]."),
    click.option("--prefetch-bandwidth", "cfg_prefetch_bandwidth", type=SIZE,
                 help="Prefetch bandwidth limit, bytes/s with K/M/G (0: none) [config: 0]."),
    click.option("--retries", "cfg_retries", type=click.IntRange(0, 100),
                 help="Registry: retries per range read [config: 3]."),
    click.option("--credentials", "cfg_credentials", type=click.Path(),
                 help="Registry: Docker config dir or config.json with credentials."),
    click.option("--mirror", "cfg_mirrors", multiple=True, metavar="URL",
                 help="Registry: a mirror (scheme://host[:port]) for blob reads, tried in "
                 "order before the origin; nydusd's defaults [config: backend.mirrors]."),
    click.option("--proxy", "cfg_proxy", metavar="URL",
                 help="Registry: an HTTP proxy for blob reads, falling back to the origin "
                 "[config: backend.proxy]."),
]  # fmt: skip


def effective_config(ctx: click.Context, kwargs: dict[str, Any]) -> Config:
    """Pop this module's options from `kwargs`; merge file and flags; update the
    shared options in `kwargs` where they were not given on the command line."""
    not_given = (None, click.core.ParameterSource.DEFAULT,
                 click.core.ParameterSource.DEFAULT_MAP)
    given = {param for param, _ in SHARED_OPTIONS
             if param in kwargs and ctx.get_parameter_source(param) not in not_given}
    return merge_flags(kwargs, given)


def config_options(f: F) -> F:
    """Add the config options to a command.  The command gets the shared options
    already merged with the file, and `current_config()` returns the whole."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        ctx.meta["erofs_nydus.config"] = effective_config(ctx, kwargs)
        return f(*args, **kwargs)

    out: Callable[..., Any] = wrapper
    for opt in reversed(_OWN_OPTIONS):
        out = opt(out)
    return out  # type: ignore[return-value]
