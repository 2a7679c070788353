"""A volume: the backing directory, its config, and (once unlocked) its keys.

Backing layout::

    BACKING/cryptfs.conf     the volume config (cryptfs.config)
    BACKING/tree/            the encrypted directory tree; its root holds .diriv
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptfs import presence, tree
from cryptfs.config import (
    CONFIG_NAME,
    TREE_NAME,
    Kdf,
    Slot,
    VolumeConfig,
    config_lock,
    config_path,
    load_config,
    new_config,
    save_config,
)
from cryptfs.errors import BackingIOError, NotAVolume, UsageError
from cryptfs.keys import MASTER_KEY_LEN, VolumeKeys
from cryptfs.modes import content_mode_by_name, x25519
from cryptfs.modes.content import ContentMode
from cryptfs.modes.rand import random_bytes
from cryptfs.modes.wrap import Keyring
from cryptfs.names import NameCodec
from cryptfs.secret import Secret

T = TypeVar("T")
CHANGED = ("the volume's config was changed by another command while this one ran ({}): "
           "nothing was changed")


class _Backing:
    backing: str
    config: VolumeConfig

    @property
    def tree(self) -> str:
        return os.path.join(self.backing, TREE_NAME)

    @property
    def default_mode(self) -> ContentMode:
        return content_mode_by_name(self.config.default_mode)


@dataclass
class LockedVolume(_Backing):
    """A volume whose config was read but not unlocked: a mount in agent mode
    starts with this and gets the keys from the agent while anyone is unlocked."""

    backing: str
    config: VolumeConfig
    keys: None = None

    def close(self) -> None:
        pass


@dataclass
class UnlockedVolume(_Backing):
    """A volume and its keys (however they were obtained)."""

    backing: str
    config: VolumeConfig
    keys: VolumeKeys

    def codec(self) -> NameCodec:
        return NameCodec(self.keys)

    @property
    def private_key(self) -> Secret | None:
        """The X25519 private key this volume was opened with (a user's or the
        recovery key), which opens the hybrid files wrapped to it."""
        return getattr(self, "private", None)

    def keyring(self) -> Keyring:
        """What opens this holder's file headers."""
        priv = self.private_key
        return self.keys.keyring([priv.reveal()] if priv is not None and len(priv) else [])

    def save_config(self) -> None:
        """Authenticate the (changed) config with the keys and write it out
        (the caller holds ``config_lock``: every other writer goes through
        :meth:`update_config`)."""
        self.config.seal(self.keys)
        save_config(self.backing, self.config)

    def update_config(self, change: Callable[[VolumeConfig], T]) -> T:
        """The one read-modify-write of the config for a command: with the
        config locked (``config_lock``), read it again, apply ``change`` to
        that fresh copy (which it may refuse, raising), then seal and save it.
        So a change made by another command since this one unlocked is kept,
        never overwritten by the copy read at unlock.

        The fresh config must be authentic under the keys this command holds
        (the same key generation: after a rotation the command stops, exit 2)
        and still hold the slot it was unlocked with, unchanged in user, uid
        and role (what authorised the command)."""
        with config_lock(self.backing):
            fresh = load_config(self.backing)
            if fresh.mac != self.config.mac:
                self._check_fresh(fresh)
            self.config = fresh
            result = change(fresh)
            self.save_config()
        return result

    def _check_fresh(self, fresh: VolumeConfig) -> None:
        if fresh.volume_id != self.config.volume_id:
            raise NotAVolume(f"{self.backing} holds another volume now")
        if fresh.key_id != self.keys.key_id:
            raise UsageError(CHANGED.format("the volume's key was rotated"),
                             hint="run the command again")
        fresh.verify(self.keys)  # (raises if edited or damaged)
        slot = getattr(self, "slot", None)
        if isinstance(slot, Slot):
            now = next((s for s in fresh.slots if s.id == slot.id), None)
            if now is None or now.extra != slot.extra:
                raise UsageError(CHANGED.format("the key slot that authorised it was removed "
                                                "or changed"), hint="run the command again")

    def close(self) -> None:
        self.keys.close()
        if self.private_key is not None:
            self.private_key.wipe()


