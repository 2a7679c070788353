"""One shared (--agent) mount, many real users: each is served only while unlocked.

Users are real system users; their programs (cat, stat, ls, Debian's python3)
run with their uid; the agent and the mount are real processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import require_fuse, run_cli
from multiuser import Shared, cli_as, run_as, shared_setup

CSV = b"surname,phone\nZhang,13800138000\nM\xc3\xbcller,+49 30 1234567\n"
DENIED = b"Permission denied"

# A program run as a user that keeps one file open across a lock: it reads,
# reports, waits for a line on stdin, then tries to read and write again.
HOLDER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
print("first:", os.pread(fd, 100, 0)[:13].decode(), flush=True)
sys.stdin.readline()
for what, op in (("read", lambda: os.pread(fd, 100, 0)), ("write", lambda: os.pwrite(fd, b"X", 0))):
    try:
        op()
        print(what, "ok", flush=True)
    except OSError as e:
        print(what, "errno", e.errno, flush=True)
sys.stdin.readline()
try:
    print("after unlock:", os.pread(fd, 100, 0)[:13].decode(), flush=True)
except OSError as e:
    print("after unlock: errno", e.errno, flush=True)
os.close(fd)
print("closed", flush=True)
"""


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
    """Bob opens a file while unlocked, locks; Alice then reads the file (which
    would fill the page cache); Bob's old descriptor still gets EACCES."""
    _root_writes(shared, "ledger.csv", CSV, mode=0o666)
    _unlock(shared, "cfs-bob")
    _unlock(shared, "cfs-alice")
    holder = subprocess.Popen(
        ["/usr/bin/python3", "-c", HOLDER, str(shared.path("ledger.csv"))],
        user="cfs-bob", group="cfs-bob", extra_groups=[], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().startswith("first: surname,phone")
        _lock(shared, "cfs-bob")
        for _ in range(3):
            assert run_as("cfs-alice", "cat", str(shared.path("ledger.csv"))).stdout == CSV
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "read errno 13"
        assert holder.stdout.readline().strip() == "write errno 13"
        # Unlocking again makes the same descriptor work again.
        _unlock(shared, "cfs-bob")
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().startswith("after unlock: surname,phone")
        assert holder.stdout.readline().strip() == "closed"
        assert holder.wait(10) == 0
    finally:
        holder.kill()
        holder.wait()
    # The write attempt while locked changed nothing.
    assert run_as("cfs-alice", "cat", str(shared.path("ledger.csv"))).stdout == CSV


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


def test_mount_started_before_the_agent_waits_for_it(tmp_path: Path) -> None:
    require_fuse()
    gen = shared_setup()
    s = next(gen)
    try:
        s.mount.stop()
        s.agent.stop()
        s.mount.start()  # no agent: the mount comes up, and denies everyone
        s.mount.wait_log("key agent unavailable (not running)")
        assert _denied(run_as("root", "ls", str(s.mount.mnt)))
        s.agent.start()
        s.mount.wait_log("key agent connected")
        _unlock(s, "root")
        assert os.listdir(s.mount.mnt) == []
    finally:
        gen.close()


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


def test_mapped_pages_are_withdrawn_at_lock(shared: Shared) -> None:
    """Direct I/O handles cannot be mapped shared (ENODEV); a private mapping
    works, and after a lock touching it again is refused (SIGBUS), because
    the lock drops the file's pages and the daemon refuses to refill them."""
    _root_writes(shared, "m.bin", b"A" * 4096 + b"B" * 4096)
    _unlock(shared, "cfs-alice")
    mapper = subprocess.Popen(
        ["/usr/bin/python3", "-c", MAPPER, str(shared.path("m.bin"))], user="cfs-alice",
        group="cfs-alice", extra_groups=[], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        assert mapper.stdout is not None and mapper.stdin is not None
        assert mapper.stdout.readline().strip() == "shared errno 19"
        assert mapper.stdout.readline().strip() == "private AAAA"
        _lock(shared, "cfs-alice")
        shared.mount.wait_log("access revoked")
        mapper.stdin.write("\n")
        mapper.stdin.flush()
        assert mapper.wait(10) == -signal.SIGBUS
        assert mapper.stdout.read() == ""
    finally:
        mapper.kill()
        mapper.wait()


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
