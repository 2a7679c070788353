"""Bad input and tampered volume configs at the command line.

Whatever goes wrong, the user gets one ``cryptfs: error: ...`` line (maybe
followed by ``cryptfs: hint: ...`` lines), the exit code that
``cryptfs.errors.EXIT_CODES`` documents for that kind of failure, and never a
Python traceback.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    CRYPTFS,
    TEST_KDF,
    Mount,
    _fuse_listed,
    fill,
    make_volume,
    run_cli,
    tmpfs,
    unlock,
)
from cryptfs.config import save_config
from cryptfs.errors import EXIT_CODES
from cryptfs.secret import Secret
from multiuser import AgentProcess

SECOND_PASSPHRASE = b"a second, different passphrase"


def assert_one_error(res: subprocess.CompletedProcess[str], code: int,
                     fragment: str | tuple[str, ...]) -> str:
    """Exit ``code``; one error line containing ``fragment`` (or each of them), hints
    only after it, no traceback."""
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines, f"no message on stderr (exit {res.returncode})"
    assert lines[0].startswith("cryptfs: error: "), res.stderr
    for frag in (fragment,) if isinstance(fragment, str) else fragment:
        assert frag in lines[0], res.stderr
    assert all(ln.startswith("cryptfs: hint: ") for ln in lines[1:]), res.stderr
    assert res.returncode == code, (
        f"exit {res.returncode} ({EXIT_CODES.get(res.returncode)}), expected {code} "
        f"({EXIT_CODES.get(code)}) for: {lines[0]}")
    return lines[0]


def assert_usage_error(res: subprocess.CompletedProcess[str], fragment: str) -> None:
    """click's own usage errors: exit 2, one 'Error:' line naming the problem."""
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 2, (res.returncode, res.stderr)
    errors = [ln for ln in res.stderr.splitlines() if "Error" in ln]
    assert len(errors) == 1 and fragment in errors[0], res.stderr


# --- 3. tampered volume configs -------------------------------------------------------------------
@dataclass(frozen=True)
class ConfEdit:
    name: str
    edit: Callable[[Path], None]  # edits the backing directory
    unlock_code: int  # mount and fsck
    unlock_msg: str | tuple[str, ...]
    info_code: int  # info, which does not authenticate (MAC-only edits pass there)
    info_msg: str | tuple[str, ...]  # on stdout if info_code == 0, else on stderr


