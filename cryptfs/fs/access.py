"""Access decisions: the per-user gate of each request, roles, trusted-programs
rules, the rules a hard link, a new file or a move must keep, and exclusive
opens.  A refusal is a ``FuseError``; why it was refused is left in
``_decision`` for the request's record.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import stat
import time
from typing import Any

from cryptfs import links
from cryptfs.fs.core import (
    Core,
)
from cryptfs.fs.inodes import Inode, _Handle
from cryptfs.fuse import FuseError
from cryptfs.fuse.requests import Request
from cryptfs.policy import Rule
from cryptfs.roles import slot_role
from cryptfs.tree import proc_path
from cryptfs.users import (
    slot_for_uid,
)

log = logging.getLogger("cryptfs")


class Access(Core):
    """Access decisions (see the module)."""

    def _untrusted(self, where: str | None, pid: int) -> Rule | None:
        """The rule that does not trust the program asking (None: it may open
        the file).  A rule that names programs lets only those open files."""
        self._decision = None
        if where is None:
            log.error("cannot work out a file's directory for the trusted-programs rule: "
                      "open refused")
            raise FuseError(errno.EACCES)
        rule = self.policy.programs_for(where)
        return self._untrusted_by([rule] if rule is not None else [], pid)

    def _untrusted_by(self, rules: list[Rule], pid: int) -> Rule | None:
        """Of ``rules`` (every trusted-programs rule that governs a name of the
        file), one that does not trust the program asking: one that denies
        rather than one that serves the ciphertext, if any does.  None: every
        rule trusts it."""
        self._decision = None
        refusing: list[tuple[Rule, dict[str, Any]]] = []
        trusted: dict[str, Any] | None = None
        for rule in rules:
            allowed, fields = self._identify.decide(rule, pid)
            if not allowed:
                refusing.append((rule, fields))
            elif trusted is None:
                trusted = fields
        if refusing:
            rule, fields = next(((r, f) for r, f in refusing if r.untrusted != "ciphertext"),
                                refusing[0])
            self._decision = fields
            return rule
        if trusted is not None:
            if len(rules) > 1:  # (a hard-linked file: trusted by the rule of every name)
                trusted["rule"] = ", ".join(r.path for r in rules)
            self._decision = trusted
        return None

    def _programs_of(self, inode: Inode) -> list[Rule]:
        """The trusted-programs rules that govern a file: of its one name's
        directory, or (hard links) of every name's (docs/POLICY.md)."""
        names = self._other_names(inode)
        if names is not None:
            return names.programs(self.policy)
        where = self._plain_dir_of(inode)
        if where is None:
            log.error("cannot work out a file's directory for the trusted-programs rule: "
                      "refused")
            raise FuseError(errno.EACCES)
        rule = self.policy.programs_for(where)
        return [rule] if rule is not None else []

    # -- hard links: every name of a file ------------------------------------------------------
    def _other_names(self, inode: Inode) -> links.Names | None:
        """Every name of a file that a restricting rule could govern; None if
        it has exactly one name, the one its descriptor was opened through
        (that name is then exact and needs no walk)."""
        st = os.fstat(inode.fd)
        if st.st_nlink == 1:
            try:
                here = os.stat(os.readlink(proc_path(inode.fd)), follow_symlinks=False)
                if (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino):
                    return None
            except OSError:
                pass  # (that name was removed: another one is the file's now)
        return self._names_of_stat(st)

    def _names_of_stat(self, st: os.stat_result) -> links.Names:
        if st.st_nlink == 0:
            return links.Names((), unknown=1)  # (removed, and reopened: its place is unknown)
        names = self._names.get(st, self.policy, self._epoch)
        if names is None:
            names = links.find_names(self._tree_root, self.codec, st, self.policy)
            self._names.put(st, self.policy, self._epoch, names)
        return names

    def _names_of(self, inode: Inode) -> links.Names:
        """Every name of a file under a restricting rule (one, or all its hard links)."""
        names = self._other_names(inode)
        if names is not None:
            return names
        where = self._plain_dir_of(inode)
        name = self._plain_name_of(inode)
        if where is None or name is None:
            return links.Names((), unknown=1)
        return links.Names(((where, name),))

    def _guard_link(self, ctx: Request, inode: Inode, dst_dir: str | None,
                    new_name: bytes) -> None:
        """A new name for a file.  It keeps every rule of its other names (the
        strictest of all governs it), so a link out of a rule takes nothing
        out of it; still, an agent may not link a masked file to a name
        another mask or none covers, nor a program a trusted-programs rule
        does not trust link a file out of that rule (as for a rename)."""
        if dst_dir is None:
            raise FuseError(errno.EACCES)  # (where it goes is not known: no link)
        names = self._names_of(inode)
        p_new = new_name.decode("utf-8", "surrogateescape")
        if self._mask_rules and ctx.uid in self._masked:
            masks = names.masks(self.policy)
            if names.unknown or (masks and self.policy.mask_for(dst_dir, p_new) not in masks):
                self._decision = {"decision": "masked file: not moved out of its mask"}
                raise FuseError(errno.EACCES)
        if self._program_rules:
            here = self.policy.programs_for(dst_dir)
            if self._untrusted_by([r for r in names.programs(self.policy) if r != here],
                                  ctx.pid) is not None:
                self._decision = {**(self._decision or {}),
                                  "decision": "not moved out of its trusted-programs rule by a "
                                              "program it does not trust"}
                raise FuseError(errno.EACCES)
            self._decision = None

    def _guard_file(self, ctx: Request, where: str | None, p_name: bytes,
                    st: os.stat_result, what: str) -> None:
        """A regular file ``p_name`` in directory ``where`` that is about to be
        renamed, removed or replaced (``what``).  A program that a
        trusted-programs rule of any of the file's names does not trust may do
        none of these.  And nobody removes or replaces the last name a mask
        covers while the file keeps other names: that would take it out of
        the mask as a rename would (EACCES, recorded)."""
        if not stat.S_ISREG(st.st_mode):
            return
        if where is None:
            self._decision = {"decision": f"not {what}: the file's directory is unknown"}
            raise FuseError(errno.EACCES)
        name = p_name.decode("utf-8", "surrogateescape")
        names = (self._names_of_stat(st) if st.st_nlink > 1
                 else links.Names(((where, name),)))
        if self._program_rules:
            if self._untrusted_by(names.programs(self.policy), ctx.pid) is not None:
                self._decision = {**(self._decision or {}),
                                  "decision": f"not {what} by a program its trusted-programs "
                                              "rule does not trust"}
                raise FuseError(errno.EACCES)
            self._decision = None
        if self._mask_rules and what != "renamed" and st.st_nlink > 1:
            mask = self.policy.mask_for(where, name)
            rest = names.without(where, name)
            if mask is not None and (rest.unknown or mask not in rest.masks(self.policy)):
                self._decision = {"decision": f"masked file: not {what} while it has hard links "
                                              "outside its mask (that would move it out)"}
                raise FuseError(errno.EACCES)

    # -- access gate (agent mode) --------------------------------------------------------------
    def _allow(self, uid: int) -> None:
        if self.gated:
            if uid not in self._unlocked or self.keys is None or uid in self._log_only:
                raise FuseError(errno.EACCES)
            self._seen.add(uid)

    def _plain(self, uid: int) -> None:
        """Refuse (EACCES) a user whose role reads no customer plaintext: the
        xattrs of files, a truncate (docs/POLICY.md, roles)."""
        if uid in self._cipher_only:
            raise FuseError(errno.EACCES)

    def _exclusive(self, inode: Inode, view: bool) -> None:
        """A view (masked, or the encrypted bytes) and the plaintext of one file
        are never open at once: the kernel keeps one page cache per inode, and
        a private mmap of either would show the other's pages."""
        if any((h.view is not None or h.raw >= 0) != view for h in inode.handles):
            self._decision = {"decision": "refused: open as "
                              + ("plaintext" if view else "a masked or encrypted view")
                              + " by someone else (they would share the page cache)"}
            raise FuseError(errno.EACCES)

    def _recheck_soon(self) -> None:
        """On a shared mount, reads and writes through open handles also pick
        up a policy or role changed since (a stat of the config, at most
        twice a second)."""
        now = time.monotonic()
        if now - self._rechecked >= 0.5:
            self._rechecked = now
            self._refresh_config()

    def _still_allowed(self, handle: _Handle) -> None:
        """A handle opened under an older policy or role: what its user may
        have now (a mask set, a role changed since) decides its reads and writes."""
        if handle.uid in self._cipher_only or handle.uid in self._log_only or (
                handle.uid in self._masked and self._mask_rules
                and self._mask_of(handle.inode) is not None):
            raise FuseError(errno.EACCES)
        handle.policy = self.policy

    def _guard_move(self, ctx: Request, src_dir: str | None,
                    src_name: str | bytes | None, dst_dir: str | None, dst_name: str | bytes,
                    is_dir: bool) -> None:
        """A rename must not take a file out of what protects it: the mask
        agents see it through (whoever renames: declassifying is a policy
        change, never a move), or a trusted-programs rule (for a program that
        rule does not trust).  EACCES otherwise."""
        if src_dir is None or dst_dir is None or src_name is None:
            raise FuseError(errno.EACCES)  # (where it is is not known: no move)
        name_src = src_name if isinstance(src_name, str) else src_name.decode(
            "utf-8", "surrogateescape")
        name_dst = dst_name if isinstance(dst_name, str) else dst_name.decode(
            "utf-8", "surrogateescape")
        src_path = posixpath.join(src_dir, name_src)
        dst_path = posixpath.join(dst_dir, name_dst)
        # Rules name paths: a directory moved takes the rules of directories
        # below it nowhere (they stay with the old paths).
        below = [r for p, r in self.policy.rules.items()
                 if is_dir and (p + "/").startswith(src_path + "/")]
        if self._mask_rules:
            if is_dir:
                moved_out = any(r.masks for r in below) or (
                    self.policy.masks_at(src_path) and (
                        self.policy.masks_at(src_path) != self.policy.masks_at(dst_path)))
            else:
                mask = self.policy.mask_for(src_dir, name_src)
                moved_out = mask is not None and mask != self.policy.mask_for(dst_dir, name_dst)
            if moved_out:
                self._decision = {"decision": "masked file: not moved out of its mask"}
                raise FuseError(errno.EACCES)
        if self._program_rules:
            rule = self.policy.programs_for(src_path if is_dir else src_dir)
            rules = [r for r in below if r.programs]
            if rule is not None and rule != self.policy.programs_for(
                    dst_path if is_dir else dst_dir):
                rules.append(rule)
            for rule in rules:
                allowed, _ = self._identify.decide(rule, ctx.pid)
                if not allowed:
                    self._decision = {"decision": "not moved out of its trusted-programs rule "
                                                  "by a program it does not trust"}
                    raise FuseError(errno.EACCES)

    def _role_of(self, uid: int) -> str:
        slot = slot_for_uid(self.config, uid)
        return slot_role(slot) if slot is not None else "?"
