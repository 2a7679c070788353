"""cryptfs: transparent per-file encryption for Linux, as a FUSE filesystem."""

# The one place the release number is written (setup.cfg reads it).  It
# changes whenever what a release writes or accepts on disk changes; the
# table in docs/FORMAT.md ("Versions") says which release writes what.
__version__ = "0.2.0"
