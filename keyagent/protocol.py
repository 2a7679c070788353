"""The agent's wire protocol: frames and messages (pure: no I/O, no trio).

Every frame on the socket::

    length  u32 big-endian   number of bytes that follow (type + body), 1..MAX_FRAME
    type    u8               1 = message, 2 = secret
    body    length - 1 bytes

A *message* body is one JSON object in UTF-8.  A *secret* body is raw bytes
(a passphrase, a master key); it only ever follows a message that announces
it with ``"secret": true``, and it is kept out of JSON so that the receiver
can hold it in a buffer it overwrites afterwards (a JSON string is an
immutable ``str`` that Python never wipes).

Requests carry ``"v": 1`` and ``"op"``.  Every reply and every event has the
same shape: ``{"v": 1, "ok": bool, "code": str, "message": str, ...data}``.
docs/AGENT.md lists the operations.
"""

from __future__ import annotations

import json
import struct
from typing import Any

VERSION = 1
MAX_FRAME = 64 * 1024  # bytes, type byte included
MAX_SECRET = 4096  # bytes
LEN_BYTES = 4

FRAME_MESSAGE = 1
FRAME_SECRET = 2

# Reply codes (docs/AGENT.md explains each).
OK = "ok"
BAD_REQUEST = "bad-request"
UNSUPPORTED_VERSION = "unsupported-version"
TOO_LARGE = "too-large"
DENIED = "denied"
WRONG_PASSPHRASE = "wrong-passphrase"  # noqa: S105 - a reply code
BACKOFF = "backoff"
NO_SLOT = "no-slot"
NOT_A_VOLUME = "not-a-volume"
BUSY = "busy"
TIMEOUT = "timeout"
INTERNAL = "internal"

OPS = frozenset({"ping", "probe", "unlock", "lock", "status", "watch", "activity", "ack"})


class ProtocolError(Exception):
    """A peer broke the protocol; ``code`` is the reply code to send before closing."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def short(value: Any, limit: int = 40) -> str:
    """A client's value quoted in a reply, cut short (a reply must stay small)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def fits(msg: dict[str, Any]) -> bool:
    try:
        encode(msg)
        return True
    except ProtocolError:
        return False


def frame(kind: int, body: bytes | bytearray) -> bytes:
    if len(body) + 1 > MAX_FRAME:
        raise ProtocolError(TOO_LARGE, "frame too large")
    return struct.pack(">IB", len(body) + 1, kind) + bytes(body)


def frame_length(head: bytes) -> int:
    """Bytes (type + body) that follow a 4-byte length prefix; checks the limit."""
    (n,) = struct.unpack(">I", head)
    if n == 0:
        raise ProtocolError(BAD_REQUEST, "empty frame")
    if n > MAX_FRAME:
        raise ProtocolError(TOO_LARGE, f"frame of {n} bytes exceeds the limit of {MAX_FRAME}")
    return n


def encode(msg: dict[str, Any]) -> bytes:
    msg = {"v": VERSION, **msg}
    return frame(FRAME_MESSAGE, json.dumps(msg, separators=(",", ":")).encode())


def decode(kind: int, body: bytes | bytearray) -> dict[str, Any]:
    """A message frame's JSON object, its version checked."""
    if kind != FRAME_MESSAGE:
        raise ProtocolError(BAD_REQUEST, "expected a message frame")
    try:
        msg = json.loads(bytes(body).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(BAD_REQUEST, "message is not UTF-8 JSON (or nests too deep)") from None
    if not isinstance(msg, dict):
        raise ProtocolError(BAD_REQUEST, "message is not a JSON object")
    version = msg.get("v")
    if type(version) is not int or version != VERSION:
        raise ProtocolError(UNSUPPORTED_VERSION,
                            f"protocol version {short(msg.get('v'))} is not supported (this agent "
                            f"speaks {VERSION})")
    return msg


def request_op(msg: dict[str, Any]) -> str:
    op = msg.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(BAD_REQUEST, f"unknown operation {short(op)}")
    return op


def reply(ok: bool = True, code: str = OK, message: str = "", **data: Any) -> dict[str, Any]:
    return {"ok": ok, "code": code, "message": message, **data}


def error(code: str, message: str, **data: Any) -> dict[str, Any]:
    return reply(False, code, message, **data)


def field(msg: dict[str, Any], name: str, typ: type, default: Any = None,
          required: bool = False) -> Any:
    """A typed field of a request (bool is not accepted as int)."""
    if name not in msg or msg[name] is None:
        if required:
            raise ProtocolError(BAD_REQUEST, f"missing field {name!r}")
        return default
    v = msg[name]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise ProtocolError(BAD_REQUEST, f"field {name!r} must be {typ.__name__}")
    return v
