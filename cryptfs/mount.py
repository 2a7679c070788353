"""Running a mount: checks, daemonising, signals, clean unmount.

``mount_volume`` returns in the parent once the filesystem is mounted (or
raises with the reason); the child serves requests until it is unmounted or
receives SIGINT/SIGTERM, then unmounts cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from cryptfs import rotate, sysio
from cryptfs.errors import CryptfsError, MountError, UsageError
from cryptfs.logfile import log_file_handler
from cryptfs.mounttable import is_fuse_mount, mounts, mounts_of_backing, within
from cryptfs.volume import LockedVolume, Volume

if TYPE_CHECKING:
    from cryptfs.audit.writer import LogTarget

# A task run beside the filesystem for as long as it is mounted; it gets the
# operations object (cryptfs.ops.CryptOperations).
SideTask = Callable[[Any], Awaitable[None]]

log = logging.getLogger("cryptfs")

FSNAME = "cryptfs"


def check_mountpoint(mountpoint: str) -> str:
    # (resolved now, while nothing is mounted there: the kernel lists the mount
    # under this path, and resolving it later would stat the mount itself)
    mnt = os.path.realpath(mountpoint)
    if not os.path.exists(mnt):
        raise MountError(f"mountpoint {mnt} does not exist", hint=f"mkdir -p {mnt}")
    if not os.path.isdir(mnt):
        raise MountError(f"mountpoint {mnt} is not a directory")
    if os.path.ismount(mnt) or is_fuse_mount(mnt):
        raise MountError(f"mountpoint {mnt} is busy: something is already mounted there",
                         hint=f"cryptfs unmount {mnt}")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: the fuse kernel module is not loaded",
                         hint="modprobe fuse (or run where FUSE is available)")
    try:
        fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            kind = sysio.fs_type(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise MountError(f"mountpoint {mnt}: {e.strerror}") from None
    if kind in _KERNEL_FILESYSTEMS:  # (/proc/self named this process's directory: gone at exit)
        raise MountError(f"mountpoint {mnt} is in {_KERNEL_FILESYSTEMS[kind]}, which the kernel "
                         "makes up: mount on a directory of a real filesystem")
    return mnt


def _holds_something(directory: str) -> bool:
    """Whether the directory has an entry (FUSE mounts over one without a word:
    the files are hidden, not encrypted)."""
    try:
        with os.scandir(directory) as it:
            return next(it, None) is not None
    except OSError:
        return False  # (check_mountpoint has reported what matters)


_KERNEL_FILESYSTEMS = {0x9FA0: "/proc", 0x62656572: "/sys", 0x1CD1: "a devpts",
                       0x73636673: "securityfs", 0x27E0EB: "a cgroup filesystem",
                       0x63677270: "a cgroup filesystem"}


def setup_logging(log_file: logging.Handler | None, foreground: bool,
                  verbose: bool = False) -> None:
    """Send the ``cryptfs`` logger to ``log_file`` (made by :func:`log_file_handler`
    before the daemon forks, so a bad path is the user's error, not the daemon's),
    else stderr in the foreground, else syslog."""
    # A log line that cannot be written (--log-file on a full disk) is lost, not a
    # traceback on the user's terminal from every request that logs.
    logging.raiseExceptions = False
    root = logging.getLogger("cryptfs")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.handlers.clear()
    handler: logging.Handler
    if log_file:
        handler = log_file
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s[%(process)d] "
                                               "%(levelname)s: %(message)s"))
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("cryptfs: %(levelname)s: %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("cryptfs[%(process)d]: %(levelname)s: %(message)s"))
    else:
        handler = logging.NullHandler()
    root.addHandler(handler)


def sd_notify(state: str) -> None:
    """Tell systemd about our state (Type=notify units); nothing if not under one."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify systemd (%s)", e.strerror or e)


