"""File content: open (plaintext, ciphertext view or masked view), read,
write, flush, fsync, fallocate and release, on one :class:`ContentFile` per
open inode.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import time

from cryptfs import ownreads, sysio, views
from cryptfs.content import BlockError, ContentFile, read_stanzas
from cryptfs.decision import Decision, Outcome, refused
from cryptfs.fs import shared
from cryptfs.fs.access import Decided
from cryptfs.fs.audit_hooks import _edge
from cryptfs.fs.core import (
    Core,
)
from cryptfs.fs.inodes import CiphertextView, Handle, Inode, MaskedView, PlainHandle, readable
from cryptfs.fuse import FuseError, OpenOut
from cryptfs.fuse.abi import FOPEN_DIRECT_IO, FOPEN_KEEP_CACHE
from cryptfs.fuse.requests import Request
from cryptfs.header import LAYOUT_XATTR, layout_hint, parse_layout_hint, peek
from cryptfs.modes import IntegrityError
from cryptfs.modes.content import ContentMode
from cryptfs.modes.errors import NotARecipient
from cryptfs.modes.wrap import (
    STANZA_SYMMETRIC,
)
from cryptfs.tree import proc_path

log = logging.getLogger("cryptfs")


class ContentIO(Core):
    """File content (see the module)."""

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

    def _content(self, inode: Inode, want_write: bool, uid: int | None = None) -> ContentFile:
        """The inode's content engine, its header checked when first needed.

        ``uid`` (on open and truncate, not on each read or write of an open
        handle) must be able to open the file key: of a hybrid file, only its
        recipients can (EACCES for others, whoever loaded it before)."""
        if want_write and inode.access != os.O_RDWR:
            self._reopen(inode, os.O_RDWR)
        elif inode.access == os.O_PATH:
            self._reopen(inode, os.O_RDONLY)
        elif self.shared_storage and inode.content is None:
            # A fresh open of the backing file at each first open: the backing
            # filesystem's close-to-open then shows what another server closed.
            self._reopen(inode, inode.access)
        if inode.content is not None and uid is not None:
            self._check_recipient(inode.content, uid)
        if inode.content is None:
            if inode.wrong_size:
                raise BlockError(None, "the kernel still holds the size a forged layout hint "
                                       "gave: refused until it forgets the file")
            try:
                try:
                    content = ContentFile.load(inode.fd, self._keyring(uid), inode.checked)
                except BlockError:
                    if not self._newer_generation(inode.fd):
                        raise
                    # Rotated by someone else (another mount, another namespace):
                    # follow it through a slot key this mount holds, then retry.
                    self._reread_config()
                    content = ContentFile.load(inode.fd, self._keyring(uid))
            except NotARecipient:
                raise FuseError(errno.EACCES) from None
            if inode.meta is not None and inode.meta != (content.overhead, content.h_len):
                self._hint_disagrees(inode, content)
            inode.content = content
            self._keep_checked(inode, content.checked)
            inode.meta = (content.overhead, content.h_len)
        return inode.content

    def _hint_disagrees(self, inode: Inode, content: ContentFile) -> None:
        """The layout hint, which the size the kernel was given came from, is
        not what the authenticated header says: someone changed it on the
        backing store.  The kernel keeps that size (under the writeback cache it
        never takes another for a file it knows), and would cut reads short and
        put appends inside the file.  So the hint is put right, every open of
        the inode fails (EIO, recorded as an integrity failure) until the kernel
        has forgotten it, which it is asked to do again and again meanwhile, and
        the next lookup starts with the true size."""
        self._set_layout_hint(inode.fd, content)
        inode.meta = (content.overhead, content.h_len)
        inode.wrong_size = True
        self.shedder.forget_soon(inode.ino)
        raise BlockError(None, "the layout hint disagrees with the header (changed on the "
                               "backing store): put right; the next open sees the true size")

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
        """Forget the content engine once no handle is open: the next open reads
        the header again and checks it (comparing its bytes with the header kept
        in ``inode.checked``, or authenticating it in full if they differ).
        Shared storage: also close the backing file (keep an O_PATH descriptor),
        so that its attributes come from the backing filesystem again."""
        if not inode.handles:
            inode.content = None
            if self.shared_storage and inode.access != os.O_PATH:
                self._reopen(inode, os.O_PATH)

    def _open_handle(self, handle: Handle, pid: int, decision: Decision) -> OpenOut:
        """Hand out ``handle`` (of the type its open's ``decision`` chose), and
        say how the kernel may cache its pages."""
        fh = self._new_fh()
        inode = handle.inode
        if self.audit is not None:
            handle.pid, handle.opened = pid, time.monotonic_ns()
            handle.exe = self.audit.exe(pid)  # (at close the process may be gone)
            handle.path = self._paths.get(inode.ino, "?")
        handle.decision = decision
        self._files[fh] = handle
        inode.handles.add(handle)
        handle.policy = self.policy
        view = not isinstance(handle, PlainHandle)
        if view or self.gated:
            inode.viewed = inode.viewed or view
            return OpenOut(fh, FOPEN_DIRECT_IO)
        # The kernel drops the cached pages at this open: they held a view, or
        # (shared storage) what another server may have changed since.
        if inode.viewed or self.shared_storage:
            inode.viewed = False
            return OpenOut(fh, 0)
        return OpenOut(fh, FOPEN_KEEP_CACHE)

    def _own_reads(self, handle: PlainHandle, inode: Inode) -> None:
        """A plaintext read, refused (EACCES) where it could show a masked role
        what someone else wrote into a file a mask governs (cryptfs.ownreads):
        through that role's own handle, or into the page cache its mapping
        shares.  Costs nothing until someone else changes such a file."""
        # (asked only once some handle became foreign, even with no rule left since)
        if not (self._foreign_seen and ownreads.foreign_held(inode.handles)):
            return
        if ownreads.keyless_foreign_held(inode.handles):  # (a drop box: no mask needed)
            raise Decided(refused(ownreads.DROPBOX_READ if handle.not_recipient and handle.foreign
                                  else ownreads.HELD_DROPBOX))
        if self._mask_rules and self._mask_of(inode) is not None:
            raise Decided(refused(ownreads.FOREIGN_READ if handle.foreign
                                  else ownreads.HELD_FOREIGN))

    def _ciphertext_handle(self, inode: Inode, uid: int, flags: int, pid: int,
                           decision: Decision) -> OpenOut:
        """A read-only view of the file's encrypted bytes, for a role that
        reads ciphertext only or a program the rule does not trust but lets
        have those.  Direct I/O: its reads neither fill nor use the page
        cache (which holds plaintext), and go past the plaintext size the
        file shows."""
        self._exclusive(inode, view=True)
        raw = os.open(proc_path(inode.fd), os.O_RDONLY | os.O_CLOEXEC)
        try:
            fi = self._open_handle(CiphertextView(inode, uid, readable(flags), raw), pid,
                                   decision)
        except BaseException:
            os.close(raw)
            raise
        return OpenOut(fi.fh, FOPEN_DIRECT_IO)

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
        """Decide an open (cryptfs.decision) and act on it, or say which masked
        view it needs made first (``built``: the view made since, used only
        if it was made from what this decision names)."""
        self._allow(ctx.uid)
        inode = self._inode(inode_no)
        self._refresh_config()  # (a stat: a rule set since the mount started applies)
        decision = self._decide_open(ctx, inode, flags)
        try:
            return self._serve_open(inode, flags, ctx, decision, built)
        except Decided:
            raise
        except (FuseError, OSError) as e:  # (failed after it was decided: the record says how)
            raise Decided(decision, e.errno or errno.EIO) from e

    def _serve_open(self, inode: Inode, flags: int, ctx: Request, decision: Decision,
                    built: views.Built | None) -> OpenOut | views.Wanted:
        """The handle ``decision`` says an open gets."""
        if decision.outcome is Outcome.CIPHERTEXT:
            return self._ciphertext_handle(inode, ctx.uid, flags, ctx.pid, decision)
        if decision.outcome is Outcome.MASKED:
            assert decision.mask is not None
            return self._masked_handle(inode, decision.mask, ctx.uid, flags, ctx.pid, decision,
                                       built)
        self._exclusive(inode, view=False)  # (before O_TRUNC changes anything)
        try:
            content = self._content(inode, (flags & os.O_ACCMODE) != os.O_RDONLY
                                    or bool(flags & os.O_TRUNC), ctx.uid)
            if flags & os.O_TRUNC:
                self._changed_by(inode.handles, ctx.uid)
                content.truncate(0)
        except BaseException:
            self._unload_content(inode)
            raise
        return self._open_handle(PlainHandle(inode, ctx.uid, readable(flags),
                                             own_only=ctx.uid in self._masked),
                                 ctx.pid, decision)

    @_edge("fh")
    def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._files[fh]
        if self.gated:
            self._recheck_soon()
        if isinstance(handle, PlainHandle):
            if handle.policy is not self.policy:
                self._still_allowed(handle)
            inode = self._handle(fh, reading=True)
            self._own_reads(handle, inode)
            data = self._content(inode, want_write=False).read(off, size)
        elif isinstance(handle, CiphertextView):
            self._handle(fh, reading=True)  # (the same gate as any read)
            data = os.pread(handle.raw, size, off)
        else:
            assert isinstance(handle, MaskedView)
            self._handle(fh, reading=True)
            data = handle.view[off:off + size]
        if self.audit is not None:  # (counted for the close record only)
            handle.nread += len(data)
        return data

    @_edge("fh")
    def write(self, fh: int, off: int, buf: bytes | memoryview) -> int:
        handle = self._files[fh]
        if isinstance(handle, CiphertextView):
            raise FuseError(errno.EBADF)  # (read-only: the kernel sends no write for it)
        if self.gated:
            self._recheck_soon()
        if handle.policy is not self.policy:
            if isinstance(handle, PlainHandle):
                self._still_allowed(handle)
            else:
                assert isinstance(handle, MaskedView)
                self._view_still_writable(handle)
        content = self._content(self._handle(fh), want_write=True)
        if isinstance(handle, MaskedView) and off < content.size:
            raise FuseError(errno.EACCES)  # (a masked view appends; it never overwrites)
        if handle.uid in self._masked:
            self._mark_agent_rows(handle.inode)
        self._changed_by(handle.inode.handles, handle.uid)
        n = content.write(off, buf)
        if self.audit is not None:
            handle.nwritten += n
        return n

    @_edge("fh")
    def flush(self, fh: int) -> None:
        # Every write is already in the backing file, so there is nothing to
        # do; ENOSYS tells the kernel to stop sending FLUSH (one request less
        # per close).  It still writes its dirty pages back before close returns.
        # Shared storage: the backing filesystem's client may still hold the
        # writes; the close(2) that this FLUSH is part of commits them, so the
        # other servers' next open sees them (RELEASE comes after close returns).
        if self.shared_storage:
            shared.commit(self._files[fh].inode.fd)
            return
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
        ZERO_RANGE does the same and then reserves the range again (space stays
        allocated), and without KEEP_SIZE extends as mode 0 does.  Neither writes
        zeros block by block, but for the partial blocks at the ends: a user's
        zero range of gigabytes would hold the request loop, and every user of a
        shared mount, for seconds.  Other modes (collapse, insert, unshare):
        EOPNOTSUPP."""
        keep, punch, zero = sysio.FALLOC_FL_KEEP_SIZE, sysio.FALLOC_FL_PUNCH_HOLE, \
            sysio.FALLOC_FL_ZERO_RANGE
        if mode & ~(keep | punch | zero) or (mode & punch and mode != punch | keep):
            raise FuseError(errno.EOPNOTSUPP)
        handle = self._files[fh]
        if not isinstance(handle, PlainHandle):  # (a masked view only appends rows)
            raise Decided(refused("no fallocate through a masked or encrypted view"))
        if self.gated:
            self._recheck_soon()
        if handle.policy is not self.policy:
            self._still_allowed(handle)
        content = self._content(self._handle(fh), want_write=True)
        if handle.uid in self._masked:
            self._mark_agent_rows(handle.inode)
        self._changed_by(handle.inode.handles, handle.uid)
        end = off + length
        if mode & punch:
            content.punch(off, length)
            return
        if mode & zero:
            content.punch(off, length)
            content.reserve(off, min(end, content.size) - off)
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
        if isinstance(handle, CiphertextView):
            os.close(handle.raw)
        elif isinstance(handle, MaskedView):
            left = self._view_bytes.get(handle.uid, 0) - len(handle.view)
            if left > 0:
                self._view_bytes[handle.uid] = left
            else:
                self._view_bytes.pop(handle.uid, None)
        self._audit_close(handle)
        inode = handle.inode
        inode.handles.discard(handle)
        self._unload_content(inode)
        self._maybe_drop(inode)
