"""Writing the access log: one writer at a time, records, seals; and what a mount records.

:class:`AuditLog` appends records to a log directory (layout and chain:
cryptfs.audit.chain) and seals them; :class:`Auditor` is what a mount or the
key agent records through, failing closed or open.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import pwd
import re
import socket
import stat
import time
from typing import Any, NamedTuple

import orjson

from cryptfs import process
from cryptfs.audit.chain import (
    CHUNK,
    KEY_FILE,
    PUB_NAME,
    SEGMENT_RE,
    ZERO,
    Checkpoint,
    b64,
    canonical,
    evolve,
    fd_data_end,
    is_seq,
    lines_of,
    public_of,
    unb64,
    utf8_text,
    verifier_text,
)
from cryptfs.errors import BackingIOError, UsageError
from cryptfs.modes.rand import random_bytes
from cryptfs.refusals import RefusalLog

log = logging.getLogger("cryptfs")

RESERVE = 64 << 10  # room made sure of before a request acts (a record is far smaller)
LOCK_FILE = "audit.lock"  # flock'ed by the one writer of the moment; holds its pid

# The server a record names (its "server" field): a host name's characters,
# so that it can also be a syslog HOSTNAME and a CSV cell as it is.
SERVER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def check_server(name: str, what: str = "--server") -> str:
    """``name`` if it can name a server in the log (UsageError otherwise)."""
    if not isinstance(name, str) or not SERVER_RE.fullmatch(name):
        raise UsageError(f"unusable server name {name!r} ({what}): 1 to 253 letters, digits, "
                         "'.', '-' or '_', starting with a letter or digit")
    return name


def default_server() -> str:
    """This machine's host name, as the server of records when none was given."""
    name = socket.gethostname()
    try:
        return check_server(name, "the host name")
    except UsageError as e:
        raise UsageError(str(e), hint="name the server: --server NAME") from None


class LogTarget(NamedTuple):
    """The access log a mount writes: where, whether it fails open, and the
    server name its records carry (None: the log's own, else the host name)."""

    logdir: str
    fail_open: bool = False
    server: str | None = None


# -- writing ---------------------------------------------------------------------------------------
def init_log(logdir: str, log_id: str, server: str | None = None) -> str:
    """Create a log directory: the epoch-0 key pair; returns the verifier key text.
    ``server``: the name its records carry unless a writer is given another."""
    if server is not None:
        check_server(server)
    try:
        os.makedirs(logdir, mode=0o700, exist_ok=True)
        if any(n == KEY_FILE or SEGMENT_RE.match(n) for n in os.listdir(logdir)):
            raise UsageError(f"{logdir} already holds an audit log")
    except OSError as e:
        raise BackingIOError(f"{logdir}: {e.strerror}") from None
    seed = random_bytes(32)
    pub = verifier_text(public_of(seed))
    state: dict[str, Any] = {"log": log_id, "epoch": 0, "seed": b64(seed), "segment": 1,
                             "seq": 0, "h": b64(ZERO)}
    if server is not None:
        state["server"] = server
    _write_state(logdir, state)
    replace_file(logdir, PUB_NAME, (pub + "\n").encode(), 0o644)
    return pub


def _write_state(logdir: str, state: dict[str, Any]) -> None:
    # Replaced, not rewritten in place: the old epoch's seed is in no file any
    # more once the rename is on disk (what the filesystem keeps of freed
    # blocks is outside what a file API can erase: docs/AUDIT.md).
    replace_file(logdir, KEY_FILE, (json.dumps(state, sort_keys=True) + "\n").encode(), 0o600)


def replace_file(logdir: str, name: str, data: bytes, mode: int) -> None:
    """Atomically give ``name`` the content ``data``, on disk when this returns."""
    dfd = os.open(logdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        tmp = f".{name}.{random_bytes(6).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     mode, dir_fd=dfd)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(28, "short write")
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp, dir_fd=dfd)
            raise
        os.close(fd)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
    finally:
        os.close(dfd)


