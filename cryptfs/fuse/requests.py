"""Typed requests, decoded from the bytes of one /dev/fuse read by a table opcode -> decoder.

Every request carries the header fields a handler may need (``unique``, ``nodeid``,
``uid``, ``gid``, ``pid``) and its operation's fields under fuse.h's names, with
padding left out.  Names are ``bytes`` without their NUL.  Nothing above this
module sees a byte offset into a request.

Layout of one request (see abi.py)::

    fuse_in_header | fixed struct (e.g. fuse_write_in) | tail
                                                          name\\0            LOOKUP, UNLINK, ...
                                                          name\\0 name2\\0    RENAME, SYMLINK (target)
                                                          name\\0 value     SETXATTR
                                                          data              WRITE, IOCTL, NOTIFY_REPLY
                                                          forget_one * n    BATCH_FORGET
    ... | extensions (total_extlen * 8 bytes, ignored: none are negotiated)

``WriteIn.data`` (and ``SetxattrIn.value``) is a memoryview into the session's one
read buffer: valid until the handler returns.  A handler that answers later
(``Deferred``) copies what it keeps.
"""

from __future__ import annotations

import errno

from cryptfs.fuse import abi
from cryptfs.fuse.errors import FuseError, MalformedRequest

_HDR = abi.IN_HEADER.st
_HDR_SIZE = abi.IN_HEADER.size


class UnknownOpcode(FuseError):
    def __init__(self, opcode: int, unique: int) -> None:
        super().__init__(errno.ENOSYS)
        self.opcode = opcode
        self.unique = unique


class Request:
    __slots__ = ("opcode", "unique", "nodeid", "uid", "gid", "pid")
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in _all_slots(type(self)))
        return f"{type(self).__name__}({fields})"


def _all_slots(cls: type) -> list[str]:
    out: list[str] = []
    for c in reversed(cls.__mro__):
        out.extend(getattr(c, "__slots__", ()))
    return out


# --- one class per request shape (several opcodes share one) -----------------------------
class EmptyIn(Request):
    """READLINK, STATFS, DESTROY, LISTXATTR has its own; no fields beyond the header."""
    __slots__ = ()


class NameIn(Request):
    """LOOKUP, UNLINK, RMDIR, REMOVEXATTR."""
    __slots__ = ("name",)
    name: bytes


class ForgetIn(Request):
    __slots__ = ("nlookup",)
    nlookup: int


class BatchForgetIn(Request):
    __slots__ = ("count", "forgets")
    count: int
    forgets: list[tuple[int, int]]   # (nodeid, nlookup)


class GetattrIn(Request):
    __slots__ = ("getattr_flags", "fh")
    getattr_flags: int
    fh: int


class SetattrIn(Request):
    __slots__ = ("valid", "fh", "size", "lock_owner", "atime", "mtime", "ctime", "atimensec",
                 "mtimensec", "ctimensec", "mode", "uid_", "gid_")
    valid: int
    fh: int
    size: int
    lock_owner: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    uid_: int   # the new owner (``uid`` is the caller's, from the header)
    gid_: int


class SymlinkIn(Request):
    __slots__ = ("name", "target")
    name: bytes
    target: bytes


class MknodIn(Request):
    __slots__ = ("mode", "rdev", "umask", "name")
    mode: int
    rdev: int
    umask: int
    name: bytes


class MkdirIn(Request):
    __slots__ = ("mode", "umask", "name")
    mode: int
    umask: int
    name: bytes


class RenameIn(Request):
    """RENAME and RENAME2 (``flags`` is 0 for RENAME)."""
    __slots__ = ("newdir", "flags", "name", "newname")
    newdir: int
    flags: int
    name: bytes
    newname: bytes


class LinkIn(Request):
    __slots__ = ("oldnodeid", "newname")
    oldnodeid: int
    newname: bytes


class OpenIn(Request):
    """OPEN and OPENDIR."""
    __slots__ = ("flags", "open_flags")
    flags: int
    open_flags: int


class CreateIn(Request):
    """CREATE and TMPFILE."""
    __slots__ = ("flags", "mode", "umask", "open_flags", "name")
    flags: int
    mode: int
    umask: int
    open_flags: int
    name: bytes


class ReadIn(Request):
    """READ, READDIR, READDIRPLUS."""
    __slots__ = ("fh", "offset", "size", "read_flags", "lock_owner", "flags")
    fh: int
    offset: int
    size: int
    read_flags: int
    lock_owner: int
    flags: int


