"""Operations commands: `trace`, `ctl` (control API client), `config`, `cache`."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from erofs_nydus.cli import main
from erofs_nydus.cli.options import SIZE, config_options
from erofs_nydus.config import current_config, to_toml
from erofs_nydus.errors import UsageError


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _cache_dir(cache_dir: str | None) -> str:
    """The cache dir to work on, which must exist (a typo is not an empty cache)."""
    if cache_dir is None:
        from erofs_nydus.config import load_config

        cache_dir = load_config(None).cache_dir
        if cache_dir is None:
            raise UsageError("give --cache-dir (or set daemon.cache_dir in the config file)")
    if not os.path.isdir(cache_dir):
        raise UsageError(f"{os.path.abspath(cache_dir)}: no such cache dir")
    return cache_dir


_cache_dir_opt = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="The daemon's cache dir [config: daemon.cache_dir].",
)


# -- trace -------------------------------------------------------------------------------


@main.command("trace")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Trace file to write (JSON, for `optimize --trace`).")  # fmt: skip
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Cache dir of the mount (found from the mount table if omitted).")  # fmt: skip
def trace_cmd(mountpoint: str, output: str, cache_dir: str | None) -> None:
    """Save the access trace the daemon recorded for the image at MOUNTPOINT.

    Every chunk's first access since the image was mounted, in order, with its time
    offset; feed it to `erofs-nydus optimize BOOTSTRAP --trace FILE`.
    """
    from erofs_nydus.builder.create import write_file_atomic
    from erofs_nydus.cli.common import cache_dir_of, check_output
    from erofs_nydus.mount import mount_at
    from erofs_nydus.service.api_client import ApiClient

    check_output(output, "--output")
    mp = os.path.realpath(mountpoint)
    if cache_dir is None and mount_at(mp) is None:
        raise UsageError(f"{mp} is not mounted")
    cdir = cache_dir_of(mp, cache_dir)
    doc = ApiClient(cdir).get_json(ApiClient.mount_path(mp) + "/trace")
    write_file_atomic(output, json.dumps(doc, indent=0).encode() + b"\n")
    blobs = len({a["blob"] for a in doc["accesses"]})
    extra = f", {doc['dropped']} dropped (trace full)" if doc.get("dropped") else ""
    click.echo(
        f"{len(doc['accesses'])} chunk accesses in {blobs} blob(s) of image "
        f"{doc['fsid'][:12]} written to {output}{extra}"
    )


# -- ctl ---------------------------------------------------------------------------------


@main.group("ctl")
def ctl_group() -> None:
    """Query a running daemon through its control API (HTTP on a unix socket)."""


def _api(cache_dir: str | None) -> Any:
    from erofs_nydus.service.api_client import ApiClient

    return ApiClient(_cache_dir(cache_dir))


@ctl_group.command("info")
@_cache_dir_opt
@click.option("--json", "as_json", is_flag=True)
def ctl_info(cache_dir: str | None, as_json: bool) -> None:
    """Daemon info and state."""
    doc = _api(cache_dir).get_json("/api/v1/daemon")
    if as_json:
        click.echo(json.dumps(doc, indent=1))
        return
    for k in ("name", "version", "state", "mode", "pid", "cache_dir", "uptime", "images"):
        click.echo(f"{k}: {doc.get(k)}")
    for mp in doc.get("mounts", []):
        click.echo(f"mount: {mp}")


@ctl_group.command("mounts")
@click.argument("key", required=False)
@_cache_dir_opt
@click.option("--json", "as_json", is_flag=True)
def ctl_mounts(key: str | None, cache_dir: str | None, as_json: bool) -> None:
    """Mounted images; with KEY (a mountpoint or fsid) just that one."""
    from erofs_nydus.service.api_client import ApiClient

    api = _api(cache_dir)
    if key is not None:
        k = os.path.realpath(key) if key.startswith(("/", ".")) else key
        docs = [api.get_json(ApiClient.mount_path(k))]
    else:
        docs = api.get_json("/api/v1/mounts")
    if as_json:
        click.echo(json.dumps(docs[0] if key is not None else docs, indent=1))
        return
    for d in docs:
        size = sum(b.get("size", 0) for b in d["blobs"])
        present = sum(b.get("present", 0) for b in d["blobs"])
        click.echo(f"image {d['fsid'][:12]}: {', '.join(d['mountpoints'])}")
        click.echo(f"  blobs: {len(d['blobs'])}, cached {_human(present)} of {_human(size)}")
        p = d.get("prefetch")
        if p:
            click.echo(
                f"  prefetch: {p['state']}, {p['done_chunks']}/{p['total_chunks']} chunks, "
                f"{_human(p['done_bytes'])} of {_human(p['total_bytes'])}, "
                f"{p['failed_chunks']} failed"
            )
        click.echo(f"  trace: {d['trace']['chunks']} chunks")


@ctl_group.command("blobs")
@_cache_dir_opt
@click.option("--json", "as_json", is_flag=True)
def ctl_blobs(cache_dir: str | None, as_json: bool) -> None:
    """Per-blob cache fill."""
    doc = _api(cache_dir).get_json("/api/v1/blobs")
    if as_json:
        click.echo(json.dumps(doc, indent=1))
        return
    for bid, b in doc.items():
        click.echo(
            f"{bid[:16]}  {_human(b['present']):>10} of {_human(b['size']):>10}  "
            f"{100 * b['fill_ratio']:5.1f}%{'  complete' if b['complete'] else ''}"
        )


@ctl_group.command("metrics")
@_cache_dir_opt
def ctl_metrics(cache_dir: str | None) -> None:
    """Metrics in Prometheus text format."""
    click.echo(_api(cache_dir).metrics(), nl=False)


# -- config ------------------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Settings file (TOML) for the daemon and backends."""


