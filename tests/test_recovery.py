"""The recovery key: X25519 wrapping, `init --recovery-key`, and `cryptfs recover`."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import Mount, new_mount, run_cli, tmpfs
from cryptfs.modes import IntegrityError, NotForMe, x25519

FAST = ("--kdf-memory", "8", "--kdf-iterations", "1")
LABEL = b"cryptfs/v1/recovery"


# -- the primitive --------------------------------------------------------------------------------

def test_x25519_wrap_round_trip_and_binding() -> None:
    sk = x25519.new_private_key()
    pk = x25519.public_key(sk)
    secret = os.urandom(32)
    w = x25519.wrap(secret, pk, LABEL, b"ad")
    assert len(w) == 32 + 32 + 16
    assert x25519.unwrap(w, sk, LABEL, b"ad") == secret
    assert x25519.wrap(secret, pk, LABEL, b"ad") != w  # fresh ephemeral key each time
    with pytest.raises(NotForMe):
        x25519.unwrap(w, x25519.new_private_key(), LABEL, b"ad")  # another key
    with pytest.raises(NotForMe):
        x25519.unwrap(w, sk, b"cryptfs/v1/other", b"ad")  # another purpose
    with pytest.raises(NotForMe):
        x25519.unwrap(w, sk, LABEL, b"other ad")
    for i in (0, 31, 32, len(w) - 1):  # flip a bit of the ephemeral key or the ciphertext
        bad = bytearray(w)
        bad[i] ^= 1
        with pytest.raises((NotForMe, IntegrityError)):
            x25519.unwrap(bytes(bad), sk, LABEL, b"ad")
    with pytest.raises(IntegrityError):
        x25519.unwrap(w[:40], sk, LABEL, b"ad")


def test_x25519_refuses_a_low_order_point() -> None:
    with pytest.raises(IntegrityError):
        x25519.wrap(b"k" * 32, bytes(32), LABEL)  # the all-zero public key


# -- a volume with a recovery key -----------------------------------------------------------------

def _volume(tmp_path: Path, passfile: Path, mode: str) -> tuple[Path, Path]:
    backing, key = tmp_path / "backing", tmp_path / "recovery.key"
    out = run_cli("init", str(backing), "--mode", mode, "--passphrase-file", str(passfile),
                  "--recovery-key", str(key), *FAST).stdout
    assert f"recovery key written to {key}" in out
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    text = key.read_text()
    assert "Keep it offline" in text and "CRYPTFS-RECOVERY-KEY-2:" in text
    conf = json.loads((backing / "cryptfs.conf").read_text())
    assert set(conf["recovery"]) == {"public", "wrapped", "auth"} and conf["recovery"]["auth"] is True
    # Neither the private key nor the authority key is in the config.
    line = next(ln for ln in text.splitlines() if ln.startswith("CRYPTFS-RECOVERY-KEY-2:"))
    _, _, r_b64, a_b64 = line.split(":")
    conf_text = (backing / "cryptfs.conf").read_text()
    assert r_b64 not in conf_text and a_b64 not in conf_text
    return backing, key


def _populate(m: Mount) -> dict[str, bytes]:
    """Files of every kind; returns path -> content for regular files."""
    files = {
        "customers.csv": b"surname,phone\nZhang,13800138000\n",
        "calls/2026/note.txt": b"moved to Friday\n",
        "calls/2026/empty": b"",
        "big.bin": os.urandom(700_000),
        "x" * 240: b"a long name",
        "客户/名单.txt": "张伟\n".encode(),
    }
    for rel, data in files.items():
        p = m.path(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    os.chmod(m.path("customers.csv"), 0o640)
    os.setxattr(m.path("customers.csv"), "user.origin", b"crm export")
    with open(m.path("sparse"), "wb") as f:
        f.seek(3 * 1024 * 1024)
        f.write(b"end")
    files["sparse"] = bytes(3 * 1024 * 1024) + b"end"
    os.symlink("calls/2026/note.txt", m.path("latest-note"))
    return files


def _populated(tmp_path: Path, passfile: Path, mode: str) -> tuple[Path, Path, dict[str, bytes]]:
    """A volume with a recovery key, filled through a mount: (backing, key file, files)."""
    backing, key = _volume(tmp_path, passfile, mode)
    m = new_mount(tmp_path, backing, passfile)
    m.start()
    try:
        files = _populate(m)
    finally:
        m.stop()
    return backing, key, files


@pytest.mark.parametrize("mode", ["aes-256-gcm", "xchacha20-poly1305"])
def test_recover_the_whole_volume_with_the_recovery_key_alone(tmp_path: Path, passfile: Path,
                                                              mode: str) -> None:
    backing, key, files = _populated(tmp_path, passfile, mode)
    passfile.unlink()  # no passphrase anywhere from here on
    out = tmp_path / "out"
    res = run_cli("recover", str(backing), "--recovery-key", str(key), "--out", str(out))
    assert f"recovered {len(files)} files" in res.stdout and "1 symlinks" in res.stdout
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data, rel
    assert os.readlink(out / "latest-note") == "calls/2026/note.txt"
    assert stat.S_IMODE((out / "customers.csv").stat().st_mode) == 0o640
    assert stat.S_IMODE(out.stat().st_mode) == 0o700  # (no one else reaches the plaintext)
    assert os.getxattr(out / "customers.csv", "user.origin") == b"crm export"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        {rel.split("/")[0] for rel in files} | {"latest-note"})


def test_recover_selected_paths(tmp_path: Path, passfile: Path) -> None:
    backing, key, files = _populated(tmp_path, passfile, "aes-256-gcm")
    out = tmp_path / "out"
    res = run_cli("recover", str(backing), "calls/2026", "/customers.csv", "--recovery-key",
                  str(key), "--out", str(out))
    assert "recovered 3 files" in res.stdout
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert found == ["calls/2026/empty", "calls/2026/note.txt", "customers.csv"]
    assert (out / "calls/2026/note.txt").read_bytes() == files["calls/2026/note.txt"]
    res = run_cli("recover", str(backing), "no/such/file", "--recovery-key", str(key), "--out",
                  str(tmp_path / "out2"), check=False)
    # A PATH the volume lacks is a usage error (it was reported as damage, exit 6).
    assert res.returncode == 2, res.stderr
    assert "cryptfs: error: no such path in the volume: /no/such/file" in res.stderr
    assert "damaged" not in res.stderr
    assert not (tmp_path / "out2").exists()  # (nothing recovered: no empty --out left behind)
    (tmp_path / "out3").mkdir(mode=0o700)  # (but an empty directory the admin made stays)
    res = run_cli("recover", str(backing), "no/such/file", "customers.csv", "--recovery-key",
                  str(key), "--out", str(tmp_path / "out3"), check=False)
    assert res.returncode == 2 and "recovered 1 files" in res.stdout
    assert (tmp_path / "out3" / "customers.csv").read_bytes() == files["customers.csv"]


def test_a_full_disk_stops_recovery_with_no_file_cut_short(tmp_path: Path, passfile: Path
                                                           ) -> None:
    """A short write on a filling disk was not checked: a plaintext file cut short
    was left under its real name. Now the file that did not fit is named, and it
    is not there at all (nor any temporary file)."""
    backing, key = _volume(tmp_path, passfile, "aes-256-gcm")
    m = new_mount(tmp_path, backing, passfile)
    m.start()
    try:
        (m.mnt / "big").write_bytes(os.urandom(400 * 1024))
    finally:
        m.stop()
    with tmpfs(tmp_path / "small", "size=200k") as small:
        res = run_cli("recover", str(backing), "--recovery-key", str(key), "--out",
                      str(small / "out"), check=False)
        assert res.returncode == 7 and "Traceback" not in res.stderr, res.stderr
        assert "recovery stopped at /big (not written): No space left on device" in res.stderr
        assert sorted(os.listdir(small / "out")) == []


def test_a_damaged_file_is_reported_and_not_written(tmp_path: Path, passfile: Path) -> None:
    backing, key = _volume(tmp_path, passfile, "aes-256-gcm")
    m = new_mount(tmp_path, backing, passfile)
    m.start()
    try:
        m.path("good.txt").write_bytes(b"fine\n")
        m.path("bad.bin").write_bytes(os.urandom(20_000))
        bad_ino = os.stat(m.path("bad.bin")).st_ino
    finally:
        m.stop()
    victim = next(p for p in (backing / "tree").iterdir() if p.stat().st_ino == bad_ino)
    raw = bytearray(victim.read_bytes())
    raw[-100] ^= 0x40
    victim.write_bytes(bytes(raw))
    out = tmp_path / "out"
    res = run_cli("recover", str(backing), "--recovery-key", str(key), "--out", str(out),
                  check=False)
    assert res.returncode == 6
    assert "damaged: /bad.bin: block 4" in res.stderr and "(not written)" in res.stderr
    assert (out / "good.txt").read_bytes() == b"fine\n"
    assert not (out / "bad.bin").exists()
    assert [p.name for p in out.iterdir()] == ["good.txt"]  # no temporary file left behind


def test_wrong_or_missing_recovery_keys_are_refused(tmp_path: Path, passfile: Path) -> None:
    backing, key = _volume(tmp_path, passfile, "aes-256-gcm")
    other, other_key = tmp_path / "other", tmp_path / "other.key"
    run_cli("init", str(other), "--passphrase-file", str(passfile), "--recovery-key",
            str(other_key), *FAST)
    out = tmp_path / "out"
    res = run_cli("recover", str(backing), "--recovery-key", str(other_key), "--out", str(out),
                  check=False)
    assert res.returncode == 3 and "belongs to volume" in res.stderr
    garbage = tmp_path / "garbage"
    garbage.write_text("not a key\n")
    res = run_cli("recover", str(backing), "--recovery-key", str(garbage), "--out", str(out),
                  check=False)
    assert res.returncode == 2 and "is not a cryptfs recovery key file" in res.stderr
    plain = tmp_path / "plain"
    run_cli("init", "--no-recovery-key", str(plain), "--passphrase-file", str(passfile), *FAST)
    text = key.read_text().replace(json.loads((backing / "cryptfs.conf").read_text())["volume_id"],
                                   json.loads((plain / "cryptfs.conf").read_text())["volume_id"])
    forged = tmp_path / "forged.key"
    forged.write_text(text)
    res = run_cli("recover", str(plain), "--recovery-key", str(forged), "--out", str(out),
                  check=False)
    assert res.returncode == 4 and "has no recovery key" in res.stderr
    (out / "x").parent.mkdir()
    (out / "x").write_text("occupied")
    res = run_cli("recover", str(backing), "--recovery-key", str(key), "--out", str(out),
                  check=False)
    assert res.returncode == 2 and "is not empty" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_swapped_recovery_public_key_is_detected(tmp_path: Path, passfile: Path) -> None:
    """Someone with write access puts their own recovery key into the config
    (wrapping a master key of their choosing): the config MAC refuses it."""
    from cryptfs.config import b64e
    from cryptfs.recovery import LABEL as REC_LABEL
    from cryptfs.recovery import key_file_text
    from cryptfs.secret import Secret

    backing, _ = _volume(tmp_path, passfile, "aes-256-gcm")
    conf = json.loads((backing / "cryptfs.conf").read_text())
    vid = bytes.fromhex(conf["volume_id"])
    sk = x25519.new_private_key()
    pk = x25519.public_key(sk)
    conf["recovery"] = {"public": b64e(pk),
                        "wrapped": b64e(x25519.wrap(os.urandom(32), pk, REC_LABEL,
                                                    REC_LABEL + vid))}
    (backing / "cryptfs.conf").write_text(json.dumps(conf))
    mine = tmp_path / "mine.key"
    mine.write_text(key_file_text(Secret(sk), vid))
    res = run_cli("recover", str(backing), "--recovery-key", str(mine), "--out",
                  str(tmp_path / "out"), check=False)
    assert res.returncode == 4 and "failed authentication" in res.stderr
    # and the users' passphrases notice the edit too
    res = run_cli("fsck", str(backing), "--passphrase-file", str(passfile), check=False)
    assert res.returncode == 4 and "failed authentication" in res.stderr


def test_init_never_overwrites_a_key_file_and_leaves_none_on_failure(tmp_path: Path,
                                                                     passfile: Path) -> None:
    key = tmp_path / "exists.key"
    key.write_text("precious\n")
    res = run_cli("init", str(tmp_path / "b1"), "--passphrase-file", str(passfile),
                  "--recovery-key", str(key), *FAST, check=False)
    assert res.returncode == 2 and "never written over a file" in res.stderr
    assert key.read_text() == "precious\n" and not (tmp_path / "b1").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something").write_text("x")
    res = run_cli("init", str(busy), "--passphrase-file", str(passfile), "--recovery-key",
                  str(tmp_path / "new.key"), *FAST, check=False)
    assert res.returncode == 2 and "not empty" in res.stderr
    assert not (tmp_path / "new.key").exists()


def test_plaintext_is_never_recovered_into_the_volume_itself(tmp_path: Path,
                                                             passfile: Path) -> None:
    """--out inside the backing directory put plaintext among the ciphertext (and fsck
    then found damage); inside a mount of the volume the walk found what it wrote
    and recursed until Python gave up, leaving hundreds of nested copies."""
    backing, key, files = _populated(tmp_path, passfile, "aes-256-gcm")
    before = sorted(p.relative_to(backing) for p in backing.rglob("*"))
    m = new_mount(tmp_path, backing, passfile, "mnt2")
    m.start()
    try:
        seen = sorted(p.relative_to(m.mnt) for p in m.mnt.rglob("*"))
        for out, where in ((backing / "tree" / "plain", "the volume's backing directory"),
                           (backing, "the volume's backing directory"),
                           (m.mnt / "recovered", "a mount of the volume being recovered")):
            res = run_cli("recover", str(backing), "--recovery-key", str(key), "--out",
                          str(out), check=False)
            assert res.returncode == 2, res.stderr
            assert "cryptfs: error: " in res.stderr and where in res.stderr
            assert "Traceback" not in res.stderr
            assert out == backing or not out.exists()
        assert sorted(p.relative_to(m.mnt) for p in m.mnt.rglob("*")) == seen
    finally:
        m.stop()
    assert sorted(p.relative_to(backing) for p in backing.rglob("*")) == before
    assert run_cli("fsck", str(backing), "--passphrase-file", str(passfile)).returncode == 0


@pytest.mark.parametrize("root", ["/", ".", "", "//"])
def test_the_root_as_path_recovers_the_whole_volume(root: str, tmp_path: Path,
                                                    passfile: Path) -> None:
    """`recover VOL /` recovered 0 files with exit 0."""
    backing, key, files = _populated(tmp_path, passfile, "aes-256-gcm")
    out = tmp_path / "out"
    res = run_cli("recover", str(backing), root, "--recovery-key", str(key), "--out", str(out))
    assert f"recovered {len(files)} files" in res.stdout
    assert (out / "calls/2026/note.txt").read_bytes() == files["calls/2026/note.txt"]


def test_a_path_with_dotdot_is_refused_before_anything_is_written(tmp_path: Path,
                                                                  passfile: Path) -> None:
    backing, key, _ = _populated(tmp_path, passfile, "aes-256-gcm")
    out = tmp_path / "out"
    res = run_cli("recover", str(backing), "calls/../customers.csv", "--recovery-key", str(key),
                  "--out", str(out), check=False)
    assert res.returncode == 2 and "a path inside the volume has no '..'" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


def test_recovered_plaintext_goes_only_where_no_one_else_can_reach_it(tmp_path: Path,
                                                                      passfile: Path) -> None:
    """Root's recovery into a directory an agent could enter or change: an agent
    read the unmasked plaintext (the files keep the volume's modes), or planted
    a symlink in it for root to write and chmod through. --out must now be a
    new directory (made 0700) or an empty one of the caller's that no one else
    may enter, never reached through a symlink."""
    backing, key, files = _populated(tmp_path, passfile, "aes-256-gcm")

    def recover(out: Path) -> subprocess.CompletedProcess[str]:
        return run_cli("recover", str(backing), "--recovery-key", str(key), "--out", str(out),
                       check=False)

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    res = recover(shared)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert (f"cryptfs: error: {shared} is open to others (mode 0755): they could read the "
            "plaintext recovered into it") in res.stderr
    assert f"chmod 700 {shared}" in res.stderr and os.listdir(shared) == []
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    res = recover(theirs)
    assert res.returncode == 2 and f"{theirs} belongs to uid 65534, not to you" in res.stderr
    assert os.listdir(theirs) == []
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    res = recover(link)
    assert res.returncode == 2 and f"{link} is not a directory (a symlink is not followed)" \
        in res.stderr, res.stderr
    assert os.listdir(target) == []
    shared.chmod(0o700)  # (as the hint says)
    res = recover(shared)
    assert res.returncode == 0, res.stderr
    for rel, data in files.items():
        assert (shared / rel).read_bytes() == data, rel


def test_a_file_swapped_for_a_fifo_mid_walk_does_not_hold_the_walk(tmp_path: Path) -> None:
    """fsck and recover stat a backing entry, then open it: on a live mount a
    user may rename a FIFO (made through the mount) over the file in between,
    and root's open then waited for a writer forever.  The open no longer
    blocks, and what it finds is reported, not read."""
    import threading

    from conftest import make_volume, unlock
    from cryptfs.fsck import Checker

    vol = unlock(make_volume(tmp_path / "backing"))
    try:
        checker = Checker(vol)
        where = tmp_path / "dir"
        where.mkdir()
        os.mkfifo(where / "swapped")
        dfd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
        got: list[int | None] = []
        t = threading.Thread(target=lambda: got.append(checker._open_file(dfd, "swapped", "/f")),
                             daemon=True)
        t.start()
        t.join(10)
        os.close(dfd)
        assert not t.is_alive(), "the open of a FIFO blocked the walk"
        assert got == [None]
        assert [(p.path, p.what) for p in checker.report.problems] == [
            ("/f", "replaced by something that is not a file during the walk")]
    finally:
        vol.close()


def test_only_user_attributes_are_restored(tmp_path: Path, passfile: Path) -> None:
    """Whoever holds the name keys (any user, or a revoked one with an old
    config) and can write the backing store could store an encrypted
    `system.posix_acl_access`: root's recovery applied it, so the recovered
    file granted `nobody` a read. The mount stores user.* alone, and recover
    now restores user.* alone, and names the rest."""
    from conftest import unlock

    backing, key, files = _populated(tmp_path, passfile, "aes-256-gcm")
    vol = unlock(backing)
    try:
        codec = vol.codec()
        acl = (b"\x02\x00\x00\x00" + b"\x01\x00\x06\x00\xff\xff\xff\xff"
               + b"\x02\x00\x04\x00\xfe\xff\x00\x00" + b"\x04\x00\x04\x00\xff\xff\xff\xff"
               + b"\x10\x00\x04\x00\xff\xff\xff\xff" + b"\x20\x00\x04\x00\xff\xff\xff\xff")
        c_name = codec.xattr_name(b"system.posix_acl_access")
        target = next(p for p in (backing / "tree").iterdir()
                      if p.is_file() and "user.cryptfs-layout" in os.listxattr(p)
                      and any(n.startswith("user.cryptfs.") for n in os.listxattr(p)))
        os.setxattr(target, c_name, codec.seal_xattr(c_name, acl))
    finally:
        vol.close()
    out = tmp_path / "out"
    res = run_cli("recover", str(backing), "--recovery-key", str(key), "--out", str(out),
                  check=False)
    assert res.returncode == 6, res.stderr
    assert ("damaged: /customers.csv: extended attribute system.posix_acl_access is not a user "
            "attribute (not written)") in res.stderr
    assert (out / "customers.csv").read_bytes() == files["customers.csv"]
    assert os.listxattr(out / "customers.csv") == ["user.origin"]
