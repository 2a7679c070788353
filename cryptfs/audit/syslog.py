"""The access log to a syslog collector: RFC 5424 messages over TCP (RFC 6587).

One record is one message::

    <PRI>1 TIMESTAMP HOSTNAME cryptfs PROCID MSGID [meta sequenceId="N"][cryptfs@PEN k="v" ...] MSG

- PRI = facility * 8 + severity (:func:`severity`); TIMESTAMP = the record's
  ``time_ns``, UTC, to the microsecond; PROCID = the requesting process's
  pid; MSGID = the event.
- ``meta sequenceId`` (RFC 5424 §7.3.1) is the record's ``seq`` (after
  2147483647 it starts again at 1, as the RFC says; the SD-PARAM ``seq``
  keeps the full number).  A collector drops a message whose ``seq`` it has
  already stored: that is how the duplicates that at-least-once delivery
  may bring are removed.
- The private SD-ELEMENT holds every field of the record, PARAM-VALUEs
  escaped as RFC 5424 §6.3.3 says (``\\`` ``"`` ``]`` get a backslash).
- MSG is the record itself as JSON, keys sorted, no spaces, and every
  non-ASCII character as a ``\\uXXXX`` escape.  So it is pure ASCII: a valid
  MSG-ANY that needs no BOM and that no receiver's 8-bit or control-character
  handling can change, and parsing it gives back exactly the record the log
  holds (``h`` included: the chain can be checked at the collector).

Framing is octet counting (RFC 6587 §3.4.1): ``LEN SP MSG``, LEN in decimal.

TCP has no acknowledgement a sender can see per message.  The forwarder
counts a record delivered once the collector's TCP stack has acknowledged
its last byte (``SIOCOUTQ``: the bytes sent but not acknowledged), and, when
it stops, once the collector has read to the end of the stream and closed
its side.  It resends what was not acknowledged after a reconnect, so a
record may arrive twice, never not at all while the collector keeps what
its kernel acknowledged (a collector that crashes loses what it had
buffered: its ``sequenceId`` values then show the gap).
"""

from __future__ import annotations

import collections
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import select
import socket
import stat
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptfs.audit.export import follow, records
from cryptfs.audit.writer import check_log, replace_file
from cryptfs.errors import BackingIOError, CryptfsError, DamageFound, UsageError

log = logging.getLogger("cryptfs.forward")

APP_NAME = "cryptfs"
NIL = "-"
# The IANA Private Enterprise Number in the SD-ID.  32473 is the one RFC 5612
# reserves for documentation: cryptfs has none of its own, so a site with a
# number of its own passes it (--enterprise-id).
EXAMPLE_PEN = 32473
SEQUENCE_MAX = 2147483647  # RFC 5424 §7.3.1

FACILITIES = {"user": 1, "daemon": 3, "auth": 4, "authpriv": 10, "audit": 13,
              **{f"local{i}": 16 + i for i in range(8)}}
DEFAULT_FACILITY = "authpriv"  # security messages that name people and files: kept private

EMERG, ALERT, CRIT, ERR, WARNING, NOTICE, INFO, DEBUG = range(8)
NOTICE_EVENTS = frozenset({"mount", "unmount", "unlock", "lock", "log-resumed"})

# The record's fields in the order a person reads them; the rest follow, sorted.
SD_ORDER = ("seq", "time_ns", "log", "server", "volume", "event", "outcome", "reason", "uid",
            "user", "pid", "exe", "path", "new_path", "intent", "bytes_read", "bytes_written",
            "duration_ns", "size", "mode", "name")


# -- the message ----------------------------------------------------------------------------------
def severity(record: dict[str, Any]) -> int:
    """err for an integrity failure or an error, warning for a denial, notice
    for a volume's lifecycle (mount, unlock ...), info for any other access."""
    if record.get("event") == "integrity-failure" or record.get("outcome") == "error":
        return ERR
    if record.get("outcome") == "denied":
        return WARNING
    return NOTICE if record.get("event") in NOTICE_EVENTS else INFO


def _printable(text: str, limit: int) -> str:
    """PRINTUSASCII (%d33-126), at most ``limit`` characters, others as '_'; or NIL."""
    return "".join(c if "!" <= c <= "~" else "_" for c in text)[:limit] or NIL


