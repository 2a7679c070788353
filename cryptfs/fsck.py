"""Offline check of a whole volume: every name, header, block, link and xattr."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptfs import tree
from cryptfs.content import BlockError, ContentFile
from cryptfs.errors import CryptfsError
from cryptfs.modes import IntegrityError
from cryptfs.modes.errors import NotARecipient
from cryptfs.names import DIRIV_NAME, LONG_PREFIX, LONG_SUFFIX, TMP_PREFIX, NameCodec
from cryptfs.policy import load_policy
from cryptfs.volume import UnlockedVolume


@dataclass
class Problem:
    path: str  # plaintext path where known, else the backing path
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    blocks: int = 0
    sealed: int = 0  # hybrid files this key is no recipient of: header not checkable

    @property
    def clean(self) -> bool:
        return not self.problems


def _show(p: bytes) -> str:
    return p.decode("utf-8", "backslashreplace")


class Checker:
    def __init__(self, vol: UnlockedVolume, on_problem: Callable[[Problem], None] | None = None) -> None:
        self.vol = vol
        self.codec: NameCodec = vol.codec()
        self.report = Report()
        self.on_problem = on_problem

    def problem(self, path: str, what: str) -> None:
        p = Problem(path, what)
        self.report.problems.append(p)
        if self.on_problem:
            self.on_problem(p)

    def run(self) -> Report:
        try:
            load_policy(self.vol.config, self.vol.keys)
        except CryptfsError as e:
            self.problem("cryptfs.conf", str(e))
        fd = os.open(self.vol.tree, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._dir(fd, b"/", "tree")
        finally:
            os.close(fd)
        return self.report

    def _dir(self, dfd: int, p_path: bytes, c_path: str) -> None:
        self.report.dirs += 1
        names = sorted(os.listdir(dfd))
        try:
            diriv = tree.read_diriv(dfd)
        except IntegrityError as e:
            self.problem(_show(p_path), f"{e}; its {len(names)} entries cannot be named")
            return
        present = set(names)
        for n in names:
            if n == DIRIV_NAME:
                continue
            shown_n = os.fsencode(n).decode("utf-8", "backslashreplace")
            if n.startswith(TMP_PREFIX):
                self.problem(f"{c_path}/{shown_n}", "leftover temporary entry (interrupted create)")
                continue
            if n.startswith(LONG_PREFIX) and n.endswith(LONG_SUFFIX):
                if n[: -len(LONG_SUFFIX)] not in present:
                    self.problem(f"{c_path}/{shown_n}", "long-name file without its entry")
                continue
            if "." in n and not n.startswith(LONG_PREFIX):
                self.problem(f"{c_path}/{shown_n}", "foreign file (not created by cryptfs)")
                continue
            try:
                p_name = tree.decrypt_entry(dfd, n, diriv, self.codec)
            except Exception as e:  # noqa: BLE001 - report it and check the rest
                self.problem(f"{c_path}/{shown_n}", f"name does not decrypt ({e})")
                continue
            self._entry(dfd, n, p_path.rstrip(b"/") + b"/" + p_name, f"{c_path}/{shown_n}")

    def _entry(self, dfd: int, n: str, p_path: bytes, c_path: str) -> None:
        shown = _show(p_path)
        st = os.stat(n, dir_fd=dfd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            sub = os.open(n, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dfd)
            try:
                self._xattrs(sub, shown)
                self._dir(sub, p_path, c_path)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            self._file(dfd, n, shown)
        elif stat.S_ISLNK(st.st_mode):
            self.report.symlinks += 1
            try:
                self.codec.open_target(os.readlink(n, dir_fd=dfd))
            except IntegrityError:
                self.problem(shown, "symlink target does not decrypt")
        elif not (stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
            self.problem(shown, "unexpected file type (device node)")

    def _load(self, fd: int, shown: str, note: str = "") -> ContentFile | None:
        """The file's content engine, or None (and a problem) if its header is bad."""
        try:
            return ContentFile.load(fd, self.vol.keyring())
        except NotARecipient:
            self.report.sealed += 1
            self.not_recipient(shown)
            return None
        except BlockError as e:
            where = "header" if e.block is None else f"block {e.block}"
            self.problem(shown, f"{where}: {e}{note}")
            return None

    def not_recipient(self, shown: str) -> None:
        """A hybrid file this key cannot open (not a problem: the cryptography
        says so; its blocks cannot be checked without a recipient's key)."""

    def _open_file(self, dfd: int, n: str, shown: str, note: str = "") -> int | None:
        """The backing file ``n`` opened for reading, or None (and a problem) if
        it is no longer a regular file: on a live mount a user may replace it
        by a FIFO between the walk's stat and this open, which must not hold
        root's walk forever (O_NONBLOCK), nor lead it anywhere (O_NOFOLLOW)."""
        fd = os.open(n, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
        self.problem(shown, f"replaced by something that is not a file during the walk{note}")
        return None

    def _file(self, dfd: int, n: str, shown: str) -> None:
        self.report.files += 1
        fd = self._open_file(dfd, n, shown)
        if fd is None:
            return
        try:
            cf = self._load(fd, shown)
            if cf is None:
                return
            bad = cf.verify()
            self.report.blocks += -(-max(cf.size, 1) // 4096)
            if bad:
                listed = ", ".join(map(str, bad[:20])) + (" ..." if len(bad) > 20 else "")
                self.problem(shown, f"{len(bad)} damaged block(s): {listed}")
            self._xattrs(fd, shown)
        finally:
            os.close(fd)

    def _xattrs(self, fd: int, shown: str) -> None:
        try:
            names = os.listxattr(fd)
        except OSError:
            return
        for c_name in names:
            if not c_name.startswith("user.cryptfs."):
                continue
            try:
                self.codec.xattr_name_decrypt(c_name)
                self.codec.open_xattr(c_name, os.getxattr(fd, c_name))
            except IntegrityError:
                self.problem(shown, f"extended attribute {c_name[:40]}... does not decrypt")


def check(vol: UnlockedVolume, on_problem: Callable[[Problem], None] | None = None) -> Report:
    return Checker(vol, on_problem).run()
