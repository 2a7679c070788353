"""mount and unmount."""

from __future__ import annotations

import functools
import os
import stat

import click

from cryptfs.audit import check_log
from cryptfs.audit.commands import bound_log
from cryptfs.audit.writer import LogTarget, check_server
from cryptfs.cli.common import (
    passphrase_option,
    read_passphrase,
    reports_errors,
    say,
    unlock_recorded,
)
from cryptfs.cli.params import PathArg
from cryptfs.config import VolumeConfig
from cryptfs.errors import UsageError
from cryptfs.keyagent.client import socket_path
from cryptfs.policy import load_policy
from cryptfs.volume import read_volume


@click.command()
@click.argument("backing", type=PathArg(file_okay=False))
@click.argument("mountpoint", type=PathArg(file_okay=False))
@click.option("-f", "--foreground", is_flag=True,
              help="Stay attached; Ctrl-C (SIGINT) or SIGTERM unmounts.")
@click.option("-o", "options", multiple=True, metavar="OPT[,OPT...]",
              help="FUSE mount options, e.g. allow_other,ro.")
@click.option("--log-file", type=PathArg(dir_okay=False),
              help="Write the daemon's log here (default: syslog; stderr in --foreground).")
@click.option("--pid-file", type=PathArg(dir_okay=False),
              help="Write the daemon's process id here once it is ready.")
@click.option("--agent", "use_agent", is_flag=True,
              help="Shared mount for many users (root only): hold no passphrase, serve each "
              "user only while they are unlocked in the key agent (cryptfs unlock).")
@click.option("--agent-socket", metavar="PATH",
              help="The key agent's socket (default: $CRYPTFS_AGENT_SOCKET or "
              "/run/cryptfs/agent.sock).")
@click.option("--audit-log", "audit_log", type=PathArg(file_okay=False), metavar="LOGDIR",
              help="Record every access in this access log (made by `cryptfs audit init`).  "
                   "An access that cannot be recorded is refused.  A volume bound to a log "
                   "(cryptfs audit attach) always uses that one.")
@click.option("--audit-fail-open", is_flag=True,
              help="With --audit-log: if the log cannot be written, serve anyway and raise an "
                   "alarm in the daemon's log (default: refuse).")
@click.option("--server", metavar="NAME",
              help="The server name every record of the access log carries (chained and "
                   "sealed with it), so that an auditor merging several servers' logs sees who "
                   "wrote what (default: the name the log was given before, else this "
                   "machine's host name).")
@click.option("--shared-storage", is_flag=True,
              help="BACKING is shared with other servers' mounts (JuiceFS, NFS, CephFS ...): "
                   "cache no entry, attribute or page that they could change "
                   "(docs/MULTISERVER.md).")
@click.option("--idle-poll", "idle_poll", type=click.IntRange(0, 10_000), metavar="MICROSECONDS",
              help="After answering, look for the next request this long before sleeping "
                   "(default 200; 0: sleep at once).  Saves waking a sleeping CPU per request "
                   "while a program works through files; costs at most that much CPU time "
                   "per pause, and only while pauses stay that short.")
