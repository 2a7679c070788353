"""Masked views: what a role that sees structured files masked reads instead of
the plaintext (cryptfs.masking, cryptfs.views), and the writes such a role
may make.
"""

from __future__ import annotations

import errno
import functools
import hmac
import logging
import os

from cryptfs import tree, views
from cryptfs.content import ContentFile
from cryptfs.decision import NO_ORACLE_WRITES, Decision, refused
from cryptfs.fs.access import Decided
from cryptfs.fs.core import (
    MAX_MASKED,
    Core,
)
from cryptfs.fs.inodes import Inode, MaskedView, readable
from cryptfs.fuse import OpenOut
from cryptfs.fuse.abi import FOPEN_DIRECT_IO
from cryptfs.fuse.requests import Request
from cryptfs.header import AGENT_ROWS_XATTR
from cryptfs.masking import NotStructured
from cryptfs.modes import IntegrityError
from cryptfs.policy import MaskRule
from cryptfs.tree import proc_path

log = logging.getLogger("cryptfs")


def _same_key(a: bytes | None, b: bytes | None) -> bool:
    """Whether two token keys (None: no tokens) are the same, in constant time."""
    if a is None or b is None:
        return a is b
    return hmac.compare_digest(a, b)


class MaskedViews(Core):
    """Masked views (see the module)."""

    def _find_mask(self, inode: Inode) -> tuple[MaskRule | None, str]:
        """The mask a file is served through to masked roles: of its name, or
        of any of its hard links'; or why none can be chosen (a name unknown,
        two different masks: refused)."""
        names = self._names_of(inode)
        if names.unknown:
            return None, ("masked view refused: the file's name is unknown" if not names.found
                          else "masked view refused: a name of the file (a hard link) is unknown")
        masks = names.masks(self.policy)
        if len(masks) > 1:
            return None, "masked view refused: its hard links are under different masks"
        return next(iter(masks), None), ""

    def _mask_of(self, inode: Inode) -> MaskRule | None:
        """:meth:`_find_mask`, a file without one mask refused."""
        mask, problem = self._find_mask(inode)
        if problem:
            raise Decided(refused(problem))
        return mask

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
                       decision: Decision, built: views.Built | None = None
                       ) -> OpenOut | views.Wanted:
        """What a role that sees masked data gets of a structured file: reads
        from a masked view made at open (every field its length, so sizes and
        offsets hold); writes only at or past the end (new rows), never over
        the bytes the view masks.  A view larger than views.INLINE_MAX is
        made off the request loop: this returns what to make, and the open
        comes back with it (``built``) to decide again.  The open was
        decided already (cryptfs.decision: no truncating, no writes into a
        file with token columns)."""
        mask = rule.mask()
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
                raise Decided(refused("masked view refused: the file, its rule or the keys "
                                      "changed while its view was made"))
            else:
                return views.Wanted(stamp, token, content.header, size, make_view)
        except NotStructured as e:
            self._unload_content(inode)
            log.warning("inode %d: masked view refused: %s", inode.ino, e)
            raise Decided(refused(f"masked view refused: not {rule.fmt} ({e})")) from None
        except BaseException:
            self._unload_content(inode)
            raise
        # A view is held in memory while it is open: one user holding many (12
        # opens of a 2 MiB file took the mount from 37 to 118 MiB) must not be
        # able to take the shared mount out of memory.
        held = self._view_bytes.get(uid, 0)
        if held + len(view) > self._view_budget:
            self._unload_content(inode)
            log.warning("uid %d: masked view refused: %d bytes of views open already", uid, held)
            raise Decided(refused(f"masked view refused: this user holds {held} bytes of views "
                                  f"open (at most {self._view_budget})", err=errno.EMFILE))
        try:
            fi = self._open_handle(MaskedView(inode, uid, readable(flags), view), pid,
                                   decision)
        except BaseException:
            self._unload_content(inode)
            raise
        self._view_bytes[uid] = held + len(view)
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
        return self.keys.mask_token_key(content.header.file_id, content.header.file_key)

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
            raise Decided(refused("not written: the file cannot be marked as holding rows of a "
                                  "masked role (its tokens would be an oracle)")) from None
        inode.agent_rows = True

    def _view_still_writable(self, handle: MaskedView) -> None:
        """A masked view opened for writing under an older policy: no more
        writes once the file's mask has a token column."""
        mask = self._mask_of(handle.inode)
        if mask is not None and mask.mask().tokenised:
            raise Decided(refused(NO_ORACLE_WRITES))
        handle.policy = self.policy

    async def _open_view(self, wanted: views.Wanted, inode_no: int, flags: int,
                         ctx: Request) -> OpenOut:
        """Make a large masked view in a worker thread while other requests
        are served, then decide the open again from the start (user still
        unlocked, role, rules, keys, the file unchanged: see
        ``_masked_handle``); anything changed fails closed."""
        inode = self._inode(inode_no)
        try:
            self._views.admit(ctx.uid)
        except views.Busy:
            self._unload_content(inode)
            raise Decided(refused("masked view refused: too many views being made"),
                          errno.EBUSY) from None
        # Its own descriptor (the inode's may be reopened meanwhile), and a
        # placeholder view handle: while the view is made, no plaintext open
        # of the file (_exclusive), and the inode and its content stay loaded.
        hold = MaskedView(inode, ctx.uid, readable=False, view=b"")
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
        fi = self._open_now(inode_no, flags, ctx, built)
        assert not isinstance(fi, views.Wanted)  # (given ``built``, a view is used or refused)
        return fi
