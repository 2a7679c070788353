"""The daemons' ``--log-file``: appended to, and private when cryptfs makes it.

Both the mount and the key agent log mount points, inode numbers, user
names and integrity failures.  Opened by Python's ``logging.FileHandler``
alone, a new log file would get the process umask (0644 under most), so
every local user could read it.  A file this module creates is 0600; a file
that already exists keeps the mode its owner gave it (an admin may have made
it 0640 for a log-reading group on purpose).

The daemons run as root, often with a log in a directory others may write
(/tmp, a shared spool): the path is opened once, without following a
symlink, and only a regular file with one name, of root's or the daemon's
own, is appended to.  The handler keeps that descriptor; it never opens the
path again, so nothing swapped in later receives a line.
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from cryptfs.errors import UsageError

LOG_MODE = 0o600


class LogFileHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler on a log file opened once (:func:`log_file_handler`); closing
    it closes the file."""

    def close(self) -> None:
        self.acquire()
        try:
            try:
                self.flush()
            finally:
                stream = self.stream
                if stream is not None:
                    self.stream = None
                    stream.close()
        finally:
            self.release()
        super().close()


def log_file_handler(path: str) -> LogFileHandler:
    """A handler appending to ``path``, made 0600 if it is new.

    Raises UsageError (a message, not a traceback) when the file cannot be
    opened for appending, is a symlink, or is not a file this process may
    trust with its lines (see the module).
    """
    hint = ("give --log-file a path in a directory that exists and is writable, naming a "
            "new file or a log file of your own")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                     | os.O_NOFOLLOW | os.O_NONBLOCK, LOG_MODE)
    except OSError as e:
        if e.errno == errno.ELOOP:  # (the last component is a symlink)
            raise UsageError(f"cannot write the log file {path}: it is a symlink (not followed)",
                             hint=hint) from None
        raise UsageError(f"cannot write the log file {path}: {e.strerror or e}",
                         hint=hint) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"cannot write the log file {path}: it is not a regular file",
                             hint=hint)
        if st.st_nlink != 1:
            raise UsageError(f"cannot write the log file {path}: it has {st.st_nlink} names "
                             "(hard links): the lines would reach another file too", hint=hint)
        if st.st_uid not in (0, os.geteuid()):
            raise UsageError(f"cannot write the log file {path}: it belongs to uid {st.st_uid}, "
                             "who would read every line logged", hint=hint)
        os.set_blocking(fd, True)
        stream = os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")
    except BaseException:
        os.close(fd)
        raise
    return LogFileHandler(stream)
