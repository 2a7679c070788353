"""Administration reaches every server (issue 14; docs/MULTISERVER.md).

Two "servers" share one backing directory: each runs its own key agent
(own socket, own log) and its own shared ``--agent`` mount.  An admin change
made through server A (a user added, a policy set, a user revoked, a key
rotated) must take effect on B's running mount within ``follow.BOUND``
seconds, without a remount; a rotation run on A while B writes must leave
every file B wrote whole, on both servers, and fsck clean.

Where the shared storage comes from is the ``storage`` fixture:

- ``juicefs``: one JuiceFS volume in a private redis, mounted twice with
  separate caches (tests/juicefs.py; one pair serves the module), each
  server's cryptfs mount with ``--shared-storage`` on its own JuiceFS mount;
  each test works in a volume directory of its own and removes it;
- ``local``: one local directory, which B sees through a bind mount at its
  own path (where a scenario also runs there: the mounts then keep their
  caches, without ``--shared-storage``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
from juicefs import JuicePair, juicefs_pair

from conftest import Mount, require_fuse, run_cli
from cryptfs.config import config_lock, load_config
from cryptfs.follow import BOUND
from cryptfs.header import MAGIC
from cryptfs.modes.content import XCHACHA20_POLY1305
from cryptfs.secret import Secret
from cryptfs.users import add_user, user_fields
from cryptfs.volume import init_volume
from multiuser import (
    ROOT_PASSPHRASE,
    TEST_KDF,
    USERS,
    AgentProcess,
    SharedMount,
    cli_as,
    ensure_users,
    passfile,
    run_as,
    shared_tempdir,
)

pytestmark = [pytest.mark.mount, pytest.mark.serial]  # (bounds in seconds: alone)

ALICE, BOB, CAROL = "cfs-alice", "cfs-bob", "cfs-carol"
# What a loaded test machine adds to the documented bound (docs/MULTISERVER.md).
SLACK = 2.0  # seconds


# -- the shared storage -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def juice() -> Iterator[JuicePair]:
    yield from juicefs_pair()


_volumes = itertools.count(1)


@contextlib.contextmanager
def juicefs_backings(juice: JuicePair) -> Iterator[tuple[Path, Path]]:
    """One new backing directory on JuiceFS, as servers A and B name it
    (through JuiceFS mounts a and b); removed afterwards."""
    name = f"admin-vol{next(_volumes)}"
    a, b = juice.a.mnt / name, juice.b.mnt / name
    try:
        yield a, b
    finally:
        shutil.rmtree(a, ignore_errors=True)


@contextlib.contextmanager
def local_backings(root: Path) -> Iterator[tuple[Path, Path]]:
    """One local backing directory as servers A and B name it: the directory,
    and a bind mount of it at B's own path."""
    a, b = root / "storage-a", root / "storage-b"
    a.mkdir(mode=0o755)
    b.mkdir(mode=0o755)
    subprocess.run(["mount", "--bind", str(a), str(b)], check=True, capture_output=True)
    try:
        yield a / "volume", b / "volume"
    finally:
        subprocess.run(["umount", "-l", str(b)], capture_output=True)


@dataclass
class Storage:
    """Where both servers' backing directory comes from, and how they mount it."""

    name: str
    backings: Callable[[Path], AbstractContextManager[tuple[Path, Path]]]  # (work dir) -> (A's, B's)
    options: tuple[str, ...]  # cryptfs mount options this storage needs


@pytest.fixture
def storage(request: pytest.FixtureRequest) -> Storage:
    if request.param == "local":
        return Storage("local", local_backings, ())
    juice: JuicePair = request.getfixturevalue("juice")
    return Storage("juicefs", lambda _root: juicefs_backings(juice), ("--shared-storage",))


ON_BOTH = pytest.mark.parametrize("storage", ["juicefs", "local"], indirect=True)
ON_JUICEFS = pytest.mark.parametrize("storage", ["juicefs"], indirect=True)


