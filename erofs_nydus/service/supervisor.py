"""Supervisor: the small, long-lived process that makes the daemon crash-safe.

If the fanotify group fd is closed while files are marked, pending and later reads
are no longer intercepted and holes read as zeros.  So the group fd lives here, not
in the daemon, and so does the read side of the event queue:

* the supervisor reads events from the group fd and forwards each, with its fd
  (SCM_RIGHTS), to the daemon; it keeps the event fd open until the daemon reports
  the event answered ("done"), so the number the kernel knows the event by is never
  reused while the event may still be pending;
* when the daemon dies (even `kill -9`), the supervisor starts a new one, hands it
  the group fd and the control listener, and re-sends every unanswered event; the
  new daemon restores its state from the cache dir and answers them.  An event the
  old daemon had already answered gets a second answer, which the kernel rejects
  harmlessly (ENOENT) - a reader never gets two, and never none.

The supervisor exits when the daemon asks it to (no mounts left).  SIGTERM and
SIGINT stop it only while no image is mounted; with mounts live it refuses, logs
"N mounts live; umount first" and keeps serving (stopping would close the group and
let the mounts' holes read as zeros).  SIGHUP is ignored.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from typing import Any

from erofs_nydus.fanotify import protocol as fp
from erofs_nydus.fanotify.handler import init_group
from erofs_nydus.service import channel
from erofs_nydus.service.paths import (
    RunPaths,
    listen_unix,
    take_supervisor_lock,
    unlink_own_socket,
)

__all__ = ["run_supervisor"]

log = logging.getLogger("erofs_nydus.supervisor")


def read_deadline() -> float:
    """Seconds an event may wait for the daemon before the supervisor answers EIO
    itself and replaces the daemon as stuck (`EROFS_NYDUS_READ_DEADLINE`, default 60)."""
    try:
        return max(0.5, float(os.environ.get("EROFS_NYDUS_READ_DEADLINE", "60")))
    except ValueError:
        return 60.0


class _Child:
    """The daemon process, forked from the supervisor (no new interpreter to start:
    a restart after a crash takes milliseconds)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None

    @classmethod
    def fork(cls, channel_fd: int) -> _Child:
        # import before forking: the child starts warm (remote_mount: `mount REF`)
        from erofs_nydus.registry import resolve as remote_mount  # noqa: F401
        from erofs_nydus.service import worker

        pid = os.fork()
        if pid == 0:  # child: keep stdio and the channel only
            code = 1
            try:
                lo = 3
                for keep in sorted({channel_fd}):
                    os.closerange(lo, keep)
                    lo = keep + 1
                os.closerange(lo, 1 << 20)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                code = worker.run_worker(channel_fd)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        return cls(pid)

    def poll(self) -> int | None:
        if self.status is None:
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(st)
        return self.status

    def wait(self, timeout: float | None = None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        return self.status

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


class _Supervisor:
    def __init__(self, paths: RunPaths, group_fd: int, listener: socket.socket,
                 resident: bool = False) -> None:
        self.paths = paths
        self.resident = resident
        self.stop_requested = False  # SIGTERM/SIGINT
        # blob id -> copy of the daemon's cache-file fd, opened before the file was
        # marked; handed to a restarted daemon (writes through it raise no events)
        self.kept: dict[str, int] = {}
        self.group_fd = group_fd
        self.listener = listener
        self.inflight: dict[int, dict[str, Any]] = {}  # our event fd -> event
        self.since: dict[int, float] = {}  # our event fd -> when it was read (monotonic)
        self.deadline = read_deadline()
        self.ping_sent: float | None = None  # when an unanswered liveness ping went out
        self.last_ping = 0.0
        self.stopping = False
        self.generation = 0

    def spawn(self) -> tuple[_Child, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = _Child.fork(theirs.fileno())
        finally:
            theirs.close()
        try:
            kept = list(self.kept.items())
            first, rest = kept[: channel.MAX_FDS - 2], kept[channel.MAX_FDS - 2 :]
            batches = [rest[i : i + channel.MAX_FDS] for i in range(0, len(rest),
                                                                    channel.MAX_FDS)]
            channel.send(
                ours,
                {"op": "hello", "cache_dir": self.paths.cache_dir, "restart": self.generation > 0,
                 "resident": self.resident, "kept": [b for b, _ in first],
                 "kept_messages": len(batches)},
                [self.group_fd, self.listener.fileno(), *(fd for _, fd in first)],
            )
            for batch in batches:
                channel.send(ours, {"op": "kept", "blobs": [b for b, _ in batch]},
                             [fd for _, fd in batch])
        except OSError as exc:  # it died at once; pump() sees EOF and we try again
            log.error("daemon did not take the hello: %s", exc)
        self.forward(ours, list(self.inflight.values()))
        self.generation += 1
        log.info(
            "daemon started (pid %d), %d pending events handed over", proc.pid, len(self.inflight)
        )
        return proc, ours

    def forward(self, sock: socket.socket, events: list[dict[str, Any]]) -> bool:
        try:
            for i in range(0, len(events), channel.MAX_FDS):
                batch = events[i : i + channel.MAX_FDS]
                channel.send(sock, {"op": "events", "events": batch}, [e["fd"] for e in batch])
        except OSError as exc:
            log.warning("daemon unreachable (%s); events kept for its successor", exc)
            return False
        return True

    def read_events(self, sock: socket.socket) -> bool:
        alive = True
        while True:
            try:
                buf = os.read(self.group_fd, 64 * 1024)
            except BlockingIOError:
                return alive
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                raise
            events, err = fp.split_events(buf)
            if err is not None:
                log.error("fanotify: %s", err)
            fresh = []
            for ev in events:
                if not ev.needs_response:
                    if ev.is_overflow:
                        log.error("fanotify queue overflow")
                    continue
                d = channel.event_to_dict(ev)
                self.inflight[ev.fd] = d
                self.since[ev.fd] = time.monotonic()
                fresh.append(d)
            if fresh and alive:
                alive = self.forward(sock, fresh)

    def handle_message(self, sock: socket.socket) -> bool:
        """Process daemon messages; False at EOF."""
        while True:
            try:
                msg, fds = channel.recv(sock)
            except BlockingIOError:
                return True
            except (ConnectionResetError, BrokenPipeError):
                return False
            except Exception as exc:
                log.error("bad message from daemon: %s", exc)
                return True
            if msg is not None and msg.get("op") == "keep" and len(fds) == 1:
                self._drop_kept(str(msg.get("blob")))
                self.kept[str(msg.get("blob"))] = fds[0]
                continue
            for fd in fds:  # no other message carries fds; do not leak any
                os.close(fd)
            if msg is None:
                return False
            op = msg.get("op")
            if op == "drop":
                self._drop_kept(str(msg.get("blob")))
            elif op == "done":
                for n in msg.get("fds", []):
                    if self.inflight.pop(n, None) is not None:
                        self.since.pop(n, None)
                        os.close(n)
            elif op == "pong":
                self.ping_sent = None
            elif op == "shutdown":
                self.stopping = True
            elif op == "stop_refused":
                log.warning("not stopping: %s mounts live; umount first", msg.get("mounts"))
            else:
                log.error("unknown daemon message %r", op)

    def _drop_kept(self, blob_id: str) -> None:
        fd = self.kept.pop(blob_id, None)
        if fd is not None:
            os.close(fd)

    def pump(self, proc: _Child, sock: socket.socket) -> None:
        sock.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(self.group_fd, selectors.EVENT_READ, "group")
        sel.register(sock, selectors.EVENT_READ, "daemon")
        alive = True
        self.ping_sent = None
        self.last_ping = time.monotonic()
        tick = min(1.0, self.deadline / 4)
        try:
            while alive:
                if self.stop_requested and not self.stopping:
                    # The daemon decides: it stops only with no mounts live ("shutdown"
                    # comes back), else it answers "stop_refused" and keeps serving.
                    log.info("stop requested by signal; asking the daemon")
                    self.stop_requested = False
                    with contextlib.suppress(OSError):
                        channel.send(sock, {"op": "stop"})
                for key, _ in sel.select(timeout=tick):
                    if key.data == "group":
                        sock.setblocking(True)
                        sock.settimeout(5.0)
                        try:
                            alive = self.read_events(sock) and alive
                        finally:
                            sock.setblocking(False)
                    else:
                        alive = self.handle_message(sock) and alive
                if proc.poll() is not None:
                    # drain what it said before dying
                    self.handle_message(sock)
                    alive = False
                elif alive and self.stuck(sock):
                    proc.kill()
                    proc.wait()
                    self.handle_message(sock)  # answers it sent before it stopped
                    self.deny_overdue()
                    alive = False
        finally:
            sel.close()

    def stuck(self, sock: socket.socket) -> bool:
        """True when the daemon left an event unanswered past the read deadline, or
        did not answer a liveness ping within it (its event loop is blocked)."""
        now = time.monotonic()
        oldest = min(self.since.values(), default=now)
        if now - oldest > self.deadline:
            log.error("daemon stuck: an event has waited %.1f s (deadline %.0f s); "
                      "answering overdue reads with EIO and replacing the daemon",
                      now - oldest, self.deadline)
            return True
        if self.ping_sent is not None:
            if now - self.ping_sent > self.deadline:
                log.error("daemon stuck: no answer to a ping for %.1f s; replacing it",
                          now - self.ping_sent)
                return True
        elif now - self.last_ping > self.deadline / 4:
            self.last_ping = now
            try:
                channel.send(sock, {"op": "ping"})
                self.ping_sent = now
            except BlockingIOError:
                pass
            except OSError:
                return False  # gone: pump sees it exit
        return False

    def deny_overdue(self) -> None:
        """Answer EIO to every event past the read deadline (the daemon that had them
        is dead, so nothing else answers under the same number), and forget them."""
        now = time.monotonic()
        for n, t in list(self.since.items()):
            if now - t > self.deadline:
                with contextlib.suppress(OSError):
                    os.write(self.group_fd, fp.deny(n, errno.EIO))
                self.inflight.pop(n, None)
                del self.since[n]
                os.close(n)

    def run(self) -> None:
        recent: list[float] = []
        while True:
            try:
                proc, sock = self.spawn()
            except Exception:
                log.exception("cannot start the daemon; retrying")
                time.sleep(1.0)
                continue
            try:
                self.pump(proc, sock)
            except Exception:
                # Never let the supervisor die: it holds the group fd.
                log.exception("supervisor loop failed; restarting the daemon")
                proc.kill()
            finally:
                sock.close()
            code = proc.wait(timeout=10)
            if code is None:
                proc.kill()
                code = proc.wait()
            if self.stopping:
                log.info("daemon stopped (exit %s); supervisor exiting", code)
                return
            log.error("daemon exited unexpectedly (status %s); restarting", code)
            now = time.monotonic()
            recent = [t for t in recent if now - t < 10] + [now]
            if len(recent) > 5:
                time.sleep(1.0)

    def close(self) -> None:
        for fd in self.kept.values():
            os.close(fd)
        self.kept.clear()
        # No mounts are left when we get here; answer anything odd that is still pending.
        for n in list(self.inflight):
            with contextlib.suppress(OSError):
                os.write(self.group_fd, fp.deny(n, errno.EIO))
            os.close(n)
        self.inflight.clear()
        self.since.clear()


def run_supervisor(cache_dir: str, *, resident: bool = False) -> int:
    """Run the supervisor for `cache_dir` in the foreground until the daemon stops it,
    or SIGTERM/SIGINT arrives while no image is mounted (with mounts live they are
    refused: "N mounts live; umount first").  A `resident` daemon keeps running with no mounts (no
    idle exit, `umount` of the last mount leaves it up), as a node service would."""
    paths = RunPaths.of(cache_dir)
    lock_fd = take_supervisor_lock(paths)
    if lock_fd is None:
        log.info("a supervisor already serves %s", paths.cache_dir)
        return 0
    group = init_group()
    listener = listen_unix(paths.socket)
    sup = _Supervisor(paths, group, listener, resident)

    def _on_signal(signum: int, frame: object) -> None:
        sup.stop_requested = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    try:
        sup.run()
    finally:
        sup.close()
        unlink_own_socket(paths.socket)
        listener.close()
        os.close(group)
        os.ftruncate(lock_fd, 0)
        os.close(lock_fd)
    return 0


def main(argv: list[str] | None = None) -> None:
    """`python -c 'from erofs_nydus.service.supervisor import main; main()' CACHE_DIR
    [--resident]`: what `mount` spawns (the `daemon` command without click's start-up)."""
    import argparse

    from erofs_nydus import as_program

    as_program()
    ap = argparse.ArgumentParser(prog="erofs-nydus daemon")
    ap.add_argument("cache_dir")
    ap.add_argument("--resident", action="store_true")
    args = ap.parse_args(argv)
    setup_logging()
    sys.exit(run_supervisor(args.cache_dir, resident=args.resident))


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("EROFS_NYDUS_LOG", "INFO"),
        format=f"%(asctime)s supervisor[{os.getpid()}] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
