"""erofs_nydus: RAFS v6 (Nydus) images and an on-demand EROFS daemon."""

__version__ = "0.1.0"