# -- two servers ---------------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    agent: AgentProcess
    mount: SharedMount
    passfiles: dict[str, Path]

    def unlock(self, user: str) -> subprocess.CompletedProcess[str]:
        return cli_as(user, "unlock", str(self.mount.mnt), "--passphrase-file",
                      str(self.passfiles[user]), env=self.agent.env)

    def path(self, *parts: str) -> Path:
        return self.mount.mnt.joinpath(*parts)

    def logs(self) -> str:
        return self.agent.log_text() + self.mount.log_text()


def _make_volume(backing: Path, users: tuple[str, ...]) -> None:
    ensure_users()
    vol = init_volume(str(backing), "aes-256-gcm", Secret(ROOT_PASSPHRASE), TEST_KDF,
                      user_fields("root", "admin"))
    try:
        for name in users:
            role, secret = USERS[name]
            add_user(vol, name, role, Secret(secret), TEST_KDF)
    finally:
        vol.close()


@contextlib.contextmanager
def two_servers(storage: Storage, users: tuple[str, ...] = (ALICE, BOB)
                ) -> Iterator[tuple[Path, Server, Server]]:
    """A volume with root and ``users`` on the shared storage, served by A and B."""
    require_fuse()
    root = shared_tempdir("cryptfs-2srv-")
    servers: list[Server] = []
    try:
        with storage.backings(root) as (backing_a, backing_b):
            _make_volume(backing_a, users)
            (root / "pass").mkdir(mode=0o755)
            files = {n: passfile(root / "pass", n, s) for n, (_, s) in USERS.items()}
            files["root"] = passfile(root / "pass", "root", ROOT_PASSPHRASE)
            try:
                for name, backing in (("a", backing_a), ("b", backing_b)):
                    agent = AgentProcess(root / f"agent-{name}.sock", root / f"agent-{name}.log")
                    mount = SharedMount(backing, root / f"mnt-{name}", root / f"mount-{name}.log",
                                        root / f"mount-{name}.pid", agent=agent)
                    servers.append(Server(name, agent, mount, files))
                    agent.start("--idle-timeout", "0", "--backoff", "0.2", "--backoff-max", "1")
                    mount.start(*storage.options)
                yield root, servers[0], servers[1]
            finally:
                for s in servers:
                    try:
                        s.mount.stop()
                    finally:
                        s.agent.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _within(bound: float, what: str, ok: Callable[[], bool], logs: Callable[[], str]) -> float:
    """Seconds until ``ok()`` held; fails after ``bound`` (+ SLACK) seconds."""
    start = time.monotonic()
    while not ok():
        assert time.monotonic() - start < bound + SLACK, f"{what}: not within {bound} s\n{logs()}"
        time.sleep(0.1)
    return time.monotonic() - start


def _cat(user: str, path: Path, prog: str = "cat") -> subprocess.CompletedProcess[bytes]:
    return run_as(user, prog, str(path))


def _alice_works_on_both(a: Server, b: Server) -> None:
    """A shared directory "work" (made on ``a``), and alice unlocked on both servers."""
    _shared_dirs(a, "work")
    for s in (a, b):
        assert s.unlock(ALICE).returncode == 0, (s.name, s.logs())


def _write_synced_as(user: str, path: Path, data: bytes) -> None:
    """``data`` written to ``path`` by ``user`` and fsync'ed (acknowledged)."""
    res = run_as(user, "/usr/bin/python3", "-c",
                 "import os, sys\nwith open(sys.argv[1], 'wb') as f:\n"
                 "    f.write(sys.stdin.buffer.read())\n    f.flush()\n    os.fsync(f.fileno())\n",
                 str(path), input=data)
    assert res.returncode == 0, res.stderr


def _admin(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, check=False, timeout=180)


def _shared_dirs(s: Server, *names: str) -> None:
    """Sticky world-writable directories in the volume, made by root on ``s``
    (root stays unlocked there: the admin's session)."""
    assert s.unlock("root").returncode == 0
    for name in names:
        d = s.path(name)
        d.mkdir()
        d.chmod(0o1777)