class WriteIn(Request):
    __slots__ = ("fh", "offset", "size", "write_flags", "lock_owner", "flags", "data")
    fh: int
    offset: int
    size: int
    write_flags: int
    lock_owner: int
    flags: int
    data: memoryview


class ReleaseIn(Request):
    """RELEASE and RELEASEDIR."""
    __slots__ = ("fh", "flags", "release_flags", "lock_owner")
    fh: int
    flags: int
    release_flags: int
    lock_owner: int


class FlushIn(Request):
    __slots__ = ("fh", "lock_owner")
    fh: int
    lock_owner: int


class FsyncIn(Request):
    """FSYNC and FSYNCDIR."""
    __slots__ = ("fh", "fsync_flags")
    fh: int
    fsync_flags: int


class SetxattrIn(Request):
    __slots__ = ("size", "flags", "setxattr_flags", "name", "value")
    size: int
    flags: int
    setxattr_flags: int
    name: bytes
    value: memoryview


class GetxattrIn(Request):
    __slots__ = ("size", "name")
    size: int
    name: bytes


class ListxattrIn(Request):
    __slots__ = ("size",)
    size: int


class LkIn(Request):
    """GETLK, SETLK, SETLKW."""
    __slots__ = ("fh", "owner", "start", "end", "type", "lk_pid", "lk_flags")
    fh: int
    owner: int
    start: int
    end: int
    type: int
    lk_pid: int
    lk_flags: int


class AccessIn(Request):
    __slots__ = ("mask",)
    mask: int


class InitIn(Request):
    __slots__ = ("major", "minor", "max_readahead", "flags")
    major: int
    minor: int
    max_readahead: int
    flags: int   # flags | flags2 << 32 when the kernel sets FUSE_INIT_EXT


class InterruptIn(Request):
    __slots__ = ("target",)
    target: int   # fuse_interrupt_in.unique: the request to interrupt


class BmapIn(Request):
    __slots__ = ("block", "blocksize")
    block: int
    blocksize: int


class IoctlIn(Request):
    __slots__ = ("fh", "flags", "cmd", "arg", "in_size", "out_size", "data")
    fh: int
    flags: int
    cmd: int
    arg: int
    in_size: int
    out_size: int
    data: memoryview


class PollIn(Request):
    __slots__ = ("fh", "kh", "flags", "events")
    fh: int
    kh: int
    flags: int
    events: int


class NotifyReplyIn(Request):
    __slots__ = ("offset", "size", "data")
    offset: int
    size: int
    data: memoryview


class FallocateIn(Request):
    __slots__ = ("fh", "offset", "length", "mode")
    fh: int
    offset: int
    length: int
    mode: int


class LseekIn(Request):
    __slots__ = ("fh", "offset", "whence")
    fh: int
    offset: int
    whence: int


class CopyFileRangeIn(Request):
    __slots__ = ("fh_in", "off_in", "nodeid_out", "fh_out", "off_out", "len", "flags")
    fh_in: int
    off_in: int
    nodeid_out: int
    fh_out: int
    off_out: int
    len: int
    flags: int


class StatxIn(Request):
    __slots__ = ("getattr_flags", "fh", "sx_flags", "sx_mask")
    getattr_flags: int
    fh: int
    sx_flags: int
    sx_mask: int


# --- the decoder table --------------------------------------------------------------------
# opcode -> (class, fixed struct or None, {struct field: attribute} for kept fields, tail)
_SKIP = ("padding", "dummy", "unused", "unused4", "unused5", "reserved",
         "dummy1", "dummy2", "dummy3", "dummy4")
_RENAMES = {"uid": "uid_", "gid": "gid_", "pid": "lk_pid", "unique": "target"}


class _Op:
    __slots__ = ("cls", "st", "size", "pairs", "tail")

    def __init__(self, cls: type[Request], cs: abi.CStruct | None, tail: str = "",
                 size: int | None = None) -> None:
        self.cls = cls
        self.st = cs.st if cs else None
        self.size = size if size is not None else (cs.size if cs else 0)
        self.tail = tail
        pairs = []
        if cs:
            for i, f in enumerate(cs.fields):
                if f in _SKIP:
                    continue
                attr = f if f in cls.__slots__ else _RENAMES.get(f, f)
                pairs.append((i, attr))
        self.pairs = tuple(pairs)


# SETXATTR's fixed part is 8 bytes unless FUSE_SETXATTR_EXT is negotiated (the layer never
# asks for it); with it, 16.  The session picks the table that matches its INIT.
_SETXATTR_COMPAT = abi.CStruct("fuse_setxattr_in_compat", "u32 size; u32 flags")

