"""The key agent as a real process: bad clients, many clients, real users, backoff, shutdown.

Every test starts its own ``cryptfs-agent`` (tests/multiuser.py's AgentProcess)
on a socket of its own.  Clients are raw sockets (in this process as root, or
in a small child that drops to a test user's uid first, so the agent's
SO_PEERCRED check sees that user), ``AgentClient``, or the command line run as
a user (``cli_as``).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cryptfs.config import Kdf
from cryptfs.keyagent import protocol as p
from cryptfs.keyagent.client import AgentClient, AgentError
from cryptfs.secret import Secret
from cryptfs.users import user_fields
from cryptfs.volume import init_volume
from multiuser import (
    ROOT_PASSPHRASE,
    USERS,
    AgentProcess,
    cli_as,
    ensure_users,
    make_shared_volume,
    passfile,
    run_as,
    shared_tempdir,
)

TEST_KDF = Kdf(ops=1, mem_kib=8 * 1024)
PASS = {name: secret for name, (_, secret) in USERS.items()}
PASS["root"] = ROOT_PASSPHRASE

# -- clients ---------------------------------------------------------------------------------

# Runs as root under the test interpreter (which other users cannot reach), has
# imported all it needs, then drops to the user for good: the agent sees the
# user's uid through SO_PEERCRED.  Requests come as JSON on stdin, replies
# (the raw frames) go to stdout as JSON.
RAW_CLIENT = r"""
import json, os, pwd, socket, struct, sys, threading

user = pwd.getpwnam(sys.argv[1])
path, parallel = sys.argv[2], sys.argv[3] == "parallel"
reqs = json.loads(sys.stdin.read())
os.setgroups([])
os.setgid(user.pw_gid)
os.setuid(user.pw_uid)
assert os.getuid() == os.geteuid() == user.pw_uid


def exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def one(r, barrier=None):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(r.get("timeout", 20))
    try:
        s.connect(path)
        body = json.dumps(r["msg"]).encode()
        data = struct.pack(">IB", len(body) + 1, 1) + body
        if r.get("secret") is not None:
            secret = bytes.fromhex(r["secret"])
            data += struct.pack(">IB", len(secret) + 1, 2) + secret
        if barrier is not None:
            barrier.wait()
        s.sendall(data)
        frames = []
        for _ in range(r.get("frames", 1)):
            head = exact(s, 4)
            if head is None:
                break
            rest = exact(s, struct.unpack(">I", head)[0])
            if rest is None:
                break
            frames.append([rest[0], rest[1:].hex()])
        return frames
    except OSError as e:
        return {"error": repr(e)}
    finally:
        s.close()


if parallel:
    out = [None] * len(reqs)
    barrier = threading.Barrier(len(reqs))

    def run(i):
        out[i] = one(reqs[i], barrier)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
else:
    out = [one(r) for r in reqs]
