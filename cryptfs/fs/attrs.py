"""Attributes: getattr, setattr (truncate, chmod, chown, times), statfs, and the
entries the kernel caches.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Any

from cryptfs import sysio
from cryptfs.content import plain_size
from cryptfs.fs import shared
from cryptfs.fs.audit_hooks import _edge
from cryptfs.fs.core import (
    ROOT,
    ROOT_ATTR_TIMEOUT,
    Core,
)
from cryptfs.fs.inodes import Inode, PlainHandle
from cryptfs.fuse import EntryOut, FuseError, StatfsOut
from cryptfs.fuse.replies import Attr
from cryptfs.fuse.requests import Request
from cryptfs.modes import IntegrityError
from cryptfs.names import (
    NAME_MAX,
)
from cryptfs.tree import proc_path

log = logging.getLogger("cryptfs")


class Attributes(Core):
    """Attributes (see the module)."""

    # -- attributes ------------------------------------------------------------------------
    def _attr(self, inode: Inode, st: os.stat_result) -> EntryOut:
        attr = Attr(inode.ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
                    self._plain_size(inode, st), st.st_blocks, st.st_atime_ns, st.st_mtime_ns,
                    st.st_ctime_ns, st.st_rdev, 65536)
        # The mount's root is stat'able by everyone even when gated (it tells
        # nothing), so its attributes may stay cached: one request less on
        # every path walk, which checks the root's permissions first.
        return EntryOut(inode.ino, attr, self.timeout,
                        ROOT_ATTR_TIMEOUT if inode.ino == ROOT and not self.shared_storage
                        else self.attr_timeout)

    def _plain_size(self, inode: Inode, st: os.stat_result) -> int:
        if inode.kind == stat.S_IFREG:
            if inode.content is not None:
                return inode.content.size
            try:
                if inode.meta is None or self.shared_storage:  # (another server may rotate it)
                    mode, h_len = self._layout(inode)
                    inode.meta = (mode.overhead, h_len)
                return plain_size(st.st_size, inode.meta[1], inode.meta[0])
            except (IntegrityError, OSError):
                # Shown with size 0 so it can still be listed and removed;
                # opening it fails with EIO (and logs).
                return 0
        if inode.kind == stat.S_IFLNK:
            try:
                return len(self._target(inode))
            except (IntegrityError, OSError):
                return 0
        return st.st_size

    def _target(self, inode: Inode) -> bytes:
        if inode.meta is None:
            inode.meta = self.codec.open_target(os.readlink("", dir_fd=inode.fd))
        return inode.meta  # type: ignore[no-any-return]

    def _negative(self) -> EntryOut:
        return EntryOut(0, Attr(), self.timeout, 0.0)

    @_edge("inode")
    def getattr(self, inode_no: int, ctx: Request
                      ) -> EntryOut:
        if inode_no != ROOT:
            self._allow(ctx.uid)
        inode = self._inode(inode_no)
        return self._attr(inode, os.fstat(inode.fd))

    @_edge("inode", "setattr")
    def setattr(self, inode_no: int, attr: Any, fields: Any, fh: int | None,
                ctx: Request) -> EntryOut:
        self._allow(ctx.uid)
        inode = self._inode(inode_no)
        if fields.update_size:
            self._refresh_config()
            if inode.kind != stat.S_IFREG:
                raise FuseError(errno.EINVAL)
            handle = self._files.get(fh) if fh is not None else None
            self._decide_truncate(ctx, inode, own_handle=handle is not None)
            if handle is not None and not isinstance(handle, PlainHandle):
                raise FuseError(errno.EACCES)  # (a view never cuts the file)
            try:
                # (an open handle's own truncate needs no new check: drop boxes)
                uid = None if handle is not None else ctx.uid
                content = self._content(inode, want_write=True, uid=uid)
                self._changed_by(inode.handles, ctx.uid)
                content.truncate(attr.st_size)
                if self.shared_storage:  # (a truncate(2) has no close of its own)
                    shared.commit(inode.fd)
            finally:
                self._unload_content(inode)
        if fields.update_mode and inode.kind != stat.S_IFLNK:
            os.chmod(proc_path(inode.fd), stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            sysio.fchown_empty(inode.fd, attr.st_uid if fields.update_uid else -1,
                               attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            before = (os.fstat(inode.fd) if inode.kind == stat.S_IFREG
                      and (self._mask_rules or self._program_rules) else None)
            sysio.utimens_empty(
                inode.fd,
                attr.st_atime_ns if fields.update_atime else None,
                attr.st_mtime_ns if fields.update_mtime else None,
            )
            if before is not None and before.st_nlink > 1:
                after = os.fstat(inode.fd)
                self._names.restamp(before, after, self.policy, self._epoch)
                return self._attr(inode, after)
        return self._attr(inode, os.fstat(inode.fd))

    @_edge("none")
    def statfs(self, ctx: Request) -> StatfsOut:
        sv = os.statvfs(self.vol.tree)
        return StatfsOut(sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree,
                         sv.f_bsize, NAME_MAX, sv.f_frsize)
