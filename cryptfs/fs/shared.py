"""What a mount needs when other servers' mounts share its backing directory.

Most of the shared-storage rule is a matter of caching nothing (cryptfs.fs.core,
docs/MULTISERVER.md).  Two things more live here: the commit that makes a
close on this server visible to the next open on another (:func:`commit`),
and the one check that a race with another server adds (:func:`check_open`).
"""

from __future__ import annotations

import errno
import os
import stat

from cryptfs.fuse import FuseError


def commit(fd: int) -> None:
    """Make what was written through ``fd`` visible to the backing filesystem's
    other clients, as closing a file does (close-to-open): a close(2) of a
    duplicate sends the backing filesystem its flush (FUSE FLUSH on JuiceFS,
    a write-back on NFS) while ``fd`` stays open for this inode."""
    os.close(os.dup(fd))


def check_open(st: os.stat_result, uid: int, gid: int, flags: int) -> None:
    """EACCES unless ``uid``/``gid`` may open the file ``st`` for ``flags`` by its
    mode bits (root may).  The request carries no supplementary groups, so a
    group that only they would grant is refused: this fails closed."""
    if uid == 0:
        return
    acc = flags & os.O_ACCMODE
    want = 0
    if acc in (os.O_RDONLY, os.O_RDWR):
        want |= 4
    if acc in (os.O_WRONLY, os.O_RDWR) or flags & os.O_TRUNC:
        want |= 2
    mode = stat.S_IMODE(st.st_mode)
    if uid == st.st_uid:
        have = mode >> 6
    elif gid == st.st_gid:
        have = mode >> 3
    else:
        have = mode
    if want & ~have & 0o7:
        raise FuseError(errno.EACCES)