@config_group.command("show")
@click.option("--cache-dir", type=click.Path(file_okay=False))
@click.option("--mode", type=click.Choice(["auto", "fanotify", "fscache"]))
@click.option("--amplify", type=SIZE)
@click.option("--plain-http/--no-plain-http", default=None)
@click.option("--read-deadline", type=click.FloatRange(min=0.1))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of TOML.")
@config_options
def config_show(as_json: bool, **_flags: Any) -> None:
    """Print the effective settings: defaults, then the config file, then flags."""
    cfg = current_config()
    if as_json:
        click.echo(json.dumps(cfg.to_json(), indent=1))
    else:
        click.echo(to_toml(cfg), nl=False)


# -- cache -------------------------------------------------------------------------------


@main.group("cache")
def cache_group() -> None:
    """Inspect and clean a cache dir (blob cache files, stored bootstraps)."""


def _use(e: Any) -> str:
    if e.mounts:
        return "mounted at " + ", ".join(e.mounts)
    if e.in_use:
        return "registered with the running daemon"
    return "unused"


@cache_group.command("ls")
@_cache_dir_opt
@click.option("--json", "as_json", is_flag=True)
def cache_ls(cache_dir: str | None, as_json: bool) -> None:
    """Cache files per blob and bootstrap: size, bytes present, which images use it."""
    from erofs_nydus.service.cache import scan_cache

    rep = scan_cache(_cache_dir(cache_dir))
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=1))
        return
    for e in rep.entries:
        imgs = ",".join(f[:12] for f in e.images) or "-"
        if e.kind == "blob":
            click.echo(
                f"blob {e.id[:16]}  {_human(e.present):>10} of {_human(e.size):>10}  "
                f"images {imgs}  {_use(e)}"
            )
        else:
            click.echo(f"boot {e.id[:16]}  {_human(e.size):>10}  {_use(e)}")
    _totals(rep)


def _totals(rep: Any) -> None:
    doc = rep.to_json()
    used = sum(e.disk for e in rep.entries if e.in_use)
    click.echo(
        f"total: {len(rep.entries)} entries, {_human(doc['total_disk'])} on disk "
        f"({_human(used)} in use), {_human(doc['total_present'])} of "
        f"{_human(doc['total_size'])} blob data present"
    )


@cache_group.command("du")
@_cache_dir_opt
@click.option("--json", "as_json", is_flag=True)
def cache_du(cache_dir: str | None, as_json: bool) -> None:
    """Disk usage of a cache dir: total, in use, reclaimable."""
    from erofs_nydus.service.cache import scan_cache

    rep = scan_cache(_cache_dir(cache_dir))
    used = sum(e.disk for e in rep.entries if e.in_use)
    if as_json:
        click.echo(json.dumps({"disk": rep.disk, "in_use": used,
                               "reclaimable": rep.disk - used}))  # fmt: skip
        return
    click.echo(
        f"{_human(rep.disk)} on disk, {_human(used)} in use, "
        f"{_human(rep.disk - used)} reclaimable ({rep.cache_dir})"
    )


@cache_group.command("gc")
@_cache_dir_opt
@click.option("--budget", type=SIZE,
              help="Only remove unused entries, oldest first, until the cache dir "
              "uses at most this much disk (K/M/G).")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Say what would be removed.")
def cache_gc(cache_dir: str | None, budget: int | None, dry_run: bool) -> None:
    """Remove cache files no live mount uses (never those in use)."""
    from erofs_nydus.service.cache import gc_cache

    rep, victims = gc_cache(_cache_dir(cache_dir), budget, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for e in victims:
        click.echo(f"{verb} {e.kind} {e.id[:16]} ({_human(e.disk)})")
    freed = sum(e.disk for e in victims)
    left = rep.disk - freed
    msg = f"{verb} {len(victims)} entries, {_human(freed)}; {_human(left)} left"
    if budget is not None and left > budget:
        msg += f" (over the {_human(budget)} budget: the rest is in use)"
    click.echo(msg)


@cache_group.command("verify")
@_cache_dir_opt
@click.option("--json", "as_json", is_flag=True)
def cache_verify(cache_dir: str | None, as_json: bool) -> None:
    """Re-digest every cached chunk; drop bad ones so they are fetched again.

    Exit 1 when some were dropped (the cache had been altered or damaged).
    """
    from erofs_nydus.service.cache import verify_cache

    out = verify_cache(_cache_dir(cache_dir))
    dropped = out["dropped"]
    if as_json:
        click.echo(json.dumps(out))
    else:
        for bid, idx in sorted(dropped.items()):
            click.echo(f"blob {bid[:16]}: {len(idx)} chunk(s) failed their digest, dropped for "
                       f"re-fetch (chunks {', '.join(map(str, idx[:10]))}"
                       f"{', ...' if len(idx) > 10 else ''})")
        for bid in out.get("unverifiable", []):
            click.echo(f"blob {bid[:16]}: no stored bootstrap lists it, not verified")
        bad = sum(len(v) for v in dropped.values())
        click.echo(f"verified {out['chunks']} cached chunks in {out['blobs']} blobs: "
                   f"{bad} dropped for re-fetch")
    if dropped:
        sys.exit(1)
