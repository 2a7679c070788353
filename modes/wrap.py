"""Key wrapping: a per-file data key in, header stanzas out, and back.

A stanza is ``type (u8) || length (u16, big-endian) || body``.

Padding stanza (type 0): any body, ignored.  A hybrid header keeps room for
more recipients in one, so sharing a file never moves its content.

Symmetric stanza (type 1), body of 64 bytes::

    key_id (u32) || nonce (12) || AES-256-GCM(wrap_key[key_id], nonce, file_key, ad) (48)

    (key_id, then the file key sealed by cryptfs.modes.seal.Seal)

X25519 recipient stanza (type 2), body of 88 bytes (hybrid mode)::

    tag (8) || epk (32) || ChaCha20-Poly1305(k, zero nonce, file_key, ad) (48)

    tag = SHA-256("cryptfs/v1/recipient" || recipient public key)[:8]
    epk, k as in cryptfs.modes.x25519, label "cryptfs/v1/file-key"

``ad`` is supplied by the caller (the file header's fixed prefix), so a
wrapped key cannot be moved to another file.  Nonce rule: random per
symmetric wrap; a fresh ephemeral key per X25519 wrap.

Reading is strict: every stanza is parsed and checked (a type other than
these three, or a symmetric or X25519 stanza of another length, is an
integrity error wherever it stands), and every stanza the reader holds a key
for is opened: each must open, and all must give the same file key.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptfs.modes import x25519
from cryptfs.modes.errors import IntegrityError, NotARecipient, NotForMe
from cryptfs.modes.seal import OVERHEAD, Seal

FILE_KEY_LEN = 32  # bytes
STANZA_PADDING = 0
STANZA_SYMMETRIC = 1
STANZA_X25519 = 2
TAG_LEN = 8  # bytes
X25519_BODY_LEN = TAG_LEN + x25519.KEY_LEN + FILE_KEY_LEN + x25519.TAG_LEN  # 88
FILE_KEY_LABEL = b"cryptfs/v1/file-key"
_KEY_ID = struct.Struct(">I")
_SYM_BODY_LEN = _KEY_ID.size + OVERHEAD + FILE_KEY_LEN  # key_id || sealed file key: 64


@dataclass(frozen=True)
class Stanza:
    type: int
    body: bytes

    def encode(self) -> bytes:
        return struct.pack(">BH", self.type, len(self.body)) + self.body


# Body length of each stanza type (None: any).
BODY_LEN: dict[int, int | None] = {STANZA_PADDING: None, STANZA_SYMMETRIC: _SYM_BODY_LEN,
                                   STANZA_X25519: X25519_BODY_LEN}


def decode_stanzas(data: bytes | memoryview, count: int) -> tuple[list[Stanza], int]:
    """Parse ``count`` stanzas from the start of ``data``; returns them and bytes used.

    Each is checked: its type is known and its body has that type's length
    (IntegrityError otherwise), before any of them is used."""
    out: list[Stanza] = []
    pos = 0
    for _ in range(count):
        if pos + 3 > len(data):
            raise IntegrityError("truncated stanza")
        typ, length = struct.unpack_from(">BH", data, pos)
        pos += 3
        if pos + length > len(data):
            raise IntegrityError("truncated stanza")
        if typ not in BODY_LEN:
            raise IntegrityError("unknown stanza type")
        want = BODY_LEN[typ]
        if want is not None and length != want:
            raise IntegrityError("bad stanza length")
        out.append(Stanza(typ, bytes(data[pos : pos + length])))
        pos += length
    return out, pos


def recipient_tag(public: bytes) -> bytes:
    """The 8-byte tag that names an X25519 recipient in a stanza."""
    return hashlib.sha256(b"cryptfs/v1/recipient" + public).digest()[:TAG_LEN]


def x25519_stanza(file_key: bytes, public: bytes, ad: bytes) -> Stanza:
    return Stanza(STANZA_X25519,
                  recipient_tag(public) + x25519.wrap(file_key, public, FILE_KEY_LABEL, ad))


def padding(room: int) -> Stanza:
    """A padding stanza that takes ``room`` bytes of header (3 of them its own)."""
    return Stanza(STANZA_PADDING, bytes(room - 3))


def is_hybrid(stanzas: list[Stanza] | tuple[Stanza, ...]) -> bool:
    """A file whose key is wrapped to recipients only (no volume key opens it)."""
    types = {st.type for st in stanzas}
    return STANZA_X25519 in types and STANZA_SYMMETRIC not in types


def recipient_tags(stanzas: list[Stanza] | tuple[Stanza, ...]) -> list[bytes]:
    return [st.body[:TAG_LEN] for st in stanzas if st.type == STANZA_X25519]


class RecipientWrapper:
    """Wraps a new file key to a set of X25519 public keys (hybrid mode),
    leaving ``spare`` recipients' worth of padding for later shares."""

    def __init__(self, publics: list[bytes], spare: int = 0) -> None:
        if not publics:
            raise ValueError("a hybrid file needs at least one recipient")
        self.publics = list(dict.fromkeys(publics))
        self.spare = spare

    def wrap(self, file_key: bytes, ad: bytes) -> list[Stanza]:
        out = [x25519_stanza(file_key, pub, ad) for pub in self.publics]
        if self.spare:
            out.append(padding(self.spare * (3 + X25519_BODY_LEN)))
        return out


