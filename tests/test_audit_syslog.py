"""cryptfs audit forward: the access log to a real rsyslogd, RFC 5424 over TCP.

Each test that forwards starts its own rsyslogd in the foreground on a free
loopback port, with its own configuration, work directory and output file
(the system's syslog is not touched).  rsyslog's RFC 5424 parser and its
mmpstrucdata module read what the forwarder sent; the tests compare what
rsyslog understood with what the log holds.  The message grammar is also
checked on its own, by a strict parser of RFC 5424's ABNF, for any text
Hypothesis can think of.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli_errors import assert_one_error, assert_usage_error

from conftest import CRYPTFS, new_mount, run_cli
from cryptfs.audit import syslog
from cryptfs.audit.writer import AuditLog, init_log

WEIRD = '/customers/a"b]c\\d/Zhāng 张伟 ☃.csv'  # every character §6.3.3 escapes, and UTF-8

# -- RFC 5424 §6, strictly -------------------------------------------------------------------------
SD_NAME = r'[!#-<>-\\^-~]{1,32}'  # PRINTUSASCII but '=', SP, ']', '"'
PARAM_VALUE = r'(?:[^"\\\]]|\\["\\\]])*'  # '"', '\' and ']' only escaped
HEADER = re.compile(r'<(\d{1,3})>1 (\S+) ([!-~]{1,255}) ([!-~]{1,48}) ([!-~]{1,128}) ([!-~]{1,32}) ')
SD_ELEMENT = re.compile(rf'\[({SD_NAME})((?: {SD_NAME}="{PARAM_VALUE}")*)\]', re.S)
SD_PARAM = re.compile(rf' ({SD_NAME})="({PARAM_VALUE})"', re.S)
TIMESTAMP = re.compile(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)|-')


@dataclass
class Parsed:
    pri: int
    timestamp: str
    hostname: str
    app: str
    procid: str
    msgid: str
    sd: dict[str, dict[str, str]] = field(default_factory=dict)
    msg: bytes = b""


def parse_5424(raw: bytes) -> Parsed:
    """One SYSLOG-MSG by the ABNF of RFC 5424 §6 (AssertionError if it is not one)."""
    text = raw.decode("utf-8")  # (strict: the SD-PARAMs must be UTF-8)
    m = HEADER.match(text)
    assert m, raw
    assert TIMESTAMP.fullmatch(m.group(2)), m.group(2)
    p = Parsed(int(m.group(1)), m.group(2), m.group(3), m.group(4), m.group(5), m.group(6))
    assert p.pri <= 191
    pos = m.end()
    while (e := SD_ELEMENT.match(text, pos)) is not None:
        p.sd[e.group(1)] = {k: re.sub(r'\\(["\\\]])', r"\1", v)
                            for k, v in SD_PARAM.findall(e.group(2))}
        pos = e.end()
    assert p.sd, f"no STRUCTURED-DATA in {raw!r}"
    assert text[pos:pos + 1] == " ", raw
    p.msg = text[pos + 1:].encode("utf-8")
    return p


def record(**fields: Any) -> dict[str, Any]:
    return {"seq": 1, "time_ns": 1_764_400_000_123_456_789, "log": "customers",
            "volume": "0f3c", "event": "open", "outcome": "allowed", "uid": 1000,
            "user": "alice", "pid": 4242, "exe": "/usr/bin/cat", "path": "/a", "h": "x" * 44,
            **fields}


# -- the message, on its own -----------------------------------------------------------------------
def test_a_message_byte_for_byte() -> None:
    r = record(path=WEIRD, intent="read")
    msg = syslog.message(r, "files1")
    assert msg.decode() == (
        '<86>1 2025-11-29T07:06:40.123456Z files1 cryptfs 4242 open [meta sequenceId="1"]'
        '[cryptfs@32473 seq="1" time_ns="1764400000123456789" log="customers" volume="0f3c" '
        'event="open" outcome="allowed" uid="1000" user="alice" pid="4242" exe="/usr/bin/cat" '
        'path="/customers/a\\"b\\]c\\\\d/Zhāng 张伟 ☃.csv" intent="read" h="' + "x" * 44 + '"] '
        + json.dumps(r, sort_keys=True, separators=(",", ":")))
    assert syslog.frame(msg) == str(len(msg)).encode() + b" " + msg
    assert max(syslog.message(r, "h").rpartition(b"] ")[2]) < 0x80  # MSG: ASCII, no BOM


@pytest.mark.parametrize("fields, facility, pri", [
    ({}, "authpriv", 10 * 8 + 6),  # an allowed access: info
    ({"event": "mount"}, "authpriv", 10 * 8 + 5),  # a volume's lifecycle: notice
    ({"outcome": "denied", "reason": "EACCES"}, "local3", 19 * 8 + 4),  # warning
    ({"outcome": "error", "reason": "EIO"}, "daemon", 3 * 8 + 3),  # err
    ({"event": "integrity-failure"}, "audit", 13 * 8 + 3),
])
def test_pri_is_facility_and_severity(fields: dict[str, Any], facility: str, pri: int) -> None:
    p = parse_5424(syslog.message(record(**fields), "h", syslog.FACILITIES[facility]))
    assert p.pri == pri


def test_header_fields_that_cannot_be_taken_as_they_are() -> None:
    p = parse_5424(syslog.message(record(seq=2147483647 + 5, pid=0, event="a b=c" + "x" * 40,
                                     time_ns=None, path=None, **{"we ird=]\"": 1}),
                              "host name", enterprise_id=99999))
    assert p.sd["meta"] == {"sequenceId": "5"}  # RFC 5424 §7.3.1: starts again at 1
    assert p.sd["cryptfs@99999"]["seq"] == str(2147483647 + 5)  # the full number stays
    assert "path" not in p.sd["cryptfs@99999"]  # (null: left out)
    assert p.sd["cryptfs@99999"]["we_ird___"] == "1"
    assert (p.procid, p.timestamp, p.hostname) == ("-", "-", "host_name")
    assert p.msgid == "a_b=c" + "x" * 27


@settings(max_examples=300, deadline=None)
@given(path=st.text(), user=st.text(), event=st.text(), seq=st.integers(1, 2**63),
       time_ns=st.integers(0, 2**62), extra=st.dictionaries(st.text(min_size=1), st.text()))
def test_every_record_is_a_valid_message(path: str, user: str, event: str, seq: int,
                                         time_ns: int, extra: dict[str, str]) -> None:
    r = {**extra, **record(path=path, user=user, event=event, seq=seq, time_ns=time_ns)}
    p = parse_5424(syslog.message(r, "h"))
    params = p.sd["cryptfs@32473"]
    assert params["path"] == path and params["user"] == user and params["seq"] == str(seq)
    assert 1 <= int(p.sd["meta"]["sequenceId"]) <= 2147483647
    assert json.loads(p.msg) == r and max(p.msg, default=0) < 0x80
    if 0 < len(event) <= 32 and all("!" <= c <= "~" for c in event):
        assert p.msgid == event  # (else HEADER made sure it is 1..32 printable characters)


@pytest.mark.parametrize("text, want", [
    ("logs.example.com:514", ("logs.example.com", 514)), ("127.0.0.1:6514", ("127.0.0.1", 6514)),
    ("[::1]:514", ("::1", 514)), ("[fe80::1%eth0]:601", ("fe80::1%eth0", 601))])
def test_targets(text: str, want: tuple[str, int]) -> None:
    assert syslog.parse_target(text) == want


# -- a real rsyslogd -------------------------------------------------------------------------------
RSYSLOG_CONF = """\
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imtcp")
module(load="mmpstrucdata")
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="cryptfs")
template(name="parsed" type="list" option.jsonf="on") {{
  property(outname="rawmsg" name="rawmsg" format="jsonf")
  property(outname="pri" name="pri" format="jsonf")
  property(outname="time" name="timereported" dateFormat="rfc3339" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="app" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
  property(outname="sd" name="$!rfc5424-sd" format="jsonf")
}}
ruleset(name="cryptfs") {{
  action(type="mmpstrucdata" sd_name.lowercase="off")
  action(type="omfile" file="{out}" template="parsed")
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(what: str, cond: Callable[[], Any], timeout: float = 8.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return got


@dataclass
class Rsyslog:
    """rsyslogd -n on 127.0.0.1:port; what it received, as it parsed it, in ``out``."""

    root: Path
    conf: str = RSYSLOG_CONF  # (with {work}, {port} and {out} to fill in)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def out(self) -> Path:
        return self.root / "received.jsonl"

    def start(self) -> None:
        work = self.root / "work"
        work.mkdir(parents=True, exist_ok=True)
        conf = self.root / "rsyslog.conf"
        conf.write_text(self.conf.format(work=work, port=self.port, out=self.out))
        rsyslogd = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
        if not os.path.exists(rsyslogd):
            pytest.fail("these tests need rsyslogd (apt-get install rsyslog; scripts/run "
                        "installs it)")
        with open(self.root / "rsyslogd.stderr", "ab") as err:
            self.proc = subprocess.Popen([rsyslogd, "-n", "-f", str(conf),
                                          "-i", str(self.root / "rsyslogd.pid")],
                                         stdout=err, stderr=err)

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError("rsyslogd exited: "
                                     + (self.root / "rsyslogd.stderr").read_text())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_until("rsyslogd to listen", listening)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def received(self) -> list[dict[str, Any]]:
        if not self.out.exists():
            return []
        lines = self.out.read_bytes().split(b"\n")
        return [json.loads(x) for x in lines[:-1]]  # (the last one may be half written)

    def seqs(self) -> list[int]:
        return [int(json.loads(m["sd"])["meta"]["sequenceId"]) for m in self.received()]

    def wait_for(self, seqs: list[int], timeout: float = 8.0) -> list[dict[str, Any]]:
        """Until these sequence ids have arrived (and then exactly those, in order)."""
        wait_until(f"records {seqs[0]}..{seqs[-1]} at rsyslog",
                   lambda: set(seqs) <= set(self.seqs()), timeout)
        assert self.seqs() == seqs
        return self.received()


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    r = Rsyslog(tmp_path / "rsyslog")
    r.start()
    try:
        yield r
    finally:
        r.stop()


@dataclass
class Forwarder:
    """A `cryptfs audit forward` process."""

    logdir: Path
    args: tuple[str, ...]
    stderr: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str) -> None:
        with open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(CRYPTFS + ["audit", "forward", str(self.logdir),
                                                    *self.args, *extra], stderr=err)

    def log(self) -> str:
        return self.stderr.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop it with ``sig``; its exit code."""
        if self.proc is None:
            return 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    d = tmp_path / "log"
    init_log(str(d), "customers")
    return d


@pytest.fixture
def forwarder(logdir: Path, rsyslog: Rsyslog, tmp_path: Path) -> Iterator[Forwarder]:
    f = Forwarder(logdir, ("--to", f"127.0.0.1:{rsyslog.port}", "--hostname", "files1",
                           "--retry-max", "0.5"), tmp_path / "forward.stderr")
    try:
        yield f
    finally:
        f.stop()


def write(logdir: Path, n: int, **kw: Any) -> list[dict[str, Any]]:
    """``n`` records from the real writer (then sealed and closed)."""
    log = AuditLog(str(logdir), **kw)
    try:
        return [log.record(event="open" if i % 3 else "close", outcome="allowed", uid=1000,
                           user="alice", pid=4000 + i, exe="/usr/bin/cat", volume="0f3c",
                           path=f"/customers/{i}.csv", intent="read") for i in range(n)]
    finally:
        log.close()


def in_log(logdir: Path) -> dict[int, dict[str, Any]]:
    from cryptfs.audit.export import records
    return {r["seq"]: r for r in records(str(logdir))}


def check_content(got: dict[str, Any], r: dict[str, Any]) -> None:
    """What rsyslog parsed out of one message, against the record in the log."""
    sd = json.loads(got["sd"])
    assert sd["meta"] == {"sequenceId": str(r["seq"])}
    assert sd["cryptfs@32473"] == {k: json.dumps(v) if isinstance(v, bool) else str(v)
                                   for k, v in r.items()}
    assert json.loads(got["msg"]) == r  # MSG: the record itself, "h" included
    assert (got["app"], got["hostname"], got["msgid"], got["procid"]) == \
        ("cryptfs", "files1", r["event"], str(r["pid"]))
    severity = 5 if r["event"] in ("mount", "unmount") else 4 if r["outcome"] == "denied" else 6
    assert int(got["pri"]) == 10 * 8 + severity
    when = datetime.datetime.fromisoformat(got["time"])
    assert when.utcoffset() == datetime.timedelta(0)
    assert int(when.timestamp()) * 10**6 + when.microsecond == r["time_ns"] // 1000
    assert got["rawmsg"].encode() == syslog.message(r, "files1")  # byte for byte as sent


# -- forwarding ------------------------------------------------------------------------------------
@pytest.mark.serial
def test_records_arrive_once_in_order_and_in_real_time(logdir: Path, rsyslog: Rsyslog,
                                                       forwarder: Forwarder) -> None:
    log = AuditLog(str(logdir))
    try:
        log.record(event="mount", outcome="allowed", uid=0, user="root", pid=1, exe="/bin/x",
                   volume="0f3c", path="/mnt")
        log.record(event="open", outcome="allowed", uid=1000, user="alice", pid=77,
                   exe="/usr/bin/cat", volume="0f3c", path=WEIRD, intent="read")
        forwarder.start("--from-start")
        got = rsyslog.wait_for([1, 2])
        want = in_log(logdir)
        for g in got:
            check_content(g, want[int(json.loads(g["sd"])["meta"]["sequenceId"])])
        assert json.loads(got[1]["sd"])["cryptfs@32473"]["path"] == WEIRD

        # written while it runs: at rsyslog within seconds, one by one
        for seq in (3, 4):
            t0 = time.monotonic()
            log.record(event="close", outcome="allowed", uid=1000, user="alice", pid=77,
                       exe="/usr/bin/cat", volume="0f3c", path=WEIRD, bytes_read=12,
                       bytes_written=0, duration_ns=5)
            rsyslog.wait_for(list(range(1, seq + 1)), timeout=3)
            assert time.monotonic() - t0 < 3
        assert forwarder.stop() == 0
        assert "Traceback" not in forwarder.log()
        state = json.loads((logdir / f"forward-127.0.0.1-{rsyslog.port}.cursor").read_text())
        assert state["seq"] == 4 and state["h"] == in_log(logdir)[4]["h"]

        # stopped while records are written; started again: those, and only those
        for _ in range(3):
            log.record(event="open", outcome="denied", reason="EACCES", uid=1001, user="bob",
                       pid=78, exe="/usr/bin/cp", volume="0f3c", path="/customers/x")
        forwarder.start()  # (no --from-start: the state file says where to go on)
        got = rsyslog.wait_for(list(range(1, 8)))
        assert [int(g["pri"]) for g in got[4:]] == [10 * 8 + 4] * 3  # denied: warning
    finally:
        log.close()


def test_a_new_forwarder_starts_at_the_end_of_the_log(logdir: Path, rsyslog: Rsyslog,
                                                      forwarder: Forwarder) -> None:
    write(logdir, 5)
    forwarder.start()
    wait_until("the state file", lambda: list(logdir.glob("forward-*.cursor")))
    write(logdir, 2)
    rsyslog.wait_for([6, 7])


def test_a_killed_forwarder_loses_nothing(logdir: Path, rsyslog: Rsyslog,
                                          forwarder: Forwarder) -> None:
    """SIGKILL: no clean stop, the state file may be up to a second behind.
    Started again, every record arrives; some may arrive twice (at least once)."""
    write(logdir, 5)
    forwarder.start("--from-start")
    rsyslog.wait_for([1, 2, 3, 4, 5])
    assert forwarder.stop(signal.SIGKILL) == -signal.SIGKILL
    write(logdir, 3)
    forwarder.start()
    wait_until("records 6..8", lambda: {6, 7, 8} <= set(rsyslog.seqs()))
    seqs = rsyslog.seqs()
    assert sorted(set(seqs)) == list(range(1, 9))
    assert seqs[:5] == [1, 2, 3, 4, 5] and seqs[-3:] == [6, 7, 8]
    assert set(seqs[5:-3]) <= {1, 2, 3, 4, 5}  # a repeat only of what came before the kill
    assert seqs[5:-3] == sorted(seqs[5:-3])


def test_collector_stopped_and_started_again(logdir: Path, rsyslog: Rsyslog,
                                             forwarder: Forwarder) -> None:
    write(logdir, 3)
    forwarder.start("--from-start")
    rsyslog.wait_for([1, 2, 3])
    rsyslog.stop()
    write(logdir, 4)  # while nobody listens
    wait_until("the forwarder to notice", lambda: "lost the connection" in forwarder.log())
    rsyslog.start()  # (same port, same output file)
    got = rsyslog.wait_for(list(range(1, 8)))
    wait_until("the forwarder to say so", lambda: "again" in forwarder.log().split("lost")[-1])
    want = in_log(logdir)
    for g in got:
        check_content(g, want[int(json.loads(g["sd"])["meta"]["sequenceId"])])


def test_segments_rotate_while_it_forwards(logdir: Path, rsyslog: Rsyslog,
                                           forwarder: Forwarder) -> None:
    write(logdir, 1)  # (a close: not selected)
    forwarder.start("--from-start", "--event", "open")
    written = write(logdir, 60, seal_every=4, segment_bytes=2000)
    assert len(list(logdir.glob("segment-*.log"))) >= 4
    opens = [r["seq"] for r in written if r["event"] == "open"]
    rsyslog.wait_for(opens)
    assert forwarder.stop(signal.SIGINT) == 0  # (Ctrl-C)
    state = json.loads(next(logdir.glob("forward-*.cursor")).read_text())
    assert state["seq"] == 61  # (the last, a close, was looked at and not selected)


def test_a_session_through_a_mount(tmp_path: Path, rsyslog: Rsyslog, logdir: Path,
                                   forwarder: Forwarder) -> None:
    """Records of a real mount, with a file name that needs every escape."""
    pf = tmp_path / "pass"
    pf.write_bytes(b"forward test\n")
    backing = tmp_path / "backing"
    run_cli("init", str(backing), "--no-recovery-key", "--passphrase-file", str(pf),
            "--kdf-memory", "8", "--kdf-iterations", "1")
    forwarder.start()
    wait_until("the state file", lambda: list(logdir.glob("forward-*.cursor")))
    m = new_mount(tmp_path, backing, pf)
    m.start("--audit-log", str(logdir))
    try:
        name = os.path.basename(WEIRD)
        subprocess.run(["cp", "/etc/hostname", str(m.path(name))], check=True)
    finally:
        m.stop()
    want = in_log(logdir)
    got = rsyslog.wait_for(sorted(want))
    by_event = {(g["msgid"], json.loads(g["sd"])["cryptfs@32473"].get("path")): g for g in got}
    create = by_event[("create", "/" + name)]
    params = json.loads(create["sd"])["cryptfs@32473"]
    assert params["exe"] == "/usr/bin/cp" and create["procid"] == params["pid"]
    assert ("unmount", str(m.mnt)) in by_event
    for g in got:
        check_content(g, want[int(json.loads(g["sd"])["meta"]["sequenceId"])])


def test_the_receiver_in_the_docs(tmp_path: Path, logdir: Path) -> None:
    """docs/AUDIT.md's rsyslog configuration writes each message as it was sent."""
    doc = (Path(__file__).parent.parent / "docs" / "AUDIT.md").read_text()
    conf = doc.split("### A receiving rsyslog", 1)[1].split("```", 2)[1]
    assert 'port="514"' in conf and "/var/log/cryptfs/access.log" in conf
    conf = (conf.replace("{", "{{").replace("}", "}}")
            .replace('port="514"', 'address="127.0.0.1" port="{port}"')
            .replace("/var/log/cryptfs/access.log", "{out}"))
    r = Rsyslog(tmp_path / "rsyslog", 'global(workDirectory="{work}")\n' + conf)
    r.start()
    f = Forwarder(logdir, ("--to", f"127.0.0.1:{r.port}", "--hostname", "files1",
                           "--from-start"), tmp_path / "forward.stderr")
    try:
        log = AuditLog(str(logdir))
        log.record(event="rename", outcome="allowed", uid=1000, user="alice", pid=31337,
                   exe="/usr/bin/mv", volume="9c1e4f2a", path=WEIRD, new_path="/customers/[x].csv")
        log.close()
        f.start()
        wait_until("the message", lambda: r.out.exists() and r.out.read_bytes().endswith(b"\n"))
        assert r.out.read_bytes() == syslog.message(in_log(logdir)[1], "files1") + b"\n"
    finally:
        f.stop()
        r.stop()


# -- what it refuses -------------------------------------------------------------------------------
def forward(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("audit", "forward", *args, check=False, timeout=30)


@pytest.mark.parametrize("to", ["localhost", "localhost:0", "localhost:65536", "localhost:http",
                                "::1:514", ":514"])
def test_bad_targets(logdir: Path, to: str) -> None:
    assert_one_error(forward(str(logdir), "--to", to), 2, "not a collector address")


def test_refusals(tmp_path: Path, logdir: Path) -> None:
    write(logdir, 3)
    port = free_port()  # (nothing listens there)
    to = f"127.0.0.1:{port}"
    assert_one_error(forward(str(logdir), "--to", to), 7, f"cannot connect to 127.0.0.1:{port}")
    # (where it starts is saved all the same: started again, it sends what came in between)
    assert json.loads((logdir / f"forward-127.0.0.1-{port}.cursor").read_text())["seq"] == 3
    assert_one_error(forward(str(logdir), "--to", "nowhere.invalid:514"), 2,
                     "cannot resolve nowhere.invalid")
    assert not (logdir / "forward-nowhere.invalid-514.cursor").exists()  # (a typo leaves nothing)
    # An existing state file wins over --from-start, and says so.
    res = forward(str(logdir), "--to", to, "--from-start")
    assert res.returncode == 7 and "--from-start has no effect: " in res.stderr
    assert f"forward-127.0.0.1-{port}.cursor says records up to 3 were forwarded" in res.stderr
    # A state file is a short regular file: /dev/full was read until memory ran out.
    assert_one_error(forward(str(logdir), "--to", to, "--state", "/dev/full"), 2,
                     "the state file /dev/full is not a regular file")
    # A FIFO there blocked the forwarder for good (SIGTERM did not end it), and a
    # symlink was followed: both refused now, at once.
    fifo, link = tmp_path / "fifo.cursor", tmp_path / "link.cursor"
    os.mkfifo(fifo)
    link.symlink_to(logdir / f"forward-127.0.0.1-{port}.cursor")
    assert_one_error(forward(str(logdir), "--to", to, "--state", str(fifo)), 2,
                     f"the state file {fifo} is not a regular file")
    assert_one_error(forward(str(logdir), "--to", to, "--state", str(link)), 2,
                     f"the state file {link} is a symlink (not followed)")
    big = tmp_path / "big.cursor"
    big.write_bytes(b" " * 10_000 + b'{"seq": 1, "h": null}')
    assert_one_error(forward(str(logdir), "--to", to, "--state", str(big)), 2,
                     "not a forwarder state file")
    assert_one_error(forward(str(logdir), "--to", to, "--hostname", "a b"), 2, "--hostname")
    (tmp_path / "empty").mkdir()
    assert_one_error(forward(str(tmp_path / "empty"), "--to", to), 2, "holds no access log")

    state = tmp_path / "state"
    state.write_text("not json\n")
    assert_one_error(forward(str(logdir), "--to", to, "--state", str(state)), 2,
                     "not a forwarder state file")
    state.write_text(json.dumps({"seq": 9, "h": "x"}))
    assert_one_error(forward(str(logdir), "--to", to, "--state", str(state)), 2,
                     "ends at record 3")
    state.write_text(json.dumps({"seq": 2, "h": "not the hash of record 2"}))
    assert_one_error(forward(str(logdir), "--to", to, "--state", str(state)), 6,
                     "record 2 in")
    res = forward(str(tmp_path / "missing"), "--to", to)
    assert res.returncode == 2 and "does not exist" in res.stderr and "Traceback" not in res.stderr
    # The log's own files are never taken for a state file (audit.key is JSON with a
    # seq too, and was once overwritten by a forwarder that could not connect).
    own = {p.name: p.read_bytes() for p in logdir.iterdir()}
    for name in (n for n in own if not n.endswith(".cursor")):  # (a cursor may live there)
        assert_one_error(forward(str(logdir), "--to", to, "--state", str(logdir / name)), 2,
                         f"--state {logdir / name} is inside the log directory {logdir}")
    assert {p.name: p.read_bytes() for p in logdir.iterdir()} == own


def test_a_log_it_cannot_read() -> None:
    """Run as nobody: the log (0700, root's) cannot be listed; exit 2, one line."""
    top = Path(tempfile.mkdtemp(prefix="cryptfs-forward-"))
    try:
        top.chmod(0o755)
        init_log(str(top / "log"), "customers")
        res = subprocess.run([sys.executable, str(Path(__file__).parent / "as_user.py"), "nobody",
                              "audit", "forward", str(top / "log"), "--to", "127.0.0.1:514"],
                             capture_output=True, text=True, timeout=30)
        assert_usage_error(res, "is not readable")  # (click's check, as for follow and export)
        # the library's own check, for callers other than the command line
        code = ("import os, pwd, sys; from cryptfs.audit import syslog; "
                "from cryptfs.errors import BackingIOError; "
                "os.setuid(pwd.getpwnam('nobody').pw_uid)\n"
                "try: syslog.Forwarder(sys.argv[1], '127.0.0.1', 514, '/nonexistent').run()\n"
                "except BackingIOError as e: print(e, '|', e.exit_code)")
        out = subprocess.run([sys.executable, "-c", code, str(top / "log")], capture_output=True,
                             text=True, timeout=30).stdout
        assert out == f"cannot read the access log in {top / 'log'}: Permission denied | 7\n"
    finally:
        shutil.rmtree(top)
