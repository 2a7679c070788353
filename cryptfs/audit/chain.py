"""The access log's records and chain: their encoding, hashes, seals and segments.

What both the writer (cryptfs.audit.writer) and the verifier
(cryptfs.audit.verify) must agree on, in one place.

A log directory holds::

    LOGDIR/audit.pub             the epoch-0 verifier key (what an auditor needs)
    LOGDIR/audit.key             the writer's current signing seed and epoch (0600)
    LOGDIR/segment-000001.log    JSON lines: a header, records, checkpoints
    LOGDIR/segment-000002.log    ...

**Chain.** Every record carries ``h = SHA-256(h_prev || canonical(record))``
(``h_prev`` of the first record ever: 32 zero bytes); a segment's header
names the index it must have and the ``h`` it continues from, so a segment
renamed, removed or reordered breaks the chain.

**Seals.** Every ``seal_every`` records or ``seal_seconds`` seconds, the
writer appends a checkpoint: a C2SP signed note whose body names the log,
the number of records so far, the last ``h``, the epoch, and the public key
of the *next* epoch, signed with the key of this epoch.  Then it derives the
next epoch's key and overwrites the old one in ``audit.key``.  An auditor
starts from ``audit.pub`` (epoch 0) and follows the keys each checkpoint
certifies; whoever takes the machine later holds only the current epoch's
key and cannot re-sign an earlier epoch.  Records after the last checkpoint
are the *unsealed tail*: the verifier counts them, but nothing proves them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing
import orjson

from cryptfs.errors import UsageError
from cryptfs.modes.kdf import hkdf

log = logging.getLogger("cryptfs")

KEY_NAME = "cryptfs-audit"
PUB_NAME = "audit.pub"
KEY_FILE = "audit.key"
CHUNK = 1 << 20  # bytes of a segment reserved at a time
SEGMENT_RE = re.compile(r"^segment-(\d{6})\.log$")
ZERO = bytes(32)
NOTE_SEP = "\n\u2014 "  # C2SP signed note: a blank line, then "— name sig" lines


def canonical(obj: Any) -> bytes:
    """The JSON text of ``obj`` that is hashed and signed: keys sorted, no
    whitespace, UTF-8, only ``"``, ``\\`` and control characters escaped
    (the same bytes as Python's ``json.dumps(obj, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False)``, made ten times faster)."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # (an int beyond 64 bits, in a record read back from an edited log)
        return json.dumps(obj, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False).encode("utf-8", "surrogatepass")


def utf8_text(v: Any) -> Any:
    """``v`` with every string made valid UTF-8 (lone surrogates written out)."""
    if isinstance(v, str):
        return v.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(v, dict):
        return {utf8_text(k): utf8_text(x) for k, x in v.items()}
    if isinstance(v, list):
        return [utf8_text(x) for x in v]
    return v


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def unb64(s: str) -> bytes:
    return base64.b64decode(s, validate=True)


def chain(prev: bytes, record: dict[str, Any]) -> bytes:
    return hashlib.sha256(prev + canonical(record)).digest()


def written_form(raw: bytes, obj: dict[str, Any], body: bytes | None = None) -> bool:
    """Whether the line ``raw`` (without its newline) is exactly what the
    writer makes of ``obj``, the line parsed: a record (it has ``seq``) is
    ``canonical(record without "h")`` with ``"h"`` added last; a header or a
    checkpoint is ``canonical(obj)``.  So a line whose bytes were edited in
    a way that parses the same (a duplicate key, spacing, key order,
    escapes, a CR) is not in written form, whichever duplicate a reader
    keeps.  ``body``: ``canonical(record without "h")`` if known."""
    if "seq" not in obj:
        return raw == canonical(obj)
    h = obj.get("h")
    if not isinstance(h, str) or len(obj) < 2:
        return False
    if body is None:
        body = canonical({k: v for k, v in obj.items() if k != "h"})
    return raw == body[:-1] + b',"h":' + canonical(h) + b"}"


def key_hash(public: bytes) -> bytes:
    """The 4-byte key id of a signed note: SHA-256(name || LF || 0x01 || key)[:4]."""
    return hashlib.sha256(KEY_NAME.encode() + b"\n\x01" + public).digest()[:4]


def verifier_text(public: bytes) -> str:
    """A note verifier key: name+keyid+base64(0x01 || key) (as C2SP signed-note)."""
    data = b64(bytes([1]) + public)
    return f"{KEY_NAME}+{key_hash(public).hex()}+{data}"


def parse_verifier(text: str) -> bytes:
    try:
        name, kid, data = text.strip().split("+", 2)
        raw = unb64(data)
    except ValueError:
        raise UsageError("not an audit verifier key (expected cryptfs-audit+<id>+<key>)") from None
    if name != KEY_NAME or len(raw) != 33 or raw[0] != 1 or key_hash(raw[1:]).hex() != kid:
        raise UsageError("not an audit verifier key (expected cryptfs-audit+<id>+<key>)")
    return raw[1:]


def evolve(seed: bytes) -> bytes:
    return hkdf(seed, b"cryptfs/audit/next-epoch")


def public_of(seed: bytes) -> bytes:
    return bytes(nacl.signing.SigningKey(seed).verify_key)


# -- checkpoints -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    log_id: str
    size: int  # records so far
    root: bytes  # the last record's h
    epoch: int
    next_key: bytes  # the public key of epoch + 1
    time_ns: int

    def body(self) -> str:
        return (f"{KEY_NAME}/{self.log_id}\n{self.size}\n{b64(self.root)}\n"
                f"epoch {self.epoch}\nnext {b64(self.next_key)}\ntime {self.time_ns}\n")

    def sign(self, seed: bytes) -> str:
        sk = nacl.signing.SigningKey(seed)
        sig = sk.sign(self.body().encode()).signature
        return self.body() + NOTE_SEP + f"{KEY_NAME} {b64(key_hash(public_of(seed)) + sig)}\n"

    @classmethod
    def open(cls, note: str, public: bytes) -> Checkpoint:
        """Parse a signed note and check its signature with ``public``."""
        body, sep, sigline = note.partition(NOTE_SEP)
        if not sep:
            raise ValueError("not a signed note")
        name, _, sig_b64 = sigline.strip().partition(" ")
        raw = unb64(sig_b64)
        if name != KEY_NAME or len(raw) != 68:
            raise ValueError("not a signature of a cryptfs log")
        if raw[:4] != key_hash(public):
            raise ValueError(f"signed by the key with id {raw[:4].hex()}, not by "
                             f"{key_hash(public).hex()}")
        try:
            nacl.signing.VerifyKey(public).verify(body.encode(), raw[4:])
        except nacl.exceptions.BadSignatureError:
            raise ValueError("bad signature") from None
        lines = body.split("\n")
        origin, size, root, epoch, nxt, when = lines[:6]
        if not origin.startswith(KEY_NAME + "/") or not epoch.startswith("epoch ") \
                or not nxt.startswith("next ") or not when.startswith("time "):
            raise ValueError("malformed checkpoint")
        return cls(origin[len(KEY_NAME) + 1:], int(size), unb64(root), int(epoch[6:]),
                   unb64(nxt[5:]), int(when[5:]))


def is_seq(v: Any) -> bool:
    """Whether ``v`` is a sequence number (a positive int, not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


# -- reading segments ------------------------------------------------------------------------------
def fd_data_end(fd: int) -> int:
    """Where the lines of a segment end: after its last newline, before a tail
    of NUL bytes (reserved, not used) or a line a crash cut short."""
    size = os.fstat(fd).st_size
    start = max(0, size - CHUNK)
    while True:
        tail = os.pread(fd, size - start, start)
        nl = tail.rfind(b"\n")
        if nl >= 0 or start == 0:
            return start + nl + 1
        start = max(0, start - CHUNK)


def data_end(path: str) -> int:
    """Where the lines of the segment at ``path`` end (see :func:`fd_data_end`)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fd_data_end(fd)
    finally:
        os.close(fd)


def segment_lines(data: bytes, live_ok: bool = True) -> tuple[list[bytes], int]:
    """The lines of a segment's bytes, and where the last whole one ends.

    A segment being written ends with reserved NUL bytes, and a reader's
    copy of it may end in the middle of a record being copied in (or have
    NULs where records were copied in after that part was read): everything
    from the first NUL on is left out, and so is a last line without its
    newline before it.  In a segment with no NUL (closed), such a line is
    kept: it was cut."""
    nul = data.find(b"\0")
    if nul >= 0:
        data = data[:nul]
        end = data.rfind(b"\n") + 1
        return _split(data[:end]), end
    lines = _split(data)
    end = len(data)
    if data and not data.endswith(b"\n") and not live_ok:
        end = data.rfind(b"\n") + 1
    return lines, end


def _split(data: bytes) -> list[bytes]:
    """Lines end at LF alone (the writer's): a CR, or any other byte that
    bytes.splitlines would take for a line end, stays part of its line."""
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return lines


def lines_of(path: str) -> Iterator[dict[str, Any]]:
    for _raw, obj in raw_lines_of(path):
        yield obj


def raw_lines_of(path: str) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """Each line of a segment, as its bytes and as parsed (``_unparsable``:
    a line that is not a JSON object)."""
    with open(path, "rb") as f:
        data = f.read()  # (one copy: a live segment changes under a reader)
    return parsed_lines(data)


def parsed_lines(data: bytes) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """:func:`raw_lines_of` for a segment's bytes already read."""
    for raw in segment_lines(data)[0]:
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = {"_unparsable": raw[:80].decode("utf-8", "replace")}
        yield raw, obj if isinstance(obj, dict) else {"_unparsable": str(obj)[:80]}
