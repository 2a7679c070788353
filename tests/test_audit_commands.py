"""A volume bound to its access log (`cryptfs audit attach`): the mount writes
it without being told, and every command that changes the volume or takes
data out of it records itself first, directly or through the mount that
holds the log; a command whose record cannot be written does nothing."""

from __future__ import annotations

import csv
import io
import json
import os
import pwd
import subprocess
from pathlib import Path

import pytest
from test_audit_mount import _tmpfs, records
from test_roles import _add

from conftest import Mount, new_mount, run_cli
from cryptfs.audit.chain import parse_verifier
from cryptfs.audit.verify import verify
from cryptfs.audit.writer import AuditLog, LogBusy, init_log
from multiuser import Shared, bind_log, run_as

FAST = ("--kdf-memory", "8", "--kdf-iterations", "1")


def _volume(tmp_path: Path, passfile: Path) -> tuple[Path, Path, Path, str]:
    """A volume with a recovery key, bound to a fresh log: (backing, logdir, key file, pub)."""
    backing, logdir, key = tmp_path / "backing", tmp_path / "log", tmp_path / "recovery.key"
    run_cli("init", str(backing), "--passphrase-file", str(passfile), "--recovery-key", str(key),
            *FAST)
    pub = run_cli("audit", "init", str(logdir)).stdout.strip()
    out = run_cli("audit", "attach", str(backing), str(logdir), "--passphrase-file",
                  str(passfile)).stdout
    assert f"now records every access in {logdir}" in out
    return backing, logdir, key, pub


def _try_mount(m: Mount, *extra: str) -> subprocess.CompletedProcess[str]:
    m.mnt.mkdir(exist_ok=True)
    res = run_cli("mount", str(m.backing), str(m.mnt), *m.mount_args(), *extra, check=False)
    assert not os.path.ismount(m.mnt)
    return res


def _brief(logdir: Path) -> list[tuple]:
    return [(r["event"], r["outcome"], r.get("command"), r.get("target") or r.get("path"))
            for r in records(logdir)]


def test_offline_commands_record_themselves(tmp_path: Path, passfile: Path) -> None:
    backing, logdir, key, pub = _volume(tmp_path, passfile)
    conf = json.loads((backing / "cryptfs.conf").read_text())
    assert conf["audit"] == {"dir": str(logdir), "key": pub}
    bp = ("--passphrase-file", str(passfile))
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    run_cli("user", "add", str(backing), "nobody", "--role", "auditor", *bp,
            "--new-passphrase-file", str(passfile), *FAST)
    run_cli("policy", "set", str(backing), "/calls", "--mode", "hybrid", *bp)
    run_cli("policy", "unset", str(backing), "/calls", *bp)
    assert run_cli("policy", "set", str(backing), "/x", "--mode", "aes-256-gcm",
                   "--passphrase-file", str(wrong), check=False).returncode == 3
    run_cli("user", "passwd", str(backing), "nobody", *bp, "--new-passphrase-file", str(passfile),
            *FAST)
    run_cli("rotate", str(backing), "--slots", *bp)
    run_cli("user", "remove", str(backing), "nobody", *bp)
    run_cli("recover", str(backing), "--recovery-key", str(key), "--out", str(tmp_path / "out"))
    assert _brief(logdir) == [
        ("audit-attach", "allowed", "cryptfs audit attach", None),
        ("user-add", "allowed", "cryptfs user add", "nobody"),
        ("policy-set", "allowed", "cryptfs policy set", "/calls"),
        ("policy-unset", "allowed", "cryptfs policy unset", "/calls"),
        ("unlock", "denied", "cryptfs policy set", None),
        ("passwd", "allowed", "cryptfs user passwd", "nobody"),
        ("rotation", "allowed", "cryptfs rotate", None),
        ("user-remove", "allowed", "cryptfs user remove", "nobody"),
        ("recovery", "allowed", "cryptfs recover", ["/"]),
    ]
    rs = records(logdir)
    assert all(r["uid"] == 0 and r["user"] == "root" and r["pid"] > 0 and r["exe"]
               and r["backing"] == str(backing) and r["volume"] == conf["volume_id"] for r in rs)
    assert rs[1]["role"] == "auditor" and rs[2]["mode"] == "hybrid"
    assert rs[4]["reason"] == "wrong passphrase" and rs[6]["kind"] == "slots"
    assert rs[8]["out"] == str(tmp_path / "out")
    assert len({r["pid"] for r in rs}) == len(rs)  # one process each
    # Every command sealed what it wrote: the whole log verifies, nothing unsealed.
    v = verify(str(logdir), parse_verifier(pub))
    assert v.ok and v.valid == len(rs) and v.unsealed == 0


