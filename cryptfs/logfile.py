"""The daemons' ``--log-file``: appended to, and private when cryptfs makes it.

Both the mount and the key agent log mount points, inode numbers, user
names and integrity failures.  Opened by Python's ``logging.FileHandler``
alone, a new log file would get the process umask (0644 under most), so
every local user could read it.  A file this module creates is 0600; a file
that already exists keeps the mode its owner gave it (an admin may have made
it 0640 for a log-reading group on purpose).
"""

from __future__ import annotations

import logging
import os

from cryptfs.errors import UsageError

LOG_MODE = 0o600


def log_file_handler(path: str) -> logging.FileHandler:
    """A handler appending to ``path``, made 0600 if it is new.

    Raises UsageError (a message, not a traceback) when the file cannot be
    opened for appending.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_MODE)
    except OSError as e:
        raise UsageError(f"cannot write the log file {path}: {e.strerror or e}",
                         hint="give --log-file a path in a directory that exists and is "
                              "writable") from None
    os.close(fd)
    # The file now exists, so FileHandler's open in append mode creates
    # nothing and cannot widen the mode.
    return logging.FileHandler(path, mode="a")
