"""The request handlers of one volume, on cryptfs.fuse's typed replies.

Design (as passthrough_ll and gocryptfs do it): every inode the kernel knows
holds a descriptor of its backing object, so renames, hard links and
unlinked-but-open files need no path bookkeeping.  For a regular file it is a
read-write descriptor where the daemon may have one (read-only, or O_PATH,
where it may not), so opening, reading the header and writing need no further
open(2); for everything else it is an O_PATH descriptor.  FUSE inode numbers
are the backing inode numbers (the root is swapped with inode 1).  While any
handle of a regular file is open, one :class:`ContentFile` per inode (header
checked at the first open) serves all handles.

Handlers are synchronous: each runs to completion on the trio thread (the
request loop is a trio task, cryptfs.frontend), so no locks are needed.  The
one exception is an open that needs a large masked view (cryptfs.views):
``open`` returns the :class:`views.Wanted` view, and :meth:`open_view`, run as
a trio task with a deferred reply, awaits the view made in a thread, then
decides the open again from the start, so nothing it checked before the
await is trusted after it.  Only ``FuseError`` leaves a handler; see
:func:`_edge`.  Arguments are positional as the kernel's requests carry them;
``ctx`` is the typed request (its ``uid``, ``gid``, ``pid``).

The handlers live in cryptfs.fs, one module per concern (inodes, content_io,
dirs, xattrs, access, gate, rotation, masked, filekeys, audit_hooks); this
module is the entry point the frontend, the mount and the tests import.
"""

from cryptfs.fs import ROOT, BlockError, CryptOperations

__all__ = ["CryptOperations", "BlockError", "ROOT"]
