"""Two servers, one volume: cryptfs on JuiceFS (redis + a local object directory).

One JuiceFS volume is mounted twice (tests/juicefs.py: two juicefs processes,
two caches); each "server" runs its own cryptfs mount (its own daemon,
``--shared-storage``) of the same backing directory.  What one server
writes and closes, the other must read byte for byte at its next open;
both working in one directory at once must lose nothing, and every name
must decrypt on both (docs/MULTISERVER.md, "Coherence").
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from juicefs import JuicePair, juicefs_pair

from conftest import PASSPHRASE, Mount, make_volume, new_mount, require_fuse, run_cli
from cryptfs import tree
from cryptfs.names import LONG_PREFIX, LONG_SUFFIX, long_name
from multiuser import ensure_users, shared_tempdir

BLOCK = 4096  # bytes of plaintext per cryptfs block


@pytest.fixture(scope="module")
def juice() -> Iterator[JuicePair]:
    yield from juicefs_pair()


@dataclass
class Servers:
    """Two cryptfs mounts (A on JuiceFS mount a, B on b) of one backing directory."""

    a: Mount
    b: Mount
    passfile: Path

    @property
    def backing_a(self) -> Path:
        return self.a.backing


_count = 0


def two_servers(juice: JuicePair, *extra: str) -> Iterator[Servers]:
    global _count
    _count += 1
    name = f"vol{_count}"
    work = shared_tempdir("cryptfs-ms-")
    pf = work / "passphrase"
    pf.write_bytes(PASSPHRASE + b"\n")
    pf.chmod(0o600)
    make_volume(juice.a.mnt / name)
    a = Mount(juice.a.mnt / name, work / "mnt-a", work / "a.log", work / "a.pid", pf)
    b = Mount(juice.b.mnt / name, work / "mnt-b", work / "b.log", work / "b.pid", pf)
    try:
        a.start("-o", "allow_other", *extra)
        b.start("-o", "allow_other", *extra)
        for m in (a, b):
            m.mnt.chmod(0o755)
        yield Servers(a, b, pf)
    finally:
        for m in (a, b):
            try:
                m.stop()
            except Exception:  # noqa: BLE001 - the other must still stop
                pass
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(juice.a.mnt / name, ignore_errors=True)  # (the pair serves the module)


@pytest.fixture
def servers(juice: JuicePair) -> Iterator[Servers]:
    yield from two_servers(juice, "--shared-storage")


def fsck_clean(s: Servers) -> str:
    s.a.stop()
    s.b.stop()
    res = run_cli("fsck", str(s.a.backing), "--passphrase-file", str(s.passfile), check=False)
    assert res.returncode == 0 and "clean" in res.stdout, res.stdout + res.stderr
    return res.stdout


def write(path: Path, data: bytes, sync: bool = False) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if sync:  # (acknowledged: on the storage before this returns)
            f.flush()
            os.fsync(f.fileno())


# -- coherence: what one server writes and closes, the other reads --------------------------
def test_write_close_then_read_on_the_other(servers: Servers) -> None:
    a, b = servers.a, servers.b
    first = os.urandom(5 * BLOCK + 123)
    write(a.path("f"), first)
    assert b.path("f").read_bytes() == first
    assert os.stat(b.path("f")).st_size == len(first)

    # overwrite in place (same size, one block in the middle), from B this time
    patch = os.urandom(BLOCK)
    with open(b.path("f"), "r+b") as f:
        f.seek(2 * BLOCK + 7)
        f.write(patch)
    second = first[:2 * BLOCK + 7] + patch + first[3 * BLOCK + 7:]
    assert a.path("f").read_bytes() == second

    # truncate (shorter, into a block), on A; B had the file cached before
    assert b.path("f").read_bytes() == second
    os.truncate(a.path("f"), BLOCK + 5)
    assert os.stat(b.path("f")).st_size == BLOCK + 5
    assert b.path("f").read_bytes() == second[:BLOCK + 5]

    # append, on A
    tail = os.urandom(3 * BLOCK + 9)
    with open(a.path("f"), "ab") as f:
        f.write(tail)
    assert b.path("f").read_bytes() == second[:BLOCK + 5] + tail

    # rename over: B has read the old file; A replaces it by another one
    fresh = os.urandom(BLOCK // 2)
    write(a.path("new"), fresh)
    os.rename(a.path("new"), a.path("f"))
    assert b.path("f").read_bytes() == fresh
    assert not b.path("new").exists()
    assert sorted(os.listdir(b.mnt)) == ["f"]

    # a file that B holds open keeps serving what it held; a new open sees A's file
    with open(b.path("f"), "rb") as held:
        assert held.read() == fresh
        write(a.path("g"), b"other")
        os.rename(a.path("g"), a.path("f"))
        assert b.path("f").read_bytes() == b"other"
    assert "clean" in fsck_clean(servers)


def test_a_file_still_open_on_one_server_opens_on_the_other(servers: Servers) -> None:
    """A new file's header is in the storage before its name: while A still
    has the file open (nothing closed, so its writes are A's storage client's
    alone), B opens it as an empty file, never as a header-less one (EIO)."""
    a, b = servers.a, servers.b
    body = os.urandom(2 * BLOCK + 5)
    for i in range(3):
        with open(a.path(f"new-{i}"), "wb") as f:
            assert b.path(f"new-{i}").read_bytes() == b""
            assert os.stat(b.path(f"new-{i}")).st_size == 0
            f.write(body)
        assert b.path(f"new-{i}").read_bytes() == body
    assert "integrity failure" not in a.log_text() + b.log_text()
    assert "clean" in fsck_clean(servers)


def test_without_shared_storage_the_other_serves_stale_data(juice: JuicePair) -> None:
    """Why the option exists: without it, B's kernel keeps the size and pages it
    cached (attribute timeout, keep_cache), and A's append stays invisible even
    once A has unmounted (which certainly committed it to JuiceFS)."""
    for s in two_servers(juice):
        write(s.a.path("f"), b"x" * 100)
        s.a.stop()  # (without --shared-storage a close on A commits nothing)
        s.a.start("-o", "allow_other")
        assert s.b.path("f").read_bytes() == b"x" * 100
        with open(s.a.path("f"), "ab") as f:
            f.write(b"y" * 100)
        s.a.stop()
        assert s.b.path("f").read_bytes() == b"x" * 100  # stale: the rule is needed


# -- both servers in one directory at once -------------------------------------------------
WORKER = r'''
import errno, json, os, sys, time
root, side, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.umask(0)  # (the other side's user creates in the fresh directories too)
go = os.path.join(root, "..", "go")
while not os.path.exists(go):
    time.sleep(0.005)
LONG = "L" * 170  # the encrypted name is longer than 255 bytes: a long-name side file
errors, won, kept = [], [], {}
def content(name):
    return (name * 3).encode()[:2000] + os.urandom(37).hex().encode()
def put(path, data):
    with open(path, "xb") as f:
        f.write(data)
def step(what, fn):
    try:
        return fn()
    except OSError as e:
        errors.append(f"{what}: {errno.errorcode.get(e.errno, e.errno)}")
for i in range(rounds):
    short, longn = f"{side}-s{i}", f"{side}-{LONG}{i}"
    for name in (short, longn):
        data = content(name)
        step("create " + name[:20], lambda: put(os.path.join(root, name), data))
        kept[name] = data
    # rename (a long name to a short one and back to another long one)
    if i % 3 == 1:
        a, b = longn, f"{side}-r{i}"
        step("rename", lambda: os.rename(os.path.join(root, a), os.path.join(root, b)))
        kept[b] = kept.pop(a)
        c = f"{side}-{LONG}r{i}"
        step("rename", lambda: os.rename(os.path.join(root, b), os.path.join(root, c)))
        kept[c] = kept.pop(b)
    # delete one made earlier
    if i % 3 == 2:
        gone = f"{side}-s{i - 1}"
        step("unlink", lambda: os.unlink(os.path.join(root, gone)))
        kept.pop(gone)
    # both sides create the same fresh directory (its name IV) and a file in it
    d = os.path.join(root, f"fresh-{i}")
    step("makedirs", lambda: os.makedirs(d, exist_ok=True))
    inner = os.path.join(f"fresh-{i}", f"{side}-{LONG}in")
    data = content(inner)
    step("create in fresh", lambda: put(os.path.join(root, inner), data))
    kept[inner] = data
    # both sides race for the same long name: one must win, the other see EEXIST
    contested = f"both-{LONG}{i}"
    try:
        put(os.path.join(root, contested), side.encode())
        won.append(contested)
    except FileExistsError:
        pass
    except OSError as e:
        errors.append(f"contest: {errno.errorcode.get(e.errno, e.errno)}")
    # both sides open the same new name with O_CREAT but no O_EXCL: both succeed
    touched = f"touch-{LONG}{i}"
    step("touch", lambda: open(os.path.join(root, touched), "ab").close())
    kept[touched] = b""
    # list and read everything, as the other side is changing it
    try:
        for n in os.listdir(root):
            p = os.path.join(root, n)
            if os.path.isfile(p):
                try:
                    open(p, "rb").read()
                except FileNotFoundError:
                    pass  # removed by the other side meanwhile
    except OSError as e:
        errors.append(f"list/read: {errno.errorcode.get(e.errno, e.errno)}")
print(json.dumps({"errors": errors, "won": won,
                  "kept": {k: v.decode() for k, v in kept.items()}}))
'''


def test_both_servers_create_rename_delete_in_one_directory(servers: Servers) -> None:
    users = ensure_users()
    a, b = servers.a, servers.b
    a.path("work").mkdir()
    os.chmod(a.path("work"), 0o777)
    assert b.path("work").is_dir()
    rounds = 12
    procs = []
    for side, mount, user in (("A", a, "cfs-alice"), ("B", b, "cfs-bob")):
        pw = users[user]
        procs.append(subprocess.Popen(
            ["/usr/bin/python3", "-c", WORKER, str(mount.path("work")), side, str(rounds)],
            user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd="/"))
    time.sleep(0.2)  # (both started: released at once)
    write(a.path("go"), b"")
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    for r in results:
        assert r["errors"] == [], r["errors"]

    expected = {**results[0]["kept"], **results[1]["kept"]}
    contested = {f"both-{'L' * 170}{i}" for i in range(rounds)}
    won = results[0]["won"] + results[1]["won"]
    assert sorted(won) == sorted(contested)  # each contested name: exactly one winner
    for r, side in zip(results, "AB", strict=True):
        for name in r["won"]:
            expected[name] = side
    for m in (a, b):
        found = {}
        for dirpath, _, files in os.walk(m.path("work")):
            for f in files:
                rel = os.path.relpath(os.path.join(dirpath, f), m.path("work"))
                found[rel] = Path(dirpath, f).read_text()
        assert found == expected, (set(found) ^ set(expected))
        assert sorted(n for n in os.listdir(m.path("work")) if n.startswith("fresh-")) == \
            sorted(f"fresh-{i}" for i in range(rounds))
    for m in (a, b):
        assert "ERROR" not in m.log_text() and "do not decrypt" not in m.log_text(), m.log_text()
    # long names really were used (side files next to the entries)
    work_backing = [p for p in a.backing.joinpath("tree").iterdir() if p.is_dir()]
    assert any(n.startswith(LONG_PREFIX) for d in work_backing for n in os.listdir(d))
    out = fsck_clean(servers)
    assert f"{len(expected) + 1} files" in out, out  # (and "go")


# -- faults --------------------------------------------------------------------------------------
READER = r'''
import sys, time
path, want = sys.argv[1], open(sys.argv[2], "rb").read()
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        with open(path, "rb") as f:
            got = f.read()
        print("ok" if got == want else "GARBAGE", flush=True)
    except OSError as e:
        print("error", e.errno, flush=True)
    time.sleep(0.05)
'''

WRITER = r'''
import os, sys
path, data = sys.argv[1], open(sys.argv[2], "rb").read()
try:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    print("synced", flush=True)
except OSError as e:
    print("error", e.errno, flush=True)
'''


def _py(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(["/usr/bin/python3", "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/")


def test_redis_down_requests_wait_or_fail_never_garbage(juice: JuicePair, servers: Servers,
                                                        tmp_path: Path) -> None:
    a, b = servers.a, servers.b
    known, synced, during = os.urandom(3 * BLOCK + 1), os.urandom(2 * BLOCK), os.urandom(BLOCK)
    write(a.path("known"), known)
    write(a.path("synced"), synced, sync=True)
    (tmp_path / "known").write_bytes(known)
    (tmp_path / "during").write_bytes(during)
    juice.redis.kill()  # (its append-only file holds what it acknowledged)
    try:
        reader = _py(READER, str(b.path("known")), str(tmp_path / "known"), "4")
        writer = _py(WRITER, str(a.path("during")), str(tmp_path / "during"))
        time.sleep(3)
    finally:
        juice.redis.start()
    r_out, r_err = reader.communicate(timeout=180)
    w_out, w_err = writer.communicate(timeout=180)
    lines = r_out.splitlines()
    assert lines and r_err == "", r_out + r_err
    assert all(x == "ok" or x.startswith("error ") for x in lines), r_out  # never GARBAGE
    assert w_out.split()[0] in ("synced", "error"), w_out + w_err
    # service resumes on both, with everything that was acknowledged
    for m in (a, b):
        assert m.path("known").read_bytes() == known
        assert m.path("synced").read_bytes() == synced
        if w_out.startswith("synced"):
            assert m.path("during").read_bytes() == during
    write(b.path("after"), b"back")
    assert a.path("after").read_bytes() == b"back"
    assert "clean" in fsck_clean(servers)


def test_a_long_redis_outage_fails_requests_with_an_error_and_service_resumes(
        juice: JuicePair, servers: Servers) -> None:
    """Longer than JuiceFS waits for its metadata engine (about 20 s here): the read
    fails with EIO (never other bytes), and everything acknowledged is there once
    Redis is back, on both servers."""
    a, b = servers.a, servers.b
    known = os.urandom(2 * BLOCK + 5)
    write(a.path("known"), known, sync=True)
    juice.redis.kill()
    try:
        res = subprocess.run(["/usr/bin/python3", "-c",
                              "import hashlib, sys\ntry:\n    d = open(sys.argv[1], 'rb').read()\n"
                              "except OSError as e:\n    print('error', e.errno)\n"
                              "else:\n    print('read', hashlib.sha256(d).hexdigest())",
                              str(b.path("known"))],
                             capture_output=True, text=True, timeout=180, cwd="/")
    finally:
        juice.redis.start()
    # an error, or (should JuiceFS still have it) the very bytes: never others
    assert res.stdout.split() in (["error", str(errno.EIO)],
                                  ["read", hashlib.sha256(known).hexdigest()]), \
        res.stdout + res.stderr
    for m in (a, b):
        assert m.path("known").read_bytes() == known
    write(b.path("after"), b"back")
    assert a.path("after").read_bytes() == b"back"
    assert "Traceback" not in a.log_text() + b.log_text()
    assert "clean" in fsck_clean(servers)


def test_one_juicefs_mount_killed_the_other_server_serves(juice: JuicePair,
                                                          servers: Servers) -> None:
    a, b = servers.a, servers.b
    data = os.urandom(2 * BLOCK + 3)
    write(a.path("f"), data)
    assert b.path("f").read_bytes() == data
    juice.a.kill()  # kill -9 of server A's juicefs process
    try:
        for cmd in (["cat", str(a.path("f"))], ["touch", str(a.path("new-on-a"))]):
            res = subprocess.run(cmd, capture_output=True, timeout=60)
            assert res.returncode != 0 and res.stdout == b"", res
            # ENOTCONN, or ECONNABORTED for a request the dying mount had in hand
            assert (b"Transport endpoint is not connected" in res.stderr
                    or b"Software caused connection abort" in res.stderr), res.stderr
        assert "Traceback" not in a.log_text()
        # A's cryptfs daemon answered with errors: it is alive and still mounted
        os.kill(a.pid, 0)
        mounted = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
        assert str(a.mnt) in mounted  # (os.path.ismount stats it: that fails now)
        # B is untouched: it reads and writes as before
        assert b.path("f").read_bytes() == data
        write(b.path("g"), b"written on B while A's storage is gone")
        assert b.path("g").read_bytes() == b"written on B while A's storage is gone"
    finally:
        a.stop()
        juice.a.stop()
        juice.a.start()
    a.start("-o", "allow_other", "--shared-storage")
    assert a.path("g").read_bytes() == b"written on B while A's storage is gone"
    assert a.path("f").read_bytes() == data
    assert "clean" in fsck_clean(servers)


def test_one_cryptfs_daemon_killed_the_other_serves(servers: Servers) -> None:
    a, b = servers.a, servers.b
    write(a.path("f"), b"before")
    a.kill()
    write(b.path("f"), b"after A's daemon died")
    assert b.path("f").read_bytes() == b"after A's daemon died"
    b.path("d").mkdir()
    write(b.path("d", "x"), b"x")
    a.start("-o", "allow_other", "--shared-storage")
    assert a.path("f").read_bytes() == b"after A's daemon died"
    assert a.path("d", "x").read_bytes() == b"x"
    assert "clean" in fsck_clean(servers)


def test_a_create_that_meets_another_servers_file_checks_its_mode() -> None:
    """The open that a create without O_EXCL becomes when another server made
    the name first: the kernel checked only the directory, cryptfs checks the file."""
    from cryptfs.fs.shared import check_open
    from cryptfs.fuse import FuseError

    st = os.stat_result((0o100640, 0, 0, 1, 1000, 1000, 0, 0, 0, 0))
    check_open(st, 1000, 1000, os.O_RDWR)  # owner: rw
    check_open(st, 2000, 1000, os.O_RDONLY)  # group: r
    check_open(st, 0, 0, os.O_RDWR)  # root
    for uid, gid, flags in ((2000, 1000, os.O_WRONLY), (2000, 1000, os.O_RDONLY | os.O_TRUNC),
                            (3000, 3000, os.O_RDONLY)):
        with pytest.raises(FuseError) as e:
            check_open(st, uid, gid, flags)
        assert e.value.errno == errno.EACCES


def test_a_long_names_side_file_missing_for_an_instant_is_waited_for(
        tmp_path: Path, backing: Path, passfile: Path) -> None:
    """A long name is two backing names (the entry, and its side file holding the whole
    encrypted name); another server making or removing the same name can leave the
    entry without its side file for an instant (it puts it back: tree.keep_long_name).
    A listing on shared storage waits for it rather than hide the name as damaged;
    a side file missing for good is still reported."""
    require_fuse()
    m = new_mount(tmp_path, backing, passfile)
    m.start("--shared-storage")
    try:
        name = "n" * 200
        write(m.path(name), b"kept")
        tree_dir = backing / "tree"
        side = next(p for p in tree_dir.iterdir() if p.name.endswith(LONG_SUFFIX))
        entry = tree_dir / side.name.removesuffix(LONG_SUFFIX)
        assert entry.name.startswith(LONG_PREFIX) and entry.exists()
        held = side.read_bytes()
        side.unlink()
        # another server's keep_long_name puts it back 30 ms later, atomically
        staged = tmp_path / "staged"
        staged.write_bytes(held)
        back = threading.Timer(0.03, os.rename, (staged, side))
        back.start()
        try:
            assert os.listdir(m.mnt) == [name]
        finally:
            back.join()
        assert m.path(name).read_bytes() == b"kept"
        assert "do not decrypt" not in m.log_text(), m.log_text()
        # gone for good: hidden, and said so
        side.unlink()
        assert os.listdir(m.mnt) == []
        assert "1 entries that do not decrypt are hidden" in m.log_text()
        side.write_bytes(held)
        assert os.listdir(m.mnt) == [name]
    finally:
        m.stop()


def test_a_failed_create_leaves_another_servers_side_file(tmp_path: Path) -> None:
    """The create that loses a race for a long name (EEXIST) removes the side file it
    wrote only if the entry is not there: the winner's entry needs that side file."""
    d = tmp_path / "dir"
    d.mkdir()
    c_name = "c" * 300
    backing = long_name(c_name)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert tree.write_long_name(fd, backing, c_name)  # written by the loser...
        (d / backing).write_bytes(b"")  # ...as the winner publishes the entry
        witness = tmp_path / "witness"  # (a second link: its inode cannot be reused)
        os.link(d / (backing + LONG_SUFFIX), witness)
        ino = witness.stat().st_ino
        tree.remove_long_name(fd, backing, c_name)  # the loser's EEXIST clean-up
        # never removed (not even put back after: the winner's listing would miss it)
        assert (d / (backing + LONG_SUFFIX)).stat().st_ino == ino
        assert (d / (backing + LONG_SUFFIX)).read_text() == c_name
        (d / backing).unlink()  # an unlink: the side file goes with the entry
        tree.remove_long_name(fd, backing, c_name)
        assert sorted(os.listdir(d)) == []
    finally:
        os.close(fd)
