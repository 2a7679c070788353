"""Access decisions: the per-user gate of each request, then, for an open, a
create, a truncate, a link, a rename or a removal, the facts the decision
needs (who asks, with the program's identity as cryptfs.programs establishes
it; the trusted-programs rules, masks and names of the file) gathered into a
cryptfs.decision.AccessRequest, and cryptfs.decision.decide's answer.  The
handler acts on that Decision.  A refusal is a :class:`Decided` error, which
carries the Decision to the request's record (cryptfs.fs.audit_hooks).
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import stat
import time

from cryptfs import links
from cryptfs.decision import (
    AccessRequest,
    Decision,
    Op,
    Reads,
    Trust,
    Where,
    Who,
    decide,
    refused,
)
from cryptfs.fs.core import (
    Core,
)
from cryptfs.fs.inodes import Inode, PlainHandle
from cryptfs.fuse import FuseError
from cryptfs.fuse.requests import Request
from cryptfs.policy import Rule
from cryptfs.roles import slot_role
from cryptfs.tree import proc_path
from cryptfs.users import (
    slot_for_uid,
)

log = logging.getLogger("cryptfs")


class Decided(FuseError):
    """A request refused, or failed after it was decided: the caller's errno,
    and the Decision the request's record carries."""

    def __init__(self, decision: Decision, err: int | None = None) -> None:
        super().__init__(err or decision.errno or errno.EACCES)
        self.decision = decision


