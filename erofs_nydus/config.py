"""Daemon and backend settings: a TOML file, overridden by command-line flags.

    [daemon]
    cache_dir = "/var/cache/erofs-nydus"   # where blob cache files live
    mode = "auto"                          # auto | fanotify | fscache
    amplify = "1M"                         # fetch following chunks up to this per miss

    [prefetch]
    enable = true                          # prefetch an image's prefetch table on mount
    threads = 4                            # concurrent prefetch fills
    bandwidth = 0                          # bytes/s (e.g. "20M"), 0 = unlimited

    [backend]
    retries = 3                            # registry: retries per range read
    deadline = 30.0                        # registry: seconds per read, retries included
    credentials = "/root/.docker"          # registry: Docker config dir (or its config.json)
    plain_http = false                     # registry: HTTP instead of HTTPS

    [fscache]
    buffered_cache = true                  # warm reads through the page cache where the
                                           # cache dir's ext4 allows it (nodelalloc or
                                           # data=journal; said in one line where not)

Sizes are integers (bytes) or strings with a binary suffix (K, M, G: 1024-based).
The file is `--config FILE`, else `$EROFS_NYDUS_CONFIG`, else
`/etc/erofs-nydus/config.toml` when it exists.  Unknown sections and keys are errors
naming them; syntax errors name the line (from tomllib).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import click

from erofs_nydus.errors import UsageError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Config",
    "apply_backend_config",
    "config_options",
    "current_config",
    "default_config_path",
    "effective_config",
    "load_config",
    "parse_size",
    "to_toml",
]

DEFAULT_CONFIG_PATH = "/etc/erofs-nydus/config.toml"
ENV_VAR = "EROFS_NYDUS_CONFIG"
MODES = ("auto", "fanotify", "fscache")


@dataclass
class Config:
    cache_dir: str | None = None
    mode: str = "auto"
    amplify: int = 1 << 20
    prefetch: bool = True
    prefetch_threads: int = 4
    prefetch_bandwidth: int = 0
    retries: int = 3
    deadline: float = 30.0
    credentials: str | None = None
    plain_http: bool = False
    fscache_buffered_cache: bool = True
    source: str | None = None  # the file the settings came from

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def register_args(self) -> dict[str, Any]:
        """Extra arguments of the daemon's register request."""
        return {
            "prefetch": self.prefetch,
            "prefetch_threads": self.prefetch_threads,
            "prefetch_bandwidth": self.prefetch_bandwidth,
        }

    def docker_config_dir(self) -> str | None:
        if self.credentials is None:
            return None
        p = os.path.abspath(self.credentials)
        return os.path.dirname(p) if p.endswith(".json") else p


# (section, key) -> (field, kind)
_KEYS: dict[tuple[str, str], tuple[str, str]] = {
    ("daemon", "cache_dir"): ("cache_dir", "path"),
    ("daemon", "mode"): ("mode", "mode"),
    ("daemon", "amplify"): ("amplify", "size"),
    ("prefetch", "enable"): ("prefetch", "bool"),
    ("prefetch", "threads"): ("prefetch_threads", "threads"),
    ("prefetch", "bandwidth"): ("prefetch_bandwidth", "size"),
    ("backend", "retries"): ("retries", "count"),
    ("backend", "deadline"): ("deadline", "seconds"),
    ("backend", "credentials"): ("credentials", "path"),
    ("backend", "plain_http"): ("plain_http", "bool"),
    ("fscache", "buffered_cache"): ("fscache_buffered_cache", "bool"),
}
_FIELD_KEY = {f: f"{s}.{k}" for (s, k), (f, _) in _KEYS.items()}