def sd_name(key: str) -> str:
    """An SD-NAME: 1 to 32 printable US-ASCII characters but '=', space, ']' and '"'."""
    return "".join(c if "!" <= c <= "~" and c not in '= ]"' else "_" for c in key)[:32] or "_"


def sd_value(value: Any) -> str:
    """A PARAM-VALUE, escaped as RFC 5424 §6.3.3 requires: '\\' '"' ']' get a backslash."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int | str):
        text = str(value)
    else:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def timestamp(time_ns: Any) -> str:
    """RFC 5424 TIMESTAMP, UTC, microseconds (the most TIME-SECFRAC allows); NIL if unusable."""
    if not isinstance(time_ns, int) or isinstance(time_ns, bool):
        return NIL
    s, ns = divmod(time_ns, 10**9)
    try:
        when = datetime.datetime.fromtimestamp(s, datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return NIL
    if when.year < 1000:
        return NIL
    return when.strftime("%Y-%m-%dT%H:%M:%S") + f".{ns // 1000:06d}Z"


def sequence_id(seq: int) -> int:
    """1 .. 2147483647, starting again at 1 after the maximum (RFC 5424 §7.3.1)."""
    return (seq - 1) % SEQUENCE_MAX + 1


def message(record: dict[str, Any], hostname: str, facility: int = FACILITIES[DEFAULT_FACILITY],
            enterprise_id: int = EXAMPLE_PEN) -> bytes:
    """One record as an RFC 5424 message (without framing).  ``record["seq"]``
    must be a positive integer."""
    seq = record["seq"]
    pid = record.get("pid")
    procid = str(pid) if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else NIL
    event = record.get("event")
    msgid = _printable(event, 32) if isinstance(event, str) else NIL
    keys = [k for k in SD_ORDER if k in record] + sorted(k for k in record if k not in SD_ORDER)
    params = "".join(f' {sd_name(k)}="{sd_value(record[k])}"' for k in keys
                     if record[k] is not None)
    header = (f"<{facility * 8 + severity(record)}>1 {timestamp(record.get('time_ns'))} "
              f"{_printable(hostname, 255)} {APP_NAME} {procid} {msgid}")
    sd = f'[meta sequenceId="{sequence_id(seq)}"][{APP_NAME}@{enterprise_id}{params}]'
    msg = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    # (a str that is not UTF-8, a lone surrogate from an edited log, becomes '?'
    # in the SD-PARAMs; MSG, ASCII, keeps it as its JSON escape)
    return f"{header} {sd} {msg}".encode("utf-8", "replace")


def frame(msg: bytes) -> bytes:
    """Octet-counting framing (RFC 6587 §3.4.1): MSG-LEN SP SYSLOG-MSG."""
    return b"%d %s" % (len(msg), msg)


def default_hostname() -> str:
    return _printable(socket.gethostname(), 255)


def check_hostname(name: str) -> str:
    if not 1 <= len(name) <= 255 or any(not "!" <= c <= "~" for c in name):
        raise UsageError(f"unusable --hostname {name!r}: 1 to 255 printable ASCII characters, "
                         "no spaces (RFC 5424 HOSTNAME)")
    return name


_TARGET = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^\s:\[\]]+)):(?P<port>\d{1,5})$")


def parse_target(text: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT."""
    m = _TARGET.match(text)
    port = int(m.group("port")) if m else 0
    if m is None or not 1 <= port <= 65535:
        raise UsageError(f"not a collector address: {text!r}",
                         hint="give HOST:PORT, e.g. --to logs.example.com:514 or --to [::1]:514")
    return m.group("v6") or m.group("host"), port


def default_state(logdir: str, host: str, port: int) -> str:
    """LOGDIR/forward-HOST-PORT.cursor: one cursor per collector."""
    safe = re.sub(r"[^A-Za-z0-9.-]", "_", host)
    return os.path.join(logdir, f"forward-{safe}-{port}.cursor")


# -- the cursor -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cursor:
    """Records up to ``seq`` are delivered (or not selected); ``h`` is that
    record's hash, to notice a log that changed under the forwarder."""

    seq: int = 0
    h: str | None = None


