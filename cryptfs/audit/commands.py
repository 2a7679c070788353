"""What commands record: the access log bound to a volume.

``cryptfs audit attach`` names a log directory (and its verifier key) in the
volume's config, where the master key's MAC covers it.  From then on a mount
of the volume writes that log, and so does every command that changes the
volume or takes data out of it (user and policy changes, rotation, recovery,
export): one record, written *before* the command acts; a command whose
record cannot be written does nothing.  A failure after the record is
recorded as a second record with outcome ``error``.

One process writes a log at a time (:class:`cryptfs.audit.AuditLog` holds its
lock).  While the volume's own mount holds it, a command hands its record to
the mount (cryptfs.control.AUDIT_XATTR on the mount's root), which writes it with the uid and
pid the kernel gives for the command's request.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cryptfs import process
from cryptfs.audit.chain import PUB_NAME, canonical, parse_verifier
from cryptfs.audit.writer import AuditLog, LogBusy, check_log
from cryptfs.config import VolumeConfig
from cryptfs.control import MAX_RECORD, hand_record
from cryptfs.errors import BackingIOError, CryptfsError, UsageError
from cryptfs.mounttable import mount_of_backing


class LogUnavailable(BackingIOError):
    """The record of a command could not be written: the command did nothing."""


def bound_log(logdir: str, key_text: str) -> None:
    """Refuse a log directory that is not the one a volume names (another
    log, or one re-created in its place)."""
    check_log(logdir)
    try:
        with open(os.path.join(logdir, PUB_NAME), encoding="utf-8") as f:
            here = parse_verifier(f.read(4096))
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {os.path.join(logdir, PUB_NAME)}: "
                         f"{getattr(e, 'strerror', e)}") from None
    if here != parse_verifier(key_text):
        raise UsageError(f"the access log in {logdir} is not the one this volume is bound to "
                         "(its verifier key differs)",
                         hint="restore the log directory, or rebind with cryptfs audit detach "
                              "--force and cryptfs audit attach")


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _text(v: Any) -> Any:
    """A field as a record may hold it: text that is not UTF-8 (a command's
    argument from a file name that is not) with its odd bytes as \\xNN."""
    if isinstance(v, str):
        try:
            raw = v.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = v.encode("utf-8", "backslashreplace")
        return raw.decode("utf-8", "backslashreplace")
    if isinstance(v, list):
        return [_text(x) for x in v]
    return v


def record(backing: str, cfg: VolumeConfig, event: str, outcome: str = "allowed",
           **fields: Any) -> None:
    """Write one record of a command into the log ``cfg`` is bound to (nothing
    if it is bound to none); LogUnavailable if it cannot be written."""
    if cfg.audit is None:
        return
    logdir = cfg.audit["dir"]
    fields = {k: _text(v) for k, v in fields.items() if v is not None}
    fields.setdefault("backing", _text(os.path.realpath(backing)))
    try:
        bound_log(logdir, cfg.audit["key"])
        try:
            writer = AuditLog(logdir, wait=0.0)
        except LogBusy:
            mnt = mount_of_backing(backing)
            if mnt is not None and _through_mount(mnt, logdir, event, outcome, fields):
                return
            writer = AuditLog(logdir, wait=10.0)
        try:
            uid = os.getuid()
            writer.record(event=event, outcome=outcome, uid=uid, user=_user(uid), pid=os.getpid(),
                          exe=process.exe(os.getpid()) or "", volume=cfg.volume_id.hex(), **fields)
        finally:
            try:
                writer.close()
            except OSError:
                pass  # (the record is written; the next writer seals it)
    except (CryptfsError, OSError) as e:
        raise LogUnavailable(f"cannot write the access log in {logdir} "
                             f"({getattr(e, 'strerror', None) or e}): nothing was done",
                             hint="the volume is bound to this log (cryptfs audit attach): "
                                  "make it writable again") from None


def through_mount(mnt: str, event: str, outcome: str = "allowed", **fields: Any) -> bool:
    """Hand a record to the mount on ``mnt``, for the log it writes (the log
    of the volume it serves); False if it writes none.  For a command that
    works through the mount (export), which may not read the backing."""
    try:
        return _through_mount(mnt, None, event, outcome,
                              {k: _text(v) for k, v in fields.items() if v is not None})
    except PermissionError:
        # The kernel lets only users who may write the mount's root set its
        # xattrs: for anyone else the mount's own records of the reads are
        # the trail (docs/AUDIT.md).
        return False
    except OSError as e:
        raise LogUnavailable(f"cannot write the access log of {mnt} "
                             f"({e.strerror}): nothing was done") from None


def _through_mount(mnt: str, logdir: str | None, event: str, outcome: str,
                   fields: dict[str, Any]) -> bool:
    """Hand the record to the mount; False if that mount does not write this
    log (``logdir``; None: whichever it writes)."""
    if logdir is not None:
        fields = {**fields, "logdir": os.path.realpath(logdir)}
    data = canonical({"event": event, "outcome": outcome, **fields})
    if len(data) > MAX_RECORD:
        raise UsageError("the record is too long for the mount to write")
    return hand_record(mnt, data)


@contextmanager
def recorded(backing: str, cfg: VolumeConfig, event: str, **fields: Any) -> Iterator[None]:
    """Record ``event`` before the block runs; if the block fails, record that too."""
    record(backing, cfg, event, **fields)
    try:
        yield
    except BaseException as e:
        reason = str(e) if isinstance(e, CryptfsError) else type(e).__name__
        try:
            record(backing, cfg, event, "error", reason=reason[:200], **fields)
        except LogUnavailable:
            pass  # (the failure itself is what the user sees)
        raise