_SIZE_RE = re.compile(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: object) -> int:
    """Bytes from an int or a string like "512K", "20M", "1GiB"; ValueError if bad."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if m:
            return int(m.group(1)) * _UNITS[m.group(2).lower()]
    raise ValueError(f"expected a size (bytes, or a number with K/M/G), got {value!r}")


def _convert(kind: str, value: object) -> Any:
    if kind == "size":
        return parse_size(value)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    if kind in ("count", "threads"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        lo, hi = (1, 256) if kind == "threads" else (0, 100)
        if not lo <= value <= hi:
            raise ValueError(f"expected {lo}..{hi}, got {value}")
        return value
    if kind == "seconds":
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"expected a positive number of seconds, got {value!r}")
        return float(value)
    if kind == "mode":
        if value not in MODES:
            raise ValueError(f"expected one of {', '.join(MODES)}, got {value!r}")
        return value
    if kind == "path":
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a path string, got {value!r}")
        return value
    raise AssertionError(kind)


def default_config_path() -> str | None:
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    return DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None


def load_config(path: str | None = None, *, explicit: bool = True) -> Config:
    """Settings from `path` (or the default file) on top of the built-in defaults."""
    if path is None:
        path = default_config_path()
        explicit = path is not None and path == os.environ.get(ENV_VAR)
    cfg = Config()
    if path is None:
        return cfg
    import tomllib  # only when there is a file to read

    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError as exc:
        if not explicit:
            return cfg
        raise UsageError(f"config {path}: no such file") from exc
    except OSError as exc:
        raise UsageError(f"config {path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"config {path}: not UTF-8 text: {exc}") from exc
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise UsageError(
                f"config {path}: {section!r} must be a section ([{section}]), not a value"
            )
        for key, value in table.items():
            spec = _KEYS.get((section, key))
            if spec is None:
                known = sorted({s for s, _ in _KEYS})
                what = (
                    f"unknown key {section}.{key}"
                    if section in known
                    else f"unknown section [{section}] (known: {', '.join(known)})"
                )
                raise UsageError(f"config {path}: {what}")
            fname, kind = spec
            try:
                setattr(cfg, fname, _convert(kind, value))
            except ValueError as exc:
                raise UsageError(f"config {path}: {section}.{key}: {exc}") from exc
    cfg.source = os.path.abspath(path)
    return cfg


def to_toml(cfg: Config) -> str:
    """The effective settings as TOML (None values are left out, with a comment)."""
    out: list[str] = []
    if cfg.source:
        out.append(f"# from {cfg.source} and command-line flags")
    section = ""
    for (s, k), (fname, _kind) in _KEYS.items():
        if s != section:
            if out:
                out.append("")
            out.append(f"[{s}]")
            section = s
        v = getattr(cfg, fname)
        if v is None:
            out.append(f"# {k} = (not set)")
        elif isinstance(v, bool):
            out.append(f"{k} = {'true' if v else 'false'}")
        elif isinstance(v, int | float):
            out.append(f"{k} = {v}")
        else:
            out.append(f"{k} = {_toml_str(str(v))}")
    return "\n".join(out) + "\n"


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- command-line flags ------------------------------------------------------------------


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
]  # fmt: skip
# Shared with `mount`'s own options: (param name, config field).
_SHARED = (("cache_dir", "cache_dir"), ("mode", "mode"), ("amplify", "amplify"),
           ("plain_http", "plain_http"), ("read_deadline", "deadline"))  # fmt: skip


def effective_config(ctx: click.Context, kwargs: dict[str, Any]) -> Config:
    """Pop this module's options from `kwargs`; merge file and flags; update the
    shared options in `kwargs` where they were not given on the command line."""
    cfg = load_config(kwargs.pop("config_path", None))
    for name in list(kwargs):
        if name.startswith("cfg_"):
            v = kwargs.pop(name)
            if v is not None:
                setattr(cfg, name[4:], v)
    for param, fname in _SHARED:
        if param not in kwargs:
            continue
        src = ctx.get_parameter_source(param)
        given = src not in (
            None,
            click.core.ParameterSource.DEFAULT,
            click.core.ParameterSource.DEFAULT_MAP,
        )
        if given and kwargs[param] is not None:
            setattr(cfg, fname, kwargs[param])
        else:
            kwargs[param] = getattr(cfg, fname)
    return cfg


def config_options(f: F) -> F:
    """Add the config options to a command.  The command gets the shared options
    already merged with the file, and `current_config()` returns the whole."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        cfg = effective_config(ctx, kwargs)
        ctx.meta["erofs_nydus.config"] = cfg
        if cfg.credentials is not None and cfg.docker_config_dir():
            os.environ["DOCKER_CONFIG"] = str(cfg.docker_config_dir())
        return f(*args, **kwargs)

    out: Callable[..., Any] = wrapper
    for opt in reversed(_OWN_OPTIONS):
        out = opt(out)
    return out  # type: ignore[return-value]


def current_config() -> Config:
    """The config `config_options` computed for the running command (or defaults)."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        cfg = ctx.meta.get("erofs_nydus.config")
        if isinstance(cfg, Config):
            return cfg
    return Config()


def apply_backend_config(spec: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """Registry retry policy and credentials into a backend spec (local: unchanged)."""
    if spec.get("type") == "registry":
        spec = {**spec, "retries": cfg.retries}
        d = cfg.docker_config_dir()
        if d is not None:
            spec["docker_config"] = d
    return spec
