"""cryptfs audit export: every format parses with a real parser of that format,
and the filters select exactly what they say."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import new_mount, run_cli
from cryptfs.audit.chain import data_end, parse_verifier
from cryptfs.audit.events import EVENTS
from cryptfs.audit.export import follow
from cryptfs.audit.verify import verify
from cryptfs.audit.writer import AuditLog, init_log

# CEF:Version|Device Vendor|Device Product|Device Version|Signature ID|Name|Severity|Extension
# (ArcSight "Implementing ArcSight CEF" rev. 25: pipes and backslashes escaped in
# the header, = and backslashes in extension values, newlines as \n).
CEF = re.compile(r"^CEF:0\|((?:[^|\\]|\\[|\\])*)\|((?:[^|\\]|\\[|\\])*)\|((?:[^|\\]|\\[|\\])*)\|"
                 r"((?:[^|\\]|\\[|\\])*)\|((?:[^|\\]|\\[|\\])*)\|(\d{1,2})\|(.*)$")
CEF_PAIR = re.compile(r"(\w+)=((?:[^=\\]|\\[=\\nr])*?)(?= \w+=|$)")


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short session through a real mount, with an access log."""
    root = tmp_path_factory.mktemp("export")
    pf = root / "pass"
    pf.write_bytes(b"export test\n")
    backing = root / "backing"
    run_cli("init", str(backing), "--no-recovery-key", "--passphrase-file", str(pf),
            "--kdf-memory", "8", "--kdf-iterations", "1")
    log = root / "log"
    run_cli("audit", "init", str(log))
    m = new_mount(root, backing, pf)
    m.start("--audit-log", str(log))
    try:
        (m.path("customers")).mkdir()
        (m.path("customers", "a=b|c.csv")).write_text("Zhang,13800138000\n")
        (m.path("notes.txt")).write_text("call back\n")
        subprocess.run(["mv", str(m.path("notes.txt")), str(m.path("customers", "n.txt"))],
                       check=True)
        subprocess.run(["cat", str(m.path("customers", "n.txt"))], check=True,
                       capture_output=True)
        (m.path("customers", "n.txt")).unlink()
    finally:
        m.stop()
    return log


def export(log: Path, *args: str) -> str:
    return run_cli("audit", "export", str(log), *args).stdout


def test_jsonl_is_the_records_as_written(logdir: Path) -> None:
    rows = [json.loads(x) for x in export(logdir, "--format", "jsonl").splitlines()]
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    events = [r["event"] for r in rows]
    assert events[0] == "mount" and events[-1] == "unmount"
    assert {"mkdir", "create", "close", "rename", "open", "unlink"} <= set(events)
    assert all(len(r["h"]) == 44 for r in rows)


def test_csv_parses_with_the_csv_module(logdir: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(export(logdir, "--format", "csv"))))
    ren = [r for r in rows if r["event"] == "rename"]
    assert len(ren) == 1 and ren[0]["path"] == "/notes.txt" and \
        ren[0]["new_path"] == "/customers/n.txt" and ren[0]["exe"] == "/usr/bin/mv"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", rows[0]["time"])
    # a name with = and | survives the format
    assert any(r["path"] == "/customers/a=b|c.csv" for r in rows)


def test_cef_lines_match_the_spec_grammar(logdir: Path) -> None:
    lines = export(logdir, "--format", "cef").splitlines()
    assert lines
    seen = {}
    for line in lines:
        m = CEF.match(line)
        assert m, line
        ext = dict(CEF_PAIR.findall(m.group(7)))
        assert {"rt", "suser", "outcome", "cs1", "cn1"} <= set(ext), line
        seen[m.group(4)] = ext
    assert seen["rename"]["oldFilePath"] == "/notes.txt"
    assert seen["rename"]["filePath"] == "/customers/n.txt"
    assert any("a\\=b|c.csv" in line for line in lines)  # '=' escaped in a value


def test_ecs_documents(logdir: Path) -> None:
    docs = [json.loads(x) for x in export(logdir, "--format", "ecs").splitlines()]
    for d in docs:
        assert d["ecs"]["version"] == "8.11.0" and d["event"]["category"] == ["file"]
        assert d["event"]["outcome"] in ("success", "failure", "unknown")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", d["@timestamp"])
    ren = next(d for d in docs if d["event"]["action"] == "rename")
    assert ren["file"]["path"] == "/customers/n.txt" and ren["cryptfs"]["old_path"] == "/notes.txt"
    assert ren["event"]["type"] == ["change"] and ren["process"]["executable"] == "/usr/bin/mv"


