"""Every event name a record of the access log can carry (docs/AUDIT.md).

One list, so that what writes records and what selects them agree: the
mount's request handlers are checked against it as they are defined
(``cryptfs.fs.audit_hooks``), a command's record handed to a mount must be
one of :data:`COMMAND_EVENTS`, and ``audit export|follow|forward --event``
refuses a name no record can carry (it printed nothing, as if there were no
such records).
"""

from __future__ import annotations

# Written by the mount: its own life, the requests it records when they succeed,
# and what happens to the log and the data.
MOUNT_EVENTS = frozenset({
    "mount", "unmount",
    "open", "create", "close", "mkdir", "mknod", "symlink", "link", "rename", "unlink",
    "rmdir", "truncate", "chmod", "chown", "utimes", "setxattr", "removexattr",
    "integrity-failure", "log-resumed",
    "command-record",  # (a command's record the mount refused to write for it)
    "refusals-held",  # (how many refusals of one user and request were counted, not recorded)
})

# Requests the mount records only when they are refused or fail, under their own
# name (the handlers of cryptfs.fs; "setattr" is recorded as truncate, chmod,
# chown or utimes, but kept here for the record a failure of it makes).
REQUEST_EVENTS = frozenset({
    "lookup", "getattr", "setattr", "readlink", "opendir", "readdir", "releasedir",
    "fsyncdir", "read", "write", "flush", "fsync", "release", "fallocate", "getxattr",
    "listxattr", "statfs", "forget",
})

# Written by the key agent into its log.
AGENT_EVENTS = frozenset({"unlock", "lock"})

# What a command records before it acts (itself, or handed to the mount that holds
# the log); a mount refuses any other event from a command.
COMMAND_EVENTS = frozenset({
    "export", "recovery", "rotation", "user-add", "user-remove", "passwd",
    "policy-set", "policy-unset", "audit-attach", "audit-detach", "unlock",
})

EVENTS = MOUNT_EVENTS | REQUEST_EVENTS | AGENT_EVENTS | COMMAND_EVENTS


def unknown_events(names: tuple[str, ...] | list[str]) -> list[str]:
    """The names in ``names`` that no record carries."""
    return [n for n in names if n not in EVENTS]
