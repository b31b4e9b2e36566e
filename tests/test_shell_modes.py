"""One process shell, both request sources (issue 11 item 8): the same shell-level
scenarios (`shell_scenarios.py`) and the same assertions in fanotify mode (here) and
fscache mode (in the QEMU VM): oom_score_adj and the open-file limit, the control
line bound, `resolve` + `register` through the daemon, SIGTERM refused with a live
mount, a stopped worker replaced after the read deadline, umount stopping it all.
A difference between the modes' shells fails one of the two."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import shell_scenarios as sc
from daemon_support import build_image, fanotify_usable
from layers_support import umoci_image

from erofs_nydus.errors import DaemonError
from erofs_nydus.registry.convert import ConvertOptions, convert_image


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("shell-modes")
    src = base / "src"
    sc.make_tree(src)
    img = build_image(src, base / "img")

    def step(root: Path) -> None:
        sc.make_tree(root)

    layout = umoci_image(base / "oci", [step])
    out = base / "nydus-layout"
    convert_image(f"oci:{layout}:latest", f"oci:{out}:nydus",
                  ConvertOptions(cache_dir=str(base / "conv")))
    return {"boot": str(img.bootstrap), "blob_dir": str(img.blob_dir), "src": str(src),
            "ref": f"oci:{out}:nydus"}


@pytest.mark.kernel
@pytest.mark.skipif(not fanotify_usable(), reason="needs root and pre-content fanotify")
def test_shell_fanotify(inputs: dict[str, str], tmp_path: Path) -> None:
    os.environ.setdefault("EROFS_NYDUS_READ_DEADLINE", sc.DEADLINE)
    r = sc.run_all("fanotify", inputs["boot"], inputs["blob_dir"], inputs["src"],
                   inputs["ref"], str(tmp_path))
    sc.check(r)


@pytest.mark.vm
@pytest.mark.timeout(1800)
def test_shell_fscache(inputs: dict[str, str]) -> None:
    import vm_support as vs

    reason = vs.vm_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    vs.ensure_kernel()
    args = ", ".join(repr(inputs[k]) for k in ("boot", "blob_dir", "src", "ref"))
    res = vs.run_python_in_vm(
        "import os, vm_support as vs, shell_scenarios as sc\n"
        f"vs.emit_result(sc.run_all('fscache', {args}, os.environ['SCRATCH'] + '/shell'))\n",
        timeout=900)
    assert res.returncode == 0, res.stdout[-6000:]
    sc.check(vs.vm_result(res.stdout))


def _worker(mode: str, cache: Path) -> tuple[Any, Callable[[], None]]:
    """A worker of `mode` (no process, no kernel requests): its control operations."""
    if mode == "fscache":
        from erofs_nydus.service.fscache_daemon import FscacheWorker

        r, w = os.pipe()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fw = FscacheWorker(w, sock, str(cache), threads=1)

        def close_fscache() -> None:
            fw.pool.shutdown()
            fw.table.close()
            sock.close()
            os.close(r)
            os.close(w)

        return fw, close_fscache
    if not fanotify_usable():
        pytest.skip("needs root and pre-content fanotify")
    from erofs_nydus.fanotify.handler import init_group
    from erofs_nydus.service.worker import Worker

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    group = init_group()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    worker = Worker(theirs, group, listener, str(cache))

    def close_fanotify() -> None:
        worker.close_channel()
        worker.table.close()
        for s in (ours, theirs, listener):
            s.close()
        os.close(group)

    return worker, close_fanotify


@pytest.mark.parametrize("mode", ["fanotify", "fscache"])
def test_control_operations_are_the_same_in_both_modes(mode: str, inputs: dict[str, str],
                                                       tmp_path: Path) -> None:
    """The control socket's operations come from one place: `resolve` (once fanotify
    only), `register`, `status`, `detach`, `shutdown` and their refusals answer alike."""
    from erofs_nydus.fsutil import private_dir

    cache = Path(private_dir(tmp_path / "cache"))
    worker, close = _worker(mode, cache)
    try:
        ping = worker.dispatch({"op": "ping"})
        assert set(ping) == {"pid", "mounts", "resident", "mode"} and ping["mode"] == mode
        remote = worker.dispatch({"op": "resolve", "ref": inputs["ref"]})
        assert Path(remote["bootstrap"]).parent == cache and len(remote["blob_ids"]) == 1
        mp = str(tmp_path / "mnt")
        info = worker.dispatch({"op": "register", "mode": mode, "bootstrap": remote["bootstrap"],
                                "backend": remote["backend"], "mountpoint": mp})
        assert info["fsid"] and info["bootstrap"]
        assert worker.dispatch({"op": "ping"})["mounts"] == [mp]
        assert [i["fsid"] for i in worker.dispatch({"op": "status"})["images"]] == [info["fsid"]]
        with pytest.raises(DaemonError, match="still serving 1 mount"):
            worker.dispatch({"op": "shutdown"})
        with pytest.raises(DaemonError, match="unknown request 'nope'"):
            worker.dispatch({"op": "nope"})
        other = "fanotify" if mode == "fscache" else "fscache"
        with pytest.raises(DaemonError, match=f"runs in {mode} mode"):
            worker.dispatch({"op": "register", "mode": other, "bootstrap": remote["bootstrap"],
                             "backend": remote["backend"], "mountpoint": mp + "2"})
        assert worker.dispatch({"op": "detach", "mountpoint": mp})["remaining"] == 0
        assert worker.dispatch({"op": "shutdown"}) == {}
    finally:
        close()


@pytest.mark.parametrize("mode", ["fanotify", "fscache"])
def test_no_registration_once_the_worker_decided_to_stop(mode: str, inputs: dict[str, str],
                                                         tmp_path: Path) -> None:
    """A decision to stop for want of images (idle exit, last lingering image reaped)
    and a registration exclude each other: a `register` arriving while the table is
    being found empty waits, then is refused with DaemonStopping (the client starts
    the next daemon) - never accepted by a worker about to close its request source
    under the new mount.  So is one after an accepted `shutdown`."""
    import threading

    from erofs_nydus.errors import DaemonStopping
    from erofs_nydus.fsutil import private_dir

    def register(worker: Any, mp: str) -> dict[str, Any]:
        return dict(worker.dispatch({
            "op": "register", "mode": mode, "bootstrap": inputs["boot"],
            "backend": {"type": "local", "dir": inputs["blob_dir"]}, "mountpoint": mp}))

    worker, close = _worker(mode, Path(private_dir(tmp_path / "cache")))
    try:
        checking, release = threading.Event(), threading.Event()

        def empty_after_a_while() -> bool:  # the idle check, caught in the middle
            checking.set()
            release.wait(10)
            return not worker.table.images

        decided: list[bool] = []
        stopper = threading.Thread(
            target=lambda: decided.append(worker.stop_when(empty_after_a_while)))
        stopper.start()
        assert checking.wait(10)
        outcome: list[BaseException | dict[str, Any]] = []

        def try_register() -> None:
            try:
                outcome.append(register(worker, str(tmp_path / "mnt")))
            except BaseException as exc:
                outcome.append(exc)

        registrar = threading.Thread(target=try_register)
        registrar.start()
        registrar.join(0.5)  # it has had every chance to slip in
        release.set()
        stopper.join(10)
        registrar.join(10)
        assert decided == [True]
        assert len(outcome) == 1 and isinstance(outcome[0], DaemonStopping), outcome
        assert not worker.table.images
    finally:
        close()
    worker, close = _worker(mode, Path(private_dir(tmp_path / "cache2")))
    try:
        assert worker.dispatch({"op": "shutdown"}) == {}
        with pytest.raises(DaemonStopping, match="stopping"):
            register(worker, str(tmp_path / "mnt2"))
        assert not worker.table.images
    finally:
        close()
