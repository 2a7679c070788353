"""``cryptfs-agent``: start the key agent (directly, or socket-activated by systemd)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import pwd
import resource
import signal
import socket
import stat
import sys

import click
import trio

from cryptfs.cli.common import error_boundary, failing
from cryptfs.cli.params import PathArg, Seconds, UserName
from cryptfs.errors import BackingIOError, UsageError
from cryptfs.keyagent.client import DEFAULT_SOCKET
from cryptfs.keyagent.server import Agent, AgentOptions
from cryptfs.logfile import log_file_handler

log = logging.getLogger("cryptfs.agent")


# Every failure is a line on stderr and the exit code of docs (2 usage, 7 I/O ...); no traceback.
_reports_errors = error_boundary(failing("cryptfs-agent"))

_PR_SET_DUMPABLE = 4
_SD_LISTEN_FDS_START = 3


def harden() -> list[str]:
    """No core dumps and no ptrace by other processes of the same uid.

    Returns what could not be done (for the log).  PR_SET_DUMPABLE 0 also
    makes /proc/PID/mem, environ and the like root-owned.  Root with
    CAP_SYS_PTRACE can still read the agent's memory; nothing in user space
    can stop that.
    """
    missed = []
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError) as e:
        missed.append(f"core dumps not disabled: {e}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        missed.append(f"PR_SET_DUMPABLE failed: {os.strerror(ctypes.get_errno())}")
    return missed


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def activated_socket() -> socket.socket | None:
    """The listening socket systemd passed (sd_listen_fds protocol), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    n = int(os.environ.get("LISTEN_FDS", "0") or 0)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if n < 1:
        return None
    return socket.socket(fileno=_SD_LISTEN_FDS_START)


def bind_socket(path: str) -> socket.socket:
    """Listen on ``path`` (mode 0666: the kernel's peer credentials, not the
    file mode, decide what a caller may do); refuse if an agent answers there."""
    directory = os.path.dirname(path) or "."
    try:  # (its own directory, e.g. /run/cryptfs, is made; never a chain of them)
        os.mkdir(directory, mode=0o755)
    except FileExistsError:
        pass
    except OSError as e:
        raise UsageError(f"cannot make {directory} for the socket: {e.strerror}"
                         + (" (its parent does not exist)" if e.errno == errno.ENOENT else ""),
                         hint="give --socket a path in an existing directory") from None
    st = os.lstat(directory)
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UsageError(f"{directory} must be owned by uid {os.geteuid()} and writable by it "
                         "alone", hint="anyone who may write there could replace the socket")
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            # (only a stale socket is removed: never a file someone named by mistake)
            raise UsageError(f"{path} exists and is not a socket",
                             hint="name a new path, or remove it first")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise UsageError(f"an agent is already listening on {path}",
                             hint="stop it first, or give another --socket")
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                raise
            os.unlink(path)  # stale socket of an agent that is gone
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o111)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o666)  # noqa: S103 - every user must reach it; SO_PEERCRED decides
    sock.listen(512)
    return sock


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", default=DEFAULT_SOCKET, show_default=True,
              envvar="CRYPTFS_AGENT_SOCKET", metavar="PATH",
              help="Unix socket to listen on (ignored when systemd passes one).")
@click.option("--idle-timeout", type=Seconds(0), default=900, show_default=True,
              metavar="SECONDS", help="Lock a session after this long without use (0: never).")
@click.option("--request-timeout", type=Seconds(0.1), default=10, show_default=True,
              metavar="SECONDS", help="Close a connection whose request does not arrive in time.")
@click.option("--backoff", type=Seconds(0), default=1, show_default=True,
              metavar="SECONDS", help="Wait after a failed unlock; doubles with each failure "
              "in a row.")
@click.option("--backoff-max", type=Seconds(0), default=300, show_default=True,
              metavar="SECONDS", help="Longest wait between failed unlocks.")
@click.option("--max-connections", type=click.IntRange(1), default=4096, show_default=True,
              metavar="N", help="Answer \"busy\" to connections beyond this many at a time.")
