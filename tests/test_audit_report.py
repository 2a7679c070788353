"""cryptfs audit report: the page an auditor reads, rendered by a real browser.

The logs are written by the real writer (a working day on a shared volume,
the key agent's log beside it, a tampered copy) and by a real mount; the page
is rendered in headless Chromium and what it shows is checked in the DOM the
browser built: the verdicts, the numbers, the names, and that names which
are HTML or script show as text and inject nothing.

docs/audit-report.png is a screenshot of the page this module builds: set
CRYPTFS_REPORT_SCREENSHOT=PATH to have the test write it there.
"""

from __future__ import annotations

import datetime
import html.parser
import json
import os
import random
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import CRYPTFS, make_volume, new_mount, run_cli
from cryptfs.audit import report
from cryptfs.audit.chain import parse_verifier
from cryptfs.audit.writer import AuditLog, init_log

SCRIPT_NAME = "<script>alert(1)</script>"
QUOTES_NAME = '"&<>.txt'
IMG_PAYLOAD = "<img src=x onerror=\"document.title='pwned'\">"
BOLD_USER = "<b>mallory</b>&amp;"  # a user name as the log holds it: must show as typed
VOLUME = "5f0c2a9e" * 4
DAY = int(datetime.datetime(2026, 3, 2, tzinfo=datetime.UTC).timestamp()) * 10**9
HOUR = 3600 * 10**9


# -- the logs ------------------------------------------------------------------------------------
class Writer:
    """The real writer, with a clock this test sets."""

    def __init__(self, logdir: Path, log_id: str, seal_every: int = 40) -> None:
        self.pub = init_log(str(logdir), log_id)
        self.t = DAY
        self.log = AuditLog(str(logdir), seal_every=seal_every, seal_seconds=1e9,
                               clock=lambda: self.t)
        self.written: list[dict[str, Any]] = []

    def at(self, hours: float) -> Writer:
        self.t = DAY + round(hours * 3600) * 10**9
        return self

    def rec(self, event: str, outcome: str, user: str, uid: int, exe: str, **f: Any) -> None:
        self.written.append(self.log.record(event=event, outcome=outcome, uid=uid, user=user,
                                            pid=4000 + uid % 1000, exe=exe, volume=VOLUME, **f))


@dataclass
class Logs:
    customers: Path
    agent: Path  # a copy of a live log: its last records are not sealed yet
    tampered: Path
    customers_pub: str
    agent_pub: str
    records: list[dict[str, Any]] = field(default_factory=list)  # of customers and agent
    tampered_seqs: list[int] = field(default_factory=list)


UIDS = {"alice": 1001, "bob": 1002, "carol": 1003, "dave": 1004, "root": 0, BOLD_USER: 1666}
FILES = ["/customers/accounts.csv", "/customers/contracts/acme-2026.pdf", "/finance/q1-forecast.xlsx",
         "/finance/invoices/2026-02.xlsx", "/projects/apollo/plan.md", "/projects/apollo/budget.ods",
         "/hr/handbook.pdf", "/customers/leads.csv"]
PROGRAMS = {"alice": ["/usr/lib/libreoffice/program/soffice.bin", "/usr/bin/evince"],
            "bob": ["/usr/bin/python3.11", "/usr/bin/vim.basic"],
            "carol": ["/usr/lib/libreoffice/program/soffice.bin", "/usr/bin/cp"],
            "dave": ["/usr/bin/less", "/usr/bin/grep"]}


