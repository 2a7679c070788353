"""The inode table's entries and the handle types.

Every inode the kernel knows holds a descriptor of its backing object (see
cryptfs.fs.core); while any handle of a regular file is open, one
:class:`ContentFile` per inode serves all handles.  A handle's type says what
it serves: the plaintext, the encrypted bytes, or a masked view.
"""

from __future__ import annotations

import os
from typing import Any

from cryptfs.content import CheckedHeader, ContentFile
from cryptfs.decision import ALLOWED, Decision


class Inode:
    """What the filesystem holds for one inode the kernel has looked up."""

    __slots__ = ("ino", "fd", "access", "kind", "nlookup", "handles", "diriv", "meta", "content",
                 "checked", "viewed", "agent_rows", "wrong_size")

    def __init__(self, ino: int, fd: int, kind: int, access: int = os.O_PATH) -> None:
        self.ino = ino
        self.fd = fd  # descriptor of the backing object
        self.access = access  # how fd was opened: O_RDWR, O_RDONLY or O_PATH
        self.kind = kind  # stat.S_IFMT bits
        self.nlookup = 0
        self.handles: set[Handle] = set()  # its open file handles
        self.diriv: bytes | None = None  # directories
        self.meta: Any = None  # regular: (block overhead, header length); symlink: target
        self.content: ContentFile | None = None  # regular files while open
        # Regular files: the header last checked, kept after the last close so the
        # next open compares bytes instead of authenticating again (CheckedHeader;
        # set through Core._keep_checked, which bounds how many are kept).
        self.checked: CheckedHeader | None = None
        self.viewed = False  # a masked or encrypted view was served: its pages may be cached
        self.agent_rows = False  # marked (AGENT_ROWS_XATTR) as written by a masked role
        # The kernel was given a size from a layout hint that the header then
        # contradicted: every open fails until the kernel forgets this inode.
        self.wrong_size = False


def readable(flags: int) -> bool:
    """Whether an open with these flags can read (a mapping of it can)."""
    return (flags & os.O_ACCMODE) != os.O_WRONLY


class Handle:
    """An open regular file: its inode, who opened it, and whether for reading
    (only a readable handle can be mapped to read, which matters when gated).
    What it serves is its type: :class:`PlainHandle`, :class:`CiphertextView`
    or :class:`MaskedView`."""

    __slots__ = ("inode", "uid", "readable", "pid", "exe", "path", "opened", "nread", "nwritten",
                 "policy", "decision")

    # (cryptfs.ownreads asks every handle of a file; only a plaintext handle can be either)
    own_only: bool = False  # reads only its own writes (ownreads): a masked role's plaintext,
    not_recipient: bool = False  # or the create handle of a writer who is not a recipient
    foreign: bool = False  # someone else changed the file's plaintext since it was opened

    def __init__(self, inode: Inode, uid: int, readable: bool) -> None:
        self.inode = inode
        self.uid = uid
        self.readable = readable
        self.pid = 0  # (for the access log: who opened it, as what path, bytes moved)
        self.exe = ""
        self.path = ""
        self.opened = 0
        self.nread = 0
        self.nwritten = 0
        self.policy: Any = None  # the policy (and roles) it was opened under
        self.decision: Decision = ALLOWED  # how its open was decided (for the open's record)


class PlainHandle(Handle):
    """The file's plaintext, read and written through the inode's ContentFile."""

    __slots__ = ("own_only", "not_recipient", "foreign")

    def __init__(self, inode: Inode, uid: int, readable: bool, own_only: bool = False,
                 not_recipient: bool = False) -> None:
        super().__init__(inode, uid, readable)
        self.own_only = own_only or not_recipient
        self.not_recipient = not_recipient
        self.foreign = False


class CiphertextView(Handle):
    """A read-only view of the file's encrypted bytes (a role that reads
    ciphertext only, or a program a rule does not trust but lets have them):
    reads come from ``raw``, a read-only descriptor of the backing file."""

    __slots__ = ("raw",)

    def __init__(self, inode: Inode, uid: int, readable: bool, raw: int) -> None:
        super().__init__(inode, uid, readable)
        self.raw = raw


class MaskedView(Handle):
    """A masked view (roles that see masked data): reads come from ``view``,
    made at open; writes only append rows past the file's end."""

    __slots__ = ("view",)

    def __init__(self, inode: Inode, uid: int, readable: bool, view: bytes) -> None:
        super().__init__(inode, uid, readable)
        self.view = view


class _Dir:
    __slots__ = ("inode", "entries", "uid")

    def __init__(self, inode: Inode, uid: int) -> None:
        self.inode = inode
        self.uid = uid  # who opened it
        self.entries: list[tuple[bytes, str | None]] | None = None
