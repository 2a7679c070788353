"""``cryptfs-pam``: the key agent's part in a login, run by pam_exec(8).

Two jobs, each one line of PAM configuration (packaging/pam/cryptfs):

* ``lock``, in the session stack with ``type=close_session``: at logout, lock
  every session the user has in the key agent.  This is the default setup.
  Users unlock with a passphrase of their own, separate from their login
  password (at login, packaging/profile.d/cryptfs-unlock.sh asks for it).
* ``unlock --backing DIR``, in the auth stack with ``expose_authtok``: unlock
  the user's key slot of DIR with the password just typed at login.  Opt-in
  only: it makes the login password the volume passphrase, which PCI DSS
  3.5.1.3 forbids for disk-level encryption; use it only where the operator
  accepts that.

pam_exec runs this as the uid of the login service (root for login, sshd,
su), with PAM_USER and PAM_TYPE in the environment and, for
``expose_authtok``, the password on standard input (some versions end it
with a NUL byte).  The agent lets root act for any uid, and any user for
themselves.  pam_exec sends our standard output and error to /dev/null
unless its line says ``log=FILE``, so each outcome also goes to syslog
(authpriv).  The password is never printed nor logged, only handed to the
agent in a secret frame and wiped.
"""

from __future__ import annotations

import os
import pwd
import sys
import syslog

import click

from cryptfs.cli.common import error_boundary
from cryptfs.cli.params import PathArg
from cryptfs.errors import CryptfsError, NotAVolume, UsageError, WrongPassphrase
from cryptfs.keyagent import protocol as p
from cryptfs.keyagent.client import AgentClient, AgentError
from cryptfs.secret import Secret

PROG = "cryptfs-pam"
SOCKET_HELP = "The key agent's socket (default: $CRYPTFS_AGENT_SOCKET or /run/cryptfs/agent.sock)."
# Seconds to wait for the agent: an unlock runs Argon2id, and logins should not hang long.
AGENT_TIMEOUT = 30.0