MAX_CURSOR = 4096  # bytes of a state file (one short JSON line)


def load_cursor(path: str) -> Cursor | None:
    try:
        # (O_NONBLOCK: a FIFO put there is refused below, rather than wait for a
        # writer forever; O_NOFOLLOW: the forwarder's own file, not a link's target)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UsageError(f"the state file {path} is not a regular file",
                                 hint="name a file of its own with --state")
            raw = f.read(MAX_CURSOR + 1)  # (it is a line: /dev/full was read until memory ran out)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UsageError(f"the state file {path} is a symlink (not followed)",
                             hint="name a file of its own with --state") from None
        raise BackingIOError(f"cannot read the state file {path}: {e.strerror}") from None
    try:
        obj = json.loads(raw) if len(raw) <= MAX_CURSOR else None
    except ValueError:
        obj = None
    seq, h = (obj.get("seq"), obj.get("h")) if isinstance(obj, dict) else (None, None)
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or \
            not (h is None or isinstance(h, str)):
        raise UsageError(f"{path} is not a forwarder state file",
                         hint="remove it to start over (with --from-start for the records already "
                              "in the log)")
    return Cursor(seq, h)


def save_cursor(path: str, cursor: Cursor, target: str) -> None:
    """Atomically: a new file, fsync, rename (never half a cursor after a crash)."""
    data = json.dumps({"seq": cursor.seq, "h": cursor.h, "to": target}, sort_keys=True) + "\n"
    directory, name = os.path.split(os.path.abspath(path))
    try:
        replace_file(directory, name, data.encode(), 0o600)  # (the log's own atomic replace)
    except OSError as e:  # (its error names the temporary file, not the state file)
        raise BackingIOError(f"cannot write the state file {path}: {e.strerror or e}") from None


# -- the forwarder --------------------------------------------------------------------------------
class CollectorUnreachable(CryptfsError):
    """No connection to the collector when the forwarder starts."""

    exit_code = BackingIOError.exit_code


@dataclass
class _Sent:
    seq: int
    frame: bytes
    before: Cursor  # where the cursor stands while this record is not delivered
    end: int | None = None  # offset of its last byte + 1 in this connection's stream


