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

A *keeper*, a tiny process forked from the supervisor at start-up, holds a second
reference to the group fd (and the control listener and the cache dir's lock) so
that the group outlives a `kill -9` of the supervisor or the OOM killer (both run
with oom_score_adj -1000).  When the supervisor dies, the keeper kills its orphaned
daemon, then forks a new supervisor that inherits those fds.  The kernel matches a
response to a permission event by the integer fd number the event was read as (the
`access_list` walk in fanotify_user.c `process_access_response`), and those numbers
went with the dead supervisor: so before it reads any event the new supervisor
answers FAN_DENY(EIO) under every fd number the dead one could have had (below its
RLIMIT_NOFILE); a number with nothing pending answers ENOENT.  Readers caught in the
gap get EIO, never zeros, and no reply can reach a newer event that reuses a number.
The supervisor likewise starts a new keeper when the keeper dies.

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
import resource
import select
import selectors
import signal
import socket
import sys
import time
import traceback
from typing import Any

from erofs_nydus.fanotify import protocol as fp
from erofs_nydus.fanotify.group import init_group
from erofs_nydus.service import channel, shell
from erofs_nydus.service.paths import RunPaths
from erofs_nydus.service.procs import close_fds_except, exit_forked_child
from erofs_nydus.service.shell import Child, Shell, start_shell

__all__ = ["run_supervisor"]


log = logging.getLogger("erofs_nydus.supervisor")


def inflight_bound() -> int:
    """Events read ahead of the daemon's answers: each holds an fd here and one in the
    daemon, so stay well under the open-file limit (`channel.MAX_INFLIGHT` at most)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return channel.MAX_INFLIGHT
    return max(8, min(channel.MAX_INFLIGHT, (soft - 64) // 2))


class _Supervisor(Shell):
    """The fanotify mode's supervisor: reads the group's events and forwards them."""

    def __init__(self, paths: RunPaths, group_fd: int, listener: socket.socket,
                 resident: bool = False, lock_fd: int = -1) -> None:
        super().__init__(paths, group_fd, listener, resident, lock_fd)
        self.group_fd = group_fd
        self.keeper: _KeeperLink | None = None
        # blob id -> copy of the daemon's cache-file fd, opened before the file was
        # marked; handed to a restarted daemon (writes through it raise no events)
        self.kept: dict[str, int] = {}
        self.inflight: dict[int, dict[str, Any]] = {}  # our event fd -> event
        self.since: dict[int, float] = {}  # our event fd -> when it was read (monotonic)
        self.backlog: list[dict[str, Any]] = []  # read, not yet taken by the daemon
        self.max_inflight = inflight_bound()
        self.throttled = False
        self.throttle_count = 0
        self.throttle_logged = -1e9
        self.emfile_count = 0
        self.paused_until = 0.0
        self._reading = False
        self._reported = (-1, -1)

    def worker_main(self, channel_fd: int) -> int:
        from erofs_nydus.service import worker

        return worker.run_worker(channel_fd)

    def spawn(self) -> tuple[Child, socket.socket]:
        # import before forking: the child starts warm (the registry stack it loads in
        # the background once up, `daemon.images`)
        from erofs_nydus.service import worker  # noqa: F401

        return super().spawn()

    def hello(self, sock: socket.socket) -> None:
        kept = list(self.kept.items())
        first, rest = kept[: channel.MAX_FDS - 2], kept[channel.MAX_FDS - 2 :]
        batches = [rest[i : i + channel.MAX_FDS] for i in range(0, len(rest), channel.MAX_FDS)]
        channel.send(
            sock,
            {**self.hello_message(), "kept": [b for b, _ in first],
             "kept_messages": len(batches)},
            [self.group_fd, self.listener.fileno(), *(fd for _, fd in first)],
        )
        for batch in batches:
            channel.send(sock, {"op": "kept", "blobs": [b for b, _ in batch]},
                         [fd for _, fd in batch])

    def on_spawned(self, sock: socket.socket) -> None:
        self.tell_keeper_worker()
        self.backlog = []
        self.forward(sock, list(self.inflight.values()))
        log.info("daemon started (pid %s), %d pending events handed over", self.worker_pid,
                 len(self.inflight))

    def forward(self, sock: socket.socket, events: list[dict[str, Any]]) -> bool:
        """Queue `events` for the daemon and send what the channel takes now (never
        waiting: a slow daemon is not a dead one).  False when the daemon is gone."""
        self.backlog.extend(events)
        return self.flush(sock)

    def flush(self, sock: socket.socket) -> bool:
        try:
            while self.backlog:
                batch = self.backlog[: channel.MAX_FDS]
                batch = [e for e in batch if e["fd"] in self.inflight]  # answered meanwhile
                if batch:
                    channel.send(sock, {"op": "events", "events": batch},
                                 [e["fd"] for e in batch])
                del self.backlog[: channel.MAX_FDS]
        except BlockingIOError:
            return True
        except OSError as exc:
            log.warning("daemon unreachable (%s); events kept for its successor", exc)
            self.backlog.clear()  # the successor gets every in-flight event anyway
            return False
        return True

    def may_read(self) -> bool:
        """Read more events only while fewer than `max_inflight` are unanswered and the
        daemon has taken what we read: the kernel keeps the rest queued."""
        if len(self.inflight) >= self.max_inflight or self.backlog:
            if not self.throttled:
                self.throttled = True
                self.throttle_count += 1
                now = time.monotonic()
                if now - self.throttle_logged < 10:
                    return False
                self.throttle_logged = now
                log.info("%d events in flight (bound %d), %d not yet taken by the daemon: "
                         "pausing reads (%d times)", len(self.inflight), self.max_inflight,
                         len(self.backlog), self.throttle_count)
            return False
        self.throttled = False
        return time.monotonic() >= self.paused_until

    def read_events(self, sock: socket.socket) -> bool:
        alive = True
        while self.may_read():
            try:
                # no more events than the bound allows (an event is >= 24 bytes)
                room = self.max_inflight - len(self.inflight)
                buf = os.read(self.group_fd, min(64 * 1024, max(128, room * 24)))
            except BlockingIOError:
                return alive
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    # The kernel could not open an event's fd (and denies that event).
                    # Not the daemon's fault: wait for answers to free fds.
                    self.emfile_count += 1
                    log.error("fanotify read: %s (%d times; %d events in flight); "
                              "pausing reads", exc.strerror, self.emfile_count,
                              len(self.inflight))
                    self.paused_until = time.monotonic() + 0.2
                    return alive
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
        return alive

    def on_message(self, msg: dict[str, Any], fds: list[int]) -> bool:
        op = msg.get("op")
        if op == "keep" and len(fds) == 1:
            self._drop_kept(str(msg.get("blob")))
            self.kept[str(msg.get("blob"))] = fds[0]
            return True
        if op == "drop":
            self._drop_kept(str(msg.get("blob")))
        elif op == "done":
            for n in msg.get("fds", []):
                if self.inflight.pop(n, None) is not None:
                    self.since.pop(n, None)
                    os.close(n)
        else:
            return False
        for fd in fds:
            os.close(fd)
        return True

    def _drop_kept(self, blob_id: str) -> None:
        fd = self.kept.pop(blob_id, None)
        if fd is not None:
            os.close(fd)

    def pump_setup(self, sel: selectors.BaseSelector) -> None:
        self._reading = False
        self._reported = (-1, -1)  # a new daemon gets the counts too
        if self.keeper is not None:
            sel.register(self.keeper.sock, selectors.EVENT_READ, "keeper")

    def before_select(self, sel: selectors.BaseSelector, sock: socket.socket) -> bool:
        if self.backlog and not self.flush(sock):
            return False
        want = self.may_read()
        if want != self._reading:
            if want:
                sel.register(self.group_fd, selectors.EVENT_READ, "group")
            else:
                sel.unregister(self.group_fd)
            self._reading = want
        counters = (self.throttle_count, self.emfile_count)
        if counters != self._reported:  # into the daemon's metrics
            with contextlib.suppress(BlockingIOError):
                channel.send(sock, {"op": "counters",
                                    "inflight_throttled": self.throttle_count,
                                    "group_read_emfile": self.emfile_count})
                self._reported = counters
        return True

    def select_timeout(self, tick: float) -> float:
        return 0.02 if self.backlog or self.paused_until > time.monotonic() else tick

    def on_ready(self, key: selectors.SelectorKey, sel: selectors.BaseSelector,
                 sock: socket.socket) -> bool:
        if key.data == "keeper":
            if not self.keeper_message():
                sel.unregister(key.fileobj)
                self.restart_keeper()
                if self.keeper is not None:
                    sel.register(self.keeper.sock, selectors.EVENT_READ, "keeper")
            return True
        return self.read_events(sock)

    def oldest_pending(self) -> float | None:
        return min(self.since.values(), default=None)

    def after_stuck(self) -> None:
        self.deny_overdue()

    # -- keeper ------------------------------------------------------------------------

    def start_keeper(self) -> None:
        self.keeper = _KeeperLink.fork(self)
        self.tell_keeper_worker()

    def restart_keeper(self) -> None:
        if self.keeper is not None:
            self.keeper.close()
        log.error("keeper died; starting a new one")
        try:
            self.start_keeper()
        except Exception:
            log.exception("cannot start a keeper")
            self.keeper = None

    def keeper_message(self) -> bool:
        """Read what the keeper says (nothing yet); False when it is gone."""
        assert self.keeper is not None
        try:
            msg, fds = channel.recv(self.keeper.sock)
        except BlockingIOError:
            return True
        except OSError:
            return False
        for fd in fds:
            os.close(fd)
        return msg is not None

    def tell_keeper_worker(self) -> None:
        """Hand the keeper a pidfd of the current daemon: if we die, it kills the
        daemon before a successor answers our events (no late answer may reach a
        newer event under a reused fd number)."""
        if self.keeper is None or self.worker_pid is None:
            return
        try:
            pidfd = os.pidfd_open(self.worker_pid)
        except OSError:
            return
        try:
            channel.send(self.keeper.sock, {"op": "worker"}, [pidfd])
        except OSError as exc:
            log.warning("cannot reach the keeper: %s", exc)
        finally:
            os.close(pidfd)

    def stop_keeper(self) -> None:
        if self.keeper is None:
            return
        with contextlib.suppress(OSError):
            self.keeper.sock.setblocking(True)
            channel.send(self.keeper.sock, {"op": "stop"})
            self.keeper.sock.settimeout(10.0)
            while channel.recv(self.keeper.sock)[0] is not None:
                pass  # until it has closed everything (EOF)
        self.keeper.close()
        self.keeper = None

    def sweep(self, limit: int) -> None:
        """Answer EIO under every fd number below `limit`: the events a dead
        supervisor had read and not answered (see the module docstring)."""
        answered = 0
        for n in range(limit):
            try:
                os.write(self.group_fd, fp.deny(n, errno.EIO))
                answered += 1
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("sweep: answer for fd %d: %s", n, exc)
        log.warning("answered %d reads the dead supervisor left pending with EIO", answered)

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

    def release(self) -> None:
        self.close()
        self.stop_keeper()

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
    refused: "N mounts live; umount first").  A `resident` daemon keeps running with
    no mounts (no idle exit, `umount` of the last mount leaves it up), as a node
    service would."""

    def make(paths: RunPaths, group: int, listener: socket.socket, lock_fd: int) -> Shell:
        sup = _Supervisor(paths, group, listener, resident, lock_fd)
        sup.start_keeper()
        return sup

    return start_shell(cache_dir, lambda _paths: init_group(), make)


class _KeeperLink:
    """The supervisor's end of the keeper: a SOCK_SEQPACKET pair (hang-up = death)."""

    def __init__(self, sock: socket.socket, pid: int, child: bool) -> None:
        self.sock = sock
        self.pid = pid
        self.child = child  # ours to reap

    @classmethod
    def fork(cls, sup: _Supervisor) -> _KeeperLink:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sup_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ours.close()
                close_fds_except(
                    {sup.group_fd, sup.listener.fileno(), sup.lock_fd, theirs.fileno()})
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_IGN)
                code = _Keeper(sup, theirs, sup_pid).run()
            except BaseException:
                traceback.print_exc()
            finally:
                exit_forked_child(code)
        theirs.close()
        log.info("keeper started (pid %d)", pid)
        return cls(ours, pid, child=True)

    def close(self) -> None:
        self.sock.close()
        if self.child:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


