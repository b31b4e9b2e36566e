"""The lean entry of the hot commands: `mount` and `umount` without click.

Importing click and building its command tree is most of what `erofs-nydus mount`
spends before its first useful system call.  `run_fast` parses the arguments of the
common invocations itself and runs the command body (`cli.mounting`), with the error
handling of the click group (one line on stderr, the error's exit code).  It accepts
an invocation only when it can tell that click would accept it too and call the
command with the same values; anything else - help, an option not in the tables below,
a value click would refuse or whose conversion is in doubt, `--` - returns False and
`cli.run` hands the whole argv to click, so help texts and usage errors stay click's.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable
from typing import Any

from erofs_nydus.errors import ErofsNydusError

__all__ = ["run_fast"]


class _Decline(Exception):
    """Not for the lean entry: let click parse the arguments."""


def _dir_exists(v: str) -> str:  # click.Path(exists=True, file_okay=False)
    if not os.path.isdir(v) or not os.access(v, os.R_OK):
        raise _Decline
    return v


def _path(file_okay: bool = True, dir_okay: bool = True) -> Callable[[str], str]:
    """click.Path(exists=False, ...): checked only when it exists."""

    def check(v: str) -> str:
        try:
            st = os.stat(v)
        except OSError:
            return v
        if ((not file_okay and not stat.S_ISDIR(st.st_mode))
                or (not dir_okay and stat.S_ISDIR(st.st_mode))
                or not os.access(v, os.R_OK)):
            raise _Decline
        return v

    return check


def _int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def check(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise _Decline from None
        if n < lo or (hi is not None and n > hi):
            raise _Decline
        return n

    return check


def _float_min(lo: float) -> Callable[[str], float]:
    def check(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            raise _Decline from None
        if not x >= lo:  # NaN too: click's decision
            raise _Decline
        return x

    return check


def _choice(*choices: str) -> Callable[[str], str]:
    def check(v: str) -> str:
        if v not in choices:
            raise _Decline
        return v

    return check


def _text(v: str) -> str:
    return v


Flag = tuple[str, Any]  # (parameter, value it sets)
Valued = tuple[str, Callable[[str], Any]]  # (parameter, conversion)

# `mount`: its own options and the config options (`cli.options`) most runs use;
# --prefetch-bandwidth, --credentials, --mirror and --proxy go through click.
_MOUNT_FLAGS: dict[str, Flag] = {
    "--plain-http": ("plain_http", True),
    "--buffered-cache": ("buffered_cache", True),
    "--no-buffered-cache": ("buffered_cache", False),
    "--allow-suid-dev": ("allow_suid_dev", True),
    "--prefetch": ("cfg_prefetch", True),
    "--no-prefetch": ("cfg_prefetch", False),
}
_MOUNT_VALUED: dict[str, Valued] = {
    "--blob-dir": ("blob_dir", _dir_exists),
    "--cache-dir": ("cache_dir", _path(file_okay=False)),
    "--mode": ("mode", _choice("auto", "fanotify", "fscache")),
    "--amplify": ("amplify", _int_range(0)),
    "--platform": ("platform", _text),
    "--read-deadline": ("read_deadline", _float_min(0.1)),
    "--domain-id": ("domain_id", _text),
    "--config": ("config_path", _path(dir_okay=False)),
    "--prefetch-threads": ("cfg_prefetch_threads", _int_range(1, 256)),
    "--retries": ("cfg_retries", _int_range(0, 100)),
}
_MOUNT_DEFAULTS: dict[str, Any] = {
    "blob_dir": None, "cache_dir": None, "mode": "auto", "amplify": 1 << 20,
    "plain_http": False, "platform": None, "read_deadline": 30.0, "domain_id": None,
    "buffered_cache": None, "allow_suid_dev": False,
}  # fmt: skip
_UMOUNT_VALUED: dict[str, Valued] = {"--cache-dir": ("cache_dir", _path(file_okay=False))}


def _parse(args: list[str], flags: dict[str, Flag],
           valued: dict[str, Valued]) -> tuple[list[str], dict[str, Any]]:
    """(positional arguments, {parameter: value}) as click would parse them, or
    _Decline.  Options may come anywhere, as ``--opt value`` or ``--opt=value``; a
    repeated option's last value wins (click's rule for single-value options)."""
    pos: list[str] = []
    opts: dict[str, Any] = {}
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        if not tok.startswith("-"):
            pos.append(tok)
            continue
        name, eq, value = tok.partition("=")
        if name in flags and not eq:
            param, v = flags[name]
            opts[param] = v
        elif name in valued:
            if not eq:
                if i >= len(args) or args[i].startswith("-"):
                    raise _Decline  # a missing value, or one click might read otherwise
                value = args[i]
                i += 1
            param, convert = valued[name]
            opts[param] = convert(value)
        else:
            raise _Decline  # --help, --, an option click handles
    return pos, opts


def _mount(args: list[str]) -> Callable[[], None]:
    pos, opts = _parse(args, _MOUNT_FLAGS, _MOUNT_VALUED)
    if len(pos) != 2:
        raise _Decline
    _dir_exists(pos[1])
    kwargs = {**_MOUNT_DEFAULTS, **opts}
    given = {p for p in opts if not p.startswith("cfg_") and p != "config_path"}

    def call() -> None:
        from erofs_nydus.cli.mounting import mount_image
        from erofs_nydus.config import merge_flags, use_config

        use_config(merge_flags(kwargs, given))
        mount_image(pos[0], pos[1], **kwargs)

    return call


def _umount(args: list[str]) -> Callable[[], None]:
    pos, opts = _parse(args, {}, _UMOUNT_VALUED)
    if len(pos) != 1:
        raise _Decline
    _path()(pos[0])

    def call() -> None:
        from erofs_nydus.cli.mounting import umount_image

        umount_image(pos[0], opts.get("cache_dir"))

    return call


_COMMANDS: dict[str, Callable[[list[str]], Callable[[], None]]] = {
    "mount": _mount, "umount": _umount}


def run_fast(argv: list[str]) -> bool:
    """Run `argv` (without the program name) if it is a plain `mount` or `umount`;
    False (nothing done) when click must handle it."""
    if not argv or argv[0] not in _COMMANDS:
        return False
    try:
        call = _COMMANDS[argv[0]](argv[1:])
    except _Decline:
        return False
    try:
        call()
    except ErofsNydusError as exc:
        sys.stderr.write(f"erofs-nydus: error: {exc}\n")
        sys.stderr.flush()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("erofs-nydus: interrupted\n")
        sys.stderr.flush()
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(141)
    return True
