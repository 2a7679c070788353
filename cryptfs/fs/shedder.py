"""Keeping the descriptors the mount holds below its limit.

Each inode the kernel remembers holds a descriptor of its backing entry
(cryptfs.fs.core), and the kernel forgets an inode only when it evicts it,
which it does under memory pressure, not for want of descriptors.  So a walk
over more files than the daemon's descriptor limit (20,000 in some containers,
524,288 under systemd) made every later lookup fail with EMFILE, for every
user of the mount, until the kernel let go: any user could stop a shared mount
by making and listing that many files.

Past a high-water mark (half the limit) the oldest inodes that no open file
uses are handed back.  With a kernel of protocol 7.45 or later (Linux 6.16),
one FUSE_NOTIFY_PRUNE names them all: the kernel drops the dentries of theirs
that nothing uses, evicts the inodes, and the FORGETs that follow close the
descriptors (cryptfs.fs.closer).  An older kernel gets a
FUSE_NOTIFY_INVAL_ENTRY per name instead, each name found from the inode's
descriptor (its backing path, decrypted); directories are left out of that
one: dropping a directory the kernel is listing cuts the names it goes on
listing off from their parent, where no notification reaches them.  Down to
a quarter of the limit, at most, per round: the other quarter is the margin
for the inodes a fast walk makes while the kernel lets go of the old ones.
Past the high-water mark a directory listing gives names without a lookup
(cryptfs.fs.dirs), and the last descriptors are never used for inodes at all
(:attr:`Shedder.cap`: a lookup then fails with EMFILE until the kernel has let
go), so handles and this thread always find one.

A name still in use (an open file, a process's working directory) stays;
nothing else changes for the user but a lookup the next time a name is used.

A thread of its own sends the notifications: the kernel takes the directory's
lock for an inval_entry, and a request on that directory may hold it until
the request loop answers.  The thread reads the inode table without the loop's
help: a descriptor closed and its number reused meanwhile only drops another
name from the cache, which is harmless.
"""

from __future__ import annotations

import logging
import os
import resource
import stat
import threading
import time
from collections.abc import Callable, Iterable

from cryptfs import tree
from cryptfs.fs.inodes import Inode
from cryptfs.modes import IntegrityError
from cryptfs.names import NameCodec
from cryptfs.tree import proc_path

log = logging.getLogger("cryptfs")

#: Descriptors the process keeps for itself, beyond the inodes (the device, logs,
#: sockets, open handles of its own, threads' work).
RESERVED = 256
PAUSE = 0.02  # seconds between two rounds
PRUNE_BATCH = 512  # node ids per FUSE_NOTIFY_PRUNE
RETRY = 0.5  # seconds between two requests to forget an inode still wanted gone


