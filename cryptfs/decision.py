"""How a request on a file is decided: one pure function, :func:`decide`.

A handler gathers what the decision needs into an :class:`AccessRequest`:

- *who*: the uid, its role and what that role reads of customer files
  (:class:`Reads`), and, for each trusted-programs rule that applies, what
  the mount established of the program asking (:class:`Trust`: cryptfs.programs
  reads ``/proc/PID`` for that; this module does no I/O);
- *what*: the operation (:class:`Op`) and its open flags;
- *where*: the rules that apply to the file (:class:`Where`): its
  trusted-programs rules, the mask it is served through, whether the
  operation would take it out of its mask, whether its place is known.

:func:`decide` returns a :class:`Decision`: allowed, refused (with an errno),
a ciphertext view or a masked view, with the reason the access log records.
The handler acts on it; the access log records it.  The gate (is the user
unlocked at all) runs before any of this, on every request (cryptfs.fs.access).
"""

from __future__ import annotations

import enum
import errno as errnos
import os
from dataclasses import dataclass

from cryptfs.policy import MaskRule

# The access log's texts for decisions (tests and auditors match them).
NO_ORACLE_WRITES = ("masked view: no writes into a file with token columns "
                    "(they would be a token oracle)")
NOT_OUT_OF_MASK = "masked file: not moved out of its mask"
NOT_OUT_OF_PROGRAMS = ("not moved out of its trusted-programs rule by a program it does not "
                       "trust")


class Outcome(enum.Enum):
    ALLOWED = "allowed"
    REFUSED = "refused"
    CIPHERTEXT = "ciphertext view"  # the file's encrypted bytes, read-only
    MASKED = "masked view"  # the file as its mask shows it


class Reads(enum.Enum):
    """What a user's role reads of customer files on this mount (docs/POLICY.md)."""

    PLAINTEXT = "plaintext"  # supervisors; everyone on a mount that applies no roles
    MASKED = "masked"  # agents: structured files a mask governs, masked
    CIPHERTEXT = "ciphertext"  # technicians and admins
    LOG_ONLY = "log only"  # auditors: nothing through the mount


class Op(enum.Enum):
    OPEN = "open"
    CREATE = "create"
    TRUNCATE = "truncate"
    LINK = "link"  # a new name for the file
    MOVE = "move"  # a name (of a file or directory) moves to another place
    RENAME = "renamed"  # the file's name goes (rename) ...
    REMOVE = "removed"  # ... (unlink) ...
    REPLACE = "replaced"  # ... (another file renamed over it)


@dataclass(frozen=True, slots=True)
class Trust:
    """One trusted-programs rule and what the mount established of the
    program asking (cryptfs.programs.Identifier.decide)."""

    rule: str  # the rule's path
    trusted: bool
    how: str  # how that was established ("trusted program (by path)", ...)
    untrusted: str = "deny"  # what the rule gives a program it does not trust: "deny" or "ciphertext"


@dataclass(frozen=True, slots=True)
class Who:
    uid: int
    reads: Reads = Reads.PLAINTEXT
    role: str = ""  # the role's name where the mount applies roles (shared mounts)


@dataclass(frozen=True, slots=True)
class Where:
    """The rules that apply to the file, as far as the operation needs them."""

    known: bool = True  # where the file is (its directory, its names) could be worked out
    programs: tuple[Trust, ...] = ()  # its trusted-programs rules, each with its verdict
    mask: MaskRule | None = None  # the mask it is served through to masked roles
    mask_problem: str = ""  # why no one mask can be chosen (a name unknown, two masks)
    leaves_mask: bool = False  # the operation would take it out of its mask


@dataclass(frozen=True, slots=True)
class AccessRequest:
    who: Who
    op: Op
    where: Where = Where()
    flags: int = os.O_RDONLY  # open(2) flags (OPEN)

    @property
    def wants_write(self) -> bool:
        return (self.flags & os.O_ACCMODE) != os.O_RDONLY or bool(self.flags & os.O_TRUNC)


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    reason: str = ""  # what the access log records as "decision" ("": nothing to say)
    errno: int = 0  # when refused
    rule: str | None = None  # the rule (or rules) that decided, for the record
    mask: MaskRule | None = None  # a masked view: the mask it is made with

    @property
    def refused(self) -> bool:
        return self.outcome is Outcome.REFUSED

    def fields(self) -> dict[str, str]:
        """The access log's fields for this decision."""
        out: dict[str, str] = {}
        if self.rule is not None:
            out["rule"] = self.rule
        if self.reason:
            out["decision"] = self.reason
        return out