class _Keeper:
    """Second holder of the fanotify group: restarts a dead supervisor."""

    def __init__(self, sup: _Supervisor, sock: socket.socket, sup_pid: int) -> None:
        self.paths = sup.paths
        self.group_fd = sup.group_fd
        self.listener = sup.listener
        self.lock_fd = sup.lock_fd
        self.resident = sup.resident
        self.sock = sock
        self.sup_pidfd = os.pidfd_open(sup_pid)
        self.worker_pidfd: int | None = None
        if os.getppid() != sup_pid:  # it died while we were forked
            self.sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> int:
        recent: list[float] = []
        while True:
            try:
                readable, _, _ = select.select([self.sock.fileno(), self.sup_pidfd], [], [])
                if self.sock.fileno() in readable:
                    try:
                        msg, fds = channel.recv(self.sock)
                    except OSError:
                        msg, fds = None, []
                    if msg is not None:
                        if msg.get("op") == "stop":
                            for fd in fds:
                                os.close(fd)
                            return self.stop()
                        if msg.get("op") == "worker" and len(fds) == 1:
                            if self.worker_pidfd is not None:
                                os.close(self.worker_pidfd)
                            self.worker_pidfd = fds[0]
                        else:
                            for fd in fds:
                                os.close(fd)
                        continue
                elif self.sup_pidfd not in readable:
                    continue
                now = time.monotonic()
                recent = [t for t in recent if now - t < 10] + [now]
                if len(recent) > 5:
                    time.sleep(1.0)
                self.replace_supervisor()
            except Exception:
                traceback.print_exc()
                time.sleep(0.5)

    def stop(self) -> int:
        """The supervisor stops cleanly: let go of the lock and the group first."""
        os.close(self.lock_fd)
        os.close(self.group_fd)
        self.listener.close()
        self.sock.close()
        return 0

    def replace_supervisor(self) -> None:
        _kill_and_wait(self.sup_pidfd)
        if self.worker_pidfd is not None:
            _kill_and_wait(self.worker_pidfd)  # its answers would hit reused fd numbers
            os.close(self.worker_pidfd)
            self.worker_pidfd = None
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        print(f"keeper[{os.getpid()}]: supervisor died; starting a new one",
              file=sys.stderr, flush=True)
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        keeper_pid = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                ours.close()
                self.sock.close()
                os.close(self.sup_pidfd)
                code = _adopt(self, theirs, keeper_pid, limit)
            except BaseException:
                traceback.print_exc()
            finally:
                exit_forked_child(code)
        theirs.close()
        self.sock.close()
        os.close(self.sup_pidfd)
        self.sock = ours
        self.sup_pidfd = os.pidfd_open(pid)


