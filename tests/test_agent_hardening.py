"""The agent hardens itself: no core dumps, and no other process of its uid can
ptrace it or read its memory or environment.

To show that PR_SET_DUMPABLE 0 took effect, the agent runs as the unprivileged
user cfs-bob, and a process of cfs-bob tries to look into it.  The test
interpreter lives where cfs-bob cannot reach it, so a small launcher starts as
root, imports the daemon, drops to cfs-bob for good, and only then runs the
agent's ``main()``.  A uid change itself makes a process non-dumpable, so the
launcher first restores the state of a process cfs-bob would have started with
execve (dumpable, core dumps allowed).  A *control* process goes through the
very same launcher but does not start the agent: the same probes must succeed
against it, or the test proves nothing.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cryptfs.keyagent import protocol as p
from multiuser import AgentProcess, connectable, ensure_users, run_as, shared_tempdir

LAUNCHER = r"""
import ctypes, os, pwd, resource, sys, time

import cryptfs.keyagent.daemon as daemon

user, mode = pwd.getpwnam(sys.argv[1]), sys.argv[2]
resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
os.setgroups([])
os.setgid(user.pw_gid)
os.setuid(user.pw_uid)
assert os.getresuid() == (user.pw_uid,) * 3 and os.getresgid() == (user.pw_gid,) * 3
libc = ctypes.CDLL(None, use_errno=True)
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
if libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0 or libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 1:
    raise SystemExit("cannot make the launcher dumpable again")
print("ready", flush=True)
if mode == "agent":
    sys.argv = ["cryptfs-agent", *sys.argv[3:]]
    daemon.main()
else:
    time.sleep(300)
"""

# Runs as cfs-bob under the system interpreter (which every user can execute).
PROBE = r"""
import ctypes, json, os, sys

pid = int(sys.argv[1])
out = {}


def attempt(name, fn):
    try:
        out[name] = ["ok", fn()]
    except OSError as e:
        out[name] = ["error", e.errno]


def environ():
    with open(f"/proc/{pid}/environ", "rb") as f:
        return f.read().decode("latin-1")


def mem():
    with open(f"/proc/{pid}/maps") as f:
        first = next(line for line in f if line.split()[1].startswith("r"))
    start = int(first.split("-")[0], 16)
    with open(f"/proc/{pid}/mem", "rb") as m:
        m.seek(start)
        return len(m.read(16))


attempt("environ", environ)
attempt("mem", mem)
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long
PTRACE_ATTACH, PTRACE_DETACH, WALL = 16, 17, 0x40000000
if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
    os.waitpid(pid, WALL)
    libc.ptrace(PTRACE_DETACH, pid, None, None)
    out["ptrace"] = ["ok", 0]
else:
    out["ptrace"] = ["error", ctypes.get_errno()]
