"""The access report: one self-contained HTML page for an auditor of the data owner.

The page is built from one or more log directories (a mount's, a key agent's)
and shows, in this order: the verdict of :func:`cryptfs.audit.verify.verify` for each
log, a summary, accesses per user over time (an inline SVG chart), the files
and programs most accessed, denials, failed unlocks and integrity failures.

Everything a log holds is untrusted (a path is whatever name someone gave a
file): every string from a record goes through :func:`_text`, which shows
control and bidi characters as escapes and HTML-escapes the rest.  The page
has no script, no external reference (CSS and SVG are inline), and a bounded
size: records are streamed, tables stop at :data:`MAX_ROWS` with a note of
how many more there are.  Memory grows with the number of distinct users,
files and programs, not with the number of records.
"""

from __future__ import annotations

import datetime
import heapq
import html
import json
import os
import stat
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptfs import __version__
from cryptfs.audit.chain import PUB_NAME, verifier_text
from cryptfs.audit.export import LATEST, iso, records
from cryptfs.audit.merge import merge_key
from cryptfs.audit.verify import Verdict, verify
from cryptfs.errors import BackingIOError, UsageError

MAX_ROWS = 200  # rows of a table of events (denials, failed unlocks, integrity failures)
TOP_FILES = 25
TOP_PROGRAMS = 15
MAX_SERIES = 8  # users drawn apart in the chart; the rest together as "others"
MAX_BUCKETS = 48  # bars in the chart
MAX_TEXT = 300  # characters of one string from the log shown (then "…")

# Records that are not someone's access to a file: the mount itself, the log,
# the agent's sessions, and close (it ends an open already counted, and
# brings that open's bytes).
NOT_ACCESS = frozenset({"mount", "unmount", "log-resumed", "integrity-failure", "close",
                        "unlock", "lock"})

# Bucket widths (s), each a multiple of the one before, so that counts made
# at one width add up exactly into the next (then doubling: :func:`_width`).
WIDTHS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400,
          14 * 86400, 28 * 86400)
PALETTE = ("#3b6ea8", "#e8871e", "#4c9a52", "#d64545", "#6bb5b0", "#c9a227", "#9467bd",
           "#e377c2")
OTHERS_COLOUR = "#a9a9a9"


# -- reading records -----------------------------------------------------------------------------
def _str(v: Any) -> str:
    if isinstance(v, str):
        return v
    return "" if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class Rec:
    """The fields of a record the report uses, each of one type whatever the log held."""

    t: int  # ns
    event: str
    outcome: str
    user: str
    uid: int | None
    exe: str
    path: str | None
    new_path: str | None
    reason: str
    server: str  # "" in records written before records named their server
    raw: dict[str, Any]

    @classmethod
    def of(cls, r: dict[str, Any]) -> Rec | None:
        t = _int(r.get("time_ns"))
        if t is None or not 0 <= t <= LATEST or not isinstance(r.get("event"), str):
            return None
        uid = _int(r.get("uid"))
        user = _str(r.get("user")) or ("" if uid is None else str(uid))
        path, new_path = r.get("path"), r.get("new_path")
        return cls(t, r["event"], _str(r.get("outcome")), user, uid, _str(r.get("exe")),
                   None if path is None else _str(path),
                   None if new_path is None else _str(new_path), _str(r.get("reason")),
                   _str(r.get("server")), r)


class Capped:
    """The earliest ``limit`` rows of a table, and how many there were in all."""

    def __init__(self, limit: int = MAX_ROWS) -> None:
        self.limit = limit
        self.total = 0
        self._heap: list[tuple[int, int, Rec]] = []  # (-time, -arrival, rec): the latest on top

    def add(self, rec: Rec) -> None:
        self.total += 1
        item = (-rec.t, -self.total, rec)
        if len(self._heap) < self.limit:
            heapq.heappush(self._heap, item)
        elif item > self._heap[0]:
            heapq.heapreplace(self._heap, item)

    def rows(self) -> list[Rec]:
        return [rec for _, _, rec in sorted(self._heap, reverse=True)]


def _width(level: int) -> int:
    if level < len(WIDTHS):
        return WIDTHS[level]
    return WIDTHS[-1] << (level - len(WIDTHS) + 1)