def _workday(w: Writer, rnd: random.Random) -> None:
    w.at(7.9).rec("mount", "allowed", "root", 0, "/usr/bin/python3.11", path="/mnt/shared")
    busy = {"alice": 70, "bob": 45, "carol": 30, "dave": 18}
    hours = {"alice": (8.2, 17.5), "bob": (9.0, 17.9), "carol": (10.0, 16.0), "dave": (13.0, 17.8)}
    events = []
    for user, n in busy.items():
        for _ in range(n):
            events.append((rnd.uniform(*hours[user]), user))
    for h, user in sorted(events):
        uid, exe = UIDS[user], rnd.choice(PROGRAMS[user])
        # alice lives in the customer files; everyone reads the plan
        path = FILES[0] if user == "alice" and rnd.random() < 0.5 else rnd.choice(FILES)
        w.at(h)
        if rnd.random() < 0.8:
            w.rec("open", "allowed", user, uid, exe, path=path, intent="read")
            w.at(h + 0.01).rec("close", "allowed", user, uid, exe, path=path,
                               bytes_read=rnd.randrange(2_000, 400_000), bytes_written=0,
                               duration_ns=36 * 10**9)
        else:
            w.rec("open", "allowed", user, uid, exe, path=path, intent="read-write")
            w.at(h + 0.02).rec("close", "allowed", user, uid, exe, path=path, bytes_read=0,
                               bytes_written=rnd.randrange(1_000, 90_000), duration_ns=72 * 10**9)
    # bob tries the salaries, again and again; dave looks into /hr; mallory lists it
    for i in range(4):
        w.at(13.1 + i * 0.05).rec("open", "denied", "bob", 1002, "/usr/bin/python3.11",
                                   path="/hr/salaries.xlsx", intent="read", reason="EACCES")
    w.at(15.0).rec("lookup", "denied", "dave", 1004, "/usr/bin/less", path="/hr/reviews",
                   reason="EACCES")
    w.at(16.9).rec("readdir", "denied", BOLD_USER, 1666, "/tmp/.x/<svg onload=alert(3)>",
                   path="/hr", reason="EPERM")
    # root's backup, a new file with a hostile name, a rename and a deletion
    w.at(12.5).rec("open", "allowed", "root", 0, "/usr/bin/rsync", path=FILES[2], intent="read")
    w.at(12.51).rec("close", "allowed", "root", 0, "/usr/bin/rsync", path=FILES[2],
                    bytes_read=1_250_000, bytes_written=0, duration_ns=10**8)
    for name in (SCRIPT_NAME, QUOTES_NAME):
        w.at(14.2).rec("create", "allowed", "carol", 1003, "/usr/bin/cp", path=f"/inbox/{name}")
        w.at(14.2).rec("close", "allowed", "carol", 1003, "/usr/bin/cp", path=f"/inbox/{name}",
                       bytes_read=0, bytes_written=512, duration_ns=10**6)
    w.at(14.5).rec("rename", "allowed", "carol", 1003, "/usr/bin/mv",
                   path="/projects/apollo/plan.md", new_path="/projects/apollo/plan-v2.md")
    w.at(17.2).rec("unlink", "allowed", "dave", 1004, "/usr/bin/rm", path="/customers/leads.csv")
    # a block of a file that does not authenticate (what the mount writes: uid -1, pid 0)
    w.at(15.7).rec("integrity-failure", "error", "-1", -1, "", path=FILES[2], ino=812,
                   reason="block 3: ciphertext does not authenticate")
    w.at(18.0).rec("unmount", "allowed", "root", 0, "/usr/bin/fusermount3", path="/mnt/shared")
    w.written.sort(key=lambda r: r["seq"])


def _agent_day(w: Writer) -> None:
    def unlock(h: float, user: str, outcome: str, **f: Any) -> None:
        w.at(h).rec("unlock", outcome, user, UIDS[user], "/usr/lib/cryptfs/cryptfs-pam",
                    path="/srv/shared", slot=UIDS[user] - 1000, **f)

    unlock(8.1, "alice", "allowed")
    unlock(8.9, "bob", "denied", reason="wrong passphrase", failures=1)
    unlock(8.91, "bob", "denied", reason="wrong passphrase", failures=2)
    unlock(8.93, "bob", "allowed")
    unlock(9.9, "carol", "allowed")
    unlock(12.9, "dave", "allowed")
    w.at(18.0).rec("lock", "allowed", "alice", 1001, "", path="/srv/shared", reason="idle")
    w.log.seal()
    unlock(19.5, BOLD_USER, "denied", reason="wrong passphrase", failures=1)
    w.at(19.6).rec("lock", "allowed", "bob", 1002, "", path="/srv/shared", reason="requested")


