"""The image model: what a RAFS v6 image *means*, read back from its bytes.

Owns: `image` (BlobInfo, ChunkInfo, RafsImage), `tree` (Inode/Node), `reader`
(bootstrap bytes -> tree + blobs + chunks, with the reference reader's validations),
`check`, `inspect`, `stats`, `codec` (compress / decompress / verify one chunk, shared
by the builder, the checker and the daemon core) and `backend` (the BlobBackend
protocol: where blob bytes come from).

May import: `layout`, `errors`, `fsutil`.  Nothing here writes images or runs a daemon.
"""
