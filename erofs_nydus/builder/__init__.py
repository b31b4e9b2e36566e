"""Image builder: directory / tar / tar.gz -> bootstrap + one data blob."""

from erofs_nydus.builder.create import BuildOptions, BuildResult, create_image

__all__ = ["BuildOptions", "BuildResult", "create_image"]
