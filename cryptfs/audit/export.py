"""Reading the access log out: filters, and the formats auditors' tools read.

- ``jsonl``: the records as written (one JSON object a line, ``h`` included);
- ``csv``: one row per record, fixed columns (:data:`CSV_COLUMNS`), a header row;
- ``cef``: ArcSight Common Event Format (CEF:0), one line per record;
- ``ecs``: Elastic Common Schema 8.11 documents (``event.category: file``);
- ``ocsf``: OCSF 1.1 File System Activity events (class 1001).

The field mappings are in docs/AUDIT.md.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import fnmatch
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from cryptfs import __version__
from cryptfs.audit.chain import SEGMENT_RE, data_end, segment_lines
from cryptfs.errors import BackingIOError, UsageError

FORMATS = ("jsonl", "csv", "cef", "ecs", "ocsf")
CSV_COLUMNS = ("seq", "time", "volume", "event", "outcome", "reason", "uid", "user", "pid",
               "exe", "path", "new_path", "intent", "bytes_read", "bytes_written",
               "duration_ns", "server")


def records(logdir: str, checked: bool = True) -> Iterator[dict[str, Any]]:
    """Every record of the log, in order (headers, checkpoints and lines that
    are not JSON left out: `audit verify` is what judges them).  ``checked``:
    also leave out what has no usable seq, time or event, and give every
    text field as text (False: as found, for a reader that counts them)."""
    try:
        names = sorted(n for n in os.listdir(logdir) if SEGMENT_RE.match(n))
    except OSError as e:
        raise BackingIOError(f"{logdir}: {e.strerror}") from None
    for name in names:
        yield from _records_of(os.path.join(logdir, name), checked)


class Tail:
    """Where a reader of a live log stands: :meth:`read` gives what was
    written since, whole lines only, across new segments (``moved`` says
    whether it got anywhere, records or not: a checkpoint moves it too).

    Without ``from_start`` it starts at the end of what is written now."""

    def __init__(self, logdir: str, from_start: bool = False) -> None:
        self.logdir = logdir
        names = self._segments()
        self.current = names[-1] if names else None
        self.pos = 0
        self.backlog: list[str] = []  # whole segments before the current one, to read first
        self.moved = False
        if self.current is not None and not from_start:
            self.pos = data_end(os.path.join(logdir, self.current))
        elif from_start:
            self.backlog = names[:-1]

    def _segments(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.logdir) if SEGMENT_RE.match(n))
        except OSError as e:
            raise BackingIOError(f"{self.logdir}: {e.strerror}") from None

    def read(self) -> list[dict[str, Any]]:
        """The records written since the last read (one older segment at a time)."""
        self.moved = False
        if self.backlog:
            self.moved = True
            return list(_records_of(os.path.join(self.logdir, self.backlog.pop(0))))
        while True:
            if self.current is None:
                names = self._segments()
                if not names:
                    return []
                self.current, self.pos = names[0], 0
            with open(os.path.join(self.logdir, self.current), "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
            # Only whole lines, and never past a line still being copied in: the
            # next look starts where the last whole one ended.
            lines, end = segment_lines(chunk, live_ok=False)
            self.pos += end
            if end:
                self.moved = True
                return list(records_in(lines))
            later = [n for n in self._segments() if n > self.current]
            if not later:
                return []
            self.current, self.pos = later[0], 0


def follow(logdir: str, from_start: bool = False, poll: float = 0.2,
           stop: Callable[[], bool] = lambda: False) -> Iterator[dict[str, Any]]:
    """Records as they are written (like ``tail -f``), across new segments.

    Without ``from_start``, only records written from now on."""
    import time as _time

    tail = Tail(logdir, from_start)
    while not stop():
        yield from tail.read()
        if not tail.moved:
            _time.sleep(poll)


def _records_of(path: str, checked: bool = True) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        data = f.read()  # (one copy: a live segment changes under a reader)
    yield from records_in(segment_lines(data)[0], checked)


TEXT_FIELDS = ("volume", "outcome", "reason", "user", "exe", "path", "new_path", "intent", "log",
               "server")


def records_in(lines: Iterable[bytes], checked: bool = True) -> Iterator[dict[str, Any]]:
    """The records among segment lines (headers, checkpoints, torn lines left
    out).  Each is parsed as `audit verify` parses it (a line ends at LF; of
    duplicate keys the last counts) and given out re-serialised: the values
    are the ones the chain covers, and a line whose bytes are not the record
    as written fails verify."""
    for raw in lines:
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if not (isinstance(obj, dict) and "seq" in obj and "event" in obj):
            continue
        if not checked:
            yield obj
            continue
        # An edited log may hold anything: what cannot be a record is left
        # out (verify reports it), and a field of the wrong type is shown as text.
        seq, t = obj.get("seq"), obj.get("time_ns")
        if (not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(t, int)
                or isinstance(t, bool) or not 0 <= t < 2**63 or not isinstance(obj["event"], str)):
            continue
        for k in TEXT_FIELDS:
            v = obj.get(k)
            if v is not None and not isinstance(v, str):
                obj[k] = json.dumps(v)
        yield obj


def iso(time_ns: int) -> str:
    """UTC, with nanoseconds: 2026-11-29T08:23:42.123456789Z."""
    s, ns = divmod(int(time_ns), 10**9)
    return datetime.datetime.fromtimestamp(s, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S") + \
        f".{ns:09d}Z"


LATEST = 253402300799 * 10**9  # ns: 9999-12-31T23:59:59Z, the last time ISO 8601 writes


def parse_time(text: str) -> int:
    """ns since the epoch from ISO 8601 (naive means UTC) or a number of seconds,
    from 1970 to the end of 9999 (1e400 was taken, and matched nothing)."""
    t: int | None = None
    try:
        t = int(decimal.Decimal(text) * 10**9)  # (exact: a float loses the nanoseconds)
    except (decimal.InvalidOperation, ValueError, OverflowError):  # (inf, nan: not a time)
        pass
    if t is None:
        try:
            dt = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise UsageError(f"not a time: {text!r} (ISO 8601, e.g. 2026-11-29T08:00:00Z, or "
                             "seconds since 1970)") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=datetime.UTC)
        t = int(dt.timestamp()) * 10**9 + dt.microsecond * 1000
    if not 0 <= t <= LATEST:
        raise UsageError(f"time out of range: {text!r} (1970 to 9999)")
    return t


@dataclass
class Filter:
    since: int | None = None  # ns
    until: int | None = None
    user: str | None = None  # name or uid
    path: str | None = None  # glob, matched against path and new_path
    event: tuple[str, ...] = ()

    def __call__(self, r: dict[str, Any]) -> bool:
        t = r.get("time_ns", 0)
        if self.since is not None and t < self.since:
            return False
        if self.until is not None and t > self.until:
            return False
        if self.user is not None and self.user not in (r.get("user"), str(r.get("uid"))):
            return False
        if self.event and r.get("event") not in self.event:
            return False
        if self.path is not None and not any(
                isinstance(p, str) and fnmatch.fnmatchcase(p, self.path)
                for p in (r.get("path"), r.get("new_path"))):
            return False
        return True


# -- formats -----------------------------------------------------------------------------------------
def as_jsonl(rs: Iterable[dict[str, Any]]) -> Iterator[str]:
    for r in rs:
        yield json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n"


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet may evaluate (OWASP)


# Characters a terminal acts on rather than shows (C0, DEL, C1) and those that
# reorder what follows them (bidirectional controls): in a file name, a path
# could move the cursor, erase lines already printed, or read backwards.
_UNSHOWN = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def csv_cell(v: object) -> object:
    """A CSV cell no spreadsheet evaluates and no terminal acts on: text that
    starts like a formula gets a leading ``'`` (OWASP's rule for CSV injection),
    and control characters are written as ``\\uXXXX``; numbers stay numbers."""
    if not isinstance(v, str):
        return v
    if v.startswith(FORMULA_START):
        v = "'" + v
    return _UNSHOWN.sub(lambda m: f"\\u{ord(m.group()):04x}", v)


def as_csv(rs: Iterable[dict[str, Any]]) -> Iterator[str]:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    yield buf.getvalue()
    for r in rs:
        buf.seek(0)
        buf.truncate()
        row = {**r, "time": iso(r.get("time_ns", 0))}
        w.writerow(["" if row.get(c) is None else csv_cell(row.get(c)) for c in CSV_COLUMNS])
        yield buf.getvalue()


def _no_breaks(text: str) -> str:
    """Control characters and what a reader may take for a line break, as spaces."""
    return "".join(" " if ord(c) < 32 or c in "\x7f\x85\u2028\u2029" else c for c in text)


def _cef_header(v: object) -> str:
    """A CEF header field: '\\' and '|' escaped; a line break (which would end
    the event) and other control characters as a space."""
    text = str(v).replace("\\", "\\\\").replace("|", "\\|")
    return _no_breaks(text)


def _cef_value(v: object) -> str:
    """A CEF extension value: '\\' and '=' escaped, line breaks as \\n and \\r;
    other control characters as a space."""
    text = (str(v).replace("\\", "\\\\").replace("=", "\\=").replace("\r\n", "\\n")
            .replace("\n", "\\n").replace("\r", "\\r"))
    return _no_breaks(text)


_SEVERITY = {"allowed": 3, "error": 6, "denied": 7}


def as_cef(rs: Iterable[dict[str, Any]]) -> Iterator[str]:
    for r in rs:
        sev = 9 if r.get("event") == "integrity-failure" else _SEVERITY.get(r.get("outcome", ""), 5)
        ext = {
            "rt": int(r.get("time_ns", 0)) // 10**6,
            "suid": r.get("uid"), "suser": r.get("user"), "spid": r.get("pid"),
            "sproc": r.get("exe"), "filePath": r.get("path"), "oldFilePath": None,
            "outcome": r.get("outcome"), "reason": r.get("reason"),
            "cs1Label": "volume", "cs1": r.get("volume"), "dvchost": r.get("server"),
            "cn1Label": "seq", "cn1": r.get("seq"),
            "in": r.get("bytes_read"), "out": r.get("bytes_written"),
        }
        if r.get("new_path") is not None:  # a rename or link: the new name is the file now
            ext["oldFilePath"], ext["filePath"] = r.get("path"), r.get("new_path")
        fields = " ".join(f"{k}={_cef_value(v)}" for k, v in ext.items() if v is not None)
        yield (f"CEF:0|cryptfs|cryptfs|{_cef_header(__version__)}|{_cef_header(r.get('event'))}|"
               f"{_cef_header(r.get('event'))} {_cef_header(r.get('outcome'))}|{sev}|{fields}\n")


_ECS_TYPE = {"create": "creation", "mkdir": "creation", "mknod": "creation", "symlink": "creation",
             "link": "creation", "unlink": "deletion", "rmdir": "deletion", "rename": "change",
             "truncate": "change", "chmod": "change", "chown": "change", "utimes": "change",
             "setxattr": "change", "removexattr": "change", "open": "access", "close": "access"}


def ecs_document(r: dict[str, Any]) -> dict[str, Any]:
    outcome = {"allowed": "success", "denied": "failure", "error": "failure"}.get(
        r.get("outcome", ""), "unknown")
    doc: dict[str, Any] = {
        "@timestamp": iso(r.get("time_ns", 0)),
        "ecs": {"version": "8.11.0"},
        "event": {"kind": "event", "category": ["file"],
                  "type": [_ECS_TYPE.get(r.get("event", ""), "info")],
                  "action": r.get("event"), "outcome": outcome, "sequence": r.get("seq"),
                  "provider": "cryptfs", "dataset": "cryptfs.access"},
        "user": {"id": str(r.get("uid")), "name": r.get("user")},
        "process": {"pid": r.get("pid"), "executable": r.get("exe") or None},
        "cryptfs": {"volume": r.get("volume"), "log": r.get("log"), "hash": r.get("h")},
    }
    if r.get("server") is not None:
        doc["host"] = {"name": r["server"]}
    if r.get("reason"):
        doc["event"]["reason"] = r["reason"]
    if r.get("path") is not None:
        path = r.get("new_path") or r["path"]
        doc["file"] = {"path": path, "name": os.path.basename(path)}
        if r.get("new_path") is not None:
            doc["cryptfs"]["old_path"] = r["path"]
    if r.get("event") == "close":
        doc["cryptfs"].update(bytes_read=r.get("bytes_read"), bytes_written=r.get("bytes_written"),
                              duration_ns=r.get("duration_ns"))
    return doc


# OCSF 1.1 File System Activity (class_uid 1001, category System Activity = 1)
_OCSF_ACTIVITY = {"create": 1, "mkdir": 1, "mknod": 1, "symlink": 1, "link": 1, "open": 14,
                  "close": 2, "truncate": 3, "rename": 5, "unlink": 4, "rmdir": 4,
                  "chmod": 7, "chown": 7, "utimes": 6, "setxattr": 6, "removexattr": 6,
                  "mount": 12, "unmount": 13}
_OCSF_NAMES = {1: "Create", 2: "Read", 3: "Update", 4: "Delete", 5: "Rename",
               6: "Set Attributes", 7: "Set Security", 12: "Mount", 13: "Unmount", 14: "Open",
               99: "Other"}


def ocsf_event(r: dict[str, Any]) -> dict[str, Any]:
    activity = _OCSF_ACTIVITY.get(r.get("event", ""), 99)
    ok = r.get("outcome") == "allowed"
    path = r.get("new_path") or r.get("path") or ""
    ev: dict[str, Any] = {
        "class_uid": 1001, "class_name": "File System Activity",
        "category_uid": 1, "category_name": "System Activity",
        "activity_id": activity, "activity_name": _OCSF_NAMES[activity],
        "type_uid": 1001 * 100 + activity,
        "time": int(r.get("time_ns", 0)) // 10**6,
        "severity_id": 1 if ok else (5 if r.get("event") == "integrity-failure" else 3),
        "status_id": 1 if ok else 2, "status": "Success" if ok else "Failure",
        "actor": {"user": {"uid": str(r.get("uid")), "name": r.get("user")},
                  "process": {"pid": r.get("pid"), "file": {"path": r.get("exe") or "",
                                                            "name": os.path.basename(r.get("exe") or ""),
                                                            "type_id": 1}}},
        "file": {"path": path, "name": os.path.basename(path), "type_id": 1},
        "metadata": {"version": "1.1.0", "sequence": r.get("seq"), "uid": r.get("h"),
                     "product": {"name": "cryptfs", "vendor_name": "cryptfs",
                                 "version": __version__}},
        "unmapped": {"cryptfs_event": r.get("event"), "volume": r.get("volume")},
    }
    if r.get("reason"):
        ev["status_detail"] = r["reason"]
    if r.get("server") is not None:
        ev["device"] = {"hostname": r["server"], "type_id": 1, "type": "Server"}
    if activity == 99:
        ev["activity_name"] = r.get("event") or "Other"
    if r.get("new_path") is not None:
        ev["file_result"] = {"path": r["new_path"], "name": os.path.basename(r["new_path"]),
                             "type_id": 1}
        ev["file"] = {"path": r["path"], "name": os.path.basename(r["path"]), "type_id": 1}
    if r.get("event") == "close":
        ev["unmapped"].update(bytes_read=r.get("bytes_read"), bytes_written=r.get("bytes_written"),
                              duration_ns=r.get("duration_ns"))
    return ev


def as_ecs(rs: Iterable[dict[str, Any]]) -> Iterator[str]:
    for r in rs:
        yield json.dumps(ecs_document(r), ensure_ascii=False) + "\n"


def as_ocsf(rs: Iterable[dict[str, Any]]) -> Iterator[str]:
    for r in rs:
        yield json.dumps(ocsf_event(r), ensure_ascii=False) + "\n"


WRITERS: dict[str, Callable[[Iterable[dict[str, Any]]], Iterator[str]]] = {
    "jsonl": as_jsonl, "csv": as_csv, "cef": as_cef, "ecs": as_ecs, "ocsf": as_ocsf}
