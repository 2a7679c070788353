"""What every command shares: error reporting and passphrase input."""

from __future__ import annotations

import functools
import os
import pwd
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import click

from cryptfs.audit import commands
from cryptfs.cli.params import PathArg
from cryptfs.config import CONFIG_NAME, VolumeConfig, load_config
from cryptfs.errors import (
    EXIT_CODES,
    BackingIOError,
    CryptfsError,
    RoleRefused,
    UsageError,
    WrongPassphrase,
)
from cryptfs.mounttable import volume_of_path
from cryptfs.printable import shown
from cryptfs.roles import allowed_roles, may_run, slot_role
from cryptfs.secret import Secret
from cryptfs.volume import Volume, open_volume

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODE_HELP = "Exit codes:\n\n\b\n" + "\n".join(
    f"  {code}  {text}" for code, text in EXIT_CODES.items()
)


def failing(prog: str) -> Callable[[str, int, str | None], None]:
    """What reports a failure of command ``prog``: a line on stderr, a hint
    line if there is one, and the exit code."""
    def fail(message: str, code: int = 1, hint: str | None = None) -> None:
        click.echo(f"{prog}: error: {shown(message)}", err=True)
        if hint:
            click.echo(f"{prog}: hint: {shown(hint)}", err=True)
        sys.exit(code)
    return fail


def say(line: str, err: bool = False) -> None:
    """Print one line of a command's output; names in it (paths, file and user
    names) come out as one printable line (cryptfs.printable)."""
    click.echo(shown(line), err=err)


fail = failing("cryptfs")


def refuse_inside_a_volume(path: str, what: str, mounted_too: bool = True) -> None:
    """Refuse ``path`` inside a volume's backing directory, at any depth (it
    would lie among the ciphertext, or replace a file of the volume); and with
    ``mounted_too`` inside a mounted volume (a log there: the mount would write
    its records into itself)."""
    if mounted_too:
        on = volume_of_path(path)
        if on is not None:
            raise UsageError(f"{path} is inside {on[0]}, a mounted cryptfs volume",
                             hint=f"keep {what} outside every volume, e.g. under /var/log")
    d = os.path.realpath(path)
    while True:
        if os.path.isfile(os.path.join(d, CONFIG_NAME)):
            try:
                load_config(d)
            except CryptfsError:
                pass  # (a file of that name that is no volume's config)
            else:
                raise UsageError(f"{path} is inside the backing directory of the volume {d}",
                                 hint=f"keep {what} outside every volume, e.g. under /var/log")
        if d == "/":
            return
        d = os.path.dirname(d)


