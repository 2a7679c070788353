"""Two servers, one volume: a key rotation on one while the other serves (issue 14).

``rotate --reencrypt`` gives every file a new file key; a server that has the
volume mounted would keep the old one and write blocks that no longer
authenticate.  Every mount holds ``BACKING/cryptfs.presence`` shared (a flock
that JuiceFS makes global); a re-encryption must hold it alone, so it is
refused while another server is mounted, and a server cannot mount while one
runs.  ``--wrap-key`` keeps file keys and stays allowed while the other
server writes (docs/MULTISERVER.md, "A rotation while another server serves").
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from juicefs import JuicePair, juicefs_pair
from test_multiserver import BLOCK, Servers, fsck_clean, two_servers, write

from conftest import CRYPTFS, make_volume, new_mount, run_cli
from cryptfs import control
from cryptfs.presence import PRESENCE_NAME
from multiuser import ensure_users, shared_tempdir

JOURNAL = "cryptfs.rotate.journal"


@pytest.fixture(scope="module")
def juice() -> Iterator[JuicePair]:
    yield from juicefs_pair()


@pytest.fixture
def servers(juice: JuicePair) -> Iterator[Servers]:
    yield from two_servers(juice, "--shared-storage")


def rotate(s: Servers, kind: str) -> subprocess.CompletedProcess[str]:
    """``cryptfs rotate`` run on server A (its own path to the backing directory)."""
    return run_cli("rotate", str(s.a.backing), f"--{kind}", "--passphrase-file",
                   str(s.passfile), check=False, timeout=180)


def headers(backing: Path) -> dict[str, bytes]:
    """Every backing file's first bytes (its header: the wrapped file key)."""
    out = {}
    for top, _dirs, files in os.walk(backing / "tree"):
        for n in files:
            if "." in n:
                continue  # (cryptfs's own: .diriv, long-name side files)
            p = Path(top, n)
            with open(p, "rb") as f:
                out[str(p.relative_to(backing))] = f.read(128)
    return out


