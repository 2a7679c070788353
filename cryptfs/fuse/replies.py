"""Typed replies, each encoded to the bytes that follow ``fuse_out_header``.

A handler returns one of these (or, where fuse.h's reply is a bare number or
data, an ``int`` or ``bytes``; the session's reply table says which op takes
which).  Timeouts are seconds as float; the encoders split them into fuse.h's
``(seconds, nanoseconds)`` pairs.

    EntryOut   = fuse_entry_out (40) + fuse_attr (88)      LOOKUP MKNOD MKDIR SYMLINK LINK
    AttrOut    = fuse_attr_out (16) + fuse_attr (88)       GETATTR SETATTR
    OpenOut    = fuse_open_out (16)                        OPEN OPENDIR
    CreateOut  = EntryOut + OpenOut                        CREATE TMPFILE
    StatfsOut  = fuse_kstatfs (80)                         STATFS
    LkOut      = fuse_lk_out (24)                          GETLK
    IoctlOut   = fuse_ioctl_out (16) + data                IOCTL
    DirBuffer  = (fuse_dirent + name, 8-aligned) * n       READDIR
    DirPlusBuffer = (fuse_entry_out + fuse_attr + fuse_dirent + name, aligned) * n   READDIRPLUS

A LOOKUP answered with ``EntryOut(nodeid=0, ...)`` is a *negative entry*: the
kernel remembers "no such name" for ``entry_timeout`` seconds without asking.
"""

from __future__ import annotations

import stat as _stat

from cryptfs.fuse import abi

_ATTR = abi.ATTR.st
_ENTRY = abi.ENTRY_OUT.st
_ATTR_OUT = abi.ATTR_OUT.st
_OPEN = abi.OPEN_OUT.st
_DIRENT = abi.DIRENT.st
_DIRENT_SIZE = abi.DIRENT.size
_ENTRYPLUS_SIZE = abi.ENTRY_OUT.size + abi.ATTR.size


def split_timeout(seconds: float) -> tuple[int, int]:
    """Seconds as fuse.h's (seconds, nanoseconds)."""
    if seconds <= 0:
        return 0, 0
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


class Attr:
    """struct fuse_attr: what stat(2) reports of one inode.  Times are ns since the epoch."""

    __slots__ = ("ino", "size", "blocks", "atime_ns", "mtime_ns", "ctime_ns", "mode", "nlink",
                 "uid", "gid", "rdev", "blksize", "flags")

    def __init__(self, ino: int = 0, mode: int = 0, nlink: int = 1, uid: int = 0, gid: int = 0,
                 size: int = 0, blocks: int = 0, atime_ns: int = 0, mtime_ns: int = 0,
                 ctime_ns: int = 0, rdev: int = 0, blksize: int = 4096, flags: int = 0) -> None:
        self.ino = ino
        self.size = size
        self.blocks = blocks
        self.atime_ns = atime_ns
        self.mtime_ns = mtime_ns
        self.ctime_ns = ctime_ns
        self.mode = mode
        self.nlink = nlink
        self.uid = uid
        self.gid = gid
        self.rdev = rdev
        self.blksize = blksize
        self.flags = flags

    def pack(self) -> bytes:
        a, m, c = self.atime_ns, self.mtime_ns, self.ctime_ns
        return _ATTR.pack(self.ino, self.size, self.blocks, a // 1_000_000_000, m // 1_000_000_000,
                          c // 1_000_000_000, a % 1_000_000_000, m % 1_000_000_000,
                          c % 1_000_000_000, self.mode, self.nlink, self.uid, self.gid, self.rdev,
                          self.blksize, self.flags)

    def copy(self) -> Attr:
        new = Attr.__new__(Attr)
        for k in Attr.__slots__:
            setattr(new, k, getattr(self, k))
        return new


class EntryOut:
    """The answer to a name lookup: the inode, its attributes and how long both may be cached."""

    __slots__ = ("nodeid", "attr", "entry_timeout", "attr_timeout", "generation")

    def __init__(self, nodeid: int, attr: Attr, entry_timeout: float = 1.0,
                 attr_timeout: float = 1.0, generation: int = 0) -> None:
        self.nodeid = nodeid
        self.attr = attr
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.generation = generation

    def pack(self) -> bytes:
        es, ens = split_timeout(self.entry_timeout)
        as_, ans = split_timeout(self.attr_timeout)
        return _ENTRY.pack(self.nodeid, self.generation, es, as_, ens, ans) + self.attr.pack()


