"""Errors that reach a user, each with the exit code the CLI documents."""

from __future__ import annotations


class CryptfsError(Exception):
    """A failure with a message meant for a person (no traceback)."""

    exit_code = 1
    hint: str | None = None

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint


class UsageError(CryptfsError):
    """The user asked for something that cannot be done as asked."""

    exit_code = 2


class WrongPassphrase(CryptfsError):
    exit_code = 3


class NotAVolume(CryptfsError):
    """Missing, unreadable, corrupt or unsupported volume config."""

    exit_code = 4


class MountError(CryptfsError):
    exit_code = 5


class DamageFound(CryptfsError):
    exit_code = 6


class BackingIOError(CryptfsError):
    exit_code = 7


class RoleRefused(CryptfsError):
    """The user's role does not allow what they asked (docs/POLICY.md)."""

    exit_code = 9


EXIT_CODES = {
    0: "success",
    1: "unexpected internal error (please report it)",
    2: "bad usage (unknown option, missing argument, no passphrase, target not empty)",
    3: "wrong passphrase, or no key slot opened",
    4: "not a cryptfs volume, or its config is missing, corrupt or of an unsupported version",
    5: "mount failed (mountpoint missing or busy, no /dev/fuse, fusermount failed)",
    6: "fsck found damage",
    7: "I/O or permission error on the backing directory",
    8: "the key agent is not running, unreachable, or refused the request",
    9: "your role does not allow this (docs/POLICY.md)",
}
