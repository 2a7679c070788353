"""Who has a volume: the presence file ``BACKING/cryptfs.presence`` and its lock.

Every mount of a volume holds a shared ``flock`` on the presence file for as
long as it runs.  Whoever must be alone with the volume holds it exclusively:

- an offline ``cryptfs rotate`` (no mount walks its files), for its whole run;
- a mount that re-encrypts (``cryptfs rotate --reencrypt``): it gives every
  file a new file key, which another mount of the volume (another server on
  shared storage) would not know; blocks that one writes afterwards under the
  old key would fail authentication.  The mount turns its shared lock into an
  exclusive one for the walk, and back.

So a mount is refused while one of them runs, and they are refused while
another mount runs.  The lock is on a file, not on the directory, because
network file systems make ``flock`` on a *file* global across their clients
(JuiceFS, CephFS; NFSv4 emulates it with POSIX locks) but not on a directory
(JuiceFS keeps that lock in the local kernel).

Changing a held lock is not atomic (Linux drops the old lock, then asks for
the new one): a mount that tries to become exclusive and fails has, for an
instant, no lock at all.  Every move *to* exclusive therefore happens under
the config lock (:func:`cryptfs.config.config_lock`), so no two of them, and
no offline rotation, overlap such an instant.  Moves to shared need no lock:
nobody else can hold anything while it is exclusive.

The file is empty; only its lock matters.  ``cryptfs init`` makes it, a mount
of an older volume makes it if it is missing.  Where it cannot be made (a
read-only backing directory), the directory itself is locked instead, which
holds off others on this machine only.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from cryptfs.config import config_lock
from cryptfs.errors import BackingIOError, MountError, NotAVolume, UsageError

PRESENCE_NAME = "cryptfs.presence"
_ATTEMPTS = 5  # a presence file replaced under us this often in a row: give up

ANOTHER_MOUNT = ("the volume is mounted elsewhere too (by another server on the shared "
                 "storage, or by another mount)")


def create(backing: str) -> None:
    """Make the (empty) presence file of a new volume."""
    fd = os.open(os.path.join(backing, PRESENCE_NAME),
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    os.close(fd)


def _open(backing: str) -> tuple[int, int]:
    """(descriptor to lock, backing directory descriptor): the presence file,
    made if missing, opened for writing where possible (NFS needs that for
    an exclusive lock); the directory itself where no file can be had."""
    try:
        dfd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise BackingIOError(f"{backing}: {e.strerror}") from None
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = None
    for how in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            fd = os.open(PRESENCE_NAME, how | flags, 0o644, dir_fd=dfd)
            break
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
                os.close(dfd)
                raise BackingIOError(f"{backing}/{PRESENCE_NAME}: {e.strerror}") from None
    if fd is None:
        return os.dup(dfd), dfd  # (read-only and never made: lock the directory)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        os.close(dfd)
        raise NotAVolume(f"{backing}/{PRESENCE_NAME} is not a regular file",
                         hint="remove it (it holds nothing) and mount again")
    return fd, dfd


def _still_there(fd: int, dfd: int) -> bool:
    """Whether ``fd`` is the presence file the directory names now (a lock on a
    file that was removed or replaced meanwhile holds nobody off)."""
    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        return True
    try:
        now = os.stat(PRESENCE_NAME, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _hold(backing: str, how: int) -> int | None:
    """The presence locked with ``how`` (LOCK_SH or LOCK_EX), or None if
    someone holds it against that."""
    for _ in range(_ATTEMPTS):
        fd, dfd = _open(backing)
        try:
            try:
                fcntl.flock(fd, how | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except OSError as e:
                os.close(fd)
                raise BackingIOError(f"cannot lock {backing}/{PRESENCE_NAME}: {e.strerror}") \
                    from None
            if _still_there(fd, dfd):
                return fd
            os.close(fd)
        finally:
            os.close(dfd)
    raise BackingIOError(f"{backing}/{PRESENCE_NAME} keeps being replaced",
                         hint="is something removing files from the backing directory?")


def join(backing: str) -> int:
    """For a mount: the presence held shared; kept until the descriptor is
    closed (or the process exits)."""
    fd = _hold(backing, fcntl.LOCK_SH)
    if fd is None:
        raise MountError(f"an offline rotation is running on {backing}, or a mount of it "
                         "re-encrypts every file (cryptfs rotate --reencrypt, on this or "
                         "another server): mount it when that has finished")
    return fd


def take(backing: str) -> int:
    """For an offline rotation: the presence held exclusively (no mount, here or
    on another server, and no other rotation)."""
    with config_lock(backing):
        fd = _hold(backing, fcntl.LOCK_EX)
    if fd is None:
        raise UsageError(f"{backing} is in use: mounted (on this or another server), or "
                         "another rotation runs on it",
                         hint="rotate a mounted volume on a server where it is mounted "
                              "(cryptfs rotate asks that mount to do it)")
    return fd


def be_alone(backing: str, fd: int) -> bool:
    """For a mount holding ``fd`` shared: hold it exclusively instead, if no
    other mount holds it; else keep it shared and return False."""
    with config_lock(backing):
        dfd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if not _still_there(fd, dfd):
                return False  # (a new presence file: others may hold that one)
        finally:
            os.close(dfd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            share(fd)  # (under the config lock: nobody can have become exclusive)
            return False


def share(fd: int) -> bool:
    """Back to shared (from exclusive, or after a failed try): whether it is
    held.  Nobody else can hold it exclusively meanwhile, but for a program
    that does not follow these rules (an older cryptfs)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