OPS: dict[int, _Op] = {
    abi.LOOKUP: _Op(NameIn, None, "name"),
    abi.FORGET: _Op(ForgetIn, abi.FORGET_IN),
    abi.GETATTR: _Op(GetattrIn, abi.GETATTR_IN),
    abi.SETATTR: _Op(SetattrIn, abi.SETATTR_IN),
    abi.READLINK: _Op(EmptyIn, None),
    abi.SYMLINK: _Op(SymlinkIn, None, "name,target"),
    abi.MKNOD: _Op(MknodIn, abi.MKNOD_IN, "name"),
    abi.MKDIR: _Op(MkdirIn, abi.MKDIR_IN, "name"),
    abi.UNLINK: _Op(NameIn, None, "name"),
    abi.RMDIR: _Op(NameIn, None, "name"),
    abi.RENAME: _Op(RenameIn, abi.RENAME_IN, "name,newname"),
    abi.LINK: _Op(LinkIn, abi.LINK_IN, "newname"),
    abi.OPEN: _Op(OpenIn, abi.OPEN_IN),
    abi.READ: _Op(ReadIn, abi.READ_IN),
    abi.WRITE: _Op(WriteIn, abi.WRITE_IN, "data"),
    abi.STATFS: _Op(EmptyIn, None),
    abi.RELEASE: _Op(ReleaseIn, abi.RELEASE_IN),
    abi.FSYNC: _Op(FsyncIn, abi.FSYNC_IN),
    abi.SETXATTR: _Op(SetxattrIn, _SETXATTR_COMPAT, "name,value"),
    abi.GETXATTR: _Op(GetxattrIn, abi.GETXATTR_IN, "name"),
    abi.LISTXATTR: _Op(ListxattrIn, abi.GETXATTR_IN),
    abi.REMOVEXATTR: _Op(NameIn, None, "name"),
    abi.FLUSH: _Op(FlushIn, abi.FLUSH_IN),
    abi.INIT: _Op(InitIn, abi.INIT_IN, "init", size=16),  # kernels before 7.36 send 16 bytes
    abi.OPENDIR: _Op(OpenIn, abi.OPEN_IN),
    abi.READDIR: _Op(ReadIn, abi.READ_IN),
    abi.RELEASEDIR: _Op(ReleaseIn, abi.RELEASE_IN),
    abi.FSYNCDIR: _Op(FsyncIn, abi.FSYNC_IN),
    abi.GETLK: _Op(LkIn, abi.LK_IN),
    abi.SETLK: _Op(LkIn, abi.LK_IN),
    abi.SETLKW: _Op(LkIn, abi.LK_IN),
    abi.ACCESS: _Op(AccessIn, abi.ACCESS_IN),
    abi.CREATE: _Op(CreateIn, abi.CREATE_IN, "name"),
    abi.INTERRUPT: _Op(InterruptIn, abi.INTERRUPT_IN),
    abi.BMAP: _Op(BmapIn, abi.BMAP_IN),
    abi.DESTROY: _Op(EmptyIn, None),
    abi.IOCTL: _Op(IoctlIn, abi.IOCTL_IN, "data"),
    abi.POLL: _Op(PollIn, abi.POLL_IN),
    abi.NOTIFY_REPLY: _Op(NotifyReplyIn, abi.NOTIFY_RETRIEVE_IN, "data"),
    abi.BATCH_FORGET: _Op(BatchForgetIn, abi.BATCH_FORGET_IN, "forgets"),
    abi.FALLOCATE: _Op(FallocateIn, abi.FALLOCATE_IN),
    abi.READDIRPLUS: _Op(ReadIn, abi.READ_IN),
    abi.RENAME2: _Op(RenameIn, abi.RENAME2_IN, "name,newname"),
    abi.LSEEK: _Op(LseekIn, abi.LSEEK_IN),
    abi.COPY_FILE_RANGE: _Op(CopyFileRangeIn, abi.COPY_FILE_RANGE_IN),
    abi.SYNCFS: _Op(EmptyIn, abi.SYNCFS_IN),
    abi.TMPFILE: _Op(CreateIn, abi.CREATE_IN, "name"),
    abi.STATX: _Op(StatxIn, abi.STATX_IN),
}
OPS_SETXATTR_EXT = {**OPS, abi.SETXATTR: _Op(SetxattrIn, abi.SETXATTR_IN, "name,value")}

_FORGET_ONE = abi.FORGET_ONE.st