def make_logs(root: Path) -> Logs:
    rnd = random.Random(20260302)
    mount_log = Writer(root / "customers", "customers")
    _workday(mount_log, rnd)
    mount_log.log.close()
    agent = Writer(root / "agent-live", "agent", seal_every=1000)
    _agent_day(agent)
    shutil.copytree(root / "agent-live", root / "agent")  # an auditor's copy of the live log
    agent.log.close()
    # The tampered copy: bob's first denial becomes "allowed", and a path becomes markup.
    shutil.copytree(root / "customers", root / "tampered")
    seg = sorted((root / "tampered").glob("segment-*.log"))[0]
    lines = seg.read_text().splitlines()
    changed = []
    for i, line in enumerate(lines):
        obj = json.loads(line)
        if obj.get("event") == "open" and obj.get("outcome") == "denied" and not changed:
            obj["outcome"] = "allowed"
        elif obj.get("event") == "rename" and len(changed) == 1:
            obj["new_path"] = IMG_PAYLOAD
        else:
            continue
        lines[i] = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        changed.append(obj["seq"])
    seg.write_text("\n".join(lines) + "\n")
    return Logs(root / "customers", root / "agent", root / "tampered", mount_log.pub, agent.pub,
                mount_log.written + agent.written, changed)


# -- the browser -------------------------------------------------------------------------------
def chromium(*args: str) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("the report tests need Chromium: apt-get install -y chromium")
    sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []
    res = subprocess.run([exe, "--headless", *sandbox, "--disable-gpu", "--no-first-run",
                          "--disable-extensions", "--hide-scrollbars", *args],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, pred: Callable[[Node], bool] = lambda n: True) -> list[Node]:
        out = [self] if pred(self) else []
        for c in self.children:
            if isinstance(c, Node):
                out += c.all(pred)
        return out

    def find(self, tag: str, cls: str | None = None, id: str | None = None) -> list[Node]:
        return self.all(lambda n: n.tag == tag
                        and (cls is None or cls in n.attrs.get("class", "").split())
                        and (id is None or n.attrs.get("id") == id))


VOID = {"meta", "link", "br", "img", "input", "hr", "col", "area", "base", "wbr", "source"}