class Access(Core):
    """Access decisions (see the module)."""

    def _who(self, uid: int) -> Who:
        """Who asks: the uid and what its role reads (roles apply on shared mounts only)."""
        if uid in self._cipher_only:
            reads = Reads.CIPHERTEXT
        elif uid in self._masked:
            reads = Reads.MASKED
        elif uid in self._log_only:
            reads = Reads.LOG_ONLY
        else:
            reads = Reads.PLAINTEXT
        return Who(uid, reads, "" if reads is Reads.PLAINTEXT else self._role_of(uid))

    def _trust(self, rules: list[Rule], pid: int) -> tuple[Trust, ...]:
        """What each trusted-programs rule makes of the program asking (reads /proc/PID)."""
        out = []
        for rule in rules:
            allowed, fields = self._identify.decide(rule, pid)
            out.append(Trust(rule.path, allowed, fields["decision"], rule.untrusted))
        return tuple(out)

    def _check(self, req: AccessRequest) -> Decision:
        """The decision on ``req``; a refusal is raised (with its decision)."""
        decision = decide(req)
        if decision.refused:
            raise Decided(decision)
        return decision

    def _decide_open(self, ctx: Request, inode: Inode, flags: int) -> Decision:
        """How an open is served: plaintext, ciphertext view or masked view (refused: raised)."""
        who = self._who(ctx.uid)
        known = True
        trust: tuple[Trust, ...] = ()
        mask, problem = None, ""
        if who.reads is not Reads.CIPHERTEXT:  # (their opens are decided by role alone)
            if self._program_rules:
                rules = self._programs_of(inode)
                if rules is None:
                    known = False
                else:
                    trust = self._trust(rules, ctx.pid)
            if who.reads is Reads.MASKED and self._mask_rules and inode.kind == stat.S_IFREG:
                mask, problem = self._find_mask(inode)
        return self._check(AccessRequest(who, Op.OPEN, Where(known, trust, mask, problem),
                                         flags))

    def _decide_create(self, ctx: Request, where: str | None) -> Decision:
        """Whether a new file may be made in directory ``where``."""
        who = self._who(ctx.uid)
        known = True
        trust: tuple[Trust, ...] = ()
        if self._program_rules and who.reads is not Reads.CIPHERTEXT:
            if where is None:
                log.error("cannot work out a file's directory for the trusted-programs rule: "
                          "open refused")
                known = False
            else:
                rule = self.policy.programs_for(where)
                trust = self._trust([rule] if rule is not None else [], ctx.pid)
        return self._check(AccessRequest(who, Op.CREATE, Where(known, trust)))

    def _decide_truncate(self, ctx: Request, inode: Inode, own_handle: bool) -> Decision:
        """Whether a file may be cut by ``ctx`` (``own_handle``: through a
        plaintext handle it holds, which its open decided)."""
        who = self._who(ctx.uid)
        known = True
        trust: tuple[Trust, ...] = ()
        mask, problem = None, ""
        if who.reads is not Reads.CIPHERTEXT:
            if self._program_rules:
                rules = self._programs_of(inode)
                if rules is None:
                    known = False
                else:
                    trust = self._trust(rules, ctx.pid)
            if who.reads is Reads.MASKED and self._mask_rules and not own_handle:
                mask, problem = self._find_mask(inode)
        return self._check(AccessRequest(who, Op.TRUNCATE, Where(known, trust, mask, problem)))

    def _programs_of(self, inode: Inode) -> list[Rule] | None:
        """The trusted-programs rules that govern a file: of its one name's
        directory, or (hard links) of every name's (docs/POLICY.md); None if
        its directory cannot be worked out."""
        names = self._other_names(inode)
        if names is not None:
            return names.programs(self.policy)
        where = self._plain_dir_of(inode)
        if where is None:
            log.error("cannot work out a file's directory for the trusted-programs rule: "
                      "refused")
            return None
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
            self.names_walks += 1
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
        if dst_dir is None:  # (where it goes is not known: no link)
            self._check(AccessRequest(self._who(ctx.uid), Op.LINK, Where(known=False)))
            return
        who = self._who(ctx.uid)
        names = self._names_of(inode)
        p_new = new_name.decode("utf-8", "surrogateescape")
        leaves = False
        if self._mask_rules and who.reads is Reads.MASKED:
            masks = names.masks(self.policy)
            leaves = bool(names.unknown) or bool(
                masks and self.policy.mask_for(dst_dir, p_new) not in masks)
        trust: tuple[Trust, ...] = ()
        if self._program_rules:
            here = self.policy.programs_for(dst_dir)
            trust = self._trust([r for r in names.programs(self.policy) if r != here], ctx.pid)
        self._check(AccessRequest(who, Op.LINK, Where(programs=trust, leaves_mask=leaves)))

    def _guard_file(self, ctx: Request, where: str | None, p_name: bytes,
                    st: os.stat_result, op: Op) -> None:
        """A regular file ``p_name`` in directory ``where`` that is about to be
        renamed, removed or replaced (``op``).  A program that a
        trusted-programs rule of any of the file's names does not trust may do
        none of these.  And nobody removes or replaces the last name a mask
        covers while the file keeps other names: that would take it out of
        the mask as a rename would (EACCES, recorded)."""
        if not stat.S_ISREG(st.st_mode):
            return  # (the rules govern files)
        who = self._who(ctx.uid)
        if where is None:
            self._check(AccessRequest(who, op, Where(known=False)))
            return
        name = p_name.decode("utf-8", "surrogateescape")
        names = (self._names_of_stat(st) if st.st_nlink > 1
                 else links.Names(((where, name),)))
        trust: tuple[Trust, ...] = ()
        if self._program_rules:
            trust = self._trust(names.programs(self.policy), ctx.pid)
        leaves = False
        if self._mask_rules and op is not Op.RENAME and st.st_nlink > 1:
            mask = self.policy.mask_for(where, name)
            rest = names.without(where, name)
            leaves = mask is not None and (bool(rest.unknown)
                                           or mask not in rest.masks(self.policy))
        self._check(AccessRequest(who, op, Where(programs=trust, leaves_mask=leaves)))

    # -- access gate (agent mode) --------------------------------------------------------------
    def _allow(self, uid: int) -> None:
        if self.gated:
            if uid not in self._unlocked or self.keys is None or uid in self._log_only:
                raise FuseError(errno.EACCES)
            self._seen.add(uid)
        elif self._own_slot_gone:
            raise FuseError(errno.EACCES)  # (a passphrase mount whose user was removed)

    def _plain(self, uid: int) -> None:
        """Refuse (EACCES) a user whose role reads no customer plaintext: the
        xattrs of files, a truncate (docs/POLICY.md, roles)."""
        if uid in self._cipher_only:
            raise FuseError(errno.EACCES)

    def _exclusive(self, inode: Inode, view: bool) -> None:
        """A view (masked, or the encrypted bytes) and the plaintext of one file
        are never open at once: the kernel keeps one page cache per inode, and
        a private mmap of either would show the other's pages."""
        if any(isinstance(h, PlainHandle) == view for h in inode.handles):
            raise Decided(refused("refused: open as "
                                  + ("plaintext" if view else "a masked or encrypted view")
                                  + " by someone else (they would share the page cache)"))

    def _recheck_soon(self) -> None:
        """On a shared mount, reads and writes through open handles also pick
        up a policy or role changed since (a stat of the config, at most
        twice a second)."""
        now = time.monotonic()
        if now - self._rechecked >= 0.5:
            self._rechecked = now
            self._refresh_config()

    def _still_allowed(self, handle: PlainHandle) -> None:
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
        who = self._who(ctx.uid)
        if src_dir is None or dst_dir is None or src_name is None:
            # (where it is is not known: no move)
            self._check(AccessRequest(who, Op.MOVE, Where(known=False)))
            return
        name_src = src_name if isinstance(src_name, str) else src_name.decode(
            "utf-8", "surrogateescape")
        name_dst = dst_name if isinstance(dst_name, str) else dst_name.decode(
            "utf-8", "surrogateescape")
        src_path = posixpath.join(src_dir, name_src)
        dst_path = posixpath.join(dst_dir, name_dst)
        # Rules name paths: a directory moved takes the rules of directories
        # below it nowhere (they stay with the old paths), and takes on those
        # below its new path.  So every place in the moved tree where a rule
        # starts, at either end, is compared: what covers it there before the
        # move and after (a rule two levels under the destination was missed:
        # a tree of the same shape moved over it lifted masks and program rules).
        below = [r for p, r in self.policy.rules.items()
                 if is_dir and (p + "/").startswith(src_path + "/")]
        places = [(src_path if is_dir else src_dir, dst_path if is_dir else dst_dir)]
        if is_dir:
            for p in self.policy.rules:
                for top in (src_path, dst_path):
                    if p != top and p.startswith(top.rstrip("/") + "/"):
                        rel = p[len(top.rstrip("/")):]
                        places.append((src_path.rstrip("/") + rel, dst_path.rstrip("/") + rel))
        leaves = False
        if self._mask_rules:
            if is_dir:
                leaves = any(r.masks for r in below) or any(
                    self.policy.masks_at(a) and self.policy.masks_at(a) != self.policy.masks_at(b)
                    for a, b in places)
            else:
                mask = self.policy.mask_for(src_dir, name_src)
                leaves = mask is not None and mask != self.policy.mask_for(dst_dir, name_dst)
        trust: tuple[Trust, ...] = ()
        if self._program_rules and not leaves:
            rules = [r for r in below if r.programs]
            for a, b in places:
                rule = self.policy.programs_for(a)
                if rule is not None and rule != self.policy.programs_for(b) and rule not in rules:
                    rules.append(rule)
            trust = self._trust(rules, ctx.pid)
        self._check(AccessRequest(who, Op.MOVE, Where(programs=trust, leaves_mask=leaves)))

    def _role_of(self, uid: int) -> str:
        slot = slot_for_uid(self.config, uid)
        return slot_role(slot) if slot is not None else "?"
