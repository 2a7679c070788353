"""One shared (--agent) mount, many real users: each is served only while unlocked.

Users are real system users; their programs (cat, stat, ls, Debian's python3)
run with their uid; the agent and the mount are real processes.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_fuse, run_cli
from cryptfs.follow import BOUND
from cryptfs.secret import Secret
from cryptfs.users import user_fields
from cryptfs.volume import init_volume
from multiuser import (
    ROOT_PASSPHRASE,
    TEST_KDF,
    ScriptHolder,
    Shared,
    cli_as,
    ensure_user,
    passfile,
    run_as,
    shared_scenario,
    shared_setup,
)

CSV = b"surname,phone\nZhang,13800138000\nM\xc3\xbcller,+49 30 1234567\n"
DENIED = b"Permission denied"

# A program run as a user that keeps one file open and obeys commands on
# stdin: "read", "write", "close"; it answers each with one line.
HOLDER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
print("opened", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    try:
        if cmd == "read":
            print("read", os.pread(fd, 100, 0)[:13].decode(), flush=True)
        elif cmd == "write":
            os.pwrite(fd, b"X", 0)
            print("write ok", flush=True)
        elif cmd == "close":
            os.close(fd)
            print("closed", flush=True)
    except OSError as e:
        print(cmd, "errno", e.errno, flush=True)
"""


def Holder(user: str, path: Path) -> ScriptHolder:  # noqa: N802 - reads as the class it was
    return ScriptHolder(user, path, HOLDER)


def _root_writes(shared: Shared, name: str, data: bytes, mode: int = 0o644) -> Path:
    assert shared.unlock("root").returncode == 0
    p = shared.path(name)
    p.write_bytes(data)
    p.chmod(mode)
    return p


def _unlock(shared: Shared, user: str) -> None:
    res = shared.unlock(user)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("unlocked ")


def _lock(shared: Shared, user: str) -> None:
    res = shared.lock(user)
    assert res.returncode == 0, res.stderr


def _denied(res: subprocess.CompletedProcess[bytes]) -> bool:
    return res.returncode != 0 and DENIED in res.stderr and res.stdout == b""


def test_unlocked_user_reads_locked_user_is_denied(shared: Shared) -> None:
    _root_writes(shared, "customers.csv", CSV)
    _unlock(shared, "cfs-alice")
    a = run_as("cfs-alice", "cat", str(shared.path("customers.csv")))
    assert a.returncode == 0 and a.stdout == CSV
    f = str(shared.path("customers.csv"))
    assert _denied(run_as("cfs-bob", "cat", f))
    assert _denied(run_as("cfs-bob", "stat", f))
    assert _denied(run_as("cfs-bob", "ls", str(shared.mount.mnt)))
    assert _denied(run_as("cfs-bob", "cp", "/etc/hostname", str(shared.path("new"))))
    assert not (shared.mount.mnt / "new").exists()


def test_root_is_served_only_after_unlocking_too(shared: Shared) -> None:
    with pytest.raises(PermissionError):
        os.listdir(shared.mount.mnt)
    with pytest.raises(PermissionError):
        shared.path("x").write_bytes(b"x")
    _unlock(shared, "root")
    shared.path("x").write_bytes(b"x")
    assert os.listdir(shared.mount.mnt) == ["x"]
    # The mountpoint itself may be stat'ed by anyone (it tells nothing).
    assert run_as("cfs-bob", "stat", "-c", "%F", str(shared.mount.mnt)).stdout == b"directory\n"


