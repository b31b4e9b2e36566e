"""Image builder: directory / tar / tar.gz -> bootstrap + one data blob.

Owns: sources (directory walk, streamed tar), the blob writer, the two-phase bootstrap
writer, OCI whiteouts (`whiteout`), layer merge (`merge`) and `optimize`.

May import: `rafs`, `layout` and the loose modules.  Writes to a sink; no daemon or
registry code.
"""

from erofs_nydus.builder.create import BuildOptions, BuildResult, create_image

__all__ = ["BuildOptions", "BuildResult", "create_image"]