class _Tree(html.parser.HTMLParser):
    """The DOM as Chromium serialised it (--dump-dom), as a tree."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                break

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def dom(text: str) -> Node:
    p = _Tree()
    p.feed(text)
    p.close()
    return p.root


def squash(s: str) -> str:
    return " ".join(s.split())


def tiles(doc: Node) -> dict[str, str]:
    return {squash(t.find("div", "k")[0].text()): squash(t.find("div", "v")[0].text())
            for t in doc.find("div", "tile")}


def period(doc: Node) -> str:
    return squash(doc.find("p", "period")[0].text())


def table_rows(doc: Node, section: str) -> list[list[str]]:
    sec = doc.find("section", id=section)[0]
    return [[squash(td.text()) for td in tr.find("td")] for tr in sec.find("tr") if tr.find("td")]


def png_size(p: Path) -> tuple[int, int]:
    data = p.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Logs:
    return make_logs(tmp_path_factory.mktemp("report"))


@dataclass
class Rendered:
    html: Path
    doc: Node  # the DOM Chromium built
    cli: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def good(logs: Logs) -> Rendered:
    """The mount's log and the agent's, with the keys kept elsewhere (named as
    an auditor in the directory of the copies would: the page shows them so)."""
    out = logs.customers.parent / "report.html"
    res = subprocess.run(CRYPTFS + ["audit", "report", "customers", "agent", "--html", out.name,
                                    "--key", logs.customers_pub, "--key", logs.agent_pub],
                         cwd=out.parent, capture_output=True, text=True, timeout=60)
    return Rendered(out, dom(chromium("--dump-dom", out.as_uri())), res)


@pytest.fixture(scope="module")
def tampered(logs: Logs) -> Rendered:
    """The tampered copy, verified with the key stored next to it."""
    out = logs.tampered.parent / "tampered.html"
    res = run_cli("audit", "report", str(logs.tampered), "--html", str(out), check=False)
    return Rendered(out, dom(chromium("--dump-dom", out.as_uri())), res)


def test_the_report_is_never_written_into_a_log(logs: Logs) -> None:
    """--html naming one of the log's files replaced a segment (or the key) with the
    page; anything inside a LOGDIR is refused, and the log stays as it was."""
    own = {p.name: p.read_bytes() for p in logs.customers.iterdir()}
    for name in [*own, "report.html"]:
        out = logs.customers / name
        res = run_cli("audit", "report", str(logs.customers), "--html", str(out), check=False)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert f"--html {out} is inside the log directory {logs.customers}" in res.stderr
    assert {p.name: p.read_bytes() for p in logs.customers.iterdir()} == own


def test_the_report_replaces_only_an_earlier_report(logs: Logs, tmp_path: Path) -> None:
    """--html /dev/full replaced the device with a page, and --html BACKING/cryptfs.conf
    a volume's config; a page now replaces nothing but an earlier page."""
    args = ["audit", "report", str(logs.customers), "--html"]
    notes = tmp_path / "notes.txt"
    notes.write_text("an admin's notes\n")
    link = tmp_path / "link.html"
    link.symlink_to(notes)
    for out, msg in ((notes, "exists and is not a page of `cryptfs audit report`"),
                     (link, "exists and is not a regular file"),
                     (Path("/dev/full"), "exists and is not a regular file")):
        res = run_cli(*args, str(out), check=False)
        assert res.returncode == 2 and f"cryptfs: error: {out} {msg}" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and "cryptfs: hint: " in res.stderr
    assert notes.read_text() == "an admin's notes\n" and link.is_symlink()
    assert Path("/dev/full").is_char_device()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.html", "notes.txt"]
    # Not among a volume's ciphertext either, even as a new file.
    backing = tmp_path / "vol"
    make_volume(backing)
    conf = (backing / "cryptfs.conf").read_bytes()
    for out in (backing / "cryptfs.conf", backing / "tree" / "r.html"):
        res = run_cli(*args, str(out), check=False)
        assert res.returncode == 2, res.stderr
        assert f"{out} is inside the backing directory of the volume {backing}" in res.stderr
    assert (backing / "cryptfs.conf").read_bytes() == conf
    # An earlier page is replaced whole.
    page = tmp_path / "r.html"
    run_cli(*args, str(page))
    first = page.read_text()
    run_cli(*args, str(page))
    assert page.read_text().count(report.TITLE) == 1 and first.count(report.TITLE) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.html", "notes.txt", "r.html", "vol"]


# -- what the page shows -------------------------------------------------------------------------
def test_sections_in_order_verdict_first(good: Rendered) -> None:
    assert good.cli.returncode == 0, good.cli.stderr
    assert good.cli.stdout.splitlines() == ["customers: valid",
                                            "agent: valid, 2 records not yet sealed",
                                            "report: report.html"]
    ids = [s.attrs["id"] for s in good.doc.find("section")]
    assert ids == ["verification", "summary", "activity", "files", "programs", "denials",
                   "unlocks", "integrity"]
    assert squash(good.doc.find("title")[0].text()) == "cryptfs access report"


def test_verdicts(good: Rendered, logs: Logs) -> None:
    cards = good.doc.find("div", "verdict")
    assert len(cards) == 2
    states = [squash(c.find("span", "state")[0].text()) for c in cards]
    assert states == ["\u2713 valid", "\u2713 valid, 2 records not yet sealed"]
    assert [c.attrs["class"] for c in cards] == ["verdict ok", "verdict warn"]
    assert squash(cards[0].find("span", "log")[0].text()) == "customers"
    counts = " ".join(squash(li.text()) for li in cards[0].find("li"))
    n = sum(1 for r in logs.records if r["log"] == "customers")
    assert f"valid: {n:,} modified: 0 missing: 0" in counts
    assert "proves less" not in good.doc.text()  # the keys were given
    assert "Checked with the verifier key given" in cards[1].text()
    assert "agent: valid, 2 records not yet sealed" in good.cli.stdout


