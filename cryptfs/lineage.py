"""The lineage of a volume's key generations: who made which, checkable across skips.

A running key agent or mount holds one generation's master and must tell a
rotated config (follow it: sessions go on) from one put back from earlier or
forged by someone who lacks the current master (do not follow).  ``chain``
(cryptfs.config) proves that a holder of the generation *just before* the
config's made it; a holder that missed a generation (two rotations within
one config check, or made on another server) cannot check that alone.  The
lineage closes that gap without keeping any old master:

    each generation g has an Ed25519 key pair, seed = HKDF(master_g, "cryptfs/v2/lineage")
    a rotation from generation f to t appends one link to the config's ``lineage``:
        {"from": f, "to": t, "key": b64(public_t), "sig": b64(64 bytes)}
        sig = Ed25519-sign(private_f, "cryptfs/v2/lineage" || volume_id || u32(f) || u32(t)
                                      || public_t)
    links are consecutive (one's "to" is the next one's "from"), a writer makes
    the last one's "to" the config's key_id, and only the last KEPT links are kept.

A holder of generation h follows a config of generation n > h only if the
links from the one whose "from" is h verify one after the other, the first
with h's own public key and each next with the key the link before named,
and the last link names the public key of the master it opened for n.  So
every generation in between was made by a holder of the one before it.
Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing

from cryptfs.keys import VolumeKeys

KEPT = 16  # links kept: a holder more generations behind than this cannot follow
PUBLIC_LEN = 32  # bytes, an Ed25519 public key
SIG_LEN = 64  # bytes, an Ed25519 signature
_LABEL = b"cryptfs/v2/lineage"


@dataclass(frozen=True)
class Link:
    """Generation ``to`` (whose public key is ``key``) was made by a holder of ``frm``."""

    frm: int
    to: int
    key: bytes
    sig: bytes


def public_key(keys: VolumeKeys) -> bytes:
    return bytes(nacl.signing.SigningKey(keys.lineage_seed).verify_key)


def _message(volume_id: bytes, frm: int, to: int, key: bytes) -> bytes:
    return _LABEL + volume_id + struct.pack(">II", frm, to) + key


def extended(links: list[Link], volume_id: bytes, old: VolumeKeys, new: VolumeKeys) -> list[Link]:
    """``links`` with the link from ``old`` to ``new`` added (a lineage that does
    not end at ``old``, e.g. none yet, starts again with this link)."""
    key = public_key(new)
    sig = nacl.signing.SigningKey(old.lineage_seed).sign(
        _message(volume_id, old.key_id, new.key_id, key)).signature
    kept = links if links and links[-1].to == old.key_id else []
    return [*kept, Link(old.key_id, new.key_id, key, sig)][-KEPT:]


def descends(links: list[Link], volume_id: bytes, held: VolumeKeys, new: VolumeKeys) -> bool:
    """Whether ``new`` was made, generation by generation, by holders of ``held``'s line."""
    if new.key_id <= held.key_id:
        return False
    start = next((i for i, k in enumerate(links) if k.frm == held.key_id), None)
    if start is None:
        return False
    verifier = public_key(held)
    for k in links[start:]:
        try:
            nacl.signing.VerifyKey(verifier).verify(_message(volume_id, k.frm, k.to, k.key), k.sig)
        except nacl.exceptions.BadSignatureError:
            return False
        verifier = k.key
    return links[-1].to == new.key_id and verifier == public_key(new)


def _b64d(s: object) -> bytes:
    if not isinstance(s, str):
        raise ValueError("expected a base64 string")
    try:
        return base64.b64decode(s, validate=True)
    except binascii.Error:
        raise ValueError("bad base64") from None


def to_json(links: list[Link]) -> list[dict[str, Any]]:
    return [{"from": k.frm, "to": k.to, "key": base64.b64encode(k.key).decode("ascii"),
             "sig": base64.b64encode(k.sig).decode("ascii")} for k in links]


def from_json(v: Any, key_id: int) -> list[Link]:
    """The links of a config of generation ``key_id``; ValueError if malformed."""
    if not isinstance(v, list) or not 0 < len(v) <= KEPT:
        raise ValueError("lineage")
    links: list[Link] = []
    for d in v:
        if not isinstance(d, dict) or set(d) != {"from", "to", "key", "sig"}:
            raise ValueError("lineage link")
        frm, to = d["from"], d["to"]
        if not (isinstance(frm, int) and isinstance(to, int) and 1 <= frm < to):
            raise ValueError("lineage generations")
        key, sig = _b64d(d["key"]), _b64d(d["sig"])
        if len(key) != PUBLIC_LEN or len(sig) != SIG_LEN:
            raise ValueError("lineage key or signature length")
        if links and links[-1].to != frm:
            raise ValueError("lineage not consecutive")
        links.append(Link(frm, to, key, sig))
    if links[-1].to > key_id:
        raise ValueError("lineage goes past key_id")
    return links  # (one that stops short of key_id proves nothing: see descends)
