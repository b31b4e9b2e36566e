"""The process shell: everything that makes the daemon a long-lived, crash-safe service.

Owns: `shell` (the process shell both request sources run in: lock, worker restarts,
signals, read deadline, control operations), `supervisor` and `worker` (fanotify mode
in that shell), `channel` (their wire format), `api` (control API over a unix socket,
Prometheus metrics, `ControlPlane`), `client` (the CLI's side), `paths` (run-file
locations and locks), `cache` (cache dir ls/du/gc), and fscache mode in the same
shell (`fscache_daemon`, `fscache_client`).

May import: `fanotify`, `fscache`, `daemon`, `registry`, `rafs`, `layout` and the loose
modules.  Never imported by anything below it.
"""