class Keyring:
    """Unwraps a file key with whatever the holder has: the volume's wrap
    keys by key id (current and retired) and X25519 private keys."""

    def __init__(self, symmetric: dict[int, SymmetricWrapper],
                 privates: list[bytes] | tuple[bytes, ...] = ()) -> None:
        self.symmetric = symmetric
        self.privates = {recipient_tag(x25519.public_key(p)): p for p in privates}

    def wrap(self, file_key: bytes, ad: bytes) -> list[Stanza]:
        raise TypeError("a keyring only unwraps")

    def unwrap(self, stanzas: list[Stanza], ad: bytes) -> bytes:
        """The file key.  Every stanza is checked, and every one this keyring
        has a key for is opened (not only the first): each must open and all
        must agree, or the header is damaged (IntegrityError).  None to open:
        NotARecipient for a hybrid file, NotForMe for a symmetric one."""
        found: bytes | None = None
        for st in stanzas:
            if BODY_LEN.get(st.type, -1) not in (None, len(st.body)):
                raise IntegrityError()
            key: bytes | None = None
            if st.type == STANZA_SYMMETRIC:
                w = self.symmetric.get(struct.unpack_from(">I", st.body)[0])
                if w is not None:
                    key = w.open_stanza(st, ad)
            elif st.type == STANZA_X25519:
                private = self.privates.get(st.body[:TAG_LEN])
                if private is not None:
                    try:
                        key = x25519.unwrap(st.body[TAG_LEN:], private, FILE_KEY_LABEL, ad)
                    except NotForMe:
                        raise IntegrityError() from None
            if key is not None:
                if found is not None and not hmac.compare_digest(key, found):
                    raise IntegrityError()
                found = key
        if found is not None:
            return found
        if is_hybrid(stanzas):
            raise NotARecipient()
        raise NotForMe()


class SymmetricWrapper:
    """Wraps file keys under a key derived from the volume master key."""

    def __init__(self, wrap_key: bytes, key_id: int) -> None:
        self._seal = Seal(wrap_key)
        self.key_id = key_id

    def wrap(self, file_key: bytes, ad: bytes) -> list[Stanza]:
        body = _KEY_ID.pack(self.key_id) + self._seal.seal(file_key, ad)
        return [Stanza(STANZA_SYMMETRIC, body)]

    def unwrap(self, stanzas: list[Stanza], ad: bytes) -> bytes:
        """As a keyring holding only this generation (every stanza checked)."""
        return Keyring({self.key_id: self}).unwrap(stanzas, ad)

    def open_stanza(self, st: Stanza, ad: bytes) -> bytes:
        """The file key in one symmetric stanza of this generation (IntegrityError
        if it does not open)."""
        if st.type != STANZA_SYMMETRIC or len(st.body) != _SYM_BODY_LEN:
            raise IntegrityError()
        (key_id,) = _KEY_ID.unpack_from(st.body)
        if key_id != self.key_id:
            raise IntegrityError()
        return self._seal.open(st.body[_KEY_ID.size:], ad)
