"""`python -m erofs_nydus.cli`."""

from erofs_nydus.cli import run

run()
