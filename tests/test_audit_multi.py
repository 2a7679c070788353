"""The auditor sees one story: two servers' logs merged, each record naming its server.

Two real cryptfs mounts of one backing directory on JuiceFS (two "servers",
files1 and files2, each through its own mount of one JuiceFS volume,
tests/juicefs.py: two daemons with ``--shared-storage``, two key agents,
two logs with the same log id, each mount given its own ``--server``),
real users working on each.  Then
``audit verify``, ``export``, ``report`` and ``follow`` over both logs, a
tampered copy of one, and both logs forwarded to one real rsyslogd whose
file, read back with ``audit export --from-syslog``, gives the same merged
export as the logs.

The work runs once (a module fixture); the mounts stay up for follow and
forward.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from juicefs import JuicePair, juicefs_pair
from test_audit_report import dom, squash, table_rows
from test_audit_syslog import Forwarder, Rsyslog, wait_until
from test_cli_errors import assert_one_error, assert_usage_error

from conftest import CRYPTFS, require_fuse, run_cli
from cryptfs.audit import export as audit_export
from cryptfs.audit.merge import merge_key
from cryptfs.audit.writer import AuditLog, init_log
from multiuser import (
    ROOT_PASSPHRASE,
    USERS,
    AgentProcess,
    SharedMount,
    cli_as,
    make_shared_volume,
    passfile,
    run_as,
    shared_tempdir,
)

pytestmark = pytest.mark.mount

AGENT_ARGS = ("--idle-timeout", "0", "--backoff", "0.2", "--backoff-max", "1")
NAMES = ("files1", "files2")
NOTES = b"alice: customer 4711 called back, wants the March invoice\n"
SAMPLE = Path(__file__).parent / "data" / "audit-log-before-server"


@dataclass
class Server:
    name: str
    agent: AgentProcess
    mount: SharedMount
    logdir: Path
    pub: str


@dataclass
class TwoServers:
    root: Path
    backing: Path
    servers: dict[str, Server]
    passfiles: dict[str, Path]
    volume: str

    def unlock(self, server: str, user: str) -> None:
        s = self.servers[server]
        res = cli_as(user, "unlock", str(s.mount.mnt), "--passphrase-file",
                     str(self.passfiles[user]), env=s.agent.env)
        assert res.returncode == 0, res.stderr

    def path(self, server: str, name: str) -> str:
        """A path in the shared directory, through ``server``'s mount."""
        return str(self.servers[server].mount.mnt / name)

    def logs(self) -> list[str]:
        return [str(s.logdir) for s in self.servers.values()]

    def keys(self) -> list[str]:
        return [a for s in self.servers.values() for a in ("--key", s.pub)]

    def all_records(self) -> list[dict[str, Any]]:
        return [r for d in self.logs() for r in records(d)]


def as_user(user: str, script: str) -> str:
    res = run_as(user, "/bin/sh", "-c", script)
    assert res.returncode == 0, (script, res.stderr)
    return res.stdout.decode()


@pytest.fixture(scope="module")
def juice() -> Iterator[JuicePair]:
    yield from juicefs_pair()


