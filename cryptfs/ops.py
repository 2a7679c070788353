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
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hmac
import inspect
import json
import logging
import os
import posixpath
import stat
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import trio

from cryptfs import links, ownreads, rotate, sysio, tree, views
from cryptfs.audit import Auditor
from cryptfs.config import CONFIG_NAME, load_config, user_authority
from cryptfs.content import BlockError, ContentFile, plain_size, pwrite_all, read_stanzas
from cryptfs.control import AUDIT_XATTR, RECIPIENTS_XATTR, ROTATE_XATTR, SHARE_XATTR, parse_command_record
from cryptfs.errors import CryptfsError, NotAVolume
from cryptfs.fuse import EntryOut, FuseError, OpenOut, StatfsOut
from cryptfs.fuse.abi import FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE, ROOT_ID
from cryptfs.fuse.replies import Attr
from cryptfs.fuse.requests import Request
from cryptfs.header import AGENT_ROWS_XATTR, LAYOUT_XATTR, layout_hint, parse_layout_hint, peek
from cryptfs.keys import VolumeKeys
from cryptfs.masking import NotStructured
from cryptfs.modes import IntegrityError, content_mode_by_name
from cryptfs.modes.content import ContentMode
from cryptfs.modes.errors import NotARecipient
from cryptfs.modes.wrap import (
    STANZA_PADDING,
    STANZA_SYMMETRIC,
    X25519_BODY_LEN,
    Keyring,
    RecipientWrapper,
    SymmetricWrapper,
    padding,
    recipient_tag,
    recipient_tags,
    x25519_stanza,
)
from cryptfs.names import (
    MAX_SYMLINK_TARGET,
    NAME_MAX,
    XATTR_BACKING_PREFIX,
    XATTR_NAME_MAX_PLAIN,
    XATTR_PREFIX,
    XATTR_VALUE_MAX_PLAIN,
    NameCodec,
)
from cryptfs.policy import MaskRule, Policy, Rule, load_policy
from cryptfs.programs import Identifier
from cryptfs.roles import claim_refusal, slot_role
from cryptfs.secret import Secret
from cryptfs.tree import O_PATH_FLAGS, proc_path
from cryptfs.users import (
    CIPHERTEXT_ROLES,
    LOG_ONLY_ROLES,
    MASKED_ROLES,
    slot_for_uid,
)
from cryptfs.volume import LockedVolume, Volume

log = logging.getLogger("cryptfs")

ROOT = ROOT_ID
ROOT_ATTR_TIMEOUT = 60.0  # seconds
HYBRID_SPARE = 4  # recipients a hybrid file has room to be shared with later
MAX_MASKED = 64 << 20  # a structured file larger than this gets no masked view (memory)
# Rows an agent writes into a file show it their tokens under that file's key.
NO_ORACLE_WRITES = ("masked view: no writes into a file with token columns "
                    "(they would be a token oracle)")
GATED_ATTR_TIMEOUT = 0.001  # seconds: one kernel clock tick (1-4 ms)
_F = TypeVar("_F", bound=Callable[..., Any])


class Inode:
    """What the filesystem holds for one inode the kernel has looked up."""

    __slots__ = ("ino", "fd", "access", "kind", "nlookup", "handles", "diriv", "meta", "content",
                 "viewed", "agent_rows")

    def __init__(self, ino: int, fd: int, kind: int, access: int = os.O_PATH) -> None:
        self.ino = ino
        self.fd = fd  # descriptor of the backing object
        self.access = access  # how fd was opened: O_RDWR, O_RDONLY or O_PATH
        self.kind = kind  # stat.S_IFMT bits
        self.nlookup = 0
        self.handles: set[_Handle] = set()  # its open file handles
        self.diriv: bytes | None = None  # directories
        self.meta: Any = None  # regular: (block overhead, header length); symlink: target
        self.content: ContentFile | None = None  # regular files while open
        self.viewed = False  # a masked or encrypted view was served: its pages may be cached
        self.agent_rows = False  # marked (AGENT_ROWS_XATTR) as written by a masked role


class _Handle:
    """An open regular file: its inode, who opened it, and whether for reading
    (only a readable handle can be mapped to read, which matters when gated)."""

    __slots__ = ("inode", "uid", "readable", "pid", "exe", "path", "opened", "nread", "nwritten",
                 "raw", "view", "policy", "own_only", "foreign")

    def __init__(self, inode: Inode, uid: int, readable: bool, pid: int = 0, path: str = "") -> None:
        self.inode = inode
        self.uid = uid
        self.readable = readable
        self.pid = pid  # (for the access log: who opened it, as what path, bytes moved)
        self.exe = ""
        self.path = path
        self.opened = 0
        self.nread = 0
        self.nwritten = 0
        self.raw = -1  # a read-only fd of the backing file: a ciphertext view (trusted programs)
        self.view: bytes | None = None  # a masked view (roles that see masked data)
        self.policy: Any = None  # the policy (and roles) it was opened under
        self.own_only = False  # plaintext of a masked role: reads only its own (ownreads)
        self.foreign = False  # someone else changed the file's plaintext since it was opened


class _Dir:
    __slots__ = ("inode", "entries", "uid")

    def __init__(self, inode: Inode, uid: int) -> None:
        self.inode = inode
        self.uid = uid  # who opened it
        self.entries: list[tuple[bytes, str | None]] | None = None


class _NoKeys:
    """Stands in for the name codec and key wrapper while the volume is locked
    (agent mode, nobody unlocked): any use fails closed.  The access checks
    deny such requests first; this is the second line."""

    def __getattr__(self, name: str) -> Any:
        raise FuseError(errno.EACCES)


_NO_KEYS: Any = _NoKeys()


def _edge(target: str, event: str | None = None) -> Callable[[_F], _F]:
    """Turn every failure of a handler into a FUSEError (and a log line).

    ``target`` says what the handler's first argument is ("inode", "fh",
    "dir" or "none"), so an integrity failure can name the inode.  With an
    access log, ``event`` names the record a handler's outcome makes (every
    handler's denials are recorded too); a record that cannot be written
    fails the request (fail closed).
    """

    def deco(fn: _F) -> _F:
        name = fn.__name__
        unchecked = name in ("forget", "release", "releasedir", "statfs", "getattr")

        def failed(self: CryptOperations, args: tuple[Any, ...], e: Exception) -> FuseError:
            audit = self.audit
            if isinstance(e, FuseError):
                if audit is not None:
                    self._audit_failure(event, name, args, e.errno)
                return e
            if isinstance(e, IntegrityError):
                self.report_integrity(self.ino_of(target, args), e)
                return FuseError(errno.EIO)
            if isinstance(e, OSError):
                if audit is not None:
                    self._audit_failure(event, name, args, e.errno or errno.EIO)
                return FuseError(e.errno or errno.EIO)
            log.error("internal error in %s (request failed with EIO)", name, exc_info=e)
            return FuseError(errno.EIO)

        def done(self: CryptOperations, args: tuple[Any, ...], result: Any) -> Any:
            # (an open that waits for a masked view is recorded when it is decided)
            if (self.audit is not None and event is not None and result.__class__ is not views.Wanted
                    and not self._audit(event, args, result, None)):
                self._undo(event, result)
                raise FuseError(errno.EACCES)
            return result

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def awaited(self: CryptOperations, *args: Any) -> Any:
                if self.audit is not None and not unchecked and not self.audit.usable():
                    raise FuseError(errno.EACCES)  # no log, no plaintext
                try:
                    result = await fn(self, *args)
                except Exception as e:
                    err = failed(self, args, e)
                    if err is e:
                        raise
                    raise err from None
                return done(self, args, result)

            return awaited  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapped(self: CryptOperations, *args: Any) -> Any:
            if self.audit is not None and not unchecked and not self.audit.usable():
                raise FuseError(errno.EACCES)  # no log, no plaintext
            try:
                result = fn(self, *args)
            except Exception as e:
                err = failed(self, args, e)
                if err is e:
                    raise
                raise err from None
            return done(self, args, result)

        return wrapped  # type: ignore[return-value]

    return deco


def _same_key(a: bytes | None, b: bytes | None) -> bool:
    """Whether two token keys (None: no tokens) are the same, in constant time."""
    if a is None or b is None:
        return a is b
    return hmac.compare_digest(a, b)


def _ctx(args: tuple[Any, ...]) -> Any:
    return args[-1] if args and isinstance(args[-1], Request) else None


