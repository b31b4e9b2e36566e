"""The process shell: everything that makes the daemon a long-lived, crash-safe service.

Owns: `supervisor` (holds the kernel fd, restarts the worker), `worker` (the daemon
process), `channel` (their wire format), `api` (control API over a unix socket,
Prometheus metrics, `ControlPlane`), `client` (the CLI's side), `paths` (run-file
locations and locks), `cache` (cache dir ls/du/gc), and the fscache mode's shell
(`fscache_daemon`, `fscache_client`).

May import: `fanotify`, `fscache`, `daemon`, `registry`, `rafs`, `layout` and the loose
modules.  Never imported by anything below it.
"""
