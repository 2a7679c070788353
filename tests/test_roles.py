"""Roles on a shared mount: technicians and admins get ciphertext only, the
auditor gets nothing through the mount (docs/POLICY.md).  Real system users
in each role, a real key agent, real programs."""

from __future__ import annotations

import json
import os
from pathlib import Path

from test_audit_mount import records

from conftest import run_cli
from multiuser import ROOT_PASSPHRASE, Shared, bind_log, ensure_user, passfile, run_as

SECRET = b"surname,gender,phone\nWang,F,13812341234\n"
ROLES = {"cfs-tech": "technician", "cfs-admin": "admin", "cfs-audit": "auditor"}


def _add(shared: Shared, name: str, role: str) -> Path:
    ensure_user(name)
    pf = passfile(shared.root / "pass", name, f"{name} passphrase".encode())
    rootpf = shared.root / "root.pass"
    rootpf.write_bytes(ROOT_PASSPHRASE + b"\n")
    run_cli("user", "add", str(shared.backing), name, "--role", role, "--passphrase-file",
            str(rootpf), "--new-passphrase-file", str(pf), "--kdf-memory", "8",
            "--kdf-iterations", "1")
    return pf


def test_each_role_gets_what_the_matrix_says(shared: Shared) -> None:
    logdir = bind_log(shared)
    assert shared.unlock("root").returncode == 0
    shared.path("calls").mkdir()
    os.chmod(shared.path("calls"), 0o777)  # (mkdir's mode goes through the umask)
    shared.path("calls", "a.csv").write_bytes(SECRET)
    os.chmod(shared.path("calls", "a.csv"), 0o666)
    for name, role in ROLES.items():
        pf = _add(shared, name, role)
        res = shared.unlock(name, pf)
        assert res.returncode == 0, res.stderr
    assert shared.unlock("cfs-carol").returncode == 0
    target = str(shared.path("calls", "a.csv"))
    backing_bytes = {p.read_bytes() for p in (shared.backing / "tree").rglob("*") if p.is_file()}

    # A supervisor reads the plaintext.
    assert run_as("cfs-carol", "cat", target).stdout == SECRET
    # A technician and an admin list the volume and read the encrypted bytes
    # (backups, checksums), never the plaintext, and write nothing.
    for name in ("cfs-tech", "cfs-admin"):
        assert b"a.csv" in run_as(name, "ls", str(shared.path("calls"))).stdout
        raw = run_as(name, "cat", target)
        assert raw.returncode == 0 and raw.stdout in backing_bytes and b"Wang" not in raw.stdout
        res = run_as(name, "sh", "-c", f"echo x >> {target}")
        assert res.returncode != 0 and b"Permission denied" in res.stderr
        res = run_as(name, "touch", str(shared.path("calls", f"{name}.txt")))
        assert res.returncode != 0 and b"Permission denied" in res.stderr
        res = run_as(name, "truncate", "-s", "0", target)
        assert res.returncode != 0 and b"Permission denied" in res.stderr
        res = run_as(name, "getfattr", "-d", target)
        assert res.returncode != 0 or b"user." not in res.stdout
    # The auditor gets nothing at all through the mount.
    res = run_as("cfs-audit", "ls", str(shared.path("calls")))
    assert res.returncode != 0 and b"Permission denied" in res.stderr
    res = run_as("cfs-audit", "cat", target)
    assert res.returncode != 0 and b"Permission denied" in res.stderr
    # Nothing was changed by any of them.
    assert run_as("cfs-carol", "cat", target).stdout == SECRET
    assert not os.path.lexists(shared.path("calls", "cfs-tech.txt"))
    # Every decision is in the access log.
    shared.mount.stop()
    recs = records(logdir)
    tech = {(r["event"], r["outcome"], r.get("decision")) for r in recs
            if r["user"] == "cfs-tech" and r["event"] in ("open", "create")}
    assert tech == {("open", "allowed", "role technician: served the ciphertext"),
                    ("open", "denied", "role technician: writes no customer data"),
                    ("create", "denied", "role technician: writes no customer data")}
    audit = {(r["event"], r["outcome"]) for r in recs if r["user"] == "cfs-audit"}
    assert audit and all(outcome == "denied" for _, outcome in audit)


def test_only_an_admin_manages_the_volume(tmp_path: Path) -> None:
    """Adding and removing users, the policy, binding the log: admins only;
    rotating keys: admins and technicians.  Refusals exit 9 and are recorded."""
    fast = ("--kdf-memory", "8", "--kdf-iterations", "1")
    backing, logdir = tmp_path / "b", tmp_path / "log"
    passes = {}
    for who in ("root", "cfs-alice", "cfs-tech"):
        passes[who] = tmp_path / f"{who}.pass"
        passes[who].write_text(f"{who} secret\n")
    run_cli("init", str(backing), "--passphrase-file", str(passes["root"]), "--no-recovery-key",
            *fast)
    run_cli("audit", "init", str(logdir))
    run_cli("audit", "attach", str(backing), str(logdir), "--passphrase-file",
            str(passes["root"]))
    for who, role in (("cfs-alice", "agent"), ("cfs-tech", "technician")):
        ensure_user(who)
        run_cli("user", "add", str(backing), who, "--role", role, "--passphrase-file",
                str(passes["root"]), "--new-passphrase-file", str(passes[who]), *fast)
    for who in ("cfs-alice", "cfs-tech"):
        pf = ("--passphrase-file", str(passes[who]))
        for args in (("user", "add", str(backing), "nobody", "--new-passphrase-file",
                      str(passes[who]), *fast),
                     ("user", "remove", str(backing), "root"),
                     ("user", "passwd", str(backing), "root", "--new-passphrase-file",
                      str(passes[who]), *fast),
                     ("policy", "set", str(backing), "/x", "--mode", "aes-256-gcm"),
                     ("audit", "detach", str(backing))):
            res = run_cli(*args, *pf, check=False)
            assert res.returncode == 9 and "may not" in res.stderr, (who, args, res.stderr)
    res = run_cli("rotate", str(backing), "--slots", "--passphrase-file",
                  str(passes["cfs-alice"]), check=False)
    assert res.returncode == 9 and "the role agent may not rotate keys" in res.stderr
    run_cli("rotate", str(backing), "--slots", "--passphrase-file", str(passes["cfs-tech"]))
    # Everyone may still change their own passphrase.
    run_cli("passwd", str(backing), "--passphrase-file", str(passes["cfs-alice"]),
            "--new-passphrase-file", str(passes["cfs-alice"]))
    out = run_cli("audit", "export", str(logdir), "--format", "jsonl").stdout
    denied = [json.loads(x) for x in out.splitlines() if '"denied"' in x]
    assert [(r["event"], r["reason"]) for r in denied[:5]] == [
        ("user-add", "role agent"), ("user-remove", "role agent"), ("passwd", "role agent"),
        ("policy-set", "role agent"), ("audit-detach", "role agent")]
    assert sum(1 for r in denied if r["event"] == "rotation") == 1
