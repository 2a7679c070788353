"""The mount's side of the agent: a trio task that keeps a *watch* connection.

It tells a :class:`Gatekeeper` (the filesystem) which uids are unlocked and
hands it the volume's master key while anyone is; the filesystem serves
only those uids.  Every ``ping_every`` seconds it pings the agent and reports
which uids used the volume (so their sessions do not idle out); if the agent
does not answer in time, or the connection breaks, the gatekeeper is told
the agent is lost and denies everyone (fail closed) until the link is back.
"In time" is counted in the time this loop could listen: a mount whose own
loop was stalled does not take that for the agent being gone
(cryptfs.keyagent.liveness).
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Protocol

import trio

from cryptfs.keyagent import protocol as p
from cryptfs.keyagent.liveness import LoopClock, Silence
from cryptfs.keyagent.server import Conn, leaf
from cryptfs.secret import Secret

log = logging.getLogger("cryptfs")


class Gatekeeper(Protocol):
    def agent_state(self, uids: list[int], master: Secret | None,
                    key_id: int | None = None) -> None: ...
    def agent_keys(self, master: Secret, key_id: int | None = None) -> bool: ...
    def agent_wipe(self) -> None: ...
    def agent_unlocked(self, uid: int, private: Secret | None) -> None: ...
    def agent_user_key(self, uid: int, private: Secret) -> None: ...
    async def agent_locked(self, uid: int) -> None: ...
    async def agent_lost(self, why: str) -> None: ...
    def take_activity(self) -> set[int]: ...


class LinkError(Exception):
    pass


def _key_id(msg: dict[str, Any]) -> int | None:
    """The key generation the agent says the key it sends is of."""
    kid = msg.get("key_id")
    return kid if isinstance(kid, int) and not isinstance(kid, bool) else None


def _uids(msg: dict[str, Any]) -> list[int]:
    uids = msg.get("uids")
    if not isinstance(uids, list) or not all(isinstance(u, int) for u in uids):
        raise LinkError("malformed state from the agent")
    return uids


async def watch_agent(socket_path: str, backing: str, volume_id: str, gate: Gatekeeper, *,
                      ping_every: float = 2.0, answer_within: float = 5.0,
                      retry_max: float = 2.0) -> None:
    """Run until cancelled, reconnecting whenever the agent is gone.

    Nothing that happens on the link ends this task (it would end the mount):
    every failure is "agent lost", logged, and followed by a reconnect.
    """
    delay = 0.1
    up = False
    last_problem = ""
    while True:
        try:
            await _session(socket_path, backing, volume_id, gate, ping_every, answer_within)
            why = "the agent closed the connection"
        except Exception as group:  # noqa: BLE001 - see the docstring
            e = leaf(group)
            why = _describe(e)
            if not isinstance(e, _EXPECTED):
                log.error("key agent link failed unexpectedly (%s: %s)", type(e).__name__, e)
        if up or why != last_problem:
            log.warning("key agent unavailable (%s): access denied to everyone until it "
                        "is back", why)
        await gate.agent_lost(why)
        if up:
            delay = 0.1
        up, last_problem = False, why
        await trio.sleep(delay)
        delay = min(delay * 2, retry_max)


_EXPECTED = (OSError, EOFError, trio.BrokenResourceError, trio.ClosedResourceError,
             trio.TooSlowError, p.ProtocolError, LinkError)


async def _session(socket_path: str, backing: str, volume_id: str, gate: Gatekeeper,
                   ping_every: float, answer_within: float) -> None:
    """One connection: watch, hand the state to the gate, then follow events."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.fail_after(answer_within):
            await sock.connect(socket_path)
    except BaseException:
        sock.close()
        raise
    async with trio.SocketStream(sock) as stream:
        conn = Conn(stream)
        await conn.send({"op": "watch", "backing": backing, "volume_id": volume_id})
        with trio.fail_after(answer_within):
            state, master = await conn.read_message()
        if not state.get("ok") or state.get("event") != "state":
            raise LinkError(f"the agent refused to serve this volume: "
                            f"{state.get('message') or state.get('code')}")
        try:
            gate.agent_state(_uids(state), master, _key_id(state))
        finally:
            if master is not None:
                master.wipe()
        log.info("key agent connected at %s: %d user(s) unlocked", socket_path,
                 len(state["uids"]))
        clock = LoopClock()
        silence = Silence(clock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(clock.run)
            nursery.start_soon(_pinger, conn, gate, ping_every)
            # The agent is lost after this long without a word from it, not
            # counting the time this loop itself could not listen.
            nursery.start_soon(silence.watch, ping_every + answer_within)
            await _events(conn, gate, silence)
            nursery.cancel_scope.cancel()


def _describe(e: BaseException) -> str:
    if isinstance(e, trio.TooSlowError):
        return "no answer in time"
    if isinstance(e, (FileNotFoundError, ConnectionRefusedError)):
        return "not running"
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if isinstance(e, (EOFError, trio.BrokenResourceError, trio.ClosedResourceError)):
        return "connection lost"
    return str(e)


async def _pinger(conn: Conn, gate: Gatekeeper, every: float) -> None:
    while True:
        seen = gate.take_activity()
        if seen:
            await conn.send({"op": "activity", "uids": sorted(seen)})
        await conn.send({"op": "ping"})
        await trio.sleep(every)


async def _events(conn: Conn, gate: Gatekeeper, silence: Silence) -> None:
    while True:
        try:
            msg, secret = await conn.read_message()
        except EOFError:
            return
        silence.heard()
        try:
            event = msg.get("event")
            if not msg.get("ok"):
                raise LinkError(f"agent error: {msg.get('message') or msg.get('code')}")
            if event == "keys":
                if secret is None:
                    raise LinkError("keys event without a key")
                gate.agent_keys(secret, _key_id(msg))
            elif event == "wipe":
                gate.agent_wipe()
            elif event == "unlocked" and isinstance(msg.get("uid"), int):
                gate.agent_unlocked(msg["uid"], secret)
            elif event == "user-key" and isinstance(msg.get("uid"), int) and secret is not None:
                gate.agent_user_key(msg["uid"], secret)
            elif event == "locked" and isinstance(msg.get("uid"), int):
                await gate.agent_locked(msg["uid"])
            elif event != "pong":
                log.warning("key agent sent an unknown event %r (ignored)", event)
        finally:
            if secret is not None:
                secret.wipe()
        seq = msg.get("seq")
        if isinstance(seq, int) and event != "pong":
            await conn.send({"op": "ack", "seq": seq})  # applied: the agent may answer its client
