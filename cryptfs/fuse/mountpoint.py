"""Mounting and unmounting a FUSE connection: mount(2) as root, fusermount3 otherwise.

As root::

    fd = open("/dev/fuse", O_RDWR)
    mount(fsname, mountpoint, "fuse.<subtype>", MS_NOSUID|MS_NODEV,
          "fd=<fd>,rootmode=<S_IFDIR>,user_id=<euid>,group_id=<egid>[,allow_other][,default_permissions]")

As an ordinary user the setuid helper does the mount and hands the descriptor back
(libfuse's mount.c, go-fuse's mount_linux.go)::

    socketpair(AF_UNIX, SOCK_STREAM) -> (ours, theirs)
    _FUSE_COMMFD=<theirs> fusermount3 -o <options> -- <mountpoint>
    recvmsg(ours) -> one byte + SCM_RIGHTS [fd of /dev/fuse]

``unmount`` is the one way out for both: umount2(2) as root, ``fusermount3 -u``
otherwise; ``lazy`` detaches a mount that is still busy (MNT_DETACH / ``-z``).
Unmounting from the thread that serves the mount can deadlock (the kernel may
need that thread to answer a flush while it unmounts), so a daemon unmounts from
another thread (see Session.request_unmount).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Sequence

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_DIRSYNC = 128
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MNT_DETACH = 2
_KERNEL_OPTIONS = ("allow_other", "default_permissions")
# Generic mount options (mount(8)) as mount(2) flags: (set, clear).
_FLAGS = {"ro": (MS_RDONLY, 0), "rw": (0, MS_RDONLY), "noexec": (MS_NOEXEC, 0),
          "exec": (0, MS_NOEXEC), "nosuid": (MS_NOSUID, 0), "nodev": (MS_NODEV, 0),
          "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS), "dirsync": (MS_DIRSYNC, 0),
          "noatime": (MS_NOATIME, 0), "atime": (0, MS_NOATIME), "nodiratime": (MS_NODIRATIME, 0),
          "diratime": (0, MS_NODIRATIME)}


class MountError(Exception):
    """The mount could not be made; the message says why, for a person."""


def fusermount_binary() -> str:
    path = shutil.which("fusermount3") or shutil.which("fusermount3", path="/usr/bin:/bin")
    if not path:
        raise MountError("fusermount3 not found (install the fuse3 package)")
    return path


def known_option(option: str) -> bool:
    """Whether ``option`` is a generic mount option :func:`mount` takes in ``extra``."""
    return option in _FLAGS


def mount(mountpoint: str, fsname: str = "cryptfs", subtype: str = "cryptfs",
          allow_other: bool = False, default_permissions: bool = False,
          extra: Sequence[str] = ()) -> int:
    """Mount a new FUSE connection on ``mountpoint``; return its /dev/fuse descriptor.
    ``extra``: generic mount options (``ro``, ``noexec``, ``noatime`` ...; see _FLAGS)."""
    unknown = [o for o in extra if o not in _FLAGS]
    if unknown:
        raise MountError(f"unknown mount option: {', '.join(unknown)}")
    options = [o for o, on in (("allow_other", allow_other),
                               ("default_permissions", default_permissions)) if on]
    if os.geteuid() == 0:
        return _mount_direct(mountpoint, fsname, subtype, options, extra)
    return _mount_fusermount(mountpoint, fsname, subtype, options + list(extra))


def _mount_direct(mountpoint: str, fsname: str, subtype: str, options: list[str],
                  extra: Sequence[str] = ()) -> int:
    flags = MS_NOSUID | MS_NODEV
    for o in extra:
        on, off = _FLAGS[o]
        flags = (flags | on) & ~off
    st = os.stat(mountpoint)
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = ",".join([f"fd={fd}", f"rootmode={stat.S_IFMT(st.st_mode):o}", f"user_id={os.geteuid()}",
                     f"group_id={os.getegid()}", *options])
    res = _libc.mount(os.fsencode(fsname), os.fsencode(mountpoint), f"fuse.{subtype}".encode(),
                      flags | MS_NOSUID | MS_NODEV, data.encode())
    if res != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise MountError(f"mount {mountpoint}: {os.strerror(err)}")
    return fd


def _mount_fusermount(mountpoint: str, fsname: str, subtype: str, options: list[str]) -> int:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        opts = ",".join(["nosuid", "nodev", f"fsname={fsname}", f"subtype={subtype}", *options])
        env = {"_FUSE_COMMFD": str(theirs.fileno()), "PATH": "/usr/bin:/bin"}
        res = subprocess.run([fusermount_binary(), "-o", opts, "--", mountpoint], env=env,
                             pass_fds=(theirs.fileno(),), capture_output=True, text=True,
                             timeout=30, check=False)
        theirs.close()
        if res.returncode != 0:
            raise MountError(f"fusermount3: {res.stderr.strip() or f'exit status {res.returncode}'}")
        msg, fds, _, _ = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise MountError("fusermount3 did not pass back the /dev/fuse descriptor")
        for extra in fds[1:]:
            os.close(extra)
        os.set_inheritable(fds[0], False)
        return fds[0]
    finally:
        ours.close()
        theirs.close()


def unmount(mountpoint: str, lazy: bool = False) -> None:
    """Unmount ``mountpoint``.  A busy mount raises OSError(EBUSY) unless ``lazy``."""
    if os.geteuid() == 0:
        res = _libc.umount2(os.fsencode(mountpoint), MNT_DETACH if lazy else 0)
        if res != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"umount {mountpoint}: {os.strerror(err)}")
        return
    cmd = [fusermount_binary(), "-u", *(["-z"] if lazy else []), "--", mountpoint]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if res.returncode != 0:
        busy = "busy" in res.stderr
        raise OSError(errno.EBUSY if busy else errno.EINVAL,
                      f"fusermount3 -u {mountpoint}: {res.stderr.strip()}")


def is_mounted(mountpoint: str) -> bool:
    """Whether ``mountpoint`` is a mount point in this mount namespace.  Unlike
    os.path.ismount this is also true for a FUSE mount whose daemon died (stat fails
    there with ENOTCONN)."""
    listed = set()
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            listed.add(_unescape(line.split(b" ", 5)[4]))
    # The path as given first: resolving it stats the mount's root, which for a
    # FUSE mount whose INIT is not answered yet (a failure between mount and
    # serving) blocks until someone answers -- here, nobody.
    if os.path.abspath(mountpoint) in listed:
        return True
    return os.path.realpath(mountpoint) in listed


def _unescape(field: bytes) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i] == 0x5C and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(int(field[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return os.fsdecode(bytes(out))


def unmount_quietly(mountpoint: str, lazy: bool = False) -> bool:
    """Unmount if mounted, lazily if busy (or at once with ``lazy``: for a mount
    nobody serves any more).  True if the mount is gone afterwards."""
    if not is_mounted(mountpoint):
        return True
    try:
        unmount(mountpoint, lazy=lazy)
    except OSError as e:
        if e.errno not in (errno.EBUSY, errno.EINVAL):
            raise
        try:
            unmount(mountpoint, lazy=True)
        except OSError:
            return False
    return not is_mounted(mountpoint)
