"""cryptfs: transparent per-file encryption for Linux, as a FUSE filesystem."""

__version__ = "0.1.0"
