"""Wrapping a secret to an X25519 public key, the way age's X25519 recipient does.

Layout of a wrapped secret (``wrap`` output)::

    epk (32)  the ephemeral public key, X25519(e, basepoint) for a fresh random e
    ct        ChaCha20-Poly1305(k, nonce = 12 zero bytes, secret, ad): len(secret) + 16

    shared = X25519(e, recipient)          (refused if all zero)
    k      = HKDF-SHA256(ikm = shared, salt = epk || recipient, info = label)

Nonce rule: every wrap derives a fresh key from a fresh ephemeral key, so
the fixed zero nonce is never used twice under one key (as in age;
cryptfs.modes.seal.seal_single_use).  The
``label`` names the purpose (e.g. ``b"cryptfs/v1/recovery"``), so a wrap made
for one purpose never opens as another.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cryptfs.modes.errors import IntegrityError, NotForMe
from cryptfs.modes.kdf import hkdf
from cryptfs.modes.rand import random_bytes
from cryptfs.modes.seal import open_single_use, seal_single_use

KEY_LEN = 32  # bytes: X25519 private and public keys
TAG_LEN = 16  # bytes


def new_private_key() -> bytes:
    return random_bytes(KEY_LEN)


def public_key(private: bytes) -> bytes:
    return (X25519PrivateKey.from_private_bytes(private).public_key()
            .public_bytes(Encoding.Raw, PublicFormat.Raw))


def _key(me: X25519PrivateKey, peer: bytes, epk: bytes, recipient: bytes, label: bytes) -> bytes:
    """The wrapping key of one wrap: X25519(me, peer), then HKDF as above."""
    try:
        shared = me.exchange(X25519PublicKey.from_public_bytes(peer))
    except ValueError:
        raise IntegrityError("unusable X25519 key") from None
    if shared == bytes(KEY_LEN):
        raise IntegrityError("low-order X25519 point")
    return hkdf(shared, label, salt=epk + recipient)


def wrap(secret: bytes, recipient: bytes, label: bytes, ad: bytes = b"") -> bytes:
    """``secret`` wrapped to the X25519 public key ``recipient``."""
    if len(recipient) != KEY_LEN:
        raise ValueError("an X25519 public key is 32 bytes")
    eph = new_private_key()
    epk = public_key(eph)
    k = _key(X25519PrivateKey.from_private_bytes(eph), recipient, epk, recipient, label)
    return epk + seal_single_use(k, secret, ad)


def unwrap(wrapped: bytes, private: bytes, label: bytes, ad: bytes = b"") -> bytes:
    """The secret, if ``private`` is the recipient's key.

    Raises NotForMe if it is not (the tag does not verify: wrong key, or the
    wrapped bytes were changed; the two cannot be told apart), and
    IntegrityError if ``wrapped`` is malformed.
    """
    if len(wrapped) < KEY_LEN + TAG_LEN:
        raise IntegrityError("wrapped key too short")
    epk, ct = wrapped[:KEY_LEN], wrapped[KEY_LEN:]
    k = _key(X25519PrivateKey.from_private_bytes(private), epk, epk, public_key(private), label)
    try:
        return open_single_use(k, ct, ad)
    except IntegrityError:
        raise NotForMe() from None