def test_no_plaintext_reaches_a_locked_user_through_kernel_caches(shared: Shared) -> None:
    _root_writes(shared, "notes.txt", b"call notes: customer is moving to Shenzhen\n")
    os.mkdir(shared.path("calls"))
    os.chmod(shared.path("calls"), 0o755)
    _root_writes(shared, "calls/0001.txt", b"recording index 1\n")
    _unlock(shared, "cfs-alice")
    # Alice warms every cache the kernel has for these files: dentries,
    # attributes and (if there were one) the page cache.
    for _ in range(3):
        assert run_as("cfs-alice", "cat", str(shared.path("notes.txt"))).stdout.startswith(b"call")
        assert run_as("cfs-alice", "ls", "-l", str(shared.path("calls"))).returncode == 0
        assert run_as("cfs-alice", "cat", str(shared.path("calls", "0001.txt"))).returncode == 0
    # Bob, locked, right after: content, attributes, names are all refused.
    assert _denied(run_as("cfs-bob", "cat", str(shared.path("notes.txt"))))
    assert _denied(run_as("cfs-bob", "stat", str(shared.path("notes.txt"))))
    assert _denied(run_as("cfs-bob", "cat", str(shared.path("calls", "0001.txt"))))
    assert _denied(run_as("cfs-bob", "ls", str(shared.path("calls"))))
    assert run_as("cfs-bob", "test", "-e", str(shared.path("notes.txt"))).returncode != 0


def test_a_handle_opened_before_locking_gets_nothing_from_the_page_cache(shared: Shared) -> None:
    """Bob opens a file while unlocked, then locks.  His descriptor is refused;
    and while he holds it, nobody's read may bring the file's pages into the
    page cache (a mapping of his would show them): Alice is refused too,
    until Bob closes it or unlocks again."""
    ledger = _root_writes(shared, "ledger.csv", CSV, mode=0o666)
    _unlock(shared, "cfs-bob")
    _unlock(shared, "cfs-alice")
    bob = Holder("cfs-bob", ledger)
    try:
        assert bob.do("read") == "read surname,phone"
        _lock(shared, "cfs-bob")
        assert bob.do("read") == "read errno 13"
        assert bob.do("write") == "write errno 13"
        assert _denied(run_as("cfs-alice", "cat", str(ledger)))
        assert "still has it open" in shared.mount.log_text()
        _unlock(shared, "cfs-bob")  # the same descriptor works again, for both
        assert bob.do("read") == "read surname,phone"
        assert run_as("cfs-alice", "cat", str(ledger)).stdout == CSV
        _lock(shared, "cfs-bob")
        assert _denied(run_as("cfs-alice", "cat", str(ledger)))
        assert bob.do("close") == "closed"  # closing always works
        assert run_as("cfs-alice", "cat", str(ledger)).stdout == CSV
    finally:
        bob.end()
    # The write attempt while locked changed nothing.
    assert run_as("cfs-alice", "cat", str(ledger)).stdout == CSV


def test_unlock_and_lock_take_effect_at_once_and_leave_others_alone(shared: Shared) -> None:
    f = str(_root_writes(shared, "a.txt", b"alpha\n"))
    _unlock(shared, "cfs-alice")
    assert _denied(run_as("cfs-bob", "cat", f))
    _unlock(shared, "cfs-bob")
    assert run_as("cfs-bob", "cat", f).stdout == b"alpha\n"
    _lock(shared, "cfs-bob")
    assert _denied(run_as("cfs-bob", "cat", f))
    assert run_as("cfs-alice", "cat", f).stdout == b"alpha\n"
    _lock(shared, "cfs-alice")
    assert _denied(run_as("cfs-alice", "cat", f))
    assert "uid" in shared.mount.log_text() and "access revoked" in shared.mount.log_text()


def test_when_everyone_has_locked_the_mount_holds_no_key(shared: Shared) -> None:
    f = str(_root_writes(shared, "a.txt", b"alpha\n"))
    _unlock(shared, "cfs-alice")
    res = cli_as("root", "lock", env=shared.agent.env)
    assert res.returncode == 0 and "locked 1 session" in res.stdout
    assert run_as("cfs-alice", "cat", f).stdout == b"alpha\n"
    _lock(shared, "cfs-alice")
    shared.mount.wait_log("volume keys wiped")
    _unlock(shared, "cfs-carol")
    assert run_as("cfs-carol", "cat", f).stdout == b"alpha\n"