def _syslog(priority: int, message: str) -> None:
    syslog.openlog(PROG, syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(priority, message)


def _fail(message: str, code: int, hint: str | None = None) -> None:
    """One line: PAM services show at most that much of what went wrong."""
    line = f"{message} (hint: {hint})" if hint else message
    _syslog(syslog.LOG_WARNING, line)
    click.echo(f"{PROG}: error: {line}", err=True)
    sys.exit(code)


# Every failure is one line on stderr (and in syslog) and an exit code; no traceback.
_reports_errors = error_boundary(_fail, detail=False)


def pam_user() -> pwd.struct_passwd:
    """The user PAM is logging in or out, from PAM_USER."""
    name = os.environ.get("PAM_USER")
    if not name:
        raise UsageError("PAM_USER is not set",
                         hint="cryptfs-pam is run by pam_exec(8); see cryptfs-pam(8)")
    try:
        return pwd.getpwnam(name)
    except KeyError:
        # Not repeated: a mistyped login name is sometimes a password.
        raise UsageError("PAM_USER is not a user of this system") from None


def _check_pam_type(expected: str, line: str) -> None:
    kind = os.environ.get("PAM_TYPE")
    if kind is not None and kind != expected:
        raise UsageError(f"called for PAM_TYPE {kind}, but this belongs to {expected} only",
                         hint=f"the PAM line should read: {line}")


def read_password(fd: int = 0) -> Secret:
    """The password pam_exec writes to standard input, without a final NUL or newline."""
    if os.isatty(fd):
        raise UsageError("reads the password from standard input, as pam_exec expose_authtok "
                         "writes it; it does not prompt")
    buf = bytearray(p.MAX_SECRET + 3)
    view = memoryview(buf)
    n = 0
    try:
        while n < len(buf):
            k = os.readv(fd, [view[n:]])
            if k == 0:
                break
            n += k
        if n and buf[n - 1] == 0:
            n -= 1
        if n and buf[n - 1] == 0x0A:
            n -= 1
        if n > p.MAX_SECRET:
            raise UsageError(f"the password is longer than {p.MAX_SECRET} bytes")
        if n == 0:
            raise UsageError("no password on standard input",
                             hint="the PAM line needs pam_exec's expose_authtok option")
        exact = buf[:n]
        try:
            return Secret(exact)
        finally:
            exact[:] = bytes(n)
    finally:
        view.release()
        buf[:] = bytes(len(buf))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """cryptfs in a PAM login: lock the key agent's sessions of a user at logout,
    or (opt-in) unlock them with the login password.

    Run by pam_exec(8), which sets PAM_USER and PAM_TYPE; see the PAM
    configuration in /etc/pam.d/cryptfs.  Errors are one line on standard
    error (which pam_exec discards unless log=FILE) and in syslog.
    """


@main.command()
@click.option("--agent-socket", metavar="PATH", type=PathArg(dir_okay=False), help=SOCKET_HELP)
@_reports_errors
def lock(agent_socket: str | None) -> None:
    """Lock every session PAM_USER has in the key agent (at logout).

    \b
    PAM line (session stack):
      session optional pam_exec.so quiet type=close_session /usr/bin/cryptfs-pam lock
    """
    _check_pam_type("close_session",
                    "session optional pam_exec.so quiet type=close_session /usr/bin/cryptfs-pam lock")
    user = pam_user()
    answer = AgentClient(agent_socket, timeout=AGENT_TIMEOUT).request(
        {"op": "lock", "uid": user.pw_uid})
    count = answer.get("locked", 0)
    _syslog(syslog.LOG_INFO, f"logout of {user.pw_name}: locked {count} session(s)")
    click.echo(f"locked {count} session(s) of {user.pw_name}")


@main.command()
@click.option("--backing", "backings", multiple=True, required=True, metavar="DIR",
              type=PathArg(file_okay=False),
              help="Backing directory of a volume to unlock (repeat for several).")
@click.option("--agent-socket", metavar="PATH", type=PathArg(dir_okay=False), help=SOCKET_HELP)
@_reports_errors
def unlock(backings: tuple[str, ...], agent_socket: str | None) -> None:
    """Unlock PAM_USER's key slot of each DIR with the password on standard input.

    Opt-in, and only where the operator accepts that the login password
    opens the volume (PCI DSS 3.5.1.3 forbids that for disk-level
    encryption).  A volume in which the user has no key slot is skipped.
    Exits 0 if every volume with a slot was unlocked and there was one; 3 on a
    wrong password; 4 if a DIR is no volume; 8 if the agent is unreachable or
    refused.

    \b
    PAM line (auth stack, after the module that checks the password):
      auth optional pam_exec.so expose_authtok quiet /usr/bin/cryptfs-pam unlock --backing DIR
    """
    _check_pam_type("auth", "auth optional pam_exec.so expose_authtok quiet "
                    "/usr/bin/cryptfs-pam unlock --backing DIR")
    user = pam_user()
    client = AgentClient(agent_socket, timeout=AGENT_TIMEOUT)
    unlocked: list[str] = []
    failures: list[CryptfsError] = []
    with read_password() as password:
        for backing in backings:
            path = os.path.abspath(backing)
            try:
                answer = client.request({"op": "unlock", "backing": path, "uid": user.pw_uid},
                                        password)
            except WrongPassphrase as e:
                failures.append(WrongPassphrase(_about(path, e)))
            except NotAVolume as e:
                failures.append(NotAVolume(_about(path, e)))
            except AgentError as e:
                if e.code == p.NO_SLOT:
                    _syslog(syslog.LOG_INFO, f"{user.pw_name} has no key slot in {path}")
                    continue
                failures.append(AgentError(_about(path, e), e.code, e.hint))
            else:
                unlocked.append(path)
                _syslog(syslog.LOG_INFO, f"login of {user.pw_name}: unlocked {path} "
                        f"(slot {answer.get('slot')})")
                click.echo(f"unlocked {path} for {user.pw_name}")
    for failure in failures[:-1]:
        line = f"{failure} (hint: {failure.hint})" if failure.hint else str(failure)
        click.echo(f"{PROG}: error: {line}", err=True)
        _syslog(syslog.LOG_WARNING, line)
    if failures:
        raise failures[-1]
    if not unlocked:
        raise AgentError(f"{user.pw_name} has no key slot in "
                         + (os.path.abspath(backings[0]) if len(backings) == 1
                            else "any of " + ", ".join(map(os.path.abspath, backings))),
                         code=p.NO_SLOT)


def _about(path: str, e: Exception) -> str:
    """The error, with the volume's path in front unless it names it already."""
    return str(e) if path in str(e) else f"{path}: {e}"


if __name__ == "__main__":
    main()
