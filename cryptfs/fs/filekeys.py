"""Who can open a file: the key wrappers of new files (symmetric, or hybrid
recipients), the keyrings that unwrap them, and sharing a hybrid file.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

from cryptfs.content import ContentFile, pwrite_all, read_stanzas
from cryptfs.fs.core import (
    HYBRID_SPARE,
    Core,
)
from cryptfs.fs.inodes import Inode
from cryptfs.fuse import FuseError
from cryptfs.modes import IntegrityError, content_mode_by_name
from cryptfs.modes.content import ContentMode
from cryptfs.modes.errors import NotARecipient
from cryptfs.modes.wrap import (
    STANZA_PADDING,
    X25519_BODY_LEN,
    Keyring,
    RecipientWrapper,
    padding,
    recipient_tag,
    recipient_tags,
    x25519_stanza,
)
from cryptfs.secret import Secret
from cryptfs.tree import proc_path
from cryptfs.users import (
    slot_for_uid,
)

log = logging.getLogger("cryptfs")


class FileKeys(Core):
    """Who can open a file (see the module)."""

    def _public_of(self, uid: int) -> bytes | None:
        """The creator's X25519 public key: the requesting user's (gated) or the mount's."""
        if self.gated:
            slot = slot_for_uid(self.config, uid)
        else:
            slot = getattr(self.vol, "slot", None)
        return slot.public if slot is not None else None

    def _new_file_keys(self, parent: Inode, uid: int) -> tuple[ContentMode, Any]:
        """Content mode and key wrapper of a file created in ``parent`` by ``uid``,
        as the directory's policy rule says (default: the volume's mode, symmetric)."""
        if not self.policy.rules:
            return self.vol.default_mode, self.wrapper
        where = self._plain_dir(parent)
        if where is None:
            # Which rule applies is unknown: refuse rather than risk writing a
            # file of a recipients-only directory readable by everyone.
            log.error("inode %d: cannot work out this directory's path for the policy: "
                      "create refused", parent.ino)
            raise FuseError(errno.EACCES)
        rule = self.policy.rule_for(where)
        if rule is None:
            return self.vol.default_mode, self.wrapper
        mode = content_mode_by_name(rule.mode)
        if not rule.hybrid:
            return mode, self.wrapper
        publics = self.config.publics()
        recipients = [publics[n] for n in rule.recipients if n in publics]
        creator = self._public_of(uid)
        if not rule.dropbox and creator is not None:
            recipients.insert(0, creator)
        if self.config.recovery is not None:
            recipients.append(self.config.recovery.public)
        if not recipients:
            log.error("inode %d: its policy rule leaves a new file no recipient: create "
                      "refused", parent.ino)  # (the rule's path is secret: not logged)
            raise FuseError(errno.EACCES)
        return mode, RecipientWrapper(recipients, spare=HYBRID_SPARE)

    def _keyring(self, uid: int | None) -> Keyring:
        """What opens headers for ``uid``: the volume's wrap keys and that user's
        own X25519 key (gated), or the mount's user's.  Kept until the keys or
        that user's key change (deriving the public key costs ~40 µs an open)."""
        assert self.keys is not None
        key = uid if self.gated else None
        ring = self._keyrings.get(key)
        if ring is None:
            priv = self._own_private if not self.gated else (
                self._privates.get(uid) if uid is not None else None)
            ring = self.keys.keyring([priv.reveal()] if priv is not None and len(priv) else [])
            self._keyrings[key] = ring
        return ring

    def _check_recipient(self, content: ContentFile, uid: int) -> None:
        """A hybrid file's key already in memory is still only for its recipients."""
        hdr = content.header
        if not hdr.hybrid:
            return
        try:
            key = self._keyring(uid).unwrap(list(hdr.stanzas), hdr.wrap_ad(hdr.mode, hdr.file_id))
        except NotARecipient:
            raise FuseError(errno.EACCES) from None
        if key != hdr.file_key:
            raise IntegrityError("hybrid file key mismatch")

    def _all_privates(self) -> list[Secret]:
        out = list(self._privates.values())
        if self._own_private is not None and len(self._own_private):
            out.append(self._own_private)
        return out

    # -- sharing hybrid files -----------------------------------------------------------------------
    def _recipients(self, inode: Inode) -> bytes:
        """Names of a hybrid file's recipients, one per line ("recovery" for the
        recovery key, "?" + tag for a key no user of the volume has any more);
        empty for a symmetric file.  Read from the header without a key."""
        fd = os.open(proc_path(inode.fd), os.O_RDONLY | os.O_CLOEXEC)
        try:
            stanzas = read_stanzas(fd)
        finally:
            os.close(fd)
        names = {recipient_tag(pub): n for n, pub in self.config.publics().items()}
        if self.config.recovery is not None:
            names[recipient_tag(self.config.recovery.public)] = "recovery"
        return b"".join((names.get(t) or "?" + t.hex()).encode() + b"\n"
                        for t in recipient_tags(stanzas))

    def _share(self, inode: Inode, uid: int, value: bytes) -> None:
        """Wrap a hybrid file's key to one more user; only a recipient can (the
        file key is needed).  It takes a padding stanza's room, so the header
        keeps its length and no content moves."""
        try:
            name = value.decode("utf-8")
        except UnicodeDecodeError:
            raise FuseError(errno.EINVAL) from None
        self._refresh_config()
        public = self.config.publics().get(name)
        if public is None:
            raise FuseError(errno.ENOENT)  # no such user with a key pair
        try:
            content = self._content(inode, want_write=True, uid=uid)
            hdr = content.header
            if not hdr.hybrid:
                raise FuseError(errno.EINVAL)  # symmetric: every user can already
            if recipient_tag(public) in recipient_tags(hdr.stanzas):
                return
            stanzas = list(hdr.stanzas)
            need = 3 + X25519_BODY_LEN
            room = next((i for i, st in enumerate(stanzas)
                         if st.type == STANZA_PADDING and 3 + len(st.body) >= need), None)
            if room is None:
                raise FuseError(errno.ENOSPC)  # no room left in the header
            left = 3 + len(stanzas[room].body) - need
            new = [x25519_stanza(hdr.file_key, public, hdr.wrap_ad(hdr.mode, hdr.file_id))]
            if left:
                new.append(padding(left))
            stanzas[room:room + 1] = new
            fresh = hdr.with_stanzas(stanzas)
            assert fresh.length == hdr.length
            pwrite_all(inode.fd, [fresh.encode()], 0)
            os.fsync(inode.fd)
            content.header = fresh
            log.info("inode %d: shared with %s by uid %d", inode.ino, name, uid)
        finally:
            self._unload_content(inode)
