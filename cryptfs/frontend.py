"""The filesystem on cryptfs.fuse: typed requests in, cryptfs's handlers, typed replies out.

cryptfs.fuse's :class:`Session` calls one method per opcode with a typed
request; this module passes it to :class:`cryptfs.ops.CryptOperations` (whose
handlers take the request's fields positionally and the request itself as
``ctx``) and wraps what comes back in the reply the opcode takes.  It holds no
state of its own and decides nothing: plumbing only.

Threading: the session's loop is a trio task (``Session.serve_trio``), so every
handler runs to completion on the trio thread, beside the key-agent link, the
rotation worker and the audit sealer, exactly as under pyfuse3.  The one open
that must wait (a large masked view, cryptfs.views) answers with a deferred
reply that a trio task of the mount's nursery completes.

What the kernel hands over because of the INIT flags chosen here
(:func:`init_options`, docs/FUSE.md):

- ``HANDLE_KILLPRIV_V2``: the kernel no longer clears suid/sgid itself before a
  write (which cost a GETXATTR of ``security.capability`` per write); WRITE,
  SETATTR(size) and OPEN(O_TRUNC) say when to, and :meth:`CryptOperations.kill_suidgid`
  does it after the request succeeded.
- READDIRPLUS always (never plain READDIR): every entry counts as a lookup, as
  ``CryptOperations.readdir`` counts it.
"""

from __future__ import annotations

import errno
import os
import time

import trio

from cryptfs import views
from cryptfs.fuse import (
    AttrOut,
    CreateOut,
    Deferred,
    DirPlusBuffer,
    EntryOut,
    FuseError,
    InitOptions,
    OpenOut,
    Session,
    StatfsOut,
    abi,
)
from cryptfs.fuse import requests as rq
from cryptfs.ops import CryptOperations

_NOW = abi.FATTR_ATIME_NOW | abi.FATTR_MTIME_NOW


def init_options(ops: CryptOperations) -> InitOptions:
    """What this mount asks of the kernel at INIT (docs/FUSE.md says why each)."""
    return InitOptions(
        # Not gated: the kernel may merge writes (as under pyfuse3).  Gated: every
        # write reaches the daemon and its check at once.  Shared storage: the
        # kernel would keep the size its own and ignore the other server's.
        writeback_cache=ops.enable_writeback_cache,
        # Gated: a cached target would be served to a user who has since locked.
        # Shared storage: another server may reuse the inode for another link.
        cache_symlinks=not (ops.gated or ops.shared_storage),
        readdirplus="always",
        # Off everywhere: MAP_SHARED on a direct-I/O (gated, view, ciphertext)
        # handle would write back through whichever writable handle of the inode
        # the kernel picks, so ownreads and the access log would name the wrong
        # user (docs/FUSE.md).
        direct_io_allow_mmap=False,
    )


class SetattrFields:
    """Which attributes a SETATTR changes (the names the handler reads)."""

    __slots__ = ("update_size", "update_mode", "update_uid", "update_gid", "update_atime",
                 "update_mtime", "update_ctime")

    def __init__(self, valid: int) -> None:
        self.update_size = bool(valid & abi.FATTR_SIZE)
        self.update_mode = bool(valid & abi.FATTR_MODE)
        self.update_uid = bool(valid & abi.FATTR_UID)
        self.update_gid = bool(valid & abi.FATTR_GID)
        self.update_atime = bool(valid & (abi.FATTR_ATIME | abi.FATTR_ATIME_NOW))
        self.update_mtime = bool(valid & (abi.FATTR_MTIME | abi.FATTR_MTIME_NOW))
        self.update_ctime = bool(valid & abi.FATTR_CTIME)


