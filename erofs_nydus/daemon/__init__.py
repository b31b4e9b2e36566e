"""The on-demand daemon: makes each blob's uncompressed address space exist lazily.

Kernel-independent core (reused unchanged by the fscache request source):
  `blobcache.BlobCacheFile`  sparse cache file + persisted chunk map, verified on open
  `core.BlobServer`          fill(offset, length): map, amplify, merge, fetch, verify, write
  `images.ImageTable`        registered images/blobs, state file, mark/unmark hooks

fanotify request source (Linux >= 6.14):
  `fanotify_proto`           sans-I/O event/response codec
  `fanotify`                 group/mark syscalls, `FanotifyHandler` (ALLOW / DENY EIO)

Processes (crash safety):
  `supervisor`               holds the fanotify group fd, forwards events, restarts the daemon
  `worker`                   the daemon process (events + control socket)
  `channel`, `client`, `paths`  their wire format, the CLI's side, run-file locations
"""