def test_a_command_whose_record_cannot_be_written_does_nothing(tmp_path: Path,
                                                               passfile: Path) -> None:
    small = tmp_path / "small"
    _tmpfs(small, "256k")
    try:
        backing, logdir = tmp_path / "backing", small / "log"
        run_cli("init", str(backing), "--passphrase-file", str(passfile), "--no-recovery-key",
                *FAST)
        run_cli("audit", "init", str(logdir))
        run_cli("audit", "attach", str(backing), str(logdir), "--passphrase-file", str(passfile))
        before = (backing / "cryptfs.conf").read_bytes()
        subprocess.run(["mount", "-o", "remount,ro", str(small)], check=True)
        res = run_cli("user", "add", str(backing), "nobody", "--passphrase-file", str(passfile),
                      "--new-passphrase-file", str(passfile), *FAST, check=False)
        assert res.returncode == 7, res.stderr
        assert "cannot write the access log" in res.stderr and "nothing was done" in res.stderr
        assert "Traceback" not in res.stderr
        assert (backing / "cryptfs.conf").read_bytes() == before
        subprocess.run(["mount", "-o", "remount,rw", str(small)], check=True)
        run_cli("user", "add", str(backing), "nobody", "--passphrase-file", str(passfile),
                "--new-passphrase-file", str(passfile), *FAST)
        assert [r["event"] for r in records(logdir)][-1] == "user-add"
        assert (backing / "cryptfs.conf").read_bytes() != before
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_the_mount_writes_the_bound_log_and_takes_commands_records(tmp_path: Path,
                                                                    passfile: Path) -> None:
    backing, logdir, _key, pub = _volume(tmp_path, passfile)
    other = tmp_path / "other"
    run_cli("audit", "init", str(other))
    m = new_mount(tmp_path, backing, passfile)
    res = _try_mount(m, "--audit-log", str(other))
    assert res.returncode == 2 and f"bound to the access log in {logdir}" in res.stderr
    m.start()  # no --audit-log: the bound one
    try:
        m.path("calls").mkdir()
        m.path("calls", "c1.csv").write_text("surname,phone\nWang,13812341234\n")
        # The mount holds the log: these commands hand their records to it.
        run_cli("policy", "set", str(backing), "/calls", "--mode", "xchacha20-poly1305",
                "--passphrase-file", str(passfile))
        age_key = subprocess.run(["age-keygen"], capture_output=True, text=True, check=True).stdout
        recipient = next(ln.split(": ")[1] for ln in age_key.splitlines()
                         if ln.startswith("# public key"))
        run_cli("export", str(m.path("calls", "c1.csv")), "--to", recipient, "--out",
                str(tmp_path / "c1.age"))
    finally:
        m.stop()
    rs = records(logdir)
    got = [(r["event"], r.get("path")) for r in rs if r["event"] not in ("utimes", "getattr")]
    assert got[0] == ("audit-attach", None)
    assert ("mount", str(m.mnt)) in got and got[-1] == ("unmount", str(m.mnt))
    i = got.index(("policy-set", "/calls"))
    j = got.index(("export", "/calls/c1.csv"))
    # The export record comes first, then the read it makes through the mount.
    assert got[j + 1:j + 3] == [("open", "/calls/c1.csv"), ("close", "/calls/c1.csv")]
    assert i < j
    pol, exp = (next(r for r in rs if r["event"] == e) for e in ("policy-set", "export"))
    for r in (pol, exp):
        # Written by the mount, with the uid and pid the kernel gave for the command.
        assert r["uid"] == 0 and r["pid"] > 0 and r["pid"] != os.getpid() and r["exe"]
        assert r["volume"] == next(x for x in rs if x["event"] == "mount")["volume"]
    assert exp["recipients"] == [recipient] and exp["out"] == str(tmp_path / "c1.age")
    assert pol["command"] == "cryptfs policy set" and pol["mode"] == "xchacha20-poly1305"
    assert not any(r["event"] == "setxattr" for r in rs)  # (the command's record is the record)
    v = verify(str(logdir), parse_verifier(pub))
    assert v.ok and v.valid == len(rs)