def test_ocsf_file_system_activity(logdir: Path) -> None:
    evs = [json.loads(x) for x in export(logdir, "--format", "ocsf").splitlines()]
    for e in evs:
        assert e["class_uid"] == 1001 and e["category_uid"] == 1
        assert e["type_uid"] == 100100 + e["activity_id"]
        assert e["status_id"] in (1, 2) and e["metadata"]["version"] == "1.1.0"
    ren = next(e for e in evs if e["unmapped"]["cryptfs_event"] == "rename")
    assert ren["activity_id"] == 5 and ren["file"]["path"] == "/notes.txt"
    assert ren["file_result"]["path"] == "/customers/n.txt"
    opened = next(e for e in evs if e["unmapped"]["cryptfs_event"] == "open")
    assert opened["activity_id"] == 14 and opened["actor"]["process"]["file"]["name"] == "cat"


def test_filters(logdir: Path) -> None:
    def seqs(*args: str) -> list[int]:
        return [json.loads(x)["seq"] for x in export(logdir, *args).splitlines()]

    allrows = [json.loads(x) for x in export(logdir).splitlines()]
    assert seqs("--event", "rename") == [r["seq"] for r in allrows if r["event"] == "rename"]
    assert seqs("--path", "/customers/*") == [
        r["seq"] for r in allrows if str(r.get("path", "")).startswith("/customers/")
        or str(r.get("new_path", "")).startswith("/customers/")]
    assert seqs("--user", "root") == seqs("--user", "0") == [r["seq"] for r in allrows]
    assert seqs("--user", "nobody") == []
    t = allrows[3]["time_ns"]
    since = f"{t // 10**9}.{t % 10**9:09d}"  # to the nanosecond
    assert seqs("--since", since) == [r["seq"] for r in allrows if r["time_ns"] >= t]
    assert seqs("--until", since) == [r["seq"] for r in allrows if r["time_ns"] <= t]
    assert seqs("--until", "1970-01-02T00:00:00Z") == []
    for bad in ("yesterday", "inf", "-inf", "nan"):
        res = run_cli("audit", "export", str(logdir), "--since", bad, check=False)
        assert res.returncode == 2 and f"not a time: {bad!r}" in res.stderr, (bad, res.stderr)
        assert "Traceback" not in res.stderr and res.stdout == ""
    for bad in ("1e400", "99999999999999999999", "-1", "0001-01-01"):  # (taken: matched nothing)
        res = run_cli("audit", "export", str(logdir), "--since", bad, check=False)
        assert res.returncode == 2 and f"time out of range: {bad!r} (1970 to 9999)" in res.stderr
    for cmd in (["export"], ["follow", "--from-start"], ["forward", "--to", "127.0.0.1:9"]):
        res = run_cli("audit", *cmd, str(logdir), "--since", "2026-12-08", "--until",
                      "2026-12-01", check=False, timeout=30)  # (follow waited forever)
        assert res.returncode == 2 and "--since is after --until" in res.stderr, (cmd, res)
    # Every event a record of this log carries is a known one; a misspelt one is refused
    # (it printed nothing, as if no such records existed), by every command that selects.
    assert {r["event"] for r in allrows} <= EVENTS
    for cmd in (["export"], ["follow"], ["forward", "--to", "127.0.0.1:9"]):
        res = run_cli("audit", *cmd, str(logdir), "--event", "open", "--event", "opne",
                      check=False)
        assert res.returncode == 2 and "no record carries the event 'opne'" in res.stderr, res
        assert "hint: the events are " in res.stderr and "Traceback" not in res.stderr
        assert res.stdout == ""


def test_csv_shows_control_characters_rather_than_sending_them(tmp_path: Path) -> None:
    """Review finding: a file name with ESC sequences, a CR and U+202E reached the
    auditor's terminal raw from `audit export --format csv`, able to erase or
    overwrite lines already printed."""
    init_log(str(tmp_path / "log"), "log")
    w = AuditLog(str(tmp_path / "log"))
    name = "/pub/x\x1b[2A\x1b[2K\r\u202evsc.ecnahc"
    w.record(event="create", outcome="allowed", uid=1001, user="alice", pid=7, exe="/bin/sh",
             volume="ab" * 16, path=name)
    w.close()
    out = export(tmp_path / "log", "--format", "csv")
    assert not any(c in out for c in "\x1b\r\u202e")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows[0]["path"] == "/pub/x\\u001b[2A\\u001b[2K\\u000d\\u202evsc.ecnahc"


