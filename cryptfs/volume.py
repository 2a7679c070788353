"""A volume: the backing directory, its config, and (once unlocked) its keys.

Backing layout::

    BACKING/cryptfs.conf     the volume config (cryptfs.config)
    BACKING/tree/            the encrypted directory tree; its root holds .diriv
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from cryptfs import tree
from cryptfs.config import (
    TREE_NAME,
    Kdf,
    Slot,
    VolumeConfig,
    config_path,
    load_config,
    new_config,
    save_config,
)
from cryptfs.errors import BackingIOError, NotAVolume, UsageError
from cryptfs.keys import MASTER_KEY_LEN, VolumeKeys
from cryptfs.modes import content_mode_by_name
from cryptfs.modes.content import ContentMode
from cryptfs.modes.rand import random_bytes
from cryptfs.names import NameCodec
from cryptfs.secret import Secret


@dataclass
class Volume:
    backing: str
    config: VolumeConfig
    keys: VolumeKeys
    slot: Slot

    @property
    def tree(self) -> str:
        return os.path.join(self.backing, TREE_NAME)

    @property
    def default_mode(self) -> ContentMode:
        return content_mode_by_name(self.config.default_mode)

    def codec(self) -> NameCodec:
        return NameCodec(self.keys)

    def close(self) -> None:
        self.keys.close()


def init_volume(backing: str, mode: str, passphrase: Secret, kdf: Kdf) -> Volume:
    """Create a volume in an empty (or new) directory."""
    backing = os.path.abspath(backing)
    content_mode_by_name(mode)
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
    master = Secret(random_bytes(MASTER_KEY_LEN))
    cfg.slots.append(cfg.make_slot(master, passphrase, "owner"))
    keys = VolumeKeys(master, cfg.key_id)
    cfg.seal(keys)
    try:
        os.mkdir(os.path.join(backing, TREE_NAME), 0o755)
        dfd = os.open(os.path.join(backing, TREE_NAME), os.O_RDONLY | os.O_DIRECTORY)
        try:
            tree.write_diriv(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise BackingIOError(f"cannot create the volume tree: {e.strerror}") from None
    save_config(backing, cfg)
    return Volume(backing, cfg, keys, cfg.slots[0])


def open_volume(backing: str, passphrase: Secret) -> Volume:
    backing = os.path.abspath(backing)
    cfg = load_config(backing)
    keys, slot = cfg.unlock(passphrase)
    vol = Volume(backing, cfg, keys, slot)
    if not os.path.isdir(vol.tree):
        keys.close()
        raise NotAVolume(f"{backing}: the encrypted tree ({TREE_NAME}/) is missing")
    return vol


def change_passphrase(vol: Volume, new: Secret, kdf: Kdf | None = None) -> None:
    """Re-wrap the master key in the caller's slot under a new passphrase."""
    cfg = vol.config
    fresh = cfg.make_slot(vol.keys.master, new, vol.slot.label, kdf=kdf or vol.slot.kdf,
                          slot_id=vol.slot.id, **vol.slot.extra)
    fresh.created = vol.slot.created
    cfg.slots = [fresh if s.id == fresh.id else s for s in cfg.slots]
    cfg.seal(vol.keys)
    save_config(vol.backing, cfg)
    vol.slot = fresh