ALLOWED = Decision(Outcome.ALLOWED)


def refused(reason: str = "", rule: str | None = None, err: int = errnos.EACCES) -> Decision:
    return Decision(Outcome.REFUSED, reason, err, rule)


def _distrust(programs: tuple[Trust, ...]) -> Trust | None:
    """Of the rules, one that does not trust the program: one that denies
    rather than one that serves the ciphertext, if any does."""
    untrusting = [t for t in programs if not t.trusted]
    if not untrusting:
        return None
    return next((t for t in untrusting if t.untrusted != "ciphertext"), untrusting[0])


def _trusted(programs: tuple[Trust, ...]) -> Decision:
    """Allowed, saying how the program was trusted (by every rule of a file with hard links)."""
    if not programs:
        return ALLOWED
    rule = ", ".join(t.rule for t in programs) if len(programs) > 1 else programs[0].rule
    return Decision(Outcome.ALLOWED, programs[0].how, rule=rule)


def decide(req: AccessRequest) -> Decision:
    """What ``req`` may do (see the module).  Pure."""
    who, where, op = req.who, req.where, req.op
    if who.reads is Reads.LOG_ONLY:
        return refused(f"role {who.role}: reads the access log only")
    if op is Op.OPEN:
        return _open(req)
    if op is Op.CREATE:
        if who.reads is Reads.CIPHERTEXT:
            return refused(f"role {who.role}: writes no customer data")
        if not where.known:
            return refused()
        t = _distrust(where.programs)
        if t is not None:
            return refused(t.how, t.rule)
        return _trusted(where.programs)
    if op is Op.TRUNCATE:
        if who.reads is Reads.CIPHERTEXT or not where.known:
            return refused()
        t = _distrust(where.programs)
        if t is not None:
            return refused("not truncated by a program its trusted-programs rule does not trust",
                           t.rule)
        if who.reads is Reads.MASKED and (where.mask is not None or where.mask_problem):
            return refused(where.mask_problem)  # (a masked view never cuts the file)
        return ALLOWED
    if op is Op.LINK:
        if not where.known:
            return refused()
        if who.reads is Reads.MASKED and where.leaves_mask:
            return refused(NOT_OUT_OF_MASK)
        t = _distrust(where.programs)
        if t is not None:
            return refused(NOT_OUT_OF_PROGRAMS, t.rule)
        return ALLOWED
    if op is Op.MOVE:
        if not where.known:
            return refused()
        if where.leaves_mask:  # (whoever moves it: declassifying is a policy change)
            return refused(NOT_OUT_OF_MASK)
        if _distrust(where.programs) is not None:
            return refused(NOT_OUT_OF_PROGRAMS)
        return ALLOWED
    # RENAME, REMOVE, REPLACE: one name of a regular file goes
    if not where.known:
        return refused(f"not {op.value}: the file's directory is unknown")
    t = _distrust(where.programs)
    if t is not None:
        return refused(f"not {op.value} by a program its trusted-programs rule does not trust",
                       t.rule)
    if op is not Op.RENAME and where.leaves_mask:
        return refused(f"masked file: not {op.value} while it has hard links outside its mask "
                       "(that would move it out)")
    return ALLOWED


def _open(req: AccessRequest) -> Decision:
    who, where = req.who, req.where
    write = req.wants_write
    if who.reads is Reads.CIPHERTEXT:
        if write:
            return refused(f"role {who.role}: writes no customer data")
        return Decision(Outcome.CIPHERTEXT, f"role {who.role}: served the ciphertext")
    if not where.known:
        return refused()
    t = _distrust(where.programs)
    if t is not None:
        if t.untrusted != "ciphertext" or write:
            return refused(t.how, t.rule)
        how = t.how if t.how.endswith("ciphertext") else t.how + ": served the ciphertext"
        return Decision(Outcome.CIPHERTEXT, how, rule=t.rule)
    if who.reads is Reads.MASKED:
        if where.mask_problem:
            return refused(where.mask_problem)
        rule = where.mask
        if rule is not None:
            if req.flags & os.O_TRUNC:
                return refused("masked view: no truncating")
            if (req.flags & os.O_ACCMODE) != os.O_RDONLY and rule.mask().tokenised:
                return refused(NO_ORACLE_WRITES)
            return Decision(Outcome.MASKED, f"masked view ({rule.fmt}, {rule.glob})", mask=rule)
    return _trusted(where.programs)
