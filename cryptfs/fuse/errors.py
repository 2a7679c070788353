"""The two exceptions of the protocol layer.

A handler raises :class:`FuseError` (or lets an ``OSError`` through) to answer a
request with ``-errno``; the session turns every other exception into ``EIO``
and a log line.  :class:`MalformedRequest` is what the decoder raises for bytes
that do not match fuse.h; the session answers it with ``EINVAL``.
"""

from __future__ import annotations

import errno
import os


class FuseError(Exception):
    """Answer the current request with ``-errno``."""

    def __init__(self, err: int) -> None:
        super().__init__(err, os.strerror(err))
        self.errno = err


class MalformedRequest(FuseError):
    """The kernel's bytes do not match fuse.h (too short, no NUL, wrong length)."""

    def __init__(self, what: str, unique: int | None = None) -> None:
        super().__init__(errno.EINVAL)
        self.what = what
        self.unique = unique

    def __str__(self) -> str:
        return f"malformed FUSE request: {self.what}"