# -- the tests ----------------------------------------------------------------------------------
@ON_JUICEFS
def test_users_added_revoked_and_policies_set_on_one_server_reach_the_other(
        storage: Storage) -> None:
    with two_servers(storage) as (root, a, b):
        _shared_dirs(a, "work", "calls")
        for s in (a, b):
            for u in (ALICE, BOB):
                r = s.unlock(u)
                assert r.returncode == 0, (s.name, u, r.stderr)
        body = b"written on server A by alice\n" * 300
        assert run_as(ALICE, "/bin/sh", "-c", f"cat > '{a.path('work', 'a.txt')}'",
                      input=body).returncode == 0
        on_b = b.path("work", "a.txt")
        assert _cat(BOB, on_b).stdout == body  # (the storage is shared)

        # A user added on A unlocks and reads on B.
        assert b.unlock(CAROL).returncode != 0  # (no slot yet: the test can fail)
        r = _admin("user", "add", str(a.mount.backing), CAROL, "--role", "supervisor",
                   "--passphrase-file", str(a.passfiles["root"]),
                   "--new-passphrase-file", str(a.passfiles[CAROL]))
        assert r.returncode == 0, r.stderr
        _within(BOUND, "carol unlocks on B", lambda: b.unlock(CAROL).returncode == 0, b.logs)
        assert _cat(CAROL, on_b).stdout == body

        # A policy set on A is enforced on B: only the trusted copy of cat may open /calls.
        bins = root / "bin"
        for who in ("trusted", "untrusted"):
            (bins / who).mkdir(parents=True, mode=0o755)
            shutil.copy("/bin/cat", bins / who / "cat")
        trusted, untrusted = str(bins / "trusted" / "cat"), str(bins / "untrusted" / "cat")
        rows = b"surname,phone\nWang,13812341234\n"
        assert run_as(ALICE, "/bin/sh", "-c", f"cat > '{b.path('calls', 'c.csv')}'",
                      input=rows).returncode == 0
        assert _cat(ALICE, b.path("calls", "c.csv"), untrusted).stdout == rows  # (before: any)
        r = _admin("policy", "set", str(a.mount.backing), "/calls", "--mode", "aes-256-gcm",
                   "--program", trusted, "--passphrase-file", str(a.passfiles["root"]))
        assert r.returncode == 0, r.stderr

        def refused_on_b() -> bool:
            got = _cat(ALICE, b.path("calls", "c.csv"), untrusted)
            return got.returncode != 0 and b"Permission denied" in got.stderr and not got.stdout

        _within(BOUND, "the policy on B", refused_on_b, b.logs)
        assert _cat(ALICE, b.path("calls", "c.csv"), trusted).stdout == rows
        assert not _cat(ALICE, a.path("calls", "c.csv"), untrusted).stdout  # (and on A)

        # Bob revoked on A (slot removed, key rotated): refused on both, at once or
        # within the bound; the others keep working on both.
        generation = load_config(str(a.mount.backing)).key_id
        r = _admin("user", "remove", str(a.mount.backing), BOB, "--revoke",
                   "--passphrase-file", str(a.passfiles["root"]))
        assert r.returncode == 0, r.stdout + r.stderr + a.logs()
        assert load_config(str(a.mount.backing)).key_id > generation
        for s in (a, b):
            p = s.path("work", "a.txt")
            _within(BOUND, f"bob refused on {s.name}",
                    lambda p=p: _cat(BOB, p).returncode != 0, s.logs)  # type: ignore[misc]
            got = _cat(BOB, p)
            assert b"Permission denied" in got.stderr and body[:20] not in got.stdout
            res = s.unlock(BOB)
            assert res.returncode == 8 and "no key slot" in res.stderr, res.stderr
        assert "not followed" not in a.logs() + b.logs()
        assert _cat(ALICE, a.path("work", "a.txt")).stdout == body, a.logs()
        for u in (ALICE, CAROL):
            assert _cat(u, on_b).stdout == body, (u, b.logs())
        assert "not followed" not in a.logs() + b.logs()


