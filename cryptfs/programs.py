"""Which program asks: the trusted-programs part of a policy rule.

A rule may name the programs allowed to open the files of its directory
(docs/POLICY.md).  The mount identifies the process behind each open by the
pid the kernel gives with the request: its executable is
``/proc/PID/exe``, and, for a program pinned by its SHA-256, the content of
that executable as the process runs it (read through ``/proc/PID/exe``, so
a binary replaced on disk since is not what is hashed).  Hashes are
remembered per (device, inode, size, mtime, ctime) of the executable.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from cryptfs.policy import Rule

MAX_REMEMBERED = 256


class Identifier:
    def __init__(self) -> None:
        self._hashes: dict[tuple[int, ...], str] = {}

    @staticmethod
    def exe(pid: int) -> str | None:
        """The path of the process's executable; None if there is no process
        to ask (pid 0: a request the kernel makes itself) or it cannot be read."""
        if pid <= 0:
            return None
        try:
            return os.readlink(b"/proc/%d/exe" % pid).decode("utf-8", "backslashreplace")
        except OSError:
            return None

    def sha256(self, pid: int) -> str | None:
        """The SHA-256 (hex) of the executable the process runs; None if unreadable."""
        try:
            fd = os.open(b"/proc/%d/exe" % pid, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
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
    def _same_file(pid: int, path: str) -> bool:
        """Whether the process runs the very file at ``path`` in the mount's
        own view of the filesystem (device and inode)."""
        try:
            running = os.stat(b"/proc/%d/exe" % pid)
            named = os.stat(path)
        except OSError:
            return False
        return (running.st_dev, running.st_ino) == (named.st_dev, named.st_ino)

    def decide(self, rule: Rule, pid: int) -> tuple[bool, dict[str, Any]]:
        """Whether the process ``pid`` may open a file under ``rule``, and the
        fields of the access log that say how that was decided."""
        fields: dict[str, Any] = {"rule": rule.path}
        exe = self.exe(pid)
        if exe is None:
            fields["decision"] = ("no process to identify (pid 0)" if pid <= 0
                                  else "the program cannot be identified")
            return False, fields
        digest: str | None = None
        for program in rule.programs or ():
            if program.path != exe:
                continue
            if not self._same_file(pid, program.path):
                # Another file under that path: a bind mount in another mount
                # namespace (unshare -Urm), or the binary replaced since it started.
                fields["decision"] = "not the program at that path here"
                return False, fields
            if program.sha256 is None:
                fields["decision"] = "trusted program (by path)"
                return True, fields
            digest = digest or self.sha256(pid)
            if digest == program.sha256:
                fields["decision"] = "trusted program (by path and SHA-256)"
                return True, fields
        fields["decision"] = ("its SHA-256 is not the one pinned" if digest is not None
                              else "not a trusted program here")
        return False, fields
