"""The inode table's entries and the handle types.

Every inode the kernel knows holds a descriptor of its backing object (see
cryptfs.fs.core); while any handle of a regular file is open, one
:class:`ContentFile` per inode serves all handles.
"""

from __future__ import annotations

import os
from typing import Any

from cryptfs.content import ContentFile


class Inode:
    """What the filesystem holds for one inode the kernel has looked up."""

    __slots__ = ("ino", "fd", "access", "kind", "nlookup", "handles", "diriv", "meta", "content",
                 "viewed", "agent_rows")

    def __init__(self, ino: int, fd: int, kind: int, access: int = os.O_PATH) -> None:
        self.ino = ino
        self.fd = fd  # descriptor of the backing object
        self.access = access  # how fd was opened: O_RDWR, O_RDONLY or O_PATH
        self.kind = kind  # stat.S_IFMT bits
        self.nlookup = 0
        self.handles: set[_Handle] = set()  # its open file handles
        self.diriv: bytes | None = None  # directories
        self.meta: Any = None  # regular: (block overhead, header length); symlink: target
        self.content: ContentFile | None = None  # regular files while open
        self.viewed = False  # a masked or encrypted view was served: its pages may be cached
        self.agent_rows = False  # marked (AGENT_ROWS_XATTR) as written by a masked role


class _Handle:
    """An open regular file: its inode, who opened it, and whether for reading
    (only a readable handle can be mapped to read, which matters when gated)."""

    __slots__ = ("inode", "uid", "readable", "pid", "exe", "path", "opened", "nread", "nwritten",
                 "raw", "view", "policy", "own_only", "foreign")

    def __init__(self, inode: Inode, uid: int, readable: bool, pid: int = 0, path: str = "") -> None:
        self.inode = inode
        self.uid = uid
        self.readable = readable
        self.pid = pid  # (for the access log: who opened it, as what path, bytes moved)
        self.exe = ""
        self.path = path
        self.opened = 0
        self.nread = 0
        self.nwritten = 0
        self.raw = -1  # a read-only fd of the backing file: a ciphertext view (trusted programs)
        self.view: bytes | None = None  # a masked view (roles that see masked data)
        self.policy: Any = None  # the policy (and roles) it was opened under
        self.own_only = False  # plaintext of a masked role: reads only its own (ownreads)
        self.foreign = False  # someone else changed the file's plaintext since it was opened


class _Dir:
    __slots__ = ("inode", "entries", "uid")

    def __init__(self, inode: Inode, uid: int) -> None:
        self.inode = inode
        self.uid = uid  # who opened it
        self.entries: list[tuple[bytes, str | None]] | None = None