WRITER = r"""
import os, sys
d, stop = sys.argv[1], sys.argv[2]
n = 0
while not os.path.exists(stop):
    n += 1
    body = (f"b{n} ".encode()) * (1 + (n * 37) % 3000)
    p = os.path.join(d, f"b-{n}")
    try:
        with open(p, "wb") as f:
            f.write(body)
        with open(p, "rb") as f:
            if f.read() != body:
                print("BAD", p, flush=True)
    except OSError as e:
        print("ERR", e.errno, p, flush=True)
print("DONE", n, flush=True)
"""

CHECKER = r"""
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
names = sorted(os.listdir(d))
want = sorted(f"b-{i}" for i in range(1, n + 1))
if names != want:
    print("NAMES", len(names), len(want), flush=True)
for i in range(1, n + 1):
    body = (f"b{i} ".encode()) * (1 + (i * 37) % 3000)
    try:
        with open(os.path.join(d, f"b-{i}"), "rb") as f:
            if f.read() != body:
                print("BAD", i, flush=True)
    except OSError as e:
        print("ERR", e.errno, i, flush=True)
print("CHECKED", n, flush=True)
"""


@ON_JUICEFS
def test_a_rotation_on_one_server_leaves_what_the_other_writes_whole(storage: Storage) -> None:
    with two_servers(storage) as (root, a, b):
        _alice_works_on_both(a, b)
        stop = root / "stop"
        writer = subprocess.Popen(
            ["/usr/bin/python3", "-c", WRITER, str(b.path("work")), str(stop)],
            user=ALICE, group=ALICE, extra_groups=[], cwd="/",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        outs = []
        try:
            time.sleep(0.5)
            for kind in ("wrap-key", "slots", "wrap-key"):
                outs.append(_admin("rotate", str(a.mount.backing), f"--{kind}",
                                   "--passphrase-file", str(a.passfiles["root"])))
            time.sleep(BOUND)  # (B writes on under the newest generation a while)
        finally:
            stop.touch()
            out, err = writer.communicate(timeout=60)
        for r in outs:
            assert r.returncode == 0 and "done" in r.stdout, r.stdout + r.stderr + a.logs()
        assert err == "" and out.startswith("DONE "), (out, err, b.logs())
        n = int(out.split()[1])
        assert n > 20, out
        assert load_config(str(a.mount.backing)).key_id == 4
        logs = a.logs() + b.logs()
        assert "not followed" not in logs and "cannot be used" not in logs, logs

        def check(s: Server) -> None:  # every file B wrote, byte for byte, on server s
            got = run_as(ALICE, "/usr/bin/python3", "-c", CHECKER, str(s.path("work")), str(n),
                         timeout=120)
            assert got.stdout.decode() == f"CHECKED {n}\n", (s.name, got.stdout[:2000],
                                                             s.logs()[-3000:])

        check(a)
        check(b)
        a.mount.stop()
        b.mount.stop()
        res = run_cli("fsck", str(a.mount.backing), "--passphrase-file", str(a.passfiles["root"]))
        assert "clean" in res.stdout, res.stdout + res.stderr


@contextlib.contextmanager
def two_passphrase_mounts(storage: Storage, b_user: str | None = None
                          ) -> Iterator[tuple[Path, Mount, Mount]]:
    """A volume served by A and B as passphrase mounts (no agent): (root's
    passphrase file, A, B).  A is root's mount; so is B, unless ``b_user`` is
    given: then the volume has that user too, and B is unlocked with their
    passphrase."""
    require_fuse()
    root = shared_tempdir("cryptfs-2srv-")
    mounts: list[Mount] = []
    try:
        with storage.backings(root) as (backing_a, backing_b):
            try:
                _make_volume(backing_a, (b_user,) if b_user else ())
                pf = root / "root.pass"
                pf.write_bytes(ROOT_PASSPHRASE + b"\n")
                b_pf = pf
                if b_user is not None:
                    b_pf = root / f"{b_user}.pass"
                    b_pf.write_bytes(USERS[b_user][1] + b"\n")
                for name, backing, passes in (("a", backing_a, pf), ("b", backing_b, b_pf)):
                    m = Mount(backing, root / f"mnt-{name}", root / f"mount-{name}.log",
                              root / f"mount-{name}.pid", passes)
                    mounts.append(m)
                    m.start(*storage.options)
                yield pf, mounts[0], mounts[1]
            finally:
                for m in mounts:  # (before the volume directory goes)
                    m.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _fsck_clean(pf: Path, *mounts: Mount) -> None:
    for m in mounts:
        m.stop()
    res = run_cli("fsck", str(mounts[0].backing), "--passphrase-file", str(pf))
    assert "clean" in res.stdout, res.stdout + res.stderr


@ON_JUICEFS
def test_an_idle_server_follows_a_rotation_made_on_the_other(storage: Storage) -> None:
    """Nothing asks server B anything: its own timer reads the config (no
    agent here: two passphrase mounts, so nothing else tells it)."""
    with two_passphrase_mounts(storage) as (pf, a, b):
        a.path("before.txt").write_bytes(b"generation 1\n")
        r = _admin("rotate", str(a.backing), "--slots", "--passphrase-file", str(pf))
        assert r.returncode == 0, r.stdout + r.stderr + a.log_text()
        _within(BOUND, "B follows by itself",
                lambda: "rotated to generation 2: following" in b.log_text(), b.log_text)
        a.path("after.txt").write_bytes(b"generation 2\n")
        assert b.path("after.txt").read_bytes() == b"generation 2\n"
        assert b.path("before.txt").read_bytes() == b"generation 1\n"
        _fsck_clean(pf, a, b)


@ON_BOTH
def test_a_header_rewrapped_on_one_server_reads_on_the_other(storage: Storage) -> None:
    """A rotation's smallest form: B has read a file, a --wrap-key rotation on
    A re-wraps its header (and then forgets the old generation); B's next open
    must read the file's bytes.  On JuiceFS this needs the walk to move the
    file's mtime (JuiceFS tells a changed file by it: docs/MULTISERVER.md)."""
    with two_passphrase_mounts(storage) as (pf, a, b):
        body = bytes(range(256)) * 50
        a.path("f").write_bytes(body)
        assert b.path("f").read_bytes() == body  # (B's storage client has seen it)
        r = _admin("rotate", str(a.backing), "--wrap-key", "--passphrase-file", str(pf))
        assert r.returncode == 0 and "done" in r.stdout, r.stdout + r.stderr + a.log_text()
        assert load_config(str(b.backing)).key_id == 2
        assert a.path("f").read_bytes() == body
        # (an open on B looks at the config first: B holds the finished generation then)
        assert b.path("f").read_bytes() == body, b.log_text()
        _fsck_clean(pf, a, b)


@ON_JUICEFS
def test_admin_commands_on_both_servers_lose_no_change(storage: Storage) -> None:
    """Every config change is a read-modify-write under an exclusive flock of
    cryptfs.conf (config.config_lock), and the file is replaced by rename.
    The lock must hold across the servers' storage clients: while A holds it,
    B's command waits (and gives up after CONFIG_LOCK_WAIT); changes made on
    both at once are all kept, and both servers see all of them."""
    with two_passphrase_mounts(storage) as (pf, a, b):
        def policies(m: Mount) -> list[str]:
            shown = run_cli("policy", "show", str(m.backing), "--passphrase-file", str(pf)).stdout
            return sorted(line.split(":")[0] for line in shown.splitlines()
                          if line.startswith(("/a", "/b")))

        def set_rule(m: Mount, directory: str) -> subprocess.CompletedProcess[str]:
            return _admin("policy", "set", str(m.backing), directory, "--mode",
                          "xchacha20-poly1305", "--passphrase-file", str(pf))

        with config_lock(str(a.backing)):  # (as a command on A holds it)
            waited = set_rule(b, "/b-waited")
        assert waited.returncode != 0 and "Traceback" not in waited.stderr, waited.stderr
        assert "is being changed by another command" in waited.stderr, waited.stderr
        assert policies(a) == policies(b) == []

        results: dict[str, list[subprocess.CompletedProcess[str]]] = {"a": [], "b": []}

        def admin(name: str, m: Mount) -> None:
            for i in range(3):
                results[name].append(set_rule(m, f"/{name}{i}"))

        workers = [threading.Thread(target=admin, args=(name, m))
                   for name, m in (("a", a), ("b", b))]
        for w in workers:
            w.start()
        for w in workers:
            w.join(300)
        for r in results["a"] + results["b"]:
            assert r.returncode == 0, r.stdout + r.stderr
        want = [f"/{s}{i}" for s in "ab" for i in range(3)]
        assert policies(a) == policies(b) == want
        # and each running mount took them: a file made on B in a directory that a
        # rule set on A names is encrypted as that rule says
        b.path("a1").mkdir()
        b.path("a1", "f").write_bytes(b"ruled by a\n")
        assert a.path("a1", "f").read_bytes() == b"ruled by a\n"
        headers = [p.read_bytes()[:8] for p in a.backing.rglob("*")
                   if p.is_file() and p.read_bytes()[:6] == MAGIC]
        assert [h[7] for h in headers] == [XCHACHA20_POLY1305.mode_id]  # (the volume's: AES)
        _fsck_clean(pf, a, b)


@ON_JUICEFS
def test_redis_down_under_agent_mounts_never_serves_garbage_and_resumes(
        storage: Storage, juice: JuicePair) -> None:
    """The metadata engine stopped while users of both servers' shared mounts
    work: reads wait or fail, never return other bytes; what was fsync'ed stays;
    afterwards alice reads on both servers again (her sessions survive a short
    outage; if an agent's config check did not get an answer in time it ended
    them instead, logged so, and she unlocks again: fail closed)."""
    with two_servers(storage) as (root, a, b):
        _alice_works_on_both(a, b)
        body = b"".join(b"row %06d of a call record\n" % i for i in range(3000))
        _write_synced_as(ALICE, a.path("work", "synced"), body)
        assert _cat(ALICE, b.path("work", "synced")).stdout == body
        results: list[subprocess.CompletedProcess[bytes]] = []

        def read_on_b() -> None:
            results.append(run_as(ALICE, "cat", str(b.path("work", "synced")), timeout=120))

        juice.redis.kill()
        try:
            readers = [threading.Thread(target=read_on_b) for _ in range(3)]
            for t in readers:
                t.start()
                time.sleep(1)
        finally:
            juice.redis.start()
        for t in readers:
            t.join(timeout=150)
        assert len(results) == 3
        for r in results:  # the file, or an error: never other bytes
            assert (r.returncode == 0 and r.stdout == body) or (r.returncode != 0
                                                                and not r.stdout), r
        for s in (a, b):
            def reads(s: Server = s) -> bool:
                got = _cat(ALICE, s.path("work", "synced"))
                if got.returncode != 0 and "did not answer" in s.agent.log_text():
                    s.unlock(ALICE)  # (ended for want of an answer: unlock again)
                    got = _cat(ALICE, s.path("work", "synced"))
                return got.returncode == 0 and got.stdout == body

            _within(30, f"alice reads on {s.name} again", reads, s.logs)
        assert "Traceback" not in a.logs() + b.logs()


MAPPER = r'''
import mmap, os, sys, time
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
f.close()  # (the mapping keeps the file open)
assert m[:4] == b"call"
print("mapped", flush=True)
end = time.monotonic() + 60  # (a test that failed before saying "go" leaves no process)
while not os.path.exists(sys.argv[2]) and time.monotonic() < end:
    time.sleep(0.05)
print("read", bytes(m[8192:8202]), flush=True)
'''


@ON_BOTH
@pytest.mark.parametrize("revoke", [False, True], ids=["removed", "revoked"])
def test_a_passphrase_mount_whose_user_is_removed_on_the_other_server_stops(
        storage: Storage, revoke: bool) -> None:
    """Server B runs a passphrase mount unlocked with bob's passphrase; bob is
    removed on server A (the same key generation: B's key authenticates the new
    config), or revoked (a new generation that B cannot open).  Either way B
    stops serving within the bound, open files included; A serves on."""
    with two_passphrase_mounts(storage, BOB) as (pf, a, b):
        body = b"call notes\n" * 1000
        a.path("f").write_bytes(body)
        assert b.path("f").read_bytes() == body
        go = pf.parent / "go"
        mapper = subprocess.Popen(["/usr/bin/python3", "-c", MAPPER, str(b.path("f")),
                                   str(go)], stdout=subprocess.PIPE, text=True)
        assert mapper.stdout is not None and mapper.stdout.readline() == "mapped\n"
        with open(b.path("f"), "rb") as held:  # a file B has open meanwhile
            assert held.read(4) == b"call"
            r = _admin("user", "remove", str(a.backing), BOB, "--passphrase-file",
                       str(pf), *(["--revoke"] if revoke else []))
            assert r.returncode == 0, r.stdout + r.stderr
            _within(BOUND, "B stops serving",
                    lambda: "access revoked, nothing more is served" in b.log_text(),
                    b.log_text)
            time.sleep(2 * 1.0)  # (the watch drops the open file's pages next)
            with pytest.raises(PermissionError):
                os.pread(held.fileno(), 100, 0)
        # a mapping made before (its descriptor closed since): its pages were
        # dropped, and touching them faults to the daemon, which refuses (SIGBUS)
        go.touch()
        out, _ = mapper.communicate(timeout=30)
        assert mapper.returncode == -signal.SIGBUS and "read" not in out, out
        for what in (lambda: b.path("f").read_bytes(), lambda: os.listdir(b.mnt),
                     lambda: b.path("new").write_bytes(b"x")):
            with pytest.raises(PermissionError):
                what()
        assert a.path("f").read_bytes() == body  # A serves on
        assert not any(n == "new" for n in os.listdir(a.mnt))
        assert "Traceback" not in b.log_text() + a.log_text()


@ON_JUICEFS
def test_a_long_redis_outage_ends_agent_sessions_and_users_unlock_again(
        storage: Storage, juice: JuicePair) -> None:
    """Longer than the key agent gives a backing file system to answer (10 s): each
    server's agent ends the volume's sessions (fail closed: it cannot tell whether
    the config changed meanwhile), its mount refuses alice afterwards, and once
    Redis is back she unlocks again and reads what was fsync'ed."""
    with two_servers(storage) as (root, a, b):
        _alice_works_on_both(a, b)
        body = b"".join(b"line %05d of a call transcript\n" % i for i in range(2000))
        _write_synced_as(ALICE, a.path("work", "kept"), body)
        juice.redis.kill()
        try:
            for s in (a, b):
                _within(15, f"{s.name}'s agent gives up on the storage",
                        lambda s=s: "did not answer in 10 s" in s.agent.log_text(), s.logs)
        finally:
            juice.redis.start()
        for s in (a, b):
            def locked(s: Server = s) -> bool:
                got = _cat(ALICE, s.path("work", "kept"))
                assert got.stdout in (b"", body), got  # (never other bytes)
                return got.returncode != 0 and b"Permission denied" in got.stderr
            _within(60, f"alice refused on {s.name} once it answers again", locked, s.logs)
            assert s.unlock(ALICE).returncode == 0
            assert _cat(ALICE, s.path("work", "kept")).stdout == body
        assert "Traceback" not in a.logs() + b.logs()
