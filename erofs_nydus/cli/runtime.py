"""Runtime commands: `mount`, `umount`, `mount-stats`, and the hidden `daemon` entry.

`mount` and `umount` are click wrappers around `cli.mounting` (which `cli.fast` runs
without click for the common flags)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from erofs_nydus.cli import main
from erofs_nydus.cli.common import cache_dir_of
from erofs_nydus.cli.mounting import mount_backend, mount_image, umount_image
from erofs_nydus.cli.options import config_options
from erofs_nydus.config import apply_backend_config, current_config
from erofs_nydus.errors import DaemonError, UsageError


@main.command("mount")
@click.argument("bootstrap", metavar="BOOTSTRAP|REF")
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--blob-dir",
    type=click.Path(exists=True, file_okay=False),
    help="Directory holding the data blobs as <blob id> files (with a BOOTSTRAP file).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Where blob cache files live; one daemon serves each cache dir "
    "[config: daemon.cache_dir].",
)
@click.option(
    "--mode",
    type=click.Choice(["auto", "fanotify", "fscache"]),
    default="auto",
    show_default=True,
    help="Kernel interface for on-demand loading.",
)
@click.option(
    "--amplify",
    type=click.IntRange(min=0),
    default=1 << 20,
    show_default=True,
    help="Fetch following chunks up to this many bytes per miss (0 disables).",
)
@click.option("--plain-http", is_flag=True,
              help="REF: talk HTTP to the registry (loopback registries use HTTP anyway).")
@click.option("--platform", metavar="OS/ARCH", help="REF: platform to pick from an index "
              "(default linux/amd64).")
@click.option("--read-deadline", type=click.FloatRange(min=0.1), default=30.0,
              show_default=True, help="REF: seconds an on-demand registry read may take "
              "(retries included) before the reader gets EIO.")
@click.option("--domain-id", metavar="D", help="fscache mode: share blobs (one cache "
              "object per blob) with other images mounted with the same domain id.")
@click.option("--buffered-cache/--no-buffered-cache", default=None,
              help="fscache mode: let warm reads of cachefiles' backing files use the page "
              "cache (readahead) instead of O_DIRECT, by marking the cache dir chattr +j "
              "where that takes effect: ext4 mounted nodelalloc or data=journal (cache "
              "writes are then journaled); elsewhere one line says why not.  On by default "
              "[env: EROFS_NYDUS_FSCACHE_BUFFERED=0|1; config: fscache.buffered_cache].")
@click.option("--allow-suid-dev", is_flag=True,
              help="Honour setuid/setgid bits and device nodes in the image (default: the "
              "mount is nosuid,nodev, as an image is someone else's content).")
@config_options
def mount_cmd(
    bootstrap: str, mountpoint: str, blob_dir: str | None, cache_dir: str, mode: str,
    amplify: int, plain_http: bool, platform: str | None, read_deadline: float,
    domain_id: str | None = None, buffered_cache: bool | None = None,
    allow_suid_dev: bool = False,
) -> None:
    """Mount BOOTSTRAP (a file, with --blob-dir) or REF at MOUNTPOINT; data is fetched
    on first read.

    REF is a Nydus image in a registry (host[:port]/repo[:tag|@digest]) or an OCI
    layout (oci:DIR[:tag]): only its bootstrap layer is fetched now, chunks are read
    with HTTP Range requests when first accessed.  Credentials come from Docker's
    config.json ($DOCKER_CONFIG, else ~/.docker; the path goes to the daemon with each
    mount).  The daemon ignores the caller's proxy variables: set [backend] in the
    config file.

    Starts (or reuses) the daemon for --cache-dir in the background, registers the
    image, and mounts it with file-backed EROFS, one cache file per blob.  Returns
    once the mount is usable.  A second mount of the same image shares the cache.
    """
    mount_image(bootstrap, mountpoint, blob_dir, cache_dir, mode, amplify, plain_http,
                platform, read_deadline, domain_id, buffered_cache, allow_suid_dev)


@main.command("umount")
@click.argument("mountpoint", type=click.Path())
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Cache dir of the mount (found from the mount table if omitted).",
)
def umount_cmd(mountpoint: str, cache_dir: str | None) -> None:
    """Unmount MOUNTPOINT; stop the daemon when it serves no other mount."""
    umount_image(mountpoint, cache_dir)


@main.command("mount-stats")
@click.argument("mountpoint", required=False, type=click.Path())
@click.option("--cache-dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's raw status as JSON.")
def stats_cmd(mountpoint: str | None, cache_dir: str | None, as_json: bool) -> None:
    """Bytes fetched vs image size, and the daemon's counters, for a cache dir."""
    from erofs_nydus.service.client import DaemonClient

    if cache_dir is None:
        if mountpoint is None:
            raise UsageError("give a MOUNTPOINT or --cache-dir")
        cache_dir = cache_dir_of(os.path.realpath(mountpoint), None)
    st: dict[str, Any] = DaemonClient(cache_dir).request("status")
    if as_json:
        click.echo(json.dumps(st, indent=1))
        return
    size = sum(b["size"] for b in st["blobs"].values())
    present = sum(b["present"] for b in st["blobs"].values())
    m = st["metrics"]
    pct = 100.0 * present / size if size else 0.0
    click.echo(f"cache filled: {present} of {size} bytes ({pct:.1f}%)")
    click.echo(
        f"fetched: {int(m['bytes_fetched'])} compressed bytes in {int(m['backend_requests'])} "
        f"backend reads, {int(m['chunks_fetched'])} chunks"
    )
    fan = st.get("fanotify", {})
    line = f"requests: {int(m['reads'])} ({int(m['hits'])} hits)"
    if "miss_latency_median_ms" in m:
        line += (
            f", miss latency median {m['miss_latency_median_ms']:.2f} ms"
            f" p99 {m['miss_latency_p99_ms']:.2f} ms"
        )
    click.echo(line)
    if fan:
        click.echo(f"fanotify events: {int(fan['events'])} ({int(fan['denied'])} denied)")
    fsc = st.get("fscache", {})
    if fsc:
        click.echo(f"fscache requests: {fsc['open']} OPEN ({fsc['open_refused']} refused), "
                   f"{fsc['read']} READ ({fsc['read_failed']} failed), {fsc['close']} CLOSE; "
                   f"{fsc['objects']} open objects")
    for mp in (mp for img in st["images"] for mp in img["mountpoints"]):
        click.echo(f"mount: {mp}")


