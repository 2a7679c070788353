"""One FUSE connection: INIT negotiation, the request loop, replies, notifications.

The loop::

    readv(/dev/fuse, [one preallocated buffer])     one request per read
    decode -> typed request                         requests.py
    handler = filesystem.<opcode name>              e.g. fs.getattr(req) -> AttrOut
    writev(/dev/fuse, [out_header, reply bytes])    one write per reply, from any thread

The filesystem is any object with methods named after the opcodes in lower case
(``lookup``, ``getattr``, ``readdirplus``, ``fallocate`` ...), each taking the typed
request and returning the typed reply listed in :data:`ENCODERS`.  A missing method
answers ENOSYS, except: ``lookup`` -> ENOENT; ``forget``/``batch_forget`` -> nothing
(they get no reply); ``open``/``opendir`` -> handle 0 and ``release``/``releasedir`` ->
success, because the kernel *remembers* an ENOSYS to OPEN and stops sending OPEN for
the whole mount, a decision this layer must never take by accident.  The kernel also
remembers ENOSYS for FLUSH, FSYNC, FSYNCDIR, the four xattr ops (all xattrs then fail),
ACCESS, CREATE (it falls back to MKNOD+OPEN), FALLOCATE, LSEEK, COPY_FILE_RANGE, POLL,
BMAP, IOCTL, RENAME2, SYNCFS, TMPFILE, STATX, the lock ops and INTERRUPT: a handler that
raises FuseError(ENOSYS) there switches the operation off until unmount.  STATX always
gets ENOSYS here (the kernel then uses GETATTR).

Errors: a handler raises FuseError(errno) or OSError -> ``-errno``; any other exception
-> EIO and one log line (opcode, exception type, file:line; never arguments), and the
loop goes on.  A malformed request -> EINVAL.

Deferred replies: a handler returns ``session.defer(req)`` and answers later from any
thread with ``.reply(result)`` or ``.fail(errno)``.  While it is pending, an INTERRUPT for
it sets ``.interrupted`` and calls the callback given to ``.on_interrupt`` (from the loop
thread); the handler then typically answers ``fail(EINTR)``.  A request answered inline
cannot be interrupted (the single loop reads the INTERRUPT only after answering it), so
INTERRUPTs for unknown uniques are ignored, as fuse.h allows.

The end: ENODEV from read (the mount is gone) or DESTROY ends ``serve``.  To stop a
mounted daemon, ``request_unmount`` unmounts from a helper thread (unmounting from the
loop thread could wait on a flush that only the loop can answer).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import struct
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptfs.fuse import abi, mountpoint, replies
from cryptfs.fuse.errors import FuseError, MalformedRequest
from cryptfs.fuse.requests import OPS, OPS_SETXATTR_EXT, InitIn, Request, UnknownOpcode, decode, peek_header

log = logging.getLogger("cryptfs.fuse")

_OUT = abi.OUT_HEADER.st
_OUT_SIZE = abi.OUT_HEADER.size
_NO_REPLY = frozenset((abi.FORGET, abi.BATCH_FORGET, abi.INTERRUPT, abi.NOTIFY_REPLY))

#: How long the loop polls for the next request before it sleeps (``serve_trio``).
#: A program working through files sends its next request within tens of
#: microseconds of the last reply; if the daemon's CPU went idle meanwhile, waking
#: it costs more than serving the request (on a virtual machine an idle CPU halts,
#: and waking it takes an interrupt through the host).  Polling keeps that CPU
#: awake while requests keep coming, as go-fuse's goroutines do by spinning
#: before they park.  docs/FUSE.md has the measurements.
POLL_NS = 200_000


@dataclass
class InitOptions:
    """What the filesystem asks of the kernel at INIT (docs/FUSE.md says what each saves)."""

    max_write: int = 1 << 20          # bytes per WRITE (needs FUSE_MAX_PAGES; capped by the kernel)
    max_readahead: int = 1 << 20
    max_background: int = 64          # async requests (readahead, writeback) in flight
    congestion_threshold: int = 48
    async_read: bool = True
    writeback_cache: bool = False     # kernel caches writes; the fs must accept READ on O_WRONLY
    readdirplus: str = "auto"         # "auto" | "always" | "off" (only if fs has readdirplus)
    parallel_dirops: bool = True
    handle_killpriv_v2: bool = True   # the fs clears suid/sgid itself; no security.capability GETXATTR
    cache_symlinks: bool = True
    atomic_o_trunc: bool = True
    auto_inval_data: bool = True
    direct_io_allow_mmap: bool = True  # 7.39: MAP_SHARED on FOPEN_DIRECT_IO files
    time_gran: int = 1                # ns


@dataclass
class Connection:
    """What INIT settled."""

    minor: int
    kernel_flags: int
    flags: int
    max_write: int
    max_readahead: int


# --- reply encoders: (request, handler result) -> bytes after fuse_out_header --------------
def _obj(req: Any, res: Any) -> bytes:
    return res.pack()  # type: ignore[no-any-return]


def _none(req: Any, res: Any) -> bytes:
    return b""


def _data(req: Any, res: Any) -> bytes:
    if len(res) > req.size:
        raise FuseError(errno.EIO)
    return res  # type: ignore[no-any-return]


def _readlink(req: Any, res: bytes) -> bytes:
    return res


def _write_out(req: Any, res: int) -> bytes:
    return abi.WRITE_OUT.st.pack(res, 0)


def _u64(req: Any, res: int) -> bytes:
    return abi.LSEEK_OUT.st.pack(res)


def _poll(req: Any, res: int) -> bytes:
    return abi.POLL_OUT.st.pack(res, 0)


def _xattr(req: Any, res: bytes) -> bytes:
    if req.size == 0:
        return abi.GETXATTR_OUT.st.pack(len(res), 0)
    if len(res) > req.size:
        raise FuseError(errno.ERANGE)
    return res


def _listxattr(req: Any, res: list[bytes]) -> bytes:
    return _xattr(req, b"".join(name + b"\0" for name in res))


ENCODERS: dict[int, Callable[[Any, Any], bytes]] = {
    abi.LOOKUP: _obj, abi.GETATTR: _obj, abi.SETATTR: _obj, abi.READLINK: _readlink,
    abi.SYMLINK: _obj, abi.MKNOD: _obj, abi.MKDIR: _obj, abi.UNLINK: _none, abi.RMDIR: _none,
    abi.RENAME: _none, abi.LINK: _obj, abi.OPEN: _obj, abi.READ: _data, abi.WRITE: _write_out,
    abi.STATFS: _obj, abi.RELEASE: _none, abi.FSYNC: _none, abi.SETXATTR: _none,
    abi.GETXATTR: _xattr, abi.LISTXATTR: _listxattr, abi.REMOVEXATTR: _none, abi.FLUSH: _none,
    abi.OPENDIR: _obj, abi.READDIR: _obj, abi.RELEASEDIR: _none, abi.FSYNCDIR: _none,
    abi.GETLK: _obj, abi.SETLK: _none, abi.SETLKW: _none, abi.ACCESS: _none, abi.CREATE: _obj,
    abi.BMAP: _u64, abi.IOCTL: _obj, abi.POLL: _poll, abi.FALLOCATE: _none,
    abi.READDIRPLUS: _obj, abi.RENAME2: _none, abi.LSEEK: _u64, abi.COPY_FILE_RANGE: _write_out,
    abi.SYNCFS: _none, abi.TMPFILE: _obj,
}


def _default_lookup(req: Request) -> Any:
    raise FuseError(errno.ENOENT)


def _default_open(req: Request) -> replies.OpenOut:
    return replies.OpenOut(0, 0)


def _default_ok(req: Request) -> None:
    return None


def _enosys(req: Request) -> Any:
    raise FuseError(errno.ENOSYS)


_DEFAULTS: dict[int, Callable[[Any], Any]] = {
    abi.LOOKUP: _default_lookup, abi.OPEN: _default_open, abi.OPENDIR: _default_open,
    abi.RELEASE: _default_ok, abi.RELEASEDIR: _default_ok,
}


class Deferred:
    """A reply given later, from any thread, exactly once."""

    __slots__ = ("_session", "req", "_lock", "_done", "interrupted", "_on_interrupt")

    def __init__(self, session: Session, req: Request) -> None:
        self._session = session
        self.req = req
        self._lock = threading.Lock()
        self._done = False
        self.interrupted = False
        self._on_interrupt: Callable[[], None] | None = None

    def on_interrupt(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._on_interrupt = callback
            fire = self.interrupted
        if fire:
            callback()

    def _interrupt(self) -> None:
        with self._lock:
            self.interrupted = True
            callback = self._on_interrupt
        if callback is not None:
            callback()

    def _finish(self) -> bool:
        with self._lock:
            if self._done:
                return False
            self._done = True
        self._session._inflight.pop(self.req.unique, None)
        return True

    def reply(self, result: Any) -> None:
        if not self._finish():
            return
        try:
            body = ENCODERS[self.req.opcode](self.req, result)
        except FuseError as e:
            self._session._send(self.req.unique, -e.errno, b"")
            return
        except Exception as e:  # a reply of the wrong type: EIO, never a caller left waiting
            log.error("fuse: deferred %s reply failed with %s", abi.OPCODE_NAMES[self.req.opcode],
                      type(e).__name__)
            self._session._send(self.req.unique, -errno.EIO, b"")
            return
        self._session._send(self.req.unique, 0, body)

    def fail(self, err: int) -> None:
        if self._finish():
            self._session._send(self.req.unique, -err, b"")


class Session:
    """Serve ``fs`` on ``mountpoint`` over one /dev/fuse descriptor."""

    def __init__(self, fs: object, mountpoint_: str, options: InitOptions | None = None,
                 fsname: str = "cryptfs", subtype: str = "cryptfs", allow_other: bool = False,
                 default_permissions: bool = False, mount_options: Sequence[str] = (),
                 poll_ns: int = POLL_NS) -> None:
        self.fs = fs
        self.mountpoint = os.path.abspath(mountpoint_)
        self.options = options or InitOptions()
        self.fsname, self.subtype = fsname, subtype
        self.allow_other, self.default_permissions = allow_other, default_permissions
        self.mount_options = tuple(mount_options)
        self.fd = -1
        self.conn: Connection | None = None
        self._inflight: dict[int, Deferred] = {}
        self._ops = OPS
        # One buffer for every read: big enough for the largest WRITE and SETXATTR.
        self._buf = bytearray(max(self.options.max_write, 65536 + 4096) + 4096)
        self._table: list[tuple[Callable[[Any], Any], Callable[[Any, Any], bytes]] | None] = \
            [None] * (max(abi.OPCODE_NAMES) + 1)
        for opcode, enc in ENCODERS.items():
            handler = getattr(fs, abi.OPCODE_NAMES[opcode], None) or _DEFAULTS.get(opcode, _enosys)
            self._table[opcode] = (handler, enc)
        self._ended = False
        self.poll_ns = poll_ns
        self.polled = 0   # requests the loop found by polling (serve_trio)
        self.missed = 0   # polls that ran out
        self.sleeps = 0   # times it slept for want of a request (serve_trio)
        # Requests served, by opcode, and the loop's time in each kind (decode,
        # handler, reply: two clock reads and two list indexes per request, cheap
        # enough to keep always; the mount logs both at unmount).
        self.counts = [0] * len(self._table)
        self.busy_ns = [0] * len(self._table)

    def served(self) -> dict[str, int]:
        """Requests decoded so far, by opcode name (most first)."""
        named = {abi.OPCODE_NAMES.get(op, str(op)): n for op, n in enumerate(self.counts) if n}
        return dict(sorted(named.items(), key=lambda kv: -kv[1]))

    def busy(self) -> dict[str, tuple[float, float]]:
        """By opcode name: (microseconds per request, share of all the loop's time in
        requests), the largest share first.  The time runs from the request's first
        byte decoded to its reply written (a deferred request: until it deferred)."""
        total = sum(self.busy_ns) or 1
        named = {abi.OPCODE_NAMES.get(op, str(op)): (ns / n / 1000, ns / total)
                 for op, (n, ns) in enumerate(zip(self.counts, self.busy_ns, strict=True)) if n}
        return dict(sorted(named.items(), key=lambda kv: -kv[1][1]))

    # --- mount / unmount ------------------------------------------------------------------
    def mount(self) -> None:
        self.fd = mountpoint.mount(self.mountpoint, self.fsname, self.subtype,
                                   self.allow_other, self.default_permissions,
                                   self.mount_options)

    def unmount(self) -> bool:
        """Unmount (lazily if busy); True if the mount point is free afterwards."""
        return mountpoint.unmount_quietly(self.mountpoint)

    def request_unmount(self) -> threading.Thread:
        """Unmount from a helper thread; ``serve`` then ends with ENODEV."""
        t = threading.Thread(target=self._unmount_logged, name="fuse-unmount", daemon=True)
        t.start()
        return t

    def _unmount_logged(self) -> None:
        try:
            if not self.unmount():
                log.error("fuse: %s is still mounted after unmount", self.fsname)
        except OSError as e:
            log.error("fuse: unmount failed: %s", os.strerror(e.errno or errno.EIO))

    def install_signal_handlers(self) -> None:
        """SIGTERM, SIGINT and SIGHUP unmount cleanly (call from the main thread)."""
        def handler(signum: int, frame: object) -> None:
            self.request_unmount()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, handler)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- the loop -------------------------------------------------------------------------
    async def serve_trio(self, batch: int = 64) -> None:
        """``serve`` as a trio task: the descriptor is non-blocking, requests are
        read and answered until EAGAIN, then the task waits for the descriptor to
        become readable.  Handlers run on the trio thread, so they share it with
        the program's other trio tasks without locks; every ``batch`` requests
        the task yields once, so a steady stream of requests never starves them.

        Before it sleeps, the loop polls for the next request for up to
        ``poll_ns`` (:data:`POLL_NS`; 0: never), as long as the last idle gap was
        that short: waking a sleeping CPU costs more than the whole request."""
        import trio

        bufs = [self._buf]
        fd = self.fd
        readv = os.readv
        budget = self.poll_ns
        clock = time.monotonic_ns
        os.set_blocking(fd, False)
        served = 0
        poll_next = budget > 0
        idle_since = 0
        while not self._ended:
            try:
                try:
                    n = readv(fd, bufs)
                except BlockingIOError:
                    idle_since = clock()
                    n = self._poll(bufs, idle_since + budget) if poll_next else -1
                    if poll_next:
                        self.polled += n > 0
                        self.missed += n < 0
            except OSError as e:
                if e.errno == errno.ENODEV:
                    break
                if e.errno in (errno.EINTR, errno.ENOENT):
                    continue
                raise
            if n < 0:  # nothing came: sleep until the kernel has a request
                served = 0
                self.sleeps += 1
                await trio.lowlevel.wait_readable(fd)
                # Poll next time only if this gap was short after all: a client that
                # pauses longer than the budget is not polled for in vain again and again.
                poll_next = budget > 0 and clock() - idle_since < budget
                continue
            if n == 0:
                break
            self.handle(n)
            served += 1
            if served >= batch:
                served = 0
                await trio.lowlevel.checkpoint()

    def _poll(self, bufs: list[bytearray], until_ns: int) -> int:
        """readv until a request comes (its length) or the clock reaches ``until_ns``
        (-1).  Each miss yields the CPU first, so that a client waiting to run on
        this CPU goes before the poll."""
        fd = self.fd
        readv = os.readv
        yield_cpu = os.sched_yield
        clock = time.monotonic_ns
        while clock() < until_ns:
            yield_cpu()
            try:
                return readv(fd, bufs)
            except BlockingIOError:
                pass
        return -1

    def serve(self) -> None:
        """Answer requests until the mount goes away (ENODEV) or DESTROY."""
        buf = self._buf
        fd = self.fd
        readv = os.readv
        while not self._ended:
            try:
                n = readv(fd, [buf])
            except OSError as e:
                if e.errno == errno.ENODEV:
                    break
                if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                raise
            if n == 0:  # never from /dev/fuse; the other end of a test socket closed
                break
            self.handle(n)

    def handle(self, n: int) -> None:
        """Decode and answer the request in the first ``n`` bytes of the buffer, and
        add the time it took to its opcode's (0: a request that did not decode)."""
        t0 = time.monotonic_ns()
        opcode = self._answer(n)
        self.busy_ns[opcode] += time.monotonic_ns() - t0

    def _answer(self, n: int) -> int:
        """``handle`` without the clock; the opcode decoded (0: none)."""
        try:
            req = decode(self._buf, n, self._ops)
        except UnknownOpcode as e:
            log.warning("fuse: unknown opcode %d", e.opcode)
            self._send(e.unique, -errno.ENOSYS, b"")
            return 0
        except MalformedRequest as e:
            log.warning("fuse: %s", e)
            head = peek_header(self._buf, n)
            if head is not None and head[0] not in _NO_REPLY:
                self._send(head[1], -errno.EINVAL, b"")
            return 0
        opcode = req.opcode
        self.counts[opcode] += 1
        entry = self._table[opcode]
        if entry is None:
            self._special(req)
            return opcode
        handler, encode = entry
        try:
            result = handler(req)
            if result.__class__ is Deferred:
                return opcode  # registered by defer(); answered from elsewhere
            body = encode(req, result)
        except FuseError as e:
            self._fail(req.unique, e.errno)
            return opcode
        except OSError as e:
            self._fail(req.unique, e.errno or errno.EIO)
            return opcode
        except Exception as e:  # the _edge rule: nothing but an errno leaves a handler
            frame = traceback.extract_tb(e.__traceback__)[-1]
            log.error("fuse: %s failed with %s at %s:%d", abi.OPCODE_NAMES[opcode],
                      type(e).__name__, os.path.basename(frame.filename), frame.lineno or 0)
            self._fail(req.unique, errno.EIO)
            return opcode
        self._send(req.unique, 0, body)
        return opcode

    def _fail(self, unique: int, err: int) -> None:
        # A handler that deferred and then raised: the error is the one answer.
        if self._inflight and (later := self._inflight.get(unique)) is not None:
            if not later._finish():
                return
        self._send(unique, -err, b"")

    def _special(self, req: Request) -> None:
        op = req.opcode
        if op == abi.INIT:
            self._init(req)  # type: ignore[arg-type]
        elif op in (abi.FORGET, abi.BATCH_FORGET):
            handler = getattr(self.fs, abi.OPCODE_NAMES[op], None)
            if handler is not None:
                try:
                    handler(req)
                except Exception as e:
                    log.error("fuse: %s failed with %s", abi.OPCODE_NAMES[op], type(e).__name__)
        elif op == abi.INTERRUPT:
            pending = self._inflight.get(req.target)  # type: ignore[attr-defined]
            if pending is not None:
                try:
                    pending._interrupt()
                except Exception as e:
                    log.error("fuse: interrupt callback failed with %s", type(e).__name__)
        elif op == abi.DESTROY:
            destroy = getattr(self.fs, "destroy", None)
            if destroy is not None:
                try:
                    destroy(req)
                except Exception as e:
                    log.error("fuse: destroy failed with %s", type(e).__name__)
            self._send(req.unique, 0, b"")
            self._ended = True
        elif op == abi.NOTIFY_REPLY:
            pass  # retrieve is never asked for
        else:  # STATX, SETUPMAPPING, REMOVEMAPPING
            self._send(req.unique, -errno.ENOSYS, b"")

    def _init(self, req: InitIn) -> None:
        o = self.options
        if req.major != abi.KERNEL_VERSION or req.minor < abi.MIN_KERNEL_MINOR:
            log.error("fuse: kernel protocol %d.%d is not supported", req.major, req.minor)
            self._send(req.unique, -errno.EPROTO, b"")
            self._ended = True
            return
        want = abi.BIG_WRITES | abi.MAX_PAGES
        for flag, on in ((abi.ASYNC_READ, o.async_read), (abi.WRITEBACK_CACHE, o.writeback_cache),
                         (abi.PARALLEL_DIROPS, o.parallel_dirops),
                         (abi.HANDLE_KILLPRIV_V2, o.handle_killpriv_v2),
                         (abi.CACHE_SYMLINKS, o.cache_symlinks), (abi.ATOMIC_O_TRUNC, o.atomic_o_trunc),
                         (abi.AUTO_INVAL_DATA, o.auto_inval_data),
                         (abi.DIRECT_IO_ALLOW_MMAP, o.direct_io_allow_mmap)):
            if on:
                want |= flag
        if o.readdirplus != "off" and hasattr(self.fs, "readdirplus"):
            want |= abi.DO_READDIRPLUS | (abi.READDIRPLUS_AUTO if o.readdirplus == "auto" else 0)
        flags = want & req.flags
        if flags >> 32:
            flags |= abi.INIT_EXT
        page = os.sysconf("SC_PAGE_SIZE")
        try:
            with open("/proc/sys/fs/fuse/max_pages_limit") as f:
                pages_limit = int(f.read())
        except (OSError, ValueError):
            pages_limit = 256
        max_write = max(4096, min(o.max_write, pages_limit * page, len(self._buf) - 4096))
        max_pages = (max_write + page - 1) // page
        readahead = min(o.max_readahead, req.max_readahead)
        minor = min(req.minor, abi.KERNEL_MINOR_VERSION)
        self.conn = Connection(minor, req.flags, flags, max_write, readahead)
        self._ops = OPS_SETXATTR_EXT if flags & abi.SETXATTR_EXT else OPS
        body = abi.INIT_OUT.st.pack(abi.KERNEL_VERSION, minor, readahead, flags & 0xFFFFFFFF,
                                    o.max_background, o.congestion_threshold, max_write,
                                    o.time_gran, max_pages, 0, flags >> 32, 0, *([0] * 6))
        self._send(req.unique, 0, body)

    # --- replies and notifications --------------------------------------------------------
    def defer(self, req: Request) -> Deferred:
        """A reply that a handler gives later (return it from the handler).  It may be
        answered from another thread at once, even before the handler returns."""
        later = Deferred(self, req)
        self._inflight[req.unique] = later
        return later

    def _send(self, unique: int, error: int, body: bytes) -> None:
        try:
            os.writev(self.fd, [_OUT.pack(_OUT_SIZE + len(body), error, unique), body])
        except OSError as e:
            # ENOENT: the kernel no longer waits for this request (aborted or interrupted).
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("fuse: reply failed: %s", os.strerror(e.errno or errno.EIO))

    def _notify(self, code: int, *parts: bytes) -> bool:
        size = _OUT_SIZE + sum(len(p) for p in parts)
        try:
            os.writev(self.fd, [_OUT.pack(size, code, 0), *parts])
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def notify_inval_inode(self, ino: int, off: int = 0, length: int = 0) -> bool:
        """Drop cached attributes of inode ``ino`` and its data from ``off`` (``length`` 0: to
        the end; ``off`` < 0: attributes only).  False if the kernel does not know it."""
        return self._notify(abi.NOTIFY_INVAL_INODE,
                            abi.NOTIFY_INVAL_INODE_OUT.st.pack(ino, off, length))

    def notify_inval_entry(self, parent: int, name: bytes, expire_only: bool = False) -> bool:
        """Drop the cached lookup of ``name`` in directory ``parent``.  Do not call it from a
        handler of a request on ``parent`` itself: the kernel holds that directory's lock."""
        flags = abi.EXPIRE_ONLY if expire_only else 0
        return self._notify(abi.NOTIFY_INVAL_ENTRY,
                            abi.NOTIFY_INVAL_ENTRY_OUT.st.pack(parent, len(name), flags), name, b"\0")

    def notify_prune(self, nodeids: Sequence[int]) -> bool | None:
        """Ask the kernel to drop its unused dentries of these inodes, so that it
        forgets them (FORGETs follow).  Takes no directory lock, unlike
        inval_entry.  None if the kernel does not know the notification (before
        7.45: EINVAL)."""
        try:
            return self._notify(abi.NOTIFY_PRUNE,
                                abi.NOTIFY_PRUNE_OUT.st.pack(len(nodeids), 0, 0),
                                struct.pack(f"={len(nodeids)}Q", *nodeids))
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOSYS):
                return None
            raise

    def notify_delete(self, parent: int, child: int, name: bytes) -> bool:
        """Tell the kernel ``name`` (inode ``child``) left ``parent``."""
        return self._notify(abi.NOTIFY_DELETE,
                            abi.NOTIFY_DELETE_OUT.st.pack(parent, child, len(name), 0), name, b"\0")
