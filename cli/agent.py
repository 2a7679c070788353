"""unlock, lock, status: a user's sessions in the key agent."""

from __future__ import annotations

import os

import click

from cryptfs.cli.common import passphrase_option, read_passphrase, reports_errors, say
from cryptfs.cli.params import PathArg, UserName
from cryptfs.config import CONFIG_NAME
from cryptfs.errors import NotAVolume, UsageError
from cryptfs.keyagent.client import AgentClient
from cryptfs.mounttable import backing_of
from cryptfs.users import system_user

SOCKET_HELP = "The key agent's socket (default: $CRYPTFS_AGENT_SOCKET or /run/cryptfs/agent.sock)."


def _as_uid(user: str | None) -> dict[str, int]:
    return {"uid": system_user(user).pw_uid} if user else {}


@click.command()
@click.argument("backing", type=PathArg(file_okay=False, readable=False))
@passphrase_option()
@click.option("--user", metavar="NAME", type=UserName(), help="Unlock for another user (root only; needs "
              "that user's passphrase). Default: yourself.")
@click.option("--check", is_flag=True, help="Only check that you have a key slot there "
              "(exit 0) or not (exit 8); ask for nothing.")
@click.option("--agent-socket", metavar="PATH", type=PathArg(dir_okay=False), help=SOCKET_HELP)
@reports_errors
def unlock(backing: str, passphrase_file: str | None, user: str | None, check: bool,
           agent_socket: str | None) -> None:
    """Open your key slot of BACKING in the key agent.

    BACKING is the volume's backing directory or the mountpoint of its
    shared (--agent) mount.  From then on that mount serves you, until
    `cryptfs lock`, the agent's idle timeout, or the agent stops.
    """
    if check and passphrase_file is not None:  # (it was read by nothing)
        raise click.UsageError("--check asks for no passphrase: give it without "
                               "--passphrase-file")
    target = backing_of(backing)
    client = AgentClient(agent_socket)
    who = _as_uid(user)
    probe = client.request({"op": "probe", "backing": target, **who})  # no slot: ask nothing
    if check:
        say(f"key slot {probe.get('slot')} in {probe.get('backing')}")
        return
    pw = read_passphrase(passphrase_file, f"Passphrase for {target}")
    with pw:
        answer = client.request({"op": "unlock", "backing": target, **who}, pw)
    idle = answer.get("idle_timeout") or 0
    say(f"unlocked {answer.get('backing')} (volume {answer.get('volume_id')}, key slot "
        f"{answer.get('slot')})" + (f"; locks after {idle:g} s idle" if idle else ""))


@click.command()
@click.argument("backing", type=PathArg(file_okay=False, readable=False), required=False)
@click.option("--user", metavar="NAME", type=UserName(), help="Lock another user's sessions (root only).")
@click.option("--agent-socket", metavar="PATH", type=PathArg(dir_okay=False), help=SOCKET_HELP)
@reports_errors
def lock(backing: str | None, user: str | None, agent_socket: str | None) -> None:
    """End your session for BACKING (all your sessions if BACKING is omitted).

    A shared mount stops serving you at once: open files can no longer be
    read or written.
    """
    msg: dict[str, object] = {"op": "lock", **_as_uid(user)}
    if backing is not None:
        msg["backing"] = backing_of(backing)
    answer = AgentClient(agent_socket).request(msg)
    if backing is not None and not answer.get("locked"):
        _refuse_no_volume(backing)
    if answer.get("unconfirmed"):
        say(f"cryptfs: warning: {answer.get('message')}", err=True)
    else:
        say(answer.get("message") or "locked")


def _refuse_no_volume(backing: str) -> None:
    """Nothing was locked for ``backing``: if the caller can see that it is no
    volume at all (a typo, the mountpoint of nothing), say so rather than
    "locked 0 session(s)".  The check runs with the caller's own rights, not
    the agent's: it must not tell what lies in a directory the caller cannot
    search (then nothing is said)."""
    try:
        os.stat(os.path.join(backing_of(backing), CONFIG_NAME))
    except (FileNotFoundError, NotADirectoryError):
        raise NotAVolume(f"{backing} is not a cryptfs volume, nor the mountpoint of one: "
                         "nothing to lock") from None
    except OSError:
        pass


@click.command()
@click.option("--all", "all_users", is_flag=True, help="Every user's sessions (root only).")
@click.option("--user", metavar="NAME", type=UserName(), help="Another user's sessions (root only).")
@click.option("--agent-socket", metavar="PATH", type=PathArg(dir_okay=False), help=SOCKET_HELP)
@reports_errors
def status(all_users: bool, user: str | None, agent_socket: str | None) -> None:
    """Show your unlocked sessions and how long until each locks when idle.

    Exits 0 with "no sessions" if nothing is unlocked; exits 8 if no agent
    answers.
    """
    if all_users and user:
        raise UsageError("--all and --user exclude each other")
    answer = AgentClient(agent_socket).request({"op": "status", "all": all_users,
                                                **_as_uid(user)})
    sessions = answer.get("sessions") or []
    if not sessions:
        click.echo("no sessions")
        return
    for s in sessions:
        left = s.get("idle_left")
        idle = "never locks when idle" if left is None else f"locks in {left:.0f} s if idle"
        say(f"{s.get('user')} (uid {s.get('uid')}): {s.get('backing')} "
            f"[volume {s.get('volume_id')}, slot {s.get('slot')}] unlocked "
            f"{s.get('unlocked_at')}, {idle}")
