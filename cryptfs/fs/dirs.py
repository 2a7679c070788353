"""Names and directories: lookup, create, mkdir, mknod, symlink, link,
unlink, rmdir, rename, readdir, and the name encryption of each entry.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence

from cryptfs import links, sysio, tree
from cryptfs.content import ContentFile
from cryptfs.decision import Op
from cryptfs.fs import shared
from cryptfs.fs.audit_hooks import _edge
from cryptfs.fs.core import (
    ROOT,
    Core,
)
from cryptfs.fs.inodes import Inode, PlainHandle, _Dir, readable
from cryptfs.fuse import Attr, EntryOut, FuseError, OpenOut
from cryptfs.fuse.requests import Request
from cryptfs.modes.errors import IntegrityError
from cryptfs.modes.wrap import RecipientWrapper
from cryptfs.names import (
    LONG_PREFIX,
    MAX_SYMLINK_TARGET,
    NAME_MAX,
)
from cryptfs.tree import O_PATH_FLAGS, proc_path

log = logging.getLogger("cryptfs")


class Directories(Core):
    """Names and directories (see the module)."""

    def _backing(self, parent: Inode, name: bytes) -> tuple[str, str | None]:
        if len(name) > NAME_MAX:
            raise FuseError(errno.ENAMETOOLONG)
        return self.codec.backing_name(name, self._diriv(parent))

    @contextlib.contextmanager
    def _long_name(self, parent: Inode, backing: str, full: str | None) -> Iterator[None]:
        """Write a long name's side file for the operation inside the block;
        remove it again if the operation fails and the side file is new.
        Another mount of the backing directory may make or remove the same
        name meanwhile: both ends check the other (tree.keep_long_name)."""
        created = full is not None and tree.write_long_name(parent.fd, backing, full)
        try:
            yield
        except BaseException:
            if created:  # (unless another mount made the entry meanwhile: see there)
                tree.remove_long_name(parent.fd, backing, full)
            raise
        if full is not None:
            tree.keep_long_name(parent.fd, backing, full)

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

    # -- the plaintext path of a directory (for its rules) ----------------------------------
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
        parent = self._inode(parent_inode)
        decision = self._decide_create(
            ctx, self._plain_dir(parent) if self._program_rules else None)
        backing, full = self._backing(parent, name)
        # Shared storage: made under a temporary name and renamed into place
        # with its header, so another server never finds it empty (EIO).
        made = tree.temp_name() if self.shared_storage else backing
        with self._long_name(parent, backing, full):
            try:
                fd = os.open(made, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC
                             | os.O_NOFOLLOW, stat.S_IMODE(mode), dir_fd=parent.fd)
            except FileExistsError:
                if flags & os.O_EXCL or made != backing:
                    raise
                fd = -1  # made since the kernel's lookup: opened below
            if fd >= 0:
                try:
                    owner = self._owner(ctx, parent)
                    if owner is not None:
                        os.fchown(fd, *owner)
                    mode_, wrapper = self._new_file_keys(parent, ctx.uid)
                    content = ContentFile.create(fd, mode_, wrapper,
                                                 opener=self._keyring(ctx.uid))
                    self._set_layout_hint(fd, content)
                    if made != backing:
                        # The header must be in the storage before the name is:
                        # a backing client may hold writes until a close (JuiceFS
                        # does), and the other server would find the file empty.
                        shared.commit(fd)
                        tree.publish(parent.fd, made, backing)
                except BaseException as e:
                    os.close(fd)
                    os.unlink(made, dir_fd=parent.fd)
                    if not isinstance(e, FileExistsError) or flags & os.O_EXCL:
                        raise
                    fd = -1
        if fd < 0:
            return self._create_existing(parent, backing, flags, ctx)
        inode, st = self._remember(parent.fd, backing, os.fstat(fd), opened=(fd, os.O_RDWR))
        inode.content = content
        self._keep_checked(inode, content.checked)
        inode.meta = (content.overhead, content.h_len)
        # A hybrid file its creator is no recipient of (a drop box): the create
        # handle reads back only its own writes (cryptfs.ownreads).
        not_recipient = (isinstance(wrapper, RecipientWrapper)
                         and self._public_of(ctx.uid) not in wrapper.publics)
        handle = PlainHandle(inode, ctx.uid, readable(flags), own_only=ctx.uid in self._masked,
                             not_recipient=not_recipient)
        return self._open_handle(handle, ctx.pid, decision), self._attr(inode, st)

    def _create_existing(self, parent: Inode, backing: str, flags: int, ctx: Request
                         ) -> tuple[OpenOut, EntryOut]:
        """A create without O_EXCL whose name another mount of the backing
        directory (another server) made after the kernel's lookup found none:
        open that file, as open(2) does.  The kernel checked only the
        directory, so the file's mode is checked here (cryptfs.fs.shared)."""
        st = os.stat(backing, dir_fd=parent.fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise FuseError(errno.EEXIST)
        shared.check_open(st, ctx.uid, ctx.gid, flags)
        inode, st = self._remember(parent.fd, backing, st)
        try:
            fi = self._open_now(inode.ino, flags & ~os.O_CREAT, ctx)
            if not isinstance(fi, OpenOut):
                # A large masked view that a create cannot wait for: the
                # caller's open without O_CREAT can.
                raise FuseError(errno.EAGAIN)
        except BaseException:
            inode.nlookup -= 1
            self._maybe_drop(inode)
            raise
        return fi, self._attr(inode, st)

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
        # (no self._epoch += 1: only this file's link count moved, which
        # its cached names are checked against)
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
            st = os.stat(backing, dir_fd=parent.fd, follow_symlinks=False)
            self._guard_file(ctx, self._plain_dir(parent), name, st, Op.REMOVE)
            # (what was known of its names goes: its inode number may come back
            # for another file, within the same tick of a coarse ctime)
            self._names.drop(st)
        os.unlink(backing, dir_fd=parent.fd)
        # (no self._epoch += 1: only this file's names changed)
        if full:
            tree.remove_long_name(parent.fd, backing, full)

    @_edge("inode", "rmdir")
    def rmdir(self, parent_inode: int, name: bytes, ctx: Request) -> None:
        self._allow(ctx.uid)
        parent = self._inode(parent_inode)
        backing, full = self._backing(parent, name)
        tree.remove_empty_dir(parent.fd, backing)
        # (no self._epoch += 1: an empty directory takes no file's name with it)
        if full:
            tree.remove_long_name(parent.fd, backing, full)

    @_edge("inode", "rename")
    def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Request) -> None:
        self._allow(ctx.uid)
        if flags & ~(sysio.RENAME_NOREPLACE | sysio.RENAME_EXCHANGE):
            # RENAME_WHITEOUT (overlayfs) or a flag this code does not know: it
            # must not pass for a plain rename
            raise FuseError(errno.EINVAL)
        old_parent = self._inode(parent_inode_old)
        new_parent = self._inode(parent_inode_new)
        b_old, full_old = self._backing(old_parent, name_old)
        b_new, full_new = self._backing(new_parent, name_new)
        self._refresh_config()  # (a stat: a rule set since the mount started applies)
        moves_names = True  # (whether other files' names may move: see below)
        kept: links.Names | None = None
        if self._mask_rules or self._program_rules:
            src, dst = self._plain_dir(old_parent), self._plain_dir(new_parent)
            st_old = os.stat(b_old, dir_fd=old_parent.fd, follow_symlinks=False)
            self._guard_move(ctx, src, name_old, dst, name_new, stat.S_ISDIR(st_old.st_mode))
            self._guard_file(ctx, src, name_old, st_old, Op.RENAME)
            try:
                st_new: os.stat_result | None = os.stat(b_new, dir_fd=new_parent.fd,
                                                        follow_symlinks=False)
            except FileNotFoundError:
                st_new = None
            if st_new is not None and flags & sysio.RENAME_EXCHANGE:
                self._guard_move(ctx, dst, name_new, src, name_old, stat.S_ISDIR(st_new.st_mode))
                self._guard_file(ctx, dst, name_new, st_new, Op.RENAME)
            elif st_new is not None and (st_new.st_dev, st_new.st_ino) != (st_old.st_dev,
                                                                          st_old.st_ino):
                self._guard_file(ctx, dst, name_new, st_new, Op.REPLACE)
                self._names.drop(st_new)  # (it loses a name: see unlink)
            moves_names = (bool(flags & sysio.RENAME_EXCHANGE) or src is None or dst is None
                           or not stat.S_ISREG(st_old.st_mode))
            if (stat.S_ISREG(st_old.st_mode) and st_old.st_nlink > 1 and not moves_names
                    and st_new is None):  # (onto another of its own names, nothing moves)
                kept = self._names.get(st_old, self.policy, self._epoch)
        # The cached names of hard-linked files (cryptfs.links.NamesCache) are
        # dropped when a rename may move names of files other than the one
        # renamed: a directory moved (wherever: a directory moved onto a rule's
        # directory brings names under it), an exchange, or a move whose places
        # are unknown.  A regular file's own renames, links and removals change
        # its link count or are put right below, so a user renaming a
        # hard-linked file in a loop does not make the mount walk the tree each
        # time.
        if moves_names:
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
            tree.remove_long_name(old_parent.fd, b_old, full_old)
        if kept is not None:
            self._renamed_names(kept, st_old, src, name_old, dst, name_new, new_parent, b_new)
        if self.audit is not None:  # the moved inode's path, for its later records
            st = os.stat(b_new, dir_fd=new_parent.fd, follow_symlinks=False)
            self._paths[self._fuse_ino(st.st_ino)] = self._name_path(parent_inode_new, name_new)

    def _renamed_names(self, before: links.Names, st_old: os.stat_result, src: str | None,
                       name_old: bytes, dst: str | None, name_new: bytes, new_parent: Inode,
                       b_new: str) -> None:
        """The names of a hard-linked file just renamed, from those it had: one
        moved, the others did not.  Kept for its new stat (its ctime moved)."""
        assert src is not None and dst is not None
        st = os.stat(b_new, dir_fd=new_parent.fd, follow_symlinks=False)
        if (st.st_dev, st.st_ino, st.st_nlink) != (st_old.st_dev, st_old.st_ino, st_old.st_nlink):
            return  # (changed meanwhile: the next guard finds its names afresh)
        after = before.renamed(src, name_old.decode("utf-8", "surrogateescape"),
                               dst, name_new.decode("utf-8", "surrogateescape"), self.policy)
        self._names.put(st, self.policy, self._epoch, after)

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
                plain = self._decrypt_entry(inode, backing, diriv)
            except Exception:  # noqa: BLE001 - one bad entry must not hide the directory
                bad += 1
                continue
            if plain is not None:
                entries.append((plain, backing))
        if bad:
            log.warning("directory inode %d: %d entries that do not decrypt are hidden",
                        inode.ino, bad)
        return entries

    def _decrypt_entry(self, inode: Inode, backing: str, diriv: bytes) -> bytes | None:
        """An entry's plaintext name (None: it was removed meanwhile).  On shared
        storage, a long name whose side file is missing may be one that another
        server is making or removing this instant (the entry and its side file
        are two names, and each side puts back what the other's race took:
        cryptfs.tree.keep_long_name), so it is read again a few times before it
        counts as damaged."""
        waits = (0.01, 0.05, 0.2) if self.shared_storage and backing.startswith(LONG_PREFIX) \
            else ()
        for wait in waits:
            try:
                return tree.decrypt_entry(inode.fd, backing, diriv, self.codec)
            except IntegrityError:
                time.sleep(wait)
                try:
                    os.stat(backing, dir_fd=inode.fd, follow_symlinks=False)
                except FileNotFoundError:
                    return None
        return tree.decrypt_entry(inode.fd, backing, diriv, self.codec)

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
                    if len(self._inodes) < self.shedder.high:
                        child, st = self._remember(inode.fd, backing, st, count=0)
                        attr = self._attr(child, st)
                    else:  # (past the high-water mark a listing leaves lookups to LOOKUP)
                        self.shedder.note(len(self._inodes))
                        attr = self._unlinked_entry(st)
                except FileNotFoundError:
                    continue
                except (OSError, FuseError) as e:
                    if child is not None:
                        self._maybe_drop(child)
                    if e.errno in (errno.EMFILE, errno.ENFILE):
                        # Out of descriptors (cryptfs.fs.shedder is handing old
                        # ones back): listed without a lookup, never hidden; the
                        # kernel looks the name up when it is used.
                        child, attr = None, self._unlinked_entry(st)
                    else:
                        log.warning("directory inode %d: an entry is hidden (%s)", inode.ino,
                                    os.strerror(e.errno) if e.errno else type(e).__name__)
                        continue
            if not token(p_name, attr, i + 1):
                if child is not None:
                    self._maybe_drop(child)
                break
            if child is not None:
                child.nlookup += 1

    def _unlinked_entry(self, st: os.stat_result) -> EntryOut:
        """A directory entry that carries no lookup (node id 0): the kernel lists
        its name and type and asks for the rest when the name is used."""
        attr = Attr(self._fuse_ino(st.st_ino), st.st_mode, st.st_nlink, st.st_uid, st.st_gid, 0,
                    0, st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, st.st_rdev, 65536)
        return EntryOut(0, attr, 0.0, 0.0)

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