class Forwarder:
    """Follows a log and sends each selected record to one collector, in order.

    Not thread-safe.  :meth:`run` returns when ``stop()`` is true (checked at
    least every ``poll`` seconds), with the cursor saved.
    """

    def __init__(self, logdir: str, host: str, port: int, state: str, *,
                 select_record: Callable[[dict[str, Any]], bool] = lambda r: True,
                 from_start: bool = False, hostname: str | None = None,
                 facility: int = FACILITIES[DEFAULT_FACILITY], enterprise_id: int = EXAMPLE_PEN,
                 stop: Callable[[], bool] = lambda: False, retry_min: float = 0.25,
                 retry_max: float = 30.0, connect_timeout: float = 5.0, poll: float = 0.2,
                 save_every: float = 1.0, linger: float = 2.0) -> None:
        self.logdir, self.host, self.port, self.state = logdir, host, port, state
        self.target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.select_record = select_record
        self.from_start = from_start
        self.hostname = hostname or default_hostname()
        self.facility, self.enterprise_id = facility, enterprise_id
        self.stop = stop
        self.retry_min, self.retry_max = retry_min, retry_max
        self.connect_timeout, self.poll = connect_timeout, poll
        self.save_every, self.linger = save_every, linger
        self.examined = Cursor()  # the last record taken from the log
        self.inflight: collections.deque[_Sent] = collections.deque()
        self.delivered = 0
        self._taken = self._taken_at_tick = 0  # records taken from the log, in all / at the last tick
        self._saved: Cursor | None = None
        self._saved_at = 0.0
        self._sock: socket.socket | None = None
        self._sent = 0  # bytes sent on this connection
        self._delay = retry_min
        self._retry_at = 0.0
        self._down_since: float | None = None

    # -- where to start --
    def start_position(self) -> Cursor:
        """The saved cursor, checked against the log; else the log's end (or
        its beginning with ``from_start``)."""
        try:
            os.listdir(self.logdir)
        except OSError as e:
            raise BackingIOError(f"cannot read the access log in {self.logdir}: {e.strerror}",
                                 hint="run it as the user who writes the log (root for a "
                                      "mount's or the agent's)") from None
        check_log(self.logdir)
        saved = load_cursor(self.state)
        if saved is None and self.from_start:
            return Cursor()
        last, at = Cursor(), None
        for r in records(self.logdir):
            seq = r.get("seq")
            if isinstance(seq, int) and seq >= last.seq:
                last = Cursor(seq, r.get("h"))
            if saved is not None and seq == saved.seq:
                at = r
        if saved is None:
            return last
        if self.from_start:
            log.warning("--from-start has no effect: %s says records up to %d were forwarded "
                        "(remove it to send the whole log again)", self.state, saved.seq)
        if saved.seq > last.seq:
            raise UsageError(
                f"{self.state} says records up to {saved.seq} were forwarded, but the log in "
                f"{self.logdir} ends at record {last.seq}: it is not the log that was forwarded",
                hint="remove the state file to forward this log (--from-start to include the "
                     "records it holds)")
        if at is not None and saved.h is not None and at.get("h") != saved.h:
            raise DamageFound(
                f"record {saved.seq} in {self.logdir} is not the record that was forwarded "
                "(its hash differs): the log was rewritten or replaced since",
                hint=f"compare with the collector's copy; run cryptfs audit verify {self.logdir}")
        return saved

    # -- running --
    def run(self) -> None:
        """Forward until stopped.  Raises before forwarding anything if the
        state file or the log is unusable or the collector cannot be reached."""
        self.examined = self.start_position()
        try:  # (a name that does not resolve is a typo: no state file is left for it)
            socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise UsageError(f"cannot resolve {self.host}: {e.strerror}") from None
        # (saved first: started again after the collector could not be reached,
        # it still sends what was written in between)
        self._save(force=True)
        try:
            self._sock = self._connect()
        except socket.gaierror as e:
            raise UsageError(f"cannot resolve {self.host}: {e.strerror}") from None
        except OSError as e:
            raise CollectorUnreachable(
                f"cannot connect to {self.target}: {e.strerror or e}",
                hint="is the collector listening there? (rsyslog: input(type=\"imtcp\" "
                     f"port=\"{self.port}\"))") from None
        log.info("forwarding %s to %s, after record %d", self.logdir, self.target,
                 self.examined.seq)
        try:
            for record in follow(self.logdir, from_start=True, poll=self.poll,
                                    stop=self._tick):
                if self.stop():
                    break
                self._take(record)
        finally:
            self._finish()
            self._save(force=True)
            log.info("stopped: %d record(s) delivered; %s says up to record %d", self.delivered,
                     self.state, self._done().seq)

    def _take(self, record: dict[str, Any]) -> None:
        seq = record.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            log.warning("a record without a usable sequence number (%r) is not forwarded; "
                        "cryptfs audit verify shows what happened to the log", seq)
            return
        if seq <= self.examined.seq:  # before the cursor (or a repeated seq, for verify to see)
            return
        self._taken += 1
        here = Cursor(seq, record.get("h") if isinstance(record.get("h"), str) else None)
        if not self.select_record(record):
            self.examined = here
            return
        sent = _Sent(seq, frame(message(record, self.hostname, self.facility,
                                        self.enterprise_id)), self.examined)
        connected = self._connected()  # (resends what is unacknowledged first)
        self.inflight.append(sent)
        self.examined = here
        if connected:
            try:
                self._write(sent.frame)
                sent.end = self._sent
            except OSError as e:
                self._lost(e)
        self._ack()
        self._save()

    def _tick(self) -> bool:
        """Between reads of the log (the ``stop`` hook of follow): resend after
        a lost connection, count acknowledgements, save the cursor (at once
        when no record came since the last tick, else at most every
        ``save_every`` seconds); whether to stop."""
        if self.inflight and not self.stop():
            self._connected()
        self._ack()
        self._save(force=self._taken == self._taken_at_tick)
        self._taken_at_tick = self._taken
        return self.stop()

    # -- the connection --
    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        sock.setblocking(False)
        # A collector that vanished without a word (power, network) is noticed
        # within a minute, not after TCP's quarter of an hour of retransmissions.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 30_000)  # ms unacknowledged
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)  # s idle, then probes
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        self._sent = 0
        return sock

    def _connected(self) -> bool:
        """Whether there is a live connection on which everything not yet
        acknowledged has been sent (again); tries with backoff until there is
        one, or until stopped (False)."""
        while not self.stop():
            if self._sock is not None:
                if not self._peer_gone():
                    return True
                self._lost(None)
                continue
            now = time.monotonic()
            if now < self._retry_at:
                time.sleep(min(self.poll, self._retry_at - now))
                continue
            try:
                self._sock = self._connect()
                for sent in self.inflight:
                    self._write(sent.frame)
                    sent.end = self._sent
            except OSError as e:
                self._drop()
                self._retry_at = time.monotonic() + self._delay
                log.debug("cannot connect to %s (%s); next try in %.1f s", self.target,
                          e.strerror or e, self._delay)
                self._delay = min(self._delay * 2, self.retry_max)
                continue
            log.warning("connected to %s again after %.1f s; %d record(s) sent again",
                        self.target, time.monotonic() - (self._down_since or now),
                        len(self.inflight))
            self._delay, self._down_since = self.retry_min, None
            return True
        return False

    def _peer_gone(self) -> bool:
        """A syslog collector never writes: readable means closed (or reset)."""
        assert self._sock is not None
        try:
            return not self._sock.recv(4096)
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _write(self, data: bytes) -> None:
        assert self._sock is not None
        view = memoryview(data)
        while view:
            try:
                view = view[self._sock.send(view, socket.MSG_NOSIGNAL):]
            except BlockingIOError:
                if self.stop():  # a collector that does not read must not hold up a stop
                    raise ConnectionAbortedError(errno.ECONNABORTED,
                                                 "stopping with a record half sent") from None
                select.select([], [self._sock], [], self.poll)
        self._sent += len(data)

    def _unacknowledged(self) -> int:
        """Bytes sent on this connection that the collector's TCP has not acknowledged
        (SIOCOUTQ, which Linux numbers as TIOCOUTQ)."""
        assert self._sock is not None
        buf = fcntl.ioctl(self._sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
        return int(struct.unpack("i", buf)[0])

    def _ack(self) -> None:
        if self._sock is None or not self.inflight:
            return
        try:
            acked = self._sent - self._unacknowledged()
        except OSError:
            return
        self._pop_delivered(acked)

    def _pop_delivered(self, upto: int) -> None:
        while self.inflight and self.inflight[0].end is not None and self.inflight[0].end <= upto:
            self.inflight.popleft()
            self.delivered += 1

    def _lost(self, error: OSError | None) -> None:
        self._ack()  # (what was acknowledged before the end is delivered)
        self._drop()
        for sent in self.inflight:
            sent.end = None
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("lost the connection to %s (%s); %d record(s) not acknowledged will be "
                        "sent again; reconnecting", self.target,
                        "closed by the collector" if error is None else error.strerror or error,
                        len(self.inflight))
        self._retry_at = time.monotonic() + self._delay

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _finish(self) -> None:
        """Close the connection; if the collector then closes its side, it has
        read everything sent: all of it is delivered."""
        sock = self._sock
        if sock is None:
            return
        self._ack()
        try:
            if self.inflight:
                sock.shutdown(socket.SHUT_WR)
                deadline = time.monotonic() + self.linger
                while (left := deadline - time.monotonic()) > 0:
                    if select.select([sock], [], [], left)[0] and not sock.recv(4096):
                        self._pop_delivered(self._sent)
                        break
        except OSError:
            pass
        self._ack()
        self._drop()

    # -- the cursor --
    def _done(self) -> Cursor:
        return self.inflight[0].before if self.inflight else self.examined

    def _save(self, force: bool = False) -> None:
        done = self._done()
        if done == self._saved or not force and time.monotonic() - self._saved_at < self.save_every:
            return
        save_cursor(self.state, done, self.target)
        self._saved, self._saved_at = done, time.monotonic()
