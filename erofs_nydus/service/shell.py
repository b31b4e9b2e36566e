"""The process shell both request sources run in (fanotify and fscache mode).

One cache dir is served by a small, long-lived **supervisor** and a forked **worker**:

* the supervisor takes the cache dir's lock, sets up logging, opens the request
  source (the fanotify group, or ``/dev/cachefiles`` bound on-demand) and the control
  socket's listener, asks for oom_score_adj -1000 and a raised open-file limit, then
  forks the worker and hands it those fds over a SOCK_SEQPACKET channel
  (:mod:`~erofs_nydus.service.channel`: ``hello``);
* it restarts a worker that dies (backing off after five deaths in ten seconds); a
  worker that reports ``shutdown`` (no mounts left, idle exit) ends it;
* SIGTERM and SIGINT become a ``stop`` to the worker, which refuses while mounts are
  live ("N mounts live; umount first") - closing the source under a mount would let
  reads fail or, in fanotify mode, read zeros; SIGHUP is ignored;
* a worker that leaves a ping unanswered for the read deadline
  (:func:`~erofs_nydus.service.procs.read_deadline`, raised by the worker's ``deadline``
  message for slow registries), or a request pending that long, is killed and replaced.

The worker restores its state from the cache dir and serves requests; its control
socket (JSON lines, :class:`ControlOps`) has one set of operations in both modes:
``ping``, ``resolve`` (an image reference: manifest and bootstrap fetched into the
cache dir), ``register``, ``detach``, ``status`` and ``shutdown``, plus the mode's own.

What differs per mode lives with the mode: :mod:`~erofs_nydus.service.supervisor`
(the supervisor reads fanotify events and forwards them, a keeper holds the group fd
across a supervisor's death) and :mod:`~erofs_nydus.service.fscache_daemon` (the
worker reads ``/dev/cachefiles`` itself; a restarted one sends ``restore``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from erofs_nydus.daemon.images import (
    ImageTable,
    prefetch_settings,
    request_number,
    requested_fsid,
    validate_bootstrap,
)
from erofs_nydus.errors import DaemonError, DaemonStopping
from erofs_nydus.rafs.image import RafsImage
from erofs_nydus.rafs.reader import LoadedBootstrap
from erofs_nydus.service import channel, logs
from erofs_nydus.service.paths import (
    RunPaths,
    listen_unix,
    take_supervisor_lock,
    unlink_own_socket,
)
from erofs_nydus.service.procs import (
    close_fds_except,
    die_with_parent,
    exit_forked_child,
    raise_nofile,
    read_deadline,
    set_oom_score_adj,
)

__all__ = ["MAX_REQUEST", "Child", "ControlOps", "Hello", "Shell", "control_reply",
           "receive_hello", "setup_logging", "start_shell", "too_long"]

log = logging.getLogger("erofs_nydus.supervisor")
wlog = logging.getLogger("erofs_nydus.daemon")

MAX_REQUEST = 1 << 20  # bytes in one control line


def setup_logging(role: str, log_path: str | None = None) -> None:
    """Log lines as ``<time> <role>[<pid>] <level> <message>``, into `log_path` if given."""
    logs.install(f"%(asctime)s {role}[{os.getpid()}] %(levelname)s %(message)s", log_path)


# -- supervisor side ---------------------------------------------------------------------


class Child:
    """The worker process, forked from the supervisor (no new interpreter to start:
    a restart after a crash takes milliseconds)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.status: int | None = None

    @classmethod
    def fork(cls, channel_fd: int, main: Callable[[int], int], *, keep: set[int],
             with_parent: bool) -> Child:
        """Fork a worker running ``main(channel_fd)`` with stdio, the channel and
        `keep` open; `with_parent`: it is killed when the supervisor dies."""
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                close_fds_except({channel_fd, *keep})
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                if with_parent:
                    die_with_parent(parent)
                set_oom_score_adj(0)  # the worker holds the memory; it may be killed
                code = main(channel_fd)
            except BaseException:
                traceback.print_exc()
            finally:
                exit_forked_child(code)
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


