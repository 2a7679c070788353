"""cryptfs.decision without a mount: each role x operation x rule -> the
Decision the handlers act on and the access log records.

The mount-level tests (test_roles, test_masking, test_programs, test_links ...)
show the same decisions through real requests; this table pins every branch.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from cryptfs.decision import (
    NO_ORACLE_WRITES,
    NOT_OUT_OF_MASK,
    NOT_OUT_OF_PROGRAMS,
    AccessRequest,
    Decision,
    Op,
    Outcome,
    Reads,
    Trust,
    Where,
    Who,
    decide,
)
from cryptfs.policy import MaskRule

SUPERVISOR = Who(1001, Reads.PLAINTEXT)
AGENT = Who(1002, Reads.MASKED, "agent")
TECHNICIAN = Who(1003, Reads.CIPHERTEXT, "technician")
AUDITOR = Who(1004, Reads.LOG_ONLY, "auditor")

BY_PATH = "trusted program (by path)"
NOT_HERE = "not a trusted program here"
TRUSTED = Trust("/calls", True, BY_PATH)
DENIES = Trust("/calls", False, NOT_HERE, "deny")
CIPHER = Trust("/calls", False, NOT_HERE, "ciphertext")
CSV = MaskRule("*.csv", "csv", (("surname", "surname"),))
TOKENS = MaskRule("*.csv", "csv", (("phone", "token"),))

NONE = Where()
UNKNOWN = Where(known=False)
R, W, RW, TRUNC = os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC

ALLOWED = Decision(Outcome.ALLOWED)


def refused(reason: str = "", rule: str | None = None, err: int = errno.EACCES) -> Decision:
    return Decision(Outcome.REFUSED, reason, err, rule)


def cipher(reason: str, rule: str | None = None) -> Decision:
    return Decision(Outcome.CIPHERTEXT, reason, rule=rule)


def masked(rule: MaskRule) -> Decision:
    return Decision(Outcome.MASKED, f"masked view ({rule.fmt}, {rule.glob})", mask=rule)


# (who, op, flags, where, expected)
OPEN_CASES = [
    # no rule: each role's own view
    (SUPERVISOR, R, NONE, ALLOWED),
    (SUPERVISOR, RW, NONE, ALLOWED),
    (AGENT, RW, NONE, ALLOWED),
    (TECHNICIAN, R, NONE, cipher("role technician: served the ciphertext")),
    (TECHNICIAN, W, NONE, refused("role technician: writes no customer data")),
    (TECHNICIAN, TRUNC, NONE, refused("role technician: writes no customer data")),
    (AUDITOR, R, NONE, refused("role auditor: reads the access log only")),
    # trusted-programs rules
    (SUPERVISOR, RW, Where(programs=(TRUSTED,)), Decision(Outcome.ALLOWED, BY_PATH, rule="/calls")),
    (SUPERVISOR, R, Where(programs=(DENIES,)), refused(NOT_HERE, "/calls")),
    (SUPERVISOR, R, Where(programs=(CIPHER,)),
     cipher(NOT_HERE + ": served the ciphertext", "/calls")),
    (SUPERVISOR, W, Where(programs=(CIPHER,)), refused(NOT_HERE, "/calls")),
    # a hard-linked file: every rule must trust it; one that denies wins over ciphertext
    (SUPERVISOR, R, Where(programs=(TRUSTED, Trust("/hr", True, BY_PATH))),
     Decision(Outcome.ALLOWED, BY_PATH, rule="/calls, /hr")),
    (SUPERVISOR, R, Where(programs=(CIPHER, Trust("/hr", False, "pid 0", "deny"))),
     refused("pid 0", "/hr")),
    (SUPERVISOR, R, Where(programs=(TRUSTED, CIPHER)),
     cipher(NOT_HERE + ": served the ciphertext", "/calls")),
    (SUPERVISOR, R, UNKNOWN, refused()),
    # a role that reads ciphertext is decided by role alone
    (TECHNICIAN, R, Where(programs=(DENIES,)), cipher("role technician: served the ciphertext")),
    # masks: agents only
    (AGENT, R, Where(mask=CSV), masked(CSV)),
    (AGENT, W, Where(mask=CSV), masked(CSV)),
    (AGENT, TRUNC, Where(mask=CSV), refused("masked view: no truncating")),
    (AGENT, R, Where(mask=TOKENS), masked(TOKENS)),
    (AGENT, RW, Where(mask=TOKENS), refused(NO_ORACLE_WRITES)),
    (AGENT, R, Where(mask_problem="masked view refused: the file's name is unknown"),
     refused("masked view refused: the file's name is unknown")),
    (SUPERVISOR, RW, Where(mask=TOKENS), ALLOWED),
    # an untrusted program is refused before any mask is looked at
    (AGENT, R, Where(programs=(DENIES,), mask=CSV), refused(NOT_HERE, "/calls")),
    (AGENT, R, Where(programs=(CIPHER,), mask=CSV),
     cipher(NOT_HERE + ": served the ciphertext", "/calls")),
    # a trusted program still gets the mask (the record names the mask)
    (AGENT, R, Where(programs=(TRUSTED,), mask=CSV), masked(CSV)),
]


@pytest.mark.parametrize(("who", "flags", "where", "expected"), OPEN_CASES)
def test_open(who: Who, flags: int, where: Where, expected: Decision) -> None:
    assert decide(AccessRequest(who, Op.OPEN, where, flags)) == expected


def test_ciphertext_reason_not_said_twice() -> None:
    t = Trust("/calls", False, "served the ciphertext", "ciphertext")
    d = decide(AccessRequest(SUPERVISOR, Op.OPEN, Where(programs=(t,))))
    assert d == cipher("served the ciphertext", "/calls")


# (who, op, where, expected)
OTHER_CASES = [
    # create
    (SUPERVISOR, Op.CREATE, NONE, ALLOWED),
    (AGENT, Op.CREATE, NONE, ALLOWED),
    (TECHNICIAN, Op.CREATE, NONE, refused("role technician: writes no customer data")),
    (AUDITOR, Op.CREATE, NONE, refused("role auditor: reads the access log only")),
    (SUPERVISOR, Op.CREATE, Where(programs=(TRUSTED,)),
     Decision(Outcome.ALLOWED, BY_PATH, rule="/calls")),
    (SUPERVISOR, Op.CREATE, Where(programs=(DENIES,)), refused(NOT_HERE, "/calls")),
    (SUPERVISOR, Op.CREATE, Where(programs=(CIPHER,)), refused(NOT_HERE, "/calls")),
    (SUPERVISOR, Op.CREATE, UNKNOWN, refused()),
    # truncate
    (SUPERVISOR, Op.TRUNCATE, NONE, ALLOWED),
    (TECHNICIAN, Op.TRUNCATE, NONE, refused()),
    (SUPERVISOR, Op.TRUNCATE, Where(programs=(CIPHER,)),
     refused("not truncated by a program its trusted-programs rule does not trust", "/calls")),
    (SUPERVISOR, Op.TRUNCATE, Where(programs=(TRUSTED,)), ALLOWED),
    (SUPERVISOR, Op.TRUNCATE, Where(mask=CSV), ALLOWED),
    (AGENT, Op.TRUNCATE, Where(mask=CSV), refused()),
    (AGENT, Op.TRUNCATE, Where(mask_problem="masked view refused: two masks"),
     refused("masked view refused: two masks")),
    (AGENT, Op.TRUNCATE, NONE, ALLOWED),
    (SUPERVISOR, Op.TRUNCATE, UNKNOWN, refused()),
    # link: an agent keeps a masked file in its mask; programs keep their files
    (AGENT, Op.LINK, Where(leaves_mask=True), refused(NOT_OUT_OF_MASK)),
    (SUPERVISOR, Op.LINK, Where(leaves_mask=True), ALLOWED),
    (SUPERVISOR, Op.LINK, Where(programs=(DENIES,)), refused(NOT_OUT_OF_PROGRAMS, "/calls")),
    (SUPERVISOR, Op.LINK, Where(programs=(TRUSTED,)), ALLOWED),
    (AGENT, Op.LINK, UNKNOWN, refused()),
    # a move: out of a mask for nobody; out of a programs rule for an untrusted program
    (SUPERVISOR, Op.MOVE, Where(leaves_mask=True), refused(NOT_OUT_OF_MASK)),
    (TECHNICIAN, Op.MOVE, Where(leaves_mask=True), refused(NOT_OUT_OF_MASK)),
    (SUPERVISOR, Op.MOVE, Where(programs=(CIPHER,)), refused(NOT_OUT_OF_PROGRAMS)),
    (TECHNICIAN, Op.MOVE, NONE, ALLOWED),
    (SUPERVISOR, Op.MOVE, UNKNOWN, refused()),
    # a name of a regular file goes
    (SUPERVISOR, Op.REMOVE, NONE, ALLOWED),
    (SUPERVISOR, Op.REMOVE, UNKNOWN, refused("not removed: the file's directory is unknown")),
    (SUPERVISOR, Op.RENAME, UNKNOWN, refused("not renamed: the file's directory is unknown")),
    (SUPERVISOR, Op.REPLACE, Where(programs=(DENIES,)),
     refused("not replaced by a program its trusted-programs rule does not trust", "/calls")),
    (SUPERVISOR, Op.REMOVE, Where(leaves_mask=True),
     refused("masked file: not removed while it has hard links outside its mask "
             "(that would move it out)")),
    (TECHNICIAN, Op.REPLACE, Where(leaves_mask=True),
     refused("masked file: not replaced while it has hard links outside its mask "
             "(that would move it out)")),
    (SUPERVISOR, Op.RENAME, Where(leaves_mask=True), ALLOWED),  # (a move decides that)
    # a role that reads ciphertext writes no content, but names are not content
    (TECHNICIAN, Op.LINK, NONE, ALLOWED),
    (TECHNICIAN, Op.LINK, Where(programs=(DENIES,)), refused(NOT_OUT_OF_PROGRAMS, "/calls")),
    (TECHNICIAN, Op.REMOVE, NONE, ALLOWED),
    (TECHNICIAN, Op.RENAME, Where(leaves_mask=True), ALLOWED),
    # an agent's names: a move out of a mask is refused to everyone, agents included
    (AGENT, Op.MOVE, Where(leaves_mask=True), refused(NOT_OUT_OF_MASK)),
    (AGENT, Op.MOVE, NONE, ALLOWED),
    (AGENT, Op.REMOVE, Where(leaves_mask=True),
     refused("masked file: not removed while it has hard links outside its mask "
             "(that would move it out)")),
    (AGENT, Op.RENAME, NONE, ALLOWED),
    (AGENT, Op.REPLACE, Where(programs=(CIPHER,)),
     refused("not replaced by a program its trusted-programs rule does not trust", "/calls")),
    # an auditor: nothing through the mount, whatever the operation or the rules
    *((AUDITOR, op, where, refused("role auditor: reads the access log only"))
      for op in (Op.TRUNCATE, Op.LINK, Op.MOVE, Op.RENAME, Op.REMOVE, Op.REPLACE)
      for where in (NONE, Where(programs=(TRUSTED,)))),
]


@pytest.mark.parametrize(("who", "op", "where", "expected"), OTHER_CASES)
def test_other_operations(who: Who, op: Op, where: Where, expected: Decision) -> None:
    assert decide(AccessRequest(who, op, where)) == expected


def test_every_operation_and_role_is_decided() -> None:
    """No pair of role and operation falls through the table untested."""
    seen = {(w.reads, Op.OPEN) for w, _, _, _ in OPEN_CASES}
    seen |= {(w.reads, op) for w, op, _, _ in OTHER_CASES}
    missing = {(r, op) for r in Reads for op in Op} - seen
    assert not missing, sorted((r.name, op.name) for r, op in missing)


def test_record_fields() -> None:
    """What the access log records of a decision: the rule and the reason, only if said."""
    assert ALLOWED.fields() == {}
    assert refused().fields() == {}
    assert refused(NOT_HERE, "/calls").fields() == {"rule": "/calls", "decision": NOT_HERE}
    assert masked(CSV).fields() == {"decision": "masked view (csv, *.csv)"}
    d = decide(AccessRequest(SUPERVISOR, Op.OPEN, Where(programs=(CIPHER,))))
    assert d.fields() == {"rule": "/calls", "decision": NOT_HERE + ": served the ciphertext"}


def test_decision_is_a_value() -> None:
    d = refused(NOT_HERE, "/calls")
    with pytest.raises(AttributeError):
        d.reason = "allowed after all"  # type: ignore[misc]
    assert d == refused(NOT_HERE, "/calls") and d.refused and not ALLOWED.refused


def test_pure_module_loads_no_filesystem() -> None:
    """The decision module stands alone: no FUSE layer, no trio, no handlers."""
    code = ("import sys, cryptfs.decision; "
            "print(sorted(m for m in sys.modules if m.startswith(('cryptfs.fuse', 'cryptfs.fs', "
            "'trio'))))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    assert out.strip() == "[]"
