"""The control channel: extended attributes through which a command talks to a running mount.

A command that must act through the mount that serves a volume (the mount
holds the files open, the keys and the access log) sets or reads one of
these xattrs on the mount.  The mount answers them itself; they are never
stored.  Only a request the kernel lets through reaches the mount, and the
mount decides each one by the uid and pid the kernel gives for it.

===================  ===========  =================================================================
xattr                where        value
===================  ===========  =================================================================
``AUDIT_XATTR``      root, set    a command's record for the log the mount writes: one JSON object
                                  (canonical, at most ``MAX_RECORD`` bytes) with ``event`` one of
                                  ``COMMAND_EVENTS``, ``outcome`` allowed|denied|error, and fields
                                  from ``COMMAND_FIELDS`` (str, int, bool or a list of str); an
                                  optional ``logdir`` names the log the command is bound to.
                                  EXDEV: the mount writes another log, or none; EACCES: the claim
                                  was refused (and recorded); EINVAL: malformed.
``ROTATE_XATTR``     root, set    ``ROTATE_GO``: walk the files to the newest key generation.
                                  EBUSY: the mount does not hold that generation yet; EUSERS:
                                  the walk re-encrypts and another mount has the volume.
``ROTATE_XATTR``     root, set    ``ROTATE_ALONE``: hold the volume alone (cryptfs.presence
                                  exclusively) for a re-encryption asked for next; until that
                                  walk ends, ``ROTATE_SHARED``, or ``ALONE_WAIT`` seconds
                                  without a walk.  EUSERS: another mount has the volume.
``ROTATE_XATTR``     root, get    the walk's progress, one JSON object (``{"state": "idle"}``
                                  before any; see cryptfs.rotate.Progress).
``SHARE_XATTR``      file, set    a user name (UTF-8): wrap the hybrid file's key to that user too.
                                  EACCES: the caller is not a recipient; ENOENT: no such user with
                                  a key pair; EINVAL: not a hybrid file; ENOSPC: no room left.
``RECIPIENTS_XATTR`` file, get    the recipients' names, one per line ("recovery" for the recovery
                                  key, "?" and a hex tag for a key no user has any more); empty for
                                  a symmetric file.
===================  ===========  =================================================================

This module is what the mount and the commands share: it imports neither the
filesystem nor its request loop, so a command that uses it does not load them.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any

from cryptfs.audit.events import COMMAND_EVENTS  # (what a command may ask a mount to record)

AUDIT_XATTR = b"user.cryptfs.audit"
ROTATE_XATTR = b"user.cryptfs.rotate"
SHARE_XATTR = b"user.cryptfs.share"
RECIPIENTS_XATTR = b"user.cryptfs.recipients"

ROTATE_GO = b"go"
ROTATE_ALONE = b"alone"
ROTATE_SHARED = b"shared"
ALONE_WAIT = 60.0  # seconds a mount stays alone waiting for the walk it was asked to hold for
ROTATION_IDLE = b'{"state": "idle"}'

COMMAND_FIELDS = frozenset({
    "command", "backing", "path", "target", "role", "kind", "mode", "recipients", "dropbox",
    "revoke", "out", "reason", "logdir", "programs",
})
MAX_RECORD = 8192  # bytes of JSON a command may hand to a mount


# -- the mount's side ---------------------------------------------------------------------------

def validate(obj: Any) -> tuple[str, str, dict[str, Any]]:
    """A command's record as handed to a mount: (event, outcome, fields), or ValueError."""
    if not isinstance(obj, dict):
        raise ValueError("not an object")
    fields = dict(obj)
    event, outcome = fields.pop("event", None), fields.pop("outcome", None)
    fields.pop("volume", None)  # (the mount names its own volume)
    if event not in COMMAND_EVENTS or outcome not in ("allowed", "denied", "error"):
        raise ValueError("event")
    for k, v in fields.items():
        if k not in COMMAND_FIELDS or not (
                isinstance(v, (str, int, bool))
                or (isinstance(v, list) and all(isinstance(x, str) for x in v))):
            raise ValueError(k)
        if isinstance(v, int) and not isinstance(v, bool) and not -2**63 <= v < 2**63:
            raise ValueError(k)
        for text in (v if isinstance(v, list) else [v]):
            if isinstance(text, str):
                text.encode("utf-8")  # (UnicodeEncodeError, a ValueError: a lone surrogate)
    return event, outcome, fields


def parse_command_record(value: bytes) -> tuple[str, str, dict[str, Any]]:
    """The mount's side of :data:`AUDIT_XATTR` (ValueError if malformed)."""
    if len(value) > MAX_RECORD:
        raise ValueError("too long")
    return validate(json.loads(value))


# -- the command's side -------------------------------------------------------------------------
# Each raises the OSError the mount answered with; the caller words it.

def hand_record(mnt: str, value: bytes) -> bool:
    """Give the mount on ``mnt`` a command's record (already encoded); False
    if that mount writes another log, or none (EXDEV)."""
    if len(value) > MAX_RECORD:
        raise ValueError("the record is too long for the mount to write")
    try:
        os.setxattr(mnt, AUDIT_XATTR, value)
    except OSError as e:
        if e.errno == errno.EXDEV:
            return False
        raise
    return True


def start_rotation(mnt: str) -> None:
    """Ask the mount on ``mnt`` to walk its files to the newest key generation."""
    os.setxattr(mnt, ROTATE_XATTR, ROTATE_GO)


def hold_alone(mnt: str) -> None:
    """Ask the mount on ``mnt`` to hold its volume alone for a re-encryption
    (OSError EUSERS: another mount, here or on another server, has it)."""
    os.setxattr(mnt, ROTATE_XATTR, ROTATE_ALONE)


def release_alone(mnt: str) -> None:
    """The re-encryption :func:`hold_alone` was for will not be asked for."""
    os.setxattr(mnt, ROTATE_XATTR, ROTATE_SHARED)


def rotation_progress(mnt: str) -> dict[str, Any]:
    """The mount's progress report on its walk (at least a ``state``)."""
    prog = json.loads(os.getxattr(mnt, ROTATE_XATTR))
    if not isinstance(prog, dict):
        raise ValueError("the rotation progress is not an object")
    return prog


def share(path: str, user: str) -> None:
    """Wrap the key of the hybrid file ``path`` to ``user`` as well."""
    os.setxattr(path, SHARE_XATTR, user.encode("utf-8"))


def recipients(path: str) -> list[str]:
    """The names of the recipients of the file ``path`` (empty: symmetric)."""
    return os.getxattr(path, RECIPIENTS_XATTR).decode("utf-8", "replace").split()
