"""The kernel's FUSE protocol, spoken directly over /dev/fuse (modelled on go-fuse's fuse/).

``abi``: fuse.h's structures and constants; ``requests``: typed requests decoded from
bytes; ``replies``: typed replies encoded to bytes; ``session``: INIT, the request loop,
notifications, deferred replies; ``mountpoint``: mount(2) / fusermount3 and unmount.
This package knows the wire format and nothing of what a file is; see docs/FUSE.md.
"""

from cryptfs.fuse.errors import FuseError, MalformedRequest
from cryptfs.fuse.mountpoint import MountError, is_mounted, unmount
from cryptfs.fuse.replies import (
    Attr,
    AttrOut,
    CreateOut,
    DirBuffer,
    DirPlusBuffer,
    EntryOut,
    IoctlOut,
    LkOut,
    OpenOut,
    StatfsOut,
)
from cryptfs.fuse.session import Connection, Deferred, InitOptions, Session

__all__ = ["Attr", "AttrOut", "Connection", "CreateOut", "Deferred", "DirBuffer", "DirPlusBuffer",
           "EntryOut", "FuseError", "InitOptions", "IoctlOut", "LkOut", "MalformedRequest",
           "MountError", "OpenOut", "Session", "StatfsOut", "is_mounted", "unmount"]
