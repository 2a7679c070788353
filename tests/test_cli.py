"""The cryptfs command: help, info, passwd, foreground mounts and options."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CRYPTFS, PASSPHRASE, Mount, new_mount, require_fuse, run_cli

COMMANDS = ["init", "mount", "unmount", "unlock", "lock", "status", "user", "info", "fsck",
            "passwd", "recover", "export"]
SUBCOMMANDS = ["user add", "user remove", "user list", "user passwd"]


@pytest.mark.parametrize("command", [None, *COMMANDS, *SUBCOMMANDS])
def test_every_command_has_help(command: str | None) -> None:
    args = ["--help"] if command is None else [*command.split(), "--help"]
    out = run_cli(*args).stdout
    assert out.startswith("Usage: cryptfs")
    if command is None:
        for c in COMMANDS:
            assert f"  {c} " in out
        assert "6  fsck found damage" in out
        assert "8  the key agent is not running" in out
    elif command == "user":
        for sub in SUBCOMMANDS:
            assert f"  {sub.split()[1]} " in out
    else:
        assert f"cryptfs {command}" in out
        assert len(out.splitlines()) > 4


def test_info_shows_format_and_slots_but_no_secrets(backing: Path) -> None:
    out = run_cli("info", str(backing)).stdout
    assert "format:        cryptfs config version 2" in out
    assert "default mode:  aes-256-gcm" in out
    assert "slot 0: owner" in out and "argon2id 1 passes, 8 MiB" in out
    conf = (backing / "cryptfs.conf").read_text()
    import json

    wrapped = json.loads(conf)["slots"][0]["wrapped"]
    assert wrapped not in out and json.loads(conf)["mac"] not in out


def test_init_with_xchacha_and_kdf_options(tmp_path: Path, passfile: Path) -> None:
    out = run_cli("init", "--no-recovery-key", str(tmp_path / "v"), "--mode", "xchacha20-poly1305",
                  "--kdf-memory", "16", "--kdf-iterations", "2", "--passphrase-file", str(passfile))
    assert "mode xchacha20-poly1305" in out.stdout
    info = run_cli("info", str(tmp_path / "v")).stdout
    assert "default mode:  xchacha20-poly1305" in info
    assert "argon2id 2 passes, 16 MiB" in info


def test_passwd_changes_only_the_slot(tmp_path: Path, backing: Path, passfile: Path) -> None:
    before = {p: p.read_bytes() for p in (backing / "tree").rglob("*") if p.is_file()}
    new = tmp_path / "new"
    new.write_text("a new and longer passphrase\n")
    out = run_cli("passwd", str(backing), "--passphrase-file", str(passfile),
                  "--new-passphrase-file", str(new)).stdout
    assert "passphrase of key slot 0 (owner) changed" in out
    old = run_cli("fsck", str(backing), "--passphrase-file", str(passfile), check=False)
    assert old.returncode == 3 and "wrong passphrase" in old.stderr
    assert run_cli("fsck", str(backing), "--passphrase-file", str(new)).returncode == 0
    after = {p: p.read_bytes() for p in (backing / "tree").rglob("*") if p.is_file()}
    assert before == after  # no file was touched


def test_passphrase_from_stdin(backing: Path) -> None:
    res = run_cli("fsck", str(backing), "--passphrase-file", "-", input=PASSPHRASE + b"\n")
    assert res.stdout.rstrip().endswith("clean")


def test_foreground_mount_unmounts_on_sigterm(tmp_path: Path, backing: Path, passfile: Path) -> None:
    require_fuse()
    mnt = tmp_path / "fg"
    mnt.mkdir()
    proc = subprocess.Popen(CRYPTFS + ["mount", "--foreground", str(backing), str(mnt),
                                       "--passphrase-file", str(passfile)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(mnt):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.02)
        (mnt / "f").write_bytes(b"written in the foreground")
        # Once the daemon answers requests, it catches SIGTERM (its receiver is set up
        # before the loop starts; the loop may then answer without yielding to trio).
        caught = next(int(line.split()[1], 16) for line in
                      Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                      if line.startswith("SigCgt:"))
        assert caught & (1 << (signal.SIGTERM - 1)), hex(caught)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not os.path.ismount(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    m = new_mount(tmp_path, backing, passfile)
    m.start()
    try:
        assert m.path("f").read_bytes() == b"written in the foreground"
    finally:
        m.stop()


def test_read_only_mount_option(mount: Mount) -> None:
    mount.path("f").write_bytes(b"data")
    mount.stop()
    mount.start("-o", "ro")
    assert mount.path("f").read_bytes() == b"data"
    with pytest.raises(OSError) as e:
        mount.path("g").write_bytes(b"x")
    assert e.value.errno == 30  # EROFS


def test_unmount_command_ends_the_daemon(mount: Mount) -> None:
    pid = mount.pid
    run_cli("unmount", str(mount.mnt))
    assert not os.path.ismount(mount.mnt)
    for _ in range(500):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.02)
    assert not Path(f"/proc/{pid}").exists()
    assert "unmounted" in mount.log_text()


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["info", "--help"]])
def test_output_onto_a_full_disk_is_an_error_not_a_traceback(args: list[str]) -> None:
    with open("/dev/full", "wb") as full:
        res = subprocess.run(CRYPTFS + args, stdout=full, stderr=subprocess.PIPE, text=True,
                             timeout=60)
    assert res.returncode == 7 and "Traceback" not in res.stderr
    assert res.stderr == "cryptfs: error: cannot write standard output: No space left on device\n"