def check_log(logdir: str) -> None:
    """Refuse (UsageError) a directory that holds no audit log, and one that
    cannot be read (BackingIOError: not the same advice)."""
    try:
        st = os.stat(os.path.join(logdir, KEY_FILE))
    except (PermissionError, FileNotFoundError, NotADirectoryError) as e:
        if isinstance(e, PermissionError):
            raise BackingIOError(f"cannot read the access log in {logdir}: {e.strerror}") \
                from None
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{logdir} holds no access log",
                         hint=f"create one with: cryptfs audit init {logdir}")


class LogBusy(BackingIOError):
    """Another process is writing the log (a mount, an agent, a command)."""


def _take_lock(logdir: str, wait: float) -> int:
    """The writer's lock (an exclusive flock on LOGDIR/audit.lock), waiting up
    to ``wait`` seconds for another writer to finish."""
    try:
        fd = os.open(os.path.join(logdir, LOCK_FILE),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise BackingIOError(f"cannot open the access log in {logdir}: {e.strerror}") from None
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise LogBusy(f"the access log in {logdir} is being written by another process "
                              f"(pid {holder})",
                              hint="each mount and each key agent needs a log directory of its "
                                   "own") from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class AuditLog:
    """The writer.  Not thread-safe; one process at a time writes a log
    directory (it holds LOGDIR/audit.lock, taken here, for as long as it is open).

    Every record names the server that wrote it (``server``, chained and
    sealed with the rest): the name given here, which the log then keeps
    for later writers; else the one it kept; else this machine's host name."""

    def __init__(self, logdir: str, seal_every: int = 4096, seal_seconds: float = 60.0,
                 segment_bytes: int = 16 << 20, segment_seconds: float = 86400.0,
                 clock: Any = time.time_ns, wait: float = 10.0,
                 server: str | None = None) -> None:
        self.logdir = logdir
        check_log(logdir)
        self._lock = _take_lock(logdir, wait)
        self.seal_every = seal_every
        self.seal_seconds = seal_seconds
        self.segment_bytes = segment_bytes
        self.segment_seconds = segment_seconds
        self.clock = clock
        try:
            with open(os.path.join(logdir, KEY_FILE), encoding="utf-8") as f:
                st = json.load(f)
            self.log_id: str = st["log"]
            self.epoch: int = st["epoch"]
            self._seed = bytearray(unb64(st["seed"]))
            self.segment: int = st["segment"]
            self.seq: int = st["seq"]
            self.h: bytes = unb64(st["h"])
            self._pending: str | None = st.get("pending")  # a checkpoint signed, not yet written
            kept = st.get("server")  # (a name given before, kept for later writers)
            if kept is not None:
                check_server(kept, KEY_FILE)
            if not (isinstance(self.log_id, str) and isinstance(self.epoch, int)
                    and isinstance(self.segment, int) and isinstance(self.seq, int)
                    and self.seq >= 0 and self.segment >= 1 and len(self._seed) == 32
                    and len(self.h) == 32
                    and (self._pending is None or isinstance(self._pending, str))):
                raise ValueError("audit.key holds the wrong types")
        except (OSError, ValueError, KeyError, TypeError, UsageError) as e:
            os.close(self._lock)
            raise UsageError(f"{logdir} is not a usable audit log ({getattr(e, 'strerror', e)})",
                             hint="create one with: cryptfs audit init LOGDIR") from None
        self._server_kept = server is not None or kept is not None
        try:
            self.server: str = check_server(server) if server is not None \
                else kept or default_server()
        except UsageError:
            os.close(self._lock)
            raise
        self._fd = -1
        self._map: mmap.mmap | None = None
        self._seal_failed = False
        self._opened = 0.0
        self._unsealed = 0
        self._last_seal = time.monotonic()
        try:
            self._recover_tail()
            self._open_segment()
        except BaseException:
            if self._fd >= 0:
                os.close(self._fd)
            os.close(self._lock)
            raise

    # The state file is written at each seal; records after it are in the
    # segment it names or in a newer one (a rotation whose state write did
    # not happen): pick the chain up from there, and go on in the newest.
    def _recover_tail(self) -> None:
        newest = max([int(m.group(1)) for n in os.listdir(self.logdir)
                      if (m := SEGMENT_RE.match(n))], default=self.segment)
        for n in range(self.segment, max(newest, self.segment) + 1):
            path = self._segment_path(n)
            if not os.path.exists(path):
                continue
            for obj in lines_of(path):
                if obj.get("seq") == self.seq + 1 and is_seq(obj["seq"]):
                    try:
                        self.seq, self.h = obj["seq"], unb64(obj["h"])
                    except (KeyError, TypeError, ValueError):
                        break  # (a damaged record: verify reports it; the chain goes on from here)
                elif self._pending is not None and obj.get("checkpoint") == self._pending:
                    self._pending = None  # (it was appended; the state just still names it)
        self.segment = max(newest, self.segment)

    def _segment_path(self, n: int) -> str:
        return os.path.join(self.logdir, f"segment-{n:06d}.log")

    def _open_segment(self) -> None:
        """Open the current segment for appending through a shared mapping.

        Space is reserved ahead (``posix_fallocate``, ``CHUNK`` at a time)
        and a record is copied into the mapped pages: in the page cache once
        copied, as with write(2), so it outlives a crash of this process, but
        with no system call and no change of the file's size per record (on
        a busy filesystem, a write(2) per record was half of a record's
        cost).  A full disk shows when space cannot be reserved, before a
        record depends on it.  Until the segment is closed, and cut to its
        length, it ends with the unused rest of the reservation: NUL bytes,
        which readers ignore.
        """
        path = self._segment_path(self.segment)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._map = None
        self._size = fd_data_end(self._fd)
        new = self._size == 0  # (also a segment created by a rotation that went no further)
        self._alloc = os.fstat(self._fd).st_size
        if self._alloc > self._size:  # a crash left reserved space, or a line cut short
            os.pwrite(self._fd, bytes(self._alloc - self._size), self._size)
        self._opened = time.monotonic()
        if new:
            self._append({"segment": self.segment, "log": self.log_id, "prev": b64(self.h),
                          "first_seq": self.seq + 1})

    def _reserve(self, end: int) -> None:
        """Reserve space up to at least ``end`` and map it (OSError, ENOSPC if
        there is no room for it: then nothing was written)."""
        if end > self._alloc:
            want = -(-end // CHUNK) * CHUNK
            try:
                os.posix_fallocate(self._fd, self._alloc, want - self._alloc)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                # Not a whole chunk left: what this line needs, or nothing.
                want = -(-end // mmap.PAGESIZE) * mmap.PAGESIZE
                os.posix_fallocate(self._fd, self._alloc, want - self._alloc)
            self._alloc = want
        if self._map is None:
            self._map = mmap.mmap(self._fd, self._alloc)
        elif len(self._map) < self._alloc:
            self._map.resize(self._alloc)

    def _append(self, obj: dict[str, Any]) -> None:
        self._write_line(canonical(obj) + b"\n")

    def _write_line(self, data: bytes) -> None:
        """One whole line, or nothing (a torn line would break the chain)."""
        if self._fd < 0:
            raise OSError(errno.EBADF, "the access log's segment is not open")
        end = self._size + len(data)
        if self._map is None or end > len(self._map):
            self._reserve(end)
        self._map[self._size:end] = data  # type: ignore[index]
        self._size = end

    def _close_segment(self) -> None:
        """Unmap, cut off the unused reservation, close."""
        try:
            if self._map is not None:
                self._map.close()
                self._map = None
            os.ftruncate(self._fd, self._size)
        finally:
            os.close(self._fd)
            self._fd = -1

    def record(self, **fields: Any) -> dict[str, Any]:
        """Append one record (raises OSError if it cannot be written: the
        caller decides whether the access then goes ahead)."""
        return self.append(fields)

    def append(self, rec: dict[str, Any]) -> dict[str, Any]:
        """:meth:`record` for a record already in a dict (it gets ``seq``,
        ``time_ns`` and ``log``)."""
        if self._pending is not None:
            self._write_pending()
        rec["seq"], rec["time_ns"], rec["log"] = self.seq + 1, self.clock(), self.log_id
        rec["server"] = self.server
        try:
            body = orjson.dumps(rec, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # text that is not UTF-8 (a lone surrogate): its code as \udNNN
            body = orjson.dumps(utf8_text(rec), option=orjson.OPT_SORT_KEYS)
        h = hashlib.sha256(self.h + body).digest()  # = chain(self.h, rec), serialised once
        # The line is the record with "h" added at the end (the verifier parses
        # it and recomputes canonical(record without "h") itself).
        self._write_line(body[:-1] + b',"h":"' + b64(h).encode() + b'"}\n')
        self.seq, self.h = rec["seq"], h
        self._unsealed += 1
        if self._unsealed >= self.seal_every or time.monotonic() - self._last_seal >= self.seal_seconds:
            try:
                self.seal()
            except OSError as e:
                # The record is written; it stays unsealed until a seal can be
                # made (tried again with each record).
                if not self._seal_failed:
                    log.error("ALARM: cannot seal the access log in %s (%s): records stay "
                              "unsealed until it can", self.logdir, e.strerror or e)
                self._seal_failed = True
            else:
                self._seal_failed = False
        return rec

    def tick(self) -> None:
        """Seal if the last seal is ``seal_seconds`` old, new records or not:
        a live log's last seal is never much older than that, so an old one
        means a cut tail (`audit verify --max-age`).  Called by a timer."""
        if time.monotonic() - self._last_seal >= self.seal_seconds:
            self.seal()

    def ready(self) -> None:
        """Make sure the next record has room (OSError if it has none): checked
        before a request acts, so that its record cannot fail after the act."""
        if self._fd < 0:
            raise OSError(errno.EBADF, "the access log's segment is not open")
        if self._alloc - self._size < RESERVE:
            self._reserve(self._size + RESERVE)

    def seal(self) -> None:
        """Sign a checkpoint with this epoch's key, then move to the next epoch.

        The state file takes the next epoch's seed *and* the signed checkpoint
        before the checkpoint is appended: the old seed is gone from disk
        before anything it signed is out, and a checkpoint that could not be
        appended (disk full) is appended by the next attempt or the next
        writer, so an epoch's key never signs twice."""
        if self._pending is not None:
            self._write_pending()
        seed = bytes(self._seed)
        nxt = evolve(seed)
        note = Checkpoint(self.log_id, self.seq, self.h, self.epoch, public_of(nxt),
                          self.clock()).sign(seed)
        self._save_state(self.epoch + 1, nxt, note)  # (raises: nothing changed)
        self.epoch += 1
        for i in range(len(self._seed)):
            self._seed[i] = 0
        self._seed = bytearray(nxt)
        self._pending = note
        self._write_pending()
        self._unsealed = 0
        self._last_seal = time.monotonic()
        # (The state keeps naming the checkpoint as pending: the next writer
        # finds it in the segment.  One state write per seal.)
        if (self._size >= self.segment_bytes
                or time.monotonic() - self._opened >= self.segment_seconds):
            try:
                self._rotate()
            except OSError as e:  # (a new segment is a convenience: go on in this one)
                log.warning("cannot start a new segment of the access log in %s (%s): "
                            "going on in segment %d", self.logdir, e.strerror or e, self.segment)

    def _rotate(self) -> None:
        """Go on in a new segment, once it is open and has its header."""
        old = (self._fd, self._map, self._size, self._alloc, self._opened)
        self.segment += 1
        try:
            self._open_segment()
        except BaseException:
            if self._fd >= 0 and self._fd != old[0]:
                try:
                    if os.fstat(self._fd).st_size == 0:  # (created here, not even a header:
                        os.unlink(self._segment_path(self.segment))  # a follower would wait in it)
                finally:
                    os.close(self._fd)
            self.segment -= 1
            self._fd, self._map, self._size, self._alloc, self._opened = old
            raise
        new = (self._fd, self._map, self._size, self._alloc, self._opened)
        self._fd, self._map, self._size = old[0], old[1], old[2]
        self._close_segment()
        self._fd, self._map, self._size, self._alloc, self._opened = new
        try:
            self._save_state()
        except OSError:
            pass  # (the next writer finds the newest segment itself)

    def _write_pending(self) -> None:
        """Append the signed checkpoint that the state file holds and the
        segment does not (a seal that could not append it)."""
        assert self._pending is not None
        self._append({"checkpoint": self._pending})
        os.fsync(self._fd)
        self._pending = None

    def _save_state(self, epoch: int | None = None, seed: bytes | None = None,
                    pending: str | None = None) -> None:
        state = {"log": self.log_id, "epoch": self.epoch if epoch is None else epoch,
                 "seed": b64(bytes(self._seed) if seed is None else seed),
                 "segment": self.segment, "seq": self.seq, "h": b64(self.h)}
        if pending is not None:
            state["pending"] = pending
        if self._server_kept:
            state["server"] = self.server
        _write_state(self.logdir, state)

    def close(self) -> None:
        """Seal what is unsealed and let go of the log (OSError if the seal
        cannot be written: the records stay, the next writer seals them)."""
        try:
            if self._fd >= 0:
                if self._unsealed:
                    self.seal()
                elif self._pending is not None:
                    self._write_pending()
        finally:
            if self._fd >= 0:
                self._close_segment()
            for i in range(len(self._seed)):
                self._seed[i] = 0
            if self._lock >= 0:
                os.close(self._lock)  # (releases the flock)
                self._lock = -1


# -- what a mount records ----------------------------------------------------------------------------
class Auditor:
    """One record per event of a mount, with who did it and with which program.

    Fail closed (the default): when a record cannot be written (disk full,
    permission), :meth:`write` returns False and the caller refuses the
    access; until a record can be written again, :attr:`broken` is set and
    the mount serves no plaintext at all.  Fail open: the access goes ahead
    and the mount's log raises an alarm.
    """

    RETRY_EVERY = 1.0  # seconds between attempts while broken
    DENIALS_FIRST = 20  # refused requests of one uid and event recorded one by one a minute

    def __init__(self, log: AuditLog, volume_id: str, fail_open: bool = False) -> None:
        self.log = log
        self.volume_id = volume_id
        self.fail_open = fail_open
        self.broken = False
        self._users: dict[int, str] = {}
        self._last_try = 0.0
        # A user (even one with no key slot) who keeps asking for what is refused
        # wrote a record per request (19 MB in 3 s): a full log disk then stops
        # a fail-closed mount for everyone.  So refusals are counted per uid and
        # event beyond the first few of a minute, and summed up in one record.
        self._denials: RefusalLog[tuple[int, str]] = RefusalLog(self.DENIALS_FIRST)

    def user(self, uid: int) -> str:
        name = self._users.get(uid)
        if name is None:
            try:
                name = pwd.getpwuid(uid).pw_name
            except KeyError:
                name = str(uid)
            self._users[uid] = name
        return name

    @staticmethod
    def exe(pid: int) -> str:
        """The requesting process's executable ("" if it cannot be read: pid 0,
        a process already gone, or another namespace).  Read for every record,
        never remembered: a process may exec another program under the same pid."""
        return process.exe(pid) or ""

    def refused(self, event: str, uid: int, pid: int, **fields: Any) -> bool:
        """Record a request refused to ``uid``: one by one up to DENIALS_FIRST a
        minute for that uid and event, then counted (see :meth:`held`).  False
        if it could not be written (the request is refused all the same)."""
        record, ended = self._denials.admit((uid, event))
        if ended is not None:
            self._summary((uid, event), *ended)
        if not record:
            return True
        return self.write(event, "denied", uid, pid, **fields)

    def held(self, everything: bool = False) -> None:
        """One record for each uid and event whose refusals were counted, not
        recorded, in a window that has ended (``everything``: in every window)."""
        for key, count, seconds in self._denials.ended(everything):
            self._summary(key, count, seconds)

    def _summary(self, key: tuple[int, str], count: int, seconds: float) -> None:
        uid, event = key
        self.write("refusals-held", "denied", uid, 0, refused=event, count=count,
                   seconds=round(seconds, 1),
                   reason=f"{count} more refused {event} requests of this user in "
                          f"{seconds:.0f} s, counted, not recorded one by one")

    def write(self, event: str, outcome: str, uid: int, pid: int, **fields: Any) -> bool:
        """Record an event; False if it could not be written and the access
        must be refused (fail closed)."""
        if "exe" not in fields:
            fields["exe"] = self.exe(pid)
        if "volume" not in fields:  # (the agent's records name theirs)
            fields["volume"] = self.volume_id
        fields["event"], fields["outcome"], fields["uid"], fields["pid"] = event, outcome, uid, pid
        fields["user"] = self._users.get(uid) or self.user(uid)
        try:
            self.log.append(fields)
        except Exception as e:  # (an OSError, or a bug: either way, no record)
            if not isinstance(e, OSError):
                log.exception("cannot make a record of %s", event)
            return self._failed(e)
        if self.broken:
            self.broken = False
            log.warning("the access log can be written again")
        return True

    def _failed(self, e: Exception) -> bool:
        if not self.broken:
            log.error("ALARM: cannot write the access log (%s): %s",
                      getattr(e, "strerror", None) or e,
                      "continuing without it (fail-open)" if self.fail_open
                      else "no access is served until it can be written")
        self.broken = True
        self._last_try = time.monotonic()
        return self.fail_open

    def tick(self) -> None:
        """The timer's seal (see :meth:`AuditLog.tick`), after the sums of
        refusals whose minute ended; a failure raises the alarm."""
        self.held()
        try:
            self.log.tick()
        except OSError as e:
            log.error("ALARM: cannot seal the access log (%s)", e.strerror or e)

    def seal_now(self) -> None:
        try:
            self.log.seal()
        except OSError as e:
            log.error("ALARM: cannot seal the access log (%s)", e.strerror or e)

    async def sealer(self, *_: Any) -> None:
        """A task for a trio nursery: :meth:`tick` every few seconds."""
        import trio

        self.seal_now()  # (a live log has a seal from its start: verify --max-age)
        while True:
            await trio.sleep(min(10.0, self.log.seal_seconds / 4))
            self.tick()

    def usable(self) -> bool:
        """Whether a request may be served now: the log has room for its
        record, or it is fail-open.  While broken, it tries again at most
        once a second."""
        if not self.broken:
            try:
                self.log.ready()  # (room for this request's record, before it acts)
                return True
            except OSError as e:
                return self._failed(e)
        if time.monotonic() - self._last_try < self.RETRY_EVERY:
            return self.fail_open
        try:
            self.log.ready()
        except OSError:
            self._last_try = time.monotonic()
            return self.fail_open
        return self.write("log-resumed", "allowed", os.geteuid(), 0) or self.fail_open

    def close(self) -> None:
        self.held(everything=True)
        try:
            self.log.close()
        except OSError:
            pass