@dataclass
class Volume(UnlockedVolume):
    """Unlocked through a key slot (a passphrase)."""

    slot: Slot
    private: Secret | None = None  # the user key: X25519 key || authority key (None: a v1 slot)


@dataclass
class RecoveredVolume(UnlockedVolume):
    """Unlocked through the volume's recovery key (cryptfs.recovery)."""

    private: Secret | None = None  # the recovery key (private key [|| authority key])


def init_volume(backing: str, mode: str, passphrase: Secret, kdf: Kdf,
                first_user: dict[str, Any] | None = None) -> Volume:
    """Create a volume in an empty (or new) directory.

    ``first_user`` holds the user fields (user, uid, role) of the first key
    slot; without them it is an "owner" slot that belongs to no system user.
    """
    backing = os.path.abspath(backing)
    content_mode_by_name(mode)
    made = not os.path.lexists(backing)
    try:
        os.makedirs(backing, mode=0o700, exist_ok=True)
        if not stat.S_ISDIR(os.stat(backing).st_mode):
            raise NotAVolume(f"{backing} is not a directory")
        if os.listdir(backing):
            if os.path.exists(config_path(backing)):
                raise UsageError(f"{backing} is already a cryptfs volume")
            raise UsageError(f"{backing} is not empty",
                               hint="init needs an empty or new directory")
    except OSError as e:
        raise BackingIOError(f"{backing}: {e.strerror}") from None
    cfg = new_config(mode, kdf)
    keys = VolumeKeys(Secret(random_bytes(MASTER_KEY_LEN)), cfg.key_id)
    private = x25519.new_private_key()
    label = str(first_user["user"]) if first_user else "owner"
    cfg.slots.append(cfg.make_slot(keys, passphrase, label, private=Secret(private),
                                   **(first_user or {})))
    user_key = Secret(private + keys.authority)
    cfg.seal(keys)
    try:
        try:
            os.mkdir(os.path.join(backing, TREE_NAME), 0o755)
            dfd = os.open(os.path.join(backing, TREE_NAME), os.O_RDONLY | os.O_DIRECTORY)
            try:
                tree.write_diriv(dfd)
            finally:
                os.close(dfd)
            presence.create(backing)  # (what every mount holds: cryptfs.presence)
        except OSError as e:
            raise BackingIOError(f"cannot create the volume tree in {backing}: {e.strerror}") \
                from None
        save_config(backing, cfg)
    except BaseException:
        discard_new_volume(backing, made)  # (half a volume would make the next init fail)
        raise
    return Volume(backing, cfg, keys, cfg.slots[0], user_key)


def discard_new_volume(backing: str, made: bool) -> None:
    """Remove what init_volume put in ``backing`` (which was empty or new), and
    the directory itself if it was new: a volume that holds nothing yet."""
    for name in (CONFIG_NAME, CONFIG_NAME + ".tmp", presence.PRESENCE_NAME,
                 os.path.join(TREE_NAME, tree.DIRIV_NAME), TREE_NAME):
        with contextlib.suppress(OSError):
            if name == TREE_NAME:
                os.rmdir(os.path.join(backing, name))
            else:
                os.unlink(os.path.join(backing, name))
    if made:
        with contextlib.suppress(OSError):
            os.rmdir(backing)


def read_volume(backing: str) -> LockedVolume:
    """The volume's config, not yet authenticated (that needs a key)."""
    backing = os.path.abspath(backing)
    vol = LockedVolume(backing, load_config(backing))
    if not os.path.isdir(vol.tree):
        raise NotAVolume(f"{backing}: the encrypted tree ({TREE_NAME}/) is missing")
    return vol


def open_volume(backing: str, passphrase: Secret) -> Volume:
    locked = read_volume(backing)
    keys, slot, private = locked.config.unlock(passphrase)
    return Volume(locked.backing, locked.config, keys, slot, private)
