"""The process shell around the fanotify daemon (issue 11 items 1 and 6, invariants (a)
and (g)): no signal to, or death of, one of our processes lets a read of a mounted
image return bytes that are not the image's.  Readers get the right bytes or EIO,
never zeros, and nothing stays blocked.

Threat model, crashes and signals (what these tests hold):

* SIGTERM/SIGINT to the supervisor (systemctl stop) with mounts live: refused and
  logged ("N mounts live; umount first"); with none, it stops.
* kill -9 / OOM kill of the supervisor: a keeper process still holds the fanotify
  group, kills the orphaned daemon and starts a new supervisor, which answers the reads
  the dead one had taken with EIO (by fd number) before reading new ones.  Of the
  keeper: the supervisor starts a new one.  Of the daemon: the supervisor re-sends
  every unanswered event to a new daemon.  Only losing every holder of the group at
  once (supervisor and keeper together, e.g. a cgroup-wide SIGKILL) lets holes read
  as zeros; both ask for oom_score_adj -1000.
* A stopped or stuck daemon: after the read deadline the supervisor answers EIO and
  replaces it; a slow registry read within the mount's --read-deadline is not "stuck".
* umount -l with files open, then `erofs-nydus umount`: served until the superblock
  is gone.
* Overload: in-flight events are bounded under the open-file limit (the kernel keeps
  the rest queued), the daemon's messages to the supervisor are never dropped.
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from daemon_support import (
    build_image,
    daemon_status,
    fanotify_usable,
    pid_alive,
    run_cli,
    small_image,
    wait_for,
)

from erofs_nydus.service.client import DaemonClient

if TYPE_CHECKING:
    from daemon_support import BuiltImage, Mounts

pytestmark = pytest.mark.kernel

if not fanotify_usable():
    pytest.skip("needs root and pre-content fanotify (Linux >= 6.14)", allow_module_level=True)


def _big_file_image(tmp_path: Path, size: int = 8 << 20) -> tuple[Path, Path, BuiltImage]:
    src = tmp_path / "src"
    src.mkdir()
    big = src / "big"
    big.write_bytes(random.Random(3).randbytes(size))
    return src, big, build_image(src, tmp_path / "img")


def _mount_one(mounts: Mounts, img: BuiltImage) -> tuple[Path, Path, DaemonClient]:
    """`img` mounted at mnt without read amplification: (mountpoint, cache dir, the
    cache dir's daemon client)."""
    mp = mounts.mount(img, "mnt", None, "--amplify", "0")
    cache = mounts.base / "cache"
    return mp, cache, DaemonClient(cache)


def _supervisor(client: DaemonClient) -> int:
    sup = client.supervisor_pid()
    assert sup is not None
    return sup


def test_sigterm_with_live_mounts_is_refused(tmp_path: Path, mounts: Mounts) -> None:
    """SIGTERM (what `systemctl stop` sends) must not let the fanotify group close
    under a mount: the supervisor refuses, logs why and keeps serving."""
    _src, big, img = _big_file_image(tmp_path)
    mp, cache, client = _mount_one(mounts, img)
    want = big.read_bytes()
    with open(mp / "big", "rb") as f:
        assert f.read(1 << 20) == want[: 1 << 20]
    sup = _supervisor(client)
    os.kill(sup, signal.SIGTERM)
    log = Path(client.paths.log)
    refused = "not stopping: 1 mounts live; umount first"
    wait_for(lambda: refused in log.read_text(), what="refusal log")
    assert pid_alive(sup) and client.alive()
    assert (mp / "big").read_bytes() == want  # never zeros
    os.kill(sup, signal.SIGINT)
    wait_for(lambda: log.read_text().count(refused) >= 2,
             what="second refusal")
    assert (mp / "big").read_bytes() == want
    assert daemon_status(cache)["fanotify"]["denied"] == 0
    assert "daemon stopped" in mounts.umount(mp)


def test_sigterm_without_mounts_stops(tmp_path: Path) -> None:
    client = DaemonClient(tmp_path / "cache")
    assert client.ensure_running() is True
    sup = _supervisor(client)
    os.kill(sup, signal.SIGTERM)
    wait_for(lambda: not client.supervisor_running(), what="supervisor exit")
    assert not os.path.exists(client.paths.socket)
    client.shutdown()  # reaps the process we started


def _read_all(paths: list[tuple[Path, Path]], timeout: float) -> dict[str, bytes | Exception]:
    """Read each mounted file in its own thread; fail if one is still blocked."""
    results: dict[str, bytes | Exception] = {}

    def read(mounted: Path) -> None:
        try:
            results[mounted.name] = mounted.read_bytes()
        except Exception as exc:
            results[mounted.name] = exc

    threads = [threading.Thread(target=read, args=(m,), daemon=True) for m, _ in paths]
    for t in threads:
        t.start()
    end = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.1, end - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a reader is still blocked"
    return results


def _right_or_eio(results: dict[str, bytes | Exception], paths: list[tuple[Path, Path]]) -> int:
    """Every result is the file's bytes or EIO; return how many were EIO."""
    eio = 0
    for mounted, source in paths:
        got = results[mounted.name]
        if isinstance(got, OSError):
            assert got.errno == errno.EIO, got
            eio += 1
        else:
            assert got == source.read_bytes(), f"{mounted.name}: wrong bytes"
    return eio


def test_stopped_worker_is_replaced_and_readers_get_eio(
    tmp_path: Path, mounts: Mounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGSTOPped (stuck) daemon: after the read deadline the supervisor answers
    EIO itself, replaces the daemon, and later reads are served again."""
    monkeypatch.setenv("EROFS_NYDUS_READ_DEADLINE", "3")
    src, img = small_image(tmp_path)
    mp, cache, _client = _mount_one(mounts, img)
    files = sorted(src.iterdir())
    pid = daemon_status(cache)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        paths = [(mp / f.name, f) for f in files[:8]]
        results = _read_all(paths, timeout=60)
        _right_or_eio(results, paths)  # EIO for reads past the deadline, else re-served
        assert "daemon stuck" in Path(DaemonClient(cache).paths.log).read_text()
        wait_for(lambda: not pid_alive(pid), what="stuck daemon replaced")
        out = run_cli("ctl", "info", "--cache-dir", str(cache), timeout=60).stdout
        new = daemon_status(cache)["pid"]
        assert new != pid and f"pid: {new}" in out
        for f in files:
            assert (mp / f.name).read_bytes() == f.read_bytes()
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert "daemon stopped" in mounts.umount(mp)


def _can_lower_oom_score_adj() -> bool:
    import subprocess

    return subprocess.run(["sh", "-c", "echo -1000 > /proc/self/oom_score_adj"],
                          capture_output=True, check=False).returncode == 0


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


@pytest.fixture(scope="module")
def many_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuiltImage]:
    base = tmp_path_factory.mktemp("many")
    src = base / "src"
    src.mkdir()
    rng = random.Random(9)
    for i in range(400):
        (src / f"f{i:03d}").write_bytes(rng.randbytes(rng.randrange(4096, 200_000)))
    return src, build_image(src, base / "img", "--chunk-size", "0x10000")


def _readers_while(mp: Path, src: Path, action: object, nthreads: int = 16) -> list[str]:
    """`nthreads` readers go through all files while `action` runs; return the files
    that read back wrong (EIO is allowed, zeros or other bytes are not)."""
    files = sorted(src.iterdir())
    wrong: list[str] = []
    eio: list[str] = []
    started = threading.Event()

    def reader(k: int) -> None:
        for i, f in enumerate(files[k::nthreads]):
            if i == 2:
                started.set()
            try:
                got = (mp / f.name).read_bytes()
            except OSError as exc:
                if exc.errno != errno.EIO:
                    wrong.append(f"{f.name}: {exc}")
                eio.append(f.name)
                continue
            if got != f.read_bytes():
                wrong.append(f.name)

    threads = [threading.Thread(target=reader, args=(k,), daemon=True) for k in range(nthreads)]
    for t in threads:
        t.start()
    started.wait(30)
    action()  # type: ignore[operator]
    end = time.monotonic() + 120
    for t in threads:
        t.join(max(0.1, end - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a reader is still blocked"
    return wrong


def test_kill_9_supervisor_under_concurrent_readers(
    many_files: tuple[Path, BuiltImage], mounts: Mounts
) -> None:
    """kill -9 of the supervisor (or the OOM killer): the keeper holds the group, kills
    the orphaned daemon, starts a new supervisor that answers the dead one's reads with
    EIO before reading new events.  No file ever reads back wrong; later reads work."""
    src, img = many_files
    mp, cache, client = _mount_one(mounts, img)
    sup = _supervisor(client)
    old_daemon = daemon_status(cache)["pid"]
    def kill_twice() -> None:  # the successor too: the keeper starts another
        os.kill(sup, signal.SIGKILL)
        wait_for(lambda: client.supervisor_pid() not in (None, sup), what="new supervisor")
        second = client.supervisor_pid()
        assert second is not None
        time.sleep(0.3)
        os.kill(second, signal.SIGKILL)
        wait_for(lambda: client.supervisor_pid() not in (None, sup, second),
                 what="third supervisor")

    wrong = _readers_while(mp, src, kill_twice, nthreads=64)
    assert wrong == []
    assert client.supervisor_running()
    assert not pid_alive(old_daemon)
    assert daemon_status(cache)["pid"] != old_daemon
    for f in sorted(src.iterdir()):  # everything reads right afterwards (no zeros cached)
        assert (mp / f.name).read_bytes() == f.read_bytes(), f.name
    with open(f"/proc/{client.supervisor_pid()}/oom_score_adj") as fh:
        adj = fh.read().strip()
    if _can_lower_oom_score_adj():
        assert adj == "-1000"
    else:  # no CAP_SYS_RESOURCE here (a container): it says so
        assert "cannot set oom_score_adj -1000" in Path(client.paths.log).read_text()
    assert "daemon stopped" in mounts.umount(mp)


def test_kill_9_keeper_is_restarted(tmp_path: Path, mounts: Mounts) -> None:
    """The keeper dies: the supervisor starts a new one, and a later supervisor death
    is still survived."""
    src, img = small_image(tmp_path, 20)
    mp, cache, client = _mount_one(mounts, img)
    sup = _supervisor(client)
    daemon = daemon_status(cache)["pid"]
    (keeper,) = [p for p in _children(sup) if p != daemon]
    os.kill(keeper, signal.SIGKILL)
    wait_for(lambda: len([p for p in _children(sup) if p not in (daemon, keeper)]) == 1,
             what="new keeper")
    os.kill(sup, signal.SIGKILL)
    wait_for(lambda: client.supervisor_pid() not in (None, sup), what="new supervisor")
    for f in sorted(src.iterdir()):
        assert (mp / f.name).read_bytes() == f.read_bytes(), f.name
    assert "daemon stopped" in mounts.umount(mp)


def test_kill_9_supervisor_with_reads_pending(tmp_path: Path, mounts: Mounts) -> None:
    """The reads the dead supervisor had taken from the queue and not answered: its
    successor answers them EIO (by fd number) before it reads anything new."""
    src, img = small_image(tmp_path)
    mp, cache, client = _mount_one(mounts, img)
    sup = _supervisor(client)
    files = sorted(src.iterdir())
    daemon = daemon_status(cache)["pid"]
    os.kill(daemon, signal.SIGSTOP)  # events reach it and stay unanswered
    try:
        paths = [(mp / f.name, f) for f in files[:8]]
        results: dict[str, bytes | Exception] = {}

        def kill_supervisor() -> None:
            time.sleep(1.0)
            os.kill(sup, signal.SIGKILL)

        killer = threading.Thread(target=kill_supervisor)
        killer.start()
        results = _read_all(paths, timeout=60)
        killer.join()
        # denied reads: EIO, or served again when the kernel retries (readahead)
        _right_or_eio(results, paths)
        log = Path(client.paths.log).read_text()
        assert re.search(r"answered [1-9]\d* reads the dead supervisor left pending", log)
        for f in files:
            assert (mp / f.name).read_bytes() == f.read_bytes(), f.name
    finally:
        if pid_alive(daemon):
            os.kill(daemon, signal.SIGKILL)
    assert "daemon stopped" in mounts.umount(mp)


def test_daemon_channel_never_drops_messages(tmp_path: Path) -> None:
    """A supervisor that does not read for a while (stopped, busy): the daemon's
    "done" messages wait instead of being dropped (a lost "done" leaks an event fd in
    the supervisor and makes the event look overdue)."""
    import socket

    from erofs_nydus.fanotify.handler import init_group
    from erofs_nydus.service import channel
    from erofs_nydus.service.worker import Worker

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    group = init_group()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    worker = Worker(theirs, group, listener, str(tmp_path / "cache"))
    theirs.setblocking(False)  # as the daemon's event loop has it
    n = 3000
    answered = worker.handler.on_answered
    assert answered is not None
    producer = threading.Thread(target=lambda: [answered(i) for i in range(n)])
    try:
        producer.start()
        time.sleep(2.5)  # nobody reads: the channel fills up
        ours.settimeout(10)
        got: list[int] = []
        while len(got) < n:
            msg, fds = channel.recv(ours)
            assert msg is not None and msg["op"] == "done" and not fds
            got += msg["fds"]
        assert got == list(range(n))
        producer.join(10)
        assert not producer.is_alive()
        # a full queue makes the sender wait, counted (here with a tiny bound)
        small = channel.Sender(theirs, bound=4)
        feeder = threading.Thread(target=lambda: [small.put({"op": "pong"}) for _ in range(500)])
        feeder.start()
        time.sleep(1.0)
        count = 0
        while count < 500:
            msg, _ = channel.recv(ours)
            assert msg == {"op": "pong"}
            count += 1
        feeder.join(10)
        assert small.full > 0
        small.close()
    finally:
        close = getattr(worker, "close_channel", None)
        if close is not None:
            close()
        for s in (ours, theirs, listener):
            s.close()
        os.close(group)


def test_low_open_file_limit_bounds_inflight_never_kills_daemon(
    many_files: tuple[Path, BuiltImage], mounts: Mounts
) -> None:
    """A supervisor started with few fds allowed (hard limit 48): it keeps its
    in-flight events under the limit (the kernel queues the rest) instead of hitting
    EMFILE, and never kills a healthy daemon; every read is right."""
    import resource
    import subprocess

    from daemon_support import CLI

    src, img = many_files
    cache = mounts.base / "cache"
    client = DaemonClient(cache)

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))

    with open(mounts.base / "daemon.out", "wb") as out:
        daemon = subprocess.Popen([*CLI, "daemon", "--cache-dir", str(cache)],
                                  stdout=out, stderr=subprocess.STDOUT, preexec_fn=low_limit)
    try:
        wait_for(client.alive, what="daemon up")
        mp = mounts.mount(img, "mnt", cache, "--amplify", "0")
        pid = daemon_status(cache)["pid"]
        files = sorted(src.iterdir())
        bad: list[str] = []

        def reader(k: int) -> None:
            for f in files[k::64]:
                try:
                    if (mp / f.name).read_bytes() != f.read_bytes():
                        bad.append(f.name)
                except OSError as exc:
                    bad.append(f"{f.name}: {exc}")

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert bad == []
        assert daemon_status(cache)["pid"] == pid
        text = (mounts.base / "daemon.out").read_text()
        assert "restarting" not in text and "Traceback" not in text, text[-3000:]
        assert "(bound 8)" in text and "pausing reads" in text  # the bound was hit
        from daemon_support import daemon_metrics

        assert daemon_metrics(cache)["erofs_nydus_inflight_throttled_total"] > 0
        assert "daemon stopped" in mounts.umount(mp)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_lazy_umount_then_cli_umount_keeps_serving_open_file(
    tmp_path: Path, mounts: Mounts
) -> None:
    """`umount -l` and then `erofs-nydus umount MNT --cache-dir C` with a file still
    open: the superblock lives on, so the daemon keeps serving it until it is gone."""
    import subprocess

    _src, big, img = _big_file_image(tmp_path)
    mp, cache, client = _mount_one(mounts, img)
    want = big.read_bytes()
    with open(mp / "big", "rb") as held:
        assert held.read(1 << 20) == want[: 1 << 20]
        subprocess.run(["umount", "-l", str(mp)], check=True)
        out = run_cli("umount", str(mp), "--cache-dir", str(cache)).stdout
        mounts.active.clear()
        assert "still in use" in out
        assert client.alive()
        assert held.read() == want[1 << 20 :]  # not zeros
        again = run_cli("mount", str(img.bootstrap), str(mp),
                        "--blob-dir", str(img.blob_dir),
                        "--cache-dir", str(cache), check=False)
        assert again.returncode != 0 and "still in use" in again.stderr, again.stderr
        assert "Traceback" not in again.stderr
    # the superblock goes with the last open file: then the daemon stops by itself
    wait_for(lambda: not client.supervisor_running(), what="daemon stop")


def test_daemon_answers_events_that_came_without_an_fd(tmp_path: Path) -> None:
    """Out of fds, the kernel drops SCM_RIGHTS fds (MSG_CTRUNC): the daemon must still
    answer those events (EIO) and report them done, not leave the reader blocked until
    the supervisor takes it for stuck."""
    import socket

    import anyio

    from erofs_nydus.fanotify import protocol as fp
    from erofs_nydus.fanotify.handler import add_mark, init_group
    from erofs_nydus.service import channel
    from erofs_nydus.service.paths import listen_unix
    from erofs_nydus.service.worker import Worker

    target = tmp_path / "marked"
    target.write_bytes(b"x" * 8192)
    group = init_group()
    add_mark(group, str(target))
    got: list[bytes | Exception] = []

    def reader() -> None:
        try:
            got.append(target.read_bytes())
        except OSError as exc:
            got.append(exc)

    rt = threading.Thread(target=reader, daemon=True)
    rt.start()
    events: list[fp.FanotifyEvent] = []
    deadline = time.monotonic() + 10
    while not events and time.monotonic() < deadline:
        try:
            events = [e for e in fp.split_events(os.read(group, 4096))[0] if e.needs_response]
        except BlockingIOError:
            time.sleep(0.01)
    assert events
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener = listen_unix(str(tmp_path / "ctl.sock"))
    worker = Worker(theirs, group, listener, str(tmp_path / "cache"))
    wt = threading.Thread(target=lambda: anyio.run(worker.run), daemon=True)
    wt.start()
    try:
        channel.send(ours, {"op": "events",
                            "events": [channel.event_to_dict(e) for e in events]})  # no fds
        rt.join(20)
        assert not rt.is_alive(), "reader still blocked"
        assert isinstance(got[0], OSError) and got[0].errno == errno.EIO, got
        ours.settimeout(10)
        done: list[int] = []
        while len(done) < len(events):
            msg, _ = channel.recv(ours)
            assert msg is not None
            if msg["op"] == "done":
                done += msg["fds"]
        assert sorted(done) == sorted(e.fd for e in events)
        channel.send(ours, {"op": "stop"})
        wt.join(20)
        assert not wt.is_alive()
    finally:
        worker.close_channel()
        for e in events:
            os.close(e.fd)
        for s in (ours, theirs, listener):
            s.close()
        os.close(group)