def json_edit(fn: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def edit(backing: Path) -> None:
        p = backing / "cryptfs.conf"
        d = json.loads(p.read_text())
        fn(d)
        p.write_text(json.dumps(d, indent=1))

    return edit


def raw_edit(fn: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def edit(backing: Path) -> None:
        p = backing / "cryptfs.conf"
        p.write_bytes(fn(p.read_bytes()))

    return edit


def slot_field(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        d["slots"][0][key] = value
    return edit


def slot_kdf(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def fn(d: dict[str, Any]) -> None:
        d["slots"][0]["kdf"][field] = value

    return fn


def setitem(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.__setitem__(key, value)


def duplicate_slot(d: dict[str, Any]) -> None:
    copy = dict(d["slots"][0])
    copy["id"] = max(slot["id"] for slot in d["slots"]) + 1
    d["slots"].append(copy)


def duplicate_slot_id(d: dict[str, Any]) -> None:
    d["slots"].append(dict(d["slots"][0]))


def remove_second_slot(d: dict[str, Any]) -> None:
    assert [s["label"] for s in d["slots"]] == ["owner", "second"]
    del d["slots"][1]


def other_mac(d: dict[str, Any]) -> None:
    mac = bytearray(base64.b64decode(d["mac"]))
    mac[0] ^= 1
    d["mac"] = base64.b64encode(bytes(mac)).decode()


AUTH = "volume config failed authentication: it was edited or damaged"
NO_SLOT = "wrong passphrase: it opens no key slot of this volume"
MALFORMED = "volume config is malformed"
BAD_KDF = (MALFORMED, "KDF")

CONF_EDITS = [
    ConfEdit("default_mode", json_edit(setitem("default_mode", "xchacha20-poly1305")),
             4, AUTH, 0, "default mode:  xchacha20-poly1305"),
    ConfEdit("default_mode_unknown", json_edit(setitem("default_mode", "rot13")),
             4, MALFORMED, 4, MALFORMED),
    ConfEdit("slot_kdf_ops", json_edit(slot_kdf("ops", 2)), 3, NO_SLOT, 0,
             "argon2id 2 passes, 8 MiB"),
    ConfEdit("slot_kdf_mem", json_edit(slot_kdf("mem_kib", 16 * 1024)), 3, NO_SLOT, 0,
             "argon2id 1 passes, 16 MiB"),
    ConfEdit("slot_kdf_mem_below_minimum", json_edit(slot_kdf("mem_kib", 1024)),
             4, BAD_KDF, 4, BAD_KDF),
    ConfEdit("slot_kdf_ops_zero", json_edit(slot_kdf("ops", 0)), 4, BAD_KDF, 4, BAD_KDF),
    # an edited config must not make unlocking a memory or CPU bomb (or a traceback)
    ConfEdit("slot_kdf_ops_absurd", json_edit(slot_kdf("ops", 2**40)), 4, BAD_KDF, 4, BAD_KDF),
    ConfEdit("slot_kdf_mem_absurd", json_edit(slot_kdf("mem_kib", 2**40)), 4, BAD_KDF, 4,
             BAD_KDF),
    ConfEdit("slot_kdf_mem_64gib", json_edit(slot_kdf("mem_kib", 64 * 1024 * 1024)), 4,
             BAD_KDF, 4, BAD_KDF),
    ConfEdit("slot_kdf_not_a_number", json_edit(slot_kdf("ops", "3")), 4, BAD_KDF, 4, BAD_KDF),
    ConfEdit("slot_salt_wrong_length",
             json_edit(slot_kdf("salt", base64.b64encode(b"8 bytes!").decode())),
             4, (MALFORMED, "salt"), 4, (MALFORMED, "salt")),
    ConfEdit("slot_salt_not_base64", json_edit(slot_kdf("salt", "not base64!")),
             4, MALFORMED, 4, MALFORMED),
    # a slot's user fields are checked as they are read (info showed user=None, role=god)
    ConfEdit("slot_user_null", json_edit(slot_field("user", None)), 4,
             (MALFORMED, "slot 0: user is not a name"), 4, (MALFORMED, "user is not a name")),
    ConfEdit("slot_uid_huge", json_edit(slot_field("uid", 10**30)), 4,
             (MALFORMED, "slot 0: uid is not a user id"), 4, "uid is not a user id"),
    ConfEdit("slot_uid_text", json_edit(slot_field("uid", "zero")), 4, MALFORMED, 4,
             "uid is not a user id"),
    ConfEdit("slot_role_unknown", json_edit(slot_field("role", "god")), 4,
             (MALFORMED, "slot 0: role is none of agent, supervisor"), 4, "role is none of"),
    ConfEdit("slot_copy_added", json_edit(duplicate_slot), 4, AUTH, 0, "key slots:     3"),
    ConfEdit("slot_removed", json_edit(remove_second_slot), 4, AUTH, 0, "key slots:     1"),
    ConfEdit("slot_ids_duplicate", json_edit(duplicate_slot_id), 4, MALFORMED, 4, MALFORMED),
    ConfEdit("slots_empty", json_edit(setitem("slots", [])), 4, MALFORMED, 4, MALFORMED),
    ConfEdit("feature_removed",
             json_edit(lambda d: d["features"].remove("xattrs")),
             4, "volume config lacks required features: xattrs", 4, "lacks required features"),
    ConfEdit("feature_unknown", json_edit(lambda d: d["features"].append("compression-v9")),
             4, "volume uses unknown features: compression-v9", 4, "unknown features"),
    ConfEdit("version_3", json_edit(setitem("cryptfs", 3)),
             4, "volume format version 3 is not supported", 4, "version 3 is not supported"),
    ConfEdit("version_1", json_edit(setitem("cryptfs", 1)),
             4, "says it is version 1 but is version 2", 4, "says it is version 1"),
    ConfEdit("version_string", json_edit(setitem("cryptfs", "2")),
             4, "volume config's format version \"2\" is not a whole number: it was edited or "
                "damaged", 4, "is not a whole number"),
    ConfEdit("version_bool", json_edit(setitem("cryptfs", True)),
             4, "volume config's format version true is not a whole number", 4,
             "is not a whole number"),
    ConfEdit("key_id", json_edit(setitem("key_id", 2)), 4, AUTH, 0, "key id:        2"),
    ConfEdit("volume_id", json_edit(setitem("volume_id", "00" * 16)), 3, NO_SLOT, 0,
             "volume id:     " + "00" * 16),
    ConfEdit("created", json_edit(setitem("created", "1999-01-01T00:00:00Z")), 4, AUTH, 0,
             "created:       1999-01-01T00:00:00Z"),
    ConfEdit("mac_changed", json_edit(other_mac), 4, AUTH, 0, "key slots:     2"),
    ConfEdit("mac_missing", json_edit(lambda d: d.pop("mac")), 4, MALFORMED, 4, MALFORMED),
    ConfEdit("not_an_object", raw_edit(lambda b: b"[1, 2, 3]\n"),
             4, "volume config is not a cryptfs config", 4, "not a cryptfs config"),
    ConfEdit("invalid_json", raw_edit(lambda b: b[: len(b) // 2]),
             4, "volume config is not valid JSON", 4, "not valid JSON"),
    ConfEdit("binary_garbage", raw_edit(lambda b: bytes(range(256)) * 4),
             4, "volume config is not valid JSON", 4, "not valid JSON"),
    ConfEdit("empty", raw_edit(lambda b: b""), 4, "volume config is not valid JSON", 4,
             "not valid JSON"),
    ConfEdit("missing", lambda backing: (backing / "cryptfs.conf").unlink(),
             4, "is not a cryptfs volume (no cryptfs.conf)", 4, "no cryptfs.conf"),
    ConfEdit("tree_missing", lambda backing: shutil.rmtree(backing / "tree"),
             4, "the encrypted tree (tree/) is missing", 0, "key slots:     2"),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A volume with two key slots ("owner" and "second")."""
    backing = make_volume(tmp_path_factory.mktemp("pristine") / "backing")
    vol = unlock(backing)
    try:
        cfg = vol.config
        cfg.slots.append(cfg.make_slot(vol.keys, Secret(SECOND_PASSPHRASE), "second",
                                       kdf=TEST_KDF))
        cfg.seal(vol.keys)
        save_config(str(backing), cfg)
    finally:
        vol.close()
    return backing


@pytest.mark.parametrize("case", CONF_EDITS, ids=[c.name for c in CONF_EDITS])
def test_tampered_config(case: ConfEdit, pristine: Path, tmp_path: Path, passfile: Path) -> None:
    backing = tmp_path / "backing"
    shutil.copytree(pristine, backing)
    assert run_cli("fsck", str(backing), "--passphrase-file", str(passfile)).returncode == 0
    case.edit(backing)
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    results = {
        "mount": run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile),
                         "--log-file", str(tmp_path / "log"), check=False),
        "fsck": run_cli("fsck", str(backing), "--passphrase-file", str(passfile), check=False),
    }
    mounted = os.path.ismount(mnt)
    if mounted:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    assert not mounted, "a tampered volume was mounted"
    for cmd, res in results.items():
        assert res.stdout == "", (cmd, res.stdout)
        assert_one_error(res, case.unlock_code, case.unlock_msg)

    info = run_cli("info", str(backing), check=False)
    if case.info_code == 0:
        assert info.returncode == 0, info.stderr
        for frag in (case.info_msg,) if isinstance(case.info_msg, str) else case.info_msg:
            assert frag in info.stdout, info.stdout
        assert info.stderr == ""
    else:
        assert info.stdout == ""
        assert_one_error(info, case.info_code, case.info_msg)


def test_untouched_config_unlocks_with_both_slots(pristine: Path, tmp_path: Path,
                                                  passfile: Path) -> None:
    """Control for the cases above: the pristine copy works, with either passphrase."""
    backing = tmp_path / "backing"
    shutil.copytree(pristine, backing)
    second = tmp_path / "second"
    second.write_bytes(SECOND_PASSPHRASE + b"\n")
    for pf in (passfile, second):
        res = run_cli("fsck", str(backing), "--passphrase-file", str(pf), check=False)
        assert res.returncode == 0 and res.stdout.endswith(": clean\n"), res.stdout + res.stderr
    info = run_cli("info", str(backing))
    assert "key slots:     2" in info.stdout and "  slot 1: second " in info.stdout


# --- 4. bad input ----------------------------------------------------------------------------------------
def test_wrong_passphrase_exit_3(backing: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"Correct horse battery staple\n")
    new = tmp_path / "new"
    new.write_bytes(b"new passphrase\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    conf = (backing / "cryptfs.conf").read_bytes()
    for args in (["mount", str(backing), str(mnt)], ["fsck", str(backing)],
                 ["passwd", str(backing), "--new-passphrase-file", str(new)]):
        res = run_cli(*args, "--passphrase-file", str(wrong), check=False)
        assert_one_error(res, 3, "wrong passphrase: it opens no key slot of this volume")
        assert res.stdout == ""
    assert not os.path.ismount(mnt)
    assert (backing / "cryptfs.conf").read_bytes() == conf


def test_not_a_volume_exit_4(tmp_path: Path, passfile: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "other"
    other.mkdir()
    (other / "photo.jpg").write_bytes(b"\xff\xd8\xff" + os.urandom(100))
    vol = make_volume(tmp_path / "vol")
    cases = [
        (empty, f"{empty} is not a cryptfs volume (no cryptfs.conf)"),
        (other, f"{other} is not a cryptfs volume (no cryptfs.conf)"),
        (tmp_path / "nonexistent", f"{tmp_path / 'nonexistent'}: no such directory"),
        (vol / "tree", f"{vol / 'tree'} is not a cryptfs volume (no cryptfs.conf)"),
    ]
    for path, msg in cases:
        for args in (["mount", str(path), str(mnt), "--passphrase-file", str(passfile)],
                     ["fsck", str(path), "--passphrase-file", str(passfile)],
                     ["info", str(path)]):
            res = run_cli(*args, check=False)
            assert_one_error(res, 4, msg)
            assert res.stdout == ""
    assert not os.path.ismount(mnt)
    assert os.listdir(other) == ["photo.jpg"] and not (tmp_path / "nonexistent").exists()


def test_a_second_mount_of_one_backing_needs_shared_storage(mount: Mount, tmp_path: Path,
                                                           passfile: Path) -> None:
    """Two mounts of one volume each cache what the other changes (docs/MULTISERVER.md
    shows the stale reads): a second one is refused, by whatever path it names the
    backing, unless it caches nothing (--shared-storage)."""
    (mount.mnt / "f").write_bytes(b"first")
    second = tmp_path / "second"
    second.mkdir()
    (tmp_path / "link").symlink_to(mount.backing)
    for name in (mount.backing, tmp_path / "link"):
        res = run_cli("mount", str(name), str(second), "--passphrase-file", str(passfile),
                      check=False)
        assert_one_error(res, 2, f"{name} is already mounted on {mount.mnt.resolve()}")
        assert "unless both run with --shared-storage" in res.stderr
        assert not os.path.ismount(second) and not _fuse_listed(second)
    run_cli("mount", str(mount.backing), str(second), "--passphrase-file", str(passfile),
            "--shared-storage")
    try:
        assert (second / "f").read_bytes() == b"first"
    finally:
        run_cli("unmount", str(second))


@pytest.mark.parametrize("args", [
    ["info", ""], ["fsck", ""], ["mount", "{backing}", ""], ["mount", "", "{mnt}"],
    ["mount", "{backing}", "{mnt}", "--pid-file", ""], ["init", "{tmp}/v", "--recovery-key", ""],
    ["recover", "{backing}", "--recovery-key", "{tmp}/k", "--out", ""], ["audit", "init", ""],
    ["audit", "forward", "{tmp}/log", "--to", "127.0.0.1:9", "--state", ""],
    ["unlock", "{backing}", "--agent-socket", ""]])
def test_an_empty_path_is_refused(args: list[str], backing: Path, tmp_path: Path,
                                  passfile: Path) -> None:
    """"" was the current directory (mount over it, fsck it), a default (the socket,
    the state file, no recovery key at all: a volume made without one), or a message
    with no path in it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = sorted(os.listdir(tmp_path))
    given = [a.format(backing=backing, mnt=mnt, tmp=tmp_path) for a in args]
    res = run_cli(*given, "--passphrase-file", str(passfile), check=False) \
        if given[0] in ("fsck", "mount", "init") else run_cli(*given, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "an empty path names nothing" in res.stderr and res.stdout == ""
    assert sorted(os.listdir(tmp_path)) == before and not os.path.ismount(mnt)


def test_a_config_change_on_a_full_disk_keeps_the_config(tmp_path: Path, passfile: Path) -> None:
    """A short write of the new config (a disk with one page left) was not checked:
    the config cut short was renamed over the good one, and every key slot was gone."""
    from cryptfs.users import add_user

    newpass = tmp_path / "new"
    newpass.write_text("uucp's passphrase\n")
    with tmpfs(tmp_path / "small", "size=1m") as small:
        backing = make_volume(small / "backing")
        vol = unlock(backing)
        try:
            for name in ("daemon", "bin", "sys", "sync", "games", "man", "lp", "mail", "news"):
                add_user(vol, name, "agent", Secret(b"x"), TEST_KDF)
        finally:
            vol.close()
        conf = (backing / "cryptfs.conf").read_bytes()
        assert len(conf) > 4096 + 1024  # (the new config needs two pages; one is left)
        filler = fill(small)
        os.truncate(filler, filler.stat().st_size - 4096)
        names = sorted(os.listdir(backing))
        res = run_cli("user", "add", str(backing), "uucp", "--passphrase-file", str(passfile),
                      "--new-passphrase-file", str(newpass), "--kdf-memory", "8",
                      "--kdf-iterations", "1", check=False)
        assert res.returncode == 7 and "No space left on device" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        assert (backing / "cryptfs.conf").read_bytes() == conf
        assert sorted(os.listdir(backing)) == names  # (no temporary file left)
        filler.unlink()
        assert "slot 9: news (" in run_cli("info", str(backing)).stdout


def test_init_on_a_full_disk_leaves_no_half_volume(tmp_path: Path, passfile: Path) -> None:
    """It left tree/.diriv behind, and the same init then failed with 'not empty'."""
    with tmpfs(tmp_path / "small", "size=64k") as small:
        filler = fill(small)
        (small / "empty").mkdir()
        args = ["--passphrase-file", str(passfile), "--no-recovery-key", "--kdf-memory", "8",
                "--kdf-iterations", "1"]
        for target in (small / "new", small / "empty"):
            res = run_cli("init", str(target), *args, check=False)
            assert res.returncode == 7 and "No space left on device" in res.stderr, res.stderr
            assert "Traceback" not in res.stderr
        assert not (small / "new").exists() and os.listdir(small / "empty") == []
        filler.unlink()
        for target in (small / "new", small / "empty"):
            assert "created cryptfs volume" in run_cli("init", str(target), *args).stdout
            assert "key slots:     1" in run_cli("info", str(target)).stdout


@pytest.mark.parametrize("args, message", [
    (["user", "passwd", "{backing}", ""], "'' is not a user name"),  # (changed root's own)
    (["init", "{tmp}/v", "--user", "", "--no-recovery-key"], "'' is not a user name"),
    (["user", "add", "{backing}", "a\nb"], "is not a user name"),
    (["rotate", "{backing}", "--slots", "--recovery-key", "{tmp}/k"],
     "--recovery-key serves a rotation that walks the files"),
    (["unlock", "{backing}", "--check"], "--check asks for no passphrase"),
    (["policy", "set", "{backing}", "/d", "--mode", "hybrid", "--mask-format", "tsv"],
     "--mask-format goes with --mask"),
    (["policy", "set", "{backing}", "/d/" + "a" * 256, "--mode", "hybrid"],  # (can never exist)
     "a name in it is longer than 255 bytes"),
    (["policy", "set", "{backing}", "/d", "--mode", "hybrid", "--no-masks", "--mask-format",
      "jsonl"],
     "--mask-format goes with --mask"),
])
def test_options_that_did_nothing_or_the_wrong_thing_are_refused(
        args: list[str], message: str, backing: Path, tmp_path: Path, passfile: Path) -> None:
    conf = (backing / "cryptfs.conf").read_bytes()
    given = [a.format(backing=backing, tmp=tmp_path) for a in args]
    res = run_cli(*given, "--passphrase-file", str(passfile), check=False)
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert (backing / "cryptfs.conf").read_bytes() == conf and not (tmp_path / "v").exists()


def test_the_agents_backoff_starts_below_its_cap(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "cryptfs.keyagent.daemon", "--socket",
                          str(tmp_path / "agent.sock"), "--backoff", "10", "--backoff-max", "1"],
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert res.returncode == 2 and "--backoff 10 is above --backoff-max 1" in res.stderr
    assert not (tmp_path / "agent.sock").exists()


@pytest.mark.parametrize("opts, message", [
    ("rw,ro", "-o ro and -o rw contradict each other"),
    ("noexec,exec", "-o exec and -o noexec contradict each other"),
    ("bogus", "unknown mount option 'bogus'"),
])
def test_mount_options_that_contradict_or_are_unknown(opts: str, message: str, backing: Path,
                                                      tmp_path: Path, passfile: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile), "-o", opts,
                  check=False)
    assert_one_error(res, 2, message)
    assert not os.path.ismount(mnt)


def test_a_mountpoint_in_proc_or_sys_is_refused(backing: Path, passfile: Path) -> None:
    """/proc/self named the command's own /proc directory: mounted, and gone as it exited."""
    for where, shown in (("/proc/self", "/proc/"), ("/sys/kernel", "/sys/kernel")):
        res = run_cli("mount", str(backing), where, "--passphrase-file", str(passfile),
                      check=False)
        assert_one_error(res, 5, f"mountpoint {shown}")
        assert "which the kernel makes up" in res.stderr
    assert not any(" fuse.cryptfs " in line and (" /proc/" in line or " /sys/" in line)
                   for line in Path("/proc/mounts").read_text().splitlines())


def test_mountpoint_missing_exit_5(backing: Path, tmp_path: Path, passfile: Path) -> None:
    mnt = tmp_path / "no" / "such" / "dir"
    res = run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile),
                  check=False)
    assert_one_error(res, 5, f"mountpoint {mnt} does not exist")
    assert f"cryptfs: hint: mkdir -p {mnt}" in res.stderr
    assert not mnt.exists()


def test_mountpoint_busy_exit_5(mount: Mount, tmp_path: Path, passfile: Path) -> None:
    mount.path("f").write_bytes(b"still mounted")
    other = make_volume(tmp_path / "other")
    for backing in (mount.backing, other):
        res = run_cli("mount", str(backing), str(mount.mnt), "--passphrase-file", str(passfile),
                      check=False)
        assert_one_error(res, 5, f"mountpoint {mount.mnt} is busy")
        assert f"cryptfs: hint: cryptfs unmount {mount.mnt}" in res.stderr
    # the existing mount is untouched
    assert os.path.ismount(mount.mnt)
    assert mount.path("f").read_bytes() == b"still mounted"
    with open("/proc/self/mountinfo") as f:
        assert sum(line.split()[4] == str(mount.mnt) for line in f) == 1


def test_unmount_of_something_not_mounted_exit_5(tmp_path: Path) -> None:
    res = run_cli("unmount", str(tmp_path), check=False)
    assert_one_error(res, 5, f"{tmp_path} is not a mounted cryptfs volume")


@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n"], ids=["empty", "newline", "crlf"])
def test_empty_passphrase_file(content: bytes, backing: Path, tmp_path: Path) -> None:
    pf = tmp_path / "pf"
    pf.write_bytes(content)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for args in (["init", "--no-recovery-key", str(tmp_path / "newvol"), "--kdf-memory", "8"],
                 ["mount", str(backing), str(mnt)], ["fsck", str(backing)]):
        res = run_cli(*args, "--passphrase-file", str(pf), check=False)
        assert_one_error(res, 2, "the passphrase is empty")
    assert not (tmp_path / "newvol").exists()
    assert not os.path.ismount(mnt)


def test_passphrase_file_missing(backing: Path, tmp_path: Path) -> None:
    res = run_cli("fsck", str(backing), "--passphrase-file", str(tmp_path / "nope"), check=False)
    assert_one_error(res, 2, f"cannot read passphrase file {tmp_path / 'nope'}")


def test_no_terminal_for_the_passphrase(backing: Path, tmp_path: Path) -> None:
    res = subprocess.run(CRYPTFS + ["fsck", str(backing)], stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=60)
    assert_one_error(res, 2, "no terminal to ask for the passphrase")
    assert "cryptfs: hint: pass --passphrase-file FILE" in res.stderr


def test_init_into_non_empty_dir(tmp_path: Path, passfile: Path) -> None:
    d = tmp_path / "full"
    d.mkdir()
    (d / "keep.txt").write_bytes(b"do not touch")
    res = run_cli("init", "--no-recovery-key", str(d), "--passphrase-file", str(passfile),
                  "--kdf-memory", "8",
                  check=False)
    assert_one_error(res, 2, f"{d} is not empty")
    assert "cryptfs: hint: init needs an empty or new directory" in res.stderr
    assert os.listdir(d) == ["keep.txt"] and (d / "keep.txt").read_bytes() == b"do not touch"


def test_init_over_an_existing_volume(backing: Path, passfile: Path) -> None:
    conf = (backing / "cryptfs.conf").read_bytes()
    res = run_cli("init", "--no-recovery-key", str(backing), "--passphrase-file", str(passfile),
                  "--kdf-memory", "8",
                  check=False)
    assert_one_error(res, 2, f"{backing} is already a cryptfs volume")
    assert (backing / "cryptfs.conf").read_bytes() == conf
    assert sorted(os.listdir(backing)) == ["cryptfs.conf", "cryptfs.presence", "tree"]


def test_unknown_mode_exit_2(tmp_path: Path, passfile: Path) -> None:
    d = tmp_path / "v"
    res = run_cli("init", "--no-recovery-key", str(d), "--mode", "rot13", "--passphrase-file", str(passfile),
                  check=False)
    assert_usage_error(res, "Invalid value for '--mode': 'rot13' is not one of")
    assert "aes-256-gcm" in res.stderr and "xchacha20-poly1305" in res.stderr
    assert not d.exists()


def test_other_usage_errors_exit_2(backing: Path, tmp_path: Path, passfile: Path) -> None:
    res = run_cli("init", "--no-recovery-key", str(tmp_path / "v"), "--kdf-memory", "1", "--passphrase-file",
                  str(passfile), check=False)
    assert_usage_error(res, "Invalid value for '--kdf-memory'")
    res = run_cli("mount", str(backing), str(tmp_path), "--no-such-option", check=False)
    assert_usage_error(res, "No such option")
    res = run_cli("fsck", check=False)
    assert_usage_error(res, "Missing argument 'BACKING'")
    assert not (tmp_path / "v").exists()


def test_init_wants_a_recovery_key_decision(tmp_path: Path, passfile: Path) -> None:
    """Every volume gets a recovery key unless the operator says otherwise."""
    res = run_cli("init", str(tmp_path / "v"), "--passphrase-file", str(passfile),
                  "--kdf-memory", "8", "--kdf-iterations", "1", check=False)
    assert_one_error(res, 2, "name the file for the volume's recovery key: --recovery-key FILE")
    assert "--no-recovery-key" in res.stderr and not (tmp_path / "v").exists()
    res = run_cli("init", str(tmp_path / "v"), "--passphrase-file", str(passfile),
                  "--recovery-key", str(tmp_path / "k"), "--no-recovery-key", check=False)
    assert_one_error(res, 2, "exclude each other")
    assert not (tmp_path / "v").exists() and not (tmp_path / "k").exists()


# --- the daemons' --log-file ------------------------------------------------------------------
def _mount_once(backing: Path, mnt: Path, passfile: Path, log: Path) -> None:
    run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile),
            "--log-file", str(log))
    run_cli("unmount", str(mnt))


def test_a_new_log_file_is_private_and_an_admins_mode_is_kept(backing: Path, tmp_path: Path,
                                                              passfile: Path) -> None:
    """The log names mount points, inodes and integrity failures: a log the mount
    creates is 0600 whatever the umask; one an admin made 0640 stays 0640."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    new, kept = tmp_path / "new.log", tmp_path / "kept.log"
    kept.write_text("an admin's first line\n")
    kept.chmod(0o640)
    old_umask = os.umask(0o022)
    try:
        _mount_once(backing, mnt, passfile, new)
        _mount_once(backing, mnt, passfile, kept)
    finally:
        os.umask(old_umask)
    assert new.stat().st_mode & 0o777 == 0o600
    assert kept.stat().st_mode & 0o777 == 0o640
    assert kept.read_text().startswith("an admin's first line\n")  # appended, not replaced
    for log in (new, kept):
        deadline = time.monotonic() + 10  # the daemon writes its last line as it exits
        while "unmounted" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"mounted {backing} on {mnt}" in log.read_text()
        assert f"unmounted {mnt}" in log.read_text()


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_an_unwritable_log_file_is_a_usage_error(foreground: bool, backing: Path, tmp_path: Path,
                                                 passfile: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "no" / "such" / "dir" / "cryptfs.log"
    res = run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile),
                  "--log-file", str(log), *(["-f"] if foreground else []), check=False)
    assert_one_error(res, 2, f"cannot write the log file {log}: No such file or directory")
    assert not os.path.ismount(mnt) and not log.parent.exists()


def test_a_log_file_is_never_written_through_a_link_or_into_someone_elses_file(
        backing: Path, tmp_path: Path, passfile: Path) -> None:
    """The daemons run as root: a --log-file in a directory others may write was
    opened by name, following a symlink an agent planted there (the mount then
    appended its lines to a root-only file), and a file of the agent's own got
    every line. Now only a regular file with one name, root's own, is appended to,
    and the handler keeps the descriptor it checked."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    precious = tmp_path / "precious.conf"
    precious.write_text("root's settings\n")
    precious.chmod(0o600)
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o777)
    spool.chmod(0o777)
    link, hard, theirs = spool / "via-symlink.log", spool / "via-hardlink.log", spool / "theirs.log"
    link.symlink_to(precious)
    os.link(precious, hard)
    theirs.write_text("")
    os.chown(theirs, 65534, 65534)
    for log, why in ((link, "it is a symlink (not followed)"),
                     (hard, "it has 2 names (hard links)"),
                     (theirs, "it belongs to uid 65534, who would read every line logged"),
                     (Path("/dev/null"), "it is not a regular file")):
        res = run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile),
                      "--log-file", str(log), check=False)
        if os.path.ismount(mnt):  # (a failure must not leave a mount behind for later tests)
            run_cli("unmount", str(mnt))
            raise AssertionError(f"mounted with --log-file {log}: {res.stderr}")
        assert_one_error(res, 2, f"cannot write the log file {log}: {why}")
    assert precious.read_text() == "root's settings\n" and theirs.read_text() == ""
    res = subprocess.run([sys.executable, "-m", "cryptfs.keyagent.daemon", "--socket",
                          str(tmp_path / "agent.sock"), "--log-file", str(link)],
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert res.returncode == 2 and "it is a symlink (not followed)" in res.stderr, res.stderr
    assert precious.read_text() == "root's settings\n"


def test_a_pid_file_is_replaced_never_written_through(backing: Path, tmp_path: Path,
                                                      passfile: Path) -> None:
    """The daemon wrote its pid by name after the check: a symlink planted in
    between (in a directory others may write) made it overwrite any file.  The
    pid now goes into a new file renamed over the name; a planted link is
    replaced, its target untouched."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    precious = tmp_path / "shadow"
    precious.write_text("root:$y$...\n")
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o777)
    spool.chmod(0o777)
    pid = spool / "cryptfs.pid"
    pid.write_text("4242\n")  # (an old pid file: accepted by the check) ...
    os.unlink(pid)
    os.link(precious, pid)  # ... then swapped for a hard link before the daemon writes
    res = run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile),
                  "--pid-file", str(pid), check=False)
    if os.path.ismount(mnt):
        run_cli("unmount", str(mnt))
    assert res.returncode == 2 and "exists and is not a pid file" in res.stderr  # (checked)
    from cryptfs.mount import _write_pid_file
    pid.unlink()
    pid.symlink_to(precious)
    _write_pid_file(str(pid))  # (what the daemon does once mounted)
    assert precious.read_text() == "root:$y$...\n"
    assert not pid.is_symlink() and pid.read_text() == f"{os.getpid()}\n"
    assert sorted(os.listdir(spool)) == ["cryptfs.pid"]  # (no temporary file left)


def test_the_agent_says_why_it_cannot_write_its_log(tmp_path: Path) -> None:
    log = tmp_path / "missing" / "agent.log"
    res = subprocess.run([sys.executable, "-m", "cryptfs.keyagent.daemon", "--socket",
                          str(tmp_path / "agent.sock"), "--log-file", str(log)],
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 2, res.stderr
    assert f"cryptfs-agent: error: cannot write the log file {log}: No such file or directory" \
        in res.stderr
    assert not (tmp_path / "agent.sock").exists()


def test_the_agents_new_log_file_is_private(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "agent.sock", tmp_path / "agent.log")
    old_umask = os.umask(0o022)
    try:
        agent.start()
    finally:
        os.umask(old_umask)
    try:
        assert agent.log.stat().st_mode & 0o777 == 0o600
        assert f"listening on {agent.socket}" in agent.log_text()
    finally:
        assert agent.stop() == 0


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    """A key agent of its own for the test; it must stop cleanly (exit 0)."""
    a = AgentProcess(tmp_path / "agent.sock", tmp_path / "agent.log")
    a.start()
    try:
        yield a
    finally:
        assert a.stop() == 0


def test_unlocking_no_volume_through_the_agent_is_exit_4(tmp_path: Path, passfile: Path,
                                                         agent: AgentProcess) -> None:
    """The exit code the same mistake gives without the agent (it was 8, "the
    agent refused"), for the CLI and for the PAM helper."""
    other = tmp_path / "other"
    other.mkdir()
    for args in (["--check"], ["--passphrase-file", str(passfile)]):
        res = run_cli("unlock", str(other), "--agent-socket", str(agent.socket), *args,
                      check=False)
        assert_one_error(res, 4, f"{other} is not a cryptfs volume (no cryptfs.conf)")
    res = subprocess.run([sys.executable, "-m", "cryptfs.keyagent.pam", "unlock", "--backing",
                          str(other), "--agent-socket", str(agent.socket)],
                         input=b"secret\n", capture_output=True, timeout=30,
                         env={**os.environ, "PAM_USER": "root", "PAM_TYPE": "auth"})
    assert b"Traceback" not in res.stderr, res.stderr
    assert res.returncode == 4 and b"is not a cryptfs volume" in res.stderr, res.stderr
    assert res.stderr.count(os.fsencode(other)) == 1, res.stderr  # (it was said twice)


def test_a_pid_file_replaces_only_a_pid_file_and_goes_at_unmount(backing: Path, tmp_path: Path,
                                                               passfile: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    notes = tmp_path / "notes.conf"
    notes.write_text("an admin's settings\n")
    res = run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile),
                  "--pid-file", str(notes), check=False)
    assert_one_error(res, 2, f"{notes} exists and is not a pid file")
    assert notes.read_text() == "an admin's settings\n" and not os.path.ismount(mnt)
    pid = tmp_path / "daemon.pid"
    pid.write_text("12345\n")  # (a daemon's old pid file is replaced)
    run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile),
            "--pid-file", str(pid))
    daemon = int(pid.read_text())
    assert daemon != 12345 and os.path.ismount(mnt)
    run_cli("unmount", str(mnt))
    deadline = time.monotonic() + 10
    while pid.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid.exists()  # (no stale pid once the daemon is gone)


