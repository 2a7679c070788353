"""A mount with an access log: what a session of work records, and
"no log, no plaintext" on a full disk (a real tmpfs)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Mount, new_mount, run_cli
from cryptfs.audit.chain import parse_verifier
from cryptfs.audit.verify import verify


def records(logdir: Path) -> list[dict]:
    out = []
    for seg in sorted(logdir.glob("segment-*.log")):
        out += [o for o in map(json.loads, seg.read_text().splitlines()) if "seq" in o]
    return out


@pytest.fixture
def logged(tmp_path: Path, backing: Path, passfile: Path) -> Iterator[tuple[Mount, Path]]:
    logdir = tmp_path / "log"
    run_cli("audit", "init", str(logdir))
    m = new_mount(tmp_path, backing, passfile)
    m.start("--audit-log", str(logdir))
    try:
        yield m, logdir
    finally:
        m.stop()


def test_a_session_of_work_records_exactly_what_happened(logged: tuple[Mount, Path]) -> None:
    m, logdir = logged
    subprocess.run(["mkdir", str(m.path("calls"))], check=True)
    subprocess.run(["cp", "/etc/hostname", str(m.path("calls", "note.txt"))], check=True)
    subprocess.run(["mv", str(m.path("calls", "note.txt")), str(m.path("calls", "n2.txt"))],
                   check=True)
    subprocess.run(["chmod", "600", str(m.path("calls", "n2.txt"))], check=True)
    subprocess.run(["truncate", "-s", "3", str(m.path("calls", "n2.txt"))], check=True)
    subprocess.run(["rm", str(m.path("calls", "n2.txt"))], check=True)
    subprocess.run(["rmdir", str(m.path("calls"))], check=True)
    m.stop()
    got = [(r["event"], r["outcome"], r.get("path"), r.get("new_path"), os.path.basename(r["exe"]))
           for r in records(logdir) if r["event"] != "utimes"]
    assert got == [
        ("mount", "allowed", str(m.mnt), None, got[0][4]),
        ("mkdir", "allowed", "/calls", None, "mkdir"),
        ("create", "allowed", "/calls/note.txt", None, "cp"),
        ("close", "allowed", "/calls/note.txt", None, "cp"),
        ("rename", "allowed", "/calls/note.txt", "/calls/n2.txt", "mv"),
        ("chmod", "allowed", "/calls/n2.txt", None, "chmod"),
        ("open", "allowed", "/calls/n2.txt", None, "truncate"),  # truncate(1) opens, then
        ("truncate", "allowed", "/calls/n2.txt", None, "truncate"),  # ftruncate(2)
        ("close", "allowed", "/calls/n2.txt", None, "truncate"),
        ("unlink", "allowed", "/calls/n2.txt", None, "rm"),
        ("rmdir", "allowed", "/calls", None, "rmdir"),
        ("unmount", "allowed", str(m.mnt), None, got[-1][4]),
    ], got
    recs = records(logdir)
    close = next(r for r in recs if r["event"] == "close")
    assert close["bytes_written"] == len(Path("/etc/hostname").read_bytes())
    assert close["duration_ns"] >= 0 and close["uid"] == 0 and close["user"] == "root"
    trunc = next(r for r in recs if r["event"] == "truncate")
    assert trunc["size"] == 3 and all(r["volume"] == recs[0]["volume"] for r in recs)
    assert len(recs[0]["volume"]) == 32
    v = verify(str(logdir), parse_verifier((logdir / "audit.pub").read_text()))
    assert v.ok and v.valid == len(recs) and v.unsealed == 0  # unmount seals the tail


def test_an_open_of_a_hard_linked_file_says_how_many_names_it_has(
        logged: tuple[Mount, Path]) -> None:
    """The kernel tells the mount which file is opened, not by which name: for a
    file with several names the record's path is one of them, and the record
    says so with the count of names."""
    m, logdir = logged
    os.mkdir(m.path("crm"))
    os.mkdir(m.path("pub"))
    m.path("crm", "h.csv").write_bytes(b"ACME;0123\n")
    m.path("pub", "solo.txt").write_bytes(b"one name\n")
    os.link(m.path("crm", "h.csv"), m.path("pub", "x.txt"))
    assert m.path("pub", "x.txt").read_bytes() == b"ACME;0123\n"
    assert m.path("pub", "solo.txt").read_bytes() == b"one name\n"
    os.unlink(m.path("pub", "x.txt"))
    assert m.path("crm", "h.csv").read_bytes() == b"ACME;0123\n"
    m.stop()
    opens = [(r["path"], r.get("links")) for r in records(logdir) if r["event"] == "open"]
    assert [links for _, links in opens] == [2, None, None], opens
    assert opens[0][0] in ("/pub/x.txt", "/crm/h.csv") and opens[1:] == [
        ("/pub/solo.txt", None), ("/crm/h.csv", None)], opens


def test_denials_and_errors_are_recorded(logged: tuple[Mount, Path]) -> None:
    m, logdir = logged
    with pytest.raises(FileNotFoundError):
        os.rmdir(m.path("nothing-here"))
    os.mkdir(m.path("d"))
    (m.path("d", "f")).write_bytes(b"x")
    with pytest.raises(OSError) as e:
        os.rmdir(m.path("d"))
    assert e.value.errno == errno.ENOTEMPTY
    m.stop()
    recs = records(logdir)
    bad = [(r["event"], r["outcome"], r.get("reason"), r["path"]) for r in recs
           if r["outcome"] != "allowed"]
    assert ("rmdir", "error", "ENOTEMPTY", "/d") in bad


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def _fill(path: Path) -> Path:
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.mark.parametrize("fail_open", [False, True], ids=["fail-closed", "fail-open"])
def test_a_full_disk_for_the_log(tmp_path: Path, backing: Path, passfile: Path,
                                 fail_open: bool) -> None:
    """No log, no plaintext: with the log's filesystem full, opens, creates and
    reads of open files are refused (fail closed), or served with an alarm
    (fail open); once there is room again, access comes back and is logged."""
    small = tmp_path / "small"
    _tmpfs(small, "256k")
    try:
        logdir = small / "log"
        run_cli("audit", "init", str(logdir))
        m = new_mount(tmp_path, backing, passfile)
        m.start("--audit-log", str(logdir), *(["--audit-fail-open"] if fail_open else []))
        try:
            secret = m.path("secret.txt")
            secret.write_bytes(b"customer data\n")
            held = os.open(secret, os.O_RDONLY)
            filler = _fill(small)
            try:
                if fail_open:
                    for _ in range(200):
                        assert secret.read_bytes() == b"customer data\n"
                    assert os.pread(held, 100, 0) == b"customer data\n"
                    assert "ALARM: cannot write the access log" in m.log_text()
                else:
                    # (The segment's last page may have room for a few records:
                    # the refusal comes when a record finds no room.)
                    for i in range(200):
                        try:
                            assert secret.read_bytes() == b"customer data\n"
                        except PermissionError:
                            break
                    else:
                        raise AssertionError("200 opens were served with the log's disk full")
                    with pytest.raises(PermissionError):
                        secret.read_bytes()
                    with pytest.raises(PermissionError):
                        m.path("new.txt").write_bytes(b"y")
                    # The page cache of this passphrase mount may hold the page, so
                    # drop it: a read must reach the daemon, which refuses.
                    Path("/proc/sys/vm/drop_caches").write_text("3\n")
                    with pytest.raises(PermissionError):
                        os.pread(held, 100, 0)
                    assert "ALARM: cannot write the access log" in m.log_text()
                    assert "no access is served until it can be written" in m.log_text()
            finally:
                filler.unlink()
            import time
            time.sleep(1.1)  # (a broken log is tried again once a second)
            assert secret.read_bytes() == b"customer data\n"
            os.close(held)
        finally:
            m.stop()
        events = [r["event"] for r in records(logdir)]
        assert events[0] == "mount" and events[-1] == "unmount"
        assert ("log-resumed" in events) == (not fail_open) or fail_open
        assert "the access log can be written again" in m.log_text()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_the_agent_records_unlocks_failed_unlocks_and_locks(tmp_path: Path) -> None:
    from multiuser import shared_scenario

    alog = tmp_path / "agent-log"
    run_cli("audit", "init", str(alog))
    with shared_scenario(("--idle-timeout", "0", "--backoff", "0.2", "--backoff-max", "1",
                          "--audit-log", str(alog))) as s:
        assert s.unlock("cfs-alice").returncode == 0
        wrong = s.root / "pass" / "wrong"  # (a directory cfs-bob can read)
        wrong.write_text("not bob's passphrase\n")
        wrong.chmod(0o644)
        assert s.unlock("cfs-bob", wrong).returncode != 0
        assert s.lock("cfs-alice").returncode == 0
        backing = str(s.backing)
    got = [(r["event"], r["outcome"], r["user"], r.get("reason"), r.get("path"))
           for r in records(alog)]
    assert len(got) >= 3, (got, list(alog.iterdir()))
    assert got[:3] == [("unlock", "allowed", "cfs-alice", None, backing),
                       ("unlock", "denied", "cfs-bob", "wrong passphrase", backing),
                       ("lock", "allowed", "cfs-alice", got[2][3], backing)], got
    recs = records(alog)
    assert recs[0]["exe"].endswith("python3.11") or recs[0]["exe"].startswith("/usr/bin/python")
    assert recs[1]["failures"] == 1 and len(recs[0]["volume"]) == 32
    v = verify(str(alog), parse_verifier((alog / "audit.pub").read_text()))
    assert v.ok and v.unsealed == 0  # the agent seals its log when it stops


FLOOD = ("import os, sys\n"
         "for i in range(int(sys.argv[2])):\n"
         "    try:\n"
         "        os.stat(os.path.join(sys.argv[1], 'x' * 200 + str(i)))\n"
         "    except OSError:\n"
         "        pass\n")


def test_a_flood_of_refusals_is_counted_not_recorded_one_by_one() -> None:
    """Review finding: a user the mount serves nothing (no session) wrote a record
    per refused request, 19 MB in 3 s; a full log disk then stops a fail-closed
    mount for everyone. Beyond the first few a minute per user and request, the
    refusals are counted and summed up in one record (at the seal, or unmount)."""
    import pwd

    from cryptfs.audit import Auditor
    from multiuser import bind_log, run_as, shared_scenario

    n = 300
    with shared_scenario() as s:
        logdir = bind_log(s)
        assert s.unlock("cfs-alice").returncode == 0
        run_as("cfs-bob", "python3", "-c", FLOOD, str(s.mount.mnt), str(n))  # (not unlocked)
        res = run_as("cfs-alice", "ls", str(s.mount.mnt))  # (served, as ever)
        assert res.returncode == 0, res
        s.mount.stop()
        recs = records(logdir)  # (the scenario's directory goes at its end)
        v = verify(str(logdir), parse_verifier((logdir / "audit.pub").read_text()))
    bob = pwd.getpwnam("cfs-bob").pw_uid
    one_by_one = [r for r in recs if r["uid"] == bob and r["event"] == "lookup"]
    assert len(one_by_one) == Auditor.DENIALS_FIRST
    assert all(r["outcome"] == "denied" for r in one_by_one)
    held = [r for r in recs if r["event"] == "refusals-held" and r["uid"] == bob]
    counted = sum(r["count"] for r in held if r["refused"] == "lookup")
    assert counted + len(one_by_one) >= n, held  # (each stat: at least one LOOKUP)
    assert all(r["user"] == "cfs-bob" and r["outcome"] == "denied" and "counted" in r["reason"]
               for r in held)
    assert not any(r["user"] == "cfs-alice" and r["outcome"] != "allowed" for r in recs)
    assert v.ok and v.modified == 0


def test_a_program_whose_path_is_not_utf8_is_recorded(logged: tuple[Mount, Path],
                                                      tmp_path: Path) -> None:
    """/proc/PID/exe is bytes: a program under a name that is not UTF-8 is
    recorded (its odd bytes as \\xNN), not refused for want of a record."""
    m, logdir = logged
    m.path("a.txt").write_text("hello\n")
    odd = os.fsencode(str(tmp_path)) + b"/ca\xfft"
    shutil.copy("/bin/cat", odd)
    out = subprocess.run([odd, str(m.path("a.txt"))], capture_output=True, check=True).stdout
    assert out == b"hello\n"
    m.stop()
    opens = [r for r in records(logdir) if r["event"] == "open" and r["path"] == "/a.txt"]
    assert [r["exe"] for r in opens] == [str(tmp_path) + "/ca\\xfft"]


def test_no_change_is_made_that_its_record_cannot_follow(tmp_path: Path, backing: Path,
                                                         passfile: Path) -> None:
    """Review finding: with the log's disk full, an unlink was carried out and
    then refused for want of a record (the file gone, no record).  Now the
    room for a record is made sure of before a request acts: every file is
    either still there or has its unlink record, never neither."""
    small = tmp_path / "small"
    _tmpfs(small, "4m")
    try:
        logdir = small / "log"
        pub = run_cli("audit", "init", str(logdir)).stdout.strip()
        m = new_mount(tmp_path, backing, passfile)
        m.start("--audit-log", str(logdir))
        names = [f"c{i:04d}" for i in range(4000)]
        try:
            for n in names:
                fd = os.open(m.path(n), os.O_WRONLY | os.O_CREAT, 0o644)
                os.close(fd)
            filler = _fill(small)
            refused = None
            for n in names:
                try:
                    os.unlink(m.path(n))
                except PermissionError:
                    refused = n
                    break
            assert refused is not None, "the log never ran out of room"
            filler.unlink()
        finally:
            m.stop()
        m.start()  # (no log: only to see what is there)
        try:
            there = {n for n in names if os.path.lexists(m.path(n))}
        finally:
            m.stop()
        gone = {r["path"][1:] for r in records(logdir)
                if r["event"] == "unlink" and r["outcome"] == "allowed"}
        assert refused in there
        assert there | gone == set(names) and not there & gone
        assert verify(str(logdir), parse_verifier(pub)).ok
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def _cli_verify(logdir: Path) -> subprocess.CompletedProcess[str]:
    return run_cli("audit", "verify", str(logdir), "--key", str(logdir / "audit.pub"),
                   check=False)


def test_a_sealed_line_verifies_only_byte_for_byte(tmp_path: Path,
                                                   logged: tuple[Mount, Path]) -> None:
    """Root edits a sealed line so that it parses to the same record (duplicate
    keys in front, spacing, a CR): grep and a SIEM that keeps the first of two
    keys see forged values, so verify must fail, naming segment and line."""
    m, logdir = logged
    subprocess.run(["cp", "/etc/hostname", str(m.path("note.txt"))], check=True)
    subprocess.run(["cat", str(m.path("note.txt"))], check=True, capture_output=True)
    m.stop()  # (seals the tail)
    res = _cli_verify(logdir)
    assert res.returncode == 0 and "verdict: valid" in res.stdout, res.stdout + res.stderr
    seg = sorted(logdir.glob("segment-*.log"))[0]
    lines = seg.read_bytes().split(b"\n")
    n = next(i for i, ln in enumerate(lines) if b'"event":"open"' in ln)
    seq = json.loads(lines[n])["seq"]
    forged = b'{"exe":"/usr/bin/forged","path":"/not/what/was/read",' + lines[n][1:]
    # (what the chain covers is unchanged for a parser that keeps the last key)
    assert json.loads(forged) == json.loads(lines[n])
    spaced = lines[n].replace(b'","', b'", "', 1)
    edits = {"duplicate keys": forged, "a space": spaced, "a CR": lines[n] + b"\r",
             "key order": b'{"seq":%d,' % seq + lines[n][1:].replace(b'"seq":%d,' % seq, b"", 1),
             "h sorted in": json.dumps(json.loads(lines[n]), sort_keys=True, separators=(",", ":"),
                                       ensure_ascii=False).encode(),
             "an escape": lines[n].replace(b'"event"', b'"\\u0065vent"', 1)}
    for what, line in edits.items():
        assert json.loads(line) == json.loads(lines[n]), what
        copy = tmp_path / f"copy-{what.replace(' ', '-')}"
        shutil.copytree(logdir, copy)
        target = sorted(copy.glob("segment-*.log"))[0]
        target.write_bytes(b"\n".join(lines[:n] + [line] + lines[n + 1:]))
        res = _cli_verify(copy)
        assert res.returncode == 6, (what, res.stdout, res.stderr)
        assert f"first bad: {seg.name} line {n + 1} (seq {seq}): its bytes are not the record " \
               "as written" in res.stdout, (what, res.stdout)
        assert "modified: 1 " in res.stdout and "does not verify" in res.stderr
        assert "Traceback" not in res.stderr
    # The untouched log still verifies.
    assert _cli_verify(logdir).returncode == 0