@main.command("daemon")
@click.option("--cache-dir", required=True, type=click.Path(file_okay=False),
              help="The cache dir this daemon serves (what `mount --cache-dir` names).")
@click.option("--resident", is_flag=True,
              help="Keep running with no mounts: no idle exit, and `umount` of the last "
              "mount leaves it up.  For a node service (systemd), so that `mount` finds "
              "it warm instead of starting one.")
def daemon_cmd(cache_dir: str, resident: bool) -> None:
    """Run the daemon for --cache-dir in the foreground (fanotify mode).

    `mount` starts one on demand, which stops with its last mount; run this to keep
    one up.  SIGTERM or SIGINT stops it when no image is mounted; with mounts live
    it refuses (logs "N mounts live; umount first") and keeps serving.  Logs go to
    stderr.
    """
    from erofs_nydus.service.supervisor import run_supervisor, setup_logging

    setup_logging()
    sys.exit(run_supervisor(cache_dir, resident=resident))


@main.command("warm")
@click.argument("ref", metavar="REF|BOOTSTRAP")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Cache dir to fill (the one `mount --cache-dir` will use) "
              "[config: daemon.cache_dir].")
@click.option("--blob-dir", type=click.Path(exists=True, file_okay=False),
              help="BOOTSTRAP: directory holding its data blobs.")
@click.option("--all", "everything", is_flag=True,
              help="Every chunk, not only the image's prefetch table.")
