"""One user's request never stalls everyone else's (issue 12, part 4).

An agent opening a large CSV in a masked directory makes the mount build a
masked view of it (seconds of CPU).  That happens in a worker thread while
other users' requests are served; the mount's link to the key agent does not
take the mount's own slowness for the agent being gone.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

import pytest
import trio

from cryptfs.keyagent import link
from cryptfs.keyagent.liveness import LoopClock
from cryptfs.masking import Mask, parse_columns
from cryptfs.secret import Secret
from cryptfs.views import MAX_WAITING, PER_UID, Busy, ViewMaker
from multiuser import ROOT_PASSPHRASE, Shared, cli_as, run_as

pytestmark = pytest.mark.serial  # (it measures how long others wait: alone)

COLUMNS = ["surname=surname", "gender=keep", "phone=first:3,last:4", "card=first:6,last:4"]
HEAD = b"surname,gender,phone,card,address\n"
ROW = '王小明,女,13812341234,6222021234567890123,"北京市朝阳区, 1号"\n'.encode()
BIG = 32 << 20  # bytes: a view that takes this machine several seconds to make


def _policy(shared: Shared) -> None:
    from conftest import run_cli

    pf = shared.root / "root.pass"
    pf.write_bytes(ROOT_PASSPHRASE + b"\n")
    run_cli("policy", "set", str(shared.backing), "/calls", "--mode", "aes-256-gcm",
            "--mask", "*.csv", *(x for c in COLUMNS for x in ("--column", c)),
            "--passphrase-file", str(pf))


def test_a_large_masked_view_stalls_no_one_else(shared: Shared) -> None:
    for who in ("root", "cfs-alice", "cfs-carol"):
        assert shared.unlock(who).returncode == 0
    shared.path("calls").mkdir()
    shared.path("calls").chmod(0o777)
    _policy(shared)
    rows = BIG // len(ROW)
    big = shared.path("calls", "big.csv")
    # The agent writes the file itself (new rows in a masked directory).
    script = (f"import sys; f = open({str(big)!r}, 'ab'); f.write({HEAD!r}); "
              f"[f.write({ROW!r} * 1000) for _ in range({rows // 1000})]; f.close()")
    assert run_as("cfs-alice", "python3", "-c", script, timeout=120).returncode == 0
    shared.path("calls", "notes.txt").write_bytes(b"Wang called twice\n")
    os.chmod(shared.path("calls", "notes.txt"), 0o644)

    out = shared.root / "alice.out"
    with open(out, "wb") as sink:
        cat = subprocess.Popen(["cat", str(big)], user="cfs-alice", group="cfs-alice",
                               extra_groups=[], stdout=sink, stderr=subprocess.PIPE, cwd="/")
        try:
            shared.mount.wait_log("making a masked view of", timeout=30)
            # While the view is being made, the supervisor works as usual.
            t0 = time.monotonic()
            assert run_as("cfs-carol", "stat", str(shared.path("calls"))).returncode == 0
            assert run_as("cfs-carol", "ls", str(shared.path("calls"))).stdout.split() \
                == [b"big.csv", b"notes.txt"]
            assert run_as("cfs-carol", "cat", str(shared.path("calls", "notes.txt"))).stdout \
                == b"Wang called twice\n"
            # (the plaintext of the very file is refused while its view is
            # made, as while a view is open: they never share the page cache)
            assert run_as("cfs-carol", "head", "-c", "9", str(big)).returncode != 0
            took = time.monotonic() - t0
            # ...and all of that finished before the agent's open returned.
            assert cat.poll() is None, "the view was made before the other requests ran"
            cat_rc = cat.wait(timeout=300)
        finally:
            if cat.poll() is None:
                cat.kill()
                cat.wait()
    print(f"supervisor's four commands during the view: {took:.2f} s")
    assert cat_rc == 0, cat.stderr.read() if cat.stderr else b""
    # The agent's view is right (masked), and the file is intact.
    view_row = Mask("csv", parse_columns(COLUMNS)).view(HEAD + ROW, b"")[len(HEAD):]
    got = out.read_bytes()
    assert got == HEAD + view_row * (rows // 1000 * 1000)
    assert b"13812341234" not in got
    # Nobody was dropped: no "agent unavailable", everyone still unlocked.
    assert "key agent unavailable" not in shared.mount.log_text()
    for who in ("cfs-alice", "cfs-carol"):
        assert run_as(who, "cat", str(shared.path("calls", "notes.txt"))).stdout \
            == b"Wang called twice\n"
        status = cli_as(who, "status", env=shared.agent.env)
        assert status.returncode == 0 and str(shared.backing) in status.stdout
    res = run_as("cfs-carol", "sha256sum", str(big), timeout=120)
    plain = HEAD + ROW * (rows // 1000 * 1000)
    assert res.stdout.split()[0].decode() == hashlib.sha256(plain).hexdigest()


def test_opens_waiting_for_views_are_bounded() -> None:
    maker = ViewMaker()
    for _ in range(PER_UID):
        maker.admit(1000)
    with pytest.raises(Busy):
        maker.admit(1000)  # one user holds at most PER_UID request workers
    for uid in range(2000, 2000 + MAX_WAITING):
        try:
            maker.admit(uid)
        except Busy:
            break
    with pytest.raises(Busy):
        maker.admit(3000)  # everyone together at most MAX_WAITING
    maker.done(1000)
    maker.admit(1000)  # (a place freed is a place again)
    with pytest.raises(Busy):
        maker.admit(3000)
    maker.done(2000)
    maker.admit(3000)


# -- the link to the key agent ------------------------------------------------------------------

class _Gate:
    def __init__(self) -> None:
        self.lost: list[str] = []
        self.states = 0

    def agent_state(self, uids: list[int], master: Secret | None,
                    key_id: int | None = None) -> None:
        self.states += 1

    def agent_keys(self, master: Secret, key_id: int | None = None) -> None: ...
    def agent_wipe(self) -> None: ...
    def agent_unlocked(self, uid: int, private: Secret | None) -> None: ...
    def agent_user_key(self, uid: int, private: Secret) -> None: ...

    async def agent_locked(self, uid: int) -> None: ...

    async def agent_lost(self, why: str) -> None:
        self.lost.append(why)

    def take_activity(self) -> set[int]:
        return set()


async def _fake_agent(listener: trio.SocketListener, answer: bool) -> None:
    """A watch server that answers every ping (or, ``answer`` False, never does)."""
    from cryptfs.keyagent import protocol as p
    from cryptfs.keyagent.server import Conn

    async def serve(stream: trio.SocketStream) -> None:
        conn = Conn(stream)
        try:
            await conn.read_message()  # watch
            await conn.send(p.reply(event="state", uids=[]))
            while True:
                msg, _ = await conn.read_message()
                if msg.get("op") == "ping" and answer:
                    await conn.send(p.reply(event="pong"))
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the link reconnects

    await trio.serve_listeners(serve, [listener])


def _run_link(tmp_path: os.PathLike[str], agent: str, block_loop_for: float,
              run_for: float) -> _Gate:
    """The mount's link to an agent in the same trio loop: the real agent
    (``agent="real"``, dropping a silent watch after 1 s) or one that never
    answers a ping (``"mute"``)."""
    from cryptfs.keyagent.server import Agent, AgentOptions

    gate = _Gate()
    path = os.path.join(tmp_path, "agent.sock")
    backing = os.path.join(tmp_path, "backing")
    os.mkdir(backing, 0o700)

    async def main() -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX)
        await sock.bind(path)
        sock.listen()
        async with trio.open_nursery() as nursery:
            if agent == "real":
                await nursery.start(Agent(AgentOptions(request_timeout=1.0)).run, sock)
            else:
                nursery.start_soon(_fake_agent, trio.SocketListener(sock), False)
            nursery.start_soon(lambda: link.watch_agent(path, backing, "v", gate, ping_every=0.2,
                                                        answer_within=0.5))
            with trio.fail_after(10):  # (a link that never gets the state fails, not hangs)
                while gate.states == 0:
                    await trio.sleep(0.01)
            await trio.sleep(0.3)
            if block_loop_for:
                time.sleep(block_loop_for)  # the whole loop stalls, as a long handler would
            await trio.sleep(run_for)
            nursery.cancel_scope.cancel()

    trio.run(main)
    return gate


def test_a_stalled_loop_makes_neither_side_drop_the_other(tmp_path: os.PathLike[str]) -> None:
    # The loop (of the mount and of the agent: one here) blocked for 3 s:
    # six times the link's answer deadline, three times the agent's.
    gate = _run_link(tmp_path, "real", block_loop_for=3.0, run_for=1.5)
    assert gate.lost == []
    assert gate.states == 1  # (never dropped by the agent, so no reconnect)


def test_an_agent_that_stops_answering_is_still_lost(tmp_path: os.PathLike[str]) -> None:
    gate = _run_link(tmp_path, "mute", block_loop_for=0, run_for=1.5)
    assert gate.lost and gate.lost[0] == "no answer in time"


def test_the_loop_clock_counts_only_stalls() -> None:
    async def main() -> tuple[float, float]:
        clock = LoopClock()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(clock.run)
            await trio.sleep(0.5)
            quiet = clock.stalled()
            time.sleep(1.0)
            stalled = clock.stalled()  # (seen at once, before the heartbeat runs again)
            nursery.cancel_scope.cancel()
        return quiet, stalled

    quiet, stalled = trio.run(main)
    assert quiet < 0.2 and 0.8 < stalled < 1.5
