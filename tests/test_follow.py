"""cryptfs.follow without a mount: the config stamp, the re-read and following a rotation.

The mount (cryptfs.fs.gate) and the key agent (cryptfs.keyagent.server) both
decide through these functions whether the config changed, whether it still
authenticates under the key they hold, and whether a newer generation is
one to follow.  Real volumes, real rotations (cryptfs.rotate), real user keys.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cryptfs import follow
from cryptfs import rotate as rot
from cryptfs.config import CONFIG_NAME, VolumeConfig, load_config, user_authority
from cryptfs.errors import CryptfsError, NotAVolume
from cryptfs.keys import VolumeKeys
from cryptfs.secret import Secret
from cryptfs.users import slot_for_uid
from cryptfs.volume import Volume, open_volume
from multiuser import ROOT_PASSPHRASE, USERS, ensure_users, make_shared_volume

ALICE, BOB = "cfs-alice", "cfs-bob"


def _open(backing: Path, user: str = "root") -> Volume:
    return open_volume(str(backing), Secret(ROOT_PASSPHRASE if user == "root" else USERS[user][1]))


def _copy(keys: VolumeKeys) -> VolumeKeys:
    return VolumeKeys(Secret(keys.master.reveal()), keys.key_id)


def _dir(backing: Path) -> int:
    return os.open(backing, os.O_PATH | os.O_DIRECTORY)


def _holder(cfg: VolumeConfig, user: str, vol: Volume) -> follow.Holder:
    assert vol.private_key is not None
    return slot_for_uid(cfg, ensure_users()[user].pw_uid), vol.private_key


def test_the_stamp_tells_every_write_of_the_config_apart(tmp_path: Path) -> None:
    backing = make_shared_volume(tmp_path / "backing")
    fd = _dir(backing)
    try:
        first = follow.stamp_at(fd)
        assert not follow.changed(first, follow.stamp_at(fd))
        vol = _open(backing)
        vol.update_config(lambda cfg: None)  # a config writer: same content, new file
        vol.close()
        second = follow.stamp_at(fd)
        assert follow.changed(first, second)
        # the same bytes written in place with the old mtime put back: ctime still differs
        conf = backing / CONFIG_NAME
        st = conf.stat()
        conf.write_bytes(conf.read_bytes())
        os.utime(conf, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert follow.stamp_at(fd)[:3] == second[:3]
        assert follow.changed(second, follow.stamp_at(fd))
        # a forgotten stamp (None) makes the next look read it; a missing config is
        # noticed once (changed from a known stamp), not at every request after
        assert follow.changed(None, second)
        assert follow.changed(second, None) and not follow.changed(None, None)
        stamp, cfg = follow.read_at(fd, str(backing))
        assert stamp == follow.stamp_at(fd) and cfg.mac == load_config(str(backing)).mac
        conf.unlink()
        assert follow.stamp_or_none(fd) is None
        with pytest.raises(NotAVolume, match="no cryptfs.conf"):
            follow.read_at(fd, str(backing))
    finally:
        os.close(fd)


def test_reopen_authenticates_the_same_generation_and_refuses_another_volume(
        tmp_path: Path) -> None:
    backing = make_shared_volume(tmp_path / "backing")
    other = make_shared_volume(tmp_path / "other")
    vol = _open(backing)
    held = _copy(vol.keys)
    try:
        fresh = load_config(str(backing))
        keys = follow.reopen(fresh, vol.config.volume_id, held, lambda: [])
        assert keys.key_id == held.key_id and keys.fingerprint == held.fingerprint
        keys.close()
        # a config sealed under another master (another volume's, copied in)
        foreign = load_config(str(other))
        with pytest.raises(NotAVolume, match="another volume"):
            follow.reopen(foreign, vol.config.volume_id, held, lambda: [])
        foreign.volume_id = fresh.volume_id  # (claims to be this one: does not authenticate)
        with pytest.raises(CryptfsError):
            follow.reopen(foreign, vol.config.volume_id, held, lambda: [])
    finally:
        held.close()
        vol.close()


def test_a_rotation_is_followed_through_a_held_user_key_and_a_put_back_one_is_not(
        tmp_path: Path) -> None:
    backing = make_shared_volume(tmp_path / "backing")
    alice = _open(backing, ALICE)
    before = (backing / CONFIG_NAME).read_bytes()
    held = _copy(alice.keys)  # what a running mount or agent holds: generation 1
    admin = _open(backing)
    try:
        for kind in ("slots", "wrap-key", "slots"):  # three generations it did not see
            assert rot.begin(admin, kind, new_generation=True)
        fresh = load_config(str(backing))
        assert fresh.key_id == held.key_id + 3
        # no user key held: cannot be told yet (not "forged")
        with pytest.raises(CryptfsError) as nokey:
            follow.reopen(fresh, fresh.volume_id, held, lambda: [])
        assert not isinstance(nokey.value, NotAVolume)
        # alice's user key opens her slot of the new generation: followed
        holders = [(None, Secret(os.urandom(64))), _holder(fresh, ALICE, alice)]
        keys, used = follow.follow(fresh, held, holders)
        assert used == 1 and keys.key_id == fresh.key_id
        assert keys.fingerprint == admin.keys.fingerprint
        assert alice.private_key is not None
        assert follow.descends(fresh, held, keys.master, user_authority(alice.private_key.reveal()))
        assert not follow.descends(fresh, held, keys.master, os.urandom(32))  # (wrong authority)
        keys.close()
        # the config from before, put back: older than what is held now, never followed
        now = _copy(admin.keys)
        old = VolumeConfig.from_bytes(before)
        with pytest.raises(NotAVolume, match="put back"):
            follow.reopen(old, old.volume_id, now, lambda: [_holder(old, ALICE, alice)])
        now.close()
    finally:
        held.close()
        alice.close()
        admin.close()


def test_a_generation_forged_by_a_removed_user_is_not_followed(tmp_path: Path) -> None:
    """Bob kept generation 1's keys; the admin rotated to generation 2 (what
    alice's mount holds now).  Bob makes a "generation 3" from generation 1,
    wrapped to every slot.  Alice's user key opens her slot there, but a
    holder of generation 2 must not follow it."""
    backing = make_shared_volume(tmp_path / "backing")
    bob = _open(backing, BOB)
    admin = _open(backing)
    assert rot.begin(admin, "slots", new_generation=True)
    alice = _open(backing, ALICE)
    held = _copy(alice.keys)
    assert held.key_id == bob.keys.key_id + 1
    try:
        forged = load_config(str(backing))
        with Secret(os.urandom(32)) as master:
            new = forged.set_generation(bob.keys, master, retire=False)
        forged.seal(new)
        holder = _holder(forged, ALICE, alice)
        assert holder[0] is not None and forged.slot_master(holder[0], holder[1]) is not None
        with pytest.raises(NotAVolume, match="not followed"):
            follow.follow(forged, held, [holder])
        with pytest.raises(NotAVolume):
            follow.reopen(forged, forged.volume_id, held, lambda: [holder])
        new.close()
    finally:
        held.close()
        for v in (alice, bob, admin):
            v.close()