class NewAttributes:
    """The values a SETATTR sets (``*_NOW`` times resolved to the daemon's clock)."""

    __slots__ = ("st_size", "st_mode", "st_uid", "st_gid", "st_atime_ns", "st_mtime_ns")

    def __init__(self, req: rq.SetattrIn) -> None:
        self.st_size = req.size
        self.st_mode = req.mode
        self.st_uid = req.uid_
        self.st_gid = req.gid_
        now = time.time_ns() if req.valid & _NOW else 0
        self.st_atime_ns = (now if req.valid & abi.FATTR_ATIME_NOW
                            else req.atime * 1_000_000_000 + req.atimensec)
        self.st_mtime_ns = (now if req.valid & abi.FATTR_MTIME_NOW
                            else req.mtime * 1_000_000_000 + req.mtimensec)


def _attr_out(e: EntryOut) -> AttrOut:
    return AttrOut(e.attr, e.attr_timeout)


class Frontend:
    """The object a cryptfs.fuse Session serves: one method per opcode."""

    def __init__(self, ops: CryptOperations) -> None:
        self.ops = ops
        self.session: Session | None = None
        self.nursery: trio.Nursery | None = None  # where a deferred open finishes

    def attach(self, session: Session, nursery: trio.Nursery) -> None:
        self.session = session
        self.nursery = nursery
        self.ops.invalidate_inode = session.notify_inval_inode
        self.ops.shedder.invalidate_entry = session.notify_inval_entry
        self.ops.shedder.prune = session.notify_prune

    # -- names and attributes -------------------------------------------------------------
    def lookup(self, req: rq.NameIn) -> EntryOut:
        return self.ops.lookup(req.nodeid, req.name, req)

    def forget(self, req: rq.ForgetIn) -> None:
        self.ops.forget([(req.nodeid, req.nlookup)])

    def batch_forget(self, req: rq.BatchForgetIn) -> None:
        self.ops.forget(req.forgets)

    def getattr(self, req: rq.GetattrIn) -> AttrOut:
        return _attr_out(self.ops.getattr(req.nodeid, req))

    def setattr(self, req: rq.SetattrIn) -> AttrOut:
        fh = req.fh if req.valid & abi.FATTR_FH else None
        entry = self.ops.setattr(req.nodeid, NewAttributes(req), SetattrFields(req.valid), fh, req)
        if req.valid & abi.FATTR_KILL_SUIDGID and req.valid & abi.FATTR_SIZE:
            self.ops.kill_suidgid(req.nodeid)
            entry = self.ops.getattr(req.nodeid, req)
        return _attr_out(entry)

    def readlink(self, req: rq.EmptyIn) -> bytes:
        return self.ops.readlink(req.nodeid, req)

    def statfs(self, req: rq.EmptyIn) -> StatfsOut:
        return self.ops.statfs(req)

    # -- entries ---------------------------------------------------------------------------
    def mknod(self, req: rq.MknodIn) -> EntryOut:
        return self.ops.mknod(req.nodeid, req.name, req.mode, req.rdev, req)

    def mkdir(self, req: rq.MkdirIn) -> EntryOut:
        return self.ops.mkdir(req.nodeid, req.name, req.mode, req)

    def symlink(self, req: rq.SymlinkIn) -> EntryOut:
        return self.ops.symlink(req.nodeid, req.name, req.target, req)

    def link(self, req: rq.LinkIn) -> EntryOut:
        return self.ops.link(req.oldnodeid, req.nodeid, req.newname, req)

    def unlink(self, req: rq.NameIn) -> None:
        self.ops.unlink(req.nodeid, req.name, req)

    def rmdir(self, req: rq.NameIn) -> None:
        self.ops.rmdir(req.nodeid, req.name, req)

    def rename(self, req: rq.RenameIn) -> None:
        self.ops.rename(req.nodeid, req.name, req.newdir, req.newname, req.flags, req)

    rename2 = rename

    # -- files -----------------------------------------------------------------------------
    def create(self, req: rq.CreateIn) -> CreateOut:
        fi, entry = self.ops.create(req.nodeid, req.name, req.mode, req.flags, req)
        return CreateOut(entry, fi)

    def open(self, req: rq.OpenIn) -> OpenOut | Deferred:
        fi = self.ops.open(req.nodeid, req.flags, req)
        if fi.__class__ is views.Wanted:
            return self._open_later(req, fi)
        if req.open_flags & abi.OPEN_KILL_SUIDGID and req.flags & os.O_TRUNC:
            self.ops.kill_suidgid(req.nodeid)
        return fi  # type: ignore[return-value]

    def _open_later(self, req: rq.OpenIn, wanted: views.Wanted) -> Deferred:
        assert self.session is not None and self.nursery is not None
        later = self.session.defer(req)
        cancel = trio.CancelScope()
        # INTERRUPT (the opener was killed; called on this thread, by the loop):
        # stop waiting; the view's thread finishes on its own, what it made is dropped.
        later.on_interrupt(cancel.cancel)

        async def finish() -> None:
            with cancel:
                try:
                    later.reply(await self.ops.open_view(req.nodeid, req.flags, wanted, req))
                except FuseError as e:
                    later.fail(e.errno)
                return
            later.fail(errno.EINTR)

        self.nursery.start_soon(finish)
        return later

    def read(self, req: rq.ReadIn) -> bytes:
        return self.ops.read(req.fh, req.offset, req.size)

    def write(self, req: rq.WriteIn) -> int:
        n = self.ops.write(req.fh, req.offset, req.data)
        if req.write_flags & abi.WRITE_KILL_SUIDGID:
            self.ops.kill_suidgid(req.nodeid)
        return n

    def flush(self, req: rq.FlushIn) -> None:
        self.ops.flush(req.fh)

    def fsync(self, req: rq.FsyncIn) -> None:
        self.ops.fsync(req.fh, bool(req.fsync_flags & abi.FSYNC_FDATASYNC))

    def release(self, req: rq.ReleaseIn) -> None:
        self.ops.release(req.fh)

    def fallocate(self, req: rq.FallocateIn) -> None:
        self.ops.fallocate(req.fh, req.offset, req.length, req.mode)

    # -- directories -------------------------------------------------------------------------
    def opendir(self, req: rq.OpenIn) -> OpenOut:
        return OpenOut(self.ops.opendir(req.nodeid, req), 0)

    def readdirplus(self, req: rq.ReadIn) -> DirPlusBuffer:
        buf = DirPlusBuffer(req.size)
        self.ops.readdir(req.fh, req.offset, buf.add)
        return buf

    def releasedir(self, req: rq.ReleaseIn) -> None:
        self.ops.releasedir(req.fh)

    def fsyncdir(self, req: rq.FsyncIn) -> None:
        self.ops.fsyncdir(req.fh, bool(req.fsync_flags & abi.FSYNC_FDATASYNC))

    # -- extended attributes -------------------------------------------------------------------
    def setxattr(self, req: rq.SetxattrIn) -> None:
        value = bytes(req.value)  # (a view of the read buffer; getxattr below may not reuse it)
        if req.flags & (os.XATTR_CREATE | os.XATTR_REPLACE):
            # As pyfuse3 did: XATTR_CREATE fails if the attribute exists,
            # XATTR_REPLACE if it does not (getxattr's checks and errors).
            try:
                self.ops.getxattr(req.nodeid, req.name, req)
            except FuseError as e:
                if e.errno != errno.ENODATA or req.flags & os.XATTR_REPLACE:
                    raise
            else:
                if req.flags & os.XATTR_CREATE:
                    raise FuseError(errno.EEXIST)
        self.ops.setxattr(req.nodeid, req.name, value, req)

    def getxattr(self, req: rq.GetxattrIn) -> bytes:
        return self.ops.getxattr(req.nodeid, req.name, req)

    def listxattr(self, req: rq.ListxattrIn) -> list[bytes]:
        return self.ops.listxattr(req.nodeid, req)

    def removexattr(self, req: rq.NameIn) -> None:
        self.ops.removexattr(req.nodeid, req.name, req)