def test_summary_numbers(good: Rendered, logs: Logs) -> None:
    recs = logs.records
    people = {r["user"] for r in recs if r["uid"] >= 0 and r["event"] not in ("mount", "unmount")}
    accessed = {p for r in recs if r["event"] not in report.NOT_ACCESS
                for p in (r.get("path"), r.get("new_path")) if p}
    t = tiles(good.doc)
    assert t["Records"] == f"{len(recs):,}"
    assert t["Users"] == str(len(people)) == "6"
    assert t["Files"] == str(len(accessed))
    assert t["Denials"] == "6" and t["Failed unlocks"] == "3" and t["Integrity failures"] == "1"
    assert period(good.doc) == ("Period covered 2026-03-02T07:54:00Z to 2026-03-02T19:36:00Z "
                                "(11 h 42 min)")
    summary = good.doc.find("section", id="summary")[0].text()
    assert "alice" in summary and BOLD_USER in summary


def test_chart_per_user_over_time(good: Rendered, logs: Logs) -> None:
    sec = good.doc.find("section", id="activity")[0]
    svg = sec.find("svg")[0]
    texts = [" ".join(squash(s.text()) for s in t.find("tspan")) or squash(t.text())
             for t in svg.find("text")]
    # 08:12 .. 17:54 of accesses: 15-minute buckets (5 would be more than 48 bars)
    assert "accesses per 15 minutes" in texts and "time (UTC)" in texts
    assert "10:00 2026-03-02" in texts and "12:00" in texts and "16:00" in texts
    legend = [squash(li.text()) for li in sec.find("ul", "legend")[0].find("li")]
    per_user: dict[str, int] = {}
    for r in logs.records:
        if r["event"] not in report.NOT_ACCESS:
            per_user[r["user"]] = per_user.get(r["user"], 0) + 1
    assert legend == [f"{u} {n}" for u, n in sorted(per_user.items(), key=lambda i: (-i[1], i[0]))]
    # every access is in one bar: the tooltips add up to the legend
    drawn: dict[str, int] = {}
    for rect in svg.find("rect"):
        user, n = re.match(r"(.*): ([\d,]+) · ", rect.find("title")[0].text()).groups()  # type: ignore[union-attr]
        drawn[user] = drawn.get(user, 0) + int(n.replace(",", ""))
    assert drawn == per_user


def test_top_files_and_programs(good: Rendered, logs: Logs) -> None:
    files = table_rows(good.doc, "files")
    assert files[0][0] == "/customers/accounts.csv"
    closes = [r for r in logs.records if r["event"] == "close" and r["path"] == files[0][0]]
    read = sum(r["bytes_read"] for r in closes)
    cell = good.doc.find("section", id="files")[0].find("td")[3]
    assert cell.attrs["title"] == f"{read:,} bytes" and cell.text().endswith(" MiB")
    assert [f"/inbox/{SCRIPT_NAME}", "1", "carol", "0 B", "512 B", "0"] in files
    assert ["/hr/salaries.xlsx", "4", "bob", "0 B", "0 B", "4"] in files
    programs = {row[0]: row for row in table_rows(good.doc, "programs")}
    assert programs["/usr/bin/python3.11"][3] == "4"  # bob's denials
    assert "/tmp/.x/<svg onload=alert(3)>" in programs


def test_denials_unlocks_integrity_tables(good: Rendered) -> None:
    denials = table_rows(good.doc, "denials")
    assert denials[0] == ["2026-03-02T13:06:00Z", "bob", "/usr/bin/python3.11", "open",
                          "/hr/salaries.xlsx", "EACCES"]
    assert [d[1] for d in denials] == ["bob"] * 4 + ["dave", BOLD_USER]
    unlocks = table_rows(good.doc, "unlocks")
    assert unlocks == [
        ["2026-03-02T08:54:00Z", "bob", "/usr/lib/cryptfs/cryptfs-pam", "/srv/shared", "2", "1",
         "wrong passphrase"],
        ["2026-03-02T08:54:36Z", "bob", "/usr/lib/cryptfs/cryptfs-pam", "/srv/shared", "2", "2",
         "wrong passphrase"],
        ["2026-03-02T19:30:00Z", BOLD_USER, "/usr/lib/cryptfs/cryptfs-pam", "/srv/shared", "666",
         "1", "wrong passphrase"]]
    assert table_rows(good.doc, "integrity") == [
        ["2026-03-02T15:42:00Z", "/finance/q1-forecast.xlsx", "812",
         "block 3: ciphertext does not authenticate"]]


