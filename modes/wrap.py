"""Key wrapping: a per-file data key in, header stanzas out, and back.

A stanza is ``type (u8) || length (u16, big-endian) || body``.  This module
knows the symmetric stanza; the hybrid public-key stanza plugs in beside it.

Symmetric stanza (type 1), body of 64 bytes::

    key_id (u32) || nonce (12) || AES-256-GCM(wrap_key[key_id], nonce, file_key, ad) (48)

``ad`` is supplied by the caller (the file header's fixed prefix), so a
wrapped key cannot be moved to another file.  Nonce rule: random per wrap.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cryptfs.modes.errors import IntegrityError, NotForMe
from cryptfs.modes.rand import random_bytes

FILE_KEY_LEN = 32  # bytes
STANZA_SYMMETRIC = 1
_NONCE_LEN = 12  # bytes
_SYM = struct.Struct(">I12s48s")


@dataclass(frozen=True)
class Stanza:
    type: int
    body: bytes

    def encode(self) -> bytes:
        return struct.pack(">BH", self.type, len(self.body)) + self.body


def decode_stanzas(data: bytes | memoryview, count: int) -> tuple[list[Stanza], int]:
    """Parse ``count`` stanzas from the start of ``data``; returns them and bytes used."""
    out: list[Stanza] = []
    pos = 0
    for _ in range(count):
        if pos + 3 > len(data):
            raise IntegrityError("truncated stanza")
        typ, length = struct.unpack_from(">BH", data, pos)
        pos += 3
        if pos + length > len(data):
            raise IntegrityError("truncated stanza")
        out.append(Stanza(typ, bytes(data[pos : pos + length])))
        pos += length
    return out, pos


class SymmetricWrapper:
    """Wraps file keys under a key derived from the volume master key."""

    def __init__(self, wrap_key: bytes, key_id: int) -> None:
        self._aead = AESGCM(wrap_key)
        self.key_id = key_id

    def wrap(self, file_key: bytes, ad: bytes) -> list[Stanza]:
        nonce = random_bytes(_NONCE_LEN)
        body = _SYM.pack(self.key_id, nonce, self._aead.encrypt(nonce, file_key, ad))
        return [Stanza(STANZA_SYMMETRIC, body)]

    def unwrap(self, stanzas: list[Stanza], ad: bytes) -> bytes:
        for st in stanzas:
            if st.type != STANZA_SYMMETRIC:
                continue
            if len(st.body) != _SYM.size:
                raise IntegrityError()
            key_id, nonce, ct = _SYM.unpack(st.body)
            if key_id != self.key_id:
                continue
            try:
                key = self._aead.decrypt(nonce, ct, ad)
            except InvalidTag:
                raise IntegrityError() from None
            return key
        raise NotForMe()