def _raise_fd_limit() -> None:
    """Each inode the kernel remembers holds one descriptor: allow many."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# Options the kernel's FUSE module takes itself; every other -o is a generic
# mount option (cryptfs.fuse.mountpoint knows which).  default_permissions is
# always on: the kernel checks file modes before a request reaches cryptfs.
_FUSE_OPTIONS = ("allow_other", "default_permissions")


def fuse_options(vol: Volume | LockedVolume, extra: Iterable[str]) -> list[str]:
    """The generic mount options of ``-o`` (``ro``, ``noexec`` ...), checked;
    ``allow_other`` stays in the list and is taken out by :func:`serve`."""
    from cryptfs.fuse.mountpoint import known_option

    opts: list[str] = []
    for o in extra:
        if o in ("", "default_permissions") or o in opts:
            continue
        if o not in _FUSE_OPTIONS and not known_option(o):
            raise UsageError(f"unknown mount option {o!r}",
                             hint="generic options: ro, rw, noexec, exec, nosuid, nodev, sync, "
                                  "dirsync, noatime, nodiratime; and allow_other")
        opts.append(o)
    for a, b in (("ro", "rw"), ("exec", "noexec"), ("suid", "nosuid"), ("dev", "nodev"),
                 ("atime", "noatime")):
        if a in opts and b in opts:  # (the last one won, silently: -o rw,ro mounted read-only)
            raise UsageError(f"-o {a} and -o {b} contradict each other: give one")
    return opts


def serve(vol: Volume | LockedVolume, mnt: str, options: Sequence[str], ready_fd: int | None,
          pid_file: str | None = None, side_tasks: Sequence[SideTask] = (),
          audit: LogTarget | None = None, shared_storage: bool = False,
          poll_us: int | None = None) -> int:
    """Mount, signal readiness on ``ready_fd``, serve until unmounted (polling for
    the next request for ``poll_us`` before sleeping; None: cryptfs.fuse.session.POLL_NS)."""
    import trio

    from cryptfs.frontend import Frontend, init_options
    from cryptfs.fuse import MountError as FuseMountError
    from cryptfs.fuse import Session
    from cryptfs.fuse.mountpoint import unmount_quietly
    from cryptfs.fuse.session import POLL_NS
    from cryptfs.ops import CryptOperations

    _raise_fd_limit()
    # Held (shared) while mounted: an offline `cryptfs rotate` (which takes it
    # exclusively) never rewrites files under a live mount, here or on another
    # server, and the reverse; a re-encryption holds it exclusively
    # (cryptfs.presence, cryptfs.fs.rotation).  Open until exit.
    hold = rotate.hold_volume(vol.backing, exclusive=False)
    try:
        done = rotate.replay_journal(vol.backing)
    except CryptfsError as e:
        # The journal is the only full copy of a file it names: no mount (and
        # no new rotation) until it has been copied back.
        raise MountError(f"an interrupted re-encryption cannot be finished: {e}",
                         hint="free space on the backing filesystem, then mount again") from None
    if done:
        log.warning("%s", done)
    # The kernel has already applied the caller's umask to every mode it
    # sends; the daemon's own umask must not mask it a second time.
    os.umask(0)
    ops = CryptOperations(vol, shared_storage=shared_storage)
    ops.presence = hold
    if audit is not None:
        from cryptfs.audit import AuditLog, Auditor
        logdir, fail_open, server = audit
        ops.audit = Auditor(AuditLog(logdir, server=server), vol.config.volume_id.hex(),
                            fail_open)
        if not ops.audit.write("mount", "allowed", os.getuid(), os.getpid(), path=mnt,
                               backing=vol.backing):
            raise MountError(f"cannot write the access log in {logdir}")
    frontend = Frontend(ops)
    session = Session(frontend, mnt, init_options(ops),
                      fsname=f"{FSNAME}:{os.path.realpath(vol.backing)}", subtype=FSNAME,
                      allow_other="allow_other" in options, default_permissions=True,
                      mount_options=[o for o in options if o not in _FUSE_OPTIONS],
                      poll_ns=POLL_NS if poll_us is None else poll_us * 1000)
    try:
        session.mount()
    except (FuseMountError, OSError) as e:
        raise MountError(f"FUSE mount failed: {e}",
                         hint="is the mountpoint busy, or allow_other not permitted "
                              "(user_allow_other in /etc/fuse.conf)?") from None

    def ready() -> None:
        # (inside the try below: a pid file that cannot be written unmounts
        # again, rather than leave a mount behind a failed command)
        if pid_file:
            try:
                _write_pid_file(pid_file)
            except OSError as e:
                raise MountError(f"cannot write the pid file {pid_file}: {e.strerror or e}",
                                 hint="nothing stays mounted; give --pid-file a writable path"
                                 ) from None
        log.info("mounted %s on %s%s", vol.backing, mnt,
                 " (shared storage: nothing cached)" if shared_storage else "")
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=mounted on {mnt}")
        if ready_fd is not None:
            os.write(ready_fd, b"OK")
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 2)  # (messages go to the log from here on)
            os.dup2(null, ready_fd)  # (the parent has its answer: a later failure goes to the log)
            os.close(null)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            async def on_signal(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                                ) -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM,
                                               signal.SIGHUP) as signals:
                    task_status.started()
                    async for signum in signals:
                        log.info("signal %d: unmounting", signum)
                        # From a thread, while the loop still answers: the kernel
                        # may write dirty pages back before the mount goes.  A busy
                        # mount is detached lazily; either way serving ends here.
                        await trio.to_thread.run_sync(session.unmount)
                        nursery.cancel_scope.cancel()
                        return

            frontend.attach(session, nursery)
            # Started before serving: the request loop may answer a stream of
            # requests without yielding to trio (it polls for the next one), and a
            # SIGTERM before this receiver exists would kill the daemon mid-mount.
            await nursery.start(on_signal)
            nursery.start_soon(ops.rotation_worker)
            nursery.start_soon(ops.config_watch)  # (an idle mount follows admin changes too)
            if ops.audit is not None:
                nursery.start_soon(ops.audit.sealer)
            for task in side_tasks:
                nursery.start_soon(task, ops)
            # Handlers run to completion on this thread, between the other
            # tasks' steps; an open that waits for a large masked view
            # (cryptfs.views) is answered later from a task of this nursery.
            await session.serve_trio()
            nursery.cancel_scope.cancel()

    try:
        ready()
        trio.run(run)
    except BaseException as e:
        if isinstance(e, CryptfsError):
            log.error("%s: unmounting", e)
        elif not isinstance(e, KeyboardInterrupt):
            log.exception("the filesystem daemon failed: unmounting")
        raise
    finally:
        sd_notify("STOPPING=1")
        try:  # (nothing serves the mount any more: detach it, never wait on it)
            if not unmount_quietly(mnt, lazy=True):
                log.error("%s is still mounted", mnt)
        except OSError as e:
            log.error("unmount of %s failed: %s", mnt, os.strerror(e.errno or 0))
        session.close()
        served = session.served()
        log.info("served %d requests: %s", sum(served.values()),
                 ", ".join(f"{name} {n}" for name, n in served.items()) or "none")
        log.info("request loop: %d requests found by polling, %d polls ran out, slept %d times",
                 session.polled, session.missed, session.sleeps)
        if ops.names_walks:
            log.info("tree walks for the names of hard-linked files: %d", ops.names_walks)
        busy = session.busy()
        if busy:
            log.info("time per request, decode to reply written: %s",
                     ", ".join(f"{name} {us:.1f} us ({share:.0%})"
                               for name, (us, share) in busy.items()))
        if ops.audit is not None:
            ops.audit.write("unmount", "allowed", os.getuid(), os.getpid(), path=mnt)
            ops.audit.close()
        ops.close()
        vol.close()
        if pid_file:
            _remove_pid_file(pid_file)
        log.info("unmounted %s", mnt)
    return 0


def _outside_volume(vol: Volume | LockedVolume, mnt: str, what: str, path: str) -> None:
    """Refuse a daemon's own file inside the backing directory (it would replace
    or append to the volume's files: its config, say) or inside the mount (the
    daemon would wait on itself)."""
    for top, name in ((os.path.realpath(vol.backing), "the volume's backing directory"),
                      (mnt, "the mountpoint")):
        if within(os.path.realpath(path), top):
            raise UsageError(f"the {what} {path} is inside {name} {top}",
                             hint="put it outside both, e.g. under /var/log or /run")


def _pid_file_or_nothing(path: str) -> None:
    """A pid file replaces only a pid file (a number on a line, as a daemon left
    it): --pid-file naming someone's file by mistake replaced it with a pid."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise UsageError(f"cannot use the pid file {path}: {e.strerror}") from None
    text = b""
    if stat.S_ISREG(st.st_mode) and st.st_size <= 32:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                text = os.read(fd, 33)
            finally:
                os.close(fd)
    if not (text.strip().isdigit() or (stat.S_ISREG(st.st_mode) and st.st_size == 0)):
        raise UsageError(f"{path} exists and is not a pid file",
                         hint="name a new file (or an old pid file) for --pid-file")