class Timeline:
    """Accesses per user per time bucket, at the finest width of :data:`WIDTHS`
    that keeps the span within :data:`MAX_BUCKETS` (coarsened as records come)."""

    def __init__(self) -> None:
        self.level = 0
        self.counts: dict[int, Counter[str]] = {}  # bucket index -> user -> accesses
        self.lo: int | None = None  # s
        self.hi: int | None = None

    @property
    def width(self) -> int:
        return _width(self.level)

    def add(self, t_ns: int, user: str) -> None:
        t = t_ns // 10**9
        self.lo = t if self.lo is None else min(self.lo, t)
        self.hi = t if self.hi is None else max(self.hi, t)
        self.counts.setdefault(t // self.width, Counter())[user] += 1
        self.fit(self.lo, self.hi)

    def fit(self, lo: int, hi: int) -> None:
        """Coarsen until ``lo .. hi`` (s) fits in :data:`MAX_BUCKETS` buckets."""
        while hi // self.width - lo // self.width + 1 > MAX_BUCKETS:
            ratio = _width(self.level + 1) // self.width
            merged: dict[int, Counter[str]] = {}
            for b, c in self.counts.items():
                merged.setdefault(b // ratio, Counter()).update(c)
            self.counts = merged
            self.level += 1


@dataclass
class FileStats:
    accesses: int = 0
    denied: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    users: set[str] = field(default_factory=set)


@dataclass
class ProgramStats:
    accesses: int = 0
    denied: int = 0
    users: set[str] = field(default_factory=set)


@dataclass
class LogSource:
    """One log directory to report on, and the key to verify it with."""

    logdir: str
    public: bytes
    key_stored: bool  # the key is LOGDIR/audit.pub: it proves less than a copy kept elsewhere


@dataclass
class LogResult:
    source: LogSource
    verdict: Verdict
    records: int = 0  # in the period
    unreadable: int = 0  # records without a usable time or event (left out)
    log_ids: set[str] = field(default_factory=set)
    volumes: set[str] = field(default_factory=set)
    sessions: int = 0  # unlock and lock records (a key agent's log has them)


@dataclass
class Report:
    since: int | None = None  # ns
    until: int | None = None
    logs: list[LogResult] = field(default_factory=list)
    first: int | None = None  # ns, of the records in the period
    last: int | None = None
    records: int = 0
    users: set[str] = field(default_factory=set)
    servers: set[str] = field(default_factory=set)  # named by the records in the period
    files: dict[str, FileStats] = field(default_factory=dict)
    programs: dict[str, ProgramStats] = field(default_factory=dict)
    per_user: Counter[str] = field(default_factory=Counter)
    timeline: Timeline = field(default_factory=Timeline)
    denials: Capped = field(default_factory=Capped)
    failed_unlocks: Capped = field(default_factory=Capped)
    integrity: Capped = field(default_factory=Capped)

    @property
    def ok(self) -> bool:
        return all(lr.verdict.ok for lr in self.logs)

    def add(self, lr: LogResult, rec: Rec) -> None:
        lr.records += 1
        self.records += 1
        self.first = rec.t if self.first is None else min(self.first, rec.t)
        self.last = rec.t if self.last is None else max(self.last, rec.t)
        if isinstance(rec.raw.get("log"), str):
            lr.log_ids.add(rec.raw["log"])
        if isinstance(rec.raw.get("volume"), str) and len(lr.volumes) < 8:
            lr.volumes.add(rec.raw["volume"])
        if rec.server:
            self.servers.add(rec.server)
        lr.sessions += rec.event in ("unlock", "lock")
        person = rec.uid is not None and rec.uid >= 0
        if person and rec.event not in ("mount", "unmount"):
            self.users.add(rec.user)
        denied = rec.outcome == "denied"
        if rec.event == "unlock":
            if denied:
                self.failed_unlocks.add(rec)
            return
        if rec.event == "integrity-failure":
            self.integrity.add(rec)
            return
        if rec.event == "close" and rec.path not in (None, "?"):
            st = self.files.setdefault(rec.path, FileStats())
            st.bytes_read += max(_int(rec.raw.get("bytes_read")) or 0, 0)
            st.bytes_written += max(_int(rec.raw.get("bytes_written")) or 0, 0)
        if rec.event in NOT_ACCESS:
            return
        if denied:
            self.denials.add(rec)
        self.per_user[rec.user] += 1
        self.timeline.add(rec.t, rec.user)
        for p in (rec.path, rec.new_path):
            if p is not None and p != "?":
                fs = self.files.setdefault(p, FileStats())
                fs.accesses += 1
                fs.denied += denied
                fs.users.add(rec.user)
        prog = self.programs.setdefault(rec.exe, ProgramStats())
        prog.accesses += 1
        prog.denied += denied
        prog.users.add(rec.user)


def collect(sources: Iterable[LogSource], since: int | None = None,
            until: int | None = None) -> Report:
    """Verify each log, then read the records in the period through once,
    the logs merged by time (cryptfs.audit.merge)."""
    rep = Report(since=since, until=until)
    for src in sources:
        rep.logs.append(LogResult(src, verify(src.logdir, src.public)))

    def of(lr: LogResult) -> Iterator[tuple[LogResult, dict[str, Any]]]:
        return ((lr, raw) for raw in records(lr.source.logdir, checked=False))

    for lr, raw in heapq.merge(*(of(lr) for lr in rep.logs), key=lambda i: merge_key(i[1])):
        rec = Rec.of(raw)
        if rec is None:
            lr.unreadable += 1
        elif (since is None or rec.t >= since) and (until is None or rec.t <= until):
            rep.add(lr, rec)
    return rep


def write_report(sources: list[LogSource], out: str, since: int | None = None,
                 until: int | None = None, now_ns: int | None = None) -> Report:
    """Write the page to ``out`` (replaced whole: a reader never sees half a page)."""
    for t in (since, until):
        if t is not None and not 0 <= t <= LATEST:
            raise UsageError(f"time out of range: {t / 1e9:g} s since 1970 (1970 to 9999)")
    if since is not None and until is not None and since > until:
        raise UsageError("--since is after --until")
    _replaceable(out)
    rep = collect(sources, since, until)
    page = render(rep, time.time_ns() if now_ns is None else now_ns)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        # 0600: the page names users, files and programs, as the log it reads
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with open(fd, "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(tmp, out)
    except OSError as e:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise BackingIOError(f"cannot write the report {out}: {e.strerror or e}") from None
    return rep


TITLE = "<title>cryptfs access report</title>"


def _replaceable(out: str) -> None:
    """The page replaces only an earlier page: never a device, a link or
    someone's file (a volume's config, once) that --html named by mistake."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    except OSError as e:
        raise BackingIOError(f"cannot write the report {out}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{out} exists and is not a regular file",
                         hint="name a new file for the report")
    try:  # (not through a link, nor blocked by a FIFO swapped in since the lstat)
        fd = os.open(out, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            head = f.read(4096) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError as e:
        raise BackingIOError(f"cannot read {out}: {e.strerror}") from None
    if TITLE.encode() not in head:
        raise UsageError(f"{out} exists and is not a page of `cryptfs audit report`",
                         hint="a report replaces only an earlier report: name a new file")


# -- showing untrusted text ------------------------------------------------------------------------
def _text(v: Any, limit: int = MAX_TEXT) -> str:
    """A string from the log, safe in HTML text and attribute values: control,
    format (bidi) and surrogate characters shown as escapes, then HTML-escaped."""
    s = _str(v)
    cut = len(s) > limit
    s = "".join(f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cf", "Cs") else c
                for c in s[:limit])
    return html.escape(s + ("…" if cut else ""), quote=True)


def _when(t_ns: int) -> str:
    """UTC ISO 8601 to the second, with the full time (ns) as a tooltip."""
    short = datetime.datetime.fromtimestamp(t_ns // 10**9, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")
    return f'<time datetime="{iso(t_ns)}" title="{iso(t_ns)}">{short}</time>'


def _utc(t_s: int, fmt: str = "%Y-%m-%dT%H:%M:%SZ") -> str:
    return datetime.datetime.fromtimestamp(t_s, datetime.UTC).strftime(fmt)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    x = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if x < 1024:
            return f"{x:.1f} {unit}"
        x /= 1024
    return f"{x:.1f} TiB"


def _span(ns: int) -> str:
    s = ns // 10**9
    if s < 120:
        return f"{s} s"
    if s < 2 * 3600:
        return f"{s // 60} min"
    if s < 2 * 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} days {s % 86400 // 3600} h"


def _n(n: int) -> str:
    return f"{n:,}"


def _users(names: set[str], most: int = 4) -> str:
    shown = sorted(names)[:most]
    more = f" +{len(names) - most}" if len(names) > most else ""
    return ", ".join(_text(u) for u in shown) + more


# -- the page -----------------------------------------------------------------------------------------
CSS = """
:root{--ink:#1d2330;--muted:#5c6677;--line:#dfe3ea;--soft:#f5f7fa;--ok:#1f7a3a;--ok-bg:#eaf6ee;
--warn:#8a5a00;--warn-bg:#fff6e0;--bad:#b3261e;--bad-bg:#fdecea}
*{box-sizing:border-box}
body{margin:0;background:#fff;color:var(--ink);font:14px/1.5 system-ui,-apple-system,"Segoe UI",
Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1120px;margin:0 auto;padding:28px 32px 48px}
header{border-bottom:2px solid var(--ink);padding-bottom:12px;margin-bottom:20px}
h1{font-size:24px;margin:0 0 4px;letter-spacing:-.01em}
h2{font-size:17px;margin:32px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line)}
.sub{color:var(--muted);margin:0}
code,.mono,td.path,td.exe{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,"Liberation Mono",
monospace;font-size:12.5px}
td.path,td.exe{word-break:break-all}
.verdict{border:1px solid var(--line);border-left:6px solid;border-radius:6px;padding:12px 16px;
margin:0 0 12px}
.verdict.ok{border-left-color:var(--ok);background:var(--ok-bg)}
.verdict.warn{border-left-color:#d89b00;background:var(--warn-bg)}
.verdict.bad{border:2px solid var(--bad);border-left:10px solid var(--bad);background:var(--bad-bg)}
.verdict .head{display:flex;gap:12px;align-items:baseline;flex-wrap:wrap}
.verdict .state{font-weight:700;font-size:18px}
.verdict.ok .state{color:var(--ok)}
.verdict.warn .state{color:var(--warn)}
.verdict.bad .state{color:#fff;background:var(--bad);padding:2px 10px;border-radius:4px;
letter-spacing:.04em}
.verdict .log{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;color:var(--muted)}
.verdict p{margin:6px 0 0}
.counts{display:flex;flex-wrap:wrap;gap:4px 18px;margin:8px 0 0;padding:0;list-style:none;
font-size:13px}
.counts strong{font-variant-numeric:tabular-nums}
.counts .hit{color:var(--bad);font-weight:700}
.firstbad{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12.5px;background:#fff;
border:1px solid #f0b8b3;padding:6px 8px;border-radius:4px;word-break:break-all}
.note{color:var(--muted);font-size:13px}
.keynote{color:var(--warn);font-size:13px}
.caution{background:#fff;color:var(--bad);border:1px solid #f0b8b3;border-radius:4px;padding:8px 12px;
font-weight:600}
.period{margin:0 0 10px;font-size:15px;font-weight:600}
.period .k{color:var(--muted);font-weight:400;margin-right:6px}
.tiles{display:grid;grid-template-columns:repeat(auto-fit,minmax(140px,1fr));gap:10px}
.tile{border:1px solid var(--line);border-radius:6px;padding:10px 12px;background:var(--soft)}
.tile .k{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.05em}
.tile .v{font-size:22px;font-weight:650;font-variant-numeric:tabular-nums}
.tile.alert{background:var(--bad-bg);border-color:#f0b8b3}
.tile.alert .v{color:var(--bad)}
figure{margin:0;border:1px solid var(--line);border-radius:6px;padding:12px 12px 8px}
svg text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;fill:#4a5262}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;margin:6px 4px 0;padding:0;list-style:none;
font-size:13px}
.legend i{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;
vertical-align:-1px}
table{width:100%;border-collapse:collapse;font-size:13px}
th{text-align:left;font-weight:600;color:var(--muted);border-bottom:2px solid var(--line);
padding:6px 8px;white-space:nowrap}
td{border-bottom:1px solid var(--line);padding:5px 8px;vertical-align:top}
tbody tr:nth-child(even){background:var(--soft)}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.time{white-space:nowrap;font-variant-numeric:tabular-nums}
.bad-text{color:var(--bad);font-weight:600}
.more{color:var(--muted);font-style:italic;margin:6px 0 0}
.empty{color:var(--muted);margin:4px 0}
footer{margin-top:36px;border-top:1px solid var(--line);padding-top:10px;color:var(--muted);
font-size:12.5px}
@media print{main{padding:0}.verdict,.tile,figure{break-inside:avoid}tr{break-inside:avoid}}
"""


def render(rep: Report, now_ns: int) -> str:
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
        # No script may run and nothing may be fetched, whatever a log holds.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
        "style-src 'unsafe-inline'\">\n",
        TITLE, "\n<style>", CSS, "</style>\n</head>\n<body>\n<main>\n",
        _header(rep, now_ns),
        _verification(rep),
        _summary(rep),
        _activity(rep),
        _top_files(rep),
        _top_programs(rep),
        _denials(rep),
        _failed_unlocks(rep),
        _integrity(rep),
        _footer(),
        "</main>\n</body>\n</html>\n",
    ]
    return "".join(parts)


def _header(rep: Report, now_ns: int) -> str:
    window = ""
    if rep.since is not None or rep.until is not None:
        window = (" · records from " + (_when(rep.since) if rep.since is not None else "the start")
                  + " to " + (_when(rep.until) if rep.until is not None else "the end"))
    n = len(rep.logs)
    return (f"<header><h1>Access report</h1><p class=\"sub\">{n} log{'s' if n != 1 else ''} · "
            f"generated {_when(now_ns)} by cryptfs {html.escape(__version__)}{window}</p>"
            "</header>\n")


def verdict_text(lr: LogResult) -> tuple[str, str]:
    """(the style of the verdict, its words): "valid", "valid, N records not yet sealed"
    or "DOES NOT VERIFY"."""
    v = lr.verdict
    if not v.ok:
        return "bad", "DOES NOT VERIFY"
    if v.unsealed:
        return "warn", f"valid, {_n(v.unsealed)} record{'s' if v.unsealed != 1 else ''} not yet sealed"
    return "ok", "valid"


def _verification(rep: Report) -> str:
    out = ["<section id=\"verification\"><h2>Verification</h2>\n"]
    hit = ' class="hit"'
    for lr in rep.logs:
        v, src = lr.verdict, lr.source
        cls, state = verdict_text(lr)
        mark = {"ok": "\u2713 ", "warn": "\u2713 ", "bad": "\u2717 "}[cls]
        ids = ", ".join(_text(i) for i in sorted(lr.log_ids)[:3])
        vols = ", ".join(_text(x[:12]) for x in sorted(lr.volumes)[:3])
        servers = ", ".join(_text(x) for x in sorted(v.servers)[:3])
        about = ("log" + (f" “{ids}”" if ids else "")
                 + (f" · server{'s' if len(v.servers) > 1 else ''} {servers}" if servers else "")
                 + (f" · volume {vols}" if vols else ""))
        out.append(f"<div class=\"verdict {cls}\"><div class=\"head\">"
                   f"<span class=\"state\">{mark}{state}</span>"
                   f"<span class=\"log\">{_text(src.logdir)}</span></div>\n"
                   f"<p class=\"note\">{about} · {_n(lr.records)} records in the period</p>\n")
        counts = [("valid", v.valid, False), ("modified", v.modified, True),
                  ("missing", v.missing, True), ("reordered", v.reordered, True),
                  ("gaps", v.gaps, True), ("bad seals", v.bad_seals, True),
                  ("not yet sealed", v.unsealed, False), ("segments", v.segments, False),
                  ("seals", v.epochs, False)]
        out.append("<ul class=\"counts\">" + "".join(
            f"<li{hit if bad and n else ''}>{name}: <strong>{_n(n)}</strong></li>"
            for name, n, bad in counts))
        if v.last_seal_ns is not None:
            out.append(f"<li>last seal: {_when(v.last_seal_ns)}</li>")
        out.append("</ul>\n")
        if not v.ok:
            first = v.first_bad or (v.problems[0] if v.problems else "")
            out.append(f"<p>First bad record:</p><p class=\"firstbad\">{_text(first)}</p>\n")
            if len(v.problems) > 1:
                out.append(f"<p class=\"note\">{_n(len(v.problems))} problems in all "
                           "(<code>cryptfs audit verify</code> lists the first).</p>\n")
            out.append("<p class=\"caution\">What follows includes this log’s records as found: "
                       "some of them were changed, removed or added after they were written, and "
                       "none of them can be relied on.</p>\n")
        elif v.unsealed:
            out.append(f"<p class=\"note\">The last {_n(v.unsealed)} records come after the last "
                       "seal: they are chained but no signature covers them yet (a live log is "
                       "sealed at least every minute).</p>\n")
        elif v.segments == 0:
            out.append("<p class=\"note\">Nothing has been written to this log yet.</p>\n")
        if src.key_stored:
            out.append("<p class=\"keynote\">Checked with the key stored next to the log "
                       f"({_text(os.path.join(src.logdir, PUB_NAME))}). Whoever could rewrite "
                       "the log could also replace that key, so this proves less than a check "
                       "with a copy of the key kept elsewhere (<code>--key</code>).</p>\n")
        else:
            out.append("<p class=\"note\">Checked with the verifier key given "
                       f"(<code>{_text(verifier_text(src.public)[:40])}…</code>).</p>\n")
        if lr.unreadable:
            out.append(f"<p class=\"bad-text\">{_n(lr.unreadable)} records have no usable time "
                       "or event and are left out of everything below.</p>\n")
        out.append("</div>\n")
    return "".join(out) + "</section>\n"


def _summary(rep: Report) -> str:
    if rep.first is not None and rep.last is not None:
        period = (f"{_when(rep.first)} to {_when(rep.last)} "
                  f"<span class=\"note\">({_span(rep.last - rep.first)})</span>")
    else:
        period = "no records"

    def tile(key: str, value: int, alert: bool = False) -> str:
        cls = "tile alert" if alert and value else "tile"
        return f"<div class=\"{cls}\"><div class=\"k\">{key}</div><div class=\"v\">{_n(value)}</div></div>"

    files = sum(1 for st in rep.files.values() if st.accesses)
    return ("<section id=\"summary\"><h2>Summary</h2>"
            f"<p class=\"period\"><span class=\"k\">Period covered</span> {period}</p>"
            "<div class=\"tiles\">"
            + tile("Records", rep.records) + tile("Users", len(rep.users))
            + tile("Files", files) + tile("Denials", rep.denials.total, True)
            + tile("Failed unlocks", rep.failed_unlocks.total, True)
            + tile("Integrity failures", rep.integrity.total, True)
            + "</div>"
            + (f"<p class=\"note\">Users: {_users(rep.users, 12)}</p>" if rep.users else "")
            + "</section>\n")


WIDTH_NAMES = {60: "minute", 300: "5 minutes", 900: "15 minutes", 1800: "30 minutes", 3600: "hour",
               3 * 3600: "3 hours", 6 * 3600: "6 hours", 12 * 3600: "12 hours", 86400: "day",
               7 * 86400: "week", 14 * 86400: "2 weeks", 28 * 86400: "4 weeks"}


# Times the x axis is labelled at (s): the first of these, a multiple of the
# bucket width, that gives at most 8 labels.
LABEL_STEPS = (60, 300, 900, 1800, 3600, 2 * 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400,
               2 * 86400, 7 * 86400, 14 * 86400, 28 * 86400, 56 * 86400, 112 * 86400)


def _nice_step(top: int) -> int:
    """A step of 1, 2 or 5 × 10^k that divides 0..top into at most 5 intervals."""
    step = 1
    while True:
        for m in (1, 2, 5):
            if top <= 5 * step * m:
                return step * m
        step *= 10


def _activity(rep: Report) -> str:
    head = "<section id=\"activity\"><h2>Accesses per user over time</h2>\n"
    tl = rep.timeline
    if tl.lo is None or tl.hi is None:
        return head + "<p class=\"empty\">No accesses in this period.</p></section>\n"
    lo = tl.lo if rep.since is None else min(tl.lo, rep.since // 10**9)
    hi = tl.hi if rep.until is None else max(tl.hi, rep.until // 10**9)
    tl.fit(lo, hi)
    w = tl.width
    first, n = lo // w, hi // w - lo // w + 1
    series = sorted(rep.per_user, key=lambda u: (-rep.per_user[u], u))[:MAX_SERIES]
    if len(rep.per_user) > MAX_SERIES:
        series = series[:MAX_SERIES - 1]
    others = len(rep.per_user) > len(series)
    colours = {u: PALETTE[i] for i, u in enumerate(series)}
    stacks: list[list[tuple[str, int, str]]] = []  # per bucket: (label, count, colour)
    for b in range(first, first + n):
        c = tl.counts.get(b, Counter())
        stack = [(u, c[u], colours[u]) for u in series if c[u]]
        rest = sum(c.values()) - sum(x for _, x, _ in stack)
        if rest:
            stack.append(("others", rest, OTHERS_COLOUR))
        stacks.append(stack)
    top = max((sum(x for _, x, _ in s) for s in stacks), default=0) or 1
    step = _nice_step(top)
    ymax = step * -(-top // step)
    labels = _x_labels([(first + i) * w for i in range(n)], w)
    label_lines = max((len(lines) for _, lines in labels), default=1)
    W, L, R, T, B = 1040, 58, 16, 14, 44 + 14 * label_lines  # viewBox width and margins
    H = T + 236 + B
    pw, ph = W - L - R, H - T - B
    slot = pw / n
    bar = max(slot * 0.78, 1.0)
    unit = WIDTH_NAMES.get(w, f"{w // 86400} days")
    svg = [f"<svg viewBox=\"0 0 {W} {H}\" width=\"100%\" role=\"img\" "
           f"aria-label=\"Accesses per user per {unit}\">"]
    for k in range(0, ymax + 1, step):  # horizontal grid and y labels
        y = T + ph - ph * k / ymax
        svg.append(f"<line x1=\"{L}\" x2=\"{W - R}\" y1=\"{y:.1f}\" y2=\"{y:.1f}\" "
                   f"stroke=\"{'#9aa3b2' if k == 0 else '#e6e9ef'}\" stroke-width=\"1\"/>"
                   f"<text x=\"{L - 8}\" y=\"{y + 4:.1f}\" text-anchor=\"end\" "
                   f"font-size=\"12\">{_n(k)}</text>")
    svg.append(f"<text transform=\"translate(14 {T + ph / 2:.0f}) rotate(-90)\" "
               f"text-anchor=\"middle\" font-size=\"12\">accesses per {unit}</text>")
    for i, stack in enumerate(stacks):
        x = L + slot * i + (slot - bar) / 2
        y = T + ph
        t0 = (first + i) * w
        span = f"{_utc(t0)} – {_utc(t0 + w)}"
        for label, count, colour in stack:
            h = ph * count / ymax
            y -= h
            svg.append(f"<rect x=\"{x:.1f}\" y=\"{y:.1f}\" width=\"{bar:.1f}\" height=\"{h:.1f}\" "
                       f"fill=\"{colour}\"><title>{_text(label)}: {_n(count)} · {span}</title></rect>")
    for i, lines in labels:
        x = L + slot * i
        svg.append(f"<line x1=\"{x:.1f}\" x2=\"{x:.1f}\" y1=\"{T + ph}\" y2=\"{T + ph + 5}\" "
                   "stroke=\"#9aa3b2\"/>")
        svg.append(f"<text x=\"{x:.1f}\" y=\"{T + ph + 19}\" text-anchor=\"middle\" font-size=\"12\">"
                   + "".join(f"<tspan x=\"{x:.1f}\" dy=\"{0 if j == 0 else 14}\">{s}</tspan>"
                             for j, s in enumerate(lines)) + "</text>")
    svg.append(f"<text x=\"{L + pw / 2:.0f}\" y=\"{H - 6}\" text-anchor=\"middle\" "
               "font-size=\"12\">time (UTC)</text></svg>")
    legend = ["<ul class=\"legend\">"]
    for u in series:
        legend.append(f"<li><i style=\"background:{colours[u]}\"></i>{_text(u)} "
                      f"<span class=\"note\">{_n(rep.per_user[u])}</span></li>")
    if others:
        rest_users = len(rep.per_user) - len(series)
        rest = sum(rep.per_user.values()) - sum(rep.per_user[u] for u in series)
        legend.append(f"<li><i style=\"background:{OTHERS_COLOUR}\"></i>{_n(rest_users)} other "
                      f"users <span class=\"note\">{_n(rest)}</span></li>")
    legend.append("</ul>")
    return (head + "<figure>" + "".join(svg) + "".join(legend) + "</figure>\n"
            f"<p class=\"note\">One bar per {unit}, stacked by user. An access is a record of a "
            "request for a file or directory (open, create, rename, unlink, …, and attempts "
            "that were denied); a close is not counted apart from its open.</p></section>\n")


def _x_labels(starts: list[int], w: int) -> list[tuple[int, list[str]]]:
    """Which buckets get a time label, and its lines: at most 8, at round times."""
    step = next((s for s in LABEL_STEPS if s % w == 0
                 and 0 < sum(1 for t0 in starts if t0 % s == 0) <= 8), None)
    if step is None:
        chosen = list(range(0, len(starts), -(-len(starts) // 8)))
    else:
        chosen = [i for i, t0 in enumerate(starts) if t0 % step == 0]
    labels, last_day = [], ""
    for i in chosen:
        day = _utc(starts[i], "%Y-%m-%d")
        if w >= 86400 or (step or 0) >= 86400:
            labels.append((i, [day]))
        else:  # the time, and the date under the first time of each day
            labels.append((i, [_utc(starts[i], "%H:%M")] + ([day] if day != last_day else [])))
        last_day = day
    return labels


def _table(head: list[tuple[str, str]], rows: list[str]) -> str:
    ths = "".join(f"<th class=\"{cls}\">{name}</th>" if cls else f"<th>{name}</th>"
                  for name, cls in head)
    return f"<table><thead><tr>{ths}</tr></thead><tbody>" + "".join(rows) + "</tbody></table>\n"


def _more(shown: int, total: int, what: str, how: str) -> str:
    if total <= shown:
        return ""
    return f"<p class=\"more\">{_n(total - shown)} more {what} not shown. {how}</p>\n"


def _top_files(rep: Report) -> str:
    head = "<section id=\"files\"><h2>Top files</h2>\n"
    items = [(p, st) for p, st in rep.files.items() if st.accesses]
    if not items:
        return head + "<p class=\"empty\">No file was accessed in this period.</p></section>\n"
    top = heapq.nsmallest(TOP_FILES, items, key=lambda i: (-i[1].accesses, i[0]))
    rows = [f"<tr><td class=\"path\">{_text(p)}</td><td class=\"num\">{_n(st.accesses)}</td>"
            f"<td>{_users(st.users)}</td>"
            f"<td class=\"num\" title=\"{_n(st.bytes_read)} bytes\">{_size(st.bytes_read)}</td>"
            f"<td class=\"num\" title=\"{_n(st.bytes_written)} bytes\">{_size(st.bytes_written)}</td>"
            f"<td class=\"num{' bad-text' if st.denied else ''}\">{_n(st.denied)}</td></tr>"
            for p, st in top]
    return (head + _table([("Path", ""), ("Accesses", "num"), ("Users", ""), ("Read", "num"),
                           ("Written", "num"), ("Denied", "num")], rows)
            + _more(len(top), len(items), "files", "")
            + "<p class=\"note\">Read and written: the bytes that went through the file’s opens, "
              "as counted at each close.</p></section>\n")


def _top_programs(rep: Report) -> str:
    head = "<section id=\"programs\"><h2>Top programs</h2>\n"
    if not rep.programs:
        return head + "<p class=\"empty\">No program accessed the volume in this period.</p></section>\n"
    top = heapq.nsmallest(TOP_PROGRAMS, rep.programs.items(), key=lambda i: (-i[1].accesses, i[0]))
    rows = [f"<tr><td class=\"exe\">{_text(exe) if exe else '<i>unknown</i>'}</td>"
            f"<td class=\"num\">{_n(st.accesses)}</td><td>{_users(st.users)}</td>"
            f"<td class=\"num{' bad-text' if st.denied else ''}\">{_n(st.denied)}</td></tr>"
            for exe, st in top]
    return (head + _table([("Program (executable)", ""), ("Accesses", "num"), ("Users", ""),
                           ("Denied", "num")], rows)
            + _more(len(top), len(rep.programs), "programs", "") + "</section>\n")


def _path_cell(rec: Rec) -> str:
    p = "" if rec.path is None else _text(rec.path)
    if rec.new_path is not None:
        p += " → " + _text(rec.new_path)
    return f"<td class=\"path\">{p}</td>"


def _exe_cell(rec: Rec) -> str:
    return f"<td class=\"exe\">{_text(rec.exe) if rec.exe else '<i>unknown</i>'}</td>"


def _incidents(section: str, title: str, kept: Capped, nothing: str, head: list[tuple[str, str]],
               row: Callable[[Rec], str], what: str, how: str, note: str = "") -> str:
    """A section listing the first records of one kind (denials, failed
    unlocks, integrity failures), or saying there were none."""
    top = f"<section id=\"{section}\"><h2>{title}</h2>\n"
    if not kept.total:
        return top + f"<p class=\"empty\">{nothing}</p></section>\n"
    shown = kept.rows()
    return (top + note + _table(head, [row(r) for r in shown])
            + _more(len(shown), kept.total, what, how) + "</section>\n")


def _when_cell(r: Rec) -> str:
    return f"<td class=\"time\">{_when(r.t)}</td>"


def _by_server(rep: Report) -> bool:
    """Whether the tables name the server of each row: when the records come
    from more than one."""
    return len(rep.servers) > 1


def _when_where(rep: Report) -> list[tuple[str, str]]:
    return [("Time (UTC)", "")] + ([("Server", "")] if _by_server(rep) else [])


def _when_where_cells(rep: Report, r: Rec) -> str:
    return _when_cell(r) + (f"<td>{_text(r.server)}</td>" if _by_server(rep) else "")


def _denials(rep: Report) -> str:
    return _incidents(
        "denials", "Denials", rep.denials, "No access was denied in this period.",
        [*_when_where(rep), ("User", ""), ("Program", ""), ("Event", ""), ("Path", ""),
         ("Reason", "")],
        lambda r: (f"<tr>{_when_where_cells(rep, r)}<td>{_text(r.user)}</td>{_exe_cell(r)}"
                   f"<td>{_text(r.event)}</td>{_path_cell(r)}<td>{_text(r.reason)}</td></tr>"),
        "denials", "The first ones are shown; <code>cryptfs audit export LOGDIR --format csv</code> "
                   "lists all (outcome <code>denied</code>).")


def _failed_unlocks(rep: Report) -> str:
    nothing = ("No failed unlock in this period"
               + ("" if any(lr.sessions for lr in rep.logs)
                  else " (no log here records unlocks: the key agent’s log does, "
                       "<code>cryptfs-agent --audit-log</code>)") + ".")
    return _incidents(
        "unlocks", "Failed unlocks", rep.failed_unlocks, nothing,
        [*_when_where(rep), ("User", ""), ("Program", ""), ("Volume", ""), ("Slot", "num"),
         ("In a row", "num"), ("Reason", "")],
        lambda r: (f"<tr>{_when_where_cells(rep, r)}<td>{_text(r.user)}</td>{_exe_cell(r)}{_path_cell(r)}"
                   f"<td class=\"num\">{_text(r.raw.get('slot'))}</td>"
                   f"<td class=\"num\">{_text(r.raw.get('failures'))}</td>"
                   f"<td>{_text(r.reason)}</td></tr>"),
        "failed unlocks", "The first ones are shown; <code>cryptfs audit export LOGDIR --event "
                          "unlock</code> lists all.")


def _integrity(rep: Report) -> str:
    return _incidents(
        "integrity", "Integrity failures", rep.integrity,
        "No integrity failure in this period.",
        [*_when_where(rep), ("Path", ""), ("Inode", "num"), ("Where", "")],
        lambda r: (f"<tr>{_when_where_cells(rep, r)}{_path_cell(r)}"
                   f"<td class=\"num\">{_text(r.raw.get('ino'))}</td>"
                   f"<td>{_text(r.reason)}</td></tr>"),
        "integrity failures", "The first ones are shown; <code>cryptfs audit export LOGDIR "
                              "--event integrity-failure</code> lists all.",
        note="<p class=\"note\">A block or header of a file did not authenticate: the "
             "ciphertext was changed or damaged, and the mount refused to serve it (EIO).</p>")


def _footer() -> str:
    return ("<footer>Each log is checked by <code>cryptfs audit verify</code>’s rules: every record "
            "chained to the one before it, every seal signed with the key the previous seal "
            "certified, starting from the log’s first public key. Records after the last seal are "
            "chained but not yet proven. Times are UTC. Every name on this page (paths, users, "
            "programs) is shown as the log holds it; control characters appear as "
            "<code>\\uXXXX</code>.</footer>\n")