def descriptor_limit() -> int:
    """The descriptors this process may hold (its soft RLIMIT_NOFILE)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Shedder:
    """Asks the kernel to forget old, unused inodes when there are too many.

    ``inodes`` is the mount's table (number -> Inode), ``root`` the root's
    number, ``fuse_ino`` what the mount numbers a backing inode, ``codec`` the
    mount's name codec of the moment; ``invalidate_entry`` is its session's
    notify_inval_entry, set once the session exists."""

    def __init__(self, inodes: dict[int, Inode], root: int, fuse_ino: Callable[[int], int],
                 codec: Callable[[], NameCodec], limit: int | None = None) -> None:
        limit = descriptor_limit() if limit is None else limit
        usable = max(limit - RESERVED, 64)
        self.cap = usable  # (inodes beyond it fail with EMFILE: the rest is the reserve)
        self.high = usable // 2
        self.low = usable // 4
        self._inodes = inodes
        self._root = root
        self._fuse_ino = fuse_ino
        self._codec = codec
        self.invalidate_entry: Callable[[int, bytes], object] | None = None
        self.prune: Callable[[list[int]], bool | None] | None = None  # (None: not known)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._wanted: set[int] = set()  # inodes to be forgotten soon (forget_soon)
        self._lock = threading.Lock()  # (for _wanted: the loop adds, this thread prunes)
        self.rounds = 0  # (how often it ran, and how many names it handed back)
        self.sent = 0

    def note(self, count: int) -> None:
        """The table holds ``count`` inodes now: past the high-water mark, wake
        the thread (cheap enough for every new inode)."""
        if count > self.high and self.invalidate_entry is not None:
            self._start()

    def forget_soon(self, ino: int) -> None:
        """Have the kernel forget inode ``ino`` as soon as nothing uses it (its
        cached attributes are wrong and it keeps them: a size under the
        writeback cache), so that the next lookup starts afresh.  Asked again
        every RETRY seconds while the inode is in the table, marked
        ``wrong_size``."""
        if self.invalidate_entry is not None:
            with self._lock:
                self._wanted.add(ino)
            self._start()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cryptfs-shedder",
                                            daemon=True)
            self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(RETRY if self._wanted else None)
            self._wake.clear()
            try:
                self._forget_wanted()
                self.shed()
            except Exception:  # (a bug must not end the thread: the next round tries again)
                log.exception("handing old inodes back to the kernel failed")
            # (the FORGETs come after the notifications: a round at once would
            # ask again for the inodes the kernel is letting go of)
            time.sleep(PAUSE)

    def shed(self) -> int:
        """One round: ask the kernel to forget the oldest unused inodes, down to
        the low-water mark; the number of names handed back."""
        table = list(self._inodes.values())  # (a snapshot: the loop goes on changing it)
        excess = len(table) - self.low
        if excess <= 0 or self.invalidate_entry is None:
            return 0
        # (by names, directories are left out: pick among the rest)
        sent = self._hand_back(self._oldest_unused(table, excess, dirs=self.prune is not None))
        self.rounds += 1
        self.sent += sent
        log.log(logging.INFO if self.rounds == 1 else logging.DEBUG,
                "descriptors: %d inodes held (high-water mark %d): asked the kernel to forget "
                "%d of the oldest unused%s", len(table), self.high, sent,
                "" if self.rounds > 1 else " (said once: the next rounds are logged at debug level)")
        return sent

    def _forget_wanted(self) -> None:
        """Ask again for each inode still wanted gone: while a process holds it
        (open, mapped, a working directory, a watch), the kernel cannot let go,
        and asking once would leave it be for good."""
        with self._lock:
            self._wanted = {i for i in self._wanted
                            if (inode := self._inodes.get(i)) is not None and inode.wrong_size}
            wanted = sorted(self._wanted)
        if not wanted:
            return
        time.sleep(PAUSE)  # (the request that asked is answered first: then nothing uses it)
        self._hand_back([inode for i in wanted if (inode := self._inodes.get(i)) is not None])

    def _hand_back(self, inodes: list[Inode]) -> int:
        """Ask the kernel to forget these inodes: by node id (prune), or on a
        kernel before 7.45 by one name each, directories left out (see the
        module); how many were asked for."""
        if self.prune is not None:
            ids = [inode.ino for inode in inodes]
            for at in range(0, len(ids), PRUNE_BATCH):
                if self.prune(ids[at:at + PRUNE_BATCH]) is None:
                    self.prune = None  # (a kernel before 7.45: names, one by one)
                    break
            else:
                return len(ids)
        sent = 0
        for inode in inodes:
            if inode.kind == stat.S_IFDIR or self.invalidate_entry is None:
                continue
            entry = self._entry_of(inode)
            if entry is not None and self.invalidate_entry(*entry):
                sent += 1
        return sent

    def _oldest_unused(self, table: Iterable[Inode], n: int, dirs: bool) -> list[Inode]:
        out = []
        for inode in table:  # (insertion order: the oldest first)
            if (inode.ino != self._root and not inode.handles and inode.nlookup > 0
                    and (dirs or inode.kind != stat.S_IFDIR)):
                out.append(inode)
                if len(out) >= n:
                    break
        return out

    def _entry_of(self, inode: Inode) -> tuple[int, bytes] | None:
        """(parent inode number, plaintext name) of one name of ``inode``; None
        if it cannot be worked out (removed, or renamed away meanwhile).  It
        opens nothing when it can: the process is short of descriptors."""
        try:
            real = os.readlink(proc_path(inode.fd))
            parent_path, backing = os.path.split(real)
            parent_no = self._fuse_ino(os.stat(parent_path).st_ino)
        except OSError:
            return None
        parent = self._inodes.get(parent_no)
        diriv = parent.diriv if parent is not None else None
        try:
            if diriv is not None and not backing.startswith(tree.LONG_PREFIX):
                return parent_no, self._codec().decrypt(backing, diriv)
            dfd = os.open(parent_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                return parent_no, tree.decrypt_entry(dfd, backing, tree.read_diriv(dfd),
                                                     self._codec())
            finally:
                os.close(dfd)
        except (OSError, IntegrityError):
            return None
