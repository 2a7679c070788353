"""The state of one mounted volume and its inode table.

:class:`Core` holds what every concern of the request handlers shares: the
volume, its keys and policy, the inodes the kernel has looked up (each with a
descriptor of its backing object, see cryptfs.fs.inodes), the open handles,
and the access log.  The handlers live in one mixin per concern
(cryptfs.fs.dirs, .content_io, .xattrs, ...); cryptfs.fs.operations composes
them into :class:`CryptOperations`.  Under ``TYPE_CHECKING`` this class also
names what one concern calls of another, so mypy checks those calls.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import trio

from cryptfs import follow, links, ownreads, rotate, views
from cryptfs.audit import Auditor
from cryptfs.content import CheckedHeader, ContentFile
from cryptfs.decision import Decision, Op
from cryptfs.fs.closer import Closer
from cryptfs.fs.inodes import Handle, Inode, MaskedView, PlainHandle, _Dir
from cryptfs.fs.shedder import Shedder
from cryptfs.fuse import EntryOut, FuseError, OpenOut
from cryptfs.fuse.abi import ROOT_ID
from cryptfs.fuse.requests import Request
from cryptfs.keys import VolumeKeys
from cryptfs.modes.content import ContentMode
from cryptfs.modes.wrap import (
    Keyring,
    SymmetricWrapper,
)
from cryptfs.names import (
    NameCodec,
)
from cryptfs.policy import MaskRule, Policy, Rule
from cryptfs.programs import Identifier
from cryptfs.secret import Secret
from cryptfs.tree import O_PATH_FLAGS, proc_path
from cryptfs.volume import LockedVolume, Volume

log = logging.getLogger("cryptfs")

ROOT = ROOT_ID
ROOT_ATTR_TIMEOUT = 60.0  # seconds
HYBRID_SPARE = 4  # recipients a hybrid file has room to be shared with later
# Headers kept between opens (CheckedHeader, about 2.4 KB each with its cipher):
# the most recently checked ones, so a tree of 100,000 files costs ~10 MB, not 240.
KEPT_HEADERS = 4096
MAX_MASKED = 64 << 20  # a structured file larger than this gets no masked view (memory)
VIEW_BYTES_PER_UID = 256 << 20  # masked views one user may hold open at once (memory)
GATED_ATTR_TIMEOUT = 0.001  # seconds: one kernel clock tick (1-4 ms)


def view_budget() -> int:
    """Bytes of masked views one user may hold open: VIEW_BYTES_PER_UID, or
    CRYPTFS_VIEW_MEMORY_MIB in the mount's environment (a systemd unit's
    Environment=); at least 1 MiB."""
    text = os.environ.get("CRYPTFS_VIEW_MEMORY_MIB", "")
    try:
        mib = int(text) if text else VIEW_BYTES_PER_UID >> 20
    except ValueError:
        log.warning("CRYPTFS_VIEW_MEMORY_MIB=%r is not a number of MiB: %d used", text,
                    VIEW_BYTES_PER_UID >> 20)
        mib = VIEW_BYTES_PER_UID >> 20
    return max(mib << 20, 1 << 20)


class _NoKeys:
    """Stands in for the name codec and key wrapper while the volume is locked
    (agent mode, nobody unlocked): any use fails closed.  The access checks
    deny such requests first; this is the second line."""

    def __getattr__(self, name: str) -> Any:
        raise FuseError(errno.EACCES)


_NO_KEYS: Any = _NoKeys()


class Core:
    """What every concern of the handlers shares: the volume's state, its inode
    table and open handles (composed into cryptfs.fs.operations.CryptOperations)."""

    enable_writeback_cache = True

    if TYPE_CHECKING:
        # What one concern calls of another (defined in the module named).
        # cryptfs.fs.access
        def _decide_open(self, ctx: Request, inode: Inode, flags: int) -> Decision: ...
        def _decide_create(self, ctx: Request, where: str | None) -> Decision: ...
        def _decide_truncate(self, ctx: Request, inode: Inode, own_handle: bool
                             ) -> Decision: ...
        def _programs_of(self, inode: Inode) -> list[Rule] | None: ...
        def _names_of(self, inode: Inode) -> links.Names: ...
        def _guard_link(self, ctx: Request, inode: Inode, dst_dir: str | None,
                        new_name: bytes) -> None: ...
        def _guard_file(self, ctx: Request, where: str | None, p_name: bytes,
                        st: os.stat_result, op: Op) -> None: ...
        def _allow(self, uid: int) -> None: ...
        def _plain(self, uid: int) -> None: ...
        def _exclusive(self, inode: Inode, view: bool) -> None: ...
        def _recheck_soon(self) -> None: ...
        def _still_allowed(self, handle: PlainHandle) -> None: ...
        def _guard_move(self, ctx: Request, src_dir: str | None,
                        src_name: str | bytes | None, dst_dir: str | None, dst_name: str | bytes,
                        is_dir: bool) -> None: ...
        def _role_of(self, uid: int) -> str: ...
        # cryptfs.fs.attrs
        def _attr(self, inode: Inode, st: os.stat_result) -> EntryOut: ...
        def _target(self, inode: Inode) -> bytes: ...
        def _negative(self) -> EntryOut: ...
        # cryptfs.fs.audit_hooks
        def _name_path(self, parent_ino: int, name: bytes) -> str: ...
        def _audit_close(self, handle: Handle) -> None: ...
        def _command_record(self, ctx: Request, value: bytes) -> None: ...
        # cryptfs.fs.content_io
        def _layout(self, inode: Inode) -> tuple[ContentMode, int]: ...
        def _set_layout_hint(self, fd: int, content: ContentFile) -> None: ...
        def _content(self, inode: Inode, want_write: bool, uid: int | None = None) -> ContentFile: ...
        def _unload_content(self, inode: Inode) -> None: ...
        def _open_handle(self, handle: Handle, pid: int, decision: Decision) -> OpenOut: ...
        def _open_now(self, inode_no: int, flags: int, ctx: Request,
                      built: views.Built | None = None) -> OpenOut | views.Wanted: ...
        # cryptfs.fs.dirs
        def _plain_dir(self, parent: Inode) -> str | None: ...
        def _plain_dir_of(self, inode: Inode) -> str | None: ...
        # cryptfs.fs.filekeys
        def _public_of(self, uid: int) -> bytes | None: ...
        def _new_file_keys(self, parent: Inode, uid: int) -> tuple[ContentMode, Any]: ...
        def _keyring(self, uid: int | None) -> Keyring: ...
        def _check_recipient(self, content: ContentFile, uid: int) -> None: ...
        def _all_privates(self) -> list[Secret]: ...
        def _recipients(self, inode: Inode) -> bytes: ...
        def _share(self, inode: Inode, uid: int, value: bytes) -> None: ...
        # cryptfs.fs.gate
        def _stat_config(self) -> tuple[int, int, int, int] | None: ...
        def _refresh_config(self) -> set[int]: ...
        def _reread_config(self) -> set[int]: ...
        def _install(self, keys: VolumeKeys) -> None: ...
        def _swap_keys(self, keys: VolumeKeys) -> None: ...
        def _forget_privates(self, uid: int | None = None) -> None: ...
        # cryptfs.fs.masked
        def _find_mask(self, inode: Inode) -> tuple[MaskRule | None, str]: ...
        def _mask_of(self, inode: Inode) -> MaskRule | None: ...
        def _plain_name_of(self, inode: Inode) -> str | None: ...
        def _masked_handle(self, inode: Inode, rule: MaskRule, uid: int, flags: int, pid: int,
                           decision: Decision, built: views.Built | None = None
                           ) -> OpenOut | views.Wanted: ...
        def _mark_agent_rows(self, inode: Inode) -> None: ...
        def _view_still_writable(self, handle: MaskedView) -> None: ...
        async def _open_view(self, wanted: views.Wanted, inode_no: int, flags: int,
                             ctx: Request) -> OpenOut: ...
        # cryptfs.fs.rotation
        def _rotation_request(self, uid: int, value: bytes) -> None: ...
        def _may_rotate(self, uid: int) -> bool: ...
        def _rotation_progress(self) -> bytes: ...

    def __init__(self, vol: Volume | LockedVolume, *, timeout: float = 60.0,
                 shared_storage: bool = False) -> None:
        self.vol = vol
        # Other mounts (other servers) change the backing directory too: keep
        # nothing that they could make stale (see below and docs/MULTISERVER.md).
        self.shared_storage = shared_storage
        self._closer = Closer()  # (forgotten inodes' descriptors: cryptfs.fs.closer)
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
        self._view_bytes: dict[int, int] = {}  # bytes of masked views each uid holds open
        self._foreign_seen = False  # a handle became foreign once (cryptfs.ownreads): reads ask
        self._view_budget = view_budget()
        self._mask_rules = False  # (whether a rule names masks)
        self._rechecked = 0.0  # when reads last looked at the config
        self._identify = Identifier()  # which program asks (trusted-programs rules)
        # X25519 private keys that open hybrid files: per unlocked uid (gated,
        # from the agent), or the mount's own user's for every request.
        self._privates: dict[int, Secret] = {}
        self._keyrings: dict[int | None, Keyring] = {}  # by uid (gated) or None: see _keyring
        self._own_private: Secret | None = getattr(vol, "private", None)
        self._plain_paths: dict[str, bytes | None] = {}  # backing dir path -> plaintext path
        # Every name of hard-linked files (see _names_of); with shared storage
        # none is kept: another server's renames do not move self._epoch.
        self._names = links.NamesCache(enabled=not shared_storage)
        self._epoch = 0  # renames made here that may move other files' names
        self.names_walks = 0  # (how often those names were looked for in the tree)
        self._backing_fd = os.open(vol.backing, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._config_stamp = self._stat_config()
        # (stamp, when) of the last re-read that failed: tried again every
        # follow.CHECK_EVERY, not on every request (cryptfs.fs.gate)
        self._config_failed: tuple[follow.Stamp | None, float] | None = None
        # A passphrase mount whose own key slot left the config (cryptfs.fs.gate):
        # serves nothing more; the open files' pages are still to be dropped.
        self._own_slot_gone = False
        self._drop_all_pages = False
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
        if shared_storage:
            # The kernel keeps no entry, no attribute (a size) and, without
            # the writeback cache, no dirty page of its own; the page cache is
            # dropped at each open (cryptfs.fs.content_io), so an open sees
            # what the other server wrote and closed (close-to-open).
            timeout = 0.0
            self.attr_timeout = 0.0
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
        # Hands old, unused inodes back to the kernel before their descriptors
        # reach the limit (cryptfs.fs.shedder; the frontend gives it the session).
        self.shedder = Shedder(self._inodes, ROOT, self._fuse_ino, lambda: self.codec)
        self._kept: OrderedDict[Inode, None] = OrderedDict()  # inodes with .checked, oldest first
        self._files: dict[int, Handle] = {}
        self._dirs: dict[int, _Dir] = {}
        self._next_fh = 1
        self._layout_hints = True  # until the backing filesystem refuses an xattr
        self._views = views.ViewMaker()  # large masked views: made in threads, bounded
        # Drops an inode's cached attributes and pages in the kernel (from a
        # worker thread: the kernel may wait for a read only the loop answers).
        # Set by the frontend to its session's notify_inval_inode.
        self.invalidate_inode: Callable[[int], object] = lambda ino: None

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
        ``st`` must then be that descriptor's own fstat (it is not taken again).
        """
        if st.st_dev != self._dev:
            if opened:
                os.close(opened[0])
            log.error("backing entry on another filesystem refused (inode %d)", st.st_ino)
            raise FuseError(errno.EXDEV)
        inode = self._inodes.get(self._fuse_ino(st.st_ino))
        if inode is None:
            if opened is None and len(self._inodes) >= self.shedder.cap:
                # (the last descriptors stay for handles and for the shedder,
                # which is asking the kernel to let go of old inodes meanwhile;
                # a descriptor the caller holds already is kept)
                self.shedder.note(len(self._inodes))
                raise OSError(errno.EMFILE, "too many inodes held at once")
            if opened is None:  # (stat again through the descriptor: the entry may have changed)
                if self.shared_storage:
                    # No backing file held open between opens: the backing
                    # filesystem's client would keep its attributes (JuiceFS does).
                    fd, access = os.open(backing, O_PATH_FLAGS, dir_fd=dir_fd), os.O_PATH
                else:
                    fd, access = self._open_entry(dir_fd, backing, st)
                st = os.fstat(fd)
            else:
                fd, access = opened
            ino = self._fuse_ino(st.st_ino)
            inode = self._inodes.get(ino)
            if inode is None:
                kind = stat.S_IFMT(st.st_mode)
                inode = Inode(ino, fd, kind, access if kind == stat.S_IFREG else os.O_PATH)
                self._inodes[ino] = inode
                self.shedder.note(len(self._inodes))
            else:
                os.close(fd)
        elif opened:
            os.close(opened[0])
        inode.nlookup += count
        return inode, st

    def _changed_by(self, handles: Iterable[Handle], uid: int) -> None:
        """``uid`` is about to change a file's plaintext (cryptfs.ownreads); until
        a handle first becomes foreign, a read asks nothing of its file's handles."""
        if ownreads.changed_by(handles, uid):
            self._foreign_seen = True

    def _keep_checked(self, inode: Inode, checked: CheckedHeader | None) -> None:
        """Keep ``checked`` on the inode for its next open, forgetting the header
        kept longest ago beyond KEPT_HEADERS (that file's next open authenticates
        its header in full again)."""
        inode.checked = checked
        kept = self._kept
        if checked is None:
            kept.pop(inode, None)
            return
        kept[inode] = None
        kept.move_to_end(inode)
        if len(kept) > KEPT_HEADERS:
            kept.popitem(last=False)[0].checked = None

    def _forget_checked(self) -> None:
        """Drop every kept header (the keys they were checked with are gone)."""
        for inode in self._kept:
            inode.checked = None
        self._kept.clear()

    def _maybe_drop(self, inode: Inode) -> None:
        if inode.nlookup <= 0 and not inode.handles and inode.ino != ROOT:
            del self._inodes[inode.ino]
            if inode.checked is not None:
                self._keep_checked(inode, None)
            self._paths.pop(inode.ino, None)
            if self.shared_storage:
                os.close(inode.fd)
            else:
                self._closer.close(inode.fd)

    # -- descriptors -----------------------------------------------------------------------
    def _reopen(self, inode: Inode, access: int) -> None:
        """Replace the inode's descriptor by one opened with ``access``."""
        fd = os.open(proc_path(inode.fd), access | os.O_CLOEXEC)
        os.close(inode.fd)
        inode.fd = fd
        inode.access = access
        if inode.content is not None:
            inode.content.fd = fd

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
        elif self._own_slot_gone:
            raise FuseError(errno.EACCES)  # (its user was removed: cryptfs.fs.gate)
        return inode

    # -- shutdown -------------------------------------------------------------------------------------
    def close(self) -> None:
        self._closer.drain()
        for inode in list(self._inodes.values()):
            os.close(inode.fd)
        self._inodes.clear()
        os.close(self._backing_fd)
        self._forget_privates()