def test_a_pid_file_in_no_directory_is_a_usage_error(backing: Path, tmp_path: Path,
                                                     passfile: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pid = tmp_path / "no" / "such" / "daemon.pid"
    res = run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile),
                  "--pid-file", str(pid), check=False)
    assert_one_error(res, 2, f"cannot write the pid file {pid}: {pid.parent} does not exist")
    (tmp_path / "file").write_text("")
    pid = tmp_path / "file" / "daemon.pid"
    res = run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile),
                  "--pid-file", str(pid), check=False)
    assert_one_error(res, 2, f"cannot write the pid file {pid}: {pid.parent} is not a directory")
    assert not os.path.ismount(mnt)
    for cmd in ("info", "fsck"):  # (a file named for the volume: "no such directory" before)
        res = run_cli(cmd, str(tmp_path / "file"), "--passphrase-file", str(passfile),
                      check=False) if cmd == "fsck" else run_cli(cmd, str(tmp_path / "file"),
                                                                 check=False)
        assert res.returncode in (2, 4), res.stderr
        assert "no such directory" not in res.stderr and "Traceback" not in res.stderr


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "ro", "ro") as ro:
        yield ro


@pytest.mark.parametrize("foreground", [False, True], ids=["daemon", "foreground"])
def test_a_pid_file_that_cannot_be_written_leaves_nothing_mounted(
        foreground: bool, backing: Path, tmp_path: Path, passfile: Path,
        read_only_dir: Path) -> None:
    """The pid file is written once the volume is mounted (it says the mount is ready):
    if that fails, the mount goes again before the command fails.  (It used to stay,
    and the daemon hung on it, stat'ing the mount whose INIT nobody would answer.)"""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pid, log = read_only_dir / "daemon.pid", tmp_path / "daemon.log"
    res = run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile),
                  "--pid-file", str(pid), "--log-file", str(log),
                  *(["-f"] if foreground else []), check=False)
    assert_one_error(res, 5, f"cannot write the pid file {pid}: Read-only file system")
    assert not os.path.ismount(mnt) and not _fuse_listed(mnt)
    assert os.listdir(mnt) == []  # the directory itself, answering at once
    text = log.read_text()
    assert f"cannot write the pid file {pid}: Read-only file system: unmounting" in text
    assert text.rstrip().endswith(f"unmounted {mnt}")