class Shell:
    """The supervisor of one cache dir, whatever the request source.

    A mode subclasses it and fills in the hooks (``source_fd``, ``worker_main`` and the
    ``on_*`` methods); the shell does the rest: the worker's fork, hello and restarts,
    the channel, signals, liveness pings and the read deadline, and the clean-up."""

    #: role in the log lines, e.g. "supervisor"
    role = "supervisor"
    #: the worker dies with the supervisor (fanotify: the keeper restarts both);
    #: else it keeps serving the source it holds
    worker_dies_with_supervisor = True

    def __init__(self, paths: RunPaths, source_fd: int, listener: socket.socket,
                 resident: bool = False, lock_fd: int = -1) -> None:
        self.paths = paths
        self.source_fd = source_fd
        self.listener = listener
        self.resident = resident
        self.lock_fd = lock_fd
        self.worker_pid: int | None = None
        self.stop_requested = False  # SIGTERM/SIGINT
        self.stopping = False  # the worker said "shutdown"
        self.deadline = read_deadline()
        self.ping_sent: float | None = None  # when an unanswered liveness ping went out
        self.last_ping = 0.0
        self.generation = 0

    # -- hooks -------------------------------------------------------------------------

    def worker_main(self, channel_fd: int) -> int:
        """What the forked worker runs."""
        raise NotImplementedError

    def worker_keeps(self) -> set[int]:
        """Fds the forked worker inherits, besides the channel (the rest travel in the hello)."""
        return set()

    def hello(self, sock: socket.socket) -> None:
        """Send the worker its hello: the source and the listener, and what the mode adds."""
        channel.send(sock, self.hello_message(), [self.source_fd, self.listener.fileno()])

    def hello_message(self) -> dict[str, Any]:
        return {"op": "hello", "cache_dir": self.paths.cache_dir,
                "restart": self.generation > 0, "resident": self.resident}

    def on_spawned(self, sock: socket.socket) -> None:
        """A new worker took its hello."""

    def on_message(self, msg: dict[str, Any], fds: list[int]) -> bool:
        """A worker message the shell does not know; True if handled (fds then belong
        to the hook), False to log it as unknown."""
        return False

    def pump_setup(self, sel: selectors.BaseSelector) -> None:
        """Register the mode's own fds (their key.data goes to `on_ready`)."""

    def before_select(self, sel: selectors.BaseSelector, sock: socket.socket) -> bool:
        """Each turn of the loop; False when the worker is unreachable."""
        return True

    def select_timeout(self, tick: float) -> float:
        return tick

    def on_ready(self, key: selectors.SelectorKey, sel: selectors.BaseSelector,
                 sock: socket.socket) -> bool:
        """One of the mode's fds is readable; False when the worker is unreachable."""
        return True

    def oldest_pending(self) -> float | None:
        """monotonic() of the oldest request the worker holds unanswered, if known here."""
        return None

    def after_stuck(self) -> None:
        """A stuck worker was killed (answer what it held, if the supervisor can)."""

    def release(self) -> None:
        """The shell stops: let go of what the mode holds (before the source is closed)."""

    # -- the loop ----------------------------------------------------------------------

    def spawn(self) -> tuple[Child, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = Child.fork(theirs.fileno(), self.worker_main, keep=self.worker_keeps(),
                              with_parent=self.worker_dies_with_supervisor)
        finally:
            theirs.close()
        try:
            self.hello(ours)
        except OSError as exc:  # it died at once; pump() sees EOF and we try again
            log.error("daemon did not take the hello: %s", exc)
        self.worker_pid = proc.pid
        ours.setblocking(False)
        self.on_spawned(ours)
        self.generation += 1
        return proc, ours

    def handle_message(self, sock: socket.socket) -> bool:
        """Process worker messages; False at EOF."""
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
            if msg is not None and self.on_message(msg, fds):
                continue
            for fd in fds:  # no other message carries fds; do not leak any
                os.close(fd)
            if msg is None:
                return False
            op = msg.get("op")
            if op == "pong":
                self.ping_sent = None
            elif op == "deadline":  # fills may take this long (slow registry reads)
                self.deadline = max(read_deadline(), float(msg.get("seconds", 0)))
            elif op == "shutdown":
                self.stopping = True
            elif op == "stop_refused":
                log.warning("not stopping: %s mounts live; umount first", msg.get("mounts"))
            else:
                log.error("unknown daemon message %r", op)

    def stuck(self, sock: socket.socket) -> bool:
        """True when the worker left a request unanswered past the read deadline, or
        did not answer a liveness ping within it (its loop is blocked or stopped)."""
        now = time.monotonic()
        oldest = self.oldest_pending()
        if oldest is not None and now - oldest > self.deadline:
            log.error("daemon stuck: a request has waited %.1f s (deadline %.0f s); "
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

    def pump(self, proc: Child, sock: socket.socket) -> None:
        sock.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ, "daemon")
        self.pump_setup(sel)
        alive = True
        self.ping_sent = None
        self.last_ping = time.monotonic()
        tick = min(1.0, self.deadline / 4)
        try:
            while alive:
                if self.stop_requested and not self.stopping:
                    # The worker decides: it stops only with no mounts live ("shutdown"
                    # comes back), else it answers "stop_refused" and keeps serving.
                    log.info("stop requested by signal; asking the daemon")
                    self.stop_requested = False
                    with contextlib.suppress(OSError):
                        channel.send(sock, {"op": "stop"})
                if not self.before_select(sel, sock):
                    break
                for key, _ in sel.select(timeout=self.select_timeout(tick)):
                    if key.data == "daemon":
                        alive = self.handle_message(sock) and alive
                    else:
                        alive = self.on_ready(key, sel, sock) and alive
                if proc.poll() is not None:
                    self.handle_message(sock)  # what it said before dying
                    alive = False
                elif alive and self.stuck(sock):
                    proc.kill()
                    proc.wait()
                    self.handle_message(sock)  # answers it sent before it stopped
                    self.after_stuck()
                    alive = False
        finally:
            sel.close()

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
                # Never let the supervisor die: it holds the request source.
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

    def serve(self) -> int:
        """Run until the worker stops for good; then release everything."""
        def _on_signal(signum: int, frame: object) -> None:
            self.stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _on_signal)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            self.run()
        finally:
            unlink_own_socket(self.paths.socket)
            self.release()
            self.listener.close()
            os.close(self.source_fd)
            os.ftruncate(self.lock_fd, 0)
            os.close(self.lock_fd)
        return 0