class AttrOut:
    __slots__ = ("attr", "timeout")

    def __init__(self, attr: Attr, timeout: float = 1.0) -> None:
        self.attr = attr
        self.timeout = timeout

    def pack(self) -> bytes:
        s, ns = split_timeout(self.timeout)
        return _ATTR_OUT.pack(s, ns, 0) + self.attr.pack()


class OpenOut:
    """An open handle ``fh`` (the layer hands it back in every later request) and FOPEN_* flags."""

    __slots__ = ("fh", "open_flags")

    def __init__(self, fh: int = 0, open_flags: int = 0) -> None:
        self.fh = fh
        self.open_flags = open_flags

    def pack(self) -> bytes:
        return _OPEN.pack(self.fh, self.open_flags, 0)


class CreateOut:
    __slots__ = ("entry", "open")

    def __init__(self, entry: EntryOut, open: OpenOut) -> None:  # noqa: A002 - fuse.h's name
        self.entry = entry
        self.open = open

    def pack(self) -> bytes:
        return self.entry.pack() + self.open.pack()


class StatfsOut:
    __slots__ = ("blocks", "bfree", "bavail", "files", "ffree", "bsize", "namelen", "frsize")

    def __init__(self, blocks: int = 0, bfree: int = 0, bavail: int = 0, files: int = 0,
                 ffree: int = 0, bsize: int = 4096, namelen: int = 255, frsize: int = 4096) -> None:
        self.blocks, self.bfree, self.bavail = blocks, bfree, bavail
        self.files, self.ffree = files, ffree
        self.bsize, self.namelen, self.frsize = bsize, namelen, frsize

    def pack(self) -> bytes:
        return abi.KSTATFS.st.pack(self.blocks, self.bfree, self.bavail, self.files, self.ffree,
                                   self.bsize, self.namelen, self.frsize, 0, 0, 0, 0, 0, 0, 0)


class LkOut:
    __slots__ = ("start", "end", "type", "pid")

    def __init__(self, start: int, end: int, type: int, pid: int) -> None:  # noqa: A002
        self.start, self.end, self.type, self.pid = start, end, type, pid

    def pack(self) -> bytes:
        return abi.LK_OUT.st.pack(self.start, self.end, self.type, self.pid)


class IoctlOut:
    __slots__ = ("result", "data")

    def __init__(self, result: int, data: bytes = b"") -> None:
        self.result, self.data = result, data

    def pack(self) -> bytes:
        return abi.IOCTL_OUT.st.pack(self.result, 0, 0, 0) + self.data


def dirent_type(mode: int) -> int:
    """fuse_dirent.type: the S_IFMT bits of ``mode`` as DT_* (S_IFMT >> 12)."""
    return _stat.S_IFMT(mode) >> 12


class DirBuffer:
    """READDIR's reply: ``fuse_dirent`` records packed up to the kernel's ``size``.

    ``off`` of each entry is the cookie the kernel sends back as the next READDIR's
    offset to continue *after* that entry.  ``add`` returns False when the entry does
    not fit: stop there and return the buffer.
    """

    __slots__ = ("_parts", "_left")

    def __init__(self, size: int) -> None:
        self._parts: list[bytes] = []
        self._left = size

    def add(self, name: bytes, ino: int, mode: int, off: int) -> bool:
        reclen = (_DIRENT_SIZE + len(name) + 7) & ~7
        if reclen > self._left:
            return False
        self._left -= reclen
        pad = reclen - _DIRENT_SIZE - len(name)
        self._parts.append(_DIRENT.pack(ino, off, len(name), dirent_type(mode)) + name + b"\0" * pad)
        return True

    def pack(self) -> bytes:
        return b"".join(self._parts)


class DirPlusBuffer:
    """READDIRPLUS's reply: each entry carries a full EntryOut (the kernel then skips the
    LOOKUP).  Every entry with ``nodeid != 0`` counts as one lookup of that inode, which
    a later FORGET gives back, exactly as a LOOKUP reply does."""

    __slots__ = ("_parts", "_left")

    def __init__(self, size: int) -> None:
        self._parts: list[bytes] = []
        self._left = size

    def add(self, name: bytes, entry: EntryOut, off: int) -> bool:
        reclen = (_ENTRYPLUS_SIZE + _DIRENT_SIZE + len(name) + 7) & ~7
        if reclen > self._left:
            return False
        self._left -= reclen
        pad = reclen - _ENTRYPLUS_SIZE - _DIRENT_SIZE - len(name)
        self._parts.append(entry.pack() + _DIRENT.pack(entry.attr.ino, off, len(name),
                                                         dirent_type(entry.attr.mode))
                           + name + b"\0" * pad)
        return True

    def pack(self) -> bytes:
        return b"".join(self._parts)
