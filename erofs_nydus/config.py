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

    [[backend.mirrors]]                    # registry mirrors for blob reads, in order
    host = "http://127.0.0.1:5001"         # scheme://host[:port]
    headers = { "X-Node" = "n1" }          # sent to this mirror only
    health_check_interval = 5              # seconds between pings of a disabled mirror
    failure_limit = 5                      # errors before the mirror is skipped
    ping_url = ""                          # default: HOST/v2
    auth_through = false                   # true: authenticate with the mirror itself

    [backend.proxy]                        # an HTTP proxy for blob reads (dfdaemon style)
    url = "http://127.0.0.1:65001"
    ping_url = ""                          # health check; none: every read tries the proxy
    fallback = true                        # proxy failed: read from the origin
    check_interval = 5                     # seconds between pings of a failed proxy
    use_http = false                       # send https:// origins through as http://

    [fscache]
    buffered_cache = true                  # warm reads through the page cache where the
                                           # cache dir's ext4 allows it (nodelalloc or
                                           # data=journal; said in one line where not)

Blob range reads go to the proxy (when healthy), then to each healthy mirror, then to
the origin registry; manifests and tokens always to the origin.  The key names are
nydusd's (`mirrors`, `proxy` of its registry backend config).

Sizes are integers (bytes) or strings with a binary suffix (K, M, G: 1024-based).
The file is `--config FILE`, else `$EROFS_NYDUS_CONFIG`, else
`/etc/erofs-nydus/config.toml` when it exists.  Unknown sections and keys are errors
naming them; syntax errors name the line (from tomllib).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from erofs_nydus.errors import UsageError

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "SHARED_OPTIONS",
    "Config",
    "apply_backend_config",
    "current_config",
    "default_config_path",
    "load_config",
    "merge_flags",
    "normalize_mirrors",
    "normalize_proxy",
    "parse_size",
    "to_toml",
    "use_config",
]

DEFAULT_CONFIG_PATH = "/etc/erofs-nydus/config.toml"
ENV_VAR = "EROFS_NYDUS_CONFIG"
MODES = ("auto", "fanotify", "fscache")


class Config:
    """The settings (a plain class, not a dataclass: `mount` loads this module on the
    hot path, and `dataclasses` imports `inspect`)."""

    def __init__(self) -> None:
        self.cache_dir: str | None = None
        self.mode: str = "auto"
        self.amplify: int = 1 << 20
        self.prefetch: bool = True
        self.prefetch_threads: int = 4
        self.prefetch_bandwidth: int = 0
        self.retries: int = 3
        self.deadline: float = 30.0
        self.credentials: str | None = None
        self.plain_http: bool = False
        self.fscache_buffered_cache: bool = True
        self.mirrors: list[dict[str, Any]] = []
        self.proxy: dict[str, Any] | None = None
        self.source: str | None = None  # the file the settings came from

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]  # mutable, compared by value

    def __repr__(self) -> str:
        return "Config(" + ", ".join(f"{k}={v!r}" for k, v in vars(self).items()) + ")"

    def to_json(self) -> dict[str, Any]:
        """Every setting, in declaration order (a deep copy)."""
        import copy

        return copy.deepcopy(vars(self))

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
    ("backend", "mirrors"): ("mirrors", "mirrors"),
    ("backend", "proxy"): ("proxy", "proxy"),
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
    if kind == "mirrors":
        return normalize_mirrors(value)
    if kind == "proxy":
        return normalize_proxy(value)
    raise AssertionError(kind)


# -- mirrors and proxy (nydusd's names and defaults) -------------------------------------

_MIRROR_DEFAULTS: dict[str, Any] = {
    "host": None, "headers": {}, "health_check_interval": 5, "failure_limit": 5,
    "ping_url": "", "auth_through": False,
}  # fmt: skip
_PROXY_DEFAULTS: dict[str, Any] = {
    "url": None, "ping_url": "", "fallback": True, "check_interval": 5, "use_http": False,
}  # fmt: skip
_URL_RE = re.compile(r"^(https?)://([^/?#@\s]+)(/[^?#\s]*)?$")


def _check_url(what: str, value: object, *, path_ok: bool) -> str:
    if not isinstance(value, str) or not _URL_RE.match(value):
        raise ValueError(f"{what}: expected an http:// or https:// URL, got {value!r}")
    m = _URL_RE.match(value)
    assert m is not None
    if not path_ok and m.group(3) not in (None, "", "/"):
        raise ValueError(f"{what}: expected scheme://host[:port] without a path, got {value!r}")
    return value.rstrip("/") if not path_ok else value


def _settings(what: str, value: object, defaults: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, str):  # a bare URL: every other setting at its default
        value = {next(iter(defaults)): value}
    if not isinstance(value, dict):
        raise ValueError(f"{what}: expected a table, got {value!r}")
    unknown = sorted(set(value) - set(defaults))
    if unknown:
        raise ValueError(f"{what}: unknown key {unknown[0]!r} (known: {', '.join(defaults)})")
    out = {**defaults, **value}
    for key, default in defaults.items():
        v = out[key]
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise ValueError(f"{what}.{key}: expected true or false, got {v!r}")
        elif isinstance(default, int):
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 86400:
                raise ValueError(f"{what}.{key}: expected a positive number, got {v!r}")
        elif isinstance(default, dict):
            if not isinstance(v, dict) or not all(
                isinstance(k, str) and isinstance(x, str) and k.strip() and "\n" not in k + x
                for k, x in v.items()
            ):
                raise ValueError(f"{what}.{key}: expected a table of strings, got {v!r}")
            out[key] = dict(v)
    limit = out.get("failure_limit", 1)
    if not isinstance(limit, int) or limit > 255:
        raise ValueError(f"{what}.failure_limit: expected 1..255, got {limit!r}")
    return out


