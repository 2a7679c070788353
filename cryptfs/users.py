"""Users of a volume: one key slot per system user, with a role.

A user slot is an ordinary key slot (cryptfs.config) whose extra fields name
the system user it belongs to::

    {"id": 3, "label": "alice", "user": "alice", "uid": 1001, "role": "agent", ...}

The extra fields are covered by the config MAC like everything else, so a
slot added, removed, or re-assigned to another uid by editing the file is
detected at the next unlock.  Adding or removing a slot needs the master key,
that is a passphrase that already opens the volume: root alone cannot add
itself.

``BACKING/cryptfs.lastuse`` records when each slot was last unlocked.  It is
informational only (not authenticated, never trusted for a decision), so it
lives outside the config and writing it never needs the master key.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import stat
import time
from dataclasses import dataclass
from typing import Any

from cryptfs import sysio
from cryptfs.config import Kdf, Slot, VolumeConfig
from cryptfs.errors import UsageError
from cryptfs.roles import (  # noqa: F401 - (the role tables live in cryptfs.roles)
    CIPHERTEXT_ROLES,
    DEFAULT_ROLE,
    LOG_ONLY_ROLES,
    MASKED_ROLES,
    ROLES,
    slot_role,
)
from cryptfs.secret import Secret
from cryptfs.volume import Volume

LASTUSE_NAME = "cryptfs.lastuse"


@dataclass(frozen=True)
class UserInfo:
    slot_id: int
    name: str
    uid: int | None
    role: str
    added: str
    last_unlock: str | None


def system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise UsageError(f"{name!r} is not a user of this system",
                         hint="create it first (useradd), or check the spelling") from None


def user_name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def slot_uid(slot: Slot) -> int | None:
    uid = slot.extra.get("uid")
    return uid if isinstance(uid, int) and not isinstance(uid, bool) else None


def slot_for_uid(cfg: VolumeConfig, uid: int) -> Slot | None:
    for slot in cfg.slots:
        if slot_uid(slot) == uid:
            return slot
    return None


def slot_for_name(cfg: VolumeConfig, name: str) -> Slot:
    for slot in cfg.slots:
        if slot.extra.get("user") == name or (slot_uid(slot) is None and slot.label == name):
            return slot
    raise UsageError(f"{name!r} has no key slot in this volume", hint="see: cryptfs user list")


def user_fields(name: str, role: str) -> dict[str, Any]:
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r} (one of: {', '.join(ROLES)})")
    pw = system_user(name)
    return {"user": pw.pw_name, "uid": pw.pw_uid, "role": role}


def add_user(vol: Volume, name: str, role: str, passphrase: Secret, kdf: Kdf | None = None) -> Slot:
    """A new key slot for system user ``name``; the config is re-sealed and saved."""
    fields = user_fields(name, role)

    def change(cfg: VolumeConfig) -> Slot:
        if slot_for_uid(cfg, fields["uid"]) is not None:
            raise UsageError(f"{name} (uid {fields['uid']}) already has a key slot",
                             hint=f"cryptfs user passwd {vol.backing} {name} to change the "
                                  "passphrase")
        slot = cfg.make_slot(vol.keys, passphrase, name, kdf=kdf, **fields)
        cfg.slots.append(slot)
        return slot

    return vol.update_config(change)


def remove_user(vol: Volume, name: str, save: bool = True) -> Slot:
    """Remove ``name``'s slot (``save=False``: the caller saves, e.g. together
    with the key rotation of a revocation, which takes the config lock and
    stops if the config changed meanwhile)."""
    def change(cfg: VolumeConfig) -> Slot:
        slot = slot_for_name(cfg, name)
        if len(cfg.slots) == 1:
            raise UsageError(f"{name} holds the volume's only key slot; removing it would lock "
                             "everyone out for good", hint="add another user first")
        if slot.id == vol.slot.id:
            raise UsageError(f"{name} cannot remove themselves: authorise with another user's "
                             "passphrase")
        cfg.slots = [s for s in cfg.slots if s.id != slot.id]
        return slot

    return vol.update_config(change) if save else change(vol.config)


def set_passphrase(vol: Volume, slot: Slot, new: Secret, kdf: Kdf | None = None) -> Slot:
    """Re-wrap ``slot`` under ``new``.

    The user keeps their X25519 key pair when the volume was opened with
    their own passphrase (a v1 slot is upgraded to a v2 one with a new pair).
    A reset through another user's passphrase cannot reach the old private
    key, so the slot gets a new pair: hybrid files wrapped only to the old
    one need a new ``cryptfs share`` (or the recovery key).
    """
    own = vol.slot.id == slot.id and vol.private is not None

    def change(cfg: VolumeConfig) -> Slot:
        now = next((s for s in cfg.slots if s.id == slot.id), None)
        if now is None or now.extra != slot.extra:
            raise UsageError(f"the key slot of {slot.label} was removed or changed by another "
                             "command while this one ran: nothing was changed",
                             hint="run the command again")
        fresh = cfg.make_slot(vol.keys, new, now.label, kdf=kdf or now.kdf,
                              slot_id=now.id, private=vol.private if own else None, **now.extra)
        fresh.created = now.created
        cfg.slots = [fresh if s.id == now.id else s for s in cfg.slots]
        return fresh

    fresh = vol.update_config(change)
    if vol.slot.id == slot.id:
        vol.slot = fresh
    return fresh


_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def read_lastuse(backing: str | int) -> dict[str, str]:
    """Last-unlock times by slot id (empty if the file is missing or not sound).

    ``backing`` is a path or a descriptor of the backing directory; the file
    is opened without following a symlink and only read if it is a regular file.
    """
    try:
        if isinstance(backing, int):
            fd = os.open(LASTUSE_NAME, _READ_FLAGS, dir_fd=backing)
        else:
            fd = os.open(os.path.join(backing, LASTUSE_NAME), _READ_FLAGS)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return {}
            d = json.loads(os.read(fd, 1 << 20))
        finally:
            os.close(fd)
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(d, dict):
        return {}
    return {k: v for k, v in d.items() if isinstance(k, str) and isinstance(v, str)}


def record_unlock(dir_fd: int, slot_id: int) -> None:
    """Note the time of a successful unlock of ``slot_id`` (raises OSError).

    Written through a descriptor of the backing directory: a new temporary
    file with a random name (O_EXCL: never through a planted symlink), then
    renamed over ``cryptfs.lastuse``.
    """
    d = read_lastuse(dir_fd)
    d[str(slot_id)] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # (0600: who unlocked when is as private as the config; it was 0644)
    sysio.replace_file_at(dir_fd, LASTUSE_NAME, (json.dumps(d, sort_keys=True) + "\n").encode(),
                          0o600, f"{LASTUSE_NAME}.{secrets.token_hex(8)}.tmp")


def list_users(cfg: VolumeConfig, backing: str) -> list[UserInfo]:
    last = read_lastuse(backing)
    out = []
    for s in cfg.slots:
        uid = slot_uid(s)
        name = s.extra.get("user")
        out.append(UserInfo(
            slot_id=s.id,
            name=name if isinstance(name, str) else s.label,
            uid=uid,
            role=slot_role(s),
            added=s.created,
            last_unlock=last.get(str(s.id)),
        ))
    return out
