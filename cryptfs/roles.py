"""Roles: what each one sees on a shared mount, and which commands it may run.

The one home of these rules: the command line (``require_role``) and the
mount (a command's record handed to it, :func:`claim_refusal`) both decide
from the tables here.

A key slot's role is decided by :func:`slot_role` alone, wherever it is
asked (``user list``, the commands, the mount): its ``role`` field when that
names a role; else, for a slot of a system user, :data:`DEFAULT_ROLE` (the
least a user may be); else -- a slot of no system user, the "owner" slot
the library makes (and the frozen sample volumes have), which no request to
a shared mount can come from -- :data:`OWNER_ROLE`, so that such a volume
can still be managed.  ``cryptfs init`` gives the first slot a role
(``--role``, admin by default).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # (config checks a slot's role against ROLES)
    from cryptfs.config import Slot

ROLES = ("agent", "supervisor", "technician", "admin", "auditor")
DEFAULT_ROLE = "agent"  # a user's slot without a (known) role
OWNER_ROLE = "admin"  # a slot of no system user without a role (see above)
# On a shared mount (docs/POLICY.md): who manages the volume reads ciphertext
# only; the auditor reads the access log only, nothing through the mount.
CIPHERTEXT_ROLES = frozenset({"technician", "admin"})
LOG_ONLY_ROLES = frozenset({"auditor"})
MASKED_ROLES = frozenset({"agent"})  # see structured files masked (a policy's masks)

MANAGERS = frozenset({"admin"})  # add and remove users, set the policy, bind the log
ROTATORS = frozenset({"admin", "technician"})  # rotate keys
EVERY_ROLE = frozenset(ROLES)

# Which roles may run each command that records itself (its record's event).
# "passwd" here is a reset of *another* user's passphrase: one's own is
# every role's.  Root and the mount's own user are not bound by roles.
COMMAND_ROLES: dict[str, frozenset[str]] = {
    "user-add": MANAGERS,
    "user-remove": MANAGERS,
    "passwd": MANAGERS,
    "policy-set": MANAGERS,
    "policy-unset": MANAGERS,
    "audit-attach": MANAGERS,
    "audit-detach": MANAGERS,
    "rotation": ROTATORS,
    # Taking data out: the reads through the mount decide what a user gets;
    # the recovery key (not a role) is what recovery needs.
    "export": EVERY_ROLE,
    "recovery": EVERY_ROLE,
    # A session is opened by the key agent, which records it in its own log:
    # a command only ever records a refused unlock (a wrong passphrase).
    "unlock": frozenset(),
}


def slot_role(slot: Slot) -> str:
    role = slot.extra.get("role")
    if isinstance(role, str) and role in ROLES:
        return role
    if "uid" in slot.extra or "user" in slot.extra:
        return DEFAULT_ROLE
    return OWNER_ROLE


def may_run(role: str, event: str) -> bool:
    return role in COMMAND_ROLES.get(event, frozenset())


def allowed_roles(event: str) -> str:
    """For a message: "admin or technician"."""
    return " or ".join(r for r in ROLES if r in COMMAND_ROLES.get(event, frozenset())) or "none"


def claim_refusal(slot: Slot | None, event: str, outcome: str, fields: dict[str, Any]
                  ) -> str | None:
    """Why a command's record, handed to the mount by the holder of ``slot``
    (None: a uid without a key slot), is not theirs to make; None if it is.

    A record says that its requester did (``allowed``, then perhaps
    ``error``) or tried and was refused (``denied``) something.  Only the
    second is anyone's to say of themselves; the first needs a role that may
    run the command, judged by the requester's slot alone: fields of the
    record (a ``role=admin`` in a user-add) grant nothing.
    """
    if outcome == "denied":
        return None
    if event == "user-add" and fields.get("role") not in ROLES:
        return "the record names no role the user could be given"
    if slot is None:
        return "no key slot in this volume"
    role = slot_role(slot)
    if event == "passwd" and fields.get("target") in _names_of(slot):
        return None  # (one's own passphrase)
    if may_run(role, event):
        return None
    return f"role {role} may not run {event} (only {allowed_roles(event)})"


def _names_of(slot: Slot) -> set[str]:
    user = slot.extra.get("user")
    return {user} if isinstance(user, str) else {slot.label}