def peek_header(buf: bytearray | bytes, n: int) -> tuple[int, int] | None:
    """(opcode, unique) of a request, or None if not even its header is there."""
    if n < _HDR_SIZE:
        return None
    _, opcode, unique = _HDR.unpack_from(buf, 0)[:3]
    return opcode, unique


def decode(buf: bytearray, n: int, ops: dict[int, _Op] = OPS) -> Request:
    """The typed request in ``buf[:n]``.  Raises MalformedRequest (EINVAL), or
    UnknownOpcode for an opcode the table does not know (the session answers ENOSYS)."""
    if n < _HDR_SIZE:
        raise MalformedRequest(f"{n} bytes, shorter than fuse_in_header")
    length, opcode, unique, nodeid, uid, gid, pid, extlen, _ = _HDR.unpack_from(buf, 0)
    if length != n:
        raise MalformedRequest(f"header says {length} bytes, read {n}", unique)
    op = ops.get(opcode)
    if op is None:
        raise UnknownOpcode(opcode, unique)
    end = n - extlen * 8
    off = _HDR_SIZE
    if op.size > end - off:
        raise MalformedRequest(f"{abi.OPCODE_NAMES[opcode]}: {end - off} bytes of arguments, "
                               f"need {op.size}", unique)
    req = op.cls.__new__(op.cls)
    req.opcode = opcode
    req.unique = unique
    req.nodeid = nodeid
    req.uid = uid
    req.gid = gid
    req.pid = pid
    st = op.st
    if st is not None:
        if op.tail == "init":
            _decode_init(req, buf, off, end)  # type: ignore[arg-type]
            return req
        vals = st.unpack_from(buf, off)
        for i, attr in op.pairs:
            setattr(req, attr, vals[i])
        off += op.size
    tail = op.tail
    if not tail:
        return req
    if tail == "name":
        req.name, _ = _name(buf, off, end, unique)  # type: ignore[attr-defined]
    elif tail == "data":
        size = req.size if opcode != abi.IOCTL else req.in_size  # type: ignore[attr-defined]
        if size > end - off:
            raise MalformedRequest(f"{size} bytes of data announced, {end - off} sent", unique)
        req.data = memoryview(buf)[off:off + size]  # type: ignore[attr-defined]
    elif tail == "newname":
        req.newname, _ = _name(buf, off, end, unique)  # type: ignore[attr-defined]
    elif tail == "forgets":
        count = req.count  # type: ignore[attr-defined]
        if count * _FORGET_ONE.size > end - off:
            raise MalformedRequest(f"batch_forget of {count} entries in {end - off} bytes", unique)
        req.forgets = [_FORGET_ONE.unpack_from(buf, off + 16 * i)  # type: ignore[attr-defined]
                       for i in range(count)]
    elif tail == "name,value":
        req.name, off = _name(buf, off, end, unique)  # type: ignore[attr-defined]
        size = req.size  # type: ignore[attr-defined]
        if size > end - off:
            raise MalformedRequest(f"xattr value of {size} bytes in {end - off}", unique)
        req.value = memoryview(buf)[off:off + size]  # type: ignore[attr-defined]
    else:  # two names: RENAME(2) name,newname; SYMLINK name,target
        first, second = tail.split(",")
        a, off = _name(buf, off, end, unique)
        b, _ = _name(buf, off, end, unique)
        setattr(req, first, a)
        setattr(req, second, b)
    if opcode == abi.RENAME:
        req.flags = 0  # type: ignore[attr-defined]
    return req


def _name(buf: bytearray, off: int, end: int, unique: int) -> tuple[bytes, int]:
    """A NUL-terminated name at ``off``: (name, offset after its NUL)."""
    nul = buf.find(b"\0", off, end)
    if nul < 0:
        raise MalformedRequest("name without its terminating NUL", unique)
    if nul == off:
        raise MalformedRequest("empty name", unique)
    return bytes(buf[off:nul]), nul + 1


_INIT_OLD = abi.CStruct("fuse_init_in_old", "u32 major; u32 minor; u32 max_readahead; u32 flags")


def _decode_init(req: InitIn, buf: bytearray, off: int, end: int) -> None:
    if end - off >= abi.INIT_IN.size:
        major, minor, readahead, flags, flags2 = abi.INIT_IN.st.unpack_from(buf, off)[:5]
        if flags & abi.INIT_EXT:
            flags |= flags2 << 32
    else:
        major, minor, readahead, flags = _INIT_OLD.st.unpack_from(buf, off)
    req.major, req.minor, req.max_readahead, req.flags = major, minor, readahead, flags