def test_the_mount_refuses_forged_command_records(tmp_path: Path, passfile: Path) -> None:
    backing, logdir, _key, _pub = _volume(tmp_path, passfile)
    m = new_mount(tmp_path, backing, passfile)
    m.start()
    try:
        for bad in (b"not json", b'{"event": "open", "outcome": "allowed"}',
                    b'{"event": "export", "outcome": "allowed", "path": "/x\\ud800"}',
                    b'{"event": "export", "outcome": "allowed", "revoke": 100000000000000000000}',
                    b'{"event": "export", "outcome": "allowed", "uid": 0}',
                    b'{"event": "export", "outcome": "maybe"}'):
            with pytest.raises(OSError) as e:
                os.setxattr(m.mnt, b"user.cryptfs.audit", bad)
            assert e.value.errno == 22, bad
        # A record for another log is not this mount's to write.
        with pytest.raises(OSError) as e:
            os.setxattr(m.mnt, b"user.cryptfs.audit",
                        b'{"event": "export", "outcome": "allowed", "logdir": "/elsewhere"}')
        assert e.value.errno == 18
    finally:
        m.stop()
    assert not any(r["event"] in ("open", "export") for r in records(logdir))


def test_a_log_put_in_place_of_the_bound_one_is_refused(tmp_path: Path, passfile: Path) -> None:
    backing, logdir, _key, _pub = _volume(tmp_path, passfile)
    for p in logdir.iterdir():
        p.unlink()
    logdir.rmdir()
    run_cli("audit", "init", str(logdir))  # a fresh log, another key
    m = new_mount(tmp_path, backing, passfile)
    res = _try_mount(m)
    assert res.returncode == 2 and "not the one this volume is bound to" in res.stderr
    res = run_cli("policy", "set", str(backing), "/a", "--mode", "aes-256-gcm",
                  "--passphrase-file", str(passfile), check=False)
    assert res.returncode == 7 and "nothing was done" in res.stderr
    # Detaching needs --force when the log cannot take the record.
    res = run_cli("audit", "detach", str(backing), "--passphrase-file", str(passfile), check=False)
    assert res.returncode == 7
    res = run_cli("audit", "detach", str(backing), "--force", "--passphrase-file", str(passfile))
    assert "not recorded" in res.stderr
    assert "audit" not in json.loads((backing / "cryptfs.conf").read_text())
    m.start()  # no log now
    m.stop()


def test_a_second_writer_is_told_who_holds_the_log(tmp_path: Path) -> None:
    d = tmp_path / "log"
    init_log(str(d), "one")
    first = AuditLog(str(d))
    try:
        with pytest.raises(LogBusy) as e:
            AuditLog(str(d), wait=0.2)
        assert f"pid {os.getpid()}" in str(e.value)
    finally:
        first.close()
    AuditLog(str(d), wait=0).close()  # free again


def test_export_survives_text_that_is_not_utf8(tmp_path: Path) -> None:
    """Review finding: one record holding a lone surrogate (as CESU bytes, from
    an edited log or an older writer) ended every export and follow with an
    internal error.  Now such text is written escaped and the rest follows."""
    d = tmp_path / "log"
    init_log(str(d), "odd")
    w = AuditLog(str(d))
    w.record(event="open", outcome="allowed", path="/SURROGATE")
    w.record(event="open", outcome="allowed", path="/after")
    w.close()
    seg = next(d.glob("segment-*.log"))
    seg.write_bytes(seg.read_bytes().replace(b"SURROGATE", b"x\\ud800y"))
    for fmt in ("jsonl", "csv", "cef", "ecs", "ocsf"):
        res = run_cli("audit", "export", str(d), "--format", fmt, check=False)
        assert res.returncode == 0 and "Traceback" not in res.stderr, (fmt, res.stderr)
        assert "/after" in res.stdout and "ud800" in res.stdout, fmt


HAND = ("import errno, os, sys\n"
        "try:\n"
        "    os.setxattr(sys.argv[1], b'user.cryptfs.audit', sys.argv[2].encode())\n"
        "    print('accepted')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n")
FORMULA = '=HYPERLINK("http://x","y")'


def _hand(shared: Shared, user: str, **record: object) -> str:
    """``user`` hands the mount a command's record, as a forger would: directly."""
    res = run_as(user, "/usr/bin/python3", "-c", HAND, str(shared.mount.mnt), json.dumps(record))
    return res.stdout.decode().strip() or res.stderr.decode()


