"""`mount` and `umount`: the hot commands of a container start, without click.

The click commands (`cli.runtime`) and the lean entry (`cli.fast`) both call
`mount_image` / `umount_image`; nothing here imports click, the builder, the registry
client or the daemon core (tests/test_mount_imports.py)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

from erofs_nydus.cli.common import cache_dir_of
from erofs_nydus.config import apply_backend_config, current_config
from erofs_nydus.errors import DaemonError, UnsupportedError, UsageError

__all__ = ["KERNEL_FANOTIFY", "echo", "fanotify_works", "mount_backend", "mount_image",
           "pick_mode", "umount_image"]


def echo(message: str, err: bool = False) -> None:
    """One line to stdout (or stderr), flushed: what `click.echo` does with our text."""
    stream = sys.stderr if err else sys.stdout
    stream.write(message + "\n")
    stream.flush()


KERNEL_FANOTIFY = (6, 14)


def _kernel_version() -> tuple[int, int]:
    nums = []
    for part in os.uname().release.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit()) or "0"
        nums.append(int(digits))
    nums += [0, 0]
    return nums[0], nums[1]


def fanotify_works() -> bool:
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
    if ver >= KERNEL_FANOTIFY and fanotify_works():
        return "fanotify", f"Linux {vs} >= 6.14 has fanotify pre-content events"
    if mode == "auto" and _fscache_unavailable() is None:
        return "fscache", f"Linux {vs} has /dev/cachefiles on-demand (no fanotify pre-content)"
    if mode == "fanotify":
        raise UnsupportedError(
            f"fanotify mode needs Linux >= 6.14 with pre-content fanotify and root (this is {vs})"
        )
    raise UnsupportedError(f"no on-demand mode works here: {fscache_msg}")


def mount_image(
    bootstrap: str, mountpoint: str, blob_dir: str | None, cache_dir: str | None,
    mode: str, amplify: int, plain_http: bool, platform: str | None, read_deadline: float,
    domain_id: str | None = None, buffered_cache: bool | None = None,
    allow_suid_dev: bool = False,
) -> None:
    """`erofs-nydus mount` (options already checked and merged with the config)."""
    from erofs_nydus.mount import is_mountpoint

    if cache_dir is None:
        raise UsageError("give --cache-dir (or daemon.cache_dir in the config file)")
    chosen, why = pick_mode(mode)
    if mode == "auto":
        echo(f"mode: {chosen} ({why})", err=True)
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
    from erofs_nydus.service.client import DaemonClient, request_started

    if domain_id is not None:
        raise UsageError("--domain-id is for --mode fscache")
    if buffered_cache:  # given on the command line (the default applies to fscache only)
        raise UsageError("--buffered-cache is for --mode fscache")
    client = DaemonClient(cache_dir)
    local = _local_backend(bootstrap, blob_dir)
    ref = None if local is not None else _check_reference(bootstrap, blob_dir)
    started = False
    try:
        info = None
        if local is None:
            # The daemon fetches the manifest and bootstrap (it has the HTTP stack
            # loaded already, this short-lived process never imports it) and registers
            # the image, in one round trip.
            overlay = apply_backend_config({"type": "registry"}, current_config())
            del overlay["type"]
            try:
                info, started = request_started(
                    client, "register_ref", ref=ref, backend_config=overlay, mountpoint=mp,
                    amplify=amplify, **_resolve_args(platform, plain_http, read_deadline),
                    **current_config().register_args())
            except DaemonError as exc:
                if str(exc) != "unknown request 'register_ref'":
                    raise
                # a daemon from before register_ref: resolve, then register
                remote = client.request(
                    "resolve", ref=ref, **_resolve_args(platform, plain_http, read_deadline))
                local = {**remote["backend"], "bootstrap": remote["bootstrap"]}
        if info is None:
            assert local is not None
            boot_path = str(local.pop("bootstrap"))
            backend = apply_backend_config(local, current_config())
            args = {"bootstrap": boot_path, "backend": backend, "mountpoint": mp,
                    "amplify": amplify, **current_config().register_args()}
            if ref is None:
                info, started = request_started(client, "register", **args)
            else:  # an older daemon that has just resolved the REF for us
                info = client.request("register", **args)
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
    echo(
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
    backend = mount_backend(bootstrap, blob_dir, cache_dir, plain_http, platform, read_deadline)
    boot_path = str(backend.pop("bootstrap"))
    backend = apply_backend_config(backend, current_config())
    info = mount_fscache(boot_path, mp, cache_dir, backend, amplify=amplify, domain_id=domain_id,
                         extra=current_config().register_args(),
                         buffered_cache=buffered_cache, allow_suid_dev=allow_suid_dev)
    if info.get("buffered_cache_off"):
        echo(f"fscache: warm reads bypass the page cache (O_DIRECT): "
                   f"{info['buffered_cache_off']}; --no-buffered-cache or "
                   "fscache.buffered_cache = false to not try", err=True)
    dom = f", domain {domain_id}" if domain_id else ""
    dom += ", buffered cache" if info["buffered_cache"] else ""
    echo(f"mounted {bootstrap} at {mp} (fscache, fsid {info['mount_fsid'][:16]}{dom}, "
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


def mount_backend(bootstrap: str, blob_dir: str | None, cache_dir: str, plain_http: bool,
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


def umount_image(mountpoint: str, cache_dir: str | None) -> None:
    """`erofs-nydus umount`."""
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
        echo(f"unmounted {mp}")
        return
    detached = client.request("detach", mountpoint=mp)
    remaining = detached["remaining"]
    if detached.get("lingering"):
        echo(f"unmounted {mp}; its image is still in use (lazily unmounted, files "
                   "open): the daemon serves it until the last file is closed")
    elif remaining == 0 and detached.get("resident"):
        echo(f"unmounted {mp}; resident daemon keeps running")
    elif remaining == 0:
        try:
            client.shutdown()
        except DaemonError as exc:  # a mount registered meanwhile keeps it running
            echo(f"unmounted {mp}; daemon kept running: {exc}")
            return
        echo(f"unmounted {mp}; daemon stopped")
    else:
        echo(f"unmounted {mp}; daemon still serves {remaining} mount(s)")
