"""Masked views made off the request loop.

A masked view of a large file takes seconds of CPU (decrypt every block,
parse, mask: about 0.4 s per MiB of CSV).  Made inside a request handler it
would stop the mount for everyone, its link to the key agent included.  So
a view larger than ``INLINE_MAX`` is made in a worker thread while the open
that asked for it waits (other requests are served meanwhile), under limits
that bound memory and keep request workers free:

- at most ``MAX_BUILDS`` views are made at once (each holds the file's
  plaintext and its view: up to 2 x 64 MiB);
- at most ``MAX_WAITING`` opens wait for a view at once, ``PER_UID`` of one
  user; beyond that an open fails with EBUSY at once.  A waiting open holds
  no request worker (its reply is deferred, cryptfs.frontend), only memory.

The thread reads through its own descriptor and its own
:class:`ContentFile` (the file's header and size as they were at the open),
so nothing it touches is shared with the request loop.  What it made is
used only if, after it, the open decides the same way again and the file
is as it was (:class:`Stamp`): the caller re-validates; this module only
makes views.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from cryptfs.content import ContentFile
from cryptfs.header import FileHeader

INLINE_MAX = 4096  # bytes of plaintext: a view this small is made in the handler
MAX_BUILDS = 2  # views made at once (threads)
MAX_WAITING = 8  # opens waiting for a view at once
PER_UID = 2  # of them, opens of one user


class Busy(Exception):
    """Too many opens already wait for a view (of this user, or of everyone)."""


@dataclass(frozen=True)
class Stamp:
    """What a view was made from: the file's content engine and its count of
    changes made through it, the backing file's size and mtime (changes from
    outside this mount), the mask rule and the token key's generation."""

    content: object  # (compared by identity: ContentFile has no __eq__)
    changes: int
    c_size: int
    mtime_ns: int
    rule: object
    key_id: int


@dataclass(frozen=True)
class Wanted:
    """What an open needs made before it can be answered."""

    stamp: Stamp
    token: bytes | None  # (None: token columns masked)
    header: FileHeader
    size: int  # bytes of plaintext
    mask: Callable[[bytes], bytes]


@dataclass
class Built:
    """A view made in a thread, or why it could not be."""

    stamp: Stamp
    token: bytes | None  # (None: token columns masked)
    view: bytes | None = None
    error: BaseException | None = None


def make_view(fd: int, header: FileHeader, size: int,
              mask: Callable[[bytes], bytes]) -> bytes:
    """Decrypt ``size`` bytes through a private ContentFile on ``fd`` and mask
    them (runs in a worker thread: nothing here is shared)."""
    return mask(ContentFile(fd, header, size).read(0, size))


class ViewMaker:
    """The limits above, for one mount."""

    def __init__(self) -> None:
        self._limiter = trio.CapacityLimiter(MAX_BUILDS)
        self._waiting: dict[int, int] = {}  # uid -> opens of theirs waiting

    def admit(self, uid: int) -> None:
        """Count one more waiting open of ``uid`` (Busy if over a limit); the
        caller calls :meth:`done` when it no longer waits."""
        if sum(self._waiting.values()) >= MAX_WAITING or self._waiting.get(uid, 0) >= PER_UID:
            raise Busy
        self._waiting[uid] = self._waiting.get(uid, 0) + 1

    def done(self, uid: int) -> None:
        self._waiting[uid] -= 1
        if not self._waiting[uid]:
            del self._waiting[uid]

    async def build(self, fd: int, header: FileHeader, size: int,
                    mask: Callable[[bytes], bytes]) -> bytes:
        """The view, made in a thread (at most MAX_BUILDS at once) on ``fd``:
        a descriptor of the file that only this build uses (the caller
        closes it)."""
        async with self._limiter:
            return await trio.to_thread.run_sync(make_view, fd, header, size, mask)