def test_a_record_claims_only_what_its_requester_may_do(shared: Shared) -> None:
    """An agent who may write the mount root hands `user-add allowed role=admin`:
    refused (EACCES) and recorded as a refused claim, never as a user-add.  A
    claim is judged by the requester's own slot (its role), never by the record's
    fields; one's own refused attempt may still be recorded, and a formula in
    its reason comes out of the CSV export as text."""
    logdir = bind_log(shared)
    assert shared.unlock("root").returncode == 0
    os.chmod(shared.mount.mnt, 0o777)  # the mount root is writable by everyone
    # An admin's real command, through the mount that holds the log, as before.
    passes = {"cfs-tech": _add(shared, "cfs-tech", "technician"),
              "cfs-admin": _add(shared, "cfs-admin", "admin")}
    for user in ("cfs-alice", "cfs-carol", "cfs-tech", "cfs-admin"):
        assert shared.unlock(user, passes.get(user)).returncode == 0
    cmd = {"command": "cryptfs user add", "backing": str(shared.backing)}
    forged = {"event": "user-add", "outcome": "allowed", "target": "cfs-bob", "role": "admin",
              **cmd}
    assert _hand(shared, "cfs-alice", **forged) == "EACCES"
    assert _hand(shared, "cfs-alice", **{**forged, "outcome": "error"}) == "EACCES"
    assert _hand(shared, "cfs-carol", **forged) == "EACCES"  # a supervisor manages nothing
    assert _hand(shared, "cfs-tech", **forged) == "EACCES"
    assert _hand(shared, "cfs-tech", event="rotation", outcome="allowed", kind="slots",
                 command="cryptfs rotate") == "accepted"
    assert _hand(shared, "cfs-admin", **{**forged, "role": "agent"}) == "accepted"
    assert _hand(shared, "cfs-admin", **{**forged, "role": "root"}) == "EACCES"  # no such role
    # One's own passphrase is everyone's to change; another's is a manager's.
    assert _hand(shared, "cfs-carol", event="passwd", outcome="allowed", target="cfs-carol",
                 command="cryptfs user passwd") == "accepted"
    assert _hand(shared, "cfs-carol", event="passwd", outcome="allowed", target="cfs-bob",
                 command="cryptfs user passwd") == "EACCES"
    # An agent's own refused attempt: accepted, whatever its reason says.
    assert _hand(shared, "cfs-alice", event="user-add", outcome="denied", reason=FORMULA,
                 **cmd) == "accepted"
    shared.mount.stop()

    alice, admin = (pwd.getpwnam(u).pw_uid for u in ("cfs-alice", "cfs-admin"))
    rs = records(logdir)
    adds = [(r["uid"], r["outcome"], r.get("target"), r.get("role")) for r in rs
            if r["event"] == "user-add"]
    assert adds == [(0, "allowed", "cfs-tech", "technician"), (0, "allowed", "cfs-admin", "admin"),
                    (admin, "allowed", "cfs-bob", "agent"), (alice, "denied", None, None)]
    assert not any(r["event"] == "user-add" and r["outcome"] != "denied" and r["uid"] == alice
                   for r in rs)
    refused = [(r["user"], r["claimed"], r["reason"]) for r in rs
               if r["event"] == "command-record"]
    assert refused == [
        ("cfs-alice", "user-add", "role agent may not run user-add (only admin)"),
        ("cfs-alice", "user-add", "role agent may not run user-add (only admin)"),
        ("cfs-carol", "user-add", "role supervisor may not run user-add (only admin)"),
        ("cfs-tech", "user-add", "role technician may not run user-add (only admin)"),
        ("cfs-admin", "user-add", "the record names no role the user could be given"),
        ("cfs-carol", "passwd", "role supervisor may not run passwd (only admin)"),
    ]
    assert all(r["outcome"] == "denied" for r in rs if r["event"] == "command-record")
    assert not any(r["event"] == "setxattr" for r in rs)  # (the refusal is the record)
    # The formula an agent put in a reason is text in the auditor's spreadsheet.
    out = run_cli("audit", "export", str(logdir), "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    mine = [row for row in rows if row["user"] == "cfs-alice" and row["event"] == "user-add"]
    assert [row["reason"] for row in mine] == ["'" + FORMULA]
    assert not any(cell.startswith(("=", "+", "@", "\t", "\r")) for row in rows
                   for cell in row.values())
    assert all(row["seq"].isdigit() and row["uid"].lstrip("-").isdigit()
               for row in rows)  # (numbers stay numbers)
    pub = (logdir / "audit.pub").read_text()
    assert verify(str(logdir), parse_verifier(pub)).ok