def normalize_mirrors(value: object) -> list[dict[str, Any]]:
    """`[[backend.mirrors]]` tables (or bare URLs) with every key, defaults filled in."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list of mirror tables ([[backend.mirrors]]), got {value!r}")
    out = []
    for i, item in enumerate(value):
        m = _settings(f"mirrors[{i}]", item, _MIRROR_DEFAULTS)
        m["host"] = _check_url(f"mirrors[{i}].host", m["host"], path_ok=False)
        if m["ping_url"]:
            _check_url(f"mirrors[{i}].ping_url", m["ping_url"], path_ok=True)
        out.append(m)
    return out


def normalize_proxy(value: object) -> dict[str, Any] | None:
    """`[backend.proxy]` (or a bare URL) with every key; None when no url is set."""
    if value is None:
        return None
    p = _settings("proxy", value, _PROXY_DEFAULTS)
    if not p["url"]:
        return None
    p["url"] = _check_url("proxy.url", p["url"], path_ok=False)
    if p["ping_url"]:
        _check_url("proxy.ping_url", p["ping_url"], path_ok=True)
    return p


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
    for (s, k), (fname, kind) in _KEYS.items():
        if kind in ("mirrors", "proxy"):
            continue  # sub-tables: after every plain key
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
    for m in cfg.mirrors:
        out += ["", "[[backend.mirrors]]", *_toml_table(m)]
    if cfg.proxy:
        out += ["", "[backend.proxy]", *_toml_table(cfg.proxy)]
    return "\n".join(out) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, dict):
        inner = ", ".join(f"{_toml_str(k)} = {_toml_value(x)}" for k, x in v.items())
        return "{ " + inner + " }" if inner else "{}"
    return _toml_str(str(v))


def _toml_table(d: dict[str, Any]) -> list[str]:
    return [f"{k} = {_toml_value(v)}" for k, v in d.items()]


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# -- command-line flags (the click options are in `erofs_nydus.cli.options`) --------------

# Shared with `mount`'s own options: (param name, config field).
SHARED_OPTIONS = (("cache_dir", "cache_dir"), ("mode", "mode"), ("amplify", "amplify"),
                  ("plain_http", "plain_http"), ("read_deadline", "deadline"))  # fmt: skip

_CURRENT: list[Config] = []  # set by `use_config` (a program's one command)


def merge_flags(kwargs: dict[str, Any], given: set[str]) -> Config:
    """Pop the config options (``config_path``, ``cfg_*``) from a command's `kwargs`;
    merge file and flags; update the shared options in `kwargs` (`SHARED_OPTIONS`) that
    are not in `given` (the parameters given on the command line) from the file."""
    cfg = load_config(kwargs.pop("config_path", None))
    for name in list(kwargs):
        if name.startswith("cfg_"):
            v = kwargs.pop(name)
            try:
                if name == "cfg_mirrors":
                    v = normalize_mirrors(list(v)) if v else None
                elif name == "cfg_proxy" and v is not None:
                    v = normalize_proxy(v)
            except ValueError as exc:
                raise UsageError(f"--{name[4:].rstrip('s')}: {exc}") from exc
            if v is not None:
                setattr(cfg, name[4:], v)
    for param, fname in SHARED_OPTIONS:
        if param not in kwargs:
            continue
        if param in given and kwargs[param] is not None:
            setattr(cfg, fname, kwargs[param])
        else:
            kwargs[param] = getattr(cfg, fname)
    if cfg.credentials is not None and cfg.docker_config_dir():
        os.environ["DOCKER_CONFIG"] = str(cfg.docker_config_dir())
    return cfg


def use_config(cfg: Config) -> None:
    """Make `cfg` what `current_config()` returns in this process (the click-free entry
    of the hot commands; click commands keep theirs in the click context)."""
    _CURRENT[:] = [cfg]


def current_config() -> Config:
    """The config `config_options` (or `use_config`) set for the running command, else
    the defaults."""
    if _CURRENT:
        return _CURRENT[0]
    click = sys.modules.get("click")  # never imported for this
    ctx = click.get_current_context(silent=True) if click is not None else None
    if ctx is not None:
        cfg = ctx.meta.get("erofs_nydus.config")
        if isinstance(cfg, Config):
            return cfg
    return Config()


def apply_backend_config(spec: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """Registry retry policy and credentials into a backend spec (local: unchanged)."""
    if spec.get("type") == "registry":
        spec = {**spec, "retries": cfg.retries}
        if cfg.mirrors:
            spec["mirrors"] = [dict(m) for m in cfg.mirrors]
        if cfg.proxy:
            spec["proxy"] = dict(cfg.proxy)
        d = cfg.docker_config_dir()
        if d is not None:
            spec["docker_config"] = d
    return spec
