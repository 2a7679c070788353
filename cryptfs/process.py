"""Which executable a process runs: ``/proc/PID/exe``, read in this one place.

Two callers need it: the access log names the program behind every record
(cryptfs.audit.writer.Auditor), and trusted-programs rules decide by it
(cryptfs.programs.Identifier).  What the link is worth:

- It is what the process's memory descriptor says.  A process with
  CAP_SYS_ADMIN in its user namespace may point it at any executable file
  (``prctl(PR_SET_MM_MAP)``), so it means something only for a process in the
  mount's own user namespace (the Identifier checks that; the log records it
  as it reads).
- A pid names a process only until it exits: whoever decides by it reads
  everything through one descriptor of ``/proc/PID`` (:func:`open_proc`, then
  the ``*_at`` functions), which never names a later process with that pid.
- It is read for every use, never remembered: a process may exec another
  program under the same pid.

A path that is not UTF-8 is given with its odd bytes as ``\\xNN``.
"""

from __future__ import annotations

import os


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def open_proc(pid: int) -> int | None:
    """An O_PATH descriptor of ``/proc/PID`` (None: pid 0, the kernel's own
    request, or no such process); the caller closes it."""
    if pid <= 0:
        return None
    try:
        return os.open(b"/proc/%d" % pid, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None


def exe_at(proc: int) -> str | None:
    """The executable's path of the process ``proc`` (from :func:`open_proc`);
    None if it cannot be read (gone, a kernel thread, no permission)."""
    try:
        return _text(os.readlink(b"exe", dir_fd=proc))
    except OSError:
        return None


def stat_exe_at(proc: int) -> os.stat_result | None:
    """The executable the process runs, as the kernel holds it (not the file
    now at its path)."""
    try:
        return os.stat("exe", dir_fd=proc)
    except OSError:
        return None


def open_exe_at(proc: int) -> int | None:
    """A read-only descriptor of the executable the process runs (its content
    as it runs it, even if the file at its path was replaced since)."""
    try:
        return os.open("exe", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
    except OSError:
        return None


def exe(pid: int) -> str | None:
    """The executable's path of process ``pid``, for a record that names it
    (None if there is no process to ask or it cannot be read).  One look: a
    caller that decides by it uses :func:`open_proc` and :func:`exe_at`."""
    if pid <= 0:
        return None
    try:
        return _text(os.readlink(b"/proc/%d/exe" % pid))
    except OSError:
        return None