@click.option("--mirrors-only", is_flag=True,
              help="Keep nothing locally: only fill the configured mirrors / proxy "
              "the reads go through.")
@click.option("--threads", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Concurrent fills.")
@click.option("--wait", type=click.FloatRange(min=0), default=300.0, show_default=True,
              help="--mirrors-only: seconds to wait for pull-through mirrors to store the "
              "blobs (reads never go to the origin then).")
@click.option("--plain-http", is_flag=True, help="Talk HTTP to the registry.")
@click.option("--platform", metavar="OS/ARCH", help="Platform to pick from an index.")
@click.option("--read-deadline", type=click.FloatRange(min=0.1), default=30.0,
              show_default=True, help="Seconds each range read may take, retries included.")
@config_options
def warm_cmd(ref: str, cache_dir: str | None, blob_dir: str | None, everything: bool,
             mirrors_only: bool, threads: int, wait: float, plain_http: bool,
             platform: str | None, read_deadline: float) -> None:
    """Fill a cache dir (or the mirrors in front of the registry) with an image's
    prefetch table, or with all of it, before a burst of cold starts.

    The chunks are read through the configured mirrors and proxy (backend.mirrors,
    backend.proxy, --mirror, --proxy), verified and written into the cache files a
    later `mount --cache-dir` of the image uses.  With --mirrors-only nothing is kept
    locally and nothing is read from the origin: the reads only fill the pull-through
    mirror or caching proxy, retried until it serves them (--wait).  The cache dir
    must not be served by a daemon meanwhile.
    """
    import fcntl
    import shutil
    import tempfile

    from erofs_nydus.daemon.warm import warm_image
    from erofs_nydus.fsutil import open_private, private_dir
    from erofs_nydus.service.paths import RunPaths

    if mirrors_only:
        cfg = current_config()
        if not cfg.mirrors and not cfg.proxy:
            raise UsageError("--mirrors-only needs a mirror or a proxy (--mirror, --proxy, "
                             "or backend.mirrors / backend.proxy in the config)")
        cache_dir = tempfile.mkdtemp(prefix="erofs-nydus-warm-")
    elif cache_dir is None:
        raise UsageError("give --cache-dir (or daemon.cache_dir in the config file)")
    # The cache dir rules of `mount`: ours, 0700, not writable by others; the lock is
    # opened without following a planted symlink.
    cache_dir = private_dir(cache_dir)
    lock_fd = open_private(RunPaths.of(cache_dir).lock, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"a daemon serves {cache_dir}: warm it before mounting, or "
                             "warm another cache dir") from None
        spec = mount_backend(ref, blob_dir, cache_dir, plain_http, platform, read_deadline)
        boot = str(spec.pop("bootstrap"))
        spec = apply_backend_config(spec, current_config())
        if mirrors_only and spec.get("type") == "registry":
            spec["origin"] = False  # the mirror stores the blob; reads wait for it
        res = warm_image(boot, spec, cache_dir, everything=everything, threads=threads,
                         retry_for=wait if mirrors_only else 0.0)
    finally:
        os.close(lock_fd)
        if mirrors_only:
            shutil.rmtree(cache_dir, ignore_errors=True)
    where = "mirrors / proxy" if mirrors_only else os.path.abspath(cache_dir)
    click.echo(f"warmed {ref} ({res.scope}): {res.chunks} chunks, {res.present} already "
               f"present, {res.bytes_fetched} bytes fetched, {res.bytes_filled} bytes "
               f"filled, into {where}")
    from erofs_nydus.rafs.backend import path_counters

    for path, v in sorted(path_counters().items()):
        click.echo(f"  {path}: {v['reads']} reads, {v['bytes']} bytes, {v['errors']} errors"
                   + (f", {v['diverted']} diverted (storing)" if v["diverted"] else ""))
    if res.errors:
        for e in res.errors[:5]:
            click.echo(f"erofs-nydus: error: {e}", err=True)
        raise DaemonError(f"{len(res.errors)} fill(s) failed")