def test_every_event_written_is_in_the_one_list() -> None:
    """Records written by name in the code (the mount, the agent, the log) and the
    mount's request handlers (checked as they are defined) carry listed events."""
    root = Path(__file__).resolve().parent.parent
    written = set()
    for src in [*root.glob("cryptfs/*.py"), *root.glob("cryptfs/*/*.py"),
                *root.glob("keyagent/*.py"), *root.glob("cli/*.py")]:
        written |= set(re.findall(r"\.write\(\s*\"([a-z-]+)\"", src.read_text()))
        written |= set(re.findall(r"\brecord\([^\"]*?\"([a-z-]+)\", \"(?:allowed|denied|error)\"",
                                  src.read_text()))
        written |= set(re.findall(r"\brecorded\([^\"]*?\"([a-z-]+)\"", src.read_text()))
    assert {"mount", "unmount", "close", "lock", "unlock", "integrity-failure", "recovery",
            "rotation"} <= written
    assert written <= EVENTS, written - EVENTS
    from cryptfs.fs.audit_hooks import _edge

    with pytest.raises(ValueError, match="'renmae' is not in cryptfs.audit.events"):
        _edge("inode", "renmae")(lambda self: None)


def test_follow_prints_records_as_they_are_written(tmp_path: Path) -> None:
    """A real `cryptfs audit follow` process, fed by a writer that seals and
    rotates segments while it watches; --event filters what it prints."""
    import sys
    import time

    from cryptfs.audit.writer import AuditLog, init_log

    d = tmp_path / "log"
    init_log(str(d), "follow-test")
    log = AuditLog(str(d), seal_every=3, segment_bytes=1500)
    log.record(event="open", outcome="allowed", uid=0, path="/before")
    proc = subprocess.Popen([sys.executable, "-m", "cryptfs.cli.main", "audit", "follow", str(d),
                             "--event", "open", "--format", "csv"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("seq,time,volume,event")
        time.sleep(0.5)  # (follow starts at the end: /before is not printed)
        for i in range(30):
            log.record(event="open" if i % 2 == 0 else "close", outcome="allowed", uid=0,
                       path=f"/live/{i}")
        log.close()
        assert len(list(d.glob("segment-*.log"))) >= 3
        got = [proc.stdout.readline().split(",")[10] for _ in range(15)]
        assert got == [f"/live/{i}" for i in range(0, 30, 2)]
    finally:
        proc.terminate()
        proc.wait(5)


def test_follow_after_a_writer_died_in_the_middle_of_a_record(tmp_path: Path) -> None:
    """Review finding: a follower read the partial line a killed writer left
    in the reserved tail and moved past it; the next writer wrote over it
    from its start, so the follower never saw those records (and forward
    never sent them).  A follower now stops at the last whole line."""
    d = tmp_path / "log"
    init_log(str(d), "crash")
    a = AuditLog(str(d))
    for i in range(3):
        a.record(event="open", outcome="allowed", path=f"/before-{i}")
    seg = next(d.glob("segment-*.log"))
    end = data_end(str(seg))
    os.pwrite(a._fd, b'{"event":"open","exe":"/bin/ca', end)  # killed while copying this one
    os.close(a._fd)
    os.close(a._lock)
    got: list[dict] = []
    follower = follow(str(d), from_start=True, poll=0.05,
                      stop=lambda: len(got) >= 8 or time.monotonic() > deadline)
    deadline = time.monotonic() + 10
    for r in follower:
        got.append(r)
        if len(got) == 3:  # (it has seen the partial line by now, and must not pass it)
            b = AuditLog(str(d))
            for i in range(5):
                b.record(event="unlink", outcome="allowed", path=f"/after-{i}")
            b.close()
    assert [r["path"] for r in got] == [f"/before-{i}" for i in range(3)] + [
        f"/after-{i}" for i in range(5)]
    v = verify(str(d), parse_verifier((d / "audit.pub").read_text()))
    assert v.ok and v.valid == 8


def test_verify_while_the_log_is_being_written_finds_nothing_wrong(tmp_path: Path) -> None:
    """Review finding: verify of a live log read a line made of an old copy
    of the reserved tail and a newer record, and reported it modified."""
    d = tmp_path / "log"
    pub = parse_verifier(init_log(str(d), "live"))
    writer = subprocess.Popen([sys.executable, "-c", f"""
import time
from cryptfs.audit.writer import AuditLog
log = AuditLog({str(d)!r}, seal_every=50)
end = time.monotonic() + 4
i = 0
while time.monotonic() < end:
    log.record(event="open", outcome="allowed", path="/f%d" % i + "x" * (i % 300))
    i += 1
log.close()
"""])
    try:
        checks = 0
        while writer.poll() is None:
            v = verify(str(d), pub)
            assert v.ok, v.problems
            checks += 1
    finally:
        writer.wait(10)
    v = verify(str(d), pub)
    assert v.ok and v.unsealed == 0 and checks > 5