out["me"] = os.getuid()
print(json.dumps(out))
"""

EACCES, EPERM = 13, 1


@dataclass
class Launched:
    proc: subprocess.Popen[str]
    marker: str

    @property
    def pid(self) -> int:
        return self.proc.pid


def launch(user: str, mode: str, *args: str) -> Launched:
    marker = "cryptfs-hardening-" + secrets.token_hex(8)
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, user, mode, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
                            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C",
                                 "CRYPTFS_TEST_MARKER": marker})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != "ready\n":
        proc.kill()
        raise AssertionError(f"launcher failed: {line}{proc.communicate()[1]}")
    return Launched(proc, marker)


def stop(p_: Launched) -> int | None:
    if p_.proc.poll() is None:
        p_.proc.send_signal(signal.SIGTERM)
        try:
            p_.proc.wait(10)
        except subprocess.TimeoutExpired:
            p_.proc.kill()
            p_.proc.wait(10)
    p_.proc.communicate()
    return p_.proc.returncode


@dataclass
class BobAgent:
    agent: Launched
    control: Launched
    socket: Path
    log: Path


@pytest.fixture(scope="module")
def bob() -> pwd.struct_passwd:
    return ensure_users()["cfs-bob"]


@pytest.fixture(scope="module")
def bob_agent(bob: pwd.struct_passwd) -> Iterator[BobAgent]:
    """An agent running as cfs-bob, and a control process of cfs-bob from the same launcher."""
    root = shared_tempdir("cryptfs-hardening-")
    run = root / "run"
    run.mkdir(mode=0o700)
    os.chown(run, bob.pw_uid, bob.pw_gid)
    sock, log = run / "agent.sock", run / "agent.log"
    agent = control = None
    try:
        agent = launch("cfs-bob", "agent", "--socket", str(sock), "--log-file", str(log),
                       "--idle-timeout", "0")
        deadline = time.monotonic() + 15
        while not connectable(sock):
            assert agent.proc.poll() is None, agent.proc.communicate()
            assert time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.02)
        control = launch("cfs-bob", "control")
        yield BobAgent(agent, control, sock, log)
    finally:
        codes = [stop(x) for x in (control, agent) if x is not None]
        shutil.rmtree(root, ignore_errors=True)
    if agent is not None:
        assert codes[-1] == 0, "the agent as cfs-bob did not stop cleanly"


def probe(user: str, pid: int) -> dict[str, Any]:
    res = run_as(user, "/usr/bin/python3", "-c", PROBE, str(pid))
    assert res.returncode == 0, res.stderr.decode()
    out: dict[str, Any] = json.loads(res.stdout)
    assert out["me"] == pwd.getpwnam(user).pw_uid
    return out


def ping(sock: Path) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(str(sock))
        s.sendall(p.encode({"op": "ping"}))
        head = s.recv(4)
        n = p.frame_length(head)
        body = b""
        while len(body) < n:
            chunk = s.recv(n - len(body))
            assert chunk
            body += chunk
        return p.decode(body[0], body[1:])
    finally:
        s.close()


def status_field(pid: int, name: str) -> list[str]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split()[1:]
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def core_limit(pid: int) -> tuple[str, str]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max core file size"):
                soft, hard = line[len("Max core file size"):].split()[:2]
                return soft, hard
    raise AssertionError("no core limit line")


# -- tests ------------------------------------------------------------------------------------

def test_the_agent_runs_as_bob_and_serves(bob_agent: BobAgent, bob: pwd.struct_passwd) -> None:
    for pid in (bob_agent.agent.pid, bob_agent.control.pid):
        assert status_field(pid, "Uid") == [str(bob.pw_uid)] * 4
        assert status_field(pid, "Gid") == [str(bob.pw_gid)] * 4
        assert status_field(pid, "CapEff") == ["0000000000000000"]
    assert ping(bob_agent.socket)["message"] == "pong"
    log = bob_agent.log.read_text()
    assert "agent ready" in log
    assert "hardening:" not in log  # nothing it could not do


def test_core_dumps_are_disabled(bob_agent: BobAgent) -> None:
    # Both processes came from the same launcher with unlimited core dumps ...
    assert core_limit(bob_agent.control.pid) == ("unlimited", "unlimited")
    # ... the agent lowered soft and hard limit to 0, so it cannot raise them again.
    assert core_limit(bob_agent.agent.pid) == ("0", "0")


def test_core_dumps_are_disabled_in_a_root_agent() -> None:
    d = shared_tempdir("cryptfs-hardening-")
    agent = AgentProcess(d / "agent.sock", d / "agent.log")
    try:
        assert core_limit(os.getpid())[1] == "unlimited"  # what the agent inherits
        agent.start("--idle-timeout", "0")
        assert core_limit(agent.pid) == ("0", "0")
        # Non-dumpable: its /proc files belong to root:root whatever its uid (here root).
        st = os.stat(f"/proc/{agent.pid}/environ")
        assert (st.st_uid, st.st_gid) == (0, 0)
    finally:
        assert agent.stop() == 0
        shutil.rmtree(d, ignore_errors=True)


def test_proc_files_of_the_agent_belong_to_root(bob_agent: BobAgent,
                                                bob: pwd.struct_passwd) -> None:
    """A non-dumpable task's /proc files are owned by root (the kernel's task_dump_owner)."""
    for name in ("environ", "mem", "maps", "fd"):
        st = os.stat(f"/proc/{bob_agent.agent.pid}/{name}")
        assert (st.st_uid, st.st_gid) == (0, 0), name
        st = os.stat(f"/proc/{bob_agent.control.pid}/{name}")
        assert (st.st_uid, st.st_gid) == (bob.pw_uid, bob.pw_gid), name


def test_same_uid_cannot_look_into_the_agent(bob_agent: BobAgent) -> None:
    control = probe("cfs-bob", bob_agent.control.pid)
    # The probe works against an ordinary process of cfs-bob ...
    assert control["environ"][0] == "ok"
    assert f"CRYPTFS_TEST_MARKER={bob_agent.control.marker}" in control["environ"][1]
    assert control["mem"] == ["ok", 16]
    assert control["ptrace"] == ["ok", 0]
    # ... and fails against the agent, a process of the same uid.
    agent = probe("cfs-bob", bob_agent.agent.pid)
    assert agent["environ"] == ["error", EACCES]
    assert agent["mem"] == ["error", EACCES]
    assert agent["ptrace"] == ["error", EPERM]
    # The agent was not disturbed by any of it.
    assert bob_agent.agent.proc.poll() is None
    assert ping(bob_agent.socket)["message"] == "pong"


def test_an_exec_started_process_of_bob_is_open_to_bob(bob: pwd.struct_passwd) -> None:
    """The environment does not forbid same-uid access in general (no hidepid, no Yama
    restriction): a plain `sleep` cfs-bob started is readable and traceable by cfs-bob."""
    marker = "cryptfs-sleep-" + secrets.token_hex(6)
    sleeper = subprocess.Popen(["/bin/sleep", "60"], user=bob.pw_uid, group=bob.pw_gid,
                               extra_groups=[], cwd="/",
                               env={"PATH": "/usr/bin:/bin", "CRYPTFS_TEST_MARKER": marker})
    try:
        out = probe("cfs-bob", sleeper.pid)
        assert out["environ"][0] == "ok" and marker in out["environ"][1]
        assert out["mem"] == ["ok", 16] and out["ptrace"] == ["ok", 0]
        # Another unprivileged user may not, dumpable or not.
        other = probe("cfs-alice", sleeper.pid)
        assert other["environ"][0] == "error" and other["ptrace"] == ["error", EPERM]
    finally:
        sleeper.kill()
        sleeper.wait()