def test_new_files_belong_to_their_creator_and_permissions_still_apply(shared: Shared) -> None:
    _unlock(shared, "root")
    os.mkdir(shared.path("drop"))
    os.chmod(shared.path("drop"), 0o1777)
    _unlock(shared, "cfs-alice")
    _unlock(shared, "cfs-bob")
    mine = str(shared.path("drop", "alice-only.txt"))
    assert run_as("cfs-alice", "sh", "-c", f"umask 077; echo secret > {mine}").returncode == 0
    st = os.stat(mine)
    assert st.st_uid == _uid("cfs-alice") and st.st_mode & 0o777 == 0o600
    assert run_as("cfs-alice", "cat", mine).stdout == b"secret\n"
    # Bob is unlocked, but the file mode still says no.
    assert _denied(run_as("cfs-bob", "cat", mine))


def test_status_and_user_list_show_the_session(shared: Shared) -> None:
    _unlock(shared, "cfs-alice")
    res = cli_as("cfs-alice", "status", env=shared.agent.env)
    assert res.returncode == 0
    assert f"cfs-alice (uid {_uid('cfs-alice')}): {shared.backing}" in res.stdout
    assert "never locks when idle" in res.stdout
    assert cli_as("cfs-bob", "status", env=shared.agent.env).stdout == "no sessions\n"
    listing = run_cli("user", "list", str(shared.backing)).stdout
    alice = next(line for line in listing.splitlines() if " cfs-alice " in line)
    bob = next(line for line in listing.splitlines() if " cfs-bob " in line)
    assert alice.split()[3] == "agent" and not alice.endswith("never")
    assert bob.endswith("never")


def test_wrong_passphrase_is_refused_and_backs_off(shared: Shared, tmp_path: Path) -> None:
    wrong = shared.root / "pass" / "wrong"
    wrong.write_bytes(b"not alice's passphrase\n")
    wrong.chmod(0o644)
    res = shared.unlock("cfs-alice", wrong)
    assert res.returncode == 3 and "wrong passphrase" in res.stderr
    res = shared.unlock("cfs-alice", wrong)
    assert res.returncode in (3, 8)  # refused at once (backoff) or after the wait
    f = str(_root_writes(shared, "a.txt", b"alpha\n"))
    assert _denied(run_as("cfs-alice", "cat", f))
    assert "unlock failed: uid" in shared.agent.log_text()
    time.sleep(1.1)  # the test agent's backoff is at most 1 s
    _unlock(shared, "cfs-alice")
    assert run_as("cfs-alice", "cat", f).stdout == b"alpha\n"


def test_a_user_without_a_key_slot_cannot_unlock(shared: Shared) -> None:
    from multiuser import ensure_user, passfile

    ensure_user("cfs-mallory")
    pf = passfile(shared.root / "pass", "cfs-mallory", b"alice passphrase")
    res = cli_as("cfs-mallory", "unlock", str(shared.backing), "--passphrase-file", str(pf),
                 env=shared.agent.env)
    assert res.returncode == 8 and "cfs-mallory" in res.stderr and "no key slot" in res.stderr


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


# -- idle timeout ------------------------------------------------------------------------------
@pytest.fixture
def shared_idle() -> Iterator[Shared]:
    require_fuse()
    # 3 s: longer than the mount's 2 s activity reports, so use keeps a session open.
    yield from shared_setup(("--idle-timeout", "3", "--backoff", "0.2"))


def test_idle_sessions_lock_and_use_keeps_them_open(shared_idle: Shared) -> None:
    s = shared_idle
    f = str(_root_writes(s, "a.txt", b"alpha\n"))
    _unlock(s, "cfs-alice")
    _unlock(s, "cfs-bob")
    status = cli_as("cfs-alice", "status", env=s.agent.env).stdout
    assert "locks in" in status and "s if idle" in status
    # Alice keeps working for longer than the idle time; Bob does nothing.
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        assert run_as("cfs-alice", "cat", f).stdout == b"alpha\n"
        time.sleep(0.4)
    assert _denied(run_as("cfs-bob", "cat", f))
    assert "idle timeout" in s.agent.log_text()
    assert cli_as("cfs-bob", "status", env=s.agent.env).stdout == "no sessions\n"
    # Alice stops; her session ends too.
    time.sleep(3 + 2 + 1)  # idle time + one activity report interval + slack
    assert _denied(run_as("cfs-alice", "cat", f))