def start_shell(cache_dir: str, open_source: Callable[[RunPaths], int | None],
                make: Callable[[RunPaths, int, socket.socket, int], Shell]) -> int:
    """Lock `cache_dir`, open the source (None: it failed and said why; exit 3) and the
    control listener, set the process limits, and serve.  0 when a supervisor already
    serves the cache dir."""
    from erofs_nydus import as_program

    as_program()  # this process is the daemon now, whichever mode: no trio, no httpx CLI
    paths = RunPaths.of(cache_dir)
    lock_fd = take_supervisor_lock(paths)
    if lock_fd is None:
        log.info("a supervisor already serves %s", paths.cache_dir)
        return 0
    logs.set_log_file(paths.log)  # capped, if it is our stderr
    try:
        source = open_source(paths)
    except BaseException:
        os.ftruncate(lock_fd, 0)
        os.close(lock_fd)
        raise
    if source is None:
        os.ftruncate(lock_fd, 0)
        os.close(lock_fd)
        return 3
    listener = listen_unix(paths.socket)
    raise_nofile()
    set_oom_score_adj(-1000)  # the OOM killer must not take the source's holder
    return make(paths, source, listener, lock_fd).serve()


# -- worker side -------------------------------------------------------------------------


class Hello:
    """What a worker gets from its supervisor at start."""

    def __init__(self, msg: dict[str, Any], source_fd: int, listener: socket.socket,
                 extra_fds: list[int]) -> None:
        self.msg = msg
        self.source_fd = source_fd
        self.listener = listener
        self.extra_fds = extra_fds
        self.cache_dir = str(msg["cache_dir"])
        self.restart = bool(msg.get("restart"))
        self.resident = bool(msg.get("resident"))


def receive_hello(chan: socket.socket) -> Hello | None:
    """The hello (blocking); None, logged, when it is not one."""
    chan.setblocking(True)
    msg, fds = channel.recv(chan)
    if msg is None or msg.get("op") != "hello" or len(fds) < 2 or "cache_dir" not in msg:
        wlog.error("bad hello from supervisor: %r", msg)
        for fd in fds:
            os.close(fd)
        return None
    logs.set_log_file(RunPaths.of(str(msg["cache_dir"])).log)
    return Hello(msg, fds[0], socket.socket(fileno=fds[1]), fds[2:])


def too_long() -> dict[str, Any]:
    """The answer to a control line over `MAX_REQUEST` bytes (logged and counted); the
    transport sends it and drops the connection without reading the rest."""
    logs.limit_hit("control_request_bytes", wlog,
                   "control request over %d bytes refused", MAX_REQUEST)
    return {"ok": False, "error": f"request line longer than {MAX_REQUEST} bytes",
            "type": "ProtocolError"}


def control_reply(line: bytes, dispatch: Callable[[dict[str, Any]], dict[str, Any]]
                  ) -> tuple[dict[str, Any], bool]:
    """The answer to one control line (at most `MAX_REQUEST` bytes: the transport
    reads no more, see `too_long`), and whether it was an accepted ``shutdown``."""
    try:
        req = json.loads(line)
        if not isinstance(req, dict):
            raise DaemonError("request must be a JSON object")
        resp: dict[str, Any] = {"ok": True, **dispatch(req)}
    except Exception as exc:
        wlog.info("request failed: %s", exc)
        return {"ok": False, "error": str(exc), "type": type(exc).__name__}, False
    return resp, req.get("op") == "shutdown"


