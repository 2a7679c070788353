"""cryptfs user add|remove|list|passwd and init --user: key slots of real system users."""

from __future__ import annotations

import json
import pwd
from pathlib import Path

import pytest

from conftest import run_cli
from multiuser import ensure_users

FAST = ("--kdf-memory", "8", "--kdf-iterations", "1")


@pytest.fixture
def vol(tmp_path: Path) -> tuple[Path, Path]:
    """A volume created by the CLI for root (role admin), and root's passphrase file."""
    ensure_users()
    pf = tmp_path / "root.pass"
    pf.write_bytes(b"root secret\n")
    backing = tmp_path / "backing"
    out = run_cli("init", "--no-recovery-key", str(backing), "--passphrase-file", str(pf), *FAST).stdout
    assert "key slot 0 for root, role admin" in out
    return backing, pf


def _pass(tmp_path: Path, name: str, secret: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(secret + b"\n")
    return p


def _slots(backing: Path) -> list[dict[str, object]]:
    return json.loads((backing / "cryptfs.conf").read_text())["slots"]  # type: ignore[no-any-return]


def test_add_list_remove(vol: tuple[Path, Path], tmp_path: Path) -> None:
    backing, pf = vol
    new = _pass(tmp_path, "alice.pass", b"alice secret")
    out = run_cli("user", "add", str(backing), "cfs-alice", "--role", "supervisor",
                  "--passphrase-file", str(pf), "--new-passphrase-file", str(new), *FAST).stdout
    uid = pwd.getpwnam("cfs-alice").pw_uid
    assert out.strip() == f"added cfs-alice (uid {uid}, role supervisor) in key slot 1"
    slot = _slots(backing)[1]
    assert (slot["user"], slot["uid"], slot["role"]) == ("cfs-alice", uid, "supervisor")
    listing = run_cli("user", "list", str(backing)).stdout.splitlines()
    assert listing[0].split() == ["SLOT", "USER", "UID", "ROLE", "ADDED", "LAST", "UNLOCK"]
    assert listing[1].split()[:4] == ["0", "root", "0", "admin"]
    assert listing[2].split()[:4] == ["1", "cfs-alice", str(uid), "supervisor"]
    assert listing[2].split()[-1] == "never"
    assert "wrapped" not in "\n".join(listing) and slot["wrapped"] not in "\n".join(listing)
    # The new user's passphrase opens the volume (fsck needs the key).
    run_cli("fsck", str(backing), "--passphrase-file", str(new))
    # A supervisor may not manage users (exit 9); an admin may.
    res = run_cli("user", "remove", str(backing), "root", "--passphrase-file", str(new),
                  check=False)
    assert res.returncode == 9 and "the role supervisor may not remove users" in res.stderr
    assert [s["user"] for s in _slots(backing)] == ["root", "cfs-alice"]
    admin = _pass(tmp_path, "bob.pass", b"bob secret")
    run_cli("user", "add", str(backing), "cfs-bob", "--role", "admin", "--passphrase-file",
            str(pf), "--new-passphrase-file", str(admin), *FAST)
    # Bob's passphrase can authorise removing root; then root's no longer works.
    out = run_cli("user", "remove", str(backing), "root", "--passphrase-file", str(admin)).stdout
    assert out.strip() == "removed root (key slot 0)"
    res = run_cli("fsck", str(backing), "--passphrase-file", str(pf), check=False)
    assert res.returncode == 3
    assert [s["user"] for s in _slots(backing)] == ["cfs-alice", "cfs-bob"]


def test_adding_needs_a_passphrase_that_opens_the_volume(vol: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    backing, _ = vol
    before = (backing / "cryptfs.conf").read_bytes()
    wrong = _pass(tmp_path, "wrong", b"I am root, let me in")
    new = _pass(tmp_path, "new", b"whatever")
    res = run_cli("user", "add", str(backing), "cfs-bob", "--passphrase-file", str(wrong),
                  "--new-passphrase-file", str(new), *FAST, check=False)
    assert res.returncode == 3 and "wrong passphrase" in res.stderr
    assert (backing / "cryptfs.conf").read_bytes() == before


@pytest.mark.parametrize("args,code,text", [
    (["cfs-no-such-user"], 2, "is not a user of this system"),
    (["root"], 2, "already has a key slot"),
    (["cfs-bob", "--role", "janitor"], 2, "Invalid value for '--role'"),
])
def test_bad_additions_are_refused(vol: tuple[Path, Path], tmp_path: Path, args: list[str],
                                   code: int, text: str) -> None:
    backing, pf = vol
    before = (backing / "cryptfs.conf").read_bytes()
    new = _pass(tmp_path, "new", b"whatever")
    res = run_cli("user", "add", str(backing), *args, "--passphrase-file", str(pf),
                  "--new-passphrase-file", str(new), *FAST, check=False)
    assert res.returncode == code and text in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert (backing / "cryptfs.conf").read_bytes() == before


def test_the_last_slot_cannot_be_removed(vol: tuple[Path, Path]) -> None:
    backing, pf = vol
    res = run_cli("user", "remove", str(backing), "root", "--passphrase-file", str(pf),
                  check=False)
    assert res.returncode == 2 and "only key slot" in res.stderr
    res = run_cli("user", "remove", str(backing), "cfs-bob", "--passphrase-file", str(pf),
                  check=False)
    assert res.returncode == 2 and "has no key slot" in res.stderr


def test_passwd_own_and_reset_by_another_user(vol: tuple[Path, Path], tmp_path: Path) -> None:
    backing, pf = vol
    alice = _pass(tmp_path, "alice", b"alice secret")
    run_cli("user", "add", str(backing), "cfs-alice", "--passphrase-file", str(pf),
            "--new-passphrase-file", str(alice), *FAST)
    # root resets alice's forgotten passphrase with root's own.
    fresh = _pass(tmp_path, "alice2", b"alice new secret")
    out = run_cli("user", "passwd", str(backing), "cfs-alice", "--passphrase-file", str(pf),
                  "--new-passphrase-file", str(fresh), *FAST).stdout
    assert out.strip() == "passphrase of cfs-alice (key slot 1) changed"
    assert run_cli("fsck", str(backing), "--passphrase-file", str(alice), check=False).returncode == 3
    run_cli("fsck", str(backing), "--passphrase-file", str(fresh))
    run_cli("fsck", str(backing), "--passphrase-file", str(pf))  # root's slot untouched
    # Without NAME, it is the caller's own slot (root here).
    root2 = _pass(tmp_path, "root2", b"root new secret")
    out = run_cli("user", "passwd", str(backing), "--passphrase-file", str(pf),
                  "--new-passphrase-file", str(root2), *FAST).stdout
    assert "passphrase of root (key slot 0) changed" in out
    run_cli("fsck", str(backing), "--passphrase-file", str(root2))
    slot = _slots(backing)[1]
    assert (slot["user"], slot["role"]) == ("cfs-alice", "agent")


@pytest.mark.parametrize("edit", ["uid", "role", "remove", "duplicate"])
def test_slots_edited_by_hand_are_detected(vol: tuple[Path, Path], tmp_path: Path,
                                            edit: str) -> None:
    backing, pf = vol
    alice = _pass(tmp_path, "alice", b"alice secret")
    run_cli("user", "add", str(backing), "cfs-alice", "--passphrase-file", str(pf),
            "--new-passphrase-file", str(alice), *FAST)
    conf = json.loads((backing / "cryptfs.conf").read_text())
    if edit == "uid":
        conf["slots"][1]["uid"] = pwd.getpwnam("cfs-bob").pw_uid
    elif edit == "role":
        conf["slots"][1]["role"] = "supervisor"
    elif edit == "remove":
        del conf["slots"][0]
    else:
        conf["slots"].append(dict(conf["slots"][1], id=7))
    (backing / "cryptfs.conf").write_text(json.dumps(conf))
    res = run_cli("fsck", str(backing), "--passphrase-file", str(alice), check=False)
    assert res.returncode == 4 and "failed authentication" in res.stderr


def test_init_for_a_named_user(tmp_path: Path) -> None:
    ensure_users()
    pf = _pass(tmp_path, "p", b"carol secret")
    out = run_cli("init", "--no-recovery-key", str(tmp_path / "b"), "--user", "cfs-carol",
                  "--role", "supervisor",
                  "--passphrase-file", str(pf), *FAST).stdout
    assert "key slot 0 for cfs-carol, role supervisor" in out
    slot = _slots(tmp_path / "b")[0]
    assert (slot["user"], slot["uid"], slot["role"]) == (
        "cfs-carol", pwd.getpwnam("cfs-carol").pw_uid, "supervisor")
    res = run_cli("init", "--no-recovery-key", str(tmp_path / "c"), "--user", "nobody-here-xyz",
                  "--passphrase-file", str(pf), *FAST, check=False)
    assert res.returncode == 2 and "not a user of this system" in res.stderr
    assert not (tmp_path / "c").exists()
