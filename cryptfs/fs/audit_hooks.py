"""The edge of every handler and the access log's records.

:func:`_edge` turns whatever a handler raised into a ``FuseError`` (only an
errno leaves a handler), and, with an access log, writes the record of the
request (fail closed: no record, no access).  The rest makes those records,
and takes the records that commands (`cryptfs user add` ...) hand to the
mount through the AUDIT_XATTR control channel.
"""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Any, TypeVar

from cryptfs import views
from cryptfs.audit.events import EVENTS
from cryptfs.control import AUDIT_XATTR, parse_command_record
from cryptfs.decision import Decision
from cryptfs.fs.access import Decided
from cryptfs.fs.core import (
    ROOT,
    Core,
)
from cryptfs.fs.inodes import Handle, Inode
from cryptfs.fuse import FuseError
from cryptfs.fuse.requests import Request
from cryptfs.modes import IntegrityError
from cryptfs.roles import claim_refusal
from cryptfs.users import (
    slot_for_uid,
)

log = logging.getLogger("cryptfs")

_F = TypeVar("_F", bound=Callable[..., Any])


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
        if (event or name) not in EVENTS:  # (at import: the one list of events knows every one)
            raise ValueError(f"handler {name}: {event or name!r} is not in cryptfs.audit.events")
        unchecked = name in ("forget", "release", "releasedir", "statfs", "getattr")

        def failed(self: AuditHooks, args: tuple[Any, ...], e: Exception) -> FuseError:
            audit = self.audit
            if isinstance(e, FuseError):
                if audit is not None:
                    self._audit_failure(event, name, args, e.errno,
                                        e.decision if isinstance(e, Decided) else None)
                return e
            if isinstance(e, IntegrityError):
                self.report_integrity(self.ino_of(target, args), e)
                return FuseError(errno.EIO)
            if isinstance(e, OSError):
                if audit is not None:
                    self._audit_failure(event, name, args, e.errno or errno.EIO, None)
                return FuseError(e.errno or errno.EIO)
            log.error("internal error in %s (request failed with EIO)", name, exc_info=e)
            return FuseError(errno.EIO)

        def done(self: AuditHooks, args: tuple[Any, ...], result: Any) -> Any:
            # (an open that waits for a masked view is recorded when it is decided)
            if (self.audit is not None and event is not None and result.__class__ is not views.Wanted
                    and not self._audit(event, args, result, None, self._decision_of(event, result))):
                self._undo(event, result)
                raise FuseError(errno.EACCES)
            return result

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def awaited(self: AuditHooks, *args: Any) -> Any:
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
        def wrapped(self: AuditHooks, *args: Any) -> Any:
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


def _ctx(args: tuple[Any, ...]) -> Any:
    return args[-1] if args and isinstance(args[-1], Request) else None


class AuditHooks(Core):
    """The edge's bookkeeping and the access log's records (see the module)."""

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

    def _decision_of(self, event: str, result: Any) -> Decision | None:
        """The decision an open or a create made: on the handle it returns."""
        if event in ("open", "create"):
            fi = result[0] if event == "create" else result
            return self._files[fi.fh].decision
        return None  # (other requests that succeed record no decision)

    @staticmethod
    def _links_of(inode: Inode) -> int:
        """How many names the file has now (0 if that cannot be read)."""
        try:
            return os.fstat(inode.fd).st_nlink
        except OSError:
            return 0

    def _audit(self, event: str, args: tuple[Any, ...], result: Any, err: int | None,
               decision: Decision | None) -> bool:
        """Write the record of one request with how it was decided (False: it
        could not be written and the request must fail)."""
        assert self.audit is not None
        try:
            return self._record(event, args, result, err, decision)
        except Exception as e:  # (a bug in making the record: still no record, no access)
            log.exception("cannot make the record of %s", event)
            return self.audit._failed(e)

    def _record(self, event: str, args: tuple[Any, ...], result: Any, err: int | None,
                decision: Decision | None) -> bool:
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
            if err is None:
                links = self._links_of(self._files[result.fh].inode)
                if links > 1:  # (`path` is the name last looked up: one of several)
                    fields["links"] = links
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
        if decision is not None:
            # (which rule decided, and how the program was known: the open's,
            # create's, or a refusal's)
            fields.update(decision.fields())
        if outcome == "denied":  # (a flood of them is counted: Auditor.refused)
            return self.audit.refused(event, uid, pid, **fields)
        return self.audit.write(event, outcome, uid, pid, **fields)

    def _audit_failure(self, event: str | None, name: str, args: tuple[Any, ...], err: int,
                       decision: Decision | None) -> None:
        """A failed request: recorded if it is an audited event, and every denial."""
        if event is not None or err in (errno.EACCES, errno.EPERM):
            self._audit(event or name, args, None, err, decision)

    def _undo(self, event: str, result: Any) -> None:
        """A handle whose open could not be recorded is not handed out."""
        if event in ("open", "create"):
            fi = result[0] if event == "create" else result
            handle = self._files.pop(fi.fh, None)
            if handle is not None:
                handle.inode.handles.discard(handle)
                self._unload_content(handle.inode)

    def _audit_close(self, handle: Handle) -> None:
        """The summary of one open file: bytes read and written, how long."""
        if self.audit is not None:
            self.audit.write("close", "allowed", handle.uid, handle.pid, exe=handle.exe,
                             path=handle.path, bytes_read=handle.nread,
                             bytes_written=handle.nwritten,
                             duration_ns=time.monotonic_ns() - handle.opened)

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