@pytest.fixture(scope="module")
def two(juice: JuicePair) -> Iterator[TwoServers]:
    require_fuse()
    root = shared_tempdir()
    # One backing directory on the shared storage, as each server names it.
    backings = {"files1": juice.a.mnt / "audit-vol", "files2": juice.b.mnt / "audit-vol"}
    make_shared_volume(backings["files1"])
    (root / "pass").mkdir(mode=0o755)
    files = {name: passfile(root / "pass", name, secret) for name, (_, secret) in USERS.items()}
    files["root"] = passfile(root / "pass", "root", ROOT_PASSPHRASE)
    servers: dict[str, Server] = {}
    try:
        for name in NAMES:
            logdir = root / f"log-{name}"
            # The same log id on both: the server, not the log's name, tells them apart.
            pub = run_cli("audit", "init", str(logdir), "--log-id", "calls").stdout.strip()
            agent = AgentProcess(root / f"{name}.sock", root / f"{name}-agent.log")
            mount = SharedMount(backings[name], root / f"mnt-{name}", root / f"{name}.log",
                                root / f"{name}.pid", agent=agent)
            servers[name] = Server(name, agent, mount, logdir, pub)
            agent.start(*AGENT_ARGS)
            mount.start("--shared-storage", "--audit-log", str(logdir), "--server", name)
        vol = json.loads((backings["files2"] / "cryptfs.conf").read_text())["volume_id"]
        t = TwoServers(root, backings["files1"], servers, files, vol)
        # root (the admin) makes a directory everyone may write, on files1
        t.unlock("files1", "root")
        res = run_as("root", "mkdir", "-m", "1777", t.path("files1", "calls"))
        assert res.returncode == 0, res.stderr
        assert cli_as("root", "lock", env=servers["files1"].agent.env).returncode == 0
        # files1: alice writes her notes and renames them
        t.unlock("files1", "cfs-alice")
        as_user("cfs-alice", f"printf '{NOTES.decode()}' > {t.path('files1', 'calls/notes.txt')}")
        as_user("cfs-alice", f"mv {t.path('files1', 'calls/notes.txt')} "
                             f"{t.path('files1', 'calls/final.txt')}")
        # files2: bob reads them there (written and closed on the other server), writes his own;
        # carol, not unlocked on files2, is refused
        t.unlock("files2", "cfs-bob")
        assert as_user("cfs-bob", f"cat {t.path('files2', 'calls/final.txt')}").encode() == NOTES
        as_user("cfs-bob", f"echo done > {t.path('files2', 'calls/bob.txt')}")
        res = run_as("cfs-carol", "cat", t.path("files2", "calls/bob.txt"))
        assert res.returncode != 0 and b"Permission denied" in res.stderr
        yield t
    finally:
        for s in servers.values():
            try:
                s.mount.stop()
            finally:
                s.agent.stop()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(backings["files1"], ignore_errors=True)


def export(*args: str) -> str:
    res = run_cli("audit", "export", *args, check=False)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    return res.stdout


def records(logdir: str) -> list[dict[str, Any]]:
    return list(audit_export.records(logdir))