@passphrase_option()
@reports_errors
def mount(backing: str, mountpoint: str, foreground: bool, options: tuple[str, ...],
          log_file: str | None, pid_file: str | None, use_agent: bool,
          agent_socket: str | None, audit_log: str | None, audit_fail_open: bool,
          server: str | None, shared_storage: bool, idle_poll: int | None,
          passphrase_file: str | None) -> None:
    """Unlock BACKING and mount its plaintext view on MOUNTPOINT.

    Returns once the filesystem is ready; the filesystem daemon stays in the
    background until `cryptfs unmount MOUNTPOINT`.

    With --agent no passphrase is asked: the mount is shared by all users
    (allow_other), and a request is served only if its user has unlocked
    their own key slot with `cryptfs unlock`; everyone else gets "permission
    denied".  If the agent is unreachable, everyone is denied until it is back.
    """
    # Only this command loads the filesystem (and the agent link, which runs
    # in the mount daemon on trio); every other command stays light.
    from cryptfs.keyagent.link import watch_agent
    from cryptfs.mount import check_mountpoint, mount_volume

    check_mountpoint(mountpoint)  # fail before asking for a passphrase
    opts = [o.strip() for group in options for o in group.split(",") if o.strip()]
    if audit_log is not None:
        check_log(audit_log)
    if server is not None:
        check_server(server)
    if use_agent:
        if passphrase_file is not None:
            raise UsageError("--agent mounts take no passphrase: users unlock with cryptfs unlock")
        if os.geteuid() != 0:
            raise UsageError("a shared --agent mount must be started by root")
        agent_at = os.path.abspath(socket_path(agent_socket))
        if os.path.exists(agent_at) and not stat.S_ISSOCK(os.stat(agent_at).st_mode):
            # (a missing socket is waited for: the agent may start later; a file
            # there never answers, and every request would be refused)
            raise UsageError(f"{agent_at} is not a socket: give the key agent's socket "
                             "(--agent-socket)")
        if not os.path.exists(agent_at):  # (waited for, but a typo would look like an outage)
            say(f"cryptfs: warning: no key agent listens on {agent_at} yet: the mount "
                "serves no one until one does", err=True)
        locked = read_volume(backing)
        audit = _audit_for(locked.config, audit_log, audit_fail_open, server)
        link = functools.partial(watch_agent, agent_at,
                                 locked.backing, locked.config.volume_id.hex())
        # noexec unless asked otherwise: programs are not run from customer
        # data, and one user's lock may withdraw the pages of a file that
        # another user's program has mapped (docs/AGENT.md).
        extra = [] if "exec" in opts else ["noexec"]
        mount_volume(locked, mountpoint, foreground=foreground,
                     options=[*opts, *extra, "allow_other", "default_permissions"],
                     log_file=log_file, pid_file=pid_file, side_tasks=[link], audit=audit,
                     shared_storage=shared_storage, poll_us=idle_poll, warn=_warn)
        return
    if agent_socket is not None:
        raise UsageError("--agent-socket needs --agent")
    pw = read_passphrase(passphrase_file, "Passphrase")
    with pw:
        vol = unlock_recorded(backing, pw)
    try:
        load_policy(vol.config, vol.keys)  # a policy that does not open: refuse here, clearly
        audit = _audit_for(vol.config, audit_log, audit_fail_open, server)
    except BaseException:
        vol.close()
        raise
    mount_volume(vol, mountpoint, foreground=foreground, options=opts, log_file=log_file,
                 pid_file=pid_file, audit=audit, shared_storage=shared_storage, poll_us=idle_poll,
                 warn=_warn)


def _audit_for(cfg: VolumeConfig, audit_log: str | None, fail_open: bool, server: str | None
               ) -> LogTarget | None:
    """The access log a mount writes: the one the volume is bound to, else --audit-log."""
    if cfg.audit is not None:
        bound = cfg.audit["dir"]
        if audit_log is not None and os.path.realpath(audit_log) != os.path.realpath(bound):
            raise UsageError(f"this volume is bound to the access log in {bound}, "
                             f"not {audit_log}", hint="leave out --audit-log")
        bound_log(bound, cfg.audit["key"])
        return LogTarget(bound, fail_open, server)
    if audit_log is None:
        if fail_open:
            raise UsageError("--audit-fail-open goes with an access log (--audit-log)")
        if server is not None:
            raise UsageError("--server names the server in an access log (--audit-log)")
        return None
    return LogTarget(os.path.abspath(audit_log), fail_open, server)


@click.command()
@click.argument("mountpoint", type=PathArg(file_okay=False))
@click.option("-z", "--lazy", is_flag=True,
              help="Detach now even if files are open; finish when they close.")
@reports_errors
def unmount(mountpoint: str, lazy: bool) -> None:
    """Unmount a cryptfs volume (its daemon then exits)."""
    from cryptfs.mount import unmount as do_unmount

    do_unmount(mountpoint, lazy=lazy)



def _warn(message: str) -> None:
    say(f"cryptfs: warning: {message}", err=True)
