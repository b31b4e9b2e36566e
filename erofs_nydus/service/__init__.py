"""The process shell: everything that makes the daemon a long-lived, crash-safe service.

Owns: `shell` (the process shell both request sources run in: lock, worker restarts,
signals, read deadline, control operations), `supervisor` and `worker` (fanotify mode
in that shell), `channel` (their wire format), `api` (control API views, server and
`ControlPlane`), `metrics` (its Prometheus families), `api_client` (its client),
`unixhttp` (the unix-socket HTTP server `api` and `nydusd_api` share), `client` (the
CLI's side of the control socket), `paths` (run-file locations and locks), `cache`
(cache dir ls/du/gc), fscache mode in the same shell (`fscache_daemon`,
`fscache_client`) and the `nydusd`-compatible entry point (`nydusd`, `nydusd_api`,
`nydusd_config`, `nydusd_fscache`).

May import: `fanotify`, `fscache`, `daemon`, `registry`, `rafs`, `layout` and the loose
modules.  Never imported by anything below it.
"""
