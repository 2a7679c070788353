"""A small in-memory filesystem on cryptfs.fuse, to test the protocol layer on real mounts.

Not shipped.  Run as ``python tests/fusefs_memory.py MOUNTPOINT [options]``: it mounts,
serves until unmounted (SIGTERM unmounts cleanly), and answers control commands, one
per line on stdin, with one JSON line on stdout:

    stats             -> {"interrupts": n, "ops": {"getattr": n, ...}}
    hide NAME         -> remove NAME from the root behind the kernel's back (no notify)
    inval NAME        -> notify_inval_entry(root, NAME)
    reset             -> zero the op counters
    populate N        -> create files f00000 .. in the root behind the kernel's back
    delete NAME       -> remove NAME from the root and notify_delete
    chmod NAME MODE   -> change NAME's mode (octal) behind the kernel's back
    inval-inode NAME  -> notify_inval_inode(NAME's inode, attributes only)

Files whose name starts with ``dio-`` are opened with FOPEN_DIRECT_IO; reading a file
created as ``block`` (direct I/O too, so every read reaches the daemon) waits, as a
deferred reply, until the request is interrupted or 30 s pass.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import stat
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptfs.fuse import (  # noqa: E402
    Attr,
    AttrOut,
    CreateOut,
    DirBuffer,
    DirPlusBuffer,
    EntryOut,
    FuseError,
    InitOptions,
    OpenOut,
    Session,
    StatfsOut,
    abi,
)
from cryptfs.fuse import requests as rq  # noqa: E402

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2
SEEK_DATA = 3
SEEK_HOLE = 4


class Inode:
    __slots__ = ("attr", "data", "entries", "target", "xattrs", "lookups", "direct_io")

    def __init__(self, attr: Attr) -> None:
        self.attr = attr
        self.data = bytearray()
        self.entries: dict[bytes, int] = {}
        self.target = b""
        self.xattrs: dict[bytes, bytes] = {}
        self.lookups = 0
        self.direct_io = False


class MemoryFS:
    def __init__(self, entry_timeout: float = 1.0, attr_timeout: float = 1.0) -> None:
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.inodes: dict[int, Inode] = {}
        self.next_ino = abi.ROOT_ID
        self.handles: dict[int, int] = {}  # fh -> ino
        self.next_fh = 1
        self.session: Session | None = None
        self.interrupts = 0
        self.ops: Counter[str] = Counter()
        root = self._new(stat.S_IFDIR | 0o755, os.getuid(), os.getgid())
        root.attr.nlink = 2
        root.lookups = 1

    # --- helpers --------------------------------------------------------------------------
    def _new(self, mode: int, uid: int, gid: int) -> Inode:
        now = time.time_ns()
        ino = self.next_ino
        self.next_ino += 1
        node = Inode(Attr(ino=ino, mode=mode, nlink=1, uid=uid, gid=gid, atime_ns=now,
                          mtime_ns=now, ctime_ns=now))
        self.inodes[ino] = node
        return node

    def _get(self, ino: int) -> Inode:
        try:
            return self.inodes[ino]
        except KeyError:
            raise FuseError(errno.ENOENT) from None

    def _dir(self, ino: int) -> Inode:
        node = self._get(ino)
        if not stat.S_ISDIR(node.attr.mode):
            raise FuseError(errno.ENOTDIR)
        return node

    def _entry(self, node: Inode) -> EntryOut:
        node.lookups += 1
        return EntryOut(node.attr.ino, node.attr, self.entry_timeout, self.attr_timeout)

    def _touch(self, node: Inode, ctime_only: bool = False) -> None:
        now = time.time_ns()
        node.attr.ctime_ns = now
        if not ctime_only:
            node.attr.mtime_ns = now

    def _size(self, node: Inode, size: int) -> None:
        if size < len(node.data):
            del node.data[size:]
        else:
            node.data.extend(bytes(size - len(node.data)))
        node.attr.size = size
        node.attr.blocks = (size + 511) // 512

    def _link_in(self, parent: Inode, name: bytes, node: Inode) -> None:
        if name in parent.entries:
            raise FuseError(errno.EEXIST)
        if len(name) > 255:
            raise FuseError(errno.ENAMETOOLONG)
        parent.entries[name] = node.attr.ino
        self._touch(parent)

    def _make(self, req: rq.Request, parent_ino: int, name: bytes, mode: int) -> Inode:
        parent = self._dir(parent_ino)
        if name in parent.entries:
            raise FuseError(errno.EEXIST)
        gid = parent.attr.gid if parent.attr.mode & stat.S_ISGID else req.gid
        node = self._new(mode, req.uid, gid)
        self._link_in(parent, name, node)
        return node

    def _drop(self, node: Inode) -> None:
        if node.attr.nlink == 0 and node.lookups <= 0 and node.attr.ino in self.inodes \
                and node.attr.ino != abi.ROOT_ID:
            del self.inodes[node.attr.ino]

    # --- lookups and attributes -----------------------------------------------------------
    def lookup(self, req: rq.NameIn) -> EntryOut:
        self.ops["lookup"] += 1
        parent = self._dir(req.nodeid)
        if req.name == b".":
            return self._entry(parent)
        ino = parent.entries.get(req.name)
        if ino is None:
            raise FuseError(errno.ENOENT)
        return self._entry(self.inodes[ino])

    def forget(self, req: rq.ForgetIn) -> None:
        self.ops["forget"] += 1
        node = self.inodes.get(req.nodeid)
        if node is not None:
            node.lookups -= req.nlookup
            self._drop(node)

    def batch_forget(self, req: rq.BatchForgetIn) -> None:
        self.ops["batch_forget"] += 1
        for nodeid, nlookup in req.forgets:
            node = self.inodes.get(nodeid)
            if node is not None:
                node.lookups -= nlookup
                self._drop(node)

    def getattr(self, req: rq.GetattrIn) -> AttrOut:
        self.ops["getattr"] += 1
        return AttrOut(self._get(req.nodeid).attr, self.attr_timeout)

    def setattr(self, req: rq.SetattrIn) -> AttrOut:
        self.ops["setattr"] += 1
        node = self._get(req.nodeid)
        a, v = node.attr, req.valid
        if v & abi.FATTR_MODE:
            a.mode = stat.S_IFMT(a.mode) | (req.mode & 0o7777)
        if v & abi.FATTR_UID:
            a.uid = req.uid_
        if v & abi.FATTR_GID:
            a.gid = req.gid_
        if v & abi.FATTR_SIZE:
            if stat.S_ISDIR(a.mode):
                raise FuseError(errno.EISDIR)
            self._size(node, req.size)
            a.mtime_ns = time.time_ns()
        if v & abi.FATTR_KILL_SUIDGID:
            a.mode &= ~(stat.S_ISUID | stat.S_ISGID)
        now = time.time_ns()
        if v & abi.FATTR_ATIME_NOW:
            a.atime_ns = now
        elif v & abi.FATTR_ATIME:
            a.atime_ns = req.atime * 1_000_000_000 + req.atimensec
        if v & abi.FATTR_MTIME_NOW:
            a.mtime_ns = now
        elif v & abi.FATTR_MTIME:
            a.mtime_ns = req.mtime * 1_000_000_000 + req.mtimensec
        a.ctime_ns = req.ctime * 1_000_000_000 + req.ctimensec if v & abi.FATTR_CTIME else now
        return AttrOut(a, self.attr_timeout)

    def statfs(self, req: rq.EmptyIn) -> StatfsOut:
        used = sum((len(n.data) + 4095) // 4096 for n in self.inodes.values())
        return StatfsOut(blocks=1 << 20, bfree=(1 << 20) - used, bavail=(1 << 20) - used,
                         files=1 << 20, ffree=(1 << 20) - len(self.inodes), bsize=4096,
                         namelen=255, frsize=4096)

    # --- names ----------------------------------------------------------------------------
    def mknod(self, req: rq.MknodIn) -> EntryOut:
        node = self._make(req, req.nodeid, req.name, req.mode & ~req.umask | stat.S_IFMT(req.mode))
        node.attr.rdev = req.rdev
        return self._entry(node)

    def mkdir(self, req: rq.MkdirIn) -> EntryOut:
        node = self._make(req, req.nodeid, req.name, stat.S_IFDIR | (req.mode & ~req.umask & 0o7777))
        node.attr.nlink = 2
        self.inodes[req.nodeid].attr.nlink += 1
        return self._entry(node)

    def symlink(self, req: rq.SymlinkIn) -> EntryOut:
        node = self._make(req, req.nodeid, req.name, stat.S_IFLNK | 0o777)
        node.target = req.target
        node.attr.size = len(req.target)
        return self._entry(node)

    def readlink(self, req: rq.EmptyIn) -> bytes:
        node = self._get(req.nodeid)
        if not stat.S_ISLNK(node.attr.mode):
            raise FuseError(errno.EINVAL)
        return node.target

    def link(self, req: rq.LinkIn) -> EntryOut:
        node = self._get(req.oldnodeid)
        if stat.S_ISDIR(node.attr.mode):
            raise FuseError(errno.EPERM)
        self._link_in(self._dir(req.nodeid), req.newname, node)
        node.attr.nlink += 1
        self._touch(node, ctime_only=True)
        return self._entry(node)

    def unlink(self, req: rq.NameIn) -> None:
        self.ops["unlink"] += 1
        parent = self._dir(req.nodeid)
        ino = parent.entries.get(req.name)
        if ino is None:
            raise FuseError(errno.ENOENT)
        node = self.inodes[ino]
        if stat.S_ISDIR(node.attr.mode):
            raise FuseError(errno.EISDIR)
        del parent.entries[req.name]
        node.attr.nlink -= 1
        self._touch(parent)
        self._touch(node, ctime_only=True)
        self._drop(node)

    def rmdir(self, req: rq.NameIn) -> None:
        parent = self._dir(req.nodeid)
        ino = parent.entries.get(req.name)
        if ino is None:
            raise FuseError(errno.ENOENT)
        node = self._dir(ino)
        if node.entries:
            raise FuseError(errno.ENOTEMPTY)
        del parent.entries[req.name]
        node.attr.nlink = 0
        parent.attr.nlink -= 1
        self._touch(parent)
        self._drop(node)

    def rename(self, req: rq.RenameIn) -> None:
        self.rename2(req)

    def rename2(self, req: rq.RenameIn) -> None:
        src, dst = self._dir(req.nodeid), self._dir(req.newdir)
        ino = src.entries.get(req.name)
        if ino is None:
            raise FuseError(errno.ENOENT)
        if req.flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise FuseError(errno.EINVAL)
        other = dst.entries.get(req.newname)
        if req.flags & RENAME_EXCHANGE:
            if other is None:
                raise FuseError(errno.ENOENT)
            src.entries[req.name], dst.entries[req.newname] = other, ino
            self._touch(src)
            self._touch(dst)
            return
        if other is not None:
            if req.flags & RENAME_NOREPLACE:
                raise FuseError(errno.EEXIST)
            victim = self.inodes[other]
            if stat.S_ISDIR(victim.attr.mode):
                if victim.entries:
                    raise FuseError(errno.ENOTEMPTY)
                dst.attr.nlink -= 1
                victim.attr.nlink = 0
            else:
                victim.attr.nlink -= 1
            self._drop(victim)
        del src.entries[req.name]
        dst.entries[req.newname] = ino
        if stat.S_ISDIR(self.inodes[ino].attr.mode) and src is not dst:
            src.attr.nlink -= 1
            dst.attr.nlink += 1
        self._touch(src)
        self._touch(dst)

    # --- files ----------------------------------------------------------------------------
    def _open(self, node: Inode, flags: int, open_flags: int) -> OpenOut:
        if flags & os.O_TRUNC and stat.S_ISREG(node.attr.mode):
            self._size(node, 0)
            if open_flags & abi.OPEN_KILL_SUIDGID:
                node.attr.mode &= ~(stat.S_ISUID | stat.S_ISGID)
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = node.attr.ino
        return OpenOut(fh, abi.FOPEN_DIRECT_IO if node.direct_io else 0)

    def open(self, req: rq.OpenIn) -> OpenOut:
        self.ops["open"] += 1
        return self._open(self._get(req.nodeid), req.flags, req.open_flags)

    def create(self, req: rq.CreateIn) -> CreateOut:
        self.ops["create"] += 1
        node = self._make(req, req.nodeid, req.name, stat.S_IFREG | (req.mode & ~req.umask & 0o7777))
        node.direct_io = req.name.startswith(b"dio-") or req.name == b"block"
        return CreateOut(self._entry(node), self._open(node, req.flags & ~os.O_TRUNC, 0))

    def read(self, req: rq.ReadIn) -> object:
        self.ops["read"] += 1
        node = self.inodes[self.handles[req.fh]]
        if node.direct_io and self._is_blocker(req.nodeid):
            return self._blocking_read(req)
        return bytes(node.data[req.offset:req.offset + req.size])

    def _is_blocker(self, ino: int) -> bool:
        return self.inodes[abi.ROOT_ID].entries.get(b"block") == ino

    def _blocking_read(self, req: rq.ReadIn) -> object:
        assert self.session is not None
        later = self.session.defer(req)
        done = threading.Event()

        def interrupted() -> None:
            self.interrupts += 1
            later.fail(errno.EINTR)
            done.set()

        def timeout() -> None:
            if not done.wait(30):
                later.reply(b"")
        later.on_interrupt(interrupted)
        threading.Thread(target=timeout, daemon=True).start()
        return later

    def write(self, req: rq.WriteIn) -> int:
        self.ops["write"] += 1
        node = self.inodes[self.handles[req.fh]]
        end = req.offset + len(req.data)
        if end > len(node.data):
            self._size(node, end)
        node.data[req.offset:end] = req.data
        if req.write_flags & abi.WRITE_KILL_SUIDGID:
            node.attr.mode &= ~(stat.S_ISUID | stat.S_ISGID)
        self._touch(node)
        return len(req.data)

    def flush(self, req: rq.FlushIn) -> None:
        self.ops["flush"] += 1

    def release(self, req: rq.ReleaseIn) -> None:
        self.ops["release"] += 1
        self.handles.pop(req.fh, None)

    def fsync(self, req: rq.FsyncIn) -> None:
        return None

    def fallocate(self, req: rq.FallocateIn) -> None:
        node = self.inodes[self.handles[req.fh]]
        end = req.offset + req.length
        mode = req.mode
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise FuseError(errno.EOPNOTSUPP)
        if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
            raise FuseError(errno.EOPNOTSUPP)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            stop = min(end, len(node.data))
            if stop > req.offset:
                node.data[req.offset:stop] = bytes(stop - req.offset)
        if not mode & FALLOC_FL_KEEP_SIZE and end > len(node.data):
            self._size(node, end)
        self._touch(node)

    def lseek(self, req: rq.LseekIn) -> int:
        node = self.inodes[self.handles[req.fh]]
        if req.offset >= node.attr.size or req.whence not in (SEEK_DATA, SEEK_HOLE):
            raise FuseError(errno.ENXIO)
        return req.offset if req.whence == SEEK_DATA else node.attr.size

    def copy_file_range(self, req: rq.CopyFileRangeIn) -> int:
        src = self.inodes[self.handles[req.fh_in]]
        dst = self.inodes[self.handles[req.fh_out]]
        chunk = bytes(src.data[req.off_in:req.off_in + req.len])
        end = req.off_out + len(chunk)
        if end > len(dst.data):
            self._size(dst, end)
        dst.data[req.off_out:end] = chunk
        self._touch(dst)
        return len(chunk)

    # --- directories ----------------------------------------------------------------------
    def opendir(self, req: rq.OpenIn) -> OpenOut:
        self._dir(req.nodeid)
        return OpenOut(0, 0)

    def _listing(self, ino: int) -> list[tuple[bytes, int]]:
        node = self._dir(ino)
        return [(b".", ino), (b"..", ino), *node.entries.items()]

    def readdir(self, req: rq.ReadIn) -> DirBuffer:
        self.ops["readdir"] += 1
        buf = DirBuffer(req.size)
        for i, (name, ino) in enumerate(self._listing(req.nodeid)[req.offset:], req.offset + 1):
            if not buf.add(name, ino, self.inodes[ino].attr.mode, i):
                break
        return buf

    def readdirplus(self, req: rq.ReadIn) -> DirPlusBuffer:
        self.ops["readdirplus"] += 1
        buf = DirPlusBuffer(req.size)
        for i, (name, ino) in enumerate(self._listing(req.nodeid)[req.offset:], req.offset + 1):
            node = self.inodes[ino]
            if name in (b".", b".."):
                entry = EntryOut(0, node.attr, 0, 0)  # no lookup is counted for dots
            else:
                entry = EntryOut(ino, node.attr, self.entry_timeout, self.attr_timeout)
            if not buf.add(name, entry, i):
                break
            if entry.nodeid:
                node.lookups += 1
        return buf

    # --- xattrs ---------------------------------------------------------------------------
    def setxattr(self, req: rq.SetxattrIn) -> None:
        node = self._get(req.nodeid)
        if req.flags & XATTR_CREATE and req.name in node.xattrs:
            raise FuseError(errno.EEXIST)
        if req.flags & XATTR_REPLACE and req.name not in node.xattrs:
            raise FuseError(errno.ENODATA)
        node.xattrs[req.name] = bytes(req.value)
        self._touch(node, ctime_only=True)

    def getxattr(self, req: rq.GetxattrIn) -> bytes:
        try:
            return self._get(req.nodeid).xattrs[req.name]
        except KeyError:
            raise FuseError(errno.ENODATA) from None

    def listxattr(self, req: rq.ListxattrIn) -> list[bytes]:
        return list(self._get(req.nodeid).xattrs)

    def removexattr(self, req: rq.NameIn) -> None:
        node = self._get(req.nodeid)
        if node.xattrs.pop(req.name, None) is None:
            raise FuseError(errno.ENODATA)


def control(fs: MemoryFS, session: Session) -> None:
    """Answer commands on stdin (see the module docstring)."""
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        out: dict[str, object] = {"ok": True}
        if cmd == "stats":
            out.update(interrupts=fs.interrupts, ops=dict(fs.ops),
                       flags=session.conn.flags if session.conn else 0,
                       inodes=len(fs.inodes))
        elif cmd == "hide":
            out["ok"] = fs.inodes[abi.ROOT_ID].entries.pop(arg.encode(), None) is not None
        elif cmd == "inval":
            out["ok"] = session.notify_inval_entry(abi.ROOT_ID, arg.encode())
        elif cmd == "delete":
            root = fs.inodes[abi.ROOT_ID]
            ino = root.entries.pop(arg.encode())
            out["ok"] = session.notify_delete(abi.ROOT_ID, ino, arg.encode())
        elif cmd == "chmod":
            name, mode = arg.split()
            node = fs.inodes[fs.inodes[abi.ROOT_ID].entries[name.encode()]]
            node.attr.mode = stat.S_IFMT(node.attr.mode) | int(mode, 8)
        elif cmd == "inval-inode":
            ino = fs.inodes[abi.ROOT_ID].entries[arg.encode()]
            out["ok"] = session.notify_inval_inode(ino, -1, 0)
        elif cmd == "reset":
            fs.ops.clear()
        elif cmd == "populate":
            root = fs.inodes[abi.ROOT_ID]
            for i in range(int(arg)):
                node = fs._new(stat.S_IFREG | 0o644, os.getuid(), os.getgid())
                node.data[:] = b"%d\n" % i
                node.attr.size = len(node.data)
                root.entries[b"f%05d" % i] = node.attr.ino
        else:
            out = {"ok": False, "error": "unknown command"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mountpoint")
    p.add_argument("--entry-timeout", type=float, default=1.0)
    p.add_argument("--attr-timeout", type=float, default=1.0)
    p.add_argument("--writeback", action="store_true")
    p.add_argument("--allow-other", action="store_true")
    p.add_argument("--no-readdirplus", action="store_true")
    p.add_argument("--no-dio-mmap", action="store_true")
    p.add_argument("--user", help="serve as this user (mounts through fusermount3)")
    p.add_argument("--fsname", default="memfs", help="the mount's source field")
    p.add_argument("--subtype", default="memfs", help="fuse.SUBTYPE as the mount's type")
    args = p.parse_args()
    if args.user:
        import pwd
        pw = pwd.getpwnam(args.user)
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    fs = MemoryFS(entry_timeout=args.entry_timeout, attr_timeout=args.attr_timeout)
    opts = InitOptions(writeback_cache=args.writeback,
                       readdirplus="off" if args.no_readdirplus else "auto",
                       direct_io_allow_mmap=not args.no_dio_mmap)
    session = Session(fs, args.mountpoint, opts, fsname=args.fsname, subtype=args.subtype,
                      allow_other=args.allow_other, default_permissions=True)
    fs.session = session
    session.mount()
    session.install_signal_handlers()
    threading.Thread(target=control, args=(fs, session), daemon=True).start()
    try:
        session.serve()
    finally:
        session.close()
        session.unmount()


if __name__ == "__main__":
    main()