def test_the_agent_never_removes_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    """--socket naming an existing regular file by mistake: refused, the file kept
    (only a stale socket of an agent that is gone is replaced)."""
    victim = tmp_path / "notes.txt"
    victim.write_text("an admin's notes\n")
    res = subprocess.run([sys.executable, "-m", "cryptfs.keyagent.daemon", "--socket",
                          str(victim)], capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 2 and f"{victim} exists and is not a socket" in res.stderr
    assert victim.read_text() == "an admin's notes\n"


def test_the_agent_leaves_no_socket_behind(tmp_path: Path) -> None:
    """A stopped agent removed nothing (only the next one replaced the stale socket),
    and one whose access log was unusable had bound its socket (and said it was
    listening) before it found out."""
    sock = tmp_path / "agent.sock"
    (tmp_path / "notalog").mkdir()
    res = subprocess.run([sys.executable, "-m", "cryptfs.keyagent.daemon", "--socket", str(sock),
                          "--audit-log", str(tmp_path / "notalog")], capture_output=True,
                         text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert res.returncode == 2 and "holds no access log" in res.stderr, res.stderr
    assert "listening" not in res.stderr and not sock.exists()
    agent = AgentProcess(sock, tmp_path / "agent.log")
    agent.start()
    assert sock.is_socket()
    assert agent.stop() == 0
    assert not sock.exists() and "agent stopped" in agent.log_text()


def test_the_agent_makes_its_socket_directory_but_no_chain_of_them(tmp_path: Path) -> None:
    """The socket's own directory (like /run/cryptfs) is made; a path whose
    parent is missing too (a typo) is refused, and nothing is made."""
    res = subprocess.run([sys.executable, "-m", "cryptfs.keyagent.daemon", "--socket",
                          str(tmp_path / "typo" / "cryptfs" / "agent.sock")],
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 2, res.stderr
    assert f"cryptfs-agent: error: cannot make {tmp_path}/typo/cryptfs for the socket" in res.stderr
    assert "cryptfs-agent: hint: give --socket a path in an existing directory" in res.stderr
    assert "its parent does not exist" in res.stderr
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("option,where", [
    ("--pid-file", "backing/cryptfs.conf"), ("--log-file", "backing/cryptfs.conf"),
    ("--pid-file", "backing/tree/x"), ("--log-file", "mnt/daemon.log")])
def test_a_daemon_file_inside_the_volume_or_its_mount_is_refused(
        option: str, where: str, backing: Path, tmp_path: Path, passfile: Path) -> None:
    """A pid file over the config replaced the volume's key slots; a log inside the
    mount would make the daemon wait on itself."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    config = (backing / "cryptfs.conf").read_bytes()
    target = tmp_path / where
    res = run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile),
                  option, str(target), check=False)
    top, name = (mnt, "the mountpoint") if where.startswith("mnt") else (
        backing, "the volume's backing directory")
    assert_one_error(res, 2, f"the {option[2:].replace('-', ' ')} {target} is inside "
                             f"{name} {top}")
    assert (backing / "cryptfs.conf").read_bytes() == config
    assert not os.path.ismount(mnt) and not (backing / "tree" / "x").exists()


@pytest.mark.parametrize("source", ["/dev/zero", "long"])
def test_a_passphrase_file_without_a_short_first_line_is_refused(source: str,
                                                                 tmp_path: Path) -> None:
    """/dev/zero was read until memory ran out (the command hung)."""
    path = Path(source)
    if source == "long":
        path = tmp_path / "long"
        path.write_bytes(b"x" * (64 * 1024 + 1) + b"\n")
    res = run_cli("init", str(tmp_path / "vol"), "--passphrase-file", str(path),
                  "--no-recovery-key", check=False, timeout=30)
    assert_one_error(res, 2, f"the first line of passphrase file {path} is longer than 65536 "
                             "bytes")
    assert not (tmp_path / "vol").exists()


@pytest.mark.parametrize("where", [".", "tree/sub"])
def test_a_mountpoint_inside_the_backing_directory_is_refused(
        where: str, backing: Path, passfile: Path) -> None:
    """`mount VOL VOL` hid the ciphertext behind the plaintext it served."""
    mnt = (backing / where).resolve()
    mnt.mkdir(exist_ok=True)
    res = run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile),
                  check=False)
    assert_one_error(res, 2, f"the mountpoint {mnt} is inside the volume's backing directory "
                             f"{backing.resolve()}")
    assert not os.path.ismount(mnt) and not _fuse_listed(mnt)


def test_an_access_log_inside_the_backing_directory_is_refused(backing: Path, tmp_path: Path,
                                                               passfile: Path) -> None:
    logdir = backing / "audit"
    run_cli("audit", "init", str(tmp_path / "audit"))
    os.rename(tmp_path / "audit", logdir)  # (audit init refuses to make it there: below)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile),
                  "--audit-log", str(logdir), check=False)
    assert_one_error(res, 2, f"the access log {logdir} is inside the volume's backing "
                             f"directory {backing.resolve()}")
    assert not os.path.ismount(mnt)
    assert sorted(p.name for p in logdir.iterdir()) == ["audit.key", "audit.pub"]


def test_audit_init_refuses_a_log_inside_a_volume(mount: Mount, tmp_path: Path) -> None:
    """Neither among a volume's ciphertext (at any depth) nor inside a mount of
    one (the mount would write its records into itself)."""
    for logdir in (mount.backing / "audit", mount.backing / "deep" / "er" / "audit"):
        res = run_cli("audit", "init", str(logdir), check=False)
        assert_one_error(res, 2, f"{logdir} is inside the backing directory of the volume "
                                 f"{mount.backing.resolve()}")
    assert not (mount.backing / "audit").exists() and not (mount.backing / "deep").exists()
    res = run_cli("audit", "init", str(mount.mnt / "audit"), check=False)
    assert_one_error(res, 2, f"{mount.mnt / 'audit'} is inside {mount.mnt.resolve()}, a mounted "
                             "cryptfs volume")
    assert not (mount.mnt / "audit").exists()
    # A file of the config's name that is no volume's config does not make a volume.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "cryptfs.conf").write_text("# an unrelated program's settings\n")
    res = run_cli("audit", "init", str(tmp_path / "other" / "audit"))
    assert res.stdout.startswith("cryptfs-audit+")


@pytest.mark.parametrize("option", ["--idle-timeout", "--request-timeout", "--backoff",
                                    "--backoff-max"])
def test_the_agent_wants_numbers_of_seconds(option: str, tmp_path: Path) -> None:
    """'nan' passed click's range check (every comparison with it is false)."""
    for value in ("nan", "inf"):
        res = subprocess.run([sys.executable, "-m", "cryptfs.keyagent.daemon", "--socket",
                              str(tmp_path / "agent.sock"), option, value],
                             capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert f"Invalid value for '{option}': '{value}' is not a number of seconds" in res.stderr
        assert not (tmp_path / "agent.sock").exists()


def test_an_agent_socket_that_is_a_regular_file_is_refused(backing: Path, tmp_path: Path) -> None:
    """It was accepted, and every request of every user was then refused."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    not_a_socket = tmp_path / "agent.sock"
    not_a_socket.write_text("")
    res = run_cli("mount", str(backing), str(mnt), "--agent", "--agent-socket",
                  str(not_a_socket), check=False)
    assert_one_error(res, 2, f"{not_a_socket} is not a socket")
    assert not os.path.ismount(mnt)
    # A socket not there yet is waited for (the agent may start later), with a warning:
    # a typo in --agent-socket looked exactly like an agent that is down.
    missing = tmp_path / "typo.sock"
    res = run_cli("mount", str(backing), str(mnt), "--agent", "--agent-socket", str(missing))
    try:
        assert res.stderr == (f"cryptfs: warning: no key agent listens on {missing} yet: the "
                              "mount serves no one until one does\n")
        assert os.path.ismount(mnt)
    finally:
        run_cli("unmount", str(mnt))


def test_names_with_control_characters_are_shown_escaped(tmp_path: Path, passfile: Path) -> None:
    """A line break, an ESC sequence or a right-to-left override in a directory's
    name reached the terminal raw: it split the message in two, could recolour or
    erase what was printed, or make the path read backwards."""
    odd = tmp_path / "a\nb\x1b[2Kc\u202etxt.exe"
    res = run_cli("init", str(odd), "--passphrase-file", str(passfile), "--no-recovery-key",
                  "--kdf-memory", "8", "--kdf-iterations", "1")
    assert res.stdout.count("\n") == 1, res.stdout
    assert f"in {tmp_path}/a\\nb\\x1b[2Kc\\u202etxt.exe (mode" in res.stdout, res.stdout
    assert (odd / "cryptfs.conf").is_file()  # (the directory itself keeps its name)
    res = run_cli("init", str(odd), "--passphrase-file", str(passfile), "--no-recovery-key",
                  check=False)
    assert_one_error(res, 2, f"{tmp_path}/a\\nb\\x1b[2Kc\\u202etxt.exe")
    assert "\x1b" not in res.stderr and "\u202e" not in res.stderr


def test_locking_what_is_no_volume_says_so(tmp_path: Path, backing: Path,
                                           agent: AgentProcess) -> None:
    """`cryptfs lock DIR` of a directory that is no volume said "locked 0
    session(s)" and exited 0, so a typo looked like a lock that worked."""
    other = tmp_path / "not-a-volume"
    other.mkdir()
    res = run_cli("lock", str(other), "--agent-socket", str(agent.socket), check=False)
    assert_one_error(res, 4, f"{other} is not a cryptfs volume, nor the mountpoint of one")
    # a volume where the caller has no session: nothing to do, and that is no error
    res = run_cli("lock", str(backing), "--agent-socket", str(agent.socket))
    assert res.stdout == "locked 0 session(s)\n"


def test_mounting_over_files_warns_that_they_stay_in_clear(backing: Path, tmp_path: Path,
                                                          passfile: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "customers.csv").write_text("left here in clear\n")
    res = run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(passfile))
    try:
        assert ("cryptfs: warning: mountpoint " + str(mnt) + " is not empty: what it holds is "
                "hidden while the volume is mounted, and stays unencrypted") in res.stderr
        assert os.listdir(mnt) == []
    finally:
        run_cli("unmount", str(mnt))
    assert (mnt / "customers.csv").read_text() == "left here in clear\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_cli("mount", str(backing), str(empty), "--passphrase-file", str(passfile))
    run_cli("unmount", str(empty))
    assert "warning" not in res.stderr, res.stderr
