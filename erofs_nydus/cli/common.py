"""Helpers the command modules share: option values, output paths, JSON output, and
finding the cache dir of a mount.  No commands here."""

from __future__ import annotations

import json
import os
from typing import Any

from erofs_nydus.errors import UsageError


def parse_size(value: str) -> int:
    """Accept 0x100000, 1048576, 1M, 1MiB, 64K."""
    v = value.strip().lower().removesuffix("ib").removesuffix("b")
    mult = 1
    for suffix, m in (("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30)):
        if v.endswith(suffix):
            v, mult = v[:-1], m
            break
    try:
        return int(v, 0) * mult
    except ValueError as exc:
        raise UsageError(f"not a size: {value!r}") from exc


def check_output(path: str | None, option: str) -> None:
    """Refuse, before any work, an output file whose directory is missing or not
    writable (nothing is created on the way), or that is a directory."""
    if path is None or path == "-":
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: no such directory {parent}")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{option} {path}: directory {parent} is not writable")


def check_output_dir(path: str | None, option: str) -> None:
    """An output directory may be made, but not its parent: refuse a missing parent
    (a typo would otherwise grow a tree of folders), or a path that is a file."""
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option} {path}: not a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{option} {path}: no such directory {parent}")


def write_json(obj: Any, dest: str | None) -> None:
    """`obj` as indented JSON to stdout (`dest` None or "-") or to the file `dest`."""
    text = json.dumps(obj, indent=2, sort_keys=False)
    if dest in (None, "-"):
        import click  # this module is on the click-free path of `umount` (cache_dir_of)

        click.echo(text)
    else:
        assert dest is not None
        with open(dest, "w") as f:
            f.write(text + "\n")


def cache_dir_of(mp: str, cache_dir: str | None) -> str:
    """The cache dir serving the mount at `mp` (a real path): `cache_dir` if given,
    else the fscache daemon's (fscache mounts) or the bootstrap's folder (fanotify)."""
    from erofs_nydus.mount import mount_at

    if cache_dir is not None:
        return cache_dir
    src = mount_at(mp)
    if src is None:
        raise UsageError(f"{mp} is not mounted; pass --cache-dir to clean up its registration")
    fstype, source = src.fstype, src.source
    if fstype == "erofs" and source == "none":  # fscache mode: one daemon per system
        from erofs_nydus.service.fscache_client import fscache_cache_dir

        found = fscache_cache_dir()
        if found is None:
            raise UsageError(f"{mp}: no fscache daemon found; pass --cache-dir")
        return found
    if fstype != "erofs" or not source.endswith(".boot"):
        raise UsageError(f"{mp} is not an erofs-nydus mount ({fstype} from {source})")
    return os.path.dirname(source)