def test_hostile_names_show_as_text_and_inject_nothing(good: Rendered) -> None:
    text = good.doc.text()
    for s in (SCRIPT_NAME, QUOTES_NAME, BOLD_USER, "<svg onload=alert(3)>"):
        assert s in text
    assert not good.doc.find("script") and not good.doc.find("b") and not good.doc.find("img")
    assert len(good.doc.find("svg")) == 1  # the chart, and no other
    handlers = [n for n in good.doc.all() if any(a.startswith("on") for a in n.attrs)]
    assert handlers == []


def test_the_file_references_nothing_outside(good: Rendered) -> None:
    raw = good.html.read_text()
    for needle in ("http:", "https:", "//", "src=", "url(", "@import", "<script", "<link",
                   "<iframe", "<object"):
        assert needle not in raw.lower(), needle
    hrefs = [n.attrs["href"] for n in good.doc.all(lambda n: "href" in n.attrs)]
    assert all(h.startswith("#") for h in hrefs), hrefs
    assert 20_000 < len(raw) < 200_000


def test_a_log_that_does_not_verify(tampered: Rendered, logs: Logs) -> None:
    assert tampered.cli.returncode == 6
    assert f"{logs.tampered}: DOES NOT VERIFY" in tampered.cli.stdout
    assert "does not verify" in tampered.cli.stderr and str(tampered.html) in tampered.cli.stderr
    assert "Traceback" not in tampered.cli.stderr
    card = tampered.doc.find("div", "verdict")[0]
    assert card.attrs["class"] == "verdict bad"
    assert squash(card.find("span", "state")[0].text()) == "\u2717 DOES NOT VERIFY"
    counts = " ".join(squash(li.text()) for li in card.find("li"))
    assert "modified: 2" in counts and "bad seals: 0" in counts
    hits = [squash(li.text()) for li in card.find("li", "hit")]
    assert hits == ["modified: 2"]
    first = squash(card.find("p", "firstbad")[0].text())
    assert f"seq {logs.tampered_seqs[0]}" in first and "does not match its hash" in first
    assert "none of them can be relied on" in card.text()
    assert "proves less" in card.text()  # verified with the key next to the log
    # still a report, verdict first; the forged path is text, not an image
    assert [s.attrs["id"] for s in tampered.doc.find("section")][0] == "verification"
    assert IMG_PAYLOAD in tampered.doc.text()
    assert not tampered.doc.find("img") and not tampered.doc.find("script")
    assert squash(tampered.doc.find("title")[0].text()) == "cryptfs access report"
    assert tiles(tampered.doc)["Denials"] == "5"  # one was forged away: the page shows the log


