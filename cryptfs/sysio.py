"""The few Linux system calls that Python's os module lacks.

``renameat2`` (RENAME_NOREPLACE, RENAME_EXCHANGE), ``fallocate`` with its
modes, ``fstatfs``'s file system type, and the ``AT_EMPTY_PATH``
forms of ``fchownat``/``utimensat``, which act on an O_PATH descriptor
itself (needed for symlinks, which cannot be opened any other way); and one
small composite, :func:`replace_file_at`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(res: int, what: str) -> None:
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


class _Statfs(ctypes.Structure):  # struct statfs (64-bit Linux); only f_type is read
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_long * 15)]


def fs_type(fd: int) -> int:
    """The magic number of the file system ``fd`` is on (``fstatfs``'s f_type)."""
    buf = _Statfs()
    _check(_libc.fstatfs(fd, ctypes.byref(buf)), "fstatfs")
    return int(buf.f_type) & 0xFFFFFFFF


def renameat2(olddirfd: int, oldname: str, newdirfd: int, newname: str, flags: int) -> None:
    _check(_libc.renameat2(olddirfd, os.fsencode(oldname), newdirfd, os.fsencode(newname),
                           ctypes.c_uint(flags)), "renameat2")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with ``mode`` (os.posix_fallocate has none)."""
    _check(_libc.fallocate(fd, mode, offset, length), "fallocate")


def fchown_empty(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", uid, gid, AT_EMPTY_PATH): works on O_PATH fds."""
    _check(_libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH), "fchownat")


UTIME_OMIT = (1 << 30) - 2  # tv_nsec: leave this time as it is


def _timespec(t_ns: int | None) -> _Timespec:
    if t_ns is None:
        return _Timespec(0, UTIME_OMIT)
    return _Timespec(t_ns // 1_000_000_000, t_ns % 1_000_000_000)


def utimens_empty(fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """utimensat on the object an O_PATH fd refers to, symlinks included
    (a time given as None is left unchanged: UTIME_OMIT, no stat needed)."""
    ts = (_Timespec * 2)(_timespec(atime_ns), _timespec(mtime_ns))
    _check(_libc.utimensat(fd, b"", ts, AT_EMPTY_PATH), "utimensat")


def link_empty(fd: int, new_dir_fd: int, new_name: str) -> None:
    """Hard-link the object behind an O_PATH fd (symlinks included).

    ``linkat(fd, "", ..., AT_EMPTY_PATH)`` needs CAP_DAC_READ_SEARCH; without
    it, link through /proc/self/fd (which does not work for symlinks).
    """
    res = _libc.linkat(fd, b"", new_dir_fd, os.fsencode(new_name), AT_EMPTY_PATH)
    if res == 0:
        return
    err = ctypes.get_errno()
    if err not in (1, 2):  # EPERM/ENOENT: no capability for AT_EMPTY_PATH
        raise OSError(err, os.strerror(err))
    os.link(f"/proc/self/fd/{fd}", new_name, dst_dir_fd=new_dir_fd, follow_symlinks=True)


def write_all(fd: int, data: bytes) -> None:
    """write(2) until all of ``data`` is written: a short write (a disk that
    fills up) goes on, and one that writes nothing is ENOSPC.  An unchecked
    os.write could leave a file cut short under its real name."""
    rest = memoryview(data)
    while rest:
        n = os.write(fd, rest)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        rest = rest[n:]


def replace_file_at(dir_fd: int, name: str, data: bytes, mode: int, tmp: str) -> None:
    """Give ``name`` in ``dir_fd`` the content ``data``, atomically: write a new
    file ``tmp`` (O_EXCL, never through a planted symlink; a short write is
    ENOSPC), then rename it over ``name``.  ``tmp`` is removed on failure."""
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=dir_fd)
        try:
            write_all(fd, data)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
