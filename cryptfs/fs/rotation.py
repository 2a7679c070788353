"""The rotation walk inside the mount: `cryptfs rotate` asks through
ROTATE_XATTR, and a trio task re-wraps every file the mount holds.

A walk that re-encrypts gives every file a new file key; another mount of
the volume (another server on shared storage) would keep the old one and
write blocks that no longer authenticate.  So such a walk runs only while
this mount holds the volume alone (cryptfs.presence exclusively, which no
other mount can then have or get), asked for before the command changes
anything (ROTATE_ALONE) and given back when the walk ends.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import time

import trio

from cryptfs import follow, presence, rotate
from cryptfs.content import read_stanzas
from cryptfs.control import ALONE_WAIT, ROTATE_ALONE, ROTATE_GO, ROTATE_SHARED
from cryptfs.errors import CryptfsError
from cryptfs.fs.core import (
    ROOT,
    Core,
)
from cryptfs.fuse import FuseError
from cryptfs.modes import IntegrityError
from cryptfs.modes.wrap import (
    Keyring,
)
from cryptfs.roles import ROTATORS, slot_role

log = logging.getLogger("cryptfs")


class Rotation(Core):
    """The rotation walk (see the module)."""

    presence: int | None = None  # cryptfs.presence, held shared (set by cryptfs.mount.serve)
    _alone = False  # ... held exclusively instead
    _alone_until = math.inf  # (trio clock) when an exclusive hold no walk used ends
    _alone_scope: trio.CancelScope | None = None  # the worker's wait, which ends it

    # -- rotation inside the mount ---------------------------------------------------------------
    def _rotation_request(self, uid: int, value: bytes) -> None:
        """`cryptfs rotate` wrote a new key generation into the config and asks
        this mount to walk its files (it holds them open: nobody else may);
        before a re-encryption, it asks it to hold the volume alone."""
        walking = self._rotation is not None and self._rotation.state == "running"
        if value == ROTATE_ALONE:
            if not self._may_hold_alone(uid):
                raise FuseError(errno.EACCES)
            self._hold_alone(walking)
            return
        if value == ROTATE_SHARED:
            # (only who may ask for the hold may end it: else any user who may
            # write the root could end a re-encryption's hold between its steps)
            if not self._may_hold_alone(uid):
                raise FuseError(errno.EACCES)
            if not walking:
                self._end_alone("the command that asked for it is done")
            return
        if value != ROTATE_GO:
            raise FuseError(errno.EINVAL)
        self._reread_config()
        if self.keys is None or self.keys.key_id != self.config.key_id:
            log.warning("rotation requested, but this mount does not hold the new key "
                        "generation (yet)")
            raise FuseError(errno.EBUSY)
        if self._rotation is not None and self._rotation.state == "running":
            return
        kind = self.config.rotation["kind"] if self.config.rotation else None
        if kind == "reencrypt" and not self._be_alone():
            raise FuseError(errno.EUSERS)
        self._rotation = rotate.Progress(kind or "slots")
        if kind is None:
            self._rotation.state = "finished"
            return
        log.info("rotation (%s) to key generation %d: walking the files (asked by uid %d)",
                 kind, self.keys.key_id, uid)
        self._rotation_wanted.set()

    def _be_alone(self) -> bool:
        """Hold the volume alone (see the module), if no other mount has it."""
        if self.presence is None or self._alone:
            return True  # (None: these operations serve no mount, as in unit tests)
        try:
            self._alone = presence.be_alone(self.vol.backing, self.presence)
        except CryptfsError as e:
            log.warning("cannot hold the volume alone for a re-encryption: %s", e)
            raise FuseError(errno.EAGAIN) from None
        if self._alone:
            log.info("holding the volume alone for a re-encryption: no other mount has it, "
                     "and none can start until the walk ends")
        else:
            log.warning("re-encryption refused: %s", presence.ANOTHER_MOUNT)
        return self._alone

    def _hold_alone(self, walking: bool) -> None:
        if not self._be_alone():
            raise FuseError(errno.EUSERS)
        if walking:
            return  # (held until that walk ends)
        try:
            self._alone_until = trio.current_time() + ALONE_WAIT
        except RuntimeError:
            return  # (no trio loop: no worker either)
        if self._alone_scope is not None:
            self._alone_scope.deadline = self._alone_until

    def _end_alone(self, why: str) -> None:
        self._alone_until = math.inf
        if not self._alone or self.presence is None:
            return
        self._alone = False
        if presence.share(self.presence):
            log.info("the volume may be mounted elsewhere again (%s)", why)
        else:
            log.error("this mount could not take its shared hold of %s back: other servers' "
                      "offline rotations are not held off (remount it)", presence.PRESENCE_NAME)

    def _may_rotate(self, uid: int) -> bool:
        """Root, the mount's owner, or an unlocked user may ask for the walk:
        it only carries out what the authenticated config already says (a
        passphrase was needed to write that), and reveals no plaintext."""
        return uid in (0, self._euid) or not self.gated or uid in self._unlocked

    def _may_hold_alone(self, uid: int) -> bool:
        """Holding the volume alone keeps every other server from mounting it:
        root, the mount's owner, or (a shared mount) an unlocked user whose
        role may rotate.  Not any user a passphrase mount lets in (allow_other):
        they hold no passphrase of the volume."""
        if uid in (0, self._euid):
            return True
        return self.gated and uid in self._unlocked and any(
            s.extra.get("uid") == uid and slot_role(s) in ROTATORS for s in self.config.slots)

    def _rotation_progress(self) -> bytes:
        if self._rotation is None:
            return b'{"state": "idle"}'
        return json.dumps(self._rotation.to_json()).encode()

    async def rotation_worker(self) -> None:
        """Runs the walks that :meth:`_rotation_request` asks for, one file per
        step between requests (each step runs to completion on this thread,
        so no request sees a file half rotated)."""
        while True:
            with trio.CancelScope(deadline=self._alone_until) as scope:
                self._alone_scope = scope
                await self._rotation_wanted.wait()
            self._alone_scope = None
            if not self._rotation_wanted.is_set():  # (held alone, but no walk was asked for)
                self._end_alone(f"no re-encryption was asked for within {ALONE_WAIT:g} s")
                continue
            self._rotation_wanted = trio.Event()
            self._alone_until = math.inf
            prog = self._rotation
            assert prog is not None and self.keys is not None
            # The walk opens hybrid files with every user key this mount holds
            # (the keys of the users unlocked when it starts, or its own user's).
            keyring = self.keys.keyring([p.reveal() for p in self._all_privates()])
            try:
                rels = [rel for _, _, rel in rotate.regular_files(self._tree_root)]
                prog.total = len(rels)
                for rel in rels:
                    await trio.sleep(0)
                    if self.keys is None:
                        raise CryptfsError("the volume was locked during the rotation")
                    self._rotate_path(rel, prog, keyring)
                    prog.done += 1
                # Another server sharing the backing storage may still write headers
                # of the old generation until it follows (within follow.BOUND):
                # the old keys stay until then, and the final pass finds those.
                await trio.sleep(max(0.0, prog.started + follow.SETTLE - time.monotonic()))
                if self.keys is None:
                    raise CryptfsError("the volume was locked during the rotation")
                # Files renamed during the walk may have been missed: one pass that
                # cannot be interrupted checks every header, then the old keys go.
                self._rotation_final(prog, keyring)
            except Exception as e:  # noqa: BLE001 - reported through the progress xattr
                prog.state = "failed"
                prog.message = (str(e) if isinstance(e, CryptfsError)
                                else getattr(e, "strerror", None) or f"{type(e).__name__}: {e}")
                log.error("rotation failed: %s (run cryptfs rotate again to resume)", prog.message)
            finally:
                self._end_alone("the walk ended")

    def _rotate_path(self, rel: str, prog: rotate.Progress, keyring: Keyring) -> None:
        assert self.keys is not None
        target = f"tree/{rel}"
        try:
            fd = os.open(rel, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._inodes[ROOT].fd)
        except FileNotFoundError:
            return
        except OSError as e:
            prog.failed.append(f"{target} ({e.strerror})")
            return
        try:
            inode = self._inodes.get(self._fuse_ino(os.fstat(fd).st_ino))
            content = inode.content if inode is not None else None
            damaged = len(prog.damaged)
            new = rotate.step(fd, content, keyring, self.keys, self.config, prog,
                              self.vol.backing, target)
            if len(prog.damaged) > damaged:
                log.error("inode %s: damaged, so not re-encrypted (its readable blocks stay "
                          "readable)", inode.ino if inode is not None else "?")
            if new is not None:
                if inode is not None:
                    if content is not None:
                        new.fd = inode.fd
                        inode.content = new
                    inode.meta = (new.overhead, new.h_len)
                self._set_layout_hint(fd, new)
        finally:
            os.close(fd)

    def _rotation_final(self, prog: rotate.Progress, keyring: Keyring) -> None:
        assert self.keys is not None
        for _, _, rel in rotate.regular_files(self._tree_root):
            target = f"tree/{rel}"
            try:
                fd = os.open(rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=self._inodes[ROOT].fd)
            except FileNotFoundError:
                continue
            except OSError as e:
                prog.failed.append(f"{target} ({e.strerror})")
                continue
            try:
                stanzas = read_stanzas(fd)
            except IntegrityError:
                continue  # a header that does not parse opens with no key
            except OSError as e:
                prog.failed.append(f"{target} ({e.strerror})")
                continue
            finally:
                os.close(fd)
            if rotate.is_stale(stanzas, self.keys, self.config) and target not in prog.skipped \
                    and target not in prog.damaged and not any(f.startswith(target + " ")
                                                               for f in prog.failed):
                self._rotate_path(rel, prog, keyring)
        finished = False
        if not prog.failed:
            os.sync()
            done = rotate.finish_config(self.vol.backing, self.keys)
            if done is not None:
                self.config, keys = done
                self._config_stamp = self._stat_config()
                self._swap_keys(keys)
                finished = True
        rotate.outcome(prog, finished)
        log.info("rotation (%s) walked: %d of %d files rewritten, %d bytes%s", prog.kind,
                 prog.changed, prog.total, prog.bytes,
                 "; the old key generations are forgotten" if finished else "")
        if prog.message:
            log.warning("rotation (%s): %s", prog.kind, prog.message)