def _write_pid_file(path: str) -> None:
    """This daemon's pid in ``path``: a new file renamed over the name, so a
    symlink or a hard link planted there since the check (in a directory others
    may write) is replaced, never written through."""
    where, name = os.path.split(path)
    dfd = os.open(where, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sysio.replace_file_at(dfd, name, f"{os.getpid()}\n".encode(), 0o644,
                              f".{name}.{os.getpid()}.tmp")
    finally:
        os.close(dfd)


def _remove_pid_file(path: str) -> None:
    """At exit: the pid file goes, if it still names this daemon."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:  # (never through a symlink, nor blocked by a FIFO put there)
            mine = (stat.S_ISREG(os.fstat(fd).st_mode)
                    and os.read(fd, 33).strip() == str(os.getpid()).encode())
        finally:
            os.close(fd)
        if mine:
            os.unlink(path)


def _not_mounted_already(backing: str) -> None:
    """Two mounts of one backing directory each cache sizes, pages and names the
    other changes: each then serves, and writes back, stale data.  Only mounts
    that both run with --shared-storage (which caches nothing) may share one."""
    mounted = mounts_of_backing(backing)
    if mounted:
        raise UsageError(f"{backing} is already mounted on {mounted[0]}",
                         hint="unmount it first; two mounts of one volume serve each other "
                              "stale data unless both run with --shared-storage "
                              "(docs/MULTISERVER.md)")


def mount_volume(vol: Volume | LockedVolume, mountpoint: str, *, foreground: bool,
                 options: Iterable[str], log_file: str | None = None,
                 pid_file: str | None = None, side_tasks: Sequence[SideTask] = (),
                 audit: LogTarget | None = None, shared_storage: bool = False,
                 poll_us: int | None = None, warn: Callable[[str], None] | None = None
                 ) -> None:
    """Mount ``vol`` on ``mountpoint`` (in a daemon unless ``foreground``) once
    every check has passed; ``warn`` is told what the user should know but
    does not stop the mount."""
    mnt = check_mountpoint(mountpoint)
    if within(mnt, os.path.realpath(vol.backing)):
        raise UsageError(f"the mountpoint {mnt} is inside the volume's backing directory "
                         f"{os.path.realpath(vol.backing)}",
                         hint="mount it elsewhere: the mount would hide the ciphertext it "
                              "serves, or serve it to itself")
    if not shared_storage:
        _not_mounted_already(vol.backing)
    opts = fuse_options(vol, options)
    for what, path in (("log file", log_file), ("pid file", pid_file),
                       ("access log", audit[0] if audit is not None else None)):
        if path:
            _outside_volume(vol, mnt, what, path)
    log_handler = log_file_handler(os.path.abspath(log_file)) if log_file else None
    if pid_file:
        pid_file = os.path.abspath(pid_file)
        where = os.path.dirname(pid_file)
        if not os.path.isdir(where):
            raise UsageError(f"cannot write the pid file {pid_file}: {where} "
                             + ("is not a directory" if os.path.lexists(where)
                                else "does not exist"))
        _pid_file_or_nothing(pid_file)
    if warn is not None and _holds_something(mnt):
        warn(f"mountpoint {mnt} is not empty: what it holds is hidden while the volume is "
             "mounted, and stays unencrypted on the disk (move it into the volume to encrypt it)")
    if foreground:
        setup_logging(log_handler, foreground=True)
        serve(vol, mnt, opts, None, pid_file, side_tasks, audit, shared_storage, poll_us)
        return

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(r)
        code = 1
        try:
            os.setsid()
            os.chdir("/")
            setup_logging(log_handler, foreground=False)
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            code = serve(vol, mnt, opts, w, pid_file, side_tasks, audit, shared_storage,
                         poll_us)
        except CryptfsError as e:
            os.write(w, f"ERR{e}".encode())
        except BaseException as e:  # report, never a traceback on the user's terminal
            try:
                os.write(w, f"ERRinternal error: {type(e).__name__}: {e}".encode())
            except OSError:
                log.exception("mount daemon failed")
        finally:
            os._exit(code)
    os.close(w)
    if log_handler:
        log_handler.close()  # the daemon holds its own copy of the descriptor
    msg = b""
    while chunk := os.read(r, 4096):
        msg += chunk
    os.close(r)
    if msg != b"OK":
        os.waitpid(pid, 0)
        text = msg[3:].decode(errors="replace") if msg.startswith(b"ERR") else (
            "the mount daemon exited before the filesystem was ready")
        raise MountError(text)
    vol.close()  # the parent's copy of the keys


def unmount(mountpoint: str, lazy: bool = False) -> None:
    mnt = os.path.abspath(mountpoint)
    if not any(mp == mnt and typ.startswith("fuse") for mp, typ, _ in mounts()):
        raise MountError(f"{mnt} is not a mounted cryptfs volume")
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mnt]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        res = subprocess.run(["umount"] + (["-l"] if lazy else []) + [mnt],
                             capture_output=True, text=True, check=False)
    if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip().splitlines()
        raise MountError(f"unmount of {mnt} failed: {detail[-1] if detail else 'unknown error'}",
                         hint="close the files open there, or use --lazy")