# -- the agent going away ------------------------------------------------------------------------
def test_agent_killed_mount_fails_closed_and_resumes_without_remount(shared: Shared) -> None:
    f = str(_root_writes(shared, "a.txt", b"alpha\n"))
    _unlock(shared, "cfs-alice")
    assert run_as("cfs-alice", "cat", f).stdout == b"alpha\n"
    mount_pid = int(shared.mount.pidfile.read_text())
    shared.agent.kill()
    shared.mount.wait_log("key agent unavailable")
    assert _denied(run_as("cfs-alice", "cat", f))
    assert "access denied to everyone" in shared.mount.log_text()
    # The agent comes back: its sessions died with it, so Alice unlocks again,
    # and the same mount (same daemon) serves her.
    shared.agent.start()
    shared.mount.wait_log("key agent connected", timeout=10, count=2)
    assert _denied(run_as("cfs-alice", "cat", f))
    _unlock(shared, "cfs-alice")
    assert run_as("cfs-alice", "cat", f).stdout == b"alpha\n"
    assert int(shared.mount.pidfile.read_text()) == mount_pid and os.path.ismount(shared.mount.mnt)


def test_agent_stopped_cleanly_locks_everyone(shared: Shared) -> None:
    f = str(_root_writes(shared, "a.txt", b"alpha\n"))
    _unlock(shared, "cfs-alice")
    assert shared.agent.stop(signal.SIGTERM) == 0
    assert "every session is locked" in shared.agent.log_text()
    shared.mount.wait_log("key agent unavailable")
    assert _denied(run_as("cfs-alice", "cat", f))
    res = cli_as("cfs-alice", "status", env=shared.agent.env)
    assert res.returncode == 8 and "no key agent is running" in res.stderr


def test_mount_started_before_the_agent_waits_for_it() -> None:
    require_fuse()
    with shared_scenario() as s:
        s.mount.stop()
        s.agent.stop()
        s.mount.start()  # no agent: the mount comes up, and denies everyone
        s.mount.wait_log("key agent unavailable (not running)")
        assert _denied(run_as("root", "ls", str(s.mount.mnt)))
        s.agent.start()
        s.mount.wait_log("key agent connected", count=2)  # (the first mount logged it once)
        _unlock(s, "root")
        assert os.listdir(s.mount.mnt) == []


def test_agent_mount_takes_no_passphrase(shared: Shared, tmp_path: Path) -> None:
    (tmp_path / "m2").mkdir()
    res = run_cli("mount", str(shared.backing), str(tmp_path / "m2"), "--agent",
                  "--passphrase-file", str(shared.passfiles["root"]), check=False)
    assert res.returncode == 2 and "take no passphrase" in res.stderr
    res = run_cli("mount", str(shared.backing), str(tmp_path / "m2"), "--agent-socket", "/x",
                  "--passphrase-file", str(shared.passfiles["root"]), check=False)
    assert res.returncode == 2 and "--agent-socket needs --agent" in res.stderr


MAPPER = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)
    print("shared ok", flush=True)
except OSError as e:
    print("shared errno", e.errno, flush=True)
m = mmap.mmap(fd, 0, mmap.MAP_PRIVATE, mmap.PROT_READ)
print("private", m[:4].decode(), flush=True)
sys.stdin.readline()
print("after lock", m[4096:4100].decode(), flush=True)
"""


MAP_AND_TOUCH = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
m = mmap.mmap(fd, 0, mmap.MAP_PRIVATE, mmap.PROT_READ)
print(m[:4].decode(), m[4096:4100].decode(), flush=True)
"""


