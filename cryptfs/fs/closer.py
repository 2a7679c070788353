"""Closing the descriptors of forgotten inodes off the request loop.

When the kernel forgets an inode whose backing file was unlinked, closing
our last descriptor of it is what makes the backing file system free the file
(its blocks, its inode): on ext4 that is most of the cost of a delete, and the
request loop has one thread.  A FORGET has no reply, so nothing waits for that
close: a worker thread does it, while the loop answers the next request
(``close`` releases the GIL).  gocryptfs and securefs get the same overlap from
serving on several threads.

Only descriptors nobody uses any more come here: the inode is already out of
the table, no handle is open, and the number is not reused before the close
(the kernel hands the number out again only after it).  On shared storage the
close stays on the loop (a close may commit there: docs/MULTISERVER.md).
"""

from __future__ import annotations

import logging
import os
import queue
import threading

log = logging.getLogger("cryptfs")

# Beyond this many closes waiting, close on the caller's thread: the
# descriptors in flight stay bounded whatever the rate of forgets.
MAX_PENDING = 1024
_STOP = -1


class Closer:
    """A worker thread that closes descriptors handed to it, in order."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def close(self, fd: int) -> None:
        """Close ``fd`` soon, off this thread (or now, if too many wait)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cryptfs-closer", daemon=True)
            self._thread.start()
        if self._q.qsize() >= MAX_PENDING:
            os.close(fd)
            return
        self._q.put(fd)

    def _run(self) -> None:
        while True:
            fd = self._q.get()
            if fd == _STOP:
                return
            try:
                os.close(fd)
            except OSError as e:  # (EIO of a storage that failed: nothing to hand back)
                log.warning("closing a forgotten file's descriptor: %s", os.strerror(e.errno or 0))

    def drain(self) -> None:
        """Every descriptor handed over is closed when this returns."""
        if self._thread is not None:
            self._q.put(_STOP)
            self._thread.join()
            self._thread = None
