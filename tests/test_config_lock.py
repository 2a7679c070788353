"""Config writers at the same time: each read-modify-write of cryptfs.conf runs
under config_lock on the config re-read inside it, so none loses another's change."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import CRYPTFS, run_cli
from multiuser import ensure_users

FAST = ("--kdf-memory", "8", "--kdf-iterations", "1")


@pytest.fixture
def vol(tmp_path: Path) -> tuple[Path, Path]:
    """A volume made by the CLI for root (admin), and root's passphrase file."""
    ensure_users()
    pf = tmp_path / "root.pass"
    pf.write_bytes(b"root secret\n")
    backing = tmp_path / "backing"
    run_cli("init", "--no-recovery-key", str(backing), "--passphrase-file", str(pf), *FAST)
    return backing, pf


def _pass(tmp_path: Path, name: str, secret: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(secret + b"\n")
    return p


def _users(backing: Path) -> list[str]:
    return [line.split()[1] for line in run_cli("user", "list", str(backing)).stdout.splitlines()[1:]]


def _rules(backing: Path, pf: Path) -> list[str]:
    out = run_cli("policy", "show", str(backing), "--passphrase-file", str(pf)).stdout
    return sorted(line.split(":")[0] for line in out.splitlines()[1:] if line.startswith("/"))


def test_concurrent_policy_and_user_changes_lose_nothing(vol: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    backing, pf = vol
    alice = _pass(tmp_path, "alice.pass", b"alice secret")
    for n in range(20):
        policy = subprocess.Popen(CRYPTFS + ["policy", "set", str(backing), f"/dir{n}", "--mode",
                                             "aes-256-gcm", "--passphrase-file", str(pf)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if n % 2 == 0:
            user = ["user", "add", str(backing), "cfs-alice", "--passphrase-file", str(pf),
                    "--new-passphrase-file", str(alice), *FAST]
        else:
            user = ["user", "remove", str(backing), "cfs-alice", "--passphrase-file", str(pf)]
        users = subprocess.run(CRYPTFS + user, capture_output=True, text=True, timeout=60)
        out, err = policy.communicate(timeout=60)
        assert policy.returncode == 0, err
        assert users.returncode == 0, users.stderr
        assert _rules(backing, pf) == sorted(f"/dir{i}" for i in range(n + 1)), f"round {n}"
        assert ("cfs-alice" in _users(backing)) == (n % 2 == 0), f"round {n}"
    fsck = run_cli("fsck", str(backing), "--passphrase-file", str(pf))
    assert fsck.returncode == 0


def _paused(args: list[str], fifo: Path) -> tuple[subprocess.Popen[str], object]:
    """Start a command that reads its new passphrase from ``fifo``; return once it
    has unlocked the volume and opened the fifo (it then waits for the passphrase)."""
    os.mkfifo(fifo)
    proc = subprocess.Popen(CRYPTFS + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    opened: list[object] = []
    t = threading.Thread(target=lambda: opened.append(open(fifo, "wb")))  # noqa: SIM115
    t.start()
    t.join(60)
    assert opened, "the command never read its new passphrase"
    return proc, opened[0]


def test_a_paused_writer_applies_its_change_to_the_config_as_it_is_then(
        vol: tuple[Path, Path], tmp_path: Path) -> None:
    """`user add` unlocks, then waits for the new passphrase; meanwhile a rule is
    set and another user added.  Its write keeps both (it used to put back the
    config it read at unlock, dropping them)."""
    backing, pf = vol
    bob = _pass(tmp_path, "bob.pass", b"bob secret")
    proc, w = _paused(["user", "add", str(backing), "cfs-alice", "--passphrase-file", str(pf),
                       "--new-passphrase-file", str(tmp_path / "fifo"), *FAST], tmp_path / "fifo")
    run_cli("policy", "set", str(backing), "/calls", "--mode", "aes-256-gcm",
            "--passphrase-file", str(pf))
    run_cli("user", "add", str(backing), "cfs-bob", "--passphrase-file", str(pf),
            "--new-passphrase-file", str(bob), *FAST)
    w.write(b"alice secret\n")  # type: ignore[attr-defined]
    w.close()  # type: ignore[attr-defined]
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "added cfs-alice" in out and "key slot 2" in out  # (after bob's slot 1)
    assert _users(backing) == ["root", "cfs-bob", "cfs-alice"]
    assert _rules(backing, pf) == ["/calls"]
    run_cli("fsck", str(backing), "--passphrase-file", str(tmp_path / "bob.pass"))


def test_a_writer_whose_authorising_slot_was_removed_meanwhile_stops(
        vol: tuple[Path, Path], tmp_path: Path) -> None:
    """root's `user add` waits for input; meanwhile an admin removes root.  The
    add must not go through on root's now-removed authority, nor put root back."""
    backing, pf = vol
    bob = _pass(tmp_path, "bob.pass", b"bob secret")
    run_cli("user", "add", str(backing), "cfs-bob", "--role", "admin", "--passphrase-file",
            str(pf), "--new-passphrase-file", str(bob), *FAST)
    proc, w = _paused(["user", "add", str(backing), "cfs-alice", "--passphrase-file", str(pf),
                       "--new-passphrase-file", str(tmp_path / "fifo"), *FAST], tmp_path / "fifo")
    run_cli("user", "remove", str(backing), "root", "--passphrase-file", str(bob))
    before = (backing / "cryptfs.conf").read_bytes()
    w.write(b"alice secret\n")  # type: ignore[attr-defined]
    w.close()  # type: ignore[attr-defined]
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    assert "changed by another command" in err and "Traceback" not in err
    assert (backing / "cryptfs.conf").read_bytes() == before
    assert [s["user"] for s in json.loads(before)["slots"]] == ["cfs-bob"]


def test_a_config_that_vanishes_for_an_instant_is_read_again(tmp_path: Path) -> None:
    """CI, two JuiceFS servers: a `policy set` on one read the config in the
    instant the other renamed a new one over it, and said the volume was none
    (its client's cached entry named the replaced file). A config missing
    beside a volume's tree is looked for again for a moment; one that stays
    missing is still no volume."""
    from conftest import make_volume
    from cryptfs.config import config_lock, load_config
    from cryptfs.errors import NotAVolume

    backing = make_volume(tmp_path / "backing")
    conf, away = backing / "cryptfs.conf", tmp_path / "conf.away"
    want = load_config(str(backing)).volume_id
    os.rename(conf, away)
    back = threading.Timer(0.08, os.rename, (away, conf))
    back.start()
    try:
        assert load_config(str(backing)).volume_id == want
    finally:
        back.join()
    # Nor does taking the config's lock give up on it (where the CI run failed).
    os.rename(conf, away)
    back = threading.Timer(0.08, os.rename, (away, conf))
    back.start()
    try:
        with config_lock(str(backing)):
            assert conf.exists()
    finally:
        back.join()
    os.rename(conf, away)
    with pytest.raises(NotAVolume, match="is not a cryptfs volume"):
        load_config(str(backing))
    (tmp_path / "plain").mkdir()  # (no tree: no waiting)
    with pytest.raises(NotAVolume, match="is not a cryptfs volume"):
        load_config(str(tmp_path / "plain"))
