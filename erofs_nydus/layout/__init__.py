"""Pure on-disk formats: EROFS (as RAFS v6 uses it), the Nydus extensions, the blob trailer.

Every module here maps bytes to values and back with `construct` and does no I/O.
Field names follow the kernel's `fs/erofs/erofs_fs.h` and Nydus's
`rafs/src/metadata/layout/v6.rs`; formulas sit next to the fields.

May import: `errors` only.  Everything else in the package builds on this folder.
"""

from erofs_nydus.layout.common import build, parse

__all__ = ["build", "parse"]