class CryptOperations:
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

    enable_writeback_cache = True

    def __init__(self, vol: Volume | LockedVolume, *, timeout: float = 60.0) -> None:
        self.vol = vol
        self.config = vol.config
        self.gated = vol.keys is None
        self.keys: VolumeKeys | None = None
        self.codec: NameCodec = _NO_KEYS
        self.wrapper: SymmetricWrapper = _NO_KEYS
        self.policy = Policy()
        self._program_rules = False  # (whether a rule names programs: checked on each open)
        self._log_only: set[int] = set()  # uids whose role reads the access log only
        self._cipher_only: set[int] = set()  # uids whose role reads ciphertext only
        self._masked: set[int] = set()  # uids whose role sees structured files masked
        self._mask_rules = False  # (whether a rule names masks)
        self._rechecked = 0.0  # when reads last looked at the config
        self._identify = Identifier()  # which program asks (trusted-programs rules)
        self._decision: dict[str, Any] | None = None  # how the last one was decided (for its record)
        # X25519 private keys that open hybrid files: per unlocked uid (gated,
        # from the agent), or the mount's own user's for every request.
        self._privates: dict[int, Secret] = {}
        self._keyrings: dict[int | None, Keyring] = {}  # by uid (gated) or None: see _keyring
        self._own_private: Secret | None = getattr(vol, "private", None)
        self._plain_paths: dict[str, bytes | None] = {}  # backing dir path -> plaintext path
        self._names = links.NamesCache()  # every name of hard-linked files (see _names_of)
        self._epoch = 0  # renames, links and removals made here (they may move names)
        self._backing_fd = os.open(vol.backing, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._config_stamp = self._stat_config()
        self._rotation: rotate.Progress | None = None
        self.audit: Auditor | None = None  # the access log, if the mount keeps one
        self._paths: dict[int, str] = {ROOT: "/"}  # (audit) last known plaintext path by inode
        self._rotation_wanted = trio.Event()
        if vol.keys is not None:
            self._install(vol.keys)
        self._unlocked: set[int] = set()  # gated: uids with a session in the agent
        self._seen: set[int] = set()  # gated: uids served since the last activity report
        self._quarantine_logged: set[tuple[int, int]] = set()
        self.attr_timeout = timeout
        if self.gated:
            # Names are checked on every use (no dentry outlives its reply).
            # Attributes last one clock tick (1 ms asks for the shortest the
            # kernel has): a stat needs no second request right after the
            # lookup that just checked the caller, and a locked user cannot
            # reach a cached attribute without such a lookup.
            timeout = 0.0
            self.attr_timeout = GATED_ATTR_TIMEOUT
            self.enable_writeback_cache = False
        self.timeout = timeout
        self.is_root = os.geteuid() == 0
        self._euid, self._egid = os.geteuid(), os.getegid()
        self._tree_root = os.path.realpath(vol.tree)
        root_fd = os.open(vol.tree, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(root_fd)
        self._root_st_ino = st.st_ino
        self._dev = st.st_dev
        root = Inode(ROOT, root_fd, stat.S_IFDIR)
        root.nlookup = 1
        self._inodes: dict[int, Inode] = {ROOT: root}
        self._files: dict[int, _Handle] = {}
        self._dirs: dict[int, _Dir] = {}
        self._next_fh = 1
        self._layout_hints = True  # until the backing filesystem refuses an xattr
        self._views = views.ViewMaker()  # large masked views: made in threads, bounded
        # Drops an inode's cached attributes and pages in the kernel (from a
        # worker thread: the kernel may wait for a read only the loop answers).
        # Set by the frontend to its session's notify_inval_inode.
        self.invalidate_inode: Callable[[int], object] = lambda ino: None

    # -- bookkeeping ---------------------------------------------------------------------
    def ino_of(self, target: str, args: tuple[Any, ...]) -> int | None:
        if not args:
            return None
        if target == "inode":
            return int(args[0])
        if target == "fh" and args[0] in self._files:
            return self._files[args[0]].inode.ino
        if target == "dir" and args[0] in self._dirs:
            return self._dirs[args[0]].inode.ino
        return None

    def report_integrity(self, ino: int | None, e: IntegrityError) -> None:
        block = getattr(e, "block", None)
        where = "header" if block is None else f"block {block}"
        log.error("integrity failure: inode %s %s: %s", ino, where, e)
        if self.audit is not None:
            self.audit.write("integrity-failure", "error", -1, 0, reason=f"{where}: {e}",
                             path=self._paths.get(ino or -1, "?"), ino=ino)

    # -- the access log ----------------------------------------------------------------------------
    def _name_path(self, parent_ino: int, name: bytes) -> str:
        base = self._paths.get(parent_ino, "?")
        n = name.decode("utf-8", "backslashreplace")
        return ("" if base == "/" else base) + "/" + n

    def _audit(self, event: str, args: tuple[Any, ...], result: Any, err: int | None) -> bool:
        """Write the record of one request (False: it could not be written and
        the request must fail)."""
        assert self.audit is not None
        try:
            return self._record(event, args, result, err)
        except Exception as e:  # (a bug in making the record: still no record, no access)
            log.exception("cannot make the record of %s", event)
            return self.audit._failed(e)

    def _record(self, event: str, args: tuple[Any, ...], result: Any, err: int | None) -> bool:
        assert self.audit is not None
        ctx = _ctx(args)
        if ctx is not None:
            uid, pid = ctx.uid, ctx.pid
        elif event in ("read", "write", "fsync", "flush", "release") and args[0] in self._files:
            opener = self._files[args[0]]  # (requests on a handle come without a context:
            uid, pid = opener.uid, opener.pid  # they are its opener's)
        else:
            uid, pid = -1, 0
        fields: dict[str, Any] = {}
        if event in ("mkdir", "mknod", "create", "symlink", "unlink", "rmdir", "lookup"):
            fields["path"] = self._name_path(args[0], args[1])
            if err is None and event != "unlink" and event != "rmdir":
                attr = result[1] if event == "create" else result
                self._paths[attr.nodeid] = fields["path"]
                if event == "create":
                    self._files[result[0].fh].path = fields["path"]
        elif event == "rename":
            fields["path"] = self._name_path(args[0], args[1])
            fields["new_path"] = self._name_path(args[2], args[3])
        elif event == "link":
            fields["path"] = self._paths.get(args[0], "?")
            fields["new_path"] = self._name_path(args[1], args[2])
        elif event in ("read", "write", "fsync", "flush", "release"):
            handle = self._files.get(args[0])
            fields["path"] = handle.path if handle is not None else "?"
        elif args and isinstance(args[0], int):
            fields["path"] = self._paths.get(args[0], "?")
        if event in ("open", "create") and err is None:
            fi = result[0] if event == "create" else result
            fields["exe"] = self._files[fi.fh].exe  # (read once for the handle)
        if event == "open":
            acc = args[1] & os.O_ACCMODE
            fields["intent"] = ("read" if acc == os.O_RDONLY else "write" if acc == os.O_WRONLY
                                else "read-write") + (",truncate" if args[1] & os.O_TRUNC else "")
        elif event == "setattr":
            f = args[2]
            if not (f.update_size or f.update_mode or f.update_uid or f.update_gid
                    or f.update_atime or f.update_mtime):
                return True  # (the kernel keeping ctime: nothing a user asked for)
            event = ("truncate" if f.update_size else "chmod" if f.update_mode
                     else "chown" if f.update_uid or f.update_gid else "utimes")
            if f.update_size:
                fields["size"] = args[1].st_size
            if f.update_mode:
                fields["mode"] = oct(stat.S_IMODE(args[1].st_mode))
            if event == "utimes":
                if result is not None and result.attr.nlink == 0 and not f.update_atime:
                    return True  # (the kernel writing back the times of a file already deleted)
                fields["times"] = ",".join(n for n, on in (("atime", f.update_atime),
                                                          ("mtime", f.update_mtime),
                                                          ("ctime", f.update_ctime)) if on)
                fields["by_handle"] = args[3] is not None
        elif event in ("setxattr", "removexattr"):
            if args[1] == AUDIT_XATTR and args[0] == ROOT and err in (None, errno.EACCES):
                return True  # (the command's record is the record; a refused one, its refusal)
            fields["name"] = args[1].decode("utf-8", "backslashreplace")
        if err is None:
            outcome = "allowed"
        else:
            outcome = "denied" if err in (errno.EACCES, errno.EPERM) else "error"
            fields["reason"] = errno.errorcode.get(err, str(err))
        if self._decision is not None:
            # (which rule decided, and how the program was known: the open's,
            # create's, rename's or link's; never left for a later record)
            fields.update(self._decision)
            self._decision = None
        return self.audit.write(event, outcome, uid, pid, **fields)

    def _audit_failure(self, event: str | None, name: str, args: tuple[Any, ...], err: int) -> None:
        """A failed request: recorded if it is an audited event, and every denial."""
        if event is not None or err in (errno.EACCES, errno.EPERM):
            self._audit(event or name, args, None, err)

    def _undo(self, event: str, result: Any) -> None:
        """A handle whose open could not be recorded is not handed out."""
        if event in ("open", "create"):
            fi = result[0] if event == "create" else result
            handle = self._files.pop(fi.fh, None)
            if handle is not None:
                handle.inode.handles.discard(handle)
                self._unload_content(handle.inode)

    def _audit_close(self, handle: _Handle) -> None:
        """The summary of one open file: bytes read and written, how long."""
        if self.audit is not None:
            self.audit.write("close", "allowed", handle.uid, handle.pid, exe=handle.exe,
                             path=handle.path, bytes_read=handle.nread,
                             bytes_written=handle.nwritten,
                             duration_ns=time.monotonic_ns() - handle.opened)

    def _fuse_ino(self, st_ino: int) -> int:
        if st_ino == self._root_st_ino:
            return ROOT
        if st_ino == ROOT:
            return self._root_st_ino
        return st_ino

    def _inode(self, ino: int) -> Inode:
        try:
            return self._inodes[ino]
        except KeyError:
            raise FuseError(errno.ESTALE) from None

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    @staticmethod
    def _open_entry(dir_fd: int, backing: str, st: os.stat_result) -> tuple[int, int]:
        """A descriptor for a backing entry and how it was opened."""
        if stat.S_ISREG(st.st_mode):
            for access in (os.O_RDWR, os.O_RDONLY):
                try:
                    # O_NONBLOCK: should the entry have become a FIFO meanwhile
                    fd = os.open(backing, access | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                                 dir_fd=dir_fd)
                    return fd, access
                except OSError as e:
                    if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ELOOP):
                        raise
        return os.open(backing, O_PATH_FLAGS, dir_fd=dir_fd), os.O_PATH

    def _remember(self, dir_fd: int, backing: str, st: os.stat_result, count: int = 1,
                  opened: tuple[int, int] | None = None) -> tuple[Inode, os.stat_result]:
        """The Inode for a backing entry (opened if new), its lookup count raised by ``count``.

        ``opened`` is a descriptor (and its access mode) the caller already
        holds for the entry; it is kept, or closed if the inode is known.
        """
        if st.st_dev != self._dev:
            if opened:
                os.close(opened[0])
            log.error("backing entry on another filesystem refused (inode %d)", st.st_ino)
            raise FuseError(errno.EXDEV)
        inode = self._inodes.get(self._fuse_ino(st.st_ino))
        if inode is None:
            fd, access = opened or self._open_entry(dir_fd, backing, st)
            st = os.fstat(fd)
            ino = self._fuse_ino(st.st_ino)
            inode = self._inodes.get(ino)
            if inode is None:
                kind = stat.S_IFMT(st.st_mode)
                inode = Inode(ino, fd, kind, access if kind == stat.S_IFREG else os.O_PATH)
                self._inodes[ino] = inode
            else:
                os.close(fd)
        elif opened:
            os.close(opened[0])
        inode.nlookup += count
        return inode, st

    def _maybe_drop(self, inode: Inode) -> None:
        if inode.nlookup <= 0 and not inode.handles and inode.ino != ROOT:
            del self._inodes[inode.ino]
            self._paths.pop(inode.ino, None)
            os.close(inode.fd)

    def _backing(self, parent: Inode, name: bytes) -> tuple[str, str | None]:
        if len(name) > NAME_MAX:
            raise FuseError(errno.ENAMETOOLONG)
        return self.codec.backing_name(name, self._diriv(parent))

    @contextlib.contextmanager
    def _long_name(self, parent: Inode, backing: str, full: str | None) -> Iterator[None]:
        """Write a long name's side file for the operation inside the block;
        remove it again if the operation fails and the side file is new."""
        created = full is not None and tree.write_long_name(parent.fd, backing, full)
        try:
            yield
        except BaseException:
            if created:
                tree.remove_long_name(parent.fd, backing)
            raise

    def _diriv(self, inode: Inode) -> bytes:
        if inode.diriv is None:
            if inode.kind != stat.S_IFDIR:
                raise FuseError(errno.ENOTDIR)
            inode.diriv = tree.read_diriv(inode.fd)
        return inode.diriv

    def _owner(self, ctx: Request, parent: Inode) -> tuple[int, int] | None:
        """Owner to give a new entry created for ``ctx`` (None: what it got is right).

        The backing entry is created with the daemon's uid and gid, or the
        directory's gid where it is set-group-ID; only differences need a chown.
        """
        if not self.is_root:
            return None
        uid = ctx.uid if ctx.uid != self._euid else -1
        gid = ctx.gid if ctx.gid != self._egid else -1
        if gid != -1 and os.fstat(parent.fd).st_mode & stat.S_ISGID:
            gid = -1  # the backing filesystem already gave it the directory's group
        if uid == -1 and gid == -1:
            return None
        return uid, gid

    # -- policy and hybrid files ----------------------------------------------------------------
    def _plain_dir(self, parent: Inode) -> str | None:
        """The plaintext path of a directory (for its policy rule); None if it
        cannot be worked out (removed, or moved out of the tree)."""
        if parent.ino == ROOT:
            return "/"
        real = os.readlink(proc_path(parent.fd))
        p = self._plain_paths.get(real)
        if p is None:
            if len(self._plain_paths) > 4096:
                self._plain_paths.clear()
            p = tree.plain_path(self._tree_root, parent.fd, self.codec)
            if p is None:
                return None
            self._plain_paths[real] = p  # a backing path always names the same plaintext one
        return p.decode("utf-8", "surrogateescape")

    def _plain_dir_of(self, inode: Inode) -> str | None:
        """The plaintext path of the directory a file is in (one of them, for
        a file with hard links); None if it cannot be worked out."""
        real = os.path.dirname(os.readlink(proc_path(inode.fd)))
        p = self._plain_paths.get(real)
        if p is None:
            try:
                fd = os.open(real, O_PATH_FLAGS | os.O_DIRECTORY)
            except OSError:
                return None
            try:
                p = tree.plain_path(self._tree_root, fd, self.codec)
            finally:
                os.close(fd)
            if p is None:
                return None
            if len(self._plain_paths) > 4096:
                self._plain_paths.clear()
            self._plain_paths[real] = p
        return p.decode("utf-8", "surrogateescape")

    def _untrusted(self, where: str | None, pid: int) -> Rule | None:
        """The rule that does not trust the program asking (None: it may open
        the file).  A rule that names programs lets only those open files."""
        self._decision = None
        if where is None:
            log.error("cannot work out a file's directory for the trusted-programs rule: "
                      "open refused")
            raise FuseError(errno.EACCES)
        rule = self.policy.programs_for(where)
        return self._untrusted_by([rule] if rule is not None else [], pid)

    def _untrusted_by(self, rules: list[Rule], pid: int) -> Rule | None:
        """Of ``rules`` (every trusted-programs rule that governs a name of the
        file), one that does not trust the program asking: one that denies
        rather than one that serves the ciphertext, if any does.  None: every
        rule trusts it."""
        self._decision = None
        refusing: list[tuple[Rule, dict[str, Any]]] = []
        trusted: dict[str, Any] | None = None
        for rule in rules:
            allowed, fields = self._identify.decide(rule, pid)
            if not allowed:
                refusing.append((rule, fields))
            elif trusted is None:
                trusted = fields
        if refusing:
            rule, fields = next(((r, f) for r, f in refusing if r.untrusted != "ciphertext"),
                                refusing[0])
            self._decision = fields
            return rule
        if trusted is not None:
            if len(rules) > 1:  # (a hard-linked file: trusted by the rule of every name)
                trusted["rule"] = ", ".join(r.path for r in rules)
            self._decision = trusted
        return None

    def _programs_of(self, inode: Inode) -> list[Rule]:
        """The trusted-programs rules that govern a file: of its one name's
        directory, or (hard links) of every name's (docs/POLICY.md)."""
        names = self._other_names(inode)
        if names is not None:
            return names.programs(self.policy)
        where = self._plain_dir_of(inode)
        if where is None:
            log.error("cannot work out a file's directory for the trusted-programs rule: "
                      "refused")
            raise FuseError(errno.EACCES)
        rule = self.policy.programs_for(where)
        return [rule] if rule is not None else []

    # -- hard links: every name of a file ------------------------------------------------------
    def _other_names(self, inode: Inode) -> links.Names | None:
        """Every name of a file that a restricting rule could govern; None if
        it has exactly one name, the one its descriptor was opened through
        (that name is then exact and needs no walk)."""
        st = os.fstat(inode.fd)
        if st.st_nlink == 1:
            try:
                here = os.stat(os.readlink(proc_path(inode.fd)), follow_symlinks=False)
                if (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
                    return None
            except OSError:
                pass  # (that name was removed: another one is the file's now)
        return self._names_of_stat(st)

    def _names_of_stat(self, st: os.stat_result) -> links.Names:
        if st.st_nlink == 0:
            return links.Names((), unknown=1)  # (removed, and reopened: its place is unknown)
        names = self._names.get(st, self.policy, self._epoch)
        if names is None:
            names = links.find_names(self._tree_root, self.codec, st, self.policy)
            self._names.put(st, self.policy, self._epoch, names)
        return names

    def _names_of(self, inode: Inode) -> links.Names:
        """Every name of a file under a restricting rule (one, or all its hard links)."""
        names = self._other_names(inode)
        if names is not None:
            return names
        where = self._plain_dir_of(inode)
        name = self._plain_name_of(inode)
        if where is None or name is None:
            return links.Names((), unknown=1)
        return links.Names(((where, name),))

    def _guard_link(self, ctx: Request, inode: Inode, dst_dir: str | None,
                    new_name: bytes) -> None:
        """A new name for a file.  It keeps every rule of its other names (the
        strictest of all governs it), so a link out of a rule takes nothing
        out of it; still, an agent may not link a masked file to a name
        another mask or none covers, nor a program a trusted-programs rule
        does not trust link a file out of that rule (as for a rename)."""
        if dst_dir is None:
            raise FuseError(errno.EACCES)  # (where it goes is not known: no link)
        names = self._names_of(inode)
        p_new = new_name.decode("utf-8", "surrogateescape")
        if self._mask_rules and ctx.uid in self._masked:
            masks = names.masks(self.policy)
            if names.unknown or (masks and self.policy.mask_for(dst_dir, p_new) not in masks):
                self._decision = {"decision": "masked file: not moved out of its mask"}
                raise FuseError(errno.EACCES)
        if self._program_rules:
            here = self.policy.programs_for(dst_dir)
            if self._untrusted_by([r for r in names.programs(self.policy) if r != here],
                                  ctx.pid) is not None:
                self._decision = {**(self._decision or {}),
                                  "decision": "not moved out of its trusted-programs rule by a "
                                              "program it does not trust"}
                raise FuseError(errno.EACCES)
            self._decision = None

    def _guard_file(self, ctx: Request, where: str | None, p_name: bytes,
                    st: os.stat_result, what: str) -> None:
        """A regular file ``p_name`` in directory ``where`` that is about to be
        renamed, removed or replaced (``what``).  A program that a
        trusted-programs rule of any of the file's names does not trust may do
        none of these.  And nobody removes or replaces the last name a mask
        covers while the file keeps other names: that would take it out of
        the mask as a rename would (EACCES, recorded)."""
        if not stat.S_ISREG(st.st_mode):
            return
        if where is None:
            self._decision = {"decision": f"not {what}: the file's directory is unknown"}
            raise FuseError(errno.EACCES)
        name = p_name.decode("utf-8", "surrogateescape")
        names = (self._names_of_stat(st) if st.st_nlink > 1
                 else links.Names(((where, name),)))
        if self._program_rules:
            if self._untrusted_by(names.programs(self.policy), ctx.pid) is not None:
                self._decision = {**(self._decision or {}),
                                  "decision": f"not {what} by a program its trusted-programs "
                                              "rule does not trust"}
                raise FuseError(errno.EACCES)
            self._decision = None
        if self._mask_rules and what != "renamed" and st.st_nlink > 1:
            mask = self.policy.mask_for(where, name)
            rest = names.without(where, name)
            if mask is not None and (rest.unknown or mask not in rest.masks(self.policy)):
                self._decision = {"decision": f"masked file: not {what} while it has hard links "
                                              "outside its mask (that would move it out)"}
                raise FuseError(errno.EACCES)

    def _public_of(self, uid: int) -> bytes | None:
        """The creator's X25519 public key: the requesting user's (gated) or the mount's."""
        if self.gated:
            slot = slot_for_uid(self.config, uid)
        else:
            slot = getattr(self.vol, "slot", None)
        return slot.public if slot is not None else None

    def _new_file_keys(self, parent: Inode, uid: int) -> tuple[ContentMode, Any]:
        """Content mode and key wrapper of a file created in ``parent`` by ``uid``,
        as the directory's policy rule says (default: the volume's mode, symmetric)."""
        if not self.policy.rules:
            return self.vol.default_mode, self.wrapper
        where = self._plain_dir(parent)
        if where is None:
            # Which rule applies is unknown: refuse rather than risk writing a
            # file of a recipients-only directory readable by everyone.
            log.error("inode %d: cannot work out this directory's path for the policy: "
                      "create refused", parent.ino)
            raise FuseError(errno.EACCES)
        rule = self.policy.rule_for(where)
        if rule is None:
            return self.vol.default_mode, self.wrapper
        mode = content_mode_by_name(rule.mode)
        if not rule.hybrid:
            return mode, self.wrapper
        publics = self.config.publics()
        recipients = [publics[n] for n in rule.recipients if n in publics]
        creator = self._public_of(uid)
        if not rule.dropbox and creator is not None:
            recipients.insert(0, creator)
        if self.config.recovery is not None:
            recipients.append(self.config.recovery.public)
        if not recipients:
            log.error("inode %d: its policy rule leaves a new file no recipient: create "
                      "refused", parent.ino)  # (the rule's path is secret: not logged)
            raise FuseError(errno.EACCES)
        return mode, RecipientWrapper(recipients, spare=HYBRID_SPARE)

    def _keyring(self, uid: int | None) -> Keyring:
        """What opens headers for ``uid``: the volume's wrap keys and that user's
        own X25519 key (gated), or the mount's user's.  Kept until the keys or
        that user's key change (deriving the public key costs ~40 µs an open)."""
        assert self.keys is not None
        key = uid if self.gated else None
        ring = self._keyrings.get(key)
        if ring is None:
            priv = self._own_private if not self.gated else (
                self._privates.get(uid) if uid is not None else None)
            ring = self.keys.keyring([priv.reveal()] if priv is not None and len(priv) else [])
            self._keyrings[key] = ring
        return ring

    def _check_recipient(self, content: ContentFile, uid: int) -> None:
        """A hybrid file's key already in memory is still only for its recipients."""
        hdr = content.header
        if not hdr.hybrid:
            return
        try:
            key = self._keyring(uid).unwrap(list(hdr.stanzas), hdr.wrap_ad(hdr.mode, hdr.file_id))
        except NotARecipient:
            raise FuseError(errno.EACCES) from None
        if key != hdr.file_key:
            raise IntegrityError("hybrid file key mismatch")

    def _stat_config(self) -> tuple[int, int, int, int] | None:
        try:  # (through a descriptor of the backing directory: no path walk per create)
            st = os.stat(CONFIG_NAME, dir_fd=self._backing_fd, follow_symlinks=False)
        except OSError:
            return None
        # (ctime too: a writer can set the mtime and keep inode and size)
        return st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns

    def _refresh_config(self) -> None:
        """Use the config again if it changed (a policy set, a user added, a key
        rotated): authenticated with the held key, or (after a rotation) with
        the key this mount's user's slot now holds."""
        stamp = self._stat_config()
        if stamp == self._config_stamp or self.keys is None:
            return
        self._config_stamp = stamp
        try:
            fresh = load_config(self.vol.backing)
            if fresh.volume_id != self.config.volume_id:
                raise CryptfsError("the volume id changed")
            if fresh.key_id == self.keys.key_id:
                keys = fresh.open_keys(self.keys.master)
            else:
                keys = self._follow_rotation(fresh)
            load_policy(fresh, keys)
        except CryptfsError as e:
            log.warning("the volume's config changed but cannot be used: %s", e)
            return
        self.config = fresh
        self._swap_keys(keys)

    def _follow_rotation(self, fresh: Any, since: VolumeKeys | None = None) -> VolumeKeys:
        """The new master of a rotated config, opened with a user key this
        mount holds: its own user's, or (gated) an unlocked user's; followed
        only if a holder of ``since`` (default: the keys held) made it,
        directly or through generations in between (``fresh.follows``)."""
        held: list[tuple[Any, Secret]] = []
        slot = getattr(self.vol, "slot", None)
        if slot is not None and self._own_private is not None:
            held.append((next((s for s in fresh.slots if s.id == slot.id), None), self._own_private))
        for uid, priv in self._privates.items():
            held.append((slot_for_uid(fresh, uid), priv))
        since = since if since is not None else self.keys
        assert since is not None
        for now, priv in held:
            opened = fresh.slot_master(now, priv) if now is not None else None
            if opened is None:
                continue
            with opened.master:
                keys = fresh.open_keys(opened.master, user_authority(priv.reveal()))
            if not fresh.follows(since, keys):
                keys.close()
                raise NotAVolume("its key generation was not made by a holder of the current "
                                 "one (a config put back from earlier, or forged): not followed")
            log.info("the volume's key was rotated to generation %d: following", keys.key_id)
            return keys
        raise CryptfsError("its key was rotated and no key slot this mount holds a key of "
                           "has the new one")

    # -- access gate (agent mode) --------------------------------------------------------------
    def _allow(self, uid: int) -> None:
        if self.gated:
            if uid not in self._unlocked or self.keys is None or uid in self._log_only:
                raise FuseError(errno.EACCES)
            self._seen.add(uid)

    def _plain(self, uid: int) -> None:
        """Refuse (EACCES) a user whose role reads no customer plaintext: the
        xattrs of files, a truncate (docs/POLICY.md, roles)."""
        if uid in self._cipher_only:
            raise FuseError(errno.EACCES)

    def _learn_roles(self) -> None:
        """On a shared mount, what each unlocked user's role lets them have
        (root is not bound by roles: it could read the mount's memory)."""
        self._log_only, self._cipher_only, self._masked = set(), set(), set()
        if not self.gated:
            return
        for slot in self.config.slots:
            uid, role = slot.extra.get("uid"), slot_role(slot)
            if not isinstance(uid, int) or uid == 0:
                continue
            if role in LOG_ONLY_ROLES:
                self._log_only.add(uid)
            elif role in CIPHERTEXT_ROLES:
                self._cipher_only.add(uid)
            elif role in MASKED_ROLES:
                self._masked.add(uid)

    def _install(self, keys: VolumeKeys) -> None:
        self._keyrings.clear()
        self.keys = keys
        self.codec = NameCodec(keys)
        self.wrapper = keys.wrapper
        self.policy = load_policy(self.config, keys)
        self._program_rules = self.policy.names_programs
        if self._program_rules:
            warning = self._identify.warn_once()
            if warning is not None:
                log.warning("%s", warning)
        self._mask_rules = self.policy.names_masks
        self._learn_roles()

    def _swap_keys(self, keys: VolumeKeys) -> None:
        """New keys of the same volume (rotated, or the config re-read): open
        files keep their file keys, which did not change."""
        old = self.keys
        self._install(keys)
        if old is not None and old is not keys:
            old.close()

    def _drop_keys(self) -> None:
        """Forget the keys and everything decrypted with them."""
        if self.keys is not None:
            self.keys.close()
        self.keys = None
        self._keyrings.clear()
        self.codec = _NO_KEYS
        self.wrapper = _NO_KEYS
        self.policy = Policy()
        self._program_rules = False
        self._plain_paths.clear()
        self._names.clear()
        for inode in self._inodes.values():
            inode.content = None  # reloaded (header checked again) at the next use
            if inode.kind == stat.S_IFLNK:
                inode.meta = None  # a decrypted symlink target

    def _has_slot(self, uid: int) -> bool:
        """Only a uid with a key slot in this volume's (authenticated) config is
        ever served, whatever the agent says.  A uid not in the config the
        mount knows makes it read the config again (a user added since), and
        use it if it authenticates under the key it holds."""
        if slot_for_uid(self.config, uid) is not None:
            return True
        if self.keys is None:
            return False
        stamp = self._stat_config()
        try:
            fresh = load_config(self.vol.backing)
            keys = fresh.open_keys(self.keys.master)
            load_policy(fresh, keys)
        except CryptfsError as e:
            log.warning("cannot re-read this volume's config: %s", e)
            return False
        if fresh.volume_id != self.config.volume_id:
            keys.close()
            return False
        self.config = fresh
        self._config_stamp = stamp
        self._swap_keys(keys)
        return slot_for_uid(fresh, uid) is not None

    def agent_state(self, uids: list[int], master: Secret | None,
                    key_id: int | None = None) -> None:
        self._unlocked = set()
        if master is None:
            self._drop_keys()
            self._forget_privates()
            return
        if self.agent_keys(master, key_id):
            # (served once this mount has keys: now, or when the agent that
            # was a rotation behind the config sends the new ones)
            self._unlocked = {uid for uid in uids if self._has_slot(uid)}

    def agent_keys(self, master: Secret, key_id: int | None = None) -> bool:
        """A master key from the agent (of generation ``key_id``): used with
        the config as it is on disk now (a policy set or a key rotated since
        the mount started), which it must authenticate, and whose policy must
        open (else: fail closed).  A config already rotated past ``key_id``
        (back-to-back rotations: the agent follows the next one within its
        config check) is followed from it if it descends from it, else the
        mount keeps what it has until the agent sends the newer key.  False:
        refused (access stays denied)."""
        stamp = self._stat_config()
        try:
            try:
                fresh = load_config(self.vol.backing)
            except CryptfsError as e:
                log.warning("cannot re-read this volume's config (%s): using the one read at "
                            "mount time", e)
                fresh, stamp = self.config, None
            if fresh.volume_id != self.config.volume_id:
                raise CryptfsError("the backing directory holds another volume now")
            if key_id is not None and fresh.key_id > key_id:
                keys = self._ahead_of_agent(fresh, master, key_id)
                if keys is None:
                    return True
            else:
                keys = fresh.open_keys(master)
            load_policy(fresh, keys)
        except CryptfsError as e:
            self._drop_keys()
            self._forget_privates()
            self._unlocked.clear()
            log.error("the key agent's key does not open this volume's config (%s): refused; "
                      "access stays denied", e)
            return False
        self.config = fresh
        self._config_stamp = stamp
        if self.keys is not None:
            self._swap_keys(keys)  # (a rotation: open files keep working)
        else:
            self._install(keys)
        log.info("volume keys (generation %d) received from the key agent", keys.key_id)
        return True

    def _ahead_of_agent(self, fresh: Any, master: Secret, key_id: int) -> VolumeKeys | None:
        """The config on disk is a newer generation than the agent's key (it
        was rotated again after the agent read it): its keys if it descends
        from the agent's generation and a user key this mount holds opens it;
        None if that cannot be told yet (this mount keeps what it has and the
        agent, which re-reads the config every 2 s, sends the newer key).
        CryptfsError if it does not descend from it (put back, forged)."""
        if self.keys is not None and self.keys.key_id >= fresh.key_id:
            return None  # (this mount followed it already; the agent's key is the older one)
        since = VolumeKeys(Secret(master.reveal()), key_id)
        try:
            return self._follow_rotation(fresh, since)
        except NotAVolume:
            raise  # (forged, or not of its line: fail closed)
        except CryptfsError:  # (no user key this mount holds opens it yet)
            log.info("the volume's config is newer (generation %d) than the key agent's key "
                     "(generation %d): waiting for the agent to follow it", fresh.key_id, key_id)
            return None
        finally:
            since.close()

    def agent_wipe(self) -> None:
        self._drop_keys()
        self._forget_privates()
        log.info("nobody is unlocked any more: volume keys wiped")

    def _forget_privates(self, uid: int | None = None) -> None:
        self._keyrings.clear()
        for u in [uid] if uid is not None else list(self._privates):
            priv = self._privates.pop(u, None)
            if priv is not None:
                priv.wipe()

    def agent_user_key(self, uid: int, private: Secret) -> None:
        """A user's X25519 key (for the hybrid files wrapped to them)."""
        self._forget_privates(uid)
        self._privates[uid] = Secret(private.reveal())
        self._keyrings.clear()

    def agent_unlocked(self, uid: int, private: Secret | None = None) -> None:
        if not self._has_slot(uid):
            log.error("the key agent reports uid %d unlocked, but this volume has no key slot "
                      "for it: refused", uid)
            return
        if private is not None:
            self.agent_user_key(uid, private)
        self._unlocked.add(uid)
        log.info("uid %d unlocked: access granted", uid)

    async def agent_locked(self, uid: int) -> None:
        self._unlocked.discard(uid)
        self._forget_privates(uid)
        self._quarantine_logged = {q for q in self._quarantine_logged if q[1] != uid}
        log.info("uid %d locked: access revoked", uid)
        # Pages of its open files that a program mapped with mmap (the only
        # plaintext a gated mount leaves in the page cache) are dropped, so
        # touching them again asks the daemon, which refuses.
        await self._drop_pages({h.inode.ino for h in self._files.values()
                                if h.uid == uid and h.readable})

    async def _drop_pages(self, inos: set[int]) -> None:
        for ino in inos:
            try:
                await trio.to_thread.run_sync(self.invalidate_inode, ino)
            except OSError:
                pass  # the mount is gone

    async def agent_lost(self, why: str) -> None:
        self._unlocked.clear()
        self._drop_keys()
        self._forget_privates()
        await self._drop_pages({h.inode.ino for h in self._files.values()})

    def take_activity(self) -> set[int]:
        seen, self._seen = self._seen, set()
        return seen

    # -- attributes ------------------------------------------------------------------------
    def _attr(self, inode: Inode, st: os.stat_result) -> EntryOut:
        attr = Attr(inode.ino, st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
                    self._plain_size(inode, st), st.st_blocks, st.st_atime_ns, st.st_mtime_ns,
                    st.st_ctime_ns, st.st_rdev, 65536)
        # The mount's root is stat'able by everyone even when gated (it tells
        # nothing), so its attributes may stay cached: one request less on
        # every path walk, which checks the root's permissions first.
        return EntryOut(inode.ino, attr, self.timeout,
                        ROOT_ATTR_TIMEOUT if inode.ino == ROOT else self.attr_timeout)

    def _plain_size(self, inode: Inode, st: os.stat_result) -> int:
        if inode.kind == stat.S_IFREG:
            if inode.content is not None:
                return inode.content.size
            try:
                if inode.meta is None:
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

    def _layout(self, inode: Inode) -> tuple[ContentMode, int]:
        """Mode and header length of a regular file: from the layout hint
        xattr if it has one (no data read), else from the header's first bytes."""
        if self._layout_hints:
            try:
                where = proc_path(inode.fd) if inode.access == os.O_PATH else inode.fd
                return parse_layout_hint(os.getxattr(where, LAYOUT_XATTR))
            except OSError:
                pass  # no hint (made elsewhere, or xattrs not kept): read the header
            except IntegrityError:
                log.warning("inode %d: malformed layout hint ignored", inode.ino)
        if inode.access == os.O_PATH:
            fd = os.open(proc_path(inode.fd), os.O_RDONLY | os.O_CLOEXEC)
            try:
                return peek(os.pread(fd, 12, 0))
            finally:
                os.close(fd)
        return peek(os.pread(inode.fd, 12, 0))

    def _set_layout_hint(self, fd: int, content: ContentFile) -> None:
        if self._layout_hints:
            try:
                os.setxattr(fd, LAYOUT_XATTR, layout_hint(content.header.mode, content.h_len))
            except OSError as e:
                log.info("backing filesystem keeps no xattrs (%s): sizes come from headers",
                         e.strerror)
                self._layout_hints = False

    def _target(self, inode: Inode) -> bytes:
        if inode.meta is None:
            inode.meta = self.codec.open_target(os.readlink("", dir_fd=inode.fd))
        return inode.meta  # type: ignore[no-any-return]

    def _negative(self) -> EntryOut:
        return EntryOut(0, Attr(), self.timeout, 0.0)

    # -- content ---------------------------------------------------------------------------
    def _reopen(self, inode: Inode, access: int) -> None:
        """Replace the inode's descriptor by one opened with ``access``."""
        fd = os.open(proc_path(inode.fd), access | os.O_CLOEXEC)
        os.close(inode.fd)
        inode.fd = fd
        inode.access = access
        if inode.content is not None:
            inode.content.fd = fd

    def _content(self, inode: Inode, want_write: bool, uid: int | None = None) -> ContentFile:
        """The inode's content engine, its header checked when first needed.

        ``uid`` (on open and truncate, not on each read or write of an open
        handle) must be able to open the file key: of a hybrid file, only its
        recipients can (EACCES for others, whoever loaded it before)."""
        if want_write and inode.access != os.O_RDWR:
            self._reopen(inode, os.O_RDWR)
        elif inode.access == os.O_PATH:
            self._reopen(inode, os.O_RDONLY)
        if inode.content is not None and uid is not None:
            self._check_recipient(inode.content, uid)
        if inode.content is None:
            try:
                try:
                    content = ContentFile.load(inode.fd, self._keyring(uid))
                except BlockError:
                    if not self._newer_generation(inode.fd):
                        raise
                    # Rotated by someone else (another mount, another namespace):
                    # follow it through a slot key this mount holds, then retry.
                    self._config_stamp = None
                    self._refresh_config()
                    content = ContentFile.load(inode.fd, self._keyring(uid))
            except NotARecipient:
                raise FuseError(errno.EACCES) from None
            if inode.meta is not None and inode.meta != (content.overhead, content.h_len):
                log.warning("inode %d: layout hint disagrees with the header; header used",
                            inode.ino)
            inode.content = content
            inode.meta = (content.overhead, content.h_len)
        return inode.content

    def _newer_generation(self, fd: int) -> bool:
        """Whether the file's header names a key generation newer than this
        mount's (so a rotation happened that this mount did not walk)."""
        try:
            stanzas = read_stanzas(fd)
        except (IntegrityError, OSError):
            return False
        held = self.keys.key_id if self.keys is not None else 0
        return any(st.type == STANZA_SYMMETRIC and struct.unpack_from(">I", st.body)[0] > held
                   for st in stanzas if len(st.body) >= 4)

    def _unload_content(self, inode: Inode) -> None:
        """Forget the header once no handle is open: the next open checks it again."""
        if not inode.handles:
            inode.content = None

    def _open_handle(self, inode: Inode, uid: int, flags: int, pid: int = 0,
                     view: bool = False) -> OpenOut:
        fh = self._new_fh()
        handle = _Handle(inode, uid, readable=(flags & os.O_ACCMODE) != os.O_WRONLY)
        if self.audit is not None:
            handle.pid, handle.opened = pid, time.monotonic_ns()
            handle.exe = self.audit.exe(pid)  # (at close the process may be gone)
            handle.path = self._paths.get(inode.ino, "?")
        self._files[fh] = handle
        inode.handles.add(handle)
        handle.policy = self.policy
        handle.own_only = not view and uid in self._masked
        if view or self.gated:
            inode.viewed = inode.viewed or view
            return OpenOut(fh, FOPEN_DIRECT_IO)
        if inode.viewed:  # (the kernel drops the cached pages of a view at this open)
            inode.viewed = False
            return OpenOut(fh, 0)
        return OpenOut(fh, FOPEN_KEEP_CACHE)

    def _exclusive(self, inode: Inode, view: bool) -> None:
        """A view (masked, or the encrypted bytes) and the plaintext of one file
        are never open at once: the kernel keeps one page cache per inode, and
        a private mmap of either would show the other's pages."""
        if any((h.view is not None or h.raw >= 0) != view for h in inode.handles):
            self._decision = {"decision": "refused: open as "
                              + ("plaintext" if view else "a masked or encrypted view")
                              + " by someone else (they would share the page cache)"}
            raise FuseError(errno.EACCES)

    def _recheck_soon(self) -> None:
        """On a shared mount, reads and writes through open handles also pick
        up a policy or role changed since (a stat of the config, at most
        twice a second)."""
        now = time.monotonic()
        if now - self._rechecked >= 0.5:
            self._rechecked = now
            self._refresh_config()

    def _still_allowed(self, handle: _Handle) -> None:
        """A handle opened under an older policy or role: what its user may
        have now (a mask set, a role changed since) decides its reads and writes."""
        if handle.uid in self._cipher_only or handle.uid in self._log_only or (
                handle.uid in self._masked and self._mask_rules
                and self._mask_of(handle.inode) is not None):
            raise FuseError(errno.EACCES)
        handle.policy = self.policy

    def _own_reads(self, handle: _Handle, inode: Inode) -> None:
        """A plaintext read, refused (EACCES) where it could show a masked role
        what someone else wrote into a file a mask governs (cryptfs.ownreads):
        through that role's own handle, or into the page cache its mapping
        shares.  Costs nothing until someone else changes such a file."""
        if not (self._mask_rules and ownreads.foreign_held(inode.handles)):
            return
        if self._mask_of(inode) is not None:
            self._decision = {"decision": ownreads.FOREIGN_READ if handle.foreign
                              else ownreads.HELD_FOREIGN}
            raise FuseError(errno.EACCES)

    def _ciphertext_handle(self, inode: Inode, uid: int, flags: int, pid: int
                           ) -> OpenOut:
        """A read-only view of the file's encrypted bytes, for a program the
        rule does not trust but lets have those.  Direct I/O: its reads
        neither fill nor use the page cache (which holds plaintext), and go
        past the plaintext size the file shows."""
        self._exclusive(inode, view=True)
        raw = os.open(proc_path(inode.fd), os.O_RDONLY | os.O_CLOEXEC)
        try:
            fi = self._open_handle(inode, uid, flags, pid, view=True)
        except BaseException:
            os.close(raw)
            raise
        self._files[fi.fh].raw = raw
        if self._decision is not None and not self._decision["decision"].endswith("ciphertext"):
            self._decision["decision"] += ": served the ciphertext"
        return OpenOut(fi.fh, FOPEN_DIRECT_IO)

    def _guard_move(self, ctx: Request, src_dir: str | None,
                    src_name: str | bytes | None, dst_dir: str | None, dst_name: str | bytes,
                    is_dir: bool) -> None:
        """A rename must not take a file out of what protects it: the mask
        agents see it through (whoever renames: declassifying is a policy
        change, never a move), or a trusted-programs rule (for a program that
        rule does not trust).  EACCES otherwise."""
        if src_dir is None or dst_dir is None or src_name is None:
            raise FuseError(errno.EACCES)  # (where it is is not known: no move)
        name_src = src_name if isinstance(src_name, str) else src_name.decode(
            "utf-8", "surrogateescape")
        name_dst = dst_name if isinstance(dst_name, str) else dst_name.decode(
            "utf-8", "surrogateescape")
        src_path = posixpath.join(src_dir, name_src)
        dst_path = posixpath.join(dst_dir, name_dst)
        # Rules name paths: a directory moved takes the rules of directories
        # below it nowhere (they stay with the old paths).
        below = [r for p, r in self.policy.rules.items()
                 if is_dir and (p + "/").startswith(src_path + "/")]
        if self._mask_rules:
            if is_dir:
                moved_out = any(r.masks for r in below) or (
                    self.policy.masks_at(src_path) and (
                        self.policy.masks_at(src_path) != self.policy.masks_at(dst_path)))
            else:
                mask = self.policy.mask_for(src_dir, name_src)
                moved_out = mask is not None and mask != self.policy.mask_for(dst_dir, name_dst)
            if moved_out:
                self._decision = {"decision": "masked file: not moved out of its mask"}
                raise FuseError(errno.EACCES)
        if self._program_rules:
            rule = self.policy.programs_for(src_path if is_dir else src_dir)
            rules = [r for r in below if r.programs]
            if rule is not None and rule != self.policy.programs_for(
                    dst_path if is_dir else dst_dir):
                rules.append(rule)
            for rule in rules:
                allowed, _ = self._identify.decide(rule, ctx.pid)
                if not allowed:
                    self._decision = {"decision": "not moved out of its trusted-programs rule "
                                                  "by a program it does not trust"}
                    raise FuseError(errno.EACCES)

    def _mask_of(self, inode: Inode) -> MaskRule | None:
        """The mask a file is served through to masked roles: of its name, or
        of any of its hard links' (two different ones: refused)."""
        names = self._names_of(inode)
        if names.unknown:
            self._decision = {"decision": "masked view refused: the file's name is unknown"
                              if not names.found else
                              "masked view refused: a name of the file (a hard link) is unknown"}
            raise FuseError(errno.EACCES)
        masks = names.masks(self.policy)
        if len(masks) > 1:
            self._decision = {"decision": "masked view refused: its hard links are under "
                                          "different masks"}
            raise FuseError(errno.EACCES)
        return next(iter(masks), None)

    def _plain_name_of(self, inode: Inode) -> str | None:
        real = os.readlink(proc_path(inode.fd))
        try:
            fd = os.open(os.path.dirname(real), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            name = tree.decrypt_entry(fd, os.path.basename(real), tree.read_diriv(fd), self.codec)
        except (OSError, IntegrityError):
            return None
        finally:
            os.close(fd)
        return name.decode("utf-8", "surrogateescape")

    def _masked_handle(self, inode: Inode, rule: MaskRule, uid: int, flags: int, pid: int,
                       built: views.Built | None = None) -> OpenOut | views.Wanted:
        """What a role that sees masked data gets of a structured file: reads
        from a masked view made at open (every field its length, so sizes and
        offsets hold); writes only at or past the end (new rows), never over
        the bytes the view masks.  A view larger than views.INLINE_MAX is
        made off the request loop: this returns what to make, and the open
        comes back with it (``built``) to decide again."""
        if flags & os.O_TRUNC:
            self._decision = {"decision": "masked view: no truncating"}
            raise FuseError(errno.EACCES)
        mask = rule.mask()
        if (flags & os.O_ACCMODE) != os.O_RDONLY and mask.tokenised:
            self._decision = {"decision": NO_ORACLE_WRITES}
            raise FuseError(errno.EACCES)
        self._exclusive(inode, view=True)  # (before the view is made)
        content = self._content(inode, False, uid)
        try:
            size = content.size
            if size > MAX_MASKED:
                raise NotStructured(f"larger than {MAX_MASKED} bytes")
            token = self._token_key(inode, content)
            make_view = functools.partial(mask.view, token_key=token)
            st = os.fstat(inode.fd)
            stamp = views.Stamp(content, content.changes, st.st_size, st.st_mtime_ns, rule,
                                self.keys.key_id if self.keys is not None else -1)
            if built is not None and built.stamp == stamp and _same_key(built.token, token):
                if built.error is not None:
                    raise built.error
                assert built.view is not None
                view = built.view
            elif size <= views.INLINE_MAX:
                view = make_view(content.read(0, size))
            elif built is not None:
                self._decision = {"decision": "masked view refused: the file, its rule or the "
                                              "keys changed while its view was made"}
                raise FuseError(errno.EACCES)
            else:
                return views.Wanted(stamp, token, content.header, size, make_view)
        except NotStructured as e:
            self._unload_content(inode)
            log.warning("inode %d: masked view refused: %s", inode.ino, e)
            self._decision = {"decision": f"masked view refused: not {rule.fmt} ({e})"}
            raise FuseError(errno.EACCES) from None
        except BaseException:
            self._unload_content(inode)
            raise
        try:
            fi = self._open_handle(inode, uid, flags, pid, view=True)
        except BaseException:
            self._unload_content(inode)
            raise
        handle = self._files[fi.fh]
        handle.view = view
        self._decision = {"decision": f"masked view ({rule.fmt}, {rule.glob})"}
        return OpenOut(fi.fh, FOPEN_DIRECT_IO)

    def _token_key(self, inode: Inode, content: ContentFile) -> bytes | None:
        """The key of the token columns of this file's view: the file's own
        (its id is in its authenticated header); or None (token columns
        masked) if a role that sees masked data owns the file, that is,
        created it: its creator saw the tokens of its own rows under that
        key, so real rows a supervisor or an export later writes into the
        same file (the agent's file put at the export's name) would invert."""
        if self.keys is None or os.fstat(inode.fd).st_uid in self._masked:
            return None
        if inode.agent_rows:
            return None
        try:
            os.getxattr(proc_path(inode.fd), AGENT_ROWS_XATTR)
            return None  # (a masked role wrote into it: some rows may be its choice)
        except OSError as e:
            if e.errno != errno.ENODATA:
                return None  # (cannot tell: no tokens)
        return self.keys.mask_token_key(content.header.file_id)

    def _mark_agent_rows(self, inode: Inode) -> None:
        """Before a masked role's first write into a file: mark it, so that its
        masked views never show tokens (rows it chose would be a dictionary
        for the others, even after the file moved into a mask or a token
        column was added).  A file that cannot be marked is not written."""
        if inode.agent_rows:
            return
        try:
            os.setxattr(proc_path(inode.fd), AGENT_ROWS_XATTR, b"1")
        except OSError as e:
            log.error("inode %d: cannot mark the file as written by a masked role (%s): "
                      "write refused", inode.ino, e.strerror)
            self._decision = {"decision": "not written: the file cannot be marked as holding "
                                          "rows of a masked role (its tokens would be an oracle)"}
            raise FuseError(errno.EACCES) from None
        inode.agent_rows = True

    def _view_still_writable(self, handle: _Handle) -> None:
        """A masked view opened for writing under an older policy: no more
        writes once the file's mask has a token column."""
        mask = self._mask_of(handle.inode)
        if mask is not None and mask.mask().tokenised:
            self._decision = {"decision": NO_ORACLE_WRITES}
            raise FuseError(errno.EACCES)
        handle.policy = self.policy

    async def _open_view(self, wanted: views.Wanted, inode_no: int, flags: int,
                         ctx: Request) -> OpenOut:
        """Make a large masked view in a worker thread while other requests
        are served, then decide the open again from the start (user still
        unlocked, role, rules, keys, the file unchanged: see
        ``_masked_handle``); anything changed fails closed."""
        inode = self._inode(inode_no)
        self._decision = None  # (nothing of this open is left for another request's record)
        try:
            self._views.admit(ctx.uid)
        except views.Busy:
            self._unload_content(inode)
            self._decision = {"decision": "masked view refused: too many views being made"}
            raise FuseError(errno.EBUSY) from None
        # Its own descriptor (the inode's may be reopened meanwhile), and a
        # placeholder view handle: while the view is made, no plaintext open
        # of the file (_exclusive), and the inode and its content stay loaded.
        hold = _Handle(inode, ctx.uid, readable=False)
        hold.view = b""
        built = views.Built(wanted.stamp, wanted.token)
        try:
            fd = os.open(proc_path(inode.fd), os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self._views.done(ctx.uid)
            self._unload_content(inode)
            raise
        inode.handles.add(hold)
        log.info("inode %d: making a masked view of %d bytes off the request loop", inode.ino,
                 wanted.size)
        try:
            built.view = await self._views.build(fd, wanted.header, wanted.size, wanted.mask)
        except (IntegrityError, OSError, NotStructured) as e:
            built.error = e  # (an error of the file as it was: raised if it still is)
        finally:
            inode.handles.discard(hold)
            os.close(fd)
            self._views.done(ctx.uid)
        self._decision = None
        fi = self._open_now(inode_no, flags, ctx, built)
        assert not isinstance(fi, views.Wanted)  # (given ``built``, a view is used or refused)
        return fi

    def _role_of(self, uid: int) -> str:
        slot = slot_for_uid(self.config, uid)
        return slot_role(slot) if slot is not None else "?"

    def _handle(self, fh: int, reading: bool = False) -> Inode:
        """The inode of an open file handle, if its opener may still use it.

        Gated, a read is also refused while someone who has since locked
        still holds the file open: a program of theirs may have it mapped
        (MAP_PRIVATE), and the page that this read brings into the page cache
        would show through their mapping without the daemon being asked.
        """
        handle = self._files[fh]
        inode = handle.inode
        if self.gated:
            self._allow(handle.uid)
            if reading:
                for other in inode.handles:
                    if other.readable and other.uid not in self._unlocked:
                        if (inode.ino, other.uid) not in self._quarantine_logged:
                            self._quarantine_logged.add((inode.ino, other.uid))
                            log.info("inode %d: reads refused while uid %d, now locked, still "
                                     "has it open", inode.ino, other.uid)
                        raise FuseError(errno.EACCES)
        return inode

    # -- lookups and attributes -------------------------------------------------------------
    @_edge("inode")
    def lookup(self, parent_inode: int, name: bytes, ctx: Request
                     ) -> EntryOut:
        self._allow(ctx.uid)
        parent = self._inode(parent_inode)
        backing, _ = self._backing(parent, name)
        try:
            st = os.stat(backing, dir_fd=parent.fd, follow_symlinks=False)
        except FileNotFoundError:
            return self._negative()
        attr = self._attr(*self._remember(parent.fd, backing, st))
        if self.audit is not None:
            self._paths[attr.nodeid] = self._name_path(parent_inode, name)
        return attr

    @_edge("none")
    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            inode = self._inodes.get(ino)
            if inode is not None:
                inode.nlookup -= n
                self._maybe_drop(inode)

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
            self._plain(ctx.uid)
            self._refresh_config()
            if inode.kind != stat.S_IFREG:
                raise FuseError(errno.EINVAL)
            if self._program_rules and self._untrusted_by(self._programs_of(inode),
                                                          ctx.pid) is not None:
                self._decision = {**(self._decision or {}),
                                  "decision": "not truncated by a program its trusted-programs "
                                              "rule does not trust"}
                raise FuseError(errno.EACCES)
            self._decision = None
            if (ctx.uid in self._masked and self._mask_rules and fh not in self._files
                    and self._mask_of(inode) is not None):
                raise FuseError(errno.EACCES)  # (a masked view never cuts the file)
            if fh is not None and fh in self._files and self._files[fh].view is not None:
                raise FuseError(errno.EACCES)
            try:
                # (an open handle's own truncate needs no new check: drop boxes)
                uid = None if fh is not None and fh in self._files else ctx.uid
                content = self._content(inode, want_write=True, uid=uid)
                ownreads.changed_by(inode.handles, ctx.uid)
                content.truncate(attr.st_size)
            finally:
                self._unload_content(inode)
        if fields.update_mode and inode.kind != stat.S_IFLNK:
            os.chmod(proc_path(inode.fd), stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            sysio.fchown_empty(inode.fd, attr.st_uid if fields.update_uid else -1,
                               attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.fstat(inode.fd)
            sysio.utimens_empty(
                inode.fd,
                attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns,
            )
        return self._attr(inode, os.fstat(inode.fd))

    @_edge("inode")
    def readlink(self, inode_no: int, ctx: Request) -> bytes:
        self._allow(ctx.uid)
        inode = self._inode(inode_no)
        if ctx.uid in self._cipher_only:
            # Their view is the ciphertext, of targets as of contents: the
            # target as stored, never decrypted (docs/POLICY.md, roles).
            return os.readlink(b"", dir_fd=inode.fd)
        return self._target(inode)

    # -- creating and removing entries -------------------------------------------------------
    @_edge("inode", "mknod")
    def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Request) -> EntryOut:
        self._allow(ctx.uid)
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            raise FuseError(errno.EPERM)  # device nodes have no place in a volume
        parent = self._inode(parent_inode)
        backing, full = self._backing(parent, name)
        with self._long_name(parent, backing, full):
            os.mknod(backing, mode, dir_fd=parent.fd)
        return self._finish_new(parent, backing, ctx)

    def _finish_new(self, parent: Inode, backing: str, ctx: Request
                    ) -> EntryOut:
        owner = self._owner(ctx, parent)
        if owner is not None:
            os.chown(backing, *owner, dir_fd=parent.fd, follow_symlinks=False)
        st = os.stat(backing, dir_fd=parent.fd, follow_symlinks=False)
        return self._attr(*self._remember(parent.fd, backing, st))

    @_edge("inode", "mkdir")
    def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: Request) -> EntryOut:
        self._allow(ctx.uid)
        parent = self._inode(parent_inode)
        backing, full = self._backing(parent, name)
        try:
            os.stat(backing, dir_fd=parent.fd, follow_symlinks=False)
            raise FuseError(errno.EEXIST)
        except FileNotFoundError:
            pass
        if os.fstat(parent.fd).st_mode & stat.S_ISGID:
            mode |= stat.S_ISGID
        with self._long_name(parent, backing, full):
            diriv = tree.make_dir(parent.fd, backing, mode, self._owner(ctx, parent))
        st = os.stat(backing, dir_fd=parent.fd, follow_symlinks=False)
        inode, st = self._remember(parent.fd, backing, st)
        inode.diriv = diriv
        return self._attr(inode, st)

    @_edge("inode", "create")
    def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Request
                     ) -> tuple[OpenOut, EntryOut]:
        self._allow(ctx.uid)
        self._refresh_config()  # (a stat, first: a rule or role set since applies to all below)
        if ctx.uid in self._cipher_only:
            self._decision = {"decision": f"role {self._role_of(ctx.uid)}: writes no customer data"}
            raise FuseError(errno.EACCES)
        parent = self._inode(parent_inode)
        if self._program_rules and self._untrusted(self._plain_dir(parent), ctx.pid):
            raise FuseError(errno.EACCES)
        backing, full = self._backing(parent, name)
        with self._long_name(parent, backing, full):
            fd = os.open(backing, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW,
                         stat.S_IMODE(mode), dir_fd=parent.fd)
            try:
                owner = self._owner(ctx, parent)
                if owner is not None:
                    os.fchown(fd, *owner)
                content = ContentFile.create(fd, *self._new_file_keys(parent, ctx.uid))
                self._set_layout_hint(fd, content)
            except BaseException:
                os.close(fd)
                os.unlink(backing, dir_fd=parent.fd)
                raise
        inode, st = self._remember(parent.fd, backing, os.fstat(fd), opened=(fd, os.O_RDWR))
        inode.content = content
        inode.meta = (content.overhead, content.h_len)
        return self._open_handle(inode, ctx.uid, flags, ctx.pid), self._attr(inode, st)

    @_edge("inode", "symlink")
    def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: Request) -> EntryOut:
        self._allow(ctx.uid)
        if len(target) > MAX_SYMLINK_TARGET:
            raise FuseError(errno.ENAMETOOLONG)
        parent = self._inode(parent_inode)
        backing, full = self._backing(parent, name)
        with self._long_name(parent, backing, full):
            os.symlink(self.codec.seal_target(target), backing, dir_fd=parent.fd)
        return self._finish_new(parent, backing, ctx)

    @_edge("inode", "link")
    def link(self, inode_no: int, new_parent_inode: int, new_name: bytes,
                   ctx: Request) -> EntryOut:
        self._allow(ctx.uid)
        inode = self._inode(inode_no)
        parent = self._inode(new_parent_inode)
        self._refresh_config()
        if self._mask_rules or self._program_rules:
            self._guard_link(ctx, inode, self._plain_dir(parent), new_name)
        backing, full = self._backing(parent, new_name)
        with self._long_name(parent, backing, full):
            sysio.link_empty(inode.fd, parent.fd, backing)
        self._epoch += 1
        st = os.stat(backing, dir_fd=parent.fd, follow_symlinks=False)
        inode.nlookup += 1
        return self._attr(inode, st)

    @_edge("inode", "unlink")
    def unlink(self, parent_inode: int, name: bytes, ctx: Request) -> None:
        self._allow(ctx.uid)
        parent = self._inode(parent_inode)
        backing, full = self._backing(parent, name)
        self._refresh_config()  # (a stat: a rule set since the mount started applies)
        if self._mask_rules or self._program_rules:
            self._guard_file(ctx, self._plain_dir(parent), name,
                             os.stat(backing, dir_fd=parent.fd, follow_symlinks=False), "removed")
        os.unlink(backing, dir_fd=parent.fd)
        self._epoch += 1
        if full:
            tree.remove_long_name(parent.fd, backing)

    @_edge("inode", "rmdir")
    def rmdir(self, parent_inode: int, name: bytes, ctx: Request) -> None:
        self._allow(ctx.uid)
        parent = self._inode(parent_inode)
        backing, full = self._backing(parent, name)
        tree.remove_empty_dir(parent.fd, backing)
        self._epoch += 1
        if full:
            tree.remove_long_name(parent.fd, backing)

    @_edge("inode", "rename")
    def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Request) -> None:
        self._allow(ctx.uid)
        old_parent = self._inode(parent_inode_old)
        new_parent = self._inode(parent_inode_new)
        b_old, full_old = self._backing(old_parent, name_old)
        b_new, full_new = self._backing(new_parent, name_new)
        self._refresh_config()  # (a stat: a rule set since the mount started applies)
        if self._mask_rules or self._program_rules:
            src, dst = self._plain_dir(old_parent), self._plain_dir(new_parent)
            st_old = os.stat(b_old, dir_fd=old_parent.fd, follow_symlinks=False)
            self._guard_move(ctx, src, name_old, dst, name_new, stat.S_ISDIR(st_old.st_mode))
            self._guard_file(ctx, src, name_old, st_old, "renamed")
            try:
                st_new: os.stat_result | None = os.stat(b_new, dir_fd=new_parent.fd,
                                                        follow_symlinks=False)
            except FileNotFoundError:
                st_new = None
            if st_new is not None and flags & sysio.RENAME_EXCHANGE:
                self._guard_move(ctx, dst, name_new, src, name_old, stat.S_ISDIR(st_new.st_mode))
                self._guard_file(ctx, dst, name_new, st_new, "renamed")
            elif st_new is not None and (st_new.st_dev, st_new.st_ino) != (st_old.st_dev,
                                                                          st_old.st_ino):
                self._guard_file(ctx, dst, name_new, st_new, "replaced")
        self._epoch += 1  # (before: a failed rename that moved something still counts)
        if flags & sysio.RENAME_EXCHANGE:
            # Each name stays in its directory, so no name is re-encrypted.
            sysio.renameat2(old_parent.fd, b_old, new_parent.fd, b_new, sysio.RENAME_EXCHANGE)
            return
        with self._long_name(new_parent, b_new, full_new):
            if flags & sysio.RENAME_NOREPLACE:
                sysio.renameat2(old_parent.fd, b_old, new_parent.fd, b_new, sysio.RENAME_NOREPLACE)
            else:
                tree.rename_over(old_parent.fd, b_old, new_parent.fd, b_new)
        if full_old and (b_old, old_parent.ino) != (b_new, new_parent.ino):
            tree.remove_long_name(old_parent.fd, b_old)
        if self.audit is not None:  # the moved inode's path, for its later records
            st = os.stat(b_new, dir_fd=new_parent.fd, follow_symlinks=False)
            self._paths[self._fuse_ino(st.st_ino)] = self._name_path(parent_inode_new, name_new)

    # -- regular files ------------------------------------------------------------------------
    @_edge("inode", "open")
    def open(self, inode_no: int, flags: int, ctx: Request) -> OpenOut | views.Wanted:
        """The open, decided; or the large masked view it needs made first (then
        the caller defers the reply and runs :meth:`open_view`)."""
        return self._open_now(inode_no, flags, ctx)

    @_edge("inode", "open")
    async def open_view(self, inode_no: int, flags: int, wanted: views.Wanted,
                        ctx: Request) -> OpenOut:
        """The rest of an open that :meth:`open` answered with ``wanted``."""
        return await self._open_view(wanted, inode_no, flags, ctx)

    def _open_now(self, inode_no: int, flags: int, ctx: Request,
                  built: views.Built | None = None) -> OpenOut | views.Wanted:
        """Decide an open and act on it, or say which masked view it needs
        made first (``built``: the view made since, used only if it was made
        from what this decision names)."""
        self._allow(ctx.uid)
        inode = self._inode(inode_no)
        self._refresh_config()  # (a stat: a rule set since the mount started applies)
        want_write = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if ctx.uid in self._cipher_only:
            self._decision = {"decision": f"role {self._role_of(ctx.uid)}: "
                                          + ("writes no customer data" if want_write
                                             else "served the ciphertext")}
            if want_write:
                raise FuseError(errno.EACCES)
            return self._ciphertext_handle(inode, ctx.uid, flags, ctx.pid)
        if self._program_rules:
            rule = self._untrusted_by(self._programs_of(inode), ctx.pid)
            if rule is not None:
                if rule.untrusted != "ciphertext" or want_write:
                    raise FuseError(errno.EACCES)
                return self._ciphertext_handle(inode, ctx.uid, flags, ctx.pid)
        if ctx.uid in self._masked and self._mask_rules and inode.kind == stat.S_IFREG:
            mask = self._mask_of(inode)
            if mask is not None:
                return self._masked_handle(inode, mask, ctx.uid, flags, ctx.pid, built)
        self._exclusive(inode, view=False)  # (before O_TRUNC changes anything)
        try:
            content = self._content(inode, want_write, ctx.uid)
            if flags & os.O_TRUNC:
                ownreads.changed_by(inode.handles, ctx.uid)
                content.truncate(0)
        except BaseException:
            self._unload_content(inode)
            raise
        return self._open_handle(inode, ctx.uid, flags, ctx.pid)

    @_edge("fh")
    def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._files[fh]
        if self.gated:
            self._recheck_soon()
        if handle.policy is not self.policy and handle.view is None and handle.raw < 0:
            self._still_allowed(handle)
        if handle.raw >= 0:
            self._handle(fh, reading=True)  # (the same gate as any read)
            data = os.pread(handle.raw, size, off)
        elif handle.view is not None:
            self._handle(fh, reading=True)
            data = handle.view[off:off + size]
        else:
            inode = self._handle(fh, reading=True)
            self._own_reads(handle, inode)
            data = self._content(inode, want_write=False).read(off, size)
        if self.audit is not None:  # (counted for the close record only)
            self._files[fh].nread += len(data)
        return data

    @_edge("fh")
    def write(self, fh: int, off: int, buf: bytes | memoryview) -> int:
        handle = self._files[fh]
        if self.gated:
            self._recheck_soon()
        if handle.policy is not self.policy and handle.view is None:
            self._still_allowed(handle)
        elif handle.policy is not self.policy:
            self._view_still_writable(handle)
        content = self._content(self._handle(fh), want_write=True)
        if handle.view is not None and off < content.size:
            raise FuseError(errno.EACCES)  # (a masked view appends; it never overwrites)
        if handle.uid in self._masked:
            self._mark_agent_rows(handle.inode)
        ownreads.changed_by(handle.inode.handles, handle.uid)
        n = content.write(off, buf)
        if self.audit is not None:
            self._files[fh].nwritten += n
        return n

    @_edge("fh")
    def flush(self, fh: int) -> None:
        # Every write is already in the backing file, so there is nothing to
        # do; ENOSYS tells the kernel to stop sending FLUSH (one request less
        # per close).  It still writes its dirty pages back before close returns.
        raise FuseError(errno.ENOSYS)

    @_edge("fh")
    def fsync(self, fh: int, datasync: bool) -> None:
        fd = self._handle(fh).fd
        if datasync:
            os.fdatasync(fd)
        else:
            os.fsync(fd)

    @_edge("fh")
    def fallocate(self, fh: int, off: int, length: int, mode: int) -> None:
        """fallocate(2) on the plaintext, with the checks of a write.  Mode 0
        reserves backing space for the range and extends the file (zeros) if it
        ends past the end; KEEP_SIZE only reserves; PUNCH_HOLE|KEEP_SIZE makes the
        range read as zeros (whole blocks become holes: ContentFile.punch);
        ZERO_RANGE writes zeros (space stays allocated) and, without KEEP_SIZE,
        extends as mode 0 does.  Other modes (collapse, insert, unshare): EOPNOTSUPP."""
        keep, punch, zero = sysio.FALLOC_FL_KEEP_SIZE, sysio.FALLOC_FL_PUNCH_HOLE, \
            sysio.FALLOC_FL_ZERO_RANGE
        if mode & ~(keep | punch | zero) or (mode & punch and mode != punch | keep):
            raise FuseError(errno.EOPNOTSUPP)
        handle = self._files[fh]
        if self.gated:
            self._recheck_soon()
        if handle.policy is not self.policy and handle.view is None:
            self._still_allowed(handle)
        if handle.view is not None or handle.raw >= 0:
            self._decision = {"decision": "no fallocate through a masked or encrypted view"}
            raise FuseError(errno.EACCES)  # (a masked view only appends rows)
        content = self._content(self._handle(fh), want_write=True)
        if handle.uid in self._masked:
            self._mark_agent_rows(handle.inode)
        ownreads.changed_by(handle.inode.handles, handle.uid)
        end = off + length
        if mode & punch:
            content.punch(off, length)
            return
        if mode & zero:
            content.zero(off, length)
        if end > content.size and not mode & keep:
            content.reserve(content.size, end - content.size)
            content.truncate(end)
        elif not mode & zero:
            content.reserve(off, length)

    def kill_suidgid(self, ino: int) -> None:
        """Clear a regular file's set-user-ID bit, and its set-group-ID bit if it is
        group-executable, as the kernel does for a write by an unprivileged caller
        (HANDLE_KILLPRIV_V2 hands that to the filesystem; cryptfs.frontend calls
        this after a write, truncate or O_TRUNC open the kernel marked)."""
        inode = self._inodes.get(ino)
        if inode is None or inode.kind != stat.S_IFREG:
            return
        mode = os.fstat(inode.fd).st_mode
        kill = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
        if mode & kill:
            os.chmod(proc_path(inode.fd), stat.S_IMODE(mode) & ~kill)

    @_edge("fh")
    def release(self, fh: int) -> None:
        handle = self._files.pop(fh)
        if handle.raw >= 0:
            os.close(handle.raw)
        self._audit_close(handle)
        inode = handle.inode
        inode.handles.discard(handle)
        self._unload_content(inode)
        self._maybe_drop(inode)

    # -- directories -----------------------------------------------------------------------------
    @_edge("inode")
    def opendir(self, inode_no: int, ctx: Request) -> int:
        self._allow(ctx.uid)
        inode = self._inode(inode_no)
        fh = self._new_fh()
        self._dirs[fh] = _Dir(inode, ctx.uid)
        return fh

    def _snapshot(self, inode: Inode) -> list[tuple[bytes, str | None]]:
        diriv = self._diriv(inode)
        lfd = tree.open_dir(inode.fd)
        try:
            names = tree.list_entries(lfd)
        finally:
            os.close(lfd)
        entries: list[tuple[bytes, str | None]] = [(b".", None), (b"..", None)]
        bad = 0
        for backing in names:
            try:
                entries.append((tree.decrypt_entry(inode.fd, backing, diriv, self.codec), backing))
            except Exception:  # noqa: BLE001 - one bad entry must not hide the directory
                bad += 1
        if bad:
            log.warning("directory inode %d: %d entries that do not decrypt are hidden",
                        inode.ino, bad)
        return entries

    @_edge("dir")
    def readdir(self, fh: int, start_id: int, token: Callable[[bytes, EntryOut, int], bool]
                ) -> None:
        """Entries from ``start_id`` on, each given to ``token`` (name, entry, the
        next entry's id) until it returns False (the reply is full).  Every entry
        given counts as one lookup (the reply is a READDIRPLUS)."""
        d = self._dirs[fh]
        self._allow(d.uid)
        inode = d.inode
        if d.entries is None or start_id == 0:
            d.entries = self._snapshot(inode)
        for i in range(start_id, len(d.entries)):
            p_name, backing = d.entries[i]
            child: Inode | None = None
            if backing is None:
                if p_name == b"." or inode.ino == ROOT:
                    st = os.fstat(inode.fd)
                    attr = self._attr(inode, st)
                else:
                    st = os.stat("..", dir_fd=inode.fd)
                    attr = self._attr(Inode(self._fuse_ino(st.st_ino), -1, stat.S_IFDIR), st)
            else:
                # One entry that cannot be served is skipped, never the listing:
                # failing the request would also drop the entries already in the
                # reply, whose lookup counts the kernel would never give back.
                try:
                    st = os.stat(backing, dir_fd=inode.fd, follow_symlinks=False)
                    child, st = self._remember(inode.fd, backing, st, count=0)
                    attr = self._attr(child, st)
                except FileNotFoundError:
                    continue
                except (OSError, FuseError) as e:
                    if child is not None:
                        self._maybe_drop(child)
                    log.warning("directory inode %d: an entry is hidden (%s)", inode.ino,
                                os.strerror(e.errno) if e.errno else type(e).__name__)
                    continue
            if not token(p_name, attr, i + 1):
                if child is not None:
                    self._maybe_drop(child)
                break
            if child is not None:
                child.nlookup += 1

    @_edge("dir")
    def releasedir(self, fh: int) -> None:
        del self._dirs[fh]

    @_edge("dir")
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        lfd = tree.open_dir(self._dirs[fh].inode.fd)
        try:
            os.fsync(lfd)
        finally:
            os.close(lfd)

    @_edge("none")
    def statfs(self, ctx: Request) -> StatfsOut:
        sv = os.statvfs(self.vol.tree)
        return StatfsOut(sv.f_blocks, sv.f_bfree, sv.f_bavail, sv.f_files, sv.f_ffree,
                         sv.f_bsize, NAME_MAX, sv.f_frsize)

    # -- rotation inside the mount ---------------------------------------------------------------
    def _rotation_request(self, uid: int, value: bytes) -> None:
        """`cryptfs rotate` wrote a new key generation into the config and asks
        this mount to walk its files (it holds them open: nobody else may)."""
        if value != b"go":
            raise FuseError(errno.EINVAL)
        self._config_stamp = None
        self._refresh_config()
        if self.keys is None or self.keys.key_id != self.config.key_id:
            log.warning("rotation requested, but this mount does not hold the new key "
                        "generation (yet)")
            raise FuseError(errno.EBUSY)
        if self._rotation is not None and self._rotation.state == "running":
            return
        kind = self.config.rotation["kind"] if self.config.rotation else None
        self._rotation = rotate.Progress(kind or "slots")
        if kind is None:
            self._rotation.state = "finished"
            return
        log.info("rotation (%s) to key generation %d: walking the files (asked by uid %d)",
                 kind, self.keys.key_id, uid)
        self._rotation_wanted.set()

    def _command_record(self, ctx: Request, value: bytes) -> None:
        """A command (`cryptfs user add` ...) hands its record to this mount,
        which holds the log: written with the uid and pid of the request, so a
        user can only record things under their own name, and only what their
        role may do (cryptfs.roles.claim_refusal).  A refused claim is
        recorded as ``command-record`` denied, and the request fails EACCES."""
        if self.audit is None:
            raise FuseError(errno.EXDEV)
        if not self._may_rotate(ctx.uid):  # (root, the owner, or a user who is unlocked)
            self._refuse_claim(ctx, None, "not unlocked")
        try:
            event, outcome, fields = parse_command_record(value)
        except ValueError:
            raise FuseError(errno.EINVAL) from None
        fields.setdefault("backing", self.vol.backing)
        logdir = fields.pop("logdir", None)
        if logdir is not None and logdir != os.path.realpath(self.audit.log.logdir):
            raise FuseError(errno.EXDEV)  # (the volume is bound to another log)
        if ctx.uid not in (0, self._euid):
            self._refresh_config()  # (a role changed a moment ago counts)
            why = claim_refusal(slot_for_uid(self.config, ctx.uid), event, outcome, fields)
            if why is not None:
                self._refuse_claim(ctx, event, why)
        if not self.audit.write(event, outcome, ctx.uid, ctx.pid, **fields):
            raise FuseError(errno.EIO)

    def _refuse_claim(self, ctx: Request, event: str | None, why: str) -> None:
        """Record a command's record that was refused (what it claimed, and why), then fail."""
        assert self.audit is not None
        if not self.audit.write("command-record", "denied", ctx.uid, ctx.pid, path="/",
                                claimed=event or "?", reason=why):
            raise FuseError(errno.EIO)
        raise FuseError(errno.EACCES)

    def _may_rotate(self, uid: int) -> bool:
        """Root, the mount's owner, or an unlocked user may ask for the walk:
        it only carries out what the authenticated config already says (a
        passphrase was needed to write that), and reveals no plaintext."""
        return uid in (0, self._euid) or not self.gated or uid in self._unlocked

    def _rotation_progress(self) -> bytes:
        if self._rotation is None:
            return b'{"state": "idle"}'
        return json.dumps(self._rotation.to_json()).encode()

    async def rotation_worker(self) -> None:
        """Runs the walks that :meth:`_rotation_request` asks for, one file per
        step between requests (each step runs to completion on this thread,
        so no request sees a file half rotated)."""
        while True:
            await self._rotation_wanted.wait()
            self._rotation_wanted = trio.Event()
            prog = self._rotation
            assert prog is not None and self.keys is not None
            # The walk opens hybrid files with every user key this mount holds
            # (the keys of the users unlocked when it starts, or its own user's).
            keyring = self.keys.keyring([p.reveal() for p in self._all_privates()])
            try:
                rels = [rel for _, _, rel in rotate.regular_files(self._tree_root)]
                prog.total = len(rels)
                for rel in rels:
                    await trio.sleep(0)
                    if self.keys is None:
                        raise CryptfsError("the volume was locked during the rotation")
                    self._rotate_path(rel, prog, keyring)
                    prog.done += 1
                # Files renamed during the walk may have been missed: one pass that
                # cannot be interrupted checks every header, then the old keys go.
                self._rotation_final(prog, keyring)
            except Exception as e:  # noqa: BLE001 - reported through the progress xattr
                prog.state = "failed"
                prog.message = (str(e) if isinstance(e, CryptfsError)
                                else getattr(e, "strerror", None) or f"{type(e).__name__}: {e}")
                log.error("rotation failed: %s (run cryptfs rotate again to resume)", prog.message)

    def _rotate_path(self, rel: str, prog: rotate.Progress, keyring: Keyring) -> None:
        assert self.keys is not None
        target = f"tree/{rel}"
        try:
            fd = os.open(rel, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._inodes[ROOT].fd)
        except FileNotFoundError:
            return
        except OSError as e:
            prog.failed.append(f"{target} ({e.strerror})")
            return
        try:
            inode = self._inodes.get(self._fuse_ino(os.fstat(fd).st_ino))
            content = inode.content if inode is not None else None
            damaged = len(prog.damaged)
            new = rotate.step(fd, content, keyring, self.keys, self.config, prog,
                              self.vol.backing, target)
            if len(prog.damaged) > damaged:
                log.error("inode %s: damaged, so not re-encrypted (its readable blocks stay "
                          "readable)", inode.ino if inode is not None else "?")
            if new is not None:
                if inode is not None:
                    if content is not None:
                        new.fd = inode.fd
                        inode.content = new
                    inode.meta = (new.overhead, new.h_len)
                self._set_layout_hint(fd, new)
        finally:
            os.close(fd)

    def _rotation_final(self, prog: rotate.Progress, keyring: Keyring) -> None:
        assert self.keys is not None
        for _, _, rel in rotate.regular_files(self._tree_root):
            target = f"tree/{rel}"
            try:
                fd = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=self._inodes[ROOT].fd)
            except FileNotFoundError:
                continue
            except OSError as e:
                prog.failed.append(f"{target} ({e.strerror})")
                continue
            try:
                stanzas = read_stanzas(fd)
            except IntegrityError:
                continue  # a header that does not parse opens with no key
            except OSError as e:
                prog.failed.append(f"{target} ({e.strerror})")
                continue
            finally:
                os.close(fd)
            if rotate.is_stale(stanzas, self.keys, self.config) and target not in prog.skipped \
                    and target not in prog.damaged and not any(f.startswith(target + " ")
                                                               for f in prog.failed):
                self._rotate_path(rel, prog, keyring)
        finished = False
        if not prog.failed:
            os.sync()
            done = rotate.finish_config(self.vol.backing, self.keys)
            if done is not None:
                self.config, keys = done
                self._config_stamp = self._stat_config()
                self._swap_keys(keys)
                finished = True
        rotate.outcome(prog, finished)
        log.info("rotation (%s) walked: %d of %d files rewritten, %d bytes%s", prog.kind,
                 prog.changed, prog.total, prog.bytes,
                 "; the old key generations are forgotten" if finished else "")
        if prog.message:
            log.warning("rotation (%s): %s", prog.kind, prog.message)

    def _all_privates(self) -> list[Secret]:
        out = list(self._privates.values())
        if self._own_private is not None and len(self._own_private):
            out.append(self._own_private)
        return out

    # -- sharing hybrid files -----------------------------------------------------------------------
    def _recipients(self, inode: Inode) -> bytes:
        """Names of a hybrid file's recipients, one per line ("recovery" for the
        recovery key, "?" + tag for a key no user of the volume has any more);
        empty for a symmetric file.  Read from the header without a key."""
        fd = os.open(proc_path(inode.fd), os.O_RDONLY | os.O_CLOEXEC)
        try:
            stanzas = read_stanzas(fd)
        finally:
            os.close(fd)
        names = {recipient_tag(pub): n for n, pub in self.config.publics().items()}
        if self.config.recovery is not None:
            names[recipient_tag(self.config.recovery.public)] = "recovery"
        return b"".join((names.get(t) or "?" + t.hex()).encode() + b"\n"
                        for t in recipient_tags(stanzas))

    def _share(self, inode: Inode, uid: int, value: bytes) -> None:
        """Wrap a hybrid file's key to one more user; only a recipient can (the
        file key is needed).  It takes a padding stanza's room, so the header
        keeps its length and no content moves."""
        try:
            name = value.decode("utf-8")
        except UnicodeDecodeError:
            raise FuseError(errno.EINVAL) from None
        self._refresh_config()
        public = self.config.publics().get(name)
        if public is None:
            raise FuseError(errno.ENOENT)  # no such user with a key pair
        try:
            content = self._content(inode, want_write=True, uid=uid)
            hdr = content.header
            if not hdr.hybrid:
                raise FuseError(errno.EINVAL)  # symmetric: every user can already
            if recipient_tag(public) in recipient_tags(hdr.stanzas):
                return
            stanzas = list(hdr.stanzas)
            need = 3 + X25519_BODY_LEN
            room = next((i for i, st in enumerate(stanzas)
                         if st.type == STANZA_PADDING and 3 + len(st.body) >= need), None)
            if room is None:
                raise FuseError(errno.ENOSPC)  # no room left in the header
            left = 3 + len(stanzas[room].body) - need
            new = [x25519_stanza(hdr.file_key, public, hdr.wrap_ad(hdr.mode, hdr.file_id))]
            if left:
                new.append(padding(left))
            stanzas[room:room + 1] = new
            fresh = hdr.with_stanzas(stanzas)
            assert fresh.length == hdr.length
            pwrite_all(inode.fd, [fresh.encode()], 0)
            os.fsync(inode.fd)
            content.header = fresh
            log.info("inode %d: shared with %s by uid %d", inode.ino, name, uid)
        finally:
            self._unload_content(inode)

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

    # -- shutdown -------------------------------------------------------------------------------------
    def close(self) -> None:
        for inode in list(self._inodes.values()):
            os.close(inode.fd)
        self._inodes.clear()
        os.close(self._backing_fd)
        self._forget_privates()


__all__ = ["CryptOperations", "BlockError"]