def error_boundary(fail_with: Callable[[str, int, str | None], None],
                   detail: bool = True) -> Callable[[F], F]:
    """A decorator that turns every failure into ``fail_with(message, exit code, hint)``:
    library errors with their documented code, a bug as one line (no traceback
    unless CRYPTFS_DEBUG is set).  ``detail`` False keeps file names and the
    text of unexpected errors out of the message (for the PAM helper)."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except CryptfsError as e:
                fail_with(str(e), e.exit_code, e.hint)
            except KeyboardInterrupt:
                fail_with("interrupted", 130, None)
            except OSError as e:
                where = f"{e.filename}: " if e.filename and detail else ""
                fail_with(f"{where}{e.strerror or e}", BackingIOError.exit_code, None)
            except (click.exceptions.ClickException, click.exceptions.Abort,
                    click.exceptions.Exit):
                raise
            except Exception as e:  # a bug: still one line, unless asked for the traceback
                if os.environ.get("CRYPTFS_DEBUG"):
                    raise
                if detail:
                    fail_with(f"internal error: {type(e).__name__}: {e}", 1,
                              "run again with CRYPTFS_DEBUG=1 for a traceback, and please "
                              "report it")
                else:
                    fail_with(f"internal error: {type(e).__name__}", 1, None)

        return wrapper  # type: ignore[return-value]

    return deco


reports_errors = error_boundary(fail)
"""Turn library errors into one line on stderr and a documented exit code."""


def passphrase_option(name: str = "--passphrase-file", help_text: str | None = None
                      ) -> Callable[[F], F]:
    return click.option(
        name,
        type=PathArg(dir_okay=False, allow_dash=True),
        default=None,
        help=help_text or "Read the passphrase from this file's first line "
        "('-' for standard input) instead of prompting: its bytes as they are, "
        "without the line's LF or CRLF.",
    )


MAX_PASSPHRASE_LINE = 64 * 1024  # bytes of a passphrase file's first line, LF included


def read_passphrase(path: str | None, prompt: str, confirm: bool = False) -> Secret:
    """From a file (first line), else from the terminal (twice if ``confirm``).

    From a file, the passphrase is the bytes of its first line as they are (no
    decoding, no trimming of spaces), without the LF that ends the line and one
    CR just before it; a file without a LF is one line.  From the terminal, the
    typed text encoded as UTF-8.  (docs/FORMAT.md, "Opening a slot".)"""
    if path is not None:
        try:
            if path == "-":
                line = sys.stdin.buffer.readline(MAX_PASSPHRASE_LINE + 1)
            else:
                with open(path, "rb") as f:
                    line = f.readline(MAX_PASSPHRASE_LINE + 1)
        except OSError as e:
            raise UsageError(f"cannot read passphrase file {path}: {e.strerror}") from None
        if len(line) > MAX_PASSPHRASE_LINE:
            # (/dev/zero, a disk image, a log named by mistake: never read to its end)
            raise UsageError(f"the first line of passphrase file {path} is longer than "
                             f"{MAX_PASSPHRASE_LINE} bytes: not a passphrase file")
        value = line.removesuffix(b"\n").removesuffix(b"\r")
    else:
        if not (sys.stdin.isatty() and os.isatty(sys.stderr.fileno())):
            raise UsageError("no terminal to ask for the passphrase",
                               hint="pass --passphrase-file FILE (or '-' for standard input)")
        text = click.prompt(prompt, hide_input=True, confirmation_prompt=confirm, err=True)
        value = text.encode()
    if not value:
        raise UsageError("the passphrase is empty")
    return Secret(value)


def invoking_user(how_to_name: str) -> str:
    """The person running the command (under sudo, the one who ran sudo)."""
    uid = os.getuid()
    if uid == 0 and os.environ.get("SUDO_USER"):
        return os.environ["SUDO_USER"]
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise UsageError(f"uid {uid} has no user name: {how_to_name}") from None


def command_name() -> str:
    """How the running command was called, e.g. "cryptfs user add" (for its record)."""
    ctx = click.get_current_context(silent=True)
    return ctx.command_path if ctx is not None else "cryptfs"


def recorded(backing: str, cfg: VolumeConfig, event: str, **fields: Any
             ) -> AbstractContextManager[None]:
    """The access-log record of what this command is about to do (see
    cryptfs.audit.commands): written first, or the command does nothing."""
    return commands.recorded(backing, cfg, event, command=command_name(), **fields)


def unlock_recorded(backing: str, passphrase: Secret) -> Volume:
    """open_volume, with a wrong passphrase recorded in the volume's access log."""
    try:
        return open_volume(backing, passphrase)
    except WrongPassphrase:
        try:
            commands.record(backing, load_config(backing), "unlock", "denied",
                                reason="wrong passphrase", command=command_name())
        except CryptfsError:
            pass  # (the wrong passphrase is what the user is told)
        raise


def require_role(backing: str, vol: Volume, event: str, what: str) -> None:
    """Refuse (exit 9, recorded as denied) a user whose slot's role may not run
    the command that records ``event`` (the table is cryptfs.roles.COMMAND_ROLES;
    a slot without a role is an agent's, as everywhere)."""
    role = slot_role(vol.slot)
    if may_run(role, event):
        return
    try:
        commands.record(backing, vol.config, event, "denied", reason=f"role {role}",
                            command=command_name())
    except CryptfsError:
        pass  # (the refusal is what the user is told)
    raise RoleRefused(f"the role {role} may not {what}",
                      hint=f"a user with the role {allowed_roles(event)} can (docs/POLICY.md)")
