"""The request handlers of one volume, composed from one mixin per concern.
"""

from __future__ import annotations

from cryptfs.fs.access import Access
from cryptfs.fs.attrs import Attributes
from cryptfs.fs.audit_hooks import AuditHooks
from cryptfs.fs.content_io import ContentIO
from cryptfs.fs.dirs import Directories
from cryptfs.fs.filekeys import FileKeys
from cryptfs.fs.gate import Gate
from cryptfs.fs.masked import MaskedViews
from cryptfs.fs.rotation import Rotation
from cryptfs.fs.xattrs import Xattrs


class CryptOperations(Directories, ContentIO, Attributes, Xattrs, MaskedViews, FileKeys, Access,
                      Rotation, Gate, AuditHooks):
    """The filesystem of one volume.

    Given an unlocked :class:`Volume` it serves everyone the kernel lets in
    (the mount's options and file permissions decide).  Given a
    :class:`LockedVolume` it runs *gated* (agent mode): it serves a request
    only if the requesting uid is unlocked in the key agent, and holds the
    volume's keys only while someone is; the agent link (cryptfs.keyagent.link)
    drives it through the ``agent_*`` methods.  Gated, it also keeps no
    plaintext in the kernel's caches: entries and attributes time out at once
    and file handles use direct I/O, so every lookup, stat, read and write
    reaches the daemon and its check.
    """
