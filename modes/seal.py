"""The one AEAD seal for small secrets and records (not file content: see cryptfs.modes.content).

Layout of a sealed value (:class:`Seal`)::

    nonce (12, random) || AES-256-GCM(key, nonce, plaintext, ad): len(plaintext) + 16

Nonce rule: a fresh random 96-bit nonce from cryptfs.modes.rand for every
seal.  Random nonces are safe while one key seals fewer than 2**32 values
(NIST SP 800-38D, 8.3); every key here seals a handful per volume change, or
one per symlink, xattr write or file-key wrap, far below that.

Associated data: the caller binds what the sealed bytes belong to, so a
sealed value moved elsewhere does not open.  Each key is HKDF-derived for one
purpose (cryptfs.keys), and its users bind:

    user                     key (HKDF label)          ad
    a key slot               Argon2id(passphrase)      "cryptfs/v1/slot" or "cryptfs/v2/slot" ||
                                                       volume id || slot id (u32 BE) || the kdf
                                                       parameters (canonical JSON) [|| public key]
    base / retired masters   cryptfs/v2/base|retired   volume id [|| retired key id (u32 BE)]
    symlink target           cryptfs/v1/symlink        "cryptfs/v1/symlink"
    xattr value              cryptfs/v1/xattr          the backing xattr name (ASCII)
    directory policy         cryptfs/v2/policy         "cryptfs/v2/policy" || volume id
    file key (symmetric)     cryptfs/v1/wrap           the file header's fixed prefix
                                                       (stored after its key id: key_id || sealed)

(cryptfs.config, cryptfs.names, cryptfs.policy, cryptfs.modes.wrap; the
exact bytes are in docs/FORMAT.md.)

:func:`seal_single_use` is the other rule, for a key that seals exactly one
value (a fresh X25519 wrap key, as age does): ChaCha20-Poly1305 under the
fixed all-zero nonce, which is never reused because the key never is.

Every failure to open (wrong key, changed bytes, too short) is one
:class:`IntegrityError`, saying nothing more.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from cryptfs.modes.errors import IntegrityError
from cryptfs.modes.rand import random_bytes

KEY_LEN = 32  # bytes
NONCE_LEN = 12  # bytes
TAG_LEN = 16  # bytes
OVERHEAD = NONCE_LEN + TAG_LEN  # bytes a sealed value is longer than its plaintext
_ZERO_NONCE = bytes(NONCE_LEN)


class Seal:
    """AES-256-GCM under one key, with a random nonce stored in front."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_LEN:
            raise ValueError("a seal key is 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, ad: bytes) -> bytes:
        nonce = random_bytes(NONCE_LEN)
        return nonce + self._aead.encrypt(nonce, plaintext, ad)

    def open(self, sealed: bytes, ad: bytes) -> bytes:
        if len(sealed) < OVERHEAD:
            raise IntegrityError()
        try:
            return self._aead.decrypt(sealed[:NONCE_LEN], sealed[NONCE_LEN:], ad)
        except InvalidTag:
            raise IntegrityError() from None

    def __repr__(self) -> str:
        return "<Seal, redacted>"


def seal_single_use(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """Seal under a key used for this one value only: ciphertext || tag, no nonce stored."""
    return ChaCha20Poly1305(key).encrypt(_ZERO_NONCE, plaintext, ad)


def open_single_use(key: bytes, sealed: bytes, ad: bytes) -> bytes:
    try:
        return ChaCha20Poly1305(key).decrypt(_ZERO_NONCE, sealed, ad)
    except InvalidTag:
        raise IntegrityError() from None
