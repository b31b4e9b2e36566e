"""Runtime commands: `mount`, `umount`, `mount-stats`, and the hidden `daemon` entry."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from typing import Any

import click

from erofs_nydus.cli import main
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
    from erofs_nydus.daemon.fanotify import init_group

    try:
        fd = init_group()
    except OSError:
        return False
    os.close(fd)
    return True


def pick_mode(mode: str) -> tuple[str, str]:
    """Return (mode, reason) or raise UnsupportedError."""
    ver = _kernel_version()
    vs = f"{ver[0]}.{ver[1]}"
    fscache_msg = (
        f"fscache mode is not available on this kernel (Linux {vs} without /dev/cachefiles "
        "on-demand support); use the VM harness (vm/) for fscache"
    )
    if mode == "fscache":
        raise UnsupportedError(fscache_msg)
    if ver >= KERNEL_FANOTIFY and _fanotify_works():
        return "fanotify", f"Linux {vs} >= 6.14 has fanotify pre-content events"
    if mode == "fanotify":
        raise UnsupportedError(
            f"fanotify mode needs Linux >= 6.14 with pre-content fanotify and root (this is {vs})"
        )
    raise UnsupportedError(f"no on-demand mode works here: {fscache_msg}")


def _mount_source(mountpoint: str) -> tuple[str, str] | None:
    """(fstype, source) of the topmost mount at `mountpoint`, from mountinfo."""
    from erofs_nydus.mount import _unescape_mountinfo

    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 10 or _unescape_mountinfo(parts[4]) != mountpoint:
                continue
            sep = parts.index("-")
            found = (parts[sep + 1], _unescape_mountinfo(parts[sep + 2]))
    return found


@main.command("mount")
@click.argument("bootstrap", type=click.Path(exists=True, dir_okay=False))
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--blob-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="Directory holding the data blobs as <blob id> files.",
)
@click.option(
    "--cache-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Where blob cache files live; one daemon serves each cache dir.",
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
def mount_cmd(
    bootstrap: str, mountpoint: str, blob_dir: str, cache_dir: str, mode: str, amplify: int
) -> None:
    """Mount BOOTSTRAP at MOUNTPOINT; data is fetched on first read.

    Starts (or reuses) the daemon for --cache-dir in the background, registers the
    image, and mounts it with file-backed EROFS, one cache file per blob.  Returns
    once the mount is usable.  A second mount of the same image shares the cache.
    """
    from erofs_nydus.daemon.client import DaemonClient
    from erofs_nydus.mount import is_mountpoint, mount_erofs_file

    chosen, why = pick_mode(mode)
    if mode == "auto":
        click.echo(f"mode: {chosen} ({why})", err=True)
    mp = os.path.realpath(mountpoint)
    if is_mountpoint(mp):
        raise UsageError(f"{mp} is already a mountpoint")
    client = DaemonClient(cache_dir)
    started = client.ensure_running()
    try:
        info = client.request(
            "register",
            bootstrap=os.path.abspath(bootstrap),
            backend={"type": "local", "dir": os.path.abspath(blob_dir)},
            mountpoint=mp,
            amplify=amplify,
        )
    except Exception:
        if started:
            client.shutdown()
        raise
    try:
        mount_erofs_file(info["bootstrap"], mp, info["devices"])
    except BaseException:
        remaining = client.request("detach", mountpoint=mp)["remaining"]
        if remaining == 0:
            client.shutdown()
        raise
    click.echo(
        f"mounted {bootstrap} at {mp} ({chosen}, image {info['fsid'][:12]}, "
        f"{len(info['devices'])} blob(s), cache {client.paths.cache_dir})"
    )


def _cache_dir_of(mp: str, cache_dir: str | None) -> str:
    if cache_dir is not None:
        return cache_dir
    src = _mount_source(mp)
    if src is None:
        raise UsageError(f"{mp} is not mounted; pass --cache-dir to clean up its registration")
    fstype, source = src
    if fstype != "erofs" or not source.endswith(".boot"):
        raise UsageError(f"{mp} is not an erofs-nydus mount ({fstype} from {source})")
    return os.path.dirname(source)


@main.command("umount")
@click.argument("mountpoint", type=click.Path())
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Cache dir of the mount (found from the mount table if omitted).",
)
def umount_cmd(mountpoint: str, cache_dir: str | None) -> None:
    """Unmount MOUNTPOINT; stop the daemon when it serves no other mount."""
    from erofs_nydus.daemon.client import DaemonClient
    from erofs_nydus.mount import is_mountpoint, umount

    mp = os.path.realpath(mountpoint)
    cdir = _cache_dir_of(mp, cache_dir)
    client = DaemonClient(cdir)
    if is_mountpoint(mp):
        umount(mp)
    if not client.alive():
        if client.supervisor_running():
            raise DaemonError(f"daemon for {client.paths.cache_dir} is not answering")
        click.echo(f"unmounted {mp}")
        return
    remaining = client.request("detach", mountpoint=mp)["remaining"]
    if remaining == 0:
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
    from erofs_nydus.daemon.client import DaemonClient

    if cache_dir is None:
        if mountpoint is None:
            raise UsageError("give a MOUNTPOINT or --cache-dir")
        cache_dir = _cache_dir_of(os.path.realpath(mountpoint), None)
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
    for mp in (mp for img in st["images"] for mp in img["mountpoints"]):
        click.echo(f"mount: {mp}")


@main.command("daemon", hidden=True)
@click.option("--cache-dir", required=True, type=click.Path(file_okay=False))
def daemon_cmd(cache_dir: str) -> None:
    """Run the supervisor (which runs the daemon) for CACHE_DIR in the foreground."""
    from erofs_nydus.daemon.supervisor import run_supervisor

    logging.basicConfig(
        level=os.environ.get("EROFS_NYDUS_LOG", "INFO"),
        format=f"%(asctime)s supervisor[{os.getpid()}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    sys.exit(run_supervisor(cache_dir))
