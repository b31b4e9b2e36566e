"""Runtime commands: `mount`, `umount`, `mount-stats`, and the hidden `daemon` entry."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
from typing import Any

import click

from erofs_nydus.cli import main
from erofs_nydus.cli.common import cache_dir_of
from erofs_nydus.config import apply_backend_config, config_options, current_config
from erofs_nydus.errors import DaemonError, UnsupportedError, UsageError

KERNEL_FANOTIFY = (6, 14)


def _kernel_version() -> tuple[int, int]:
    nums = []
    for part in platform.release().split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit()) or "0"
        nums.append(int(digits))
    nums += [0, 0]
    return nums[0], nums[1]


def _fanotify_works() -> bool:
    from erofs_nydus.fanotify.group import init_group

    try:
        fd = init_group()
    except OSError:
        return False
    os.close(fd)
    return True


def _fscache_unavailable() -> str | None:
    from erofs_nydus.fscache.device import unavailable_reason

    return unavailable_reason()


def pick_mode(mode: str) -> tuple[str, str]:
    """Return (mode, reason) or raise UnsupportedError."""
    ver = _kernel_version()
    vs = f"{ver[0]}.{ver[1]}"
    fscache_msg = (
        f"fscache mode is not available on this kernel (Linux {vs} without /dev/cachefiles "
        "on-demand support); use the VM harness (vm/) for fscache"
    )
    if mode == "fscache":
        no_fscache = _fscache_unavailable()
        if no_fscache is None:
            return "fscache", f"Linux {vs} has /dev/cachefiles on-demand"
        raise UnsupportedError(f"{fscache_msg}: {no_fscache}")
    # fanotify first: where it works (the common case) fscache is never looked at
    if ver >= KERNEL_FANOTIFY and _fanotify_works():
        return "fanotify", f"Linux {vs} >= 6.14 has fanotify pre-content events"
    if mode == "auto" and _fscache_unavailable() is None:
        return "fscache", f"Linux {vs} has /dev/cachefiles on-demand (no fanotify pre-content)"
    if mode == "fanotify":
        raise UnsupportedError(
            f"fanotify mode needs Linux >= 6.14 with pre-content fanotify and root (this is {vs})"
        )
    raise UnsupportedError(f"no on-demand mode works here: {fscache_msg}")


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
    from erofs_nydus.mount import is_mountpoint

    if cache_dir is None:
        raise UsageError("give --cache-dir (or daemon.cache_dir in the config file)")
    chosen, why = pick_mode(mode)
    if mode == "auto":
        click.echo(f"mode: {chosen} ({why})", err=True)
    mp = os.path.realpath(mountpoint)
    if is_mountpoint(mp):
        raise UsageError(f"{mp} is already a mountpoint")
    existed = os.path.isdir(cache_dir)
    had = set(os.listdir(cache_dir)) if existed else set()
    try:
        if chosen == "fscache":
            _mount_fscache(bootstrap, mp, blob_dir, cache_dir, amplify, plain_http, platform,
                           read_deadline, domain_id, buffered_cache, allow_suid_dev)
        else:
            _mount_fanotify(bootstrap, mp, blob_dir, cache_dir, amplify, plain_http, platform,
                            read_deadline, domain_id, buffered_cache, allow_suid_dev)
    except BaseException as exc:
        _forget_failed_start(cache_dir, existed, had, keep_log=isinstance(exc, DaemonError))
        raise


def _forget_failed_start(cache_dir: str, existed: bool, had: set[str], keep_log: bool) -> None:
    """A mount failed: remove the daemon's lock and log files it left in the cache dir
    (and the dir, if this mount made it and it is empty), unless they were there
    before, a daemon still runs, or the error names the log (``keep_log``)."""
    from erofs_nydus.service.client import DaemonClient

    client = DaemonClient(cache_dir)
    if os.path.basename(client.paths.lock) in had:
        return
    client.remove_stale_files(log=not keep_log and os.path.basename(client.paths.log) not in had)
    if not existed:
        with contextlib.suppress(OSError):
            os.rmdir(cache_dir)  # only when empty


def _mount_fanotify(bootstrap: str, mp: str, blob_dir: str | None, cache_dir: str, amplify: int,
                    plain_http: bool, platform: str | None, read_deadline: float,
                    domain_id: str | None, buffered_cache: bool | None,
                    allow_suid_dev: bool = False) -> None:
    from erofs_nydus.mount import mount_erofs_file
    from erofs_nydus.service.client import DaemonClient

    if domain_id is not None:
        raise UsageError("--domain-id is for --mode fscache")
    if buffered_cache:  # given on the command line (the default applies to fscache only)
        raise UsageError("--buffered-cache is for --mode fscache")
    client = DaemonClient(cache_dir)
    local = _local_backend(bootstrap, blob_dir)
    ref = None if local is not None else _check_reference(bootstrap, blob_dir)
    started = client.ensure_running()
    try:
        if local is None:
            # The daemon fetches the manifest and bootstrap: it has the HTTP stack
            # loaded already, this short-lived process never imports it.
            remote = client.request(
                "resolve", ref=ref, **_resolve_args(platform, plain_http, read_deadline))
            local = {**remote["backend"], "bootstrap": remote["bootstrap"]}
        boot_path = str(local.pop("bootstrap"))
        backend = apply_backend_config(local, current_config())
        info = client.request(
            "register",
            bootstrap=boot_path,
            backend=backend,
            mountpoint=mp,
            amplify=amplify,
            **current_config().register_args(),
        )
    except BaseException:
        if started:
            with contextlib.suppress(Exception):
                client.shutdown()
        raise
    try:
        mount_erofs_file(info["bootstrap"], mp, info["devices"], allow_suid_dev=allow_suid_dev)
    except BaseException:
        remaining = client.request("detach", mountpoint=mp)["remaining"]
        if remaining == 0:
            client.shutdown()
        raise
    click.echo(
        f"mounted {bootstrap} at {mp} (fanotify, image {info['fsid'][:12]}, "
        f"{len(info['devices'])} blob(s), cache {client.paths.cache_dir})"
    )


def _mount_fscache(bootstrap: str, mp: str, blob_dir: str | None, cache_dir: str, amplify: int,
                   plain_http: bool, platform: str | None, read_deadline: float,
                   domain_id: str | None, buffered_cache: bool | None,
                   allow_suid_dev: bool = False) -> None:
    from erofs_nydus.service.fscache_client import buffered_cache_env, mount_fscache

    if buffered_cache is None:  # not on the command line: environment, else the config
        env = buffered_cache_env()
        buffered_cache = current_config().fscache_buffered_cache if env is None else env
    backend = _mount_backend(bootstrap, blob_dir, cache_dir, plain_http, platform, read_deadline)
    boot_path = str(backend.pop("bootstrap"))
    backend = apply_backend_config(backend, current_config())
    info = mount_fscache(boot_path, mp, cache_dir, backend, amplify=amplify, domain_id=domain_id,
                         extra=current_config().register_args(),
                         buffered_cache=buffered_cache, allow_suid_dev=allow_suid_dev)
    if info.get("buffered_cache_off"):
        click.echo(f"fscache: warm reads bypass the page cache (O_DIRECT): "
                   f"{info['buffered_cache_off']}; --no-buffered-cache or "
                   "fscache.buffered_cache = false to not try", err=True)
    dom = f", domain {domain_id}" if domain_id else ""
    dom += ", buffered cache" if info["buffered_cache"] else ""
    click.echo(f"mounted {bootstrap} at {mp} (fscache, fsid {info['mount_fsid'][:16]}{dom}, "
               f"{info['blobs']} blob(s), cache {os.path.abspath(cache_dir)})")


def _resolve_args(platform: str | None, plain_http: bool,
                  read_deadline: float) -> dict[str, Any]:
    """`resolve_remote_image` keyword arguments (also the daemon's `resolve` request)."""
    cfg = current_config()
    docker_config = cfg.docker_config_dir() or _caller_docker_config()
    args: dict[str, Any] = {
        "platform": platform, "plain_http": True if plain_http else "loopback",
        "deadline": read_deadline, "retries": cfg.retries,
        "docker_config": os.path.abspath(docker_config),
        "mirrors": cfg.mirrors or None, "proxy": cfg.proxy}
    # The caller's TLS roots (what httpx reads from these variables in this process)
    # go with the request: the daemon's environment has none of them.
    ca = os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR")
    if ca:
        args["verify"] = os.path.abspath(ca)
    return args


def _caller_docker_config() -> str:
    """This caller's registry auth file, named explicitly in each request: the daemon
    runs with an allow-listed environment and must never fall back to the settings of
    whoever started it.  `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`;
    `$REGISTRY_AUTH_FILE` when that one does not exist (the order of
    `registry.auth.docker_config_paths`, which this light process does not import)."""
    env = os.environ
    if env.get("DOCKER_CONFIG"):
        first = os.path.join(env["DOCKER_CONFIG"], "config.json")
    else:
        home = env.get("HOME") or os.path.expanduser("~")
        first = os.path.join(home, ".docker", "config.json")
    auth_file = env.get("REGISTRY_AUTH_FILE")
    if auth_file and not os.path.exists(first):
        return auth_file
    return first


def _local_backend(bootstrap: str, blob_dir: str | None) -> dict[str, Any] | None:
    """Backend spec plus "bootstrap" for a BOOTSTRAP file; None for a REF."""
    if not os.path.isfile(bootstrap):
        return None
    if blob_dir is None:
        raise UsageError("mounting a BOOTSTRAP file needs --blob-dir")
    return {"type": "local", "dir": os.path.abspath(blob_dir),
            "bootstrap": os.path.abspath(bootstrap)}


def _check_reference(text: str, blob_dir: str | None) -> str:
    """`text` as a reference the daemon can resolve (an OCI layout path made absolute);
    UsageError when it is neither a file nor a reference."""
    import dataclasses

    from erofs_nydus.registry.reference import (
        LayoutReference,
        looks_like_reference,
        parse_reference,
    )

    if not looks_like_reference(text):
        raise UsageError(f"{text}: no such bootstrap file, nor an image reference")
    if blob_dir is not None:
        raise UsageError("--blob-dir is for BOOTSTRAP files; a REF's blobs come from its store")
    ref = parse_reference(text)
    if isinstance(ref, LayoutReference):
        ref = dataclasses.replace(ref, path=os.path.abspath(ref.path))
    return str(ref)


def _mount_backend(bootstrap: str, blob_dir: str | None, cache_dir: str, plain_http: bool,
                   platform: str | None, read_deadline: float) -> dict[str, Any]:
    """Backend spec plus "bootstrap" (local path) for a BOOTSTRAP file or a REF,
    resolved in this process (fscache mode: its daemon has no control socket)."""
    local = _local_backend(bootstrap, blob_dir)
    if local is not None:
        return local
    from erofs_nydus.registry.resolve import resolve_remote_image

    remote = resolve_remote_image(_check_reference(bootstrap, blob_dir), cache_dir,
                                  **_resolve_args(platform, plain_http, read_deadline))
    return {**remote.backend, "bootstrap": remote.bootstrap}


@main.command("umount")
@click.argument("mountpoint", type=click.Path())
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Cache dir of the mount (found from the mount table if omitted).",
)
def umount_cmd(mountpoint: str, cache_dir: str | None) -> None:
    """Unmount MOUNTPOINT; stop the daemon when it serves no other mount."""
    from erofs_nydus.mount import is_mountpoint, umount
    from erofs_nydus.service.client import DaemonClient

    mp = os.path.realpath(mountpoint)
    cdir = cache_dir_of(mp, cache_dir)
    client = DaemonClient(cdir)
    if is_mountpoint(mp):
        umount(mp)
    if not client.alive():
        if client.supervisor_running():
            raise DaemonError(f"daemon for {client.paths.cache_dir} is not answering")
        click.echo(f"unmounted {mp}")
        return
    detached = client.request("detach", mountpoint=mp)
    remaining = detached["remaining"]
    if detached.get("lingering"):
        click.echo(f"unmounted {mp}; its image is still in use (lazily unmounted, files "
                   "open): the daemon serves it until the last file is closed")
    elif remaining == 0 and detached.get("resident"):
        click.echo(f"unmounted {mp}; resident daemon keeps running")
    elif remaining == 0:
        try:
            client.shutdown()
        except DaemonError as exc:  # a mount registered meanwhile keeps it running
            click.echo(f"unmounted {mp}; daemon kept running: {exc}")
            return
        click.echo(f"unmounted {mp}; daemon stopped")
    else:
        click.echo(f"unmounted {mp}; daemon still serves {remaining} mount(s)")


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
        spec = _mount_backend(ref, blob_dir, cache_dir, plain_http, platform, read_deadline)
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
        click.echo(f"  {path}: {v['reads']} reads, {v['bytes']} bytes, {v['errors']} errors")
    if res.errors:
        for e in res.errors[:5]:
            click.echo(f"erofs-nydus: error: {e}", err=True)
        raise DaemonError(f"{len(res.errors)} fill(s) failed")
