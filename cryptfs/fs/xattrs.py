"""Extended attributes: user xattrs encrypted by name and value, and the
control channel (AUDIT_XATTR, ROTATE_XATTR, SHARE_XATTR, RECIPIENTS_XATTR).
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from cryptfs.control import AUDIT_XATTR, RECIPIENTS_XATTR, ROTATE_XATTR, SHARE_XATTR
from cryptfs.fs.audit_hooks import _edge
from cryptfs.fs.core import (
    ROOT,
    Core,
)
from cryptfs.fs.inodes import Inode
from cryptfs.fuse import FuseError
from cryptfs.fuse.requests import Request
from cryptfs.modes import IntegrityError
from cryptfs.names import (
    XATTR_BACKING_PREFIX,
    XATTR_NAME_MAX_PLAIN,
    XATTR_PREFIX,
    XATTR_VALUE_MAX_PLAIN,
)
from cryptfs.tree import proc_path

log = logging.getLogger("cryptfs")


class Xattrs(Core):
    """Extended attributes (see the module)."""

    # -- extended attributes ------------------------------------------------------------------------
    def _xattr_target(self, inode: Inode, name: bytes) -> tuple[str, str]:
        if not name.startswith(XATTR_PREFIX):
            raise FuseError(errno.EOPNOTSUPP)  # only user.* is stored (encrypted)
        if inode.kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise FuseError(errno.ENODATA)
        if len(name) > XATTR_NAME_MAX_PLAIN:
            raise FuseError(errno.ERANGE)  # its backing name would pass Linux's 255 bytes
        return proc_path(inode.fd), self.codec.xattr_name(name)

    @_edge("inode", "setxattr")
    def setxattr(self, inode_no: int, name: bytes, value: bytes,
                       ctx: Request) -> None:
        if inode_no == ROOT and name == ROTATE_XATTR and self._may_rotate(ctx.uid):
            self._rotation_request(ctx.uid, value)
            return
        if inode_no == ROOT and name == AUDIT_XATTR:
            self._command_record(ctx, value)
            return
        self._allow(ctx.uid)
        self._plain(ctx.uid)
        inode = self._inode(inode_no)
        if inode.kind not in (stat.S_IFREG, stat.S_IFDIR) and name.startswith(XATTR_PREFIX):
            raise FuseError(errno.EPERM)  # as Linux: no user.* xattrs on special files
        if name == SHARE_XATTR and inode.kind == stat.S_IFREG:
            self._share(inode, ctx.uid, value)
            return
        path, c_name = self._xattr_target(inode, name)
        if len(value) > XATTR_VALUE_MAX_PLAIN:
            raise FuseError(errno.E2BIG)  # sealed, it would pass Linux's 64 KiB
        os.setxattr(path, c_name, self.codec.seal_xattr(c_name, value))

    @_edge("inode")
    def getxattr(self, inode_no: int, name: bytes, ctx: Request) -> bytes:
        if inode_no == ROOT and name == ROTATE_XATTR and self._may_rotate(ctx.uid):
            return self._rotation_progress()
        self._allow(ctx.uid)
        self._plain(ctx.uid)
        inode = self._inode(inode_no)
        if not name.startswith(XATTR_PREFIX):
            raise FuseError(errno.ENODATA)
        if name == RECIPIENTS_XATTR and inode.kind == stat.S_IFREG:
            return self._recipients(inode)
        path, c_name = self._xattr_target(inode, name)
        try:
            sealed = os.getxattr(path, c_name)
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise FuseError(errno.ENODATA) from None
            raise
        return self.codec.open_xattr(c_name, sealed)

    @_edge("inode")
    def listxattr(self, inode_no: int, ctx: Request) -> list[bytes]:
        self._allow(ctx.uid)
        self._plain(ctx.uid)  # (decrypted names: as getxattr, not for ciphertext-only roles)
        inode = self._inode(inode_no)
        if inode.kind not in (stat.S_IFREG, stat.S_IFDIR):
            return []
        out = []
        for c_name in os.listxattr(proc_path(inode.fd)):
            if c_name.startswith(XATTR_BACKING_PREFIX):
                try:
                    out.append(self.codec.xattr_name_decrypt(c_name))
                except IntegrityError:
                    log.warning("inode %d: an xattr name that does not decrypt is hidden",
                                inode.ino)
        return out

    @_edge("inode", "removexattr")
    def removexattr(self, inode_no: int, name: bytes, ctx: Request) -> None:
        self._allow(ctx.uid)
        self._plain(ctx.uid)
        inode = self._inode(inode_no)
        path, c_name = self._xattr_target(inode, name)
        try:
            os.removexattr(path, c_name)
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise FuseError(errno.ENODATA) from None
            raise