def jsonl(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


# -- the server in the records ---------------------------------------------------------------------
def test_every_record_names_the_server_that_wrote_it(two: TwoServers) -> None:
    for name, s in two.servers.items():
        recs = records(str(s.logdir))
        assert recs and {r["server"] for r in recs} == {name}
        assert {r["log"] for r in recs} == {"calls"}
        assert recs[0]["event"] == "mount" and recs[0]["volume"] == two.volume
    one = records(str(two.servers["files1"].logdir))
    assert any(r["event"] == "rename" and r["uid"] == uid("cfs-alice")
               and r["path"] == "/calls/notes.txt" and r["new_path"] == "/calls/final.txt" for r in one)
    other = records(str(two.servers["files2"].logdir))
    assert any(r["event"] == "open" and r["uid"] == uid("cfs-bob") and r["path"] == "/calls/final.txt"
               for r in other)
    assert any(r["outcome"] == "denied" and r["uid"] == uid("cfs-carol") for r in other)
    assert not any(r["uid"] == uid("cfs-alice") for r in other)  # alice worked on files1 only


def test_verify_checks_each_log_and_reports_per_server(two: TwoServers) -> None:
    res = run_cli("audit", "verify", *two.logs(), *two.keys(), check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    sections = res.stdout.split("== ")[1:]
    assert [s.splitlines()[0] for s in sections] == two.logs()
    for name, section in zip(NAMES, sections, strict=True):
        assert f"\nserver: {name}\n" in section and "verdict: valid" in section
    # the single-log form, as before
    one = two.servers["files1"]
    res = run_cli("audit", "verify", str(one.logdir), "--key", one.pub, check=False)
    assert res.returncode == 0 and "== " not in res.stdout and "server: files1" in res.stdout


# -- one story -------------------------------------------------------------------------------------
def test_export_merges_by_time_naming_the_server(two: TwoServers) -> None:
    text = export(*two.logs())
    got = jsonl(text)
    everything = two.all_records()
    assert sorted(got, key=merge_key) == got
    def canon(r: dict[str, Any]) -> str:
        return json.dumps(r, sort_keys=True)

    assert sorted(map(canon, got)) == sorted(map(canon, everything))  # each record once
    for name in NAMES:  # and each log's own order kept
        assert [r for r in got if r["server"] == name] == records(str(two.servers[name].logdir))
    # the story in the order it happened: alice's rename on files1, then bob's read on files2
    where = {(r["server"], r["event"], r.get("path")): i for i, r in enumerate(got)}
    assert where[("files1", "rename", "/calls/notes.txt")] < where[("files2", "open", "/calls/final.txt")]
    # the order depends on the records alone, not on the order the logs are given in
    assert export(*reversed(two.logs())) == text
    rows = export(*two.logs(), "--format", "csv").splitlines()
    assert rows[0].endswith(",server")
    assert [row.rsplit(",", 1)[1] for row in rows[1:]] == [r["server"] for r in got]
    ecs = jsonl(export(*two.logs(), "--format", "ecs"))
    assert [d["host"]["name"] for d in ecs] == [r["server"] for r in got]


def test_report_over_both_servers(two: TwoServers, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    res = run_cli("audit", "report", *two.logs(), *two.keys(), "--html", str(out), check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = dom(out.read_text())
    cards = [squash(c.text()) for c in doc.find("div", "verdict")]
    assert len(cards) == 2
    for name, card in zip(NAMES, cards, strict=True):
        assert card.startswith("✓ valid") and f"server {name} ·" in card
    denials = table_rows(doc, "denials")
    carol = [row for row in denials if row[2] == "cfs-carol"]
    assert carol and {row[1] for row in carol} == {"files2"}  # the Server column


def test_follow_tails_both_interleaved_by_arrival(two: TwoServers) -> None:
    before = export(*two.logs()).splitlines()
    proc = subprocess.Popen(CRYPTFS + ["audit", "follow", *two.logs(), "--from-start"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until("the records already there", lambda: len(lines) >= len(before), 15)
        assert lines[:len(before)] == before  # first what is there, merged by time

        def arrived(server: str, path: str) -> bool:
            return any(r["server"] == server and r.get("path") == path
                       for r in map(json.loads, lines[len(before):]))

        two.unlock("files2", "cfs-alice")
        as_user("cfs-alice", f"echo one > {two.path('files1', 'calls/follow-1.txt')}")
        wait_until("files1's record", lambda: arrived("files1", "/calls/follow-1.txt"), 10)
        as_user("cfs-alice", f"echo two > {two.path('files2', 'calls/follow-2.txt')}")
        wait_until("files2's record", lambda: arrived("files2", "/calls/follow-2.txt"), 10)
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(10)
        reader.join(5)
    assert rc == 0 and "Traceback" not in (proc.stderr.read() if proc.stderr else "")
    got = [json.loads(x) for x in lines]
    new = got[len(before):]
    first = next(i for i, r in enumerate(new) if r.get("path") == "/calls/follow-1.txt")
    second = next(i for i, r in enumerate(new) if r.get("path") == "/calls/follow-2.txt")
    assert first < second and new[first]["server"] == "files1" and new[second]["server"] == "files2"
    # each record once, and every record of both logs up to now
    now = {(r["server"], r["seq"]) for r in two.all_records()}
    seen = [(r["server"], r["seq"]) for r in got]
    assert len(seen) == len(set(seen)) and set(seen) <= now
    assert {k for k in now if k[0] == "files1" and k[1] <= max(s for n, s in seen if n == "files1")} \
        <= set(seen)


# -- tampering -------------------------------------------------------------------------------------
def _tamper(logdir: Path, find: Any, change: Any) -> tuple[int, int]:
    """Edit the first record ``find`` accepts, in the log's written form (keys
    sorted, no spaces, "h" last); its (line number, seq)."""
    seg = logdir / "segment-000001.log"
    data = seg.read_bytes()
    lines = data.split(b"\n")
    for no, raw in enumerate(lines, 1):
        if not raw.startswith(b'{"') or b'"seq"' not in raw:
            continue
        obj = json.loads(raw.split(b"\0")[0])
        if find(obj):
            h = obj.pop("h")
            change(obj)
            lines[no - 1] = (json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                        ensure_ascii=False)[:-1] + f',"h":"{h}"}}').encode()
            seg.write_bytes(b"\n".join(lines))
            return no, obj["seq"]
    raise AssertionError("no such record")


def test_a_tampered_line_names_its_server_segment_and_line(two: TwoServers,
                                                           tmp_path: Path) -> None:
    copy = tmp_path / "files2-copy"
    shutil.copytree(two.servers["files2"].logdir, copy)
    line, seq = _tamper(copy, lambda r: r["event"] == "create" and r["path"] == "/calls/bob.txt",
                        lambda r: r.update(path="/calls/nothing-here.txt"))
    one = two.servers["files1"]
    res = run_cli("audit", "verify", str(one.logdir), str(copy), "--key", one.pub, "--key",
                  two.servers["files2"].pub, check=False)
    err = assert_one_error(res, 6, ("1 of 2 access logs do not verify", "server files2",
                                    f"({copy})", f"segment-000001.log line {line} (seq {seq})"))
    assert "server files1" not in err
    first, second = res.stdout.split("== ")[1:]
    assert "verdict: valid" in first and "DOES NOT VERIFY" in second
    assert "modified: 1 " in second


def test_the_server_name_is_as_sealed_as_the_rest(two: TwoServers, tmp_path: Path) -> None:
    """Rewriting which server a record names breaks the chain like any other edit."""
    s = two.servers["files2"]
    for what, change in (("renamed", lambda r: r.update(server="files1")),
                         ("removed", lambda r: r.pop("server"))):
        copy = tmp_path / what
        shutil.copytree(s.logdir, copy)
        line, _ = _tamper(copy, lambda r: r["event"] == "open" and r["path"] == "/calls/final.txt",
                          change)
        res = run_cli("audit", "verify", str(copy), "--key", s.pub, check=False)
        assert res.returncode == 6, (what, res.stdout)
        assert f"first bad: segment-000001.log line {line}" in res.stdout, (what, res.stdout)
        assert "its content does not match its hash" in res.stdout


# -- one rsyslog collector -------------------------------------------------------------------------
COLLECTOR_CONF = """\
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imtcp")
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="cryptfs")
ruleset(name="cryptfs") {{
  action(type="omfile" file="{out}" template="RSYSLOG_SyslogProtocol23Format")
}}
"""


def test_the_collectors_merged_export_matches_the_logs(two: TwoServers, tmp_path: Path) -> None:
    collector = Rsyslog(tmp_path / "rsyslog", conf=COLLECTOR_CONF)
    collector.start()
    forwarders = [Forwarder(s.logdir, ("--to", f"127.0.0.1:{collector.port}", "--from-start",
                                       "--state", str(tmp_path / f"{s.name}.cursor")),
                            tmp_path / f"{s.name}.stderr") for s in two.servers.values()]
    # files1's records twice: a second forwarder with a state of its own (at least once)
    forwarders.append(Forwarder(two.servers["files1"].logdir,
                                ("--to", f"127.0.0.1:{collector.port}", "--from-start",
                                 "--state", str(tmp_path / "again.cursor")),
                                tmp_path / "again.stderr"))
    try:
        for f in forwarders:
            f.start()
        want = export(*two.logs())
        n = len(want.splitlines())
        n1 = len(records(str(two.servers["files1"].logdir)))

        def lines() -> list[bytes]:
            return collector.out.read_bytes().splitlines() if collector.out.exists() else []

        wait_until("every record at the collector", lambda: len(lines()) >= n + n1, 15)
        for f in forwarders:
            assert f.stop() == 0 and "Traceback" not in f.log()
    finally:
        for f in forwarders:
            f.stop()
        collector.stop()
    held = lines()
    assert len(held) == n + n1  # files1's records are there twice
    assert all(b" cryptfs " in x for x in held)
    assert export("--from-syslog", str(collector.out)) == want
    for fmt in ("csv", "cef"):
        assert export("--from-syslog", str(collector.out), "--format", fmt) == \
            export(*two.logs(), "--format", fmt)
    got = jsonl(want)
    assert {r["server"] for r in got} == set(NAMES)

    # Whoever can send to the collector can send a record under another's name: a
    # message claiming a (server, log, seq) already held, with other content, is not
    # taken for a repeat; both are exported, with a warning, and the exit status is 6.
    target = next(x for x in held if b'"event": "open"' in x or b'"event":"open"' in x)
    forged = target.replace(b'"outcome": "allowed"', b'"outcome": "denied"').replace(
        b'"outcome":"allowed"', b'"outcome":"denied"')
    assert forged != target
    copy = tmp_path / "collector-copy.log"
    copy.write_bytes(b"\n".join([*held, target, forged]) + b"\n")  # a repeat, and a forgery
    res = run_cli("audit", "export", "--from-syslog", str(copy), check=False)
    assert res.returncode == 6 and "Traceback" not in res.stderr, res.stderr
    assert "1 record(s)" in res.stderr and "claimed by two different messages" in res.stderr
    out = jsonl(res.stdout)
    assert len(out) == len(got) + 1  # the repeat dropped, the forgery kept beside the original
    seq_of = json.loads(target[target.index(b"{"):])
    twins = [r for r in out if (r["server"], r["seq"]) == (seq_of["server"], seq_of["seq"])]
    assert sorted(r["outcome"] for r in twins) == ["allowed", "denied"]


# -- bad input -------------------------------------------------------------------------------------
def test_bad_input(two: TwoServers, tmp_path: Path) -> None:
    log1, log2 = two.logs()
    pub1, pub2 = (s.pub for s in two.servers.values())
    assert_usage_error(run_cli("audit", "export", log1, str(tmp_path / "missing"), check=False),
                       "does not exist")
    (tmp_path / "empty").mkdir()
    for cmd in (("export",), ("follow",), ("verify", "--key", pub1, "--key", pub2)):
        assert_one_error(run_cli("audit", *cmd, log1, str(tmp_path / "empty"), check=False), 2,
                         "holds no access log")
    shutil.copytree(log2, tmp_path / "copy")
    for other in (log2, str(tmp_path / "copy")):
        assert_one_error(run_cli("audit", "export", log2, other, check=False), 2,
                         "are the same log")
    # a log of another volume
    foreign = tmp_path / "foreign"
    init_log(str(foreign), "calls")
    w = AuditLog(str(foreign), server="files3")
    w.record(event="mount", outcome="allowed", uid=0, user="root", pid=1, exe="", volume="ab" * 16,
             path="/mnt")
    w.close()
    for cmd in (("export",), ("follow",), ("verify", "--key", pub1, "--key", pub1),
                ("report", "--html", str(tmp_path / "r.html"))):
        assert_one_error(run_cli("audit", *cmd, log1, str(foreign), check=False), 2,
                         ("not of one volume", two.volume[:16], "abababab"))
    assert_one_error(run_cli("audit", "verify", log1, log2, "--key", pub1, check=False), 2,
                     "1 --key for 2 LOGDIR")
    assert_one_error(run_cli("audit", "export", log1, "--from-syslog", str(SAMPLE / "audit.pub"),
                             check=False), 2, "not both")
    assert_one_error(run_cli("audit", "export", check=False), 2, "give a LOGDIR")
    # A collector's file is a regular file (/dev/zero was one endless line), and one
    # with lines but none of cryptfs's is no collector's file of cryptfs.
    assert_one_error(run_cli("audit", "export", "--from-syslog", "/dev/zero", check=False), 2,
                     "/dev/zero is not a regular file")
    assert_one_error(run_cli("audit", "export", "--from-syslog", "/etc/passwd", check=False), 2,
                     "/etc/passwd holds no message of cryptfs")
    long_line = tmp_path / "long.log"
    long_line.write_bytes(b"x" * (3 << 20) + b"\n" + b"y\n")
    assert_one_error(run_cli("audit", "export", "--from-syslog", str(long_line), check=False), 2,
                     "holds no message of cryptfs (2 line(s) of other programs or formats)")
    (tmp_path / "mnt").mkdir()
    assert_one_error(run_cli("mount", str(two.backing), str(tmp_path / "mnt"), "--agent",
                             "--audit-log", log1, "--server", "files 1", check=False), 2,
                     "unusable server name 'files 1'")
    assert_one_error(run_cli("audit", "init", str(tmp_path / "new"), "--server", "bad name",
                             check=False), 2, "unusable server name")
    assert not (tmp_path / "new").exists()


def test_help_names_the_new_options() -> None:
    for cmd, words in ((("audit", "verify"), ("LOGDIR...", "once per LOGDIR")),
                       (("audit", "export"), ("--from-syslog", "merged by time")),
                       (("audit", "follow"), ("LOGDIR...", "interleaved")),
                       (("audit", "init"), ("--server",)),
                       (("mount",), ("--server",))):
        out = squash(run_cli(*cmd, "--help").stdout)
        for w in words:
            assert w in out, (cmd, w)


# -- a log written before records named their server ------------------------------------------------
def test_a_log_from_before_still_verifies_and_merges(tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(SAMPLE, old)
    res = run_cli("audit", "verify", str(old), "--key", str(old / "audit.pub"), check=False)
    assert res.returncode == 0 and "valid: 5 " in res.stdout and "server" not in res.stdout
    new = tmp_path / "new"
    init_log(str(new), "calls")
    old_recs = records(str(old))
    times = [r["time_ns"] + 500_000_000 for r in old_recs[:2]]
    w = AuditLog(str(new), server="files9", clock=lambda: times.pop(0) if times else 1)
    for path in ("/x", "/y"):
        w.record(event="open", outcome="allowed", uid=0, user="root", pid=1, exe="",
                 volume="5f0c2a9e" * 4, path=path, intent="read")
    w.close()
    got = jsonl(export(str(new), str(old)))
    assert [(r.get("server"), r["seq"]) for r in got] == \
        [(None, 1), ("files9", 1), (None, 2), ("files9", 2), (None, 3), (None, 4), (None, 5)]
    assert got[0] == old_recs[0]  # as written: no server added
    rows = export(str(old), str(new), "--format", "csv").splitlines()[1:]
    assert [row.rsplit(",", 1)[1] for row in rows] == ["", "files9", "", "files9", "", "", ""]
    res = run_cli("audit", "verify", str(old), str(new), "--key", str(old / "audit.pub"),
                  "--key", str(new / "audit.pub"), check=False)
    assert res.returncode == 0 and "server: files9" in res.stdout


def test_the_name_given_to_a_log_stays_with_it(tmp_path: Path) -> None:
    """`audit init --server` (or a mount's --server) names the server for every
    later writer of that log, a command writing it directly too."""
    d = tmp_path / "log"
    run_cli("audit", "init", str(d), "--server", "files7")
    for server in (None, "files8", None):
        w = AuditLog(str(d), server=server)
        w.record(event="open", outcome="allowed", uid=0, user="root", pid=1, exe="", volume="ab",
                 path="/", intent="read")
        w.close()
    assert [r["server"] for r in records(str(d))] == ["files7", "files8", "files8"]
    plain = tmp_path / "plain"
    init_log(str(plain), "plain")
    w = AuditLog(str(plain))
    w.record(event="open", outcome="allowed", uid=0, user="root", pid=1, exe="", volume="ab",
             path="/", intent="read")
    w.close()
    assert records(str(plain))[0]["server"] == os.uname().nodename
    assert "server" not in json.loads((plain / "audit.key").read_text())