def _adopt(keeper: _Keeper, sock: socket.socket, keeper_pid: int, limit: int) -> int:
    """A new supervisor, forked by the keeper after the old one died."""
    for handler in logging.getLogger().handlers:  # our pid, not the dead one's
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s supervisor[{os.getpid()}] %(levelname)s %(message)s"))
    os.ftruncate(keeper.lock_fd, 0)
    os.pwrite(keeper.lock_fd, f"{os.getpid()}\n".encode(), 0)
    sup = _Supervisor(keeper.paths, keeper.group_fd, keeper.listener, keeper.resident,
                      keeper.lock_fd)
    sup.generation = 1  # the daemon restores state and keeps all mounts
    sup.keeper = _KeeperLink(sock, keeper_pid, child=False)
    log.error("supervisor restarted by the keeper after the previous one died")
    sup.sweep(limit)  # before reading any event: see the module docstring
    return sup.serve()


def _kill_and_wait(pidfd: int, timeout: float = 30.0) -> None:
    with contextlib.suppress(ProcessLookupError, OSError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    select.select([pidfd], [], [], timeout)  # readable once it has exited


def main(argv: list[str] | None = None) -> None:
    """`python -c 'from erofs_nydus.service.supervisor import main; main()' CACHE_DIR
    [--resident]`: what `mount` spawns (the `daemon` command without click's start-up)."""
    import argparse

    ap = argparse.ArgumentParser(prog="erofs-nydus daemon")
    ap.add_argument("cache_dir")
    ap.add_argument("--resident", action="store_true")
    args = ap.parse_args(argv)
    setup_logging()
    sys.exit(run_supervisor(args.cache_dir, resident=args.resident))


def setup_logging() -> None:
    shell.setup_logging("supervisor")