class ControlOps:
    """The control operations of a worker, the same in both modes.  A mode sets
    `mode`, `table`, `plane`, `resident`, `started` and `tell` (a message to the
    supervisor) and overrides the ``*_hook`` methods for what it adds."""

    mode = ""
    table: ImageTable
    plane: Any
    resident = False
    started = 0.0
    _reported_deadline = 0.0
    # Held by a registration and by every decision to stop for want of images (idle
    # exit, last lingering image gone, `shutdown`, SIGTERM): a mount is never registered
    # with a worker that has just decided to stop - it would lose its request source
    # under the mount.  Once `stopping`, registrations are refused (DaemonStopping) and
    # the client starts the next daemon.  A mode's __init__ may share it with its own
    # locks (RLock: re-entered by hooks).
    gate: threading.RLock
    stopping = False
    # the bootstrap the last `resolve` read and fully validated, for the `register` of
    # the same `mount REF` (taken once; used only while the file is unchanged)
    _resolved: LoadedBootstrap | None = None

    def tell(self, msg: dict[str, Any], fds: list[int] | None = None) -> None:
        raise NotImplementedError

    # -- hooks -------------------------------------------------------------------------

    def register_check(self, req: dict[str, Any], mountpoint: str) -> None:
        """Refuse a registration (raise DaemonError) before anything happens."""

    def registered_hook(self, info: dict[str, Any], req: dict[str, Any],
                        mountpoint: str) -> dict[str, Any]:
        """The answer to a registration (`info` from ImageTable.register)."""
        return info

    def detach_hook(self, mountpoint: str) -> dict[str, Any]:
        self.plane.detaching(mountpoint)
        remaining = self.table.detach(mountpoint)
        self.plane.detached()
        return {"remaining": remaining}

    def settle(self) -> None:
        """Before `shutdown` counts the mounts: let detaches the kernel is finishing
        complete (fscache: CLOSEs of an image just unmounted).  Default: nothing."""

    def status_hook(self, st: dict[str, Any]) -> None:
        """Add the mode's counters to a status answer."""

    def mode_op(self, op: Any, req: dict[str, Any]) -> dict[str, Any]:
        """An operation only this mode has."""
        raise DaemonError(f"unknown request {op!r}")

    # -- the operations ----------------------------------------------------------------

    def dispatch(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        if op == "ping":
            return {"pid": os.getpid(), "mounts": self.table.mountpoints(),
                    "resident": self.resident, "mode": self.mode}
        if op == "register":
            loaded, self._resolved = self._resolved, None
            return self.register(req, loaded)
        if op == "register_ref":
            return self.register_ref(req)
        if op == "resolve":
            return self.resolve(req)
        if op == "detach":
            resp = self.detach_hook(os.path.abspath(str(req["mountpoint"])))
            return {**resp, "resident": self.resident}
        if op == "status":
            st = self.table.status()
            st["pid"] = os.getpid()
            st["uptime"] = time.time() - self.started
            self.status_hook(st)
            return st
        if op == "verify":  # `cache verify`: re-digest cached chunks (issue 11 (f))
            return self.table.verify_cached()
        if op == "shutdown":
            self.settle()
            with self.gate:
                mounts = self.table.mountpoints()
                if mounts and not req.get("force"):
                    raise DaemonError(
                        f"still serving {len(mounts)} mount(s): {', '.join(mounts)}")
                if self.resident and not req.get("resident"):
                    raise DaemonError("a resident daemon keeps running without mounts; stop "
                                      "it with SIGTERM to its supervisor")
                self.stopping = True  # the transport stops once the answer is sent
            return {}
        return self.mode_op(op, req)

    def on_stop(self) -> bool:
        """The supervisor got SIGTERM/SIGINT: True (and "shutdown" told) when no mount
        is live, else refused ("stop_refused") - stopping would close the source
        under the mounts."""
        with self.gate:
            mounts = self.table.mountpoints()
            if not mounts:
                self.stopping = True
        if mounts:
            wlog.warning("stop refused: %d mounts live; umount first (%s)",
                         len(mounts), ", ".join(mounts))
            self.tell({"op": "stop_refused", "mounts": len(mounts)})
            return False
        self.tell({"op": "shutdown"})
        return True

    def report_deadline(self) -> None:
        """Tell the supervisor how long a fill may legitimately take: twice the
        longest registry read deadline of the images served (plus slack), so that a
        slow registry is not taken for a stuck daemon."""
        worst = max((float(e.backend.get("deadline", 60.0))
                     for e in list(self.table.images.values())
                     if e.backend.get("type") == "registry"), default=0.0)
        if worst > self._reported_deadline:
            self._reported_deadline = worst
            self.tell({"op": "deadline", "seconds": 2 * worst + 10})

    def stop_when(self, cond: Callable[[], bool]) -> bool:
        """Decide to stop if ``cond()`` holds, atomically with registrations; True when
        stopping (now or before)."""
        with self.gate:
            if not self.stopping and cond():
                self.stopping = True
            return self.stopping

    def register(self, req: dict[str, Any], loaded: LoadedBootstrap | None) -> dict[str, Any]:
        """Register `req["bootstrap"]` for `req["mountpoint"]` (`loaded`: that file as a
        `resolve` in this process read and validated it)."""
        with self.gate:
            if self.stopping:
                raise DaemonStopping(f"the daemon for {self.table.cache_dir} is stopping "
                                     "(no image left); the next one serves this mount")
            return self._register(req, loaded)

    def _register(self, req: dict[str, Any], loaded: LoadedBootstrap | None) -> dict[str, Any]:
        if req.get("mode", "fanotify") != self.mode:
            raise DaemonError(
                f"the daemon for {self.table.cache_dir} runs in {self.mode} mode; mount "
                f"with --mode {self.mode} or use another cache dir")
        mp = os.path.abspath(str(req["mountpoint"]))
        self.register_check(req, mp)
        info = self.table.register(
            str(req["bootstrap"]), dict(req["backend"]), mp,
            amplify=request_number(req, "amplify", 1 << 20),
            prefetch=prefetch_settings(req), fsid=requested_fsid(req), loaded=loaded,
        )  # fmt: skip
        self.plane.registered(str(info["fsid"]))
        self.report_deadline()
        return self.registered_hook(info, req, mp)

    def register_ref(self, req: dict[str, Any]) -> dict[str, Any]:
        """`mount REF` in one round trip: `resolve` the reference (the `resolve`
        arguments), then `register` its bootstrap (the `register` arguments but
        ``bootstrap`` and ``backend``: the resolved ones, a registry backend updated
        with the caller's ``backend_config`` - retries, mirrors, proxy, credentials)."""
        overlay = req.get("backend_config") or {}
        if not isinstance(overlay, dict):
            raise DaemonError("backend_config must be a JSON object")
        remote, loaded = self.resolve_and_load(req)
        backend = dict(remote["backend"])
        if backend.get("type") == "registry":
            backend.update(overlay)
        return self.register({**req, "bootstrap": remote["bootstrap"], "backend": backend},
                             loaded)

    def resolve(self, req: dict[str, Any]) -> dict[str, Any]:
        """Resolve an image reference and fetch its bootstrap into the cache dir, so that
        `mount REF` needs no HTTP stack of its own (the daemon has one loaded).

        The bootstrap is parsed here with the full validation a mount needs (and its
        verdict remembered), and the parse kept for the `register` that follows: one
        parse per `mount REF`, not two."""
        remote, self._resolved = self.resolve_and_load(req)  # `mount REF` registers it next
        return remote

    def resolve_and_load(self, req: dict[str, Any]
                         ) -> tuple[dict[str, Any], LoadedBootstrap | None]:
        """`resolve`: its answer, and the bootstrap as read and validated."""
        from erofs_nydus.registry.resolve import resolve_remote_image

        verdicts = self.table.verdicts

        def validate(data: bytes, name: str) -> RafsImage:
            return validate_bootstrap(data, verdicts, name)

        plain = req.get("plain_http", "loopback")
        docker_config = req.get("docker_config")
        remote = resolve_remote_image(
            str(req["ref"]),
            self.table.cache_dir,
            platform=req.get("platform"),
            plain_http="loopback" if plain == "loopback" else bool(plain),
            deadline=request_number(req, "deadline", 30.0, integer=False),
            retries=request_number(req, "retries", 3),
            docker_config=str(docker_config) if docker_config else None,
            mirrors=req.get("mirrors"),
            proxy=req.get("proxy"),
            verify=str(req["verify"]) if req.get("verify") else True,
            validate=validate,
        )
        return {
            "ref": remote.ref,
            "manifest_digest": remote.manifest_digest,
            "bootstrap": remote.bootstrap,
            "backend": remote.backend,
            "blob_ids": remote.blob_ids,
            "bootstrap_fetched": remote.bootstrap_fetched,
        }, remote.loaded
