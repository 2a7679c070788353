"""The keys of an unlocked volume, all derived by HKDF.

    master (32 B, random, of key generation ``key_id``; stored only wrapped:
      |     to each user's X25519 key, to the recovery key, in v1 key slots)
      |- HKDF "cryptfs/v1/config"    -> HMAC-SHA256 key over the volume config
      |- HKDF "cryptfs/v1/wrap"      -> AES-256-GCM key that wraps per-file data keys
      |- HKDF "cryptfs/v2/base"      -> AES-256-GCM key that wraps the base key (config)
      |- HKDF "cryptfs/v2/retired"   -> AES-256-GCM key that wraps retired masters (config)
      '- HKDF "cryptfs/v2/lineage"   -> Ed25519 seed: signs the next generation's lineage
                                        link (cryptfs.lineage)

    base (the first generation's master; kept across rotations)
      |- HKDF "cryptfs/v1/names"     -> AES-SIV key (64 B) for file names and xattr names
      |- HKDF "cryptfs/v1/symlink"   -> AES-256-GCM key for symlink targets
      |- HKDF "cryptfs/v1/xattr"     -> AES-256-GCM key for user.* xattr values
      |- HKDF "cryptfs/v2/policy"    -> AES-256-GCM key for the directory policy (config)
      |- HKDF "cryptfs/v2/mask-token" -> mask-token key; per file (masked views' token
      |      columns): HKDF(it, "cryptfs/v2/mask-token/file" || file id || SHA-256(file key))
      |      -> 32 B HMAC key
      '- HKDF "cryptfs/v2/authority" -> the authority key: in every v2 slot and the
                                        recovery key file; binds the wraps of the master

A volume never rotated has no separate base: base = master.  A retired
master (an older generation, while a rotation re-wraps headers) only
unwraps file keys; it derives nothing else.

Per file (see cryptfs.header):
    file_key (32 B, random) -HKDF "cryptfs/v1/file"-> content key (32) || header MAC key (32)
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from cryptfs.modes.content import FILE_ID_LEN
from cryptfs.modes.kdf import hkdf
from cryptfs.modes.seal import Seal
from cryptfs.modes.wrap import Keyring, SymmetricWrapper
from cryptfs.secret import Secret

MASTER_KEY_LEN = 32  # bytes


def wrap_key(master: bytes) -> bytes:
    return hkdf(master, b"cryptfs/v1/wrap")


class VolumeKeys:
    """Derived keys of one unlocked volume.  ``close()`` drops them."""

    def __init__(self, master: Secret, key_id: int, base: Secret | None = None,
                 retired: dict[int, Secret] | None = None) -> None:
        m = master.reveal()
        self.master = master
        self.base = base if base is not None else master
        self.retired = dict(retired or {})
        self.key_id = key_id
        b = self.base.reveal()
        self.config_mac_key = hkdf(m, b"cryptfs/v1/config")
        self.base_wrap = Seal(hkdf(m, b"cryptfs/v2/base"))
        self.retired_wrap = Seal(hkdf(m, b"cryptfs/v2/retired"))
        self.wrapper = SymmetricWrapper(wrap_key(m), key_id)
        self.symmetric = {key_id: self.wrapper}
        for kid, old in self.retired.items():
            self.symmetric[kid] = SymmetricWrapper(wrap_key(old.reveal()), kid)
        self.names = AESSIV(hkdf(b, b"cryptfs/v1/names", 64))
        self.symlink = Seal(hkdf(b, b"cryptfs/v1/symlink"))
        self.xattr = Seal(hkdf(b, b"cryptfs/v1/xattr"))
        self.policy = Seal(hkdf(b, b"cryptfs/v2/policy"))
        self.mask_token = hkdf(b, b"cryptfs/v2/mask-token")  # (masked views: token columns)
        # Held in every v2 slot (sealed by the passphrase) and in the recovery
        # key file, never derivable from the config alone: it authenticates
        # the wraps of the master, which public keys alone would let anyone make.
        self.authority = hkdf(b, b"cryptfs/v2/authority")
        # Names this generation's master in the chain proof of the next one.
        self.fingerprint = hkdf(m, b"cryptfs/v2/fingerprint")
        # Signs (Ed25519 seed) the lineage link to the next generation (cryptfs.lineage).
        self.lineage_seed = hkdf(m, b"cryptfs/v2/lineage")

    def mask_token_key(self, file_id: bytes, file_key: bytes) -> bytes:
        """The HMAC key of the ``token`` columns in one file's masked views.

        Bound to the file's random id and to its file key (both from its
        authenticated header): the tokens an agent sees of rows it wrote into
        a file of its own say nothing of the tokens of any other file.  The id
        alone is not enough: anyone with the users' public keys can make a
        hybrid header, and so one that carries another file's id; the other
        file's key is what such a header cannot carry."""
        if len(file_id) != FILE_ID_LEN:
            raise ValueError("a file id has 16 bytes")
        return hkdf(self.mask_token, b"cryptfs/v2/mask-token/file" + file_id
                    + hashlib.sha256(file_key).digest())

    def keyring(self, privates: list[bytes] | tuple[bytes, ...] = ()) -> Keyring:
        """What opens file headers: these wrap keys, plus the given X25519 keys
        (bare private keys, or user keys: private key || authority key)."""
        return Keyring(self.symmetric, [p[:32] for p in privates])

    def __repr__(self) -> str:
        return f"<VolumeKeys key_id={self.key_id}, redacted>"

    def close(self) -> None:
        self.master.wipe()
        self.base.wipe()
        for old in self.retired.values():
            old.wipe()
