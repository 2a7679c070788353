"""Reading the records back out of a syslog collector's file (``audit export --from-syslog``).

What `cryptfs audit forward` sends (cryptfs.audit.syslog) a collector such as
rsyslog stores one message a line, as it came (``RSYSLOG_SyslogProtocol23Format``,
docs/AUDIT.md)::

    <PRI>1 TIMESTAMP HOSTNAME cryptfs PROCID MSGID [meta ...][cryptfs@PEN ...] MSG

MSG is the record itself as JSON (ASCII): that, not the structured data
(which a collector may re-escape), is what is read.  Lines of other programs
are passed over.  Delivery is at least once, so a record may be there twice:
a message whose MSG is byte for byte one already read is dropped.  Two
different messages that claim the same server, log and seq are both kept and
counted as a conflict (one of them was not written by that log: whoever
could send to the collector may have forged it; `cryptfs audit verify` on the
server's own log tells which).  Each log's records are then put in ``seq``
order (a resend after a reconnect may have come late) and the logs merged as
:func:`cryptfs.audit.merge.merged` merges log directories: the same records
give the same story, whichever copy they were read from.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from cryptfs.audit.export import records_in
from cryptfs.audit.merge import is_int, merged, server_of
from cryptfs.audit.syslog import APP_NAME
from cryptfs.errors import BackingIOError, UsageError

# PRI VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP (RFC 5424 §6)
_HEADER = re.compile(rb"<\d{1,3}>1 \S+ \S+ (\S+) \S+ \S+ ")


@dataclass
class CollectorFile:
    """What a collector's file held: the records (merged), and what was passed over."""

    records: list[dict[str, Any]] = field(default_factory=list)
    others: int = 0  # lines that are not cryptfs messages
    damaged: int = 0  # cryptfs messages whose MSG is not a record
    repeated: int = 0  # records that arrived more than once
    conflicts: list[tuple[str, str, int]] = field(default_factory=list)
    # (server, log, seq) claimed by two different messages


def _after_sd(line: bytes, pos: int) -> int | None:
    """Where STRUCTURED-DATA that starts at ``pos`` ends ('-' or [..][..]:
    inside a quoted PARAM-VALUE, '\\' escapes the next byte); None if it does not."""
    if line[pos:pos + 1] == b"-":
        return pos + 1
    if line[pos:pos + 1] != b"[":
        return None
    quoted = False
    i = pos
    while i < len(line):
        c = line[i:i + 1]
        if quoted:
            if c == b"\\":
                i += 1
            elif c == b'"':
                quoted = False
        elif c == b'"':
            quoted = True
        elif c == b"]" and line[i + 1:i + 2] != b"[":
            return i + 1
        i += 1
    return None


def message_record(line: bytes) -> tuple[str, bytes] | None:
    """(APP-NAME, MSG) of one RFC 5424 message; None if the line is not one."""
    m = _HEADER.match(line)
    if m is None:
        return None
    end = _after_sd(line, m.end())
    if end is None:
        return None
    msg = line[end + 1:] if line[end:end + 1] == b" " else b""
    return m.group(1).decode("ascii", "replace"), msg.strip(b"\r\n")


MAX_LINE = 1 << 20  # bytes: a longer line is no message of cryptfs (its records are far shorter)


def _lines(f: BinaryIO) -> Iterator[bytes]:
    """The file's lines, each at most MAX_LINE bytes long: the rest of a longer
    one is read and dropped (it would be held whole in memory)."""
    while line := f.readline(MAX_LINE):
        if len(line) == MAX_LINE and not line.endswith(b"\n"):
            while (rest := f.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                pass
            yield b""  # (counted as a line of another program)
            continue
        yield line


def read_collector(path: str) -> CollectorFile:
    """The records in a collector's file, each once, merged by time (the
    whole file is read: it must fit in memory)."""
    out = CollectorFile()
    logs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    seen: set[bytes] = set()
    claimed: set[tuple[str, str, int]] = set()
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                # (/dev/zero was read as one endless line, until memory ran out)
                raise UsageError(f"{path} is not a regular file: give the file the collector "
                                 "wrote")
            for line in _lines(f):
                got = message_record(line.rstrip(b"\n"))
                if got is None or got[0] != APP_NAME:
                    out.others += 1
                    continue
                if got[1] in seen:
                    out.repeated += 1
                    continue
                recs = list(records_in([got[1]]))
                if not recs:
                    out.damaged += 1
                    continue
                seen.add(got[1])
                r = recs[0]
                log_id = r["log"] if isinstance(r.get("log"), str) else ""
                key = (server_of(r), log_id, int(r["seq"]))
                if key in claimed:
                    out.conflicts.append(key)
                claimed.add(key)
                logs.setdefault((key[0], key[1]), []).append(r)
    except OSError as e:
        raise BackingIOError(f"cannot read {path}: {e.strerror}") from None
    if not logs and out.others:
        raise UsageError(f"{path} holds no message of cryptfs ({out.others} line(s) of other "
                         "programs or formats)", hint="give the file the syslog collector "
                                                      "writes cryptfs's messages to")
    for recs in logs.values():
        recs.sort(key=lambda r: r["seq"] if is_int(r["seq"]) else 0)
    out.records = list(merged(logs[k] for k in sorted(logs)))
    return out