@click.option("--max-per-user", type=click.IntRange(1), default=64, show_default=True,
              metavar="N", help="Connections one user may hold at a time (root and the "
              "service user: no limit), so one user cannot crowd out the others.")
@click.option("--service-user", metavar="NAME", type=UserName(),
              help="A user besides root that may watch volumes and act for others "
              "(for a mount service that does not run as root).")
@click.option("--log-file", type=PathArg(dir_okay=False),
              help="Append the log here (default: standard error, which systemd keeps).")
@click.option("--audit-log", "audit_log", type=PathArg(file_okay=False), metavar="LOGDIR",
              help="Record every unlock, failed unlock and lock in this access log (made by "
                   "`cryptfs audit init`); an unlock that cannot be recorded is refused.")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages too.")
@_reports_errors
def main(socket_path: str, idle_timeout: float, request_timeout: float, backoff: float,
         backoff_max: float, max_connections: int, max_per_user: int, service_user: str | None,
         log_file: str | None, audit_log: str | None, verbose: bool) -> None:
    """The cryptfs key agent: holds unlocked volume keys per user.

    Users unlock with `cryptfs unlock BACKING`; mounts started with
    `cryptfs mount --agent` ask it who is unlocked.  It runs in the foreground
    (under systemd, normally socket-activated); SIGTERM locks every session
    and stops it.  The protocol is described in docs/AGENT.md.
    """
    if backoff > backoff_max:  # (the doubling would start above its own cap)
        raise UsageError(f"--backoff {backoff:g} is above --backoff-max {backoff_max:g}")
    handler: logging.Handler
    if log_file:
        handler = log_file_handler(log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s cryptfs-agent[%(process)d] "
                                           "%(levelname)s: %(message)s"))
    logging.raiseExceptions = False  # (a line that cannot be written is lost, not a traceback)
    root = logging.getLogger("cryptfs")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)

    service_uid = None
    if service_user:
        try:
            service_uid = pwd.getpwnam(service_user).pw_uid
        except KeyError:
            raise UsageError(f"--service-user {service_user!r} is not a user") from None
    for problem in harden():
        log.warning("hardening: %s", problem)
    _raise_fd_limit()
    # A stop asked for before the agent's loop listens for it (a client may
    # connect as soon as the socket listens) is kept, and acted on first.
    early: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda n, _frame: early.append(n))
    auditor = None
    if audit_log is not None:  # (before the socket: a log it cannot use leaves no socket)
        from cryptfs.audit import AuditLog, Auditor
        auditor = Auditor(AuditLog(audit_log), "")
    bound = None  # (the socket file this agent made, removed as it stops)
    sock = activated_socket()
    if sock is None:
        try:
            sock = bind_socket(socket_path)
        except BaseException as e:
            if auditor is not None:
                auditor.close()
            if isinstance(e, OSError):
                raise BackingIOError(f"cannot listen on {socket_path}: {e.strerror or e}") \
                    from None
            raise
        bound = (socket_path, os.stat(socket_path).st_ino)
        log.info("listening on %s", socket_path)
    else:
        log.info("listening on the socket passed by systemd")
    opts = AgentOptions(idle_timeout=idle_timeout, request_timeout=request_timeout,
                        backoff_base=backoff, backoff_max=backoff_max,
                        max_connections=max_connections, max_per_uid=max_per_user,
                        service_uid=service_uid)
    agent = Agent(opts, auditor)
    agent.early_signals = early
    trio_sock = trio.socket.from_stdlib_socket(sock)
    try:
        trio.run(agent.run, trio_sock)
    except KeyboardInterrupt:
        pass
    except Exception:  # (a bug: its traceback goes to the log; stderr gets one line)
        log.exception("the agent stopped on an internal error")
        raise
    finally:
        agent.store.close_all()
        if auditor is not None:
            auditor.close()  # (seals the tail)
        if bound is not None:
            with contextlib.suppress(OSError):
                if os.stat(bound[0]).st_ino == bound[1]:  # (not another agent's since)
                    os.unlink(bound[0])
        log.info("agent stopped; every session is locked")


if __name__ == "__main__":
    main()