print(json.dumps(out))
"""


@dataclass
class Req:
    msg: dict[str, Any]
    secret: bytes | None = None
    frames: int = 1
    timeout: float = 20

    def to_json(self) -> dict[str, Any]:
        msg = {"v": p.VERSION, **self.msg}
        if self.secret is not None:
            msg["secret"] = True
        return {"msg": msg, "secret": None if self.secret is None else self.secret.hex(),
                "frames": self.frames, "timeout": self.timeout}


def as_user(user: str, agent: AgentProcess, *reqs: Req, parallel: bool = False
            ) -> list[list[tuple[int, bytes]]]:
    """Send each request on its own connection as ``user``; the frames of each reply."""
    res = subprocess.run([sys.executable, "-c", RAW_CLIENT, user, str(agent.socket),
                          "parallel" if parallel else "serial"],
                         input=json.dumps([r.to_json() for r in reqs]), capture_output=True,
                         text=True, timeout=60, cwd="/")
    assert res.returncode == 0, res.stderr
    out = []
    for frames in json.loads(res.stdout):
        assert isinstance(frames, list), f"client failed: {frames}"
        out.append([(kind, bytes.fromhex(body)) for kind, body in frames])
    return out


def decoded(frames: list[tuple[int, bytes]]) -> dict[str, Any]:
    assert frames, "no reply: the agent closed the connection"
    kind, body = frames[0]
    return p.decode(kind, body)


def user_request(user: str, agent: AgentProcess, msg: dict[str, Any],
                 secret: bytes | None = None) -> dict[str, Any]:
    return decoded(as_user(user, agent, Req(msg, secret))[0])


def connect(agent: AgentProcess, timeout: float = 5) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(agent.socket))
    return s


def connect_patiently(agent: AgentProcess, timeout: float = 10) -> socket.socket:
    """Connect, waiting while the listen backlog is full (a Unix socket with a timeout
    answers EAGAIN then, instead of blocking)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return connect(agent, timeout)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _exact(s: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            chunk = s.recv(n - len(buf))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


def recv_frame(s: socket.socket) -> tuple[int, bytes] | None:
    """One frame, or None at end of stream."""
    head = _exact(s, 4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    assert 1 <= n <= p.MAX_FRAME, f"agent sent a bad frame length {n}"
    rest = _exact(s, n)
    assert rest is not None, "agent closed the connection in the middle of a frame"
    return rest[0], rest[1:]


def recv_reply(s: socket.socket) -> dict[str, Any]:
    f = recv_frame(s)
    assert f is not None, "no reply: the agent closed the connection"
    msg = p.decode(*f)
    assert {"ok", "code", "message"} <= msg.keys(), msg
    return msg


def send(s: socket.socket, msg: dict[str, Any], secret: bytes | None = None) -> None:
    data = p.encode({**msg, "secret": True} if secret is not None else msg)
    if secret is not None:
        data += p.frame(p.FRAME_SECRET, secret)
    s.sendall(data)


def request(agent: AgentProcess, msg: dict[str, Any], secret: bytes | None = None
            ) -> dict[str, Any]:
    with connect(agent) as s:
        send(s, msg, secret)
        return recv_reply(s)


def assert_closed(s: socket.socket) -> None:
    """The agent closed this connection (end of stream, nothing more)."""
    assert _exact(s, 1) is None, "the agent kept the connection open"


def raw_reply(agent: AgentProcess, data: bytes) -> tuple[dict[str, Any], bool]:
    """Send raw bytes; the reply and whether the agent closed the connection after it."""
    with connect(agent) as s:
        s.sendall(data)
        reply = recv_reply(s)
        return reply, _exact(s, 1) is None


def msg_frame(body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, p.FRAME_MESSAGE) + body


def assert_healthy(agent: AgentProcess) -> None:
    """Alive, answering, and nothing ever went wrong inside it."""
    assert agent.proc is not None and agent.proc.poll() is None, agent.log_text()
    pong = request(agent, {"op": "ping"})
    assert pong["ok"] and pong["message"] == "pong" and pong["version"] == 1
    log = agent.log_text()
    assert "Traceback" not in log and "internal error" not in log, log


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(cond: Callable[[], bool], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def users() -> dict[str, Any]:
    u: dict[str, Any] = dict(ensure_users())
    u["root"] = None
    return u


def uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


@dataclass
class Vol:
    root: Path
    backing: Path
    passfiles: dict[str, Path]

    def wrong_passfile(self, user: str) -> Path:
        d = self.root / "wrong"
        d.mkdir(mode=0o755, exist_ok=True)
        return passfile(d, user, b"not the passphrase of " + user.encode())


@pytest.fixture(scope="module")
def vol(users: dict[str, Any]) -> Iterator[Vol]:
    """One shared volume (slots: root, cfs-alice, cfs-bob, cfs-carol) and passphrase files."""
    root = shared_tempdir("cryptfs-agent-vol-")
    try:
        backing = make_shared_volume(root / "backing")
        (root / "pass").mkdir(mode=0o755)
        files = {name: passfile(root / "pass", name, secret) for name, secret in PASS.items()}
        yield Vol(root, backing, files)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def start_agent() -> Iterator[Callable[..., AgentProcess]]:
    """Start real agents with the given options; all are stopped afterwards."""
    started: list[tuple[AgentProcess, Path]] = []

    def start(*args: str) -> AgentProcess:
        d = shared_tempdir("cryptfs-agent-")
        a = AgentProcess(d / "agent.sock", d / "agent.log")
        started.append((a, d))
        return a.start(*args)

    yield start
    for a, d in started:
        if a.proc is not None and a.proc.poll() is None:
            a.kill()
        else:
            a.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def agent(start_agent: Callable[..., AgentProcess]) -> AgentProcess:
    return start_agent("--idle-timeout", "0", "--request-timeout", "5")


# ================================================================================================
# Bad clients: each fails alone, the daemon keeps serving
# ================================================================================================

def test_ping_and_status_on_one_connection(agent: AgentProcess) -> None:
    with connect(agent) as s:
        for _ in range(3):
            send(s, {"op": "ping"})
            r = recv_reply(s)
            assert r == {"v": 1, "ok": True, "code": "ok", "message": "pong", "version": 1}
        send(s, {"op": "status"})
        r = recv_reply(s)
        assert r["ok"] and r["sessions"] == [] and r["idle_timeout"] == 0
    assert AgentClient(str(agent.socket)).request({"op": "ping"})["message"] == "pong"
    assert_healthy(agent)


def test_oversize_frame_is_refused_and_closed(agent: AgentProcess) -> None:
    with connect(agent) as s:
        s.sendall(struct.pack(">I", p.MAX_FRAME + 1) + b"\x01" + b"{" * 1000)
        r = recv_reply(s)
        assert r["ok"] is False and r["code"] == "too-large"
        assert str(p.MAX_FRAME + 1) in r["message"] and str(p.MAX_FRAME) in r["message"]
        assert_closed(s)
    # 4 GiB announced: refused from the header alone, nothing is allocated or awaited.
    r, closed = raw_reply(agent, struct.pack(">I", 2**32 - 1))
    assert r["code"] == "too-large" and closed
    assert_healthy(agent)


def test_a_frame_of_exactly_the_limit_is_read(agent: AgentProcess) -> None:
    """64 KiB (type byte included) is allowed: the agent reads all of it and parses it."""
    head, tail = b'{"v":1,"op":"ping","pad":"', b'"}'
    body = head + b"x" * (p.MAX_FRAME - 1 - len(head) - len(tail)) + tail
    assert len(body) + 1 == p.MAX_FRAME
    with connect(agent) as s:
        s.sendall(msg_frame(body))
        assert recv_reply(s)["message"] == "pong"
    assert_healthy(agent)


@pytest.mark.parametrize(("data", "code", "text"), [
    pytest.param(struct.pack(">I", 0), "bad-request", "empty frame", id="zero-length"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n", "too-large", "exceeds", id="http"),
    pytest.param(b"\x00\x00\x00\x05\x07abcd", "bad-request", "expected a message frame",
                 id="unknown-frame-type"),
    pytest.param(b"\x00\x00\x00\x05\x02abcd", "bad-request", "expected a message frame",
                 id="secret-without-message"),
    pytest.param(msg_frame(b"{not json at all"), "bad-request", "not UTF-8 JSON",
                 id="invalid-json"),
    pytest.param(msg_frame(b"\xff\xfe\x00{}"), "bad-request", "not UTF-8 JSON",
                 id="invalid-utf8"),
    pytest.param(msg_frame(b'["v", 1, "op", "ping"]'), "bad-request", "not a JSON object",
                 id="json-array"),
    pytest.param(msg_frame(b'"ping"'), "bad-request", "not a JSON object", id="json-string"),
    pytest.param(msg_frame(b'{"v":2,"op":"ping"}'), "unsupported-version", "speaks 1",
                 id="version-2"),
    pytest.param(msg_frame(b'{"op":"ping"}'), "unsupported-version", "speaks 1",
                 id="no-version"),
    pytest.param(msg_frame(b'{"v":"1","op":"ping"}'), "unsupported-version", "'1'",
                 id="version-string"),
])
def test_broken_framing_gets_one_error_and_is_closed(agent: AgentProcess, data: bytes, code: str,
                                                     text: str) -> None:
    r, closed = raw_reply(agent, data)
    assert r["ok"] is False and r["code"] == code and text in r["message"], r
    assert closed
    assert_healthy(agent)


def test_random_garbage_connections_never_hurt_the_agent(agent: AgentProcess) -> None:
    """Many connections of random bytes: each gets at most one reply and is closed."""
    import random

    rng = random.Random(1234)
    for i in range(60):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        if i % 3 == 0:  # a plausible length, then junk
            data = struct.pack(">IB", len(data) + 1, rng.choice([1, 2])) + data
        with connect(agent) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            f = recv_frame(s)
            if f is not None:
                r = p.decode(*f)
                assert r["ok"] is False and r["code"] in (
                    "bad-request", "too-large", "unsupported-version"), r
            assert_closed(s)
    assert_healthy(agent)


@pytest.mark.parametrize(("msg", "secret", "text"), [
    ({"op": "shutdown"}, None, "unknown operation 'shutdown'"),
    ({"op": 7}, None, "unknown operation 7"),
    ({}, None, "unknown operation None"),
    ({"op": "status", "all": "yes"}, None, "'all' must be bool"),
    ({"op": "status", "all": 1}, None, "'all' must be bool"),
    ({"op": "status", "uid": True}, None, "'uid' must be int"),
    ({"op": "status", "uid": "0"}, None, "'uid' must be int"),
    ({"op": "lock", "uid": 0.0}, None, "'uid' must be int"),
    ({"op": "lock", "backing": ["/srv"]}, None, "'backing' must be str"),
    ({"op": "unlock", "backing": 5}, b"pw", "'backing' must be str"),
    ({"op": "unlock"}, b"pw", "missing field 'backing'"),
    ({"op": "unlock", "backing": "/srv/vol"}, None, "needs a passphrase"),
    ({"op": "unlock", "backing": "relative/vol"}, b"pw", "absolute path"),
    ({"op": "unlock", "backing": "/srv/\u0000vol"}, b"pw", "absolute path"),
    ({"op": "unlock", "backing": "/" + "a" * 5000}, b"pw", "absolute path"),
    ({"op": "activity", "uids": [0]}, None, "only valid on a watch connection"),
])
def test_bad_request_is_answered_and_the_connection_stays_usable(
        agent: AgentProcess, msg: dict[str, Any], secret: bytes | None, text: str) -> None:
    with connect(agent) as s:
        send(s, msg, secret)
        r = recv_reply(s)
        assert r["ok"] is False and r["code"] == "bad-request" and text in r["message"], r
        send(s, {"op": "ping"})  # a request-level error does not end the connection
        assert recv_reply(s)["message"] == "pong"
    assert_healthy(agent)


def test_secret_frame_limits(agent: AgentProcess) -> None:
    not_a_volume = shared_tempdir("cryptfs-agent-empty-")
    try:
        unlock = {"op": "unlock", "backing": str(not_a_volume), "secret": True}
        for size in (p.MAX_SECRET + 1, 60000):
            with connect(agent) as s:
                s.sendall(p.encode(unlock) + p.frame(p.FRAME_SECRET, b"s" * size))
                r = recv_reply(s)
                assert r["code"] == "too-large" and "secret" in r["message"]
                assert_closed(s)
        with connect(agent) as s:  # an empty secret
            s.sendall(p.encode(unlock) + p.frame(p.FRAME_SECRET, b""))
            r = recv_reply(s)
            assert r["code"] == "too-large" and "empty" in r["message"]
            assert_closed(s)
        # Exactly 4096 bytes is accepted: the unlock goes on and fails on the volume.
        with connect(agent) as s:
            s.sendall(p.encode(unlock) + p.frame(p.FRAME_SECRET, b"s" * p.MAX_SECRET))
            r = recv_reply(s)
            assert r["code"] == "not-a-volume" and "not a cryptfs volume" in r["message"]
    finally:
        shutil.rmtree(not_a_volume)
    assert_healthy(agent)


def test_announced_secret_followed_by_a_message_frame(agent: AgentProcess) -> None:
    with connect(agent) as s:
        s.sendall(p.encode({"op": "unlock", "backing": "/srv/vol", "secret": True})
                  + p.encode({"op": "ping"}))
        r = recv_reply(s)
        assert r["code"] == "bad-request" and "expected a secret frame" in r["message"]
        assert_closed(s)
    assert_healthy(agent)


@pytest.mark.serial
def test_half_a_frame_times_out_while_others_are_served(
        start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent("--idle-timeout", "0", "--request-timeout", "1")
    stalled = connect(agent, timeout=3)
    never = connect(agent, timeout=3)
    try:
        t0 = time.monotonic()
        stalled.sendall(struct.pack(">IB", 100, 1) + b'{"v":1,"op"')  # 12 of 100 bytes
        # Meanwhile another client is served, while the stalled one still waits.
        for _ in range(5):
            assert request(agent, {"op": "ping"})["message"] == "pong"
            assert request(agent, {"op": "status"})["ok"]
        readable, _, _ = select.select([stalled, never], [], [], 0)
        assert readable == [], "a stalled connection was answered before its deadline"
        r = recv_reply(stalled)  # at most 3 s (socket timeout), else this raises
        elapsed = time.monotonic() - t0
        assert r["ok"] is False and r["code"] == "timeout" and "in time" in r["message"]
        assert 0.9 <= elapsed < 3, elapsed
        assert_closed(stalled)
        # A client that connected and never sent a byte gets the same.
        r = recv_reply(never)
        assert r["code"] == "timeout"
        assert_closed(never)
    finally:
        stalled.close()
        never.close()
    assert_healthy(agent)


def test_a_request_trickled_in_too_slowly_times_out(
        start_agent: Callable[..., AgentProcess]) -> None:
    """The deadline is for the whole request, not per read: one byte every 0.3 s
    (each read succeeding) still ends in a timeout."""
    agent = start_agent("--idle-timeout", "0", "--request-timeout", "1")
    data = p.encode({"op": "ping", "pad": "x" * 20})
    with connect(agent, timeout=3) as s:
        got = None
        for i in range(len(data)):
            try:
                s.sendall(data[i:i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            readable, _, _ = select.select([s], [], [], 0.3)
            if readable:
                got = recv_reply(s)
                break
        assert got is not None and got["code"] == "timeout", got
        assert_closed(s)
    assert_healthy(agent)


def test_clients_that_vanish_mid_frame(agent: AgentProcess) -> None:
    data = p.encode({"op": "status", "all": True})
    for cut in (1, 3, 4, 5, len(data) - 1):
        s = connect(agent)
        s.sendall(data[:cut])
        s.close()  # gone mid-frame
    for cut in (2, 6, len(data) - 1):
        with connect(agent) as s:  # half-closed: no more data will come, but it still reads
            s.sendall(data[:cut])
            s.shutdown(socket.SHUT_WR)
            assert_closed(s)  # the agent gives up on it without a reply
    with connect(agent) as s:  # reset with unread data on the agent side
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(struct.pack(">IB", 50, 1))
    assert_healthy(agent)


def _flood_without_reading(agent: AgentProcess, seconds: float = 0.5) -> socket.socket:
    """A client that pipelines requests and never reads a reply, until the agent's
    replies fill both socket buffers and its write blocks."""
    s = connect(agent)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    burst = p.encode({"op": "status"}) * 200
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            s.send(burst)
        except BlockingIOError:
            time.sleep(0.01)
    return s


def test_a_client_that_never_reads_its_replies(start_agent: Callable[..., AgentProcess]
                                               ) -> None:
    """It holds up no one, and the agent gives up on it after the request timeout."""
    agent = start_agent("--idle-timeout", "0", "--request-timeout", "1")
    s = _flood_without_reading(agent)
    try:
        for _ in range(3):
            assert request(agent, {"op": "status"})["ok"]
        # Drain: replies, then the end of the stream once the agent's write deadline passed.
        s.setblocking(True)
        s.settimeout(5)
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
    finally:
        s.close()
    assert agent.proc is not None and agent.proc.poll() is None
    assert request(agent, {"op": "ping"})["message"] == "pong"


def test_a_client_that_never_reads_is_no_internal_error(start_agent: Callable[..., AgentProcess]
                                                        ) -> None:
    """A reply that cannot be delivered in time is the client's fault: the agent closes
    the connection quietly (or with a short WARNING), it does not log an internal
    error with a traceback, which any local user could otherwise repeat at will."""
    agent = start_agent("--idle-timeout", "0", "--request-timeout", "1")
    s = _flood_without_reading(agent)
    try:
        time.sleep(1.5)  # let the agent's write deadline pass
    finally:
        s.close()
    assert_healthy(agent)


@pytest.mark.serial
def test_two_thousand_idle_connections(start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent("--idle-timeout", "0", "--request-timeout", "30")
    n = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 500
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, min(hard, 8192)), max(hard, want)))
    base = fd_count(agent.pid)
    conns: list[socket.socket] = []
    try:
        for _ in range(n):
            conns.append(connect_patiently(agent))
        # The agent really holds them all at once (not merely queued in the backlog).
        wait_for(lambda: fd_count(agent.pid) >= base + n - 5, what="the agent to accept them all")
        t0 = time.monotonic()
        r = request(agent, {"op": "ping"})
        assert r["message"] == "pong"
        st = AgentClient(str(agent.socket), timeout=5).request({"op": "status", "all": True})
        assert st["ok"] and st["sessions"] == []
        assert time.monotonic() - t0 < 5
        # Idle ones are live connections, each served when it speaks.
        for s in conns[:5] + conns[-5:]:
            send(s, {"op": "ping"})
            assert recv_reply(s)["message"] == "pong"
    finally:
        for s in conns:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    wait_for(lambda: fd_count(agent.pid) <= base + 5, what="the agent to drop them")
    assert_healthy(agent)


def test_max_connections_answers_busy(start_agent: Callable[..., AgentProcess]) -> None:
    agent = start_agent("--idle-timeout", "0", "--max-connections", "3")
    held = [connect(agent) for _ in range(3)]
    try:
        for s in held:  # each is being served (and counted)
            send(s, {"op": "ping"})
            assert recv_reply(s)["message"] == "pong"
        for _ in range(3):
            with connect(agent) as extra:
                r = recv_reply(extra)  # unasked: the agent refuses it at once
                assert r["ok"] is False and r["code"] == "busy"
                assert "too many connections" in r["message"]
                assert_closed(extra)
        held.pop().close()

        def served() -> bool:
            with connect(agent) as s:
                send(s, {"op": "ping"})
                return recv_reply(s)["code"] == "ok"
        wait_for(served, what="a freed connection slot")
    finally:
        for s in held:
            s.close()
    assert_healthy(agent)


def test_the_client_waits_while_the_listen_backlog_is_full(
        start_agent: Callable[..., AgentProcess]) -> None:
    """Under a flood of connections the backlog fills up; a legitimate client (the
    command line, a PAM login) must then wait within its timeout, not fail at once."""
    agent = start_agent("--idle-timeout", "0")
    assert agent.proc is not None
    flood: list[socket.socket] = []
    os.kill(agent.pid, signal.SIGSTOP)  # the agent accepts nothing for a while
    resume = threading.Timer(1.0, os.kill, (agent.pid, signal.SIGCONT))
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(agent.socket))
            except BlockingIOError:
                s.close()
                break
            flood.append(s)
            assert len(flood) < 100_000
        resume.start()
        r = AgentClient(str(agent.socket), timeout=10).request({"op": "ping"})
        assert r["message"] == "pong"
    finally:
        resume.cancel()
        os.kill(agent.pid, signal.SIGCONT)
        for s in flood:
            s.close()
    assert_healthy(agent)


def test_deeply_nested_json_gets_a_bad_request_reply(agent: AgentProcess) -> None:
    """5 KB of brackets fit one frame but overflow the JSON parser's recursion."""
    for body in (b"[" * 5000, b'{"v":1,"op":' * 3000):
        r, closed = raw_reply(agent, msg_frame(body))
        assert r["code"] == "bad-request" and "nests too deep" in r["message"] and closed
    assert_healthy(agent)


@pytest.mark.parametrize("body", [
    pytest.param(b'{"v":1,"op":"' + "\u00e9".encode() * 30000 + b'"}', id="long-op"),
    pytest.param(b'{"v":"' + "\u00e9".encode() * 30000 + b'"}', id="long-version"),
])
def test_an_error_echoing_a_long_value_still_fits_a_frame(agent: AgentProcess,
                                                          body: bytes) -> None:
    """The error message repeats the client's value; the reply must still be sent."""
    assert len(body) < p.MAX_FRAME
    with connect(agent) as s:
        s.sendall(msg_frame(body))
        r = recv_reply(s)
        assert r["ok"] is False and r["code"] in ("bad-request", "unsupported-version")
    assert_healthy(agent)


# ================================================================================================
# Authorisation: SO_PEERCRED decides who may do what
# ================================================================================================

def _unlock_cli(user: str, agent: AgentProcess, backing: Path, pf: Path
                ) -> subprocess.CompletedProcess[str]:
    return cli_as(user, "unlock", str(backing), "--passphrase-file", str(pf), env=agent.env)


def _sessions(agent: AgentProcess) -> list[tuple[str, str]]:
    r = request(agent, {"op": "status", "all": True})
    assert r["ok"], r
    return [(s["user"], s["backing"]) for s in r["sessions"]]


def test_user_sees_only_their_own_sessions(agent: AgentProcess, vol: Vol) -> None:
    for name in ("cfs-alice", "cfs-bob"):
        res = _unlock_cli(name, agent, vol.backing, vol.passfiles[name])
        assert res.returncode == 0, res.stderr
        assert f"unlocked {vol.backing}" in res.stdout
    res = cli_as("cfs-alice", "status", env=agent.env)
    assert res.returncode == 0 and "cfs-alice (uid" in res.stdout and "cfs-bob" not in res.stdout
    r = user_request("cfs-alice", agent, {"op": "status"})
    assert [s["uid"] for s in r["sessions"]] == [uid("cfs-alice")]
    # --all, or another uid: refused, with the documented exit code.
    res = cli_as("cfs-alice", "status", "--all", env=agent.env)
    assert res.returncode == 8 and "only root" in res.stderr and res.stdout == ""
    res = cli_as("cfs-alice", "status", "--user", "cfs-bob", env=agent.env)
    assert res.returncode == 8 and "only root" in res.stderr and "cfs-bob" not in res.stdout
    for msg in ({"op": "status", "all": True}, {"op": "status", "uid": uid("cfs-bob")}):
        r = user_request("cfs-alice", agent, msg)
        assert r["ok"] is False and r["code"] == "denied" and "only root" in r["message"]
        assert "sessions" not in r
    # Root sees both.
    res = cli_as("root", "status", "--all", env=agent.env)
    assert res.returncode == 0, res.stderr
    assert f"cfs-alice (uid {uid('cfs-alice')}): {vol.backing}" in res.stdout
    assert f"cfs-bob (uid {uid('cfs-bob')}): {vol.backing}" in res.stdout
    assert "never locks when idle" in res.stdout
    assert_healthy(agent)


def test_user_cannot_unlock_or_lock_for_another_uid(agent: AgentProcess, vol: Vol) -> None:
    bob = uid("cfs-bob")
    assert _unlock_cli("cfs-bob", agent, vol.backing, vol.passfiles["cfs-bob"]).returncode == 0
    unlock = {"op": "unlock", "backing": str(vol.backing), "uid": bob}
    # Even knowing bob's passphrase, alice cannot open a session in bob's name ...
    [r_unlock, r_lock, r_lock_all] = [decoded(f) for f in as_user(
        "cfs-alice", agent,
        Req(unlock, PASS["cfs-bob"]),
        Req({"op": "lock", "uid": bob, "backing": str(vol.backing)}),
        Req({"op": "lock", "uid": bob}))]
    for r in (r_unlock, r_lock, r_lock_all):
        assert r["ok"] is False and r["code"] == "denied", r
        assert "only root or the service user" in r["message"]
    # ... nor end bob's.  Her own "lock" touches only her own sessions (none).
    res = cli_as("cfs-alice", "lock", env=agent.env)
    assert res.returncode == 0 and "locked 0 session(s)" in res.stdout
    res = cli_as("cfs-alice", "lock", "--user", "cfs-bob", env=agent.env)
    assert res.returncode == 8 and "only root" in res.stderr
    assert _sessions(agent) == [("cfs-bob", str(vol.backing))]
    # Root may act for bob.
    r = request(agent, {"op": "lock", "uid": bob})
    assert r["ok"] and r["locked"] == 1
    assert _sessions(agent) == []
    r = request(agent, unlock, PASS["cfs-bob"])
    assert r["ok"] and r["slot"] == 2
    assert _sessions(agent) == [("cfs-bob", str(vol.backing))]
    log = agent.log_text()
    assert f"lock: uid {bob} (cfs-bob)" in log
    assert_healthy(agent)


def _watch(user: str, agent: AgentProcess, backing: Path) -> list[tuple[int, bytes]]:
    """A watch request as ``user``: its first frames (the state, and the key if held)."""
    return as_user(user, agent, Req({"op": "watch", "backing": str(backing),
                                     "volume_id": _volume_id(backing)}, frames=2, timeout=3))[0]


def _volume_id(backing: Path) -> str:
    return str(json.loads((backing / "cryptfs.conf").read_text())["volume_id"])


def test_only_root_may_watch(agent: AgentProcess, vol: Vol) -> None:
    assert _unlock_cli("cfs-alice", agent, vol.backing, vol.passfiles["cfs-alice"]).returncode == 0
    frames = _watch("cfs-alice", agent, vol.backing)
    assert len(frames) == 1, "a refused watcher must get nothing after the refusal"
    r = decoded(frames)
    assert r["ok"] is False and r["code"] == "denied" and "watch" in r["message"]
    frames = _watch("root", agent, vol.backing)
    state = decoded(frames)
    assert state["ok"] and state["event"] == "state" and state["keys"] is True
    assert state["uids"] == [uid("cfs-alice")]
    assert frames[1][0] == p.FRAME_SECRET and len(frames[1][1]) == 32  # the master key
    assert_healthy(agent)


def test_service_user(start_agent: Callable[..., AgentProcess], vol: Vol) -> None:
    agent = start_agent("--idle-timeout", "0", "--service-user", "cfs-carol")
    assert _unlock_cli("cfs-alice", agent, vol.backing, vol.passfiles["cfs-alice"]).returncode == 0
    # carol may see everyone and watch ...
    res = cli_as("cfs-carol", "status", "--all", env=agent.env)
    assert res.returncode == 0, res.stderr
    assert f"cfs-alice (uid {uid('cfs-alice')}): {vol.backing}" in res.stdout
    frames = _watch("cfs-carol", agent, vol.backing)
    state = decoded(frames)
    assert state["ok"] and state["event"] == "state" and state["uids"] == [uid("cfs-alice")]
    assert len(frames) == 2 and len(frames[1][1]) == 32
    # ... bob still may not.
    res = cli_as("cfs-bob", "status", "--all", env=agent.env)
    assert res.returncode == 8 and "only root" in res.stderr and "cfs-alice" not in res.stdout
    r = decoded(_watch("cfs-bob", agent, vol.backing))
    assert r["code"] == "denied"
    r = user_request("cfs-bob", agent, {"op": "lock", "uid": uid("cfs-alice")})
    assert r["code"] == "denied"
    assert _sessions(agent) == [("cfs-alice", str(vol.backing))]
    # carol acts for alice.
    r = user_request("cfs-carol", agent, {"op": "lock", "uid": uid("cfs-alice")})
    assert r["ok"] and r["locked"] == 1
    assert _sessions(agent) == []
    assert_healthy(agent)


def test_an_unknown_service_user_is_refused_at_start() -> None:
    d = shared_tempdir("cryptfs-agent-")
    try:
        a = AgentProcess(d / "agent.sock", d / "agent.log")
        with pytest.raises(AssertionError, match=r"agent exited \(2\): cryptfs-agent: error: "
                           r"--service-user .cfs-nobody-like-this. is not a user"):
            a.start("--service-user", "cfs-nobody-like-this")
        a.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ================================================================================================
# Backoff of failed unlocks
# ================================================================================================

def _unlock_req(vol: Vol, secret: bytes) -> Req:
    return Req({"op": "unlock", "backing": str(vol.backing)}, secret)


def test_backoff_doubles_caps_and_resets(start_agent: Callable[..., AgentProcess],
                                         vol: Vol) -> None:
    agent = start_agent("--idle-timeout", "0", "--backoff", "0.5", "--backoff-max", "2")
    alice = uid("cfs-alice")
    wrong, right = b"wrong passphrase of alice", PASS["cfs-alice"]
    fails: list[dict[str, Any]] = []
    waits: list[dict[str, Any]] = []
    for _ in range(4):
        # A wrong passphrase, then at once another try: the second is not even tried.
        r_fail, r_wait = (decoded(f) for f in as_user(
            "cfs-alice", agent, _unlock_req(vol, wrong), _unlock_req(vol, right)))
        fails.append(r_fail)
        waits.append(r_wait)
        assert r_fail["code"] == "wrong-passphrase" and r_fail["message"] == "wrong passphrase"
        assert r_wait["code"] == "backoff" and "try again in" in r_wait["message"]
        assert 0 < r_wait["retry_after"] <= r_fail["retry_after"]
        if len(fails) == 2:
            # Bob is not held up by alice's failures, and has his own count.
            r = user_request("cfs-bob", agent, {"op": "unlock", "backing": str(vol.backing)},
                             PASS["cfs-bob"])
            assert r["ok"], r
        time.sleep(r_wait["retry_after"] + 0.05)  # wait out the backoff (not a timing check)
    assert [r["retry_after"] for r in fails] == [0.5, 1.0, 2.0, 2.0]
    assert [r["failures"] for r in fails] == [1, 2, 3, 4]
    # After the wait, the right passphrase works and the count starts again.
    r = user_request("cfs-alice", agent, {"op": "unlock", "backing": str(vol.backing)}, right)
    assert r["ok"] and r["slot"] == 1 and r["backing"] == str(vol.backing)
    r = user_request("cfs-alice", agent, {"op": "unlock", "backing": str(vol.backing)}, wrong)
    assert r["code"] == "wrong-passphrase" and r["retry_after"] == 0.5 and r["failures"] == 1
    # The log names the uid and the count, at WARNING.
    log = agent.log_text()
    for n, delay in ((1, 0), (2, 1), (3, 2), (4, 2)):  # "%.0f": 0.5 prints as 0
        assert re.search(rf"WARNING: unlock failed: uid {alice} \(cfs-alice\), pid \d+, volume "
                         rf"[0-9a-f]{{32}} at {re.escape(str(vol.backing))}: wrong passphrase "
                         rf"\({n} in a row; next attempt allowed in {delay} s\)", log), log
    assert re.search(rf"WARNING: unlock refused: uid {alice} \(cfs-alice\), pid \d+: backing off "
                     rf"after 4 failed attempts", log), log
    assert "wrong passphrase of alice" not in log and right.decode() not in log
    assert not re.search(rf"unlock failed: uid {uid('cfs-bob')}", log)
    assert_healthy(agent)


def test_backoff_as_the_command_line_reports_it(start_agent: Callable[..., AgentProcess],
                                                vol: Vol) -> None:
    # A backoff long enough that the second command surely starts within it.
    agent = start_agent("--idle-timeout", "0", "--backoff", "30", "--backoff-max", "60")
    res = _unlock_cli("cfs-alice", agent, vol.backing, vol.wrong_passfile("cfs-alice"))
    assert res.returncode == 3, res.stderr
    assert "cryptfs: error: wrong passphrase (next attempt allowed in 30 s)" in res.stderr
    # Even the right passphrase is not tried during the wait.
    res = _unlock_cli("cfs-alice", agent, vol.backing, vol.passfiles["cfs-alice"])
    assert res.returncode == 8, res.stderr
    assert re.search(r"too many failed unlocks: try again in (29|30) s", res.stderr), res.stderr
    assert _sessions(agent) == []
    res = _unlock_cli("cfs-bob", agent, vol.backing, vol.passfiles["cfs-bob"])
    assert res.returncode == 0 and "unlocked" in res.stdout
    assert _sessions(agent) == [("cfs-bob", str(vol.backing))]
    assert_healthy(agent)


def test_concurrent_unlocks_of_one_user(start_agent: Callable[..., AgentProcess],
                                        vol: Vol) -> None:
    agent = start_agent("--idle-timeout", "0", "--backoff", "30", "--backoff-max", "60")
    n = 8
    # Wrong passphrases at once: exactly one is tried and counted; the rest are refused
    # as busy (one in progress) or backing off (it already failed).
    replies = [decoded(f) for f in as_user(
        "cfs-alice", agent, *[_unlock_req(vol, b"wrong %d" % i) for i in range(n)],
        parallel=True)]
    codes = sorted(r["code"] for r in replies)
    assert codes.count("wrong-passphrase") == 1, codes
    assert set(codes) <= {"wrong-passphrase", "busy", "backoff"}, codes
    failed = [r for r in replies if r["code"] == "wrong-passphrase"]
    assert failed[0]["failures"] == 1
    assert agent.log_text().count(f"unlock failed: uid {uid('cfs-alice')}") == 1
    # The right passphrase at once (bob): every reply ok or busy, one session in the end.
    replies = [decoded(f) for f in as_user(
        "cfs-bob", agent, *[_unlock_req(vol, PASS["cfs-bob"]) for _ in range(n)],
        parallel=True)]
    codes = sorted(r["code"] for r in replies)
    assert set(codes) <= {"ok", "busy"} and "ok" in codes, codes
    assert _sessions(agent) == [("cfs-bob", str(vol.backing))]
    assert_healthy(agent)


def test_refusal_windows_by_the_clock() -> None:
    from cryptfs.refusals import RefusalLog

    now = [0.0]
    r = RefusalLog(first=2, window=60.0, clock=lambda: now[0])
    assert [r.admit(7) for _ in range(5)] == [(True, None)] * 2 + [(False, None)] * 3
    assert r.admit(8) == (True, None) and r.ended() == []  # (each uid its own window)
    now[0] = 61.0
    # The next refusal after the window says what was held back, and is logged.
    assert r.admit(7) == (True, (3, 61.0))
    now[0] = 200.0
    r.admit(7), r.admit(7), r.admit(7)
    assert r.ended() == []  # (7: its window is not over; 8: nothing held back)
    now[0] = 270.0
    assert r.ended() == [(7, 1, 60.0)]  # (the timer: a flood that stopped)
    assert r.ended() == [] and r.admit(7) == (True, None)


def test_a_flood_of_refused_unlocks_is_summarised(start_agent: Callable[..., AgentProcess],
                                                  vol: Vol, tmp_path: Path) -> None:
    """One user asks again and again while backing off: the agent's log shows the
    first few refusals of a minute, then one line with the count of the rest (at
    the latest when the agent stops); each passphrase tried is still logged and
    recorded (the backoff bounds those)."""
    alog = tmp_path / "agent-log"
    subprocess.run([sys.executable, "-m", "cryptfs.cli.main", "audit", "init", str(alog)],
                   check=True, capture_output=True)
    agent = start_agent("--idle-timeout", "0", "--backoff", "60", "--backoff-max", "60",
                        "--audit-log", str(alog))
    alice, n = uid("cfs-alice"), 400
    r = user_request("cfs-alice", agent, {"op": "unlock", "backing": str(vol.backing)},
                     b"wrong passphrase of alice")
    assert r["code"] == "wrong-passphrase"
    replies = [decoded(f) for f in as_user(
        "cfs-alice", agent, *[_unlock_req(vol, PASS["cfs-alice"]) for _ in range(n)])]
    assert {r["code"] for r in replies} == {"backoff"}
    # Bob is not held up, and his unlock is logged as ever.
    assert user_request("cfs-bob", agent, {"op": "unlock", "backing": str(vol.backing)},
                        PASS["cfs-bob"])["ok"]
    assert agent.stop() == 0
    log = agent.log_text()
    mine = [ln for ln in log.splitlines() if f"uid {alice} (cfs-alice)" in ln]
    assert len(mine) == 7, log  # the wrong passphrase; 5 backoffs one by one; 1 summary
    assert "unlock failed" in mine[0] and all("backing off" in ln for ln in mine[1:6])
    assert re.search(rf"WARNING: unlock refused: uid {alice} \(cfs-alice\): {n - 5} more refused "
                     r"unlocks in the last \d+ s \(not logged one by one\)", mine[6]), mine[6]
    assert len(log) < 8192, len(log)
    assert re.search(rf"unlock: uid {uid('cfs-bob')} \(cfs-bob\)", log)
    # The access log: the one passphrase tried (refusals while backing off try none).
    lines = [json.loads(x) for seg in sorted(alog.glob("segment-*.log"))
             for x in seg.read_text().splitlines()]
    got = [(r["event"], r["outcome"], r["user"]) for r in lines if "event" in r]
    assert got == [("unlock", "denied", "cfs-alice"), ("unlock", "allowed", "cfs-bob"),
                   ("lock", "allowed", "cfs-bob")], got


# ================================================================================================
# What is unlocked: slots, paths, the config MAC
# ================================================================================================

def test_user_without_a_slot(agent: AgentProcess, vol: Vol) -> None:
    backing = vol.root / "root-only-volume"
    init_volume(str(backing), "aes-256-gcm", Secret(ROOT_PASSPHRASE), TEST_KDF,
                user_fields("root", "admin")).close()
    try:
        for _ in range(2):  # not a failed attempt: no backoff for the second
            res = _unlock_cli("cfs-alice", agent, backing, vol.passfiles["cfs-alice"])
            assert res.returncode == 8
            assert (f"cfs-alice (uid {uid('cfs-alice')}) has no key slot in the volume at "
                    f"{backing}") in res.stderr
        r = user_request("cfs-alice", agent, {"op": "unlock", "backing": str(backing)},
                         PASS["cfs-alice"])
        assert r["code"] == "no-slot"
        assert "unlock failed" not in agent.log_text()
        r = request(agent, {"op": "unlock", "backing": str(backing)}, ROOT_PASSPHRASE)
        assert r["ok"] and r["slot"] == 0
    finally:
        shutil.rmtree(backing)
    assert_healthy(agent)


def test_unlock_of_what_is_not_a_volume(agent: AgentProcess, vol: Vol) -> None:
    empty = vol.root / "empty"
    empty.mkdir(exist_ok=True)
    a_file = vol.root / "a-file"
    a_file.write_text("x")
    cases = [
        (empty, "is not a cryptfs volume (no cryptfs.conf)"),
        (vol.root / "missing", "No such file or directory"),
        (a_file, "Not a directory"),
    ]
    for path, text in cases:
        if path != a_file:  # (the command line itself refuses a file: exit 2)
            res = _unlock_cli("cfs-alice", agent, path, vol.passfiles["cfs-alice"])
            # (4, as the same mistake without the agent; it was 8, "the agent refused")
            assert res.returncode == 4 and text in res.stderr and str(path) in res.stderr
            assert "Traceback" not in res.stderr
        r = user_request("cfs-alice", agent, {"op": "unlock", "backing": str(path)},
                         PASS["cfs-alice"])
        assert r["code"] == "not-a-volume" and text in r["message"]
    r = user_request("cfs-alice", agent, {"op": "unlock", "backing": "backing"}, PASS["cfs-alice"])
    assert r["code"] == "bad-request" and "absolute path" in r["message"]
    bad = vol.root / "bad-config"
    bad.mkdir(exist_ok=True)
    (bad / "cryptfs.conf").write_text("{not json")
    r = request(agent, {"op": "unlock", "backing": str(bad)}, ROOT_PASSPHRASE)
    assert r["code"] == "not-a-volume" and "not valid JSON" in r["message"]
    assert_healthy(agent)


def _edit_config(backing: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = backing / "cryptfs.conf"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")


def _slot(d: dict[str, Any], user: str) -> dict[str, Any]:
    [s] = [s for s in d["slots"] if s.get("user") == user]
    return s


def _role_to_admin(d: dict[str, Any]) -> None:
    _slot(d, "cfs-alice")["role"] = "admin"


def _swap_uids(d: dict[str, Any]) -> None:
    a, b = _slot(d, "cfs-alice"), _slot(d, "cfs-bob")
    a["uid"], b["uid"] = b["uid"], a["uid"]


def _delete_carol(d: dict[str, Any]) -> None:
    d["slots"] = [s for s in d["slots"] if s.get("user") != "cfs-carol"]


def _insert_copy(d: dict[str, Any]) -> None:
    copy = dict(_slot(d, "cfs-alice"), id=99, user="cfs-mallory", uid=4242, label="mallory")
    d["slots"].append(copy)


def _rename_label(d: dict[str, Any]) -> None:
    _slot(d, "cfs-alice")["label"] = "alice-the-admin"


@pytest.mark.parametrize(("edit", "passphrase_of"), [
    pytest.param(_role_to_admin, "cfs-alice", id="role-changed"),
    pytest.param(_swap_uids, "cfs-bob", id="uids-swapped"),  # alice now owns bob's slot
    pytest.param(_delete_carol, "cfs-alice", id="slot-deleted"),
    pytest.param(_insert_copy, "cfs-alice", id="slot-copied-with-new-id"),
    pytest.param(_rename_label, "cfs-alice", id="label-changed"),
])
def test_a_hand_edited_config_fails_authentication(
        agent: AgentProcess, vol: Vol, edit: Callable[[dict[str, Any]], None],
        passphrase_of: str) -> None:
    backing = vol.root / f"edited-{edit.__name__}"
    shutil.copytree(vol.backing, backing)
    original = (backing / "cryptfs.conf").read_bytes()
    unlock = {"op": "unlock", "backing": str(backing)}
    try:
        r = user_request("cfs-alice", agent, unlock, PASS["cfs-alice"])
        assert r["ok"], r  # the untouched copy unlocks
        assert user_request("cfs-alice", agent, {"op": "lock"})["locked"] == 1
        _edit_config(backing, edit)
        pf = passfile(vol.root / "pass", "cfs-alice", PASS[passphrase_of])
        try:
            res = _unlock_cli("cfs-alice", agent, backing, pf)
        finally:
            passfile(vol.root / "pass", "cfs-alice", PASS["cfs-alice"])
        assert res.returncode == 4, res.stderr  # (a config edited or damaged: as without it)
        assert "volume config failed authentication: it was edited or damaged" in res.stderr
        r = user_request("cfs-alice", agent, unlock, PASS[passphrase_of])
        assert r["ok"] is False and r["code"] == "not-a-volume"
        assert "failed authentication" in r["message"]
        assert _sessions(agent) == []
        log = agent.log_text()
        assert re.search(rf"ERROR: unlock refused: uid {uid('cfs-alice')} \(cfs-alice\).*"
                         r"failed authentication", log), log
        assert "unlock failed" not in log  # not counted as a wrong passphrase
        (backing / "cryptfs.conf").write_bytes(original)
        r = user_request("cfs-alice", agent, unlock, PASS["cfs-alice"])  # no backoff either
        assert r["ok"], r
    finally:
        shutil.rmtree(backing)
    assert_healthy(agent)


def test_status_reply_with_many_sessions(agent: AgentProcess, vol: Vol) -> None:
    """Long backing paths (legal: up to 4096 bytes) and a few volumes per user make
    the reply to `status --all` larger than one frame."""
    deep = vol.root / "deep"
    path = deep
    for i in range(12):
        path = path / (f"{i:02d}" + "d" * 240)
    path.mkdir(parents=True)
    copies = []
    try:
        for i in range(8):
            c = path / f"v{i}"
            shutil.copytree(vol.backing, c)
            copies.append(c)
        for c in copies:
            for name in ("root", "cfs-alice", "cfs-bob"):
                u = 0 if name == "root" else uid(name)
                r = request(agent, {"op": "unlock", "backing": str(c), "uid": u}, PASS[name])
                assert r["ok"], r
        with connect(agent) as s:
            send(s, {"op": "status", "uid": uid("cfs-bob")})  # 8 sessions: fits
            assert len(recv_reply(s)["sessions"]) == 8
        with connect(agent) as s:
            send(s, {"op": "status", "all": True})  # 24 sessions of ~3.3 KB each
            f = recv_frame(s)
        assert f is not None, "no reply to status --all: the agent dropped the connection"
        r = p.decode(*f)
        assert r["code"] in ("ok", "too-large"), r
    finally:
        request(agent, {"op": "lock", "uid": 0})
        request(agent, {"op": "lock", "uid": uid("cfs-alice")})
        request(agent, {"op": "lock", "uid": uid("cfs-bob")})
        shutil.rmtree(deep)
    assert_healthy(agent)


# ================================================================================================
# Volumes the caller controls: the agent (root) must not be their tool
# ================================================================================================

@pytest.fixture
def alice_volume(users: dict[str, Any], vol: Vol) -> Iterator[Path]:
    """A volume cfs-alice made herself, in a directory of hers (as `cryptfs init` would)."""
    pw = users["cfs-alice"]
    home = vol.root / "alice-home"
    home.mkdir(mode=0o755)
    os.chown(home, pw.pw_uid, pw.pw_gid)
    backing = home / "vol"
    init_volume(str(backing), "aes-256-gcm", Secret(PASS["cfs-alice"]), TEST_KDF,
                user_fields("cfs-alice", "agent")).close()
    for d, dirs, files in os.walk(backing):
        for n in [d, *(os.path.join(d, x) for x in dirs + files)]:
            os.chown(n, pw.pw_uid, pw.pw_gid)
    try:
        yield backing
    finally:
        shutil.rmtree(home)


def test_the_agent_refuses_a_volume_in_a_directory_a_user_controls(agent: AgentProcess, vol: Vol,
                                                                      alice_volume: Path) -> None:
    """The agent runs as root: it must not read or write in a directory that
    a user can change (a planted symlink would make it overwrite any file)."""
    victim = vol.root / "victim"  # stands for /etc/shadow
    victim.write_text("root-owned, alice may not write this\n")
    victim.chmod(0o644)
    for name in (f"cryptfs.lastuse.{agent.pid}.tmp", "cryptfs.lastuse"):
        os.symlink(victim, alice_volume / name)
        os.lchown(alice_volume / name, uid("cfs-alice"), uid("cfs-alice"))
    res = _unlock_cli("cfs-alice", agent, alice_volume, vol.passfiles["cfs-alice"])
    assert res.returncode == 4 and "not owned by root" in res.stderr  # (a volume it refuses)
    assert victim.read_text() == "root-owned, alice may not write this\n"
    assert_healthy(agent)


def test_unlock_time_is_written_without_following_symlinks(agent: AgentProcess, vol: Vol) -> None:
    """Even in a root-owned volume, cryptfs.lastuse is replaced (a new file
    created with O_EXCL and renamed), never written through a link."""
    victim = vol.root / "victim2"
    victim.write_text("untouched\n")
    (vol.backing / "cryptfs.lastuse").unlink(missing_ok=True)
    os.symlink(victim, vol.backing / "cryptfs.lastuse")
    r = request(agent, {"op": "unlock", "backing": str(vol.backing)}, ROOT_PASSPHRASE)
    assert r["ok"], r
    assert victim.read_text() == "untouched\n"
    last = vol.backing / "cryptfs.lastuse"
    assert not last.is_symlink() and json.loads(last.read_text()).keys() == {"0"}
    assert not [n for n in os.listdir(vol.backing) if n.endswith(".tmp")]


def test_a_fifo_config_does_not_hang_the_agent(agent: AgentProcess, vol: Vol) -> None:
    fifo_vol = vol.root / "fifo-vol"
    fifo_vol.mkdir(mode=0o755)
    os.mkfifo(fifo_vol / "cryptfs.conf")
    frames = as_user("cfs-alice", agent,
                     Req({"op": "unlock", "backing": str(fifo_vol)}, PASS["cfs-alice"],
                         timeout=3))[0]
    assert frames, "no reply within 3 s"
    answer = decoded(frames)
    assert answer["code"] == "not-a-volume" and "not a regular file" in answer["message"]
    assert agent.stop() == 0


SWAPPER = ("import ctypes, os, sys\n"
           "d = sys.argv[1]\n"
           "os.mkdir(d + '/v')\n"
           "os.symlink(sys.argv[2], d + '/w')\n"
           "libc = ctypes.CDLL(None)\n"
           "v, w = (d + '/v').encode(), (d + '/w').encode()\n"
           "while True:\n"
           "    libc.renameat2(-100, v, -100, w, 2)\n")  # (RENAME_EXCHANGE, in a loop)


def test_a_path_the_caller_swaps_is_never_kept_as_the_volumes(agent: AgentProcess,
                                                              vol: Vol) -> None:
    """Review finding: the agent resolved the path, then opened what it had resolved.
    Alice, swapping a directory and a symlink to the volume under that name, won the
    race within about 25 unlocks: the agent kept her path as the volume's, and when
    she removed it, every user's session of the volume ended. The path kept is now
    the opened directory's own."""
    alice = pwd.getpwnam("cfs-alice")
    d = vol.root / "alice-swaps"
    d.mkdir()
    os.chown(d, alice.pw_uid, alice.pw_gid)
    swapper = subprocess.Popen(["/usr/bin/python3", "-c", SWAPPER, str(d), str(vol.backing)],
                               user=alice.pw_uid, group=alice.pw_gid, extra_groups=[])
    kept = []
    try:
        for _ in range(80):
            r = user_request("cfs-alice", agent, {"op": "unlock", "backing": str(d / "v")},
                             PASS["cfs-alice"])
            if r.get("ok"):
                kept.append(r["backing"])
            else:  # (it opened her own directory: refused as not root's)
                assert r["code"] == "not-a-volume", r
    finally:
        swapper.kill()
        swapper.wait(10)
        user_request("cfs-alice", agent, {"op": "lock"})
        shutil.rmtree(d, ignore_errors=True)
    assert kept and set(kept) == {os.path.realpath(vol.backing)}, kept
    assert_healthy(agent)


def test_answers_do_not_resolve_a_path_for_the_caller(agent: AgentProcess, vol: Vol) -> None:
    """Review finding: probe /proc/PID/cwd of another user's process answered with
    where that process works, in a directory the caller may not list; and a path
    that is no UTF-8 (a lone surrogate) logged a traceback per request."""
    bob = pwd.getpwnam("cfs-bob")
    private = vol.root / "bob-private"
    (private / "Project-Titan").mkdir(parents=True)
    os.chown(private, bob.pw_uid, bob.pw_gid)
    private.chmod(0o700)
    sleeper = subprocess.Popen(["sleep", "60"], user=bob.pw_uid, group=bob.pw_gid,
                               extra_groups=[], cwd=private / "Project-Titan")
    try:
        for op in ("probe", "unlock"):
            r = user_request("cfs-alice", agent, {"op": op, "backing": f"/proc/{sleeper.pid}/cwd"},
                             PASS["cfs-alice"] if op == "unlock" else None)
            assert r["ok"] is False and "Titan" not in r["message"], r
            assert f"/proc/{sleeper.pid}/cwd" in r["message"], r
    finally:
        sleeper.kill()
        sleeper.wait(10)
        shutil.rmtree(private, ignore_errors=True)
    r = user_request("cfs-alice", agent, {"op": "probe", "backing": "/\ud800"})
    assert r["code"] == "bad-request" and "not a UTF-8 path" in r["message"], r
    assert "Traceback" not in agent.log_text()
    assert_healthy(agent)


@pytest.mark.xfail(strict=True, reason="known limitation (docs/AGENT.md): the agent resolves "
                   "a caller's path with root's rights")
def test_the_agent_does_not_reveal_paths_the_caller_cannot_reach(agent: AgentProcess,
                                                                 vol: Vol) -> None:
    private = vol.root / "root-only"
    private.mkdir(mode=0o700)
    (private / "exists").mkdir()
    try:
        res = run_as("cfs-alice", "ls", str(private))
        assert res.returncode != 0  # alice herself cannot look in there
        answers = []
        for name in ("exists", "missing"):
            r = user_request("cfs-alice", agent, {"op": "unlock", "backing": str(private / name)},
                             PASS["cfs-alice"])
            answers.append((r["code"], r["message"].replace(name, "NAME")))
        assert answers[0] == answers[1], answers
    finally:
        shutil.rmtree(private)


# ================================================================================================
# Shutdown
# ================================================================================================

def test_sigterm_locks_everything_and_exits(start_agent: Callable[..., AgentProcess],
                                            vol: Vol) -> None:
    agent = start_agent("--idle-timeout", "0")
    for name in ("cfs-alice", "cfs-bob"):
        assert _unlock_cli(name, agent, vol.backing, vol.passfiles[name]).returncode == 0
    watcher = connect(agent, timeout=5)
    try:
        send(watcher, {"op": "watch", "backing": str(vol.backing),
                       "volume_id": _volume_id(vol.backing)})
        state = recv_reply(watcher)
        assert state["event"] == "state" and state["uids"] == [uid("cfs-alice"), uid("cfs-bob")]
        key = recv_frame(watcher)
        assert key is not None and key[0] == p.FRAME_SECRET and len(key[1]) == 32
        idle = connect(agent)  # a client in the middle of nothing
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        code = agent.proc.wait(5)
        assert code == 0
        events = []
        while (f := recv_frame(watcher)) is not None:
            if f[0] == p.FRAME_SECRET:
                continue  # the users' own keys, after their "user-key" events
            events.append(p.decode(*f))
        idle.close()
        # First each unlocked user's X25519 key (for hybrid files), then the locks.
        keys = [e for e in events if e["event"] == "user-key"]
        assert sorted(e["uid"] for e in keys) == [uid("cfs-alice"), uid("cfs-bob")]
        events = [e for e in events if e["event"] != "user-key"]
    finally:
        watcher.close()
    # The mount watching the volume was told: both users locked, then the key wiped.
    assert [(e["event"], e.get("uid")) for e in events] == [
        ("locked", uid("cfs-alice")), ("locked", uid("cfs-bob")), ("wipe", None)]
    assert all(e["reason"] == "agent stopping" for e in events[:2])
    log = agent.log_text()
    assert "signal 15: locking every session and stopping" in log
    for name in ("cfs-alice", "cfs-bob"):
        assert re.search(rf"INFO: lock: uid {uid(name)} \({name}\), volume [0-9a-f]{{32}} at "
                         rf"{re.escape(str(vol.backing))} \(agent stopping\)", log), log
    assert log.rstrip().endswith("agent stopped; every session is locked")
    assert "Traceback" not in log
    with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(agent.socket))
        finally:
            s.close()
    with pytest.raises(AgentError, match="no key agent is running"):
        AgentClient(str(agent.socket)).request({"op": "ping"})


def test_sigterm_with_no_sessions_and_busy_clients(start_agent: Callable[..., AgentProcess]
                                                   ) -> None:
    agent = start_agent("--idle-timeout", "0", "--request-timeout", "30")
    stalled = [connect(agent) for _ in range(50)]
    for s in stalled[:25]:
        s.sendall(struct.pack(">IB", 500, 1) + b"{")  # mid-request
    try:
        assert request(agent, {"op": "ping"})["ok"]
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(5) == 0  # the open connections do not hold it up
    finally:
        for s in stalled:
            s.close()
    assert "agent stopped; every session is locked" in agent.log_text()