def test_screenshot(good: Rendered, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", "--window-size=1280,2000", good.html.as_uri())
    assert png_size(shot) == (1280, 2000)
    assert shot.stat().st_size > 50_000  # a page, not a blank one
    target = os.environ.get("CRYPTFS_REPORT_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)


# -- without the browser ------------------------------------------------------------------------
def test_since_until_and_an_empty_log(logs: Logs, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    run_cli("audit", "init", str(empty))
    out = tmp_path / "r.html"
    res = run_cli("audit", "report", str(logs.customers), str(empty), "--html", str(out),
                  "--since", "2026-03-02T13:00:00Z", "--until", "2026-03-02T14:00")
    assert res.stdout.splitlines()[:2] == [f"{logs.customers}: valid", f"{empty}: valid"]
    doc = dom(out.read_text())
    n = sum(1 for r in logs.records if r["log"] == "customers"
            and DAY + 13 * HOUR <= r["time_ns"] <= DAY + 14 * HOUR)
    assert tiles(doc)["Records"] == str(n) and tiles(doc)["Denials"] == "4"
    assert "Nothing has been written to this log yet." in doc.text()
    assert "proves less" in doc.text()
    texts = [squash(t.text()) for t in doc.find("text")]
    assert "accesses per 5 minutes" in texts  # one hour asked for: finer bars

    run_cli("audit", "report", str(empty), "--html", str(out))
    doc = dom(out.read_text())
    assert tiles(doc)["Records"] == "0" and period(doc) == "Period covered no records"
    assert "No accesses in this period." in doc.text()


def test_another_logs_key_does_not_verify(logs: Logs, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    res = run_cli("audit", "report", str(logs.customers), "--key", logs.agent_pub, "--html",
                  str(out), check=False)
    assert res.returncode == 6 and f"{logs.customers}: DOES NOT VERIFY" in res.stdout
    card = dom(out.read_text()).find("div", "verdict")[0]
    assert [squash(li.text()) for li in card.find("li", "hit")] == ["bad seals: 9"]  # every seal
    first_bad = squash(card.find("p", "firstbad")[0].text())
    assert "the first seal is signed by the key with id" in first_bad
    assert "the key given: the key of another log" in first_bad


def test_large_logs_give_a_bounded_page(tmp_path: Path) -> None:
    w = Writer(tmp_path / "big", "big", seal_every=1000)
    for i in range(3000):
        w.at(i / 100).rec("open", "denied", f"user{i % 40}", 2000 + i % 40, f"/opt/p{i % 30}",
                          path=f"/d/{i}.txt", reason="EACCES")
    w.log.close()
    out = tmp_path / "big.html"
    report.write_report([report.LogSource(str(tmp_path / "big"), parse_verifier(w.pub), False)],
                    str(out))
    doc = dom(out.read_text())
    assert len(table_rows(doc, "denials")) == report.MAX_ROWS
    assert len(table_rows(doc, "files")) == report.TOP_FILES
    assert len(table_rows(doc, "programs")) == report.TOP_PROGRAMS
    assert "2,800 more denials not shown." in squash(doc.text())
    assert "2,975 more files not shown." in squash(doc.text())
    assert "33 other users" in squash(doc.find("ul", "legend")[0].text())
    assert out.stat().st_size < 300_000
    assert out.stat().st_mode & 0o777 == 0o600  # (it names users and files, as the log does)


def test_control_and_bidi_characters_are_shown_as_escapes(tmp_path: Path) -> None:
    w = Writer(tmp_path / "log", "odd")
    w.rec("open", "denied", "eve", 1005, "/usr/bin/cat", path="/invoice\u202efdp.exe",
          reason="EACCES")
    w.rec("open", "denied", "eve", 1005, "/usr/bin/cat", path="/a\x1b[31mred\nline",
          reason="EACCES")
    w.log.close()
    out = tmp_path / "r.html"
    report.write_report([report.LogSource(str(tmp_path / "log"), parse_verifier(w.pub), True)], str(out))
    paths = [row[4] for row in table_rows(dom(out.read_text()), "denials")]
    assert paths == ["/invoice\\u202efdp.exe", "/a\\u001b[31mred\\u000aline"]


def test_records_of_any_shape_still_give_a_page(tmp_path: Path) -> None:
    """A forger may put anything in a line: values of other types, times no
    calendar has, 1970. The page still comes, says DOES NOT VERIFY, and leaves
    out what it cannot place in time."""
    w = Writer(tmp_path / "log", "odd")
    for i in range(6):
        w.at(9 + i).rec("open", "allowed", "eve", 1005, "/usr/bin/cat", path=f"/f{i}")
    w.log.close()
    seg = tmp_path / "log" / "segment-000001.log"
    lines = seg.read_text().splitlines()
    edits: list[dict[str, Any]] = [
        {"time_ns": "noon"}, {"time_ns": 10**30}, {"time_ns": 0},
        {"user": {"name": ["x"]}, "uid": "root", "path": 42, "exe": None},
        {"bytes_read": "lots", "event": "close", "path": ["/f4"]},
    ]
    for n, edit in enumerate(edits, start=1):
        obj = json.loads(lines[n])
        obj.update(edit)
        lines[n] = json.dumps(obj)
    lines.insert(3, "{not json")
    seg.write_text("\n".join(lines) + "\n")
    out = tmp_path / "r.html"
    rep = report.write_report([report.LogSource(str(tmp_path / "log"), parse_verifier(w.pub), True)],
                          str(out))
    assert not rep.ok and rep.logs[0].unreadable == 2
    doc = dom(out.read_text())
    assert "DOES NOT VERIFY" in doc.find("span", "state")[0].text()
    assert "2 records have no usable time or event" in squash(doc.text())
    assert period(doc).startswith("Period covered 1970-01-01T00:00:00Z to 2026-03-02T14:00:00Z")
    svg = doc.find("svg")[0]
    assert 0 < len(svg.find("rect")) <= report.MAX_BUCKETS
    assert '{"name": ["x"]}' in [row[2] for row in table_rows(doc, "files")]


def test_a_real_mount_session(tmp_path: Path, backing: Path, passfile: Path) -> None:
    """What a real mount records, with hostile file names, ends up on the page."""
    logdir = tmp_path / "log"
    run_cli("audit", "init", str(logdir))
    m = new_mount(tmp_path, backing, passfile)
    m.start("--audit-log", str(logdir))
    try:
        m.path("<script>alert(1)<").mkdir()  # then the path is "/<script>alert(1)</script>"
        m.path(SCRIPT_NAME).write_bytes(b"x" * 3000)
        m.path(QUOTES_NAME).write_bytes(b"y" * 10)
        subprocess.run(["cat", str(m.path(SCRIPT_NAME))], check=True, capture_output=True)
    finally:
        m.stop()
    out = tmp_path / "r.html"
    res = run_cli("audit", "report", str(logdir), "--html", str(out))
    assert res.stdout.splitlines()[0] == f"{logdir}: valid"
    doc = dom(out.read_text())
    files = {row[0]: row for row in table_rows(doc, "files")}
    assert files[f"/{SCRIPT_NAME}"][2] == "root" and files[f"/{SCRIPT_NAME}"][4] == "2.9 KiB"
    assert files[f"/{QUOTES_NAME}"][4] == "10 B"
    assert "/usr/bin/cat" in {row[0] for row in table_rows(doc, "programs")}
    assert not doc.find("script") and tiles(doc)["Users"] == "1"
    assert "proves less" in doc.text()


@pytest.mark.parametrize("args, message", [
    (["--key", "cryptfs-audit+00+AAAA"], "not an audit verifier key"),
    (["--key", "K1", "--key", "K2"], "give one per LOGDIR"),
    (["--since", "yesterday"], "not a time"),
    (["--since", "2026-03-03", "--until", "2026-03-02"], "--since is after --until"),
])
def test_bad_input_is_one_clear_line(logs: Logs, tmp_path: Path, args: list[str],
                                     message: str) -> None:
    res = run_cli("audit", "report", str(logs.customers), "--html", str(tmp_path / "r.html"),
                  *args, check=False)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.startswith("cryptfs: error: ")
    assert not (tmp_path / "r.html").exists()


def test_not_a_log_and_no_key(tmp_path: Path) -> None:
    (tmp_path / "nothing").mkdir()
    res = run_cli("audit", "report", str(tmp_path / "nothing"), "--html", str(tmp_path / "r.html"),
                  check=False)
    assert res.returncode == 2 and "holds no access log" in res.stderr
    d = tmp_path / "copy"
    d.mkdir()
    (d / "segment-000001.log").write_text("")
    res = run_cli("audit", "report", str(d), "--html", str(tmp_path / "r.html"), check=False)
    assert res.returncode == 2 and "no audit.pub" in res.stderr and "--key PUB" in res.stderr
    res = run_cli("audit", "report", str(d), "--key", (tmp_path / "none").as_posix(), "--html",
                  str(tmp_path / "r.html"), check=False)
    assert res.returncode == 2 and "no such file, and not a verifier key" in res.stderr
    pub = init_log(str(tmp_path / "log"), "log")
    res = run_cli("audit", "report", str(tmp_path / "log"), "--key", pub, "--html",
                  str(tmp_path / "no" / "r.html"), check=False)
    assert res.returncode == 7 and f"cannot write the report {tmp_path}/no/r.html" in res.stderr
    res = run_cli("audit", "report", str(tmp_path / "missing"), "--html", "x.html", check=False)
    assert res.returncode == 2 and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr
