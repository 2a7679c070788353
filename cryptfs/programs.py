"""Which program asks: the trusted-programs part of a policy rule.

A rule may name the programs allowed to open the files of its directory
(docs/POLICY.md).  The mount identifies the process behind each open by the
pid the kernel gives with the request: its executable is
``/proc/PID/exe``, and, for a program pinned by its SHA-256, the content of
that executable as the process runs it (read through ``/proc/PID/exe``, so
a binary replaced on disk since is not what is hashed; cryptfs.process reads
the link).  Hashes are
remembered per (device, inode, size, mtime, ctime) of the executable.

The exe link is only what the process's memory descriptor says, and a
process holding CAP_SYS_ADMIN in its user namespace may replace it with any
executable file (``prctl(PR_SET_MM, PR_SET_MM_MAP)``), which any user gets
in a user namespace of their own.  So a process outside the mount's own
user namespace is never a trusted program.  Everything about one request is
read through one descriptor of ``/proc/PID``, which names that process and
no later one with the same pid.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from cryptfs import process
from cryptfs.policy import Rule

MAX_REMEMBERED = 256

OTHER_USERNS = "in another user namespace: its exe link cannot be trusted"

# Where a kernel says whether unprivileged users may make user namespaces
# (and with them forge an exe link): (file, value that closes it, what it is).
USERNS_SWITCHES = (
    ("/proc/sys/user/max_user_namespaces", "0", "user.max_user_namespaces"),
    ("/proc/sys/kernel/unprivileged_userns_clone", "0", "kernel.unprivileged_userns_clone"),
    ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
     "kernel.apparmor_restrict_unprivileged_userns"),
)


def userns_open(switches: tuple[tuple[str, str, str], ...] = USERNS_SWITCHES) -> bool:
    """Whether this kernel lets unprivileged users make user namespaces: then
    a process may forge its exe link from one (docs/POLICY.md)."""
    for path, closed, _name in switches:
        try:
            with open(path, encoding="ascii") as f:
                if f.read().strip() == closed:
                    return False
        except OSError:
            continue  # (this kernel has no such switch)
    return True


def _ns_id(path: str | bytes, dir_fd: int | None = None) -> tuple[int, int] | None:
    try:
        st = os.stat(path, dir_fd=dir_fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Identifier:
    def __init__(self) -> None:
        self._hashes: dict[tuple[int, ...], str] = {}
        # The mount's own user namespace: the only one whose processes' exe
        # links mean what they say.
        self.own_userns = _ns_id("/proc/self/ns/user")
        self._warned = False

    def warn_once(self) -> str | None:
        """What an operator should know the first time a rule names programs
        (None: nothing, or said already)."""
        if self._warned:
            return None
        self._warned = True
        if not userns_open():
            return None
        return ("trusted-programs rules are in force, but unprivileged users may create user "
                "namespaces on this machine: a process that shares its memory with one in "
                "such a namespace can forge its executable (docs/POLICY.md); set "
                "user.max_user_namespaces=0 (or kernel.unprivileged_userns_clone=0) to close it")

    def _sha256(self, proc: int) -> str | None:
        """The SHA-256 (hex) of the executable the process runs; None if unreadable."""
        fd = process.open_exe_at(proc)
        if fd is None:
            return None
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            digest = self._hashes.get(key)
            if digest is None:
                with open(fd, "rb", closefd=False) as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                if len(self._hashes) >= MAX_REMEMBERED:
                    self._hashes.clear()
                self._hashes[key] = digest
            return digest
        except OSError:
            return None
        finally:
            os.close(fd)

    @staticmethod
    def _same_file(proc: int, path: str) -> bool:
        """Whether the process runs the very file at ``path`` in the mount's
        own view of the filesystem (device and inode)."""
        running = process.stat_exe_at(proc)
        try:
            named = os.stat(path)
        except OSError:
            return False
        return running is not None and (running.st_dev, running.st_ino) == (named.st_dev, named.st_ino)

    def decide(self, rule: Rule, pid: int) -> tuple[bool, dict[str, Any]]:
        """Whether the process ``pid`` may open a file under ``rule``, and the
        fields of the access log that say how that was decided."""
        fields: dict[str, Any] = {"rule": rule.path}
        if pid <= 0:
            fields["decision"] = "no process to identify (pid 0)"
            return False, fields
        # Every read below goes through this descriptor: should the process
        # end and its pid be reused meanwhile, they fail rather than describe
        # the newcomer.
        proc = process.open_proc(pid)
        if proc is None:
            fields["decision"] = "the program cannot be identified"
            return False, fields
        try:
            return self._decide(rule, proc, fields)
        finally:
            os.close(proc)

    def _decide(self, rule: Rule, proc: int, fields: dict[str, Any]
                ) -> tuple[bool, dict[str, Any]]:
        # A process cannot leave its user namespace for ours, and while the
        # requesting thread waits for this answer its process cannot enter
        # another (unshare and setns of a user namespace need a process of
        # one thread, and that thread is here): one look is enough.
        userns = _ns_id("ns/user", dir_fd=proc)
        exe = process.exe_at(proc)
        if exe is None or userns is None or self.own_userns is None:
            fields["decision"] = "the program cannot be identified"
            return False, fields
        if userns != self.own_userns:
            fields["decision"] = OTHER_USERNS
            return False, fields
        digest: str | None = None
        for program in rule.programs or ():
            if program.path != exe:
                continue
            if not self._same_file(proc, program.path):
                # Another file under that path: a bind mount in another mount
                # namespace, or the binary replaced since it started.
                fields["decision"] = "not the program at that path here"
                return False, fields
            if program.sha256 is None:
                fields["decision"] = "trusted program (by path)"
                return True, fields
            digest = digest or self._sha256(proc)
            if digest == program.sha256:
                fields["decision"] = "trusted program (by path and SHA-256)"
                return True, fields
        fields["decision"] = ("its SHA-256 is not the one pinned" if digest is not None
                              else "not a trusted program here")
        return False, fields