def no_traceback(res: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in res.stdout + res.stderr, res.stdout + res.stderr


def assert_reads(s: Servers, expected: dict[str, bytes]) -> None:
    for name, data in expected.items():
        for m in (s.a, s.b):
            assert m.path(name).read_bytes() == data, (m.mnt, name)


def test_reencrypt_is_refused_while_the_other_server_is_mounted(servers: Servers) -> None:
    s = servers
    expected = {f"b{i}": os.urandom(3 * BLOCK + 17 * i) for i in range(6)}
    for name, data in expected.items():
        write(s.b.path(name), data)
    write(s.a.path("from-a"), b"A" * 5000)
    expected["from-a"] = b"A" * 5000
    with open(s.b.path("open-on-b"), "wb") as held:  # B is writing a file all along
        first = os.urandom(2 * BLOCK + 5)
        held.write(first)
        held.flush()
        os.fsync(held.fileno())  # (its header reaches the storage: compared below)
        conf = (s.a.backing / "cryptfs.conf").read_bytes()
        before = headers(s.a.backing)
        res = rotate(s, "reencrypt")
        no_traceback(res)
        assert res.returncode == 2, res.stdout + res.stderr
        assert "cryptfs: error: cannot re-encrypt: the volume is mounted elsewhere too" \
            in res.stderr and "nothing was changed" in res.stderr, res.stderr
        assert "--wrap-key is safe while they serve" in res.stderr
        # nothing changed: the config, every header, no journal
        assert (s.a.backing / "cryptfs.conf").read_bytes() == conf
        assert headers(s.a.backing) == before
        assert not (s.a.backing / JOURNAL).exists()
        assert not (s.a.backing / (JOURNAL + ".tmp")).exists()
        more = os.urandom(3 * BLOCK)
        held.write(more)
    expected["open-on-b"] = first + more
    assert_reads(s, expected)
    assert "re-encryption refused" in s.a.log_text()

    # A went back to holding the volume shared: B can mount again.
    s.b.stop()
    s.b.start("-o", "allow_other", "--shared-storage")
    assert_reads(s, expected)

    # With B unmounted, the same command re-encrypts everything.
    s.b.stop()
    res = rotate(s, "reencrypt")
    no_traceback(res)
    assert res.returncode == 0 and "done: the old key generations are forgotten" in res.stdout, \
        res.stdout + res.stderr
    assert json.loads((s.a.backing / "cryptfs.conf").read_bytes())["key_id"] == \
        json.loads(conf)["key_id"] + 1
    after = headers(s.a.backing)
    assert after.keys() == before.keys()
    assert all(after[k] != before[k] for k in before)  # a new header (file key) each
    assert "the volume may be mounted elsewhere again (the walk ended)" in s.a.log_text()
    # ... and B mounts again (A gave the lock back) and reads every byte.
    s.b.start("-o", "allow_other", "--shared-storage")
    assert_reads(s, expected)
    write(s.b.path("after"), b"written on B after the rotation")
    assert s.a.path("after").read_bytes() == b"written on B after the rotation"
    assert "clean" in fsck_clean(s)


def test_no_server_mounts_while_one_reencrypts(servers: Servers) -> None:
    s = servers
    expected = {f"f{i}": os.urandom(64 * BLOCK + i) for i in range(8)}
    for name, data in expected.items():
        write(s.a.path(name), data)
    s.b.stop()

    # What the walk holds, asked for alone (the command asks first): B is refused.
    control.hold_alone(str(s.a.mnt))
    res = run_cli("mount", str(s.b.backing), str(s.b.mnt), "--passphrase-file", str(s.passfile),
                  "--shared-storage", check=False)
    no_traceback(res)
    assert res.returncode == 5 and "re-encrypts every file (cryptfs rotate --reencrypt, on " \
        "this or another server): mount it when that has finished" in res.stderr, res.stderr
    assert not os.path.ismount(s.b.mnt)
    control.release_alone(str(s.a.mnt))
    s.b.start("-o", "allow_other", "--shared-storage")  # released: B mounts
    assert_reads(s, expected)
    s.b.stop()

    # A real walk, caught while it holds the volume (it lasts at least
    # follow.SETTLE = 3 s; the daemon is then stopped, which keeps its lock).
    p = subprocess.Popen([*CRYPTFS, "rotate", str(s.a.backing), "--reencrypt",
                          "--passphrase-file", str(s.passfile)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (p.poll() is None and _walking(s.a.mnt)):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.02)
        os.kill(s.a.pid, signal.SIGSTOP)
        try:
            res = run_cli("mount", str(s.b.backing), str(s.b.mnt), "--passphrase-file",
                          str(s.passfile), "--shared-storage", check=False)
        finally:
            os.kill(s.a.pid, signal.SIGCONT)
        no_traceback(res)
        assert res.returncode == 5 and "re-encrypts every file" in res.stderr, res.stderr
        assert not os.path.ismount(s.b.mnt)
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0 and "done: the old key generations are forgotten" in out, out + err
    s.b.start("-o", "allow_other", "--shared-storage")
    assert_reads(s, expected)
    assert "clean" in fsck_clean(s)


def _walking(mnt: Path) -> bool:
    try:
        return control.rotation_progress(str(mnt)).get("state") == "running"
    except OSError:
        return False


WRITER = r'''
import os, sys, time
root, stop = sys.argv[1], sys.argv[2]
errors, sizes, i = [], {}, 0
held = open(os.path.join(root, "held"), "wb")  # open across the whole rotation
held_data = b""
while not os.path.exists(stop) or i < 20:
    name = f"w{i % 25}"
    data = (f"{i}:" * 700).encode()[: 1000 + 97 * (i % 60)]
    try:
        with open(os.path.join(root, name), "wb") as f:
            f.write(data)
        with open(os.path.join(root, name), "rb") as f:
            if f.read() != data:
                errors.append(f"{name}: read back differs")
        chunk = os.urandom(1500)
        held.write(chunk)
        held.flush()
        os.fsync(held.fileno())
        held_data += chunk
        sizes[name] = data.hex()
    except OSError as e:
        errors.append(f"{name}: {e}")
    i += 1
held.close()
with open(os.path.join(root, "held.expected"), "wb") as f:
    f.write(held_data)
import json
print(json.dumps({"errors": errors, "files": sizes, "rounds": i}))
'''


def test_wrap_key_while_the_other_server_writes(servers: Servers) -> None:
    s = servers
    users = ensure_users()
    s.a.path("work").mkdir()
    os.chmod(s.a.path("work"), 0o777)
    expected = {"work/old": os.urandom(5 * BLOCK)}
    write(s.a.path("work/old"), expected["work/old"])
    stop = s.a.mnt.parent / "stop-writer"
    pw = users["cfs-bob"]
    writer = subprocess.Popen(["/usr/bin/python3", "-c", WRITER, str(s.b.path("work")),
                               str(stop)], user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        deadline = time.monotonic() + 60
        while not s.b.path("work", "w3").exists():
            assert writer.poll() is None and time.monotonic() < deadline, writer.communicate()
            time.sleep(0.05)
        conf = json.loads((s.a.backing / "cryptfs.conf").read_bytes())
        res = rotate(s, "wrap-key")
        no_traceback(res)
        assert res.returncode == 0 and "done: the old key generations are forgotten" \
            in res.stdout, res.stdout + res.stderr
        assert json.loads((s.a.backing / "cryptfs.conf").read_bytes())["key_id"] == \
            conf["key_id"] + 1
    finally:
        stop.touch()
        out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    result = json.loads(out)
    assert result["errors"] == [] and result["rounds"] >= 20, result
    for name, hexdata in result["files"].items():
        expected[f"work/{name}"] = bytes.fromhex(hexdata)
    expected["work/held"] = s.b.path("work", "held.expected").read_bytes()
    assert len(expected["work/held"]) == 1500 * result["rounds"]
    assert_reads(s, expected)
    assert "clean" in fsck_clean(s)


def test_an_offline_rotation_is_refused_while_the_other_server_is_mounted(
        servers: Servers) -> None:
    s = servers
    write(s.b.path("f"), b"kept")
    s.a.stop()  # A has no mount: cryptfs rotate would walk the files itself
    conf = (s.a.backing / "cryptfs.conf").read_bytes()
    for kind in ("wrap-key", "reencrypt"):
        res = rotate(s, kind)
        no_traceback(res)
        assert res.returncode == 2 and "is in use: mounted (on this or another server)" \
            in res.stderr, res.stderr
        assert "cryptfs: hint: rotate a mounted volume on a server where it is mounted" \
            in res.stderr
    assert (s.a.backing / "cryptfs.conf").read_bytes() == conf
    assert s.b.path("f").read_bytes() == b"kept"
    assert "clean" in fsck_clean(s)


# -- the presence file itself (a local volume) ----------------------------------------------------
def test_presence_file_is_made_by_init_and_by_a_mount_of_an_older_volume(tmp_path: Path) -> None:
    pf = tmp_path / "pass"
    pf.write_bytes(b"correct horse battery staple\n")
    backing = make_volume(tmp_path / "backing")
    p = backing / PRESENCE_NAME
    assert stat.S_ISREG(p.lstat().st_mode) and p.read_bytes() == b""
    p.unlink()  # a volume made before the presence file
    m = new_mount(tmp_path, backing, pf)
    m.start()
    try:
        write(m.path("x"), b"x")
        assert stat.S_ISREG(p.lstat().st_mode) and p.read_bytes() == b""
    finally:
        m.stop()
    res = run_cli("fsck", str(backing), "--passphrase-file", str(pf), check=False)
    assert res.returncode == 0 and "clean" in res.stdout, res.stdout + res.stderr


def test_a_presence_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    pf = tmp_path / "pass"
    pf.write_bytes(b"correct horse battery staple\n")
    backing = make_volume(tmp_path / "backing")
    (backing / PRESENCE_NAME).unlink()
    os.mkfifo(backing / PRESENCE_NAME)  # (opened without blocking: no hang)
    m = new_mount(tmp_path, backing, pf)
    m.mnt.mkdir()
    res = run_cli("mount", str(backing), str(m.mnt), "--passphrase-file", str(pf), check=False,
                  timeout=60)
    no_traceback(res)
    assert res.returncode == 5 and f"{PRESENCE_NAME} is not a regular file" in res.stderr, \
        res.stderr
    assert not os.path.ismount(m.mnt)


def test_an_unfinished_reencryption_is_not_resumed_while_the_other_server_is_mounted(
        servers: Servers) -> None:
    """The mount checks for itself when it is asked to walk: a re-encryption
    recorded as unfinished (begun here by the library, as a walk that failed
    would leave it) is not resumed while B is mounted, and no file changes."""
    from cryptfs import rotate as rot
    from cryptfs.secret import Secret
    from cryptfs.volume import open_volume

    s = servers
    expected = {f"f{i}": os.urandom(2 * BLOCK + i) for i in range(4)}
    for name, data in expected.items():
        write(s.b.path(name), data)
    vol = open_volume(str(s.a.backing), Secret(s.passfile.read_bytes().rstrip(b"\n")))
    try:
        assert rot.begin(vol, "reencrypt")
    finally:
        vol.close()
    before = headers(s.a.backing)
    for kind in ("reencrypt", "wrap-key"):
        res = rotate(s, kind)
        no_traceback(res)
        assert res.returncode == 2 and "resuming: the unfinished rotation" in res.stdout, \
            res.stdout + res.stderr
        assert "cannot re-encrypt: the volume is mounted elsewhere too" in res.stderr and \
            "stays recorded as unfinished" in res.stderr, res.stderr
    assert headers(s.a.backing) == before
    assert json.loads((s.a.backing / "cryptfs.conf").read_bytes())["rotation"]["kind"] == \
        "reencrypt"
    assert_reads(s, expected)
    s.b.stop()
    res = rotate(s, "reencrypt")
    assert res.returncode == 0 and "done" in res.stdout, res.stdout + res.stderr
    s.b.start("-o", "allow_other", "--shared-storage")
    assert_reads(s, expected)
    assert "clean" in fsck_clean(s)


HOLD = r'''
import errno, os, sys
try:
    os.setxattr(sys.argv[1], b"user.cryptfs.rotate", sys.argv[2].encode())
except OSError as e:
    print(errno.errorcode[e.errno])
else:
    print("held")
'''


def test_only_root_or_the_owner_may_hold_a_passphrase_mount_alone() -> None:
    """Holding the volume alone keeps every other server from mounting it; on a
    passphrase mount that others may use (allow_other), any user who reaches the
    mount could otherwise do that to every server."""
    users = ensure_users()
    root = shared_tempdir()
    pf = root / "pass"
    pf.write_bytes(b"correct horse battery staple\n")
    backing = make_volume(root / "backing")
    m = new_mount(root, backing, pf)
    m.start("-o", "allow_other", "--shared-storage")
    try:
        os.chmod(m.mnt, 0o777)  # (the kernel lets alice set a user xattr on it: cryptfs decides)
        pw = users["cfs-alice"]
        res = subprocess.run(["/usr/bin/python3", "-c", HOLD, str(m.mnt), "alone"],
                             user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                             capture_output=True, text=True, cwd="/", timeout=60)
        assert res.stdout.strip() == "EACCES", res.stdout + res.stderr
        # the hold was not taken: another mount of the volume still starts
        other = new_mount(root, backing, pf, "mnt2")
        other.start("--shared-storage")
        other.stop()
        # root (the mount's owner here) may
        control.hold_alone(str(m.mnt))
        res = run_cli("mount", str(backing), str(other.mnt), "--passphrase-file", str(pf),
                      "--shared-storage", check=False)
        assert res.returncode == 5 and "re-encrypts every file" in res.stderr, res.stderr
        # and only who may hold it may end the hold (any user who may write the root
        # could end a re-encryption's hold between its two steps)
        res = subprocess.run(["/usr/bin/python3", "-c", HOLD, str(m.mnt), "shared"],
                             user=pw.pw_uid, group=pw.pw_gid, extra_groups=[],
                             capture_output=True, text=True, cwd="/", timeout=60)
        assert res.stdout.strip() == "EACCES", res.stdout + res.stderr
        res = run_cli("mount", str(backing), str(other.mnt), "--passphrase-file", str(pf),
                      "--shared-storage", check=False)
        assert res.returncode == 5, res.stderr  # (still held)
        control.release_alone(str(m.mnt))
    finally:
        m.stop()
        shutil.rmtree(root, ignore_errors=True)
