"""The daemon core: makes each blob's uncompressed address space exist lazily.

Owns (kernel-independent, shared by both request sources):
  `blobcache.BlobCacheFile`  sparse cache file + persisted chunk map, verified on open
  `chunkmap`                 the presence bitmap of one cache file
  `core.BlobServer`          fill(offset, length): map, amplify, merge, fetch, verify, write
  `images.ImageTable`        registered images/blobs, state file, mark/unmark hooks
  `prefetch`, `trace`        background prefetch, first-access trace

May import: `registry` (backends, lazily), `rafs`, `layout` and the loose modules.
No process, socket or kernel-interface code: that lives in `service`, `fanotify`
and `fscache`.
"""
