"""The volume's keys and config as the mount holds them, and the agent-driven
gate (agent mode): the ``agent_*`` methods the key agent's link calls, the
roles learned from the config, the unlocked users; and what the mount does
with a config changed underneath it (re-read and followed through
cryptfs.follow, on requests and every follow.CHECK_EVERY seconds).
"""

from __future__ import annotations

import logging
import stat
import time
from typing import Any

import trio

from cryptfs import follow
from cryptfs.errors import CryptfsError, NotAVolume
from cryptfs.fs.core import (
    _NO_KEYS,
    Core,
)
from cryptfs.keys import VolumeKeys
from cryptfs.names import (
    NameCodec,
)
from cryptfs.policy import Policy, load_policy
from cryptfs.roles import slot_role
from cryptfs.secret import Secret
from cryptfs.users import (
    CIPHERTEXT_ROLES,
    LOG_ONLY_ROLES,
    MASKED_ROLES,
    slot_for_uid,
)

log = logging.getLogger("cryptfs")


class Gate(Core):
    """The keys, the config and the agent-driven gate (see the module)."""

    def _stat_config(self) -> follow.Stamp | None:
        # (through a descriptor of the backing directory: no path walk per create)
        return follow.stamp_or_none(self._backing_fd)

    def _refresh_config(self) -> set[int]:
        """Use the config again if it changed (a policy set, a user added or
        removed, a key rotated; here or on another server): authenticated with
        the held key, or (after a rotation) followed with a user key this
        mount holds (cryptfs.follow).  Returns the uids that lost their key
        slot (gated: no longer served, whatever the agent says)."""
        stamp = self._stat_config()
        if not follow.changed(self._config_stamp, stamp) or self.keys is None:
            return set()
        failed = self._config_failed
        now = time.monotonic()
        if failed is not None and failed[0] == stamp and now - failed[1] < follow.CHECK_EVERY:
            return set()  # (it failed a moment ago: tried again at the next look)
        keys = self.keys
        fresh = None
        try:
            _, fresh = follow.read_at(self._backing_fd, self.vol.backing)
            keys = follow.reopen(fresh, self.config.volume_id, keys, lambda: self._holders(fresh))
            load_policy(fresh, keys)
        except CryptfsError as e:
            if keys is not self.keys:
                keys.close()
            if fresh is not None and self._lost_own_slot(fresh):
                return set()
            # The stamp is not taken as known: a read that failed for a while (the
            # storage, a rotation not yet followable) is tried again, else a change
            # made then would stay unseen until the next one.
            self._config_failed = (stamp, now)
            if failed is None or failed[0] != stamp:
                log.warning("the volume's config changed but cannot be used: %s", e)
            return set()
        self._config_failed = None
        self._config_stamp = stamp
        if self._lost_own_slot(fresh):
            keys.close()
            return set()
        if keys.key_id != self.keys.key_id:
            log.info("the volume's key was rotated to generation %d: following", keys.key_id)
        self.config = fresh
        self._swap_keys(keys)
        return self._drop_slotless()

    def _reread_config(self) -> set[int]:
        """:meth:`_refresh_config` now, whatever the stamp says or a read that
        failed a moment ago (a request that needs the newest config)."""
        self._config_stamp = self._config_failed = None
        return self._refresh_config()

    def _lost_own_slot(self, fresh: Any) -> bool:
        """A passphrase mount serves its own user, through the key slot it was
        unlocked with: if that slot is no longer in the config (the user was
        removed, or revoked and the key rotated, on this server or another),
        the mount stops serving and forgets the keys.  Whether or not the held
        key authenticates ``fresh`` (after a revocation it cannot), it fails
        closed: whoever can write the config can remove the files too."""
        slot = getattr(self.vol, "slot", None)
        if self.gated or slot is None or any(  # (a passphrase reset keeps the slot's id and user)
                s.id == slot.id and (s.extra.get("user"), s.extra.get("uid"))
                == (slot.extra.get("user"), slot.extra.get("uid")) for s in fresh.slots):
            return False
        log.error("this mount's key slot %d (%s) is no longer in the volume's config: its user "
                  "was removed or revoked (here or on another server); access revoked, nothing "
                  "more is served (unmount it)", slot.id, slot.label)
        self._own_slot_gone = True
        self._drop_all_pages = True
        self._drop_keys()
        self._forget_privates()
        if self._own_private is not None:
            self._own_private.wipe()
            self._own_private = None
        return True

    def _holders(self, fresh: Any) -> list[follow.Holder]:
        """The user keys this mount holds, each with its slot in ``fresh``: its
        own user's (a passphrase mount), and (gated) each unlocked user's."""
        held: list[follow.Holder] = []
        slot = getattr(self.vol, "slot", None)
        if slot is not None and self._own_private is not None:
            held.append((next((s for s in fresh.slots if s.id == slot.id), None), self._own_private))
        for uid, priv in self._privates.items():
            held.append((slot_for_uid(fresh, uid), priv))
        return held

    def _drop_slotless(self) -> set[int]:
        """Gated: stop serving the unlocked uids the config has no slot for any
        more (removed on any server; the agent also locks them at its next
        check, but the mount does not wait for it)."""
        gone = {uid for uid in self._unlocked if slot_for_uid(self.config, uid) is None}
        for uid in gone:
            self._unlocked.discard(uid)
            self._forget_privates(uid)
            log.info("uid %d has no key slot in the volume's config any more: access revoked", uid)
        return gone

    async def config_watch(self) -> None:
        """Look at the config every follow.CHECK_EVERY seconds, whatever the
        requests do: an idle mount follows a change made elsewhere too."""
        while True:
            await trio.sleep(follow.CHECK_EVERY)
            gone = self._refresh_config()
            everyone, self._drop_all_pages = self._drop_all_pages, False
            if gone or everyone:
                await self._drop_pages({h.inode.ino for h in self._files.values()
                                        if (everyone or h.uid in gone) and h.readable})

    def _learn_roles(self) -> None:
        """On a shared mount, what each unlocked user's role lets them have
        (root is not bound by roles: it could read the mount's memory)."""
        self._log_only, self._cipher_only, self._masked = set(), set(), set()
        if not self.gated:
            return
        for slot in self.config.slots:
            uid, role = slot.extra.get("uid"), slot_role(slot)
            if not isinstance(uid, int) or uid == 0:
                continue
            if role in LOG_ONLY_ROLES:
                self._log_only.add(uid)
            elif role in CIPHERTEXT_ROLES:
                self._cipher_only.add(uid)
            elif role in MASKED_ROLES:
                self._masked.add(uid)

    def _install(self, keys: VolumeKeys) -> None:
        self._keyrings.clear()
        self.keys = keys
        self.codec = NameCodec(keys)
        self.wrapper = keys.wrapper
        self.policy = load_policy(self.config, keys)
        self._program_rules = self.policy.names_programs
        if self._program_rules:
            warning = self._identify.warn_once()
            if warning is not None:
                log.warning("%s", warning)
        self._mask_rules = self.policy.names_masks
        self._learn_roles()

    def _swap_keys(self, keys: VolumeKeys) -> None:
        """New keys of the same volume (rotated, or the config re-read): open
        files keep their file keys, which did not change."""
        old = self.keys
        self._install(keys)
        if old is not None and old is not keys:
            old.close()

    def _drop_keys(self) -> None:
        """Forget the keys and everything decrypted with them."""
        if self.keys is not None:
            self.keys.close()
        self.keys = None
        self._keyrings.clear()
        self.codec = _NO_KEYS
        self.wrapper = _NO_KEYS
        self.policy = Policy()
        self._program_rules = False
        self._plain_paths.clear()
        self._names.clear()
        self._forget_checked()  # (no file key of the old keys stays held)
        for inode in self._inodes.values():
            inode.content = None  # reloaded (header checked again) at the next use
            if inode.kind == stat.S_IFLNK:
                inode.meta = None  # a decrypted symlink target

    def _has_slot(self, uid: int) -> bool:
        """Only a uid with a key slot in this volume's (authenticated) config is
        ever served, whatever the agent says.  A uid not in the config the
        mount knows makes it read the config again (a user added since, here
        or on another server), and use it if it authenticates."""
        if slot_for_uid(self.config, uid) is not None:
            return True
        if self.keys is None:
            return False
        self._reread_config()
        return slot_for_uid(self.config, uid) is not None

    def agent_state(self, uids: list[int], master: Secret | None,
                    key_id: int | None = None) -> None:
        self._unlocked = set()
        if master is None:
            self._drop_keys()
            self._forget_privates()
            return
        if self.agent_keys(master, key_id):
            # (served once this mount has keys: now, or when the agent that
            # was a rotation behind the config sends the new ones)
            self._unlocked = {uid for uid in uids if self._has_slot(uid)}

    def agent_keys(self, master: Secret, key_id: int | None = None) -> bool:
        """A master key from the agent (of generation ``key_id``): used with
        the config as it is on disk now (a policy set or a key rotated since
        the mount started), which it must authenticate, and whose policy must
        open (else: fail closed).  A config already rotated past ``key_id``
        (back-to-back rotations: the agent follows the next one within its
        config check) is followed from it if it descends from it, else the
        mount keeps what it has until the agent sends the newer key.  False:
        refused (access stays denied)."""
        try:
            try:
                stamp, fresh = follow.read_at(self._backing_fd, self.vol.backing)
            except CryptfsError as e:
                log.warning("cannot re-read this volume's config (%s): using the one read at "
                            "mount time", e)
                fresh, stamp = self.config, None
            if fresh.volume_id != self.config.volume_id:
                raise CryptfsError("the backing directory holds another volume now")
            if key_id is not None and fresh.key_id > key_id:
                keys = self._ahead_of_agent(fresh, master, key_id)
                if keys is None:
                    return True
            else:
                keys = fresh.open_keys(master)
            load_policy(fresh, keys)
        except CryptfsError as e:
            self._drop_keys()
            self._forget_privates()
            self._unlocked.clear()
            log.error("the key agent's key does not open this volume's config (%s): refused; "
                      "access stays denied", e)
            return False
        self.config = fresh
        self._config_stamp = stamp
        if self.keys is not None:
            self._swap_keys(keys)  # (a rotation: open files keep working)
        else:
            self._install(keys)
        self._drop_slotless()
        log.info("volume keys (generation %d) received from the key agent", keys.key_id)
        return True

    def _ahead_of_agent(self, fresh: Any, master: Secret, key_id: int) -> VolumeKeys | None:
        """The config on disk is a newer generation than the agent's key (it
        was rotated again after the agent read it): its keys if it descends
        from the agent's generation and a user key this mount holds opens it;
        None if that cannot be told yet (this mount keeps what it has and the
        agent, which re-reads the config every second, sends the newer key).
        CryptfsError if it does not descend from it (put back, forged)."""
        if self.keys is not None and self.keys.key_id >= fresh.key_id:
            return None  # (this mount followed it already; the agent's key is the older one)
        since = VolumeKeys(Secret(master.reveal()), key_id)
        try:
            keys, _ = follow.follow(fresh, since, self._holders(fresh))
            log.info("the volume's key was rotated to generation %d: following", keys.key_id)
            return keys
        except NotAVolume:
            raise  # (forged, or not of its line: fail closed)
        except CryptfsError:  # (no user key this mount holds opens it yet)
            log.info("the volume's config is newer (generation %d) than the key agent's key "
                     "(generation %d): waiting for the agent to follow it", fresh.key_id, key_id)
            return None
        finally:
            since.close()

    def agent_wipe(self) -> None:
        self._drop_keys()
        self._forget_privates()
        log.info("nobody is unlocked any more: volume keys wiped")

    def _forget_privates(self, uid: int | None = None) -> None:
        self._keyrings.clear()
        for u in [uid] if uid is not None else list(self._privates):
            priv = self._privates.pop(u, None)
            if priv is not None:
                priv.wipe()

    def agent_user_key(self, uid: int, private: Secret) -> None:
        """A user's X25519 key (for the hybrid files wrapped to them)."""
        self._forget_privates(uid)
        self._privates[uid] = Secret(private.reveal())
        self._keyrings.clear()

    def agent_unlocked(self, uid: int, private: Secret | None = None) -> None:
        if not self._has_slot(uid):
            log.error("the key agent reports uid %d unlocked, but this volume has no key slot "
                      "for it: refused", uid)
            return
        if private is not None:
            self.agent_user_key(uid, private)
        self._unlocked.add(uid)
        log.info("uid %d unlocked: access granted", uid)

    async def agent_locked(self, uid: int) -> None:
        self._unlocked.discard(uid)
        self._forget_privates(uid)
        self._quarantine_logged = {q for q in self._quarantine_logged if q[1] != uid}
        log.info("uid %d locked: access revoked", uid)
        # Pages of its open files that a program mapped with mmap (the only
        # plaintext a gated mount leaves in the page cache) are dropped, so
        # touching them again asks the daemon, which refuses.
        await self._drop_pages({h.inode.ino for h in self._files.values()
                                if h.uid == uid and h.readable})

    async def _drop_pages(self, inos: set[int]) -> None:
        for ino in inos:
            try:
                await trio.to_thread.run_sync(self.invalidate_inode, ino)
            except OSError:
                pass  # the mount is gone

    async def agent_lost(self, why: str) -> None:
        self._unlocked.clear()
        self._drop_keys()
        self._forget_privates()
        await self._drop_pages({h.inode.ino for h in self._files.values()})

    def take_activity(self) -> set[int]:
        seen, self._seen = self._seen, set()
        return seen