def test_mapped_pages_are_withdrawn_at_lock(shared: Shared) -> None:
    """Direct I/O handles cannot be mapped shared (ENODEV); a private mapping
    works, and after a lock touching it again is refused (SIGBUS), because
    the lock drops the file's pages and the daemon refuses to refill them.
    Nor can another user's mapping refill them meanwhile: while the locked
    user holds the file, nobody's read of it is served."""
    _root_writes(shared, "m.bin", b"A" * 4096 + b"B" * 4096)
    _unlock(shared, "cfs-alice")
    _unlock(shared, "cfs-bob")
    mapper = subprocess.Popen(
        ["/usr/bin/python3", "-c", MAPPER, str(shared.path("m.bin"))], user="cfs-alice",
        group="cfs-alice", extra_groups=[], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        assert mapper.stdout is not None and mapper.stdin is not None
        assert mapper.stdout.readline().strip() == "shared errno 19"
        assert mapper.stdout.readline().strip() == "private AAAA"
        _lock(shared, "cfs-alice")
        # Bob maps the file and touches both pages: refused (SIGBUS), so no
        # page enters the cache for Alice's old mapping to show.
        bob = run_as("cfs-bob", "/usr/bin/python3", "-c", MAP_AND_TOUCH, str(shared.path("m.bin")))
        assert bob.returncode == -signal.SIGBUS and bob.stdout == b""
        assert _denied(run_as("cfs-bob", "cat", str(shared.path("m.bin"))))
        mapper.stdin.write("\n")
        mapper.stdin.flush()
        assert mapper.wait(10) == -signal.SIGBUS
        assert mapper.stdout.read() == ""
    finally:
        mapper.kill()
        mapper.wait()
    # Alice's mapping is gone (and with it her handle): Bob is served again.
    bob = run_as("cfs-bob", "/usr/bin/python3", "-c", MAP_AND_TOUCH, str(shared.path("m.bin")))
    assert bob.returncode == 0 and bob.stdout == b"AAAA BBBB\n"


def test_an_agent_that_stops_answering_is_treated_as_gone(shared: Shared) -> None:
    """SIGSTOP: the connection stays open but nothing answers.  The mount's
    ping goes unanswered, it denies everyone; after SIGCONT the sessions
    (still alive in the agent) are served again, without a remount."""
    f = str(_root_writes(shared, "a.txt", b"alpha\n"))
    _unlock(shared, "cfs-alice")
    assert run_as("cfs-alice", "cat", f).stdout == b"alpha\n"
    os.kill(shared.agent.pid, signal.SIGSTOP)
    try:
        shared.mount.wait_log("key agent unavailable (no answer in time)", timeout=15)
        assert _denied(run_as("cfs-alice", "cat", f))
    finally:
        os.kill(shared.agent.pid, signal.SIGCONT)
    shared.mount.wait_log("key agent connected", timeout=15, count=2)
    assert run_as("cfs-alice", "cat", f).stdout == b"alpha\n"


def test_a_new_volume_in_the_same_directory_serves_none_of_the_old_sessions(shared: Shared) -> None:
    """Alice unlocked volume 1; the admin re-creates the backing directory as
    volume 2 (only root has a slot) and mounts it: Alice gets nothing."""
    _unlock(shared, "cfs-alice")
    shared.mount.stop()
    shutil.rmtree(shared.backing)
    init_volume(str(shared.backing), "aes-256-gcm", Secret(ROOT_PASSPHRASE), TEST_KDF,
                user_fields("root", "admin")).close()
    shared.mount.start()
    _unlock(shared, "root")
    _root_writes(shared, "v2.txt", b"volume two\n")
    assert _denied(run_as("cfs-alice", "cat", str(shared.path("v2.txt"))))
    # Her old session names volume 1, which is gone: the agent ends it.
    deadline = time.monotonic() + 10
    while cli_as("cfs-alice", "status", env=shared.agent.env).stdout != "no sessions\n":
        assert time.monotonic() < deadline, shared.agent.log_text()
        time.sleep(0.2)
    assert "can no longer be read" in shared.agent.log_text() or \
        "config was replaced" in shared.agent.log_text()


def test_removing_a_user_ends_their_session(shared: Shared) -> None:
    f = str(_root_writes(shared, "a.txt", b"alpha\n"))
    _unlock(shared, "cfs-alice")
    assert run_as("cfs-alice", "cat", f).stdout == b"alpha\n"
    run_cli("user", "remove", str(shared.backing), "cfs-alice", "--passphrase-file",
            str(shared.passfiles["root"]))
    deadline = time.monotonic() + 10
    while run_as("cfs-alice", "cat", f).returncode == 0:
        assert time.monotonic() < deadline, "alice is still served after her removal"
        time.sleep(0.2)
    # (the mount refuses her as soon as it reads the config; the agent ends her
    # session at its own next look, within the documented bound)
    deadline = time.monotonic() + BOUND
    while "its key slot was removed" not in shared.agent.log_text():
        assert time.monotonic() < deadline, shared.agent.log_text()
        time.sleep(0.1)
    res = shared.unlock("cfs-alice")
    assert res.returncode == 8 and "no key slot" in res.stderr
    # Others are not affected.
    _unlock(shared, "cfs-bob")
    assert run_as("cfs-bob", "cat", f).stdout == b"alpha\n"


def test_a_user_added_while_mounted_is_served(shared: Shared, tmp_path: Path) -> None:
    f = str(_root_writes(shared, "a.txt", b"alpha\n"))
    ensure_user("cfs-dave")
    new = tmp_path / "dave.new"
    new.write_bytes(b"dave passphrase\n")
    run_cli("user", "add", str(shared.backing), "cfs-dave", "--passphrase-file",
            str(shared.passfiles["root"]), "--new-passphrase-file", str(new),
            "--kdf-memory", "8", "--kdf-iterations", "1")
    pf = passfile(shared.root / "pass", "cfs-dave", b"dave passphrase")
    res = cli_as("cfs-dave", "unlock", str(shared.mount.mnt), "--passphrase-file", str(pf),
                 env=shared.agent.env)
    assert res.returncode == 0, res.stderr
    assert run_as("cfs-dave", "cat", f).stdout == b"alpha\n"


def test_unlock_by_a_mountpoint_with_spaces_and_non_ascii() -> None:
    require_fuse()
    with shared_scenario() as s:
        s.mount.stop()
        s.mount.mnt = s.root / "Kunden Müller 客户"
        s.mount.start()
        res = s.unlock("cfs-alice")
        assert res.returncode == 0, res.stderr
        assert f"unlocked {s.backing}" in res.stdout


def test_a_passphrase_too_long_for_the_agent_is_a_clear_error(shared: Shared) -> None:
    big = shared.root / "pass" / "big"
    # (over the agent's 4096, under the 64 KiB a passphrase file's line may have)
    big.write_bytes(b"x" * 5000 + b"\n")
    big.chmod(0o644)
    res = shared.unlock("cfs-alice", big)
    assert res.returncode == 2 and "longer than 4096 bytes" in res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr


HOG = r"""
import socket, sys, time
socks = []
for _ in range(200):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    socks.append(s)
time.sleep(1)
busy = 0
for s in socks:
    s.setblocking(False)
    try:
        busy += b"too many connections" in s.recv(4096)
    except BlockingIOError:
        pass
print("busy", busy, flush=True)
time.sleep(60)
"""


def test_one_user_cannot_take_every_connection() -> None:
    """With room for 100 connections and 10 per user, Bob opening 200 gets
    "busy" for 190 of them, and Alice can still unlock and use the mount."""
    require_fuse()
    with shared_scenario(("--idle-timeout", "0", "--max-connections", "100",
                          "--max-per-user", "10")) as s:
        hog = subprocess.Popen(["/usr/bin/python3", "-c", HOG, str(s.agent.socket)],
                               user="cfs-bob", group="cfs-bob", extra_groups=[],
                               stdout=subprocess.PIPE, text=True)
        try:
            assert hog.stdout is not None and hog.stdout.readline().strip() == "busy 190"
            f = str(_root_writes(s, "a.txt", b"alpha\n"))
            _unlock(s, "cfs-alice")
            assert run_as("cfs-alice", "cat", f).stdout == b"alpha\n"
        finally:
            hog.kill()
            hog.wait()


def test_random_operations_on_a_shared_mount(shared: Shared, tmp_path: Path) -> None:
    """The shadow test of test_posix_shadow (random writes, truncates, holes,
    appends, direct and cached I/O against a reference file) on a gated mount,
    where every handle uses direct I/O and nothing is cached in the kernel."""
    from test_posix_shadow import STEPS, Pair, _compare, _run

    _unlock(shared, "root")
    ref = tmp_path / "reference.bin"
    pair = Pair(shared.path("shadow.bin"), ref)
    try:
        stats = _run(pair, random.Random("cryptfs-shadow-gated"), STEPS)
        size = os.fstat(pair.r).st_size
        _compare(pair, size, 0, size, True, STEPS, "final")
    finally:
        pair.close()
    for kind in ("pwrite", "truncate", "append", "hole", "read", "read-direct"):
        assert stats.get(kind, 0) >= 20, stats
    shared.path("shadow.bin").chmod(0o644)
    _unlock(shared, "cfs-carol")
    assert run_as("cfs-carol", "cat", str(shared.path("shadow.bin"))).stdout == ref.read_bytes()


def test_a_shared_mount_runs_no_programs(shared: Shared) -> None:
    _unlock(shared, "root")
    shutil.copy("/bin/true", shared.path("true"))
    os.chmod(shared.path("true"), 0o755)
    with pytest.raises(PermissionError):
        subprocess.run([str(shared.path("true"))], check=True)
    assert "noexec" in next(line for line in open("/proc/self/mountinfo")
                            if line.split()[4] == str(shared.mount.mnt))


def test_a_write_only_handle_blocks_no_one(shared: Shared) -> None:
    """Only a handle that could be mapped for reading holds others' reads back."""
    f = _root_writes(shared, "log.txt", b"line 1\n", mode=0o666)
    _unlock(shared, "cfs-bob")
    _unlock(shared, "cfs-alice")
    writer = subprocess.Popen(
        ["/usr/bin/python3", "-c", "import os, sys\nfd = os.open(sys.argv[1], os.O_WRONLY)\n"
         "print('open', flush=True)\nsys.stdin.readline()\n", str(f)],
        user="cfs-bob", group="cfs-bob", extra_groups=[], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "open"
        _lock(shared, "cfs-bob")
        assert run_as("cfs-alice", "cat", str(f)).stdout == b"line 1\n"
    finally:
        writer.kill()
        writer.wait()


def test_a_user_removed_while_their_unlock_runs_gets_no_session(shared: Shared) -> None:
    """Argon2id takes a while; if the user's slot is removed meanwhile, the
    unlock must not open a session from the config it read before."""
    from cryptfs.config import Kdf
    from cryptfs.users import add_user
    from cryptfs.volume import open_volume

    ensure_user("cfs-dave")
    vol = open_volume(str(shared.backing), Secret(ROOT_PASSPHRASE))
    try:  # a slow slot: 512 MiB x 8 passes, about a second here
        add_user(vol, "cfs-dave", "agent", Secret(b"dave passphrase"), Kdf(8, 512 * 1024))
    finally:
        vol.close()
    pf = passfile(shared.root / "pass", "cfs-dave", b"dave passphrase")
    from multiuser import AS_USER

    unlocking = subprocess.Popen(
        [sys.executable, AS_USER, "cfs-dave", "unlock", str(shared.backing), "--passphrase-file",
         str(pf)], env={**os.environ, **shared.agent.env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # the agent is in Argon2id now
    run_cli("user", "remove", str(shared.backing), "cfs-dave", "--passphrase-file",
            str(shared.passfiles["root"]))
    out, err = unlocking.communicate(timeout=60)
    assert unlocking.returncode == 8 and "no longer has a key slot" in err, (out, err)
    status = cli_as("root", "status", "--all", env=shared.agent.env)
    assert "cfs-dave" not in status.stdout
