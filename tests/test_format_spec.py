"""An independent decryptor written from docs/FORMAT.md alone, and tests that run it.

Nothing here imports cryptfs: the decryptor uses only the standard library, ``cryptography``
and ``nacl``, so that it proves the document is enough to read a volume.  It is run on the
frozen sample volumes, on fresh volumes written through a real mount (symmetric and hybrid
files, before and after key rotations), opened with a passphrase and with the recovery key,
and on tampered copies (every authentication failure must raise :class:`SpecError`; a hybrid
file that is merely not for this reader raises :class:`NotRecipient` instead), including
configs forged by an outsider (who lacks the authority key) and by a former user (which a cold
reader accepts, as FORMAT.md says; :func:`verify_chain` is what a running holder checks).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import random
import shutil
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.pwhash
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl import bindings as sodium

from conftest import PASSPHRASE, Mount, make_volume, new_mount, run_cli

DATA = Path(__file__).parent / "data"
SAMPLES = sorted(p for p in DATA.iterdir() if p.is_dir() and p.name.startswith("sample-v"))
SAMPLES_V1 = [p for p in SAMPLES if p.name.startswith("sample-v1-")]
SAMPLES_V2 = [p for p in SAMPLES if p.name.startswith("sample-v2-")]

# ---------------------------------------------------------------------------------------------
# The decryptor (FORMAT.md, versions 1 and 2)
# ---------------------------------------------------------------------------------------------

CONFIG_VERSIONS = (1, 2)
# The same feature set in versions 1 and 2: v2 adds config keys and stanza types, not features.
FEATURES_V1 = {"aead-blocks", "last-block-flag", "long-names", "siv-names", "xattrs"}
V2_CONFIG_KEYS = {"base", "retired", "rotation", "policy", "chain", "lineage"}
# "except during and after a rotation": what a config shows of one (see V2Rules in open_config)
ROTATED_KEYS = {"base", "retired", "rotation", "chain", "lineage"}
V2_SLOT_KEYS = {"public", "master"}
ROLES = {"agent", "supervisor", "technician", "admin", "auditor"}
MAGIC = b"CRYPTF"
BS = 4096
MODES = {1: ("aes-256-gcm", 12), 2: ("xchacha20-poly1305", 24)}  # mode id -> (name, nonce length)
MODE_IDS = {name: mid for mid, (name, _) in MODES.items()}
TAG = 16
FLAG_HOLES = 0x0001
STANZA_PADDING = 0
STANZA_SYMMETRIC = 1
STANZA_X25519 = 2
RECOVERY_MAGIC = "CRYPTFS-RECOVERY-KEY-2"     # <vid>:<b64 r>:<b64 A>, for version 2 configs
RECOVERY_MAGIC_V1 = "CRYPTFS-RECOVERY-KEY-1"  # <vid>:<b64 r>, for version 1 configs (no "auth")
JOURNAL = "cryptfs.rotate.journal"
JOURNAL_MAGIC = b"CRYPTFSJ"
XATTR_PREFIX = "user.cryptfs."
LAYOUT_HINT = "user.cryptfs-layout"  # FORMAT.md, "Layout hint": not a user attribute


def check_layout_hint(path: bytes, raw: bytes) -> None:
    """If the optional hint is present, it must name the header's mode id and length."""
    try:
        hint = os.getxattr(path, LAYOUT_HINT, follow_symlinks=False)
    except OSError:
        return
    if hint != raw[7:8] + raw[10:12]:
        raise SpecError(f"layout hint {hint.hex()} disagrees with the header")


class SpecError(Exception):
    """The volume does not decrypt/authenticate as FORMAT.md says it must."""


class NotRecipient(Exception):
    """A hybrid file none of whose X25519 stanzas names a key this reader holds.

    Not damage (deliberately not a SpecError): FORMAT.md, "a hybrid one is simply not for this
    reader".  Its contents cannot be authenticated by this reader either."""


def b64u_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text: str | bytes) -> bytes:
    if isinstance(text, bytes):
        text = text.decode("ascii")
    if "=" in text or not text or any(c not in _B64U for c in text):
        raise SpecError(f"not unpadded url-safe base64: {text!r}")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError as e:
        raise SpecError(f"bad base64: {text!r}") from e
    if b64u_encode(raw) != text:  # non-canonical trailing bits
        raise SpecError(f"non-canonical base64: {text!r}")
    return raw


_B64U = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def b64(text: Any, length: int | None, what: str) -> bytes:
    """Standard padded base64 (FORMAT.md ``b64``) of exactly ``length`` bytes."""
    if not isinstance(text, str):
        raise SpecError(f"{what}: not a base64 string: {text!r}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SpecError(f"{what}: bad base64") from e
    if length is not None and len(raw) != length:
        raise SpecError(f"{what}: {len(raw)} bytes, not {length}")
    return raw


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def hkdf(ikm: bytes, info: str, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=info.encode("ascii")).derive(ikm)


def canonical(x: Any) -> bytes:
    return json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def gcm_open(key: bytes, nonce: bytes, ct: bytes, ad: bytes, what: str) -> bytes:
    try:
        return AESGCM(key).decrypt(nonce, ct, ad)
    except InvalidTag as e:
        raise SpecError(f"{what}: AES-GCM authentication failed") from e


def xchacha_open(key: bytes, nonce: bytes, ct: bytes, ad: bytes, what: str) -> bytes:
    try:
        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ct, ad, nonce, key)
    except nacl.exceptions.CryptoError as e:
        raise SpecError(f"{what}: XChaCha20-Poly1305 authentication failed") from e


def siv_open(key: bytes, data: bytes, ad: list[bytes], what: str) -> bytes:
    if len(data) < 16:
        raise SpecError(f"{what}: AES-SIV input too short")
    try:
        return AESSIV(key).decrypt(data, ad)
    except InvalidTag as e:
        raise SpecError(f"{what}: AES-SIV authentication failed") from e


def x25519_public(private: bytes) -> bytes:
    """X25519(r, 9)."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


def x25519_unwrap(w: bytes, r: bytes, label: str, ad: bytes, what: str) -> bytes:
    """FORMAT.md ``X25519-unwrap(w, r, label, ad)`` (age's X25519 recipient construction)."""
    if len(w) < 32 + TAG:
        raise SpecError(f"{what}: X25519 wrap too short")
    epk = w[:32]
    pub = x25519_public(r)
    try:
        shared = X25519PrivateKey.from_private_bytes(r).exchange(X25519PublicKey.from_public_bytes(epk))
    except ValueError as e:  # the library refuses an all-zero shared secret
        raise SpecError(f"{what}: X25519 shared secret is all zeros") from e
    if shared == bytes(32):
        raise SpecError(f"{what}: X25519 shared secret is all zeros")
    k = HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + pub,
             info=label.encode("ascii")).derive(shared)
    try:
        return ChaCha20Poly1305(k).decrypt(bytes(12), w[32:], ad)
    except InvalidTag as e:
        raise SpecError(f"{what}: ChaCha20-Poly1305 authentication failed") from e


def recipient_tag(public: bytes) -> bytes:
    return hashlib.sha256(b"cryptfs/v1/recipient" + public).digest()[:8]


@dataclass
class Entry:
    kind: str                     # file, dir, symlink, fifo, socket
    data: bytes = b""             # file contents / symlink target (b"" if not a recipient)
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    mode_id: int = 0              # content mode id (files)
    flags: int = 0                # header flags (files)
    backing: str = ""             # backing path (for tamper tests)
    hybrid: bool = False          # files: X25519 stanzas and no symmetric one
    readable: bool = True         # files: False for a hybrid file this reader is not a recipient of
    key_ids: list[int] = field(default_factory=list)   # files: generations of symmetric stanzas
    tags: list[bytes] = field(default_factory=list)    # files: recipient tags of X25519 stanzas
    padding: int = 0              # files: bytes of padding stanzas (bodies)


@dataclass
class Keys:
    master: bytes                 # the current master (generation key_id)
    key_id: int
    wraps: dict[int, bytes]       # generation -> wrap key (current and retired)
    base: bytes
    names: bytes
    symlink: bytes
    xattr: bytes
    private: dict[bytes, bytes]   # recipient tag -> X25519 private key this reader holds
    policy: dict[str, Any] | None = None
    slot_id: int | None = None    # the slot the passphrase opened (None: recovery key)
    authority: bytes | None = None  # A, from the v2 slot or the recovery key file (checked)
    retired: dict[int, bytes] = field(default_factory=dict)  # generation -> retired master

    @property
    def wrap(self) -> bytes:
        return self.wraps[self.key_id]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """FORMAT.md: "No object in it names a key twice"."""
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise SpecError(f"config: a key named twice in one object: {sorted(keys)!r}")
    return dict(pairs)


# FORMAT.md: the keys each object of the config may hold ("no object holds a key this page
# does not name for it: a reader refuses such a config before using anything in it").
CONFIG_KEYS = {"cryptfs", "volume_id", "created", "default_mode", "features", "kdf", "key_id",
               "slots", "recovery", "base", "retired", "rotation", "policy", "chain", "lineage",
               "audit", "mac"}
KDF_KEYS = {"algorithm", "ops", "mem_kib"}                   # the config's default kdf: no salt
SLOT_KDF_KEYS = KDF_KEYS | {"salt"}                          # a slot's kdf: the salt required
SLOT_KEYS = {"id", "label", "created", "kdf", "wrapped"} | {"user", "uid", "role"} | V2_SLOT_KEYS
OBJECT_KEYS = {"recovery": {"public", "wrapped", "auth"}, "rotation": {"kind", "started"},
               "chain": {"from", "mac"}, "audit": {"dir", "key"}}
RETIRED_KEYS = {"key_id", "wrapped"}
LINK_KEYS = {"from", "to", "key", "sig"}  # an entry of lineage
POLICY_KEYS = {"version", "rules"}
RULE_KEYS = {"path", "mode", "hybrid", "recipients", "dropbox", "programs", "untrusted", "masks"}


def _only(obj: Any, keys: set[str], where: str) -> None:
    if isinstance(obj, dict) and set(obj) - keys:
        raise SpecError(f"config: unknown field(s) {sorted(set(obj) - keys)} in {where}")


def check_known_keys(conf: dict[str, Any]) -> None:
    _only(conf, CONFIG_KEYS, "the config")
    _only(conf.get("kdf"), KDF_KEYS, "kdf")
    for slot in conf.get("slots") if isinstance(conf.get("slots"), list) else []:
        _only(slot, SLOT_KEYS, "a slot")
        if isinstance(slot, dict):
            _only(slot.get("kdf"), SLOT_KDF_KEYS, "a slot's kdf")
            if isinstance(slot.get("kdf"), dict) and "salt" not in slot["kdf"]:
                raise SpecError("config: a slot's kdf has no salt")
    for key, keys in OBJECT_KEYS.items():
        _only(conf.get(key), keys, key)
    for item in conf.get("retired") if isinstance(conf.get("retired"), list) else []:
        _only(item, RETIRED_KEYS, "an entry of retired")
    for item in conf.get("lineage") if isinstance(conf.get("lineage"), list) else []:
        _only(item, LINK_KEYS, "an entry of lineage")


def load_config(backing: Path) -> dict[str, Any]:
    try:
        conf = json.loads((backing / "cryptfs.conf").read_bytes().decode("utf-8"),
                          object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError(f"cryptfs.conf is not UTF-8 JSON: {e}") from e
    if not isinstance(conf, dict):
        raise SpecError("cryptfs.conf is not a JSON object")
    check_known_keys(conf)
    return conf


def read_recovery_key(path: Path) -> tuple[bytes, bytes, bytes | None]:
    """The recovery key file -> (volume id, private key r, authority key A or None).

    ``CRYPTFS-RECOVERY-KEY-2:<vid>:<b64 r>:<b64 A>``, or ``CRYPTFS-RECOVERY-KEY-1:<vid>:<b64 r>``
    (files made for version 1 configs: no A).  Comment lines start with ``#``; blank lines are
    ignored; exactly one key line."""
    try:
        text = path.read_text("ascii")
    except UnicodeDecodeError as e:
        raise SpecError("recovery key file: not ASCII") from e
    # "lines end with LF (a CR before it is allowed); spaces and tabs around a line are ignored"
    lines = [ln.strip(" \t\r") for ln in text.split("\n")]
    keys = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(keys) != 1:
        raise SpecError("recovery key file: not exactly one key line")
    parts = keys[0].split(":")
    if not ((parts[0] == RECOVERY_MAGIC and len(parts) == 4)
            or (parts[0] == RECOVERY_MAGIC_V1 and len(parts) == 3)):
        raise SpecError("recovery key file: bad key line")
    try:
        vid = bytes.fromhex(parts[1])
    except ValueError as e:
        raise SpecError("recovery key file: bad volume id") from e
    if len(vid) != 16 or parts[1] != vid.hex():
        raise SpecError("recovery key file: bad volume id")
    # "the standard alphabet with + and / (not the URL-safe one), with its = padding, so
    # exactly 44 characters ending in =" (b64 in its one spelling, FORMAT.md Conventions)
    for part in parts[2:]:
        if len(part) != 44 or not part.endswith("=") or base64.b64encode(
                b64(part, 32, "recovery key file: key")).decode() != part:
            raise SpecError("recovery key file: a key is not 44 characters of canonical b64")
    r = b64(parts[2], 32, "recovery key file: r")
    a = b64(parts[3], 32, "recovery key file: A") if len(parts) == 4 else None
    return vid, r, a


def slot_is_v2(slot: dict[str, Any]) -> bool:
    """A v2 slot has `public` and `master` (a slot with only one of them is refused later)."""
    return bool(V2_SLOT_KEYS & slot.keys())


def _slot_fields(slot: Any) -> tuple[int, dict[str, Any], bytes, bytes]:
    """-> (id, kdf, salt, wrapped) of a slot, checked for shape (`wrapped`: 60 bytes in a v1
    slot, 92 in a v2 slot)."""
    if not isinstance(slot, dict):
        raise SpecError("config: a slot is not an object")
    try:
        sid, kdf = slot["id"], slot["kdf"]
        ok = (type(sid) is int and sid >= 0 and isinstance(kdf, dict)
              and kdf["algorithm"] == "argon2id" and type(kdf["ops"]) is int
              and type(kdf["mem_kib"]) is int and isinstance(slot["label"], str)
              and isinstance(slot["created"], str))
    except (KeyError, TypeError) as e:
        raise SpecError(f"config: bad slot: {e!r}") from e
    if not ok:
        raise SpecError(f"config: bad slot {slot!r}")
    wlen = 92 if slot_is_v2(slot) else 60
    return sid, kdf, b64(kdf.get("salt"), 16, "slot salt"), b64(slot.get("wrapped"), wlen, "slot wrapped")


def _open_slot(conf: dict[str, Any], volume_id: bytes, slot: dict[str, Any],
               passphrase: bytes) -> tuple[bytes, bytes | None, bytes | None] | None:
    """-> (master, the user's X25519 private key, the authority key A) -- the last two None for
    a v1 slot --, or None if the passphrase does not open this slot."""
    sid, kdf, salt, wrapped = _slot_fields(slot)
    try:
        k_slot = nacl.pwhash.argon2id.kdf(32, passphrase, salt, opslimit=kdf["ops"],
                                          memlimit=kdf["mem_kib"] * 1024)
    except (ValueError, TypeError, nacl.exceptions.CryptoError) as e:
        raise SpecError(f"config: slot {sid}: bad kdf: {e!r}") from e
    if not slot_is_v2(slot):
        ad = b"cryptfs/v1/slot" + volume_id + u32(sid) + canonical(kdf)
        try:
            master = AESGCM(k_slot).decrypt(wrapped[:12], wrapped[12:], ad)
        except InvalidTag:
            return None
        if len(master) != 32:
            raise SpecError("master key is not 32 bytes")
        return master, None, None
    public = b64(slot.get("public"), 32, f"slot {sid} public")
    wmaster = b64(slot.get("master"), 80, f"slot {sid} master")
    ad = b"cryptfs/v2/slot" + volume_id + u32(sid) + canonical(kdf) + public
    try:
        s = AESGCM(k_slot).decrypt(wrapped[:12], wrapped[12:], ad)
    except InvalidTag:
        return None
    if len(s) != 64:
        raise SpecError(f"slot {sid}: sealed secret is not 64 bytes")
    u, authority = s[:32], s[32:]
    if x25519_public(u) != public:
        raise SpecError(f"slot {sid}: the private key does not match `public`")
    key_id = conf.get("key_id")
    if type(key_id) is not int or not 1 <= key_id < 1 << 32:
        raise SpecError(f"bad key_id {key_id!r}")
    master = x25519_unwrap(wmaster, u, "cryptfs/v2/slot-master",
                           volume_id + u32(sid) + u32(key_id) + authority,
                           f"slot {sid}: the passphrase opens it but not its master (config edited)")
    if len(master) != 32:
        raise SpecError("master key is not 32 bytes")
    return master, u, authority


def open_config(backing: Path, passphrase: bytes | None = None, *,
                recovery_key: Path | None = None) -> tuple[dict[str, Any], Keys]:
    """Open a slot with the passphrase (or the master with the recovery key file), check the
    config MAC, check the fields, derive the keys."""
    if (passphrase is None) == (recovery_key is None):
        raise TypeError("give a passphrase or a recovery key file")
    conf = load_config(backing)
    try:
        volume_id = bytes.fromhex(conf["volume_id"])
        slots = conf["slots"]
    except (KeyError, ValueError, TypeError) as e:
        raise SpecError(f"config: {e!r}") from e
    mac = b64(conf.get("mac"), 32, "config mac")
    if len(volume_id) != 16 or not isinstance(slots, list) or not slots:
        raise SpecError("config: bad volume_id or slots")

    private: dict[bytes, bytes] = {}
    master = None
    slot_id = None
    authority = None  # A, as the slot or the key file gives it (None: a v1 slot or -1 file)
    if passphrase is not None:
        for slot in slots:
            opened = _open_slot(conf, volume_id, slot, passphrase)
            if opened is not None:
                master, u, authority = opened
                slot_id = slot["id"]
                if u is not None:
                    private[recipient_tag(x25519_public(u))] = u
                break
        if master is None:
            raise SpecError("no key slot opens with this passphrase")
    else:
        assert recovery_key is not None
        vid, r, authority = read_recovery_key(recovery_key)
        if vid != volume_id:
            raise SpecError("the recovery key is another volume's")
        rec = conf.get("recovery")
        if not isinstance(rec, dict):
            raise SpecError("the volume has no recovery key")
        public = b64(rec.get("public"), 32, "recovery public")
        if x25519_public(r) != public:
            raise SpecError("the recovery key does not match the volume's `recovery.public`")
        auth = rec.get("auth", False)
        if auth is not True and "auth" in rec:
            raise SpecError(f"config: recovery auth is {auth!r}, not true")
        if auth and authority is None:
            raise SpecError("the recovery is \"auth\" but the recovery key file has no authority key")
        # (a -2 file for a recovery without "auth" is not described; its A is still checked
        # against the base key after the MAC, below)
        ad = b"cryptfs/v1/recovery" + volume_id + (authority if auth and authority else b"")
        master = x25519_unwrap(b64(rec.get("wrapped"), 80, "recovery wrapped"), r,
                               "cryptfs/v1/recovery", ad, "recovery wrapped")
        if len(master) != 32:
            raise SpecError("master key is not 32 bytes")
        private[recipient_tag(public)] = r

    rest = {k: v for k, v in conf.items() if k != "mac"}
    want = hmac.new(hkdf(master, "cryptfs/v1/config"), canonical(rest), hashlib.sha256).digest()
    if not hmac.compare_digest(want, mac):
        raise SpecError("config MAC mismatch")

    # Only now are the fields trusted.
    version = conf.get("cryptfs")
    if type(version) is not int or version not in CONFIG_VERSIONS:
        raise SpecError(f"unsupported format version {version!r}")
    if not isinstance(conf.get("features"), list) or set(conf["features"]) != FEATURES_V1 \
            or len(conf["features"]) != len(FEATURES_V1):
        raise SpecError(f"unsupported feature set {conf.get('features')!r}")
    if conf.get("default_mode") not in MODE_IDS:
        raise SpecError(f"unknown default_mode {conf.get('default_mode')!r}")
    key_id = conf.get("key_id")
    if type(key_id) is not int or not 1 <= key_id < 1 << 32:
        raise SpecError(f"bad key_id {key_id!r}")
    for k in ("base", "retired", "rotation", "policy", "chain", "recovery"):
        if k in conf and conf[k] is None:
            raise SpecError(f"config: {k} is null (optional keys are absent, never null)")
    ids = [_slot_fields(s)[0] for s in slots]
    if len(set(ids)) != len(ids):
        raise SpecError("config: two slots with the same id")
    uids = [s["uid"] for s in slots if "uid" in s]
    if len(set(uids)) != len(uids):
        raise SpecError("config: two slots with the same uid")
    for s in slots:
        if "uid" in s and not (type(s["uid"]) is int and isinstance(s.get("user"), str)
                               and s.get("role") in ROLES and s["label"] == s["user"]):
            raise SpecError(f"config: bad user slot {s!r}")
    rec = conf.get("recovery")
    if "recovery" in conf:
        if not isinstance(rec, dict):
            raise SpecError("config: recovery is not an object")
        b64(rec.get("public"), 32, "recovery public")
        b64(rec.get("wrapped"), 80, "recovery wrapped")
        if "auth" in rec and rec["auth"] is not True:
            raise SpecError(f"config: recovery auth is {rec['auth']!r}, not true")
    # "auth" is a version 2 thing ("with "auth": true in version 2"), but a version 2 config
    # need not have it: a recovery made for a version 1 config keeps its wrap (and its -1 key
    # file) when the config becomes version 2 (see /tmp/bugs/format-spec-2.md)
    has_v2 = bool(V2_CONFIG_KEYS & conf.keys() or any(slot_is_v2(s) for s in slots)
                  or (rec is not None and rec.get("auth") is True))
    if version == 1:
        if has_v2:
            raise SpecError("a version 1 config with version 2 fields")
    else:
        if not has_v2:
            raise SpecError("a version 2 config without any version 2 field")
        for s in slots:
            if slot_is_v2(s):
                if not V2_SLOT_KEYS <= s.keys():
                    raise SpecError(f"slot {s['id']}: half a v2 slot")
                b64(s["public"], 32, "slot public")
                b64(s["master"], 80, "slot master")
        # "A version 2 config may still hold v1 slots ..., except during and after a
        # rotation": a config that shows one (a sealed base, retired masters, a rotation under
        # way, a chain, or a generation above 1) has only v2 slots
        if (ROTATED_KEYS & conf.keys() or key_id > 1) and not all(slot_is_v2(s) for s in slots):
            raise SpecError("a v1 slot in a rotated config")
        if "chain" in conf:
            chain = conf["chain"]
            if not (isinstance(chain, dict) and set(chain) == {"from", "mac"}
                    and type(chain["from"]) is int and 1 <= chain["from"] < key_id):
                raise SpecError(f"config: bad chain {chain!r}")
            b64(chain["mac"], 32, "chain mac")

    if "base" in conf:
        sealed = b64(conf["base"], 60, "base")
        base = gcm_open(hkdf(master, "cryptfs/v2/base"), sealed[:12], sealed[12:], volume_id, "base")
    else:
        base = master
    # "After the MAC check, a reader checks that the base key the config holds gives the same
    # A (else the config was forged)."
    if authority is not None and not hmac.compare_digest(hkdf(base, "cryptfs/v2/authority"),
                                                         authority):
        raise SpecError("the authority key does not match the config's base key (a forged config)")
    wraps = {key_id: hkdf(master, "cryptfs/v1/wrap")}
    retired_masters: dict[int, bytes] = {}
    if "retired" in conf:
        retired = conf["retired"]
        if not isinstance(retired, list):
            raise SpecError("config: retired is not a list")
        rkey = hkdf(master, "cryptfs/v2/retired")
        for item in retired:
            if not isinstance(item, dict) or set(item) != {"key_id", "wrapped"}:
                raise SpecError(f"config: bad retired entry {item!r}")
            n = item["key_id"]
            if type(n) is not int or not 1 <= n < 1 << 32 or n in wraps:
                raise SpecError(f"config: bad or repeated retired key_id {n!r}")
            w = b64(item["wrapped"], 60, "retired wrapped")
            old = gcm_open(rkey, w[:12], w[12:], volume_id + u32(n), f"retired generation {n}")
            retired_masters[n] = old
            wraps[n] = hkdf(old, "cryptfs/v1/wrap")
    if "rotation" in conf:
        rot = conf["rotation"]
        if not (isinstance(rot, dict) and rot.get("kind") in ("wrap-key", "reencrypt")
                and isinstance(rot.get("started"), str)):
            raise SpecError(f"config: bad rotation {rot!r}")
    keys = Keys(master=master, key_id=key_id, wraps=wraps, base=base,
                names=hkdf(base, "cryptfs/v1/names", 64), symlink=hkdf(base, "cryptfs/v1/symlink"),
                xattr=hkdf(base, "cryptfs/v1/xattr"), private=private, slot_id=slot_id,
                authority=authority, retired=retired_masters)
    if "policy" in conf:
        keys.policy = open_policy(base, volume_id, b64(conf["policy"], None, "policy"))
    return conf, keys


def chain_mac(old_master: bytes, volume_id: bytes, old_key_id: int, new_key_id: int,
              new_master: bytes) -> bytes:
    """FORMAT.md, *Rotation*: the `chain` MAC of generation ``new_key_id`` made from
    ``old_key_id``."""
    msg = (b"cryptfs/v2/chain" + volume_id + u32(old_key_id) + u32(new_key_id)
           + hkdf(new_master, "cryptfs/v2/fingerprint"))
    return hmac.new(hkdf(old_master, "cryptfs/v2/chain"), msg, hashlib.sha256).digest()


def verify_chain(old_master: bytes, old_key_id: int, new: Volume | tuple[dict[str, Any], Keys]) -> None:
    """What a running agent or mount that holds generation ``old_key_id`` (``old_master``)
    checks before it follows a new config: its `chain` names that generation and its MAC
    verifies with the old master.  ``new`` is the new config as opened cold (decrypt_volume
    or open_config).  Raises SpecError if the new generation is not to be followed."""
    conf, keys = (new.conf, new.keys) if isinstance(new, Volume) else new
    chain = conf.get("chain")
    if not isinstance(chain, dict):
        raise SpecError("chain: the config has none")
    if chain.get("from") != old_key_id:
        raise SpecError(f"chain: from {chain.get('from')!r}, not generation {old_key_id}")
    want = chain_mac(old_master, bytes.fromhex(conf["volume_id"]), old_key_id, keys.key_id,
                     keys.master)
    if not hmac.compare_digest(want, b64(chain.get("mac"), 32, "chain mac")):
        raise SpecError("chain: MAC mismatch")


def open_policy(base: bytes, volume_id: bytes, sealed: bytes) -> dict[str, Any]:
    if len(sealed) < 12 + TAG:
        raise SpecError("policy too short")
    text = gcm_open(hkdf(base, "cryptfs/v2/policy"), sealed[:12], sealed[12:],
                    b"cryptfs/v2/policy" + volume_id, "policy")
    try:
        policy = json.loads(text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SpecError("policy is not JSON") from e
    if not isinstance(policy, dict) or policy.get("version") != 1 \
            or not isinstance(policy.get("rules"), list):
        raise SpecError(f"bad policy {policy!r}")
    if set(policy) - POLICY_KEYS:
        raise SpecError(f"policy: unknown field(s) {sorted(set(policy) - POLICY_KEYS)}")
    for rule in policy["rules"]:
        if isinstance(rule, dict) and set(rule) - RULE_KEYS:
            raise SpecError(f"policy rule: unknown field(s) {sorted(set(rule) - RULE_KEYS)}")
        ok = (isinstance(rule, dict) and isinstance(rule.get("path"), str)
              and rule["path"].startswith("/") and rule.get("mode") in MODE_IDS
              and isinstance(rule.get("hybrid"), bool) and isinstance(rule.get("dropbox"), bool)
              and isinstance(rule.get("recipients"), list)
              and all(isinstance(u, str) for u in rule["recipients"]))
        parts = rule["path"].split("/")[1:] if ok else []
        if not ok or (rule["path"] != "/" and any(p in ("", ".", "..") for p in parts)):
            raise SpecError(f"bad policy rule {rule!r}")
    return policy


@dataclass
class Header:
    hlen: int
    mode_id: int
    flags: int
    file_id: bytes
    content_key: bytes
    stanzas: list[tuple[int, bytes]]

    @property
    def hybrid(self) -> bool:
        types = {t for t, _ in self.stanzas}
        return STANZA_X25519 in types and STANZA_SYMMETRIC not in types


def split_header(raw: bytes) -> tuple[int, int, int, bytes, list[tuple[int, bytes]]]:
    """The unauthenticated structure of a header: (H, mode id, flags, file id, stanzas)."""
    if len(raw) < 29 + 32:
        raise SpecError("file shorter than a header")
    if raw[:6] != MAGIC:
        raise SpecError("bad magic")
    if raw[6] != 1:
        raise SpecError(f"bad header version {raw[6]}")
    mode_id = raw[7]
    if mode_id not in MODES:
        raise SpecError(f"unknown content mode {mode_id}")
    flags, hlen = struct.unpack(">HH", raw[8:12])
    if flags & ~FLAG_HOLES:
        raise SpecError(f"unknown header flags {flags:#x}")
    if hlen < 29 + 32 or hlen > len(raw):
        raise SpecError(f"bad header length {hlen}")
    file_id = raw[12:28]
    count = raw[28]
    if count < 1:
        raise SpecError("no stanzas")
    pos, end = 29, hlen - 32
    stanzas = []
    for _ in range(count):
        if pos + 3 > end:
            raise SpecError("stanza overruns header")
        stype, slen = struct.unpack(">BH", raw[pos:pos + 3])
        pos += 3
        if pos + slen > end:
            raise SpecError("stanza overruns header")
        body = raw[pos:pos + slen]
        if stype == STANZA_SYMMETRIC and slen != 64:
            raise SpecError("symmetric stanza is not 64 bytes")
        if stype == STANZA_X25519 and slen != 88:
            raise SpecError("X25519 stanza is not 88 bytes")
        if stype not in (STANZA_PADDING, STANZA_SYMMETRIC, STANZA_X25519):
            raise SpecError(f"unknown stanza type {stype}")
        stanzas.append((stype, body))
        pos += slen
    if pos != end:
        raise SpecError("stanzas do not fill the header")
    return hlen, mode_id, flags, file_id, stanzas


def parse_header(keys: Keys, raw: bytes) -> Header:
    """Open and authenticate a header; raises SpecError on any defect, NotRecipient for a
    hybrid file with no stanza for this reader's keys."""
    hlen, mode_id, flags, file_id, stanzas = split_header(raw)
    ad = raw[0:8] + file_id
    # "Which stanzas a reader opens: every one it holds a key for, not only the first ...
    # Each of them must open, and all must give the same file_key."
    file_key = None
    for stype, body in stanzas:
        if stype == STANZA_SYMMETRIC:
            (kid,) = struct.unpack(">I", body[:4])
            if kid not in keys.wraps:
                continue  # a generation this volume no longer holds: skipped
            key = gcm_open(keys.wraps[kid], body[4:16], body[16:64], ad, "file key wrap")
        elif stype == STANZA_X25519:
            tag = body[:8]
            if tag not in keys.private:
                continue
            key = x25519_unwrap(body[8:], keys.private[tag], "cryptfs/v1/file-key", ad,
                                "X25519 stanza")
        else:
            continue
        if file_key is not None and not hmac.compare_digest(key, file_key):
            raise SpecError("two stanzas open to different file keys")
        file_key = key
    types = {t for t, _ in stanzas}
    if file_key is None:
        if STANZA_SYMMETRIC not in types and STANZA_X25519 in types:
            raise NotRecipient("a hybrid file this reader is not a recipient of")
        raise SpecError("no stanza unwraps the file key")
    if len(file_key) != 32:
        raise SpecError("file key is not 32 bytes")
    fk = hkdf(file_key, "cryptfs/v1/file", 64)
    content_key, mac_key = fk[:32], fk[32:]
    want = hmac.new(mac_key, raw[:hlen - 32], hashlib.sha256).digest()
    if not hmac.compare_digest(want, raw[hlen - 32:hlen]):
        raise SpecError("header MAC mismatch")
    return Header(hlen, mode_id, flags, file_id, content_key, stanzas)


def decrypt_file(keys: Keys, raw: bytes) -> tuple[bytes, Header]:
    """Backing file bytes -> (plaintext, header)."""
    if not raw:
        raise SpecError("empty backing file")
    h = parse_header(keys, raw)
    hlen, mode_id, flags, file_id, ckey = h.hlen, h.mode_id, h.flags, h.file_id, h.content_key
    nlen = MODES[mode_id][1]
    over = nlen + TAG
    bsize = BS + over
    d = len(raw) - hlen
    if d < over:
        raise SpecError("no final block")
    q, m = divmod(d, bsize)
    if m == 0:
        n = q
    elif m >= over:
        n = q + 1
    else:
        raise SpecError("final block truncated")
    aead = gcm_open if mode_id == 1 else xchacha_open
    out = []
    for i in range(n):
        final = i == n - 1
        blk = raw[hlen + i * bsize: hlen + (i + 1) * bsize]
        if final and len(blk) == over and n > 1:
            raise SpecError("empty final block after full blocks")
        if not final and flags & FLAG_HOLES and blk.count(0) == bsize:
            out.append(bytes(BS))
            continue
        ad = file_id + struct.pack(">QB", i, 1 if final else 0)
        out.append(aead(ckey, blk[:nlen], blk[nlen:], ad, f"block {i}"))
    return b"".join(out), h


def file_entry(keys: Keys, raw: bytes) -> Entry:
    """A regular file's entry; a hybrid file not for this reader is listed, not read."""
    try:
        data, h = decrypt_file(keys, raw)
    except NotRecipient:
        _, mode_id, flags, _, stanzas = split_header(raw)
        return Entry("file", b"", mode_id=mode_id, flags=flags, hybrid=True, readable=False,
                     tags=[b[:8] for t, b in stanzas if t == STANZA_X25519],
                     padding=sum(len(b) for t, b in stanzas if t == STANZA_PADDING))
    return Entry("file", data, mode_id=h.mode_id, flags=h.flags, hybrid=h.hybrid,
                 key_ids=[struct.unpack(">I", b[:4])[0] for t, b in h.stanzas if t == STANZA_SYMMETRIC],
                 tags=[b[:8] for t, b in h.stanzas if t == STANZA_X25519],
                 padding=sum(len(b) for t, b in h.stanzas if t == STANZA_PADDING))


def decrypt_name(keys: Keys, diriv: bytes, c_name: str) -> bytes:
    p = siv_open(keys.names, b64u_decode(c_name), [diriv], f"name {c_name!r}")
    if not 1 <= len(p) <= 255 or b"/" in p or b"\0" in p:
        raise SpecError(f"bad plaintext name {p!r}")
    return p


def decrypt_symlink(keys: Keys, target: bytes) -> bytes:
    raw = b64u_decode(target)
    if len(raw) < 12 + TAG:
        raise SpecError("symlink target too short")
    return gcm_open(keys.symlink, raw[:12], raw[12:], b"cryptfs/v1/symlink", "symlink target")


def decrypt_xattrs(keys: Keys, path: bytes) -> dict[bytes, bytes]:
    out = {}
    for bname in os.listxattr(path, follow_symlinks=False):
        if not bname.startswith("user.") or bname == LAYOUT_HINT:
            continue
        if not bname.startswith(XATTR_PREFIX):
            raise SpecError(f"user xattr not in cryptfs's namespace: {bname!r}")
        name = siv_open(keys.names, b64u_decode(bname[len(XATTR_PREFIX):]), [b"xattr"],
                        f"xattr name {bname!r}")
        if not name.startswith(b"user."):
            raise SpecError(f"xattr name outside user.: {name!r}")
        val = os.getxattr(path, bname, follow_symlinks=False)
        if len(val) < 12 + TAG:
            raise SpecError("xattr value too short")
        out[name] = gcm_open(keys.xattr, val[:12], val[12:], bname.encode("ascii"), f"xattr {name!r}")
    return out


def read_journal(backing: Path) -> dict[bytes, bytes]:
    """FORMAT.md, *The journal*: -> {backing path of the file: its new image}, for a journal
    whose file still has the recorded device and inode.  A ``.tmp`` journal is ignored (its
    file was not touched yet)."""
    p = backing / JOURNAL
    if not p.exists():
        return {}
    raw = p.read_bytes()
    if len(raw) < 16 or raw[-8:] != JOURNAL_MAGIC:
        raise SpecError("journal without its trailer")
    (mlen,) = struct.unpack(">Q", raw[-16:-8])
    if mlen > len(raw) - 16:
        raise SpecError("journal trailer length overruns")
    try:
        meta = json.loads(raw[-16 - mlen:-16].decode("utf-8"))
        rel, dev, ino, length = meta["path"], meta["dev"], meta["ino"], meta["length"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise SpecError(f"bad journal meta: {e!r}") from e
    image = raw[:-16 - mlen]
    if len(image) != length:
        raise SpecError("journal image length disagrees with its meta")
    target = os.path.join(os.fsencode(backing), os.fsencode(rel))
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return {}
    if (st.st_dev, st.st_ino) != (dev, ino):
        return {}
    return {os.path.normpath(target): image}


@dataclass
class Volume:
    conf: dict[str, Any]
    keys: Keys
    entries: dict[bytes, Entry]       # plaintext path (relative, bytes) -> entry
    leftovers: list[bytes]            # T.* entries found
    journal: dict[bytes, bytes] = field(default_factory=dict)

    def unreadable(self) -> set[bytes]:
        return {p for p, e in self.entries.items() if not e.readable}


def decrypt_volume(backing: Path, passphrase: bytes | None = None, *,
                   recovery_key: Path | None = None) -> Volume:
    """Decrypt a whole volume with a passphrase or with the recovery key file."""
    conf, keys = open_config(backing, passphrase, recovery_key=recovery_key)
    tree = os.fsencode(backing / "tree")
    if not os.path.isdir(tree):
        raise SpecError("no tree/")
    vol = Volume(conf, keys, {}, [], read_journal(backing))
    vol.entries[b""] = Entry("dir", xattrs=decrypt_xattrs(keys, tree), backing=os.fsdecode(tree))
    _walk(keys, tree, b"", vol)
    return vol


def _walk(keys: Keys, bdir: bytes, pdir: bytes, vol: Volume) -> None:
    try:
        with open(os.path.join(bdir, b".diriv"), "rb") as f:
            diriv = f.read()
    except FileNotFoundError as e:
        raise SpecError(f"{bdir!r} has no .diriv") from e
    if len(diriv) != 16:
        raise SpecError(f"{bdir!r}: .diriv is not 16 bytes")
    names = set(os.listdir(bdir))
    seen: set[bytes] = set()
    for bname in sorted(names):
        if bname == b".diriv":
            continue
        if bname.startswith(b"T."):
            vol.leftovers.append(os.path.join(bdir, bname))
            continue
        if bname.startswith(b"L.") and bname.endswith(b".name"):
            if bname[:-5] not in names:
                raise SpecError(f"orphan long-name side file {bname!r}")
            continue
        if bname.startswith(b"L."):
            side = os.path.join(bdir, bname + b".name")
            try:
                with open(side, "rb") as f:
                    c_name = f.read().decode("ascii")
            except (FileNotFoundError, UnicodeDecodeError) as e:
                raise SpecError(f"long name {bname!r}: bad or missing side file") from e
            if b"L." + b64u_encode(hashlib.sha256(c_name.encode("ascii")).digest()).encode() != bname:
                raise SpecError(f"long name {bname!r}: hash does not match side file")
            if len(c_name) <= 255:
                raise SpecError(f"long name {bname!r} is not long")
        elif b"." in bname:
            raise SpecError(f"unknown dotted backing name {bname!r}")
        else:
            c_name = bname.decode("ascii")
            if len(c_name) > 255:
                raise SpecError("over-long name")
        pname = decrypt_name(keys, diriv, c_name)
        if pname in seen:
            raise SpecError(f"duplicate name {pname!r}")
        seen.add(pname)
        ppath = pdir + b"/" + pname if pdir else pname
        bpath = os.path.join(bdir, bname)
        st = os.lstat(bpath)
        if stat.S_ISDIR(st.st_mode):
            vol.entries[ppath] = Entry("dir", xattrs=decrypt_xattrs(keys, bpath), backing=os.fsdecode(bpath))
            _walk(keys, bpath, ppath, vol)
        elif stat.S_ISREG(st.st_mode):
            raw = vol.journal.get(os.path.normpath(bpath))
            if raw is None:
                with open(bpath, "rb") as f:
                    raw = f.read()
            ent = file_entry(keys, raw)
            check_layout_hint(bpath, raw)
            ent.xattrs, ent.backing = decrypt_xattrs(keys, bpath), os.fsdecode(bpath)
            vol.entries[ppath] = ent
        elif stat.S_ISLNK(st.st_mode):
            vol.entries[ppath] = Entry("symlink", decrypt_symlink(keys, os.readlink(bpath)),
                                       backing=os.fsdecode(bpath))
        elif stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
            kind = "fifo" if stat.S_ISFIFO(st.st_mode) else "socket"
            vol.entries[ppath] = Entry(kind, xattrs=decrypt_xattrs(keys, bpath), backing=os.fsdecode(bpath))
        else:
            raise SpecError(f"unexpected backing file type {bpath!r}")


# ---------------------------------------------------------------------------------------------
# 1. The frozen sample volumes
# ---------------------------------------------------------------------------------------------

def copy_sample(src: Path, dst: Path) -> tuple[Path, dict[str, Any]]:
    """The sample as a backing directory; its manifest is read and removed, its recovery key
    file (if any) moved beside it as ``dst/../recovery.key``."""
    shutil.copytree(src, dst, symlinks=True)
    manifest = json.loads((dst / "MANIFEST.json").read_text())
    (dst / "MANIFEST.json").unlink()
    if "recovery_key" in manifest:
        (dst / manifest["recovery_key"]).rename(dst.parent / "recovery.key")
    return dst, manifest


def sample_readers(backing: Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Who can open a sample, as decrypt_volume keyword arguments: the passphrase's user
    (root, in the samples that have users), agent7, and the recovery key."""
    readers: dict[str, dict[str, Any]] = {"root": {"passphrase": manifest["passphrase"].encode()}}
    if "agent_passphrase" in manifest:
        readers["agent7"] = {"passphrase": manifest["agent_passphrase"].encode()}
    if "recovery_key" in manifest:
        readers["recovery"] = {"recovery_key": backing.parent / "recovery.key"}
    return readers


def recipient_names(conf: dict[str, Any]) -> dict[bytes, str]:
    """Recipient tag -> who: the user of each v2 slot (its label if it has none), "recovery"."""
    names = {recipient_tag(base64.b64decode(s["public"])): s.get("user", s["label"])
             for s in conf["slots"] if "public" in s}
    if "recovery" in conf:
        names[recipient_tag(base64.b64decode(conf["recovery"]["public"]))] = "recovery"
    return names


def readable_by(m: dict[str, Any], who: str) -> bool:
    """Whether ``who`` opens a manifest entry: a symmetric file is everyone's, a hybrid one
    its recipients'."""
    return not m.get("hybrid") or who in m["recipients"]


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_sample_volume_matches_manifest(sample: Path, tmp_path: Path) -> None:
    backing, manifest = copy_sample(sample, tmp_path / "vol")
    expected = {bytes.fromhex(e["path"]): e for e in manifest["entries"]}
    readers = sample_readers(backing, manifest)
    for who, how in readers.items():
        vol = decrypt_volume(backing, **how)
        assert vol.conf["default_mode"] == manifest["mode"]
        assert not vol.leftovers
        names = recipient_names(vol.conf)
        got = {p: e for p, e in vol.entries.items() if p != b""}
        assert set(got) == set(expected), "entries differ from MANIFEST.json"
        for path, m in expected.items():
            e = got[path]
            kind = {"sparse": "file"}.get(m["type"], m["type"])
            assert e.kind == kind, path
            if kind == "dir":
                continue
            if kind == "symlink":
                assert e.data == m["target"].encode(), path
            else:
                assert e.mode_id == MODE_IDS[m.get("mode", manifest["mode"])], path
                assert e.flags == (FLAG_HOLES if m["type"] == "sparse" else 0), path
                assert e.hybrid == m.get("hybrid", False), path
                if e.hybrid:
                    assert sorted(names[t] for t in e.tags) == sorted(m["recipients"]), path
                    assert e.key_ids == []
                else:
                    assert e.key_ids == [m.get("key_id", 1)] and e.tags == [], path
                assert e.readable == readable_by(m, who), (who, path)
                if not e.readable:
                    assert e.data == b""
                    continue
            assert len(e.data) == m["size"], path
            assert hashlib.sha256(e.data).hexdigest() == m["sha256"], path
        # at least one long name and one nested entry are exercised
        assert any(os.path.basename(e.backing).startswith("L.") for e in got.values())
        assert any(p.count(b"/") >= 2 for p in got)
        if "key_id" in manifest:  # v2: the generations, the base key, the policy
            assert vol.conf["cryptfs"] == 2
            assert vol.keys.key_id == manifest["key_id"]
            assert sorted(vol.keys.wraps) == sorted([manifest["key_id"], *manifest["retired"]])
            assert vol.keys.base != vol.keys.master  # a rotation happened: base is sealed
            # every reader held A (its v2 slot's, the -2 key file's), and it is the base key's
            assert vol.keys.authority == hkdf(vol.keys.base, "cryptfs/v2/authority")
            assert vol.conf["recovery"]["auth"] is True
            assert vol.conf["chain"]["from"] == manifest["retired"][-1]
            assert vol.keys.policy is not None
            assert sorted(vol.keys.policy["rules"], key=lambda r: r["path"]) == \
                sorted(manifest["policy"], key=lambda r: r["path"])
        else:
            assert vol.conf["cryptfs"] == 1 and vol.keys.authority is None
    assert ("recovery" in readers) == ("recovery" in vol.conf)


# ---------------------------------------------------------------------------------------------
# 2. Fresh volumes written through a real mount
# ---------------------------------------------------------------------------------------------

MiB = 1 << 20


def write_tree(root: Path) -> dict[bytes, tuple[str, bytes, dict[bytes, bytes]]]:
    """Write a varied tree through the mount; return what the decryptor must find."""
    rnd = random.Random(1234)
    expected: dict[bytes, tuple[str, bytes, dict[bytes, bytes]]] = {}
    r = os.fsencode(root)

    def put(rel: bytes, data: bytes) -> None:
        with open(os.path.join(r, rel), "wb") as f:
            f.write(data)
        expected[rel] = ("file", data, {})

    for size in (0, 1, 4095, 4096, 4097, 300000):
        put(b"size-%d.bin" % size, rnd.randbytes(size))

    # sparse: data at offset 0 and at 1 MiB, a hole in between
    with open(os.path.join(r, b"sparse.bin"), "wb") as f:
        f.write(b"head" * 10)
        f.seek(MiB)
        f.write(b"tail" * 10)
    expected[b"sparse.bin"] = ("file", b"head" * 10 + bytes(MiB - 40) + b"tail" * 10, {})

    long_name = b"L" * 216 + b".txt"
    assert len(long_name) == 220
    put(long_name, b"long name contents\n")
    put(b"caf\xe9-\xff\xfe-not-utf8.dat", b"\x00\xff latin-1 name\n")

    for d in (b"a", b"a/b", b"a/b/c", b"a/empty"):
        os.mkdir(os.path.join(r, d))
        expected[d] = ("dir", b"", {})
    put(b"a/b/c/deep.txt", rnd.randbytes(5000))
    put(b"a/b/c/" + b"m" * 200, b"long name in a nested dir")

    os.symlink(b"a/b/c/deep.txt", os.path.join(r, b"link"))
    expected[b"link"] = ("symlink", b"a/b/c/deep.txt", {})
    os.symlink(b"../\xff\xfe/" + b"t" * 500, os.path.join(r, b"a/odd-link"))
    expected[b"a/odd-link"] = ("symlink", b"../\xff\xfe/" + b"t" * 500, {})

    # extended by truncate (a hole, flag set), appended at a block boundary, rewritten in place
    with open(os.path.join(r, b"truncated-up.bin"), "wb") as f:
        f.write(b"t" * 10)
        f.truncate(40000)
    expected[b"truncated-up.bin"] = ("file", b"t" * 10 + bytes(40000 - 10), {})
    put(b"appended.bin", b"a" * 8192)
    with open(os.path.join(r, b"appended.bin"), "ab") as f:
        f.write(b"b" * 5)
    expected[b"appended.bin"] = ("file", b"a" * 8192 + b"b" * 5, {})
    put(b"rewritten.bin", b"r" * 10000)
    with open(os.path.join(r, b"rewritten.bin"), "r+b") as f:
        f.seek(4090)
        f.write(b"MIDDLE-ACROSS-A-BLOCK-BOUNDARY")
    expected[b"rewritten.bin"] = ("file", b"r" * 4090 + b"MIDDLE-ACROSS-A-BLOCK-BOUNDARY" + b"r" * 5880, {})
    put(b"shrunk.bin", b"s" * 20000)
    os.truncate(os.path.join(r, b"shrunk.bin"), 8192)
    expected[b"shrunk.bin"] = ("file", b"s" * 8192, {})
    # a renamed directory keeps its .diriv, so its entries' names stay valid
    os.mkdir(os.path.join(r, b"before"))
    put(b"before/inside", b"inside")
    os.rename(os.path.join(r, b"before"), os.path.join(r, b"after"))
    expected[b"after"] = ("dir", b"", {})
    expected[b"after/inside"] = expected.pop(b"before/inside")
    os.link(os.path.join(r, b"size-4097.bin"), os.path.join(r, b"a/hardlink"))
    expected[b"a/hardlink"] = expected[b"size-4097.bin"]
    os.mkfifo(os.path.join(r, b"a/fifo"))
    expected[b"a/fifo"] = ("fifo", b"", {})
    os.symlink(b"z" * 3000, os.path.join(r, b"max-link"))
    expected[b"max-link"] = ("symlink", b"z" * 3000, {})

    xattrs = {
        b"size-1.bin": {b"user.comment": b"hello", b"user.empty": b"", b"user.bin": bytes(range(256))},
        b"a/b": {b"user.dir-attr": b"on a directory"},
        long_name: {b"user." + b"x" * 100: b"v" * 3000},
    }
    for rel, attrs in xattrs.items():
        for k, v in attrs.items():
            os.setxattr(os.path.join(r, rel), k, v)
        kind, data, _ = expected[rel]
        expected[rel] = (kind, data, dict(attrs))
    return expected


def check_fresh_volume(m: Mount, mode_id: int) -> None:
    expected = write_tree(m.mnt)
    m.stop()
    vol = decrypt_volume(m.backing, PASSPHRASE)
    assert not vol.leftovers
    # new volumes are version 2 with v2 slots (their passphrase opens the user's X25519 key)
    assert vol.conf["cryptfs"] == 2 and all({"public", "master"} <= s.keys() for s in vol.conf["slots"])
    assert len(vol.keys.private) == 1
    got = {p: (e.kind, e.data, e.xattrs) for p, e in vol.entries.items() if p != b""}
    assert sorted(got) == sorted(expected)
    for p in expected:
        assert got[p] == expected[p], p
    for p, e in vol.entries.items():
        if e.kind == "file":
            assert e.mode_id == mode_id, p
            assert e.flags == (FLAG_HOLES if p in (b"sparse.bin", b"truncated-up.bin") else 0), p
    # the sparse file's middle really is a hole in the backing store
    sparse = vol.entries[b"sparse.bin"].backing
    assert os.stat(sparse).st_blocks * 512 < MiB // 2
    # long names went through side files
    assert os.path.basename(vol.entries[b"L" * 216 + b".txt"].backing).startswith("L.")
    assert not os.path.basename(vol.entries[b"size-1.bin"].backing).startswith("L.")
    linked = (os.stat(vol.entries[p].backing).st_ino for p in (b"a/hardlink", b"size-4097.bin"))
    assert len(set(linked)) == 1

    # xattr tampering is detected too (the samples cannot carry xattrs)
    target = vol.entries[b"size-1.bin"].backing
    bname = next(n for n in os.listxattr(target) if n.startswith(XATTR_PREFIX))
    value = bytearray(os.getxattr(target, bname))
    value[-1] ^= 1
    os.setxattr(target, bname, bytes(value))
    with pytest.raises(SpecError, match="xattr"):
        decrypt_volume(m.backing, PASSPHRASE)
    value[-1] ^= 1
    os.setxattr(target, bname, bytes(value))
    decrypt_volume(m.backing, PASSPHRASE)
    other = vol.entries[b"a/b"].backing                 # a value moved to another name fails
    other_name = next(n for n in os.listxattr(other) if n.startswith(XATTR_PREFIX))
    os.setxattr(other, other_name, bytes(value))
    with pytest.raises(SpecError, match="xattr"):
        decrypt_volume(m.backing, PASSPHRASE)


@pytest.mark.mount
def test_fresh_volume_aes(mount: Mount) -> None:
    check_fresh_volume(mount, 1)


@pytest.mark.mount
def test_fresh_volume_xchacha(tmp_path: Path, passfile: Path) -> None:
    m = new_mount(tmp_path, make_volume(tmp_path / "b2", "xchacha20-poly1305"), passfile, "mnt2")
    m.start()
    try:
        check_fresh_volume(m, 2)
    finally:
        m.stop()


# ---------------------------------------------------------------------------------------------
# 2b. Version 2 volumes made through the command line: policy, hybrid files, rotations
# ---------------------------------------------------------------------------------------------

ALICE = "cfs-alice"
ALICE_PASS = b"alice's passphrase for the format spec"
HYBRID_ROOM = 4 * (3 + 88)  # FORMAT.md: a new hybrid header keeps 4 recipients' worth of padding


@dataclass
class Want:
    """What the decryptor must find at a path."""

    kind: str
    data: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    mode_id: int = 0
    recipients: frozenset[str] | None = None  # files: None = symmetric
    key_id: int | None = None                 # symmetric files: generation of the stanza
    flags: int | None = 0                     # header flags (None: either)


@dataclass
class V2Volume:
    backing: Path
    passfile: Path
    recovery_key: Path
    readers: dict[str, dict[str, Any]]  # who -> decrypt_volume keyword arguments

    def policy(self, directory: str, mode: str, *recipients: str, dropbox: bool = False) -> None:
        from conftest import run_cli
        run_cli("policy", "set", str(self.backing), directory, "--mode", mode,
                *[a for r in recipients for a in ("--recipient", r)],
                *(["--dropbox"] if dropbox else []), "--passphrase-file", str(self.passfile))

    def rotate(self, kind: str, *extra: str) -> str:
        from conftest import run_cli
        return run_cli("rotate", str(self.backing), f"--{kind}", "--passphrase-file",
                       str(self.passfile), *extra).stdout


def cli_v2_volume(tmp_path: Path, mode: str = "aes-256-gcm") -> V2Volume:
    """A volume made by `cryptfs init --recovery-key` (root's slot) plus a slot for cfs-alice."""
    from conftest import run_cli
    from multiuser import ensure_user

    ensure_user(ALICE)
    pf, af = tmp_path / "pass", tmp_path / "alice.pass"
    pf.write_bytes(PASSPHRASE + b"\n")
    af.write_bytes(ALICE_PASS + b"\n")
    backing, rk = tmp_path / "backing", tmp_path / "recovery.key"
    cost = ("--kdf-memory", "8", "--kdf-iterations", "1")
    run_cli("init", str(backing), "--mode", mode, "--user", "root", "--passphrase-file", str(pf),
            "--recovery-key", str(rk), *cost)
    run_cli("user", "add", str(backing), ALICE, "--passphrase-file", str(pf),
            "--new-passphrase-file", str(af), *cost)
    return V2Volume(backing, pf, rk, {"root": {"passphrase": PASSPHRASE},
                                      ALICE: {"passphrase": ALICE_PASS},
                                      "recovery": {"recovery_key": rk}})


Rules = dict[bytes, tuple[int, frozenset[str] | None]]  # directory -> (mode id, recipients)


def rule_for(rules: Rules, directory: bytes) -> tuple[int, frozenset[str] | None]:
    """The deepest ruled directory at or above ``directory`` (b"" is the volume's default)."""
    while directory not in rules:
        directory = directory.rpartition(b"/")[0]
    return rules[directory]


def write_v2_tree(mnt: Path, dirs: list[bytes], rules: Rules, tag: bytes, key_id: int) -> dict[bytes, Want]:
    """Files of several sizes, a sparse file, a symlink and xattrs in each of ``dirs``."""
    rnd = random.Random(tag)
    r = os.fsencode(mnt)
    want: dict[bytes, Want] = {}
    for d in dirs:
        full = os.path.join(r, d)
        if d and not os.path.isdir(full):
            os.mkdir(full)
            want[d] = Want("dir")
        mode_id, recipients = rule_for(rules, d)
        sym = None if recipients is not None else key_id

        def rel(name: bytes) -> bytes:
            return d + b"/" + name if d else name  # noqa: B023

        for size in (0, 1, 4096, 4097, 70000):
            data = rnd.randbytes(size)
            with open(os.path.join(r, rel(b"%s-%d.bin" % (tag, size))), "wb") as f:
                f.write(data)
            want[rel(b"%s-%d.bin" % (tag, size))] = Want("file", data, {}, mode_id, recipients, sym)
        with open(os.path.join(r, rel(tag + b"-sparse.bin")), "wb") as f:
            f.write(b"head")
            f.seek(3 * BS + 5)
            f.write(b"tail")
        want[rel(tag + b"-sparse.bin")] = Want("file", b"head" + bytes(3 * BS + 1) + b"tail", {},
                                               mode_id, recipients, sym, FLAG_HOLES)
        os.symlink(tag + b"-4097.bin", os.path.join(r, rel(tag + b"-link")))
        want[rel(tag + b"-link")] = Want("symlink", tag + b"-4097.bin")
        if recipients is None or "root" in recipients:  # (a drop box file is not ours to touch)
            os.setxattr(os.path.join(r, rel(tag + b"-1.bin")), b"user.note", b"about " + rel(tag))
            want[rel(tag + b"-1.bin")].xattrs = {b"user.note": b"about " + rel(tag)}
    return want


def check_v2(v: V2Volume, want: dict[bytes, Want]) -> dict[str, Volume]:
    """Decrypt the volume as each reader; compare with ``want`` byte for byte.  A reader
    opens every symmetric file and the hybrid files it is a recipient of; it sees the others
    as "not a recipient", never as damaged."""
    out = {}
    for who, how in v.readers.items():
        vol = decrypt_volume(v.backing, **how)
        assert not vol.leftovers
        names = recipient_names(vol.conf)
        got = {p: e for p, e in vol.entries.items() if p != b""}
        assert sorted(got) == sorted(want), who
        for p, w in want.items():
            e = got[p]
            assert e.kind == w.kind, p
            assert e.xattrs == w.xattrs, p
            if w.kind != "file":
                assert e.data == w.data, p
                continue
            assert e.mode_id == w.mode_id, p
            assert w.flags is None or e.flags == w.flags, p
            if w.recipients is None:
                assert not e.hybrid and e.readable and not e.tags, p
                assert e.key_ids == [w.key_id], (p, e.key_ids, w.key_id)
            else:
                assert e.hybrid and e.key_ids == [], p
                assert sorted(names[t] for t in e.tags) == sorted(w.recipients), p
                assert e.padding + 3 == HYBRID_ROOM, p
                assert e.readable == (who in w.recipients), (who, p)
            assert e.data == (w.data if e.readable else b""), (who, p)
        out[who] = vol
    assert sorted(out["recovery"].entries) == sorted(out["root"].entries)
    assert all(e.readable for e in out["recovery"].entries.values())  # the recovery key opens all
    # every v2 slot and the recovery key file hold the same A, the base key's (checked in
    # open_config; here: that every reader did have one to check)
    authority = {vol.keys.authority for vol in out.values()}
    assert authority == {hkdf(out["root"].keys.base, "cryptfs/v2/authority")}
    return out


def check_chain(v: V2Volume, vols: dict[str, Volume], old_master: bytes, old_key_id: int,
                earlier: list[bytes]) -> None:
    """After a rotation: the new config's `chain` verifies with the master of the generation
    before it, for every reader; and each config in ``earlier`` (the volume's configs from
    before, put back) opens cold but is not followed by a holder of the new master."""
    new = vols["root"]
    assert new.conf["chain"]["from"] == old_key_id
    for vol in vols.values():
        verify_chain(old_master, old_key_id, vol)
    with pytest.raises(SpecError, match="chain"):  # not with a master it was not made from
        verify_chain(new.keys.master, old_key_id, new)
    with pytest.raises(SpecError, match="chain"):  # nor from another generation
        verify_chain(old_master, old_key_id + 1, new)
    for i, text in enumerate(earlier):
        d = v.backing.parent / f"put-back-{new.keys.key_id}-{i}"
        d.mkdir()
        (d / "cryptfs.conf").write_bytes(text)
        for how in v.readers.values():
            back = open_config(d, **how)  # a cold reader accepts a config put back (rollback)
            assert back[1].key_id < new.keys.key_id
            with pytest.raises(SpecError, match="chain"):
                verify_chain(new.keys.master, new.keys.key_id, back)


def symmetric_files(want: dict[bytes, Want]) -> list[bytes]:
    return [p for p, w in want.items() if w.kind == "file" and w.recipients is None]


@pytest.mark.mount
def test_mixed_mode_volume(tmp_path: Path) -> None:
    """Symmetric AES and XChaCha directories, hybrid ones (creator + recovery; creator + a user;
    a drop box), nested rules and inheritance, and a file moved out of its hybrid directory."""
    v = cli_v2_volume(tmp_path)
    v.policy("/sym-x", "xchacha20-poly1305")
    v.policy("/sym-x/aes", "aes-256-gcm")
    v.policy("/hyb", "hybrid")
    v.policy("/hyb-x", "hybrid-xchacha20-poly1305", ALICE)
    v.policy("/drop", "hybrid", ALICE, dropbox=True)
    rules: Rules = {b"": (1, None), b"sym-x": (2, None), b"sym-x/aes": (1, None),
                    b"hyb": (1, frozenset({"root", "recovery"})),
                    b"hyb-x": (2, frozenset({"root", ALICE, "recovery"})),
                    b"drop": (1, frozenset({ALICE, "recovery"}))}
    dirs = [b"", b"sym-x", b"sym-x/aes", b"sym-x/aes/deeper", b"hyb", b"hyb/sub", b"hyb-x", b"drop"]
    m = new_mount(tmp_path, v.backing, v.passfile)
    m.start()
    try:
        want = write_v2_tree(m.mnt, dirs, rules, b"f", 1)
        # the policy decides how files are written: a hybrid file moved out stays hybrid
        os.rename(m.mnt / "hyb" / "f-4096.bin", m.mnt / "moved-out.bin")
        want[b"moved-out.bin"] = want.pop(b"hyb/f-4096.bin")
        # the writer of a drop box file cannot read it back
        with pytest.raises(PermissionError):
            open(m.mnt / "drop" / "f-4097.bin", "rb")
        assert os.stat(m.mnt / "drop" / "f-4097.bin").st_size == 4097
    finally:
        m.stop()
    vols = check_v2(v, want)
    conf = vols["root"].conf
    assert conf["cryptfs"] == 2 and conf["key_id"] == 1
    assert not {"base", "retired", "rotation"} & conf.keys()
    assert all({"public", "master"} <= s.keys() for s in conf["slots"])
    assert [s.get("user") for s in conf["slots"]] == ["root", ALICE]
    for vol in vols.values():
        assert vol.keys.base == vol.keys.master  # no `base`: base = master
        assert vol.keys.policy is not None
        assert {r["path"]: (r["mode"], r["hybrid"], sorted(r["recipients"]), r["dropbox"])
                for r in vol.keys.policy["rules"]} == {
            "/sym-x": ("xchacha20-poly1305", False, [], False),
            "/sym-x/aes": ("aes-256-gcm", False, [], False),
            "/hyb": ("aes-256-gcm", True, [], False),
            "/hyb-x": ("xchacha20-poly1305", True, [ALICE], False),
            "/drop": ("aes-256-gcm", True, [ALICE], True)}
    assert vols["root"].unreadable() == {p for p in want if p.startswith(b"drop/")
                                         and want[p].kind == "file"}
    assert vols[ALICE].unreadable() == {p for p, w in want.items() if w.recipients is not None
                                        and ALICE not in w.recipients}


@pytest.mark.mount
def test_rotations(tmp_path: Path) -> None:
    """rotate --slots (offline), then --wrap-key (through the mount), then --reencrypt
    (offline, with the recovery key): after each, every reader decrypts everything it may."""
    v = cli_v2_volume(tmp_path, "xchacha20-poly1305")
    v.policy("/aes", "aes-256-gcm")
    v.policy("/hyb", "hybrid")
    v.policy("/drop", "hybrid-aes-256-gcm", ALICE, dropbox=True)
    rules: Rules = {b"": (2, None), b"aes": (1, None), b"hyb": (2, frozenset({"root", "recovery"})),
                    b"drop": (1, frozenset({ALICE, "recovery"}))}
    dirs = [b"", b"aes", b"hyb", b"hyb/sub", b"drop"]
    m = new_mount(tmp_path, v.backing, v.passfile)
    m.start()
    try:
        want = write_v2_tree(m.mnt, dirs, rules, b"gen1", 1)
    finally:
        m.stop()
    master1 = check_v2(v, want)["root"].keys.master
    confs = [(v.backing / "cryptfs.conf").read_bytes()]  # every config so far, for check_chain

    # --slots: a new master for the slots and the recovery key; existing files keep generation 1
    v.rotate("slots")
    vols = check_v2(v, want)
    check_chain(v, vols, master1, 1, confs)
    confs.append((v.backing / "cryptfs.conf").read_bytes())
    conf = vols["root"].conf
    assert conf["key_id"] == 2 and [r["key_id"] for r in conf["retired"]] == [1]
    assert "base" in conf and "rotation" not in conf
    for vol in vols.values():
        assert vol.keys.master != master1
        assert vol.keys.base == master1  # the base key is the first generation's master
        assert vol.keys.wraps[1] == hkdf(master1, "cryptfs/v1/wrap")
    master2 = vols["root"].keys.master
    m.start()
    try:  # new files name generation 2; rewriting an old file keeps its header (generation 1)
        want |= write_v2_tree(m.mnt, [*dirs, b"new-dir"], rules, b"gen2", 2)
        with open(m.mnt / "aes" / "gen1-70000.bin", "r+b") as f:
            f.seek(5000)
            f.write(b"rewritten after the rotation")
        w = want[b"aes/gen1-70000.bin"]
        w.data = w.data[:5000] + b"rewritten after the rotation" + w.data[5028:]
    finally:
        m.stop()
    check_v2(v, want)

    # --wrap-key through the mount: every symmetric header names generation 3, hybrid ones
    # keep their stanzas; the retired masters are forgotten
    m.start()
    try:
        assert "through the mount" in v.rotate("wrap-key")
        want |= write_v2_tree(m.mnt, [b"", b"hyb"], rules, b"gen3", 3)
    finally:
        m.stop()
    for p in symmetric_files(want):
        want[p].key_id = 3
    vols = check_v2(v, want)
    check_chain(v, vols, master2, 2, confs)
    confs.append((v.backing / "cryptfs.conf").read_bytes())
    master3 = vols["root"].keys.master
    conf = vols["root"].conf
    assert conf["key_id"] == 3 and not {"retired", "rotation"} & conf.keys()
    assert all(vol.keys.base == master1 for vol in vols.values())
    old = vols["root"].keys
    old = Keys(**{**old.__dict__, "wraps": {1: hkdf(master1, "cryptfs/v1/wrap"),
                                            2: hkdf(master2, "cryptfs/v1/wrap")}})
    for p in symmetric_files(want):  # an old master opens no file key any more
        with pytest.raises(SpecError, match="no stanza"):
            decrypt_file(old, Path(vols["root"].entries[p].backing).read_bytes())

    # --reencrypt offline: a new file key (file id) for every file, hybrid ones included
    ids = {p: Path(e.backing).read_bytes()[12:28] for p, e in vols["recovery"].entries.items()
           if e.kind == "file"}
    v.rotate("reencrypt", "--recovery-key", str(v.recovery_key))
    for p in symmetric_files(want):
        want[p].key_id = 4
    for w in want.values():
        if w.flags:  # --reencrypt writes holes out as real blocks today (/tmp/bugs/reencrypt-fills-holes.md)
            w.flags = None
    vols = check_v2(v, want)
    check_chain(v, vols, master3, 3, confs)
    assert vols["root"].conf["key_id"] == 4
    assert not {"retired", "rotation"} & vols["root"].conf.keys()
    assert all(Path(vols["recovery"].entries[p].backing).read_bytes()[12:28] != i
               for p, i in ids.items())
    assert not (v.backing / JOURNAL).exists()

    # cryptfs reads the same back
    m.start()
    try:
        for p, w in want.items():
            if w.kind == "file" and (w.recipients is None or "root" in w.recipients):
                assert (m.mnt / os.fsdecode(p)).read_bytes() == w.data, p
    finally:
        m.stop()


@pytest.mark.mount
def test_rotation_journal(mount: Mount, passfile: Path) -> None:
    """A journal written as FORMAT.md says (the new image, its trailer) stands for its file:
    the decryptor reads the image, and cryptfs's next mount copies it over the file."""
    from conftest import run_cli

    data = random.Random(7).randbytes(20000)
    (mount.mnt / "f.bin").write_bytes(data)
    mount.stop()
    backing = mount.backing
    bp = Path(decrypt_volume(backing, PASSPHRASE).entries[b"f.bin"].backing)
    old = bp.read_bytes()
    run_cli("rotate", str(backing), "--reencrypt", "--passphrase-file", str(passfile))
    new = bp.read_bytes()
    assert len(new) == len(old) and new[12:28] != old[12:28]
    bp.write_bytes(new[:len(new) // 2] + old[len(new) // 2:])  # the copy stopped halfway
    with pytest.raises(SpecError):
        decrypt_volume(backing, PASSPHRASE)

    def journal(ino: int) -> bytes:
        meta = json.dumps({"path": os.path.relpath(bp, backing), "dev": bp.stat().st_dev,
                           "ino": ino, "length": len(new)}).encode()
        return new + meta + struct.pack(">Q", len(meta)) + JOURNAL_MAGIC

    (backing / (JOURNAL + ".tmp")).write_bytes(b"an image that was never renamed into place")
    (backing / JOURNAL).write_bytes(journal(bp.stat().st_ino + 1))  # another file's: not used
    with pytest.raises(SpecError):
        decrypt_volume(backing, PASSPHRASE)
    (backing / JOURNAL).write_bytes(journal(bp.stat().st_ino))
    assert decrypt_volume(backing, PASSPHRASE).entries[b"f.bin"].data == data
    mount.start()
    try:
        assert (mount.mnt / "f.bin").read_bytes() == data
    finally:
        mount.stop()
    assert bp.read_bytes() == new
    assert not (backing / JOURNAL).exists() and not (backing / (JOURNAL + ".tmp")).exists()
    assert decrypt_volume(backing, PASSPHRASE).entries[b"f.bin"].data == data


@pytest.mark.parametrize("kind", ["wrap-key", "reencrypt"])
@pytest.mark.parametrize("sample", SAMPLES_V2, ids=[s.name for s in SAMPLES_V2])
def test_rotating_the_v2_sample(sample: Path, kind: str, tmp_path: Path) -> None:
    """The frozen sample's retired generation is consumed by a rotation of today's cryptfs;
    the result still reads as the manifest says, for every reader."""
    from conftest import run_cli

    backing, manifest = copy_sample(sample, tmp_path / "vol")
    readers = sample_readers(backing, manifest)
    base = decrypt_volume(backing, **readers["root"]).keys.base
    pw = tmp_path / "pw"
    pw.write_text(manifest["passphrase"] + "\n")
    run_cli("rotate", str(backing), f"--{kind}", "--passphrase-file", str(pw),
            "--recovery-key", str(tmp_path / "recovery.key"))
    expected = {bytes.fromhex(e["path"]): e for e in manifest["entries"]}
    for who, how in readers.items():
        vol = decrypt_volume(backing, **how)
        assert vol.keys.key_id == 3 and sorted(vol.keys.wraps) == [3]
        assert not {"retired", "rotation"} & vol.conf.keys()
        assert vol.keys.base == base
        names = recipient_names(vol.conf)
        for p, m in expected.items():
            e = vol.entries[p]
            if m["type"] in ("dir", "symlink"):
                continue
            assert e.hybrid == m["hybrid"] and e.mode_id == MODE_IDS[m["mode"]], p
            if e.hybrid:
                assert sorted(names[t] for t in e.tags) == sorted(m["recipients"]), p
            else:
                assert e.key_ids == [3], p
            assert e.readable == readable_by(m, who), (who, p)
            if e.readable:
                assert hashlib.sha256(e.data).hexdigest() == m["sha256"], (who, p)


# ---------------------------------------------------------------------------------------------
# 3. Tampering: every authentication failure raises
# ---------------------------------------------------------------------------------------------

SAMPLE_PASS = b"cryptfs sample volume"


def flip(path: str | Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def geometry(path: str) -> tuple[int, int, int]:
    """-> (H, B, backing size) of a backing file, read from its (unauthenticated) header."""
    raw = Path(path).read_bytes()
    hlen = struct.unpack(">H", raw[10:12])[0]
    return hlen, BS + MODES[raw[7]][1] + TAG, len(raw)


def _block(vol: Volume, plain: bytes, i: int) -> tuple[str, int, int]:
    bp = vol.entries[plain].backing
    hlen, bsize, _ = geometry(bp)
    return bp, hlen + i * bsize, bsize


def t_block_body(vol: Volume) -> None:
    bp, off, _ = _block(vol, b"hundred-k.bin", 3)
    flip(bp, off + 100)


def t_block_nonce(vol: Volume) -> None:
    bp, off, _ = _block(vol, b"hundred-k.bin", 0)
    flip(bp, off)


def t_block_tag(vol: Volume) -> None:
    bp = vol.entries[b"block-and-a-byte.bin"].backing
    flip(bp, os.path.getsize(bp) - 1)


def t_empty_file_block(vol: Volume) -> None:
    bp = vol.entries[b"empty.txt"].backing
    flip(bp, os.path.getsize(bp) - 5)


def _header_flip(offset: int, mask: int = 0x01):
    def f(vol: Volume) -> None:
        bp = vol.entries[b"dir/subdir/deep.txt"].backing
        hlen = geometry(bp)[0]
        flip(bp, offset if offset >= 0 else hlen + offset, mask)
    return f


def t_swap_blocks(vol: Volume) -> None:
    bp, off0, bsize = _block(vol, b"hundred-k.bin", 0)
    raw = bytearray(Path(bp).read_bytes())
    raw[off0:off0 + bsize], raw[off0 + bsize:off0 + 2 * bsize] = \
        raw[off0 + bsize:off0 + 2 * bsize], raw[off0:off0 + bsize]
    Path(bp).write_bytes(bytes(raw))


def t_block_from_other_file(vol: Volume) -> None:
    src, soff, bsize = _block(vol, b"hundred-k.bin", 0)
    dst, doff, _ = _block(vol, b"block-and-a-byte.bin", 0)
    blk = Path(src).read_bytes()[soff:soff + bsize]
    raw = bytearray(Path(dst).read_bytes())
    raw[doff:doff + bsize] = blk
    Path(dst).write_bytes(bytes(raw))


def t_header_from_other_file(vol: Volume) -> None:
    src = vol.entries[b"hundred-k.bin"].backing
    dst = vol.entries[b"one-block.bin"].backing
    hlen = geometry(src)[0]
    assert geometry(dst)[0] == hlen
    Path(dst).write_bytes(Path(src).read_bytes()[:hlen] + Path(dst).read_bytes()[hlen:])


def t_truncate_at_block_boundary(vol: Volume) -> None:
    bp, off, _ = _block(vol, b"hundred-k.bin", 10)
    os.truncate(bp, off)


def t_truncate_inside_block(vol: Volume) -> None:
    bp, off, _ = _block(vol, b"hundred-k.bin", 10)
    os.truncate(bp, off + 10)


def t_truncate_inside_header(vol: Volume) -> None:
    bp = vol.entries[b"empty.txt"].backing
    os.truncate(bp, 40)


def t_truncate_to_zero(vol: Volume) -> None:
    os.truncate(vol.entries[b"empty.txt"].backing, 0)


def t_append_bytes(vol: Volume) -> None:
    with open(vol.entries[b"one-block.bin"].backing, "ab") as f:
        f.write(bytes(100))


def t_append_zero_block(vol: Volume) -> None:
    bp, _, bsize = _block(vol, b"one-block.bin", 0)
    with open(bp, "ab") as f:
        f.write(bytes(bsize))


def t_zero_block_not_sparse(vol: Volume) -> None:
    bp, off, bsize = _block(vol, b"hundred-k.bin", 2)
    raw = bytearray(Path(bp).read_bytes())
    raw[off:off + bsize] = bytes(bsize)
    Path(bp).write_bytes(bytes(raw))


def t_zero_final_block_sparse(vol: Volume) -> None:
    bp = vol.entries[b"sparse.bin"].backing
    hlen, bsize, size = geometry(bp)
    last = hlen + ((size - hlen - 1) // bsize) * bsize
    raw = bytearray(Path(bp).read_bytes())
    raw[last:] = bytes(size - last)
    Path(bp).write_bytes(bytes(raw))


def t_name(vol: Volume) -> None:
    bp = vol.entries[b"dir/subdir/deep.txt"].backing
    name = os.path.basename(bp)
    c = "A" if name[5] != "A" else "B"
    os.rename(bp, os.path.join(os.path.dirname(bp), name[:5] + c + name[6:]))


def t_name_moved_to_other_dir(vol: Volume) -> None:
    bp = vol.entries[b"empty.txt"].backing
    os.rename(bp, os.path.join(vol.entries[b"dir"].backing, os.path.basename(bp)))


def t_diriv(vol: Volume) -> None:
    p = os.path.join(vol.entries[b"dir"].backing, ".diriv")
    os.chmod(p, 0o644)
    flip(p, 3)


def t_long_name_side_file(vol: Volume) -> None:
    long = next(e for e in vol.entries.values() if os.path.basename(e.backing).startswith("L."))
    side = long.backing + ".name"
    os.chmod(side, 0o644)
    text = Path(side).read_text()
    Path(side).write_text(text[:10] + ("A" if text[10] != "A" else "B") + text[11:])


def t_symlink(vol: Volume) -> None:
    bp = vol.entries[b"link-to-deep"].backing
    target = os.readlink(bp)
    os.unlink(bp)
    os.symlink(target[:20] + ("A" if target[20] != "A" else "B") + target[21:], bp)


def _conf_edit(edit):
    def f(vol: Volume) -> None:
        p = Path(vol.entries[b""].backing).parent / "cryptfs.conf"
        conf = json.loads(p.read_text())
        edit(conf)
        p.write_text(json.dumps(conf, indent=2))
    return f


def t_conf_raw_byte(vol: Volume) -> None:
    p = Path(vol.entries[b""].backing).parent / "cryptfs.conf"
    raw = p.read_bytes()
    i = raw.index(b'"label": "') + len(b'"label": "')
    flip(p, i)  # a letter of the first slot's label -> another letter: still valid JSON


def _set(key: str, value: Any):
    def edit(conf: dict[str, Any]) -> None:
        conf[key] = value
    return edit


def _slot_set(key: str, value: Any):
    def edit(conf: dict[str, Any]) -> None:
        conf["slots"][0][key] = value
    return edit


def _flip_b64(key: str, slot: bool = False):
    def edit(conf: dict[str, Any]) -> None:
        obj = conf["slots"][0] if slot else conf
        raw = bytearray(base64.b64decode(obj[key]))
        raw[5] ^= 1
        obj[key] = base64.b64encode(bytes(raw)).decode()
    return edit


def _slot_ops(conf: dict[str, Any]) -> None:
    conf["slots"][0]["kdf"]["ops"] += 1


TAMPERS = {
    "block-body": t_block_body,
    "block-nonce": t_block_nonce,
    "block-tag": t_block_tag,
    "empty-file-block": t_empty_file_block,
    "block-swap": t_swap_blocks,
    "block-from-other-file": t_block_from_other_file,
    "header-magic": _header_flip(0),
    "header-version": _header_flip(6),
    "header-mode": _header_flip(7, 0x03),
    "header-flags-holes": _header_flip(9),
    "header-flags-other": _header_flip(8),
    "header-length": _header_flip(11, 0x10),
    "header-file-id": _header_flip(20),
    "header-stanza-count": _header_flip(28),
    "header-stanza-len": _header_flip(31),
    "header-key-id": _header_flip(35),
    "header-stanza-nonce": _header_flip(40),
    "header-wrapped-key": _header_flip(70),
    "header-mac": _header_flip(-1),
    "header-from-other-file": t_header_from_other_file,
    "truncate-block-boundary": t_truncate_at_block_boundary,
    "truncate-inside-block": t_truncate_inside_block,
    "truncate-inside-header": t_truncate_inside_header,
    "truncate-to-zero": t_truncate_to_zero,
    "append-bytes": t_append_bytes,
    "append-zero-block": t_append_zero_block,
    "zero-block-not-sparse": t_zero_block_not_sparse,
    "zero-final-block-sparse": t_zero_final_block_sparse,
    "name": t_name,
    "name-other-dir": t_name_moved_to_other_dir,
    "diriv": t_diriv,
    "long-name-side-file": t_long_name_side_file,
    "symlink-target": t_symlink,
    "conf-raw-byte": t_conf_raw_byte,
    "conf-created": _conf_edit(_set("created", "2000-01-01T00:00:00Z")),
    "conf-default-mode": _conf_edit(lambda c: c.update(default_mode={
        "aes-256-gcm": "xchacha20-poly1305", "xchacha20-poly1305": "aes-256-gcm"}[c["default_mode"]])),
    "conf-key-id": _conf_edit(lambda c: c.update(key_id=c["key_id"] + 1)),
    "conf-version": _conf_edit(lambda c: c.update(cryptfs=3 - c["cryptfs"])),  # 1 <-> 2
    "conf-version-3": _conf_edit(_set("cryptfs", 3)),
    "conf-features-removed": _conf_edit(_set("features", sorted(FEATURES_V1 - {"last-block-flag"}))),
    "conf-key-added": _conf_edit(_set("extra", True)),
    "conf-mac-removed": _conf_edit(lambda c: c.pop("mac")),
    "conf-mac": _conf_edit(_flip_b64("mac")),
    "conf-slot-label": _conf_edit(_slot_set("label", "mallory")),
    "conf-slot-extra-key": _conf_edit(_slot_set("role", "auditor")),
    "conf-slot-wrapped": _conf_edit(_flip_b64("wrapped", slot=True)),
    "conf-slot-id": _conf_edit(_slot_set("id", 1)),
    "conf-slot-kdf": _conf_edit(_slot_ops),
    "conf-volume-id": _conf_edit(_set("volume_id", "00" * 16)),
}


@pytest.fixture(params=SAMPLES, ids=[s.name.removeprefix("sample-v1-") for s in SAMPLES])
def sample_copy(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Volume]:
    backing, _ = copy_sample(request.param, tmp_path / "vol")
    return backing, decrypt_volume(backing, SAMPLE_PASS)


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_tampering_raises(sample_copy: tuple[Path, Volume], tamper: str) -> None:
    backing, vol = sample_copy
    TAMPERS[tamper](vol)
    with pytest.raises(SpecError):
        decrypt_volume(backing, SAMPLE_PASS)


def test_untampered_controls(sample_copy: tuple[Path, Volume]) -> None:
    """The tamper tests fail for the right reason: harmless changes still decrypt."""
    backing, vol = sample_copy
    _conf_edit(lambda c: None)(vol)          # re-serialised config (MAC is over canonical JSON)
    leftover = backing / "tree" / "T.0123456789abcdef"
    leftover.mkdir()                          # a leftover T.* entry is ignored (fsck's business)
    again = decrypt_volume(backing, SAMPLE_PASS)
    assert again.leftovers == [os.fsencode(leftover)]
    assert {p: e.data for p, e in again.entries.items()} == {p: e.data for p, e in vol.entries.items()}
    # the sample's sparse file really has all-zero (hole) blocks that the hole rule reads as zeros
    bp = vol.entries[b"sparse.bin"].backing
    hlen, bsize, size = geometry(bp)
    raw = Path(bp).read_bytes()
    assert any(raw[o:o + bsize] == bytes(bsize) for o in range(hlen, size - bsize, bsize))


def test_wrong_passphrase(sample_copy: tuple[Path, Volume]) -> None:
    with pytest.raises(SpecError, match="no key slot"):
        decrypt_volume(sample_copy[0], b"not the passphrase")


# ---------------------------------------------------------------------------------------------
# 3b. Tampering with what version 2 added (on the v2 sample)
# ---------------------------------------------------------------------------------------------

HYBRID_FILE = b"hybrid/report.bin"      # recipients: root (the sample passphrase), recovery
DROPBOX_FILE = b"dropbox/upload-1.wav"  # recipients: agent7, recovery (not root)
X25519_STANZA = 3 + 88


def remac(backing: Path, master: bytes, edit) -> None:
    """Edit the config and authenticate it again with the master key: what only someone who
    holds the master could do.  The reader's checks after the MAC must catch the edit."""
    p = backing / "cryptfs.conf"
    conf = json.loads(p.read_text())
    edit(conf)
    conf.pop("mac", None)
    conf["mac"] = base64.b64encode(hmac.new(hkdf(master, "cryptfs/v1/config"), canonical(conf),
                                            hashlib.sha256).digest()).decode()
    p.write_text(json.dumps(conf, indent=1))


def _flip_b64_at(get, index: int = 5):
    """Flip a bit of the base64 field that ``get(conf) -> (container, key)`` names."""
    def edit(conf: dict[str, Any]) -> None:
        obj, key = get(conf)
        raw = bytearray(base64.b64decode(obj[key]))
        raw[index] ^= 1
        obj[key] = base64.b64encode(bytes(raw)).decode()
    return edit


def stanza_spans(raw: bytes) -> list[tuple[int, int, int]]:
    """(type, offset of the body, body length) of each stanza of a header (unauthenticated)."""
    out, pos = [], 29
    for _ in range(raw[28]):
        stype, slen = struct.unpack(">BH", raw[pos:pos + 3])
        out.append((stype, pos + 3, slen))
        pos += 3 + slen
    return out


def x25519_stanza_of(vol: Volume, plain: bytes, who: str) -> tuple[str, int]:
    """(backing path, offset of the body) of the X25519 stanza of ``who`` in a hybrid file."""
    bp = vol.entries[plain].backing
    raw = Path(bp).read_bytes()
    names = recipient_names(vol.conf)
    for stype, off, _ in stanza_spans(raw):
        if stype == STANZA_X25519 and names.get(raw[off:off + 8]) == who:
            return bp, off
    raise AssertionError(f"{who} is not a recipient of {plain!r}")


def _stanza_flip(who: str, at: int, plain: bytes = HYBRID_FILE):
    """Flip byte ``at`` of ``who``'s X25519 stanza body (tag 0..7, epk 8..39, sealed key 40..)."""
    def f(backing: Path, vol: Volume) -> None:
        bp, off = x25519_stanza_of(vol, plain, who)
        flip(bp, off + at)
    return f


def _padding(backing: Path, vol: Volume, plain: bytes = HYBRID_FILE) -> tuple[str, int, int]:
    bp = vol.entries[plain].backing
    (_, off, slen), = [s for s in stanza_spans(Path(bp).read_bytes()) if s[0] == STANZA_PADDING]
    return bp, off, slen


def t_padding_byte(backing: Path, vol: Volume) -> None:
    bp, off, slen = _padding(backing, vol)
    flip(bp, off + slen // 2)


def t_padding_type_unknown(backing: Path, vol: Volume) -> None:
    bp, off, _ = _padding(backing, vol)
    flip(bp, off - 3, 0x03)  # type 0 -> 3


def t_x25519_type_symmetric(backing: Path, vol: Volume) -> None:
    bp, off = x25519_stanza_of(vol, HYBRID_FILE, "recovery")
    flip(bp, off - 3, 0x03)  # type 2 -> 1: a symmetric stanza must be 64 bytes


def t_hybrid_header_from_other_file(backing: Path, vol: Volume) -> None:
    src = vol.entries[b"hybrid/after.bin"].backing   # same recipients, same header length
    dst = vol.entries[HYBRID_FILE].backing
    hlen = geometry(src)[0]
    assert geometry(dst)[0] == hlen
    Path(dst).write_bytes(Path(src).read_bytes()[:hlen] + Path(dst).read_bytes()[hlen:])


def t_symmetric_stanza_added(backing: Path, vol: Volume) -> None:
    """A holder of the volume key (not a recipient) turns a hybrid file into a symmetric one
    by replacing padding with a symmetric stanza wrapping a key of their choice: the header
    MAC, keyed by the real file key, stops it."""
    bp = vol.entries[HYBRID_FILE].backing
    raw = bytearray(Path(bp).read_bytes())
    _, off, slen = _padding(backing, vol)
    nonce = os.urandom(12)
    ad = bytes(raw[0:8]) + bytes(raw[12:28])
    body = struct.pack(">I", vol.keys.key_id) + nonce + \
        AESGCM(vol.keys.wrap).encrypt(nonce, os.urandom(32), ad)
    new = struct.pack(">BH", STANZA_SYMMETRIC, 64) + body + \
        struct.pack(">BH", STANZA_PADDING, slen - 67) + bytes(slen - 67)
    raw[off - 3:off + slen] = new
    raw[28] += 1
    Path(bp).write_bytes(bytes(raw))


def t_last_byte(vol: Volume, plain: bytes) -> None:
    bp = vol.entries[plain].backing
    flip(bp, os.path.getsize(bp) - 1)


def t_hybrid_sparse_final(backing: Path, vol: Volume) -> None:
    t_zero_final_block_sparse_at(vol, b"hybrid/sparse.bin")


def t_zero_final_block_sparse_at(vol: Volume, plain: bytes) -> None:
    bp = vol.entries[plain].backing
    hlen, bsize, size = geometry(bp)
    last = hlen + ((size - hlen - 1) // bsize) * bsize
    raw = bytearray(Path(bp).read_bytes())
    raw[last:] = bytes(size - last)
    Path(bp).write_bytes(bytes(raw))


def _conf(edit):
    return lambda backing, vol: _conf_edit(edit)(vol)


def _resealed(edit):
    return lambda backing, vol: remac(backing, vol.keys.master, edit)


def _pop(key: str):
    return lambda c: c.pop(key)


def _slot0(key: str):
    return lambda c: (c["slots"][0], key)


def _retired0(c: dict[str, Any]) -> tuple[dict[str, Any], str]:
    return c["retired"][0], "wrapped"


def _swap_slot_field(key: str):
    def edit(c: dict[str, Any]) -> None:
        a, b = c["slots"][0], c["slots"][1]
        a[key], b[key] = b[key], a[key]
    return edit


def _downgrade_slot0(c: dict[str, Any]) -> None:
    del c["slots"][0]["public"], c["slots"][0]["master"]


def _retired_key_id(c: dict[str, Any]) -> None:
    c["retired"][0]["key_id"] = 7


def _as_version_1(c: dict[str, Any]) -> None:
    c["cryptfs"] = 1


# -- Forging configs: what FORMAT.md's writers do, done by someone else ---------------------------

def x25519_wrap(secret: bytes, recipient: bytes, label: str, ad: bytes) -> bytes:
    """The wrapping side of FORMAT.md's X25519-unwrap: a fresh ephemeral scalar e,
    epk = X25519(e, 9), shared = X25519(e, R), then ChaCha20-Poly1305 with a zero nonce."""
    e = X25519PrivateKey.generate()
    epk = e.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = e.exchange(X25519PublicKey.from_public_bytes(recipient))
    k = HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + recipient,
             info=label.encode("ascii")).derive(shared)
    return epk + ChaCha20Poly1305(k).encrypt(bytes(12), secret, ad)


def gcm_seal(key: bytes, plain: bytes, ad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plain, ad)


def b64e(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def make_slot(volume_id: bytes, sid: int, passphrase: bytes, master: bytes, key_id: int, *,
              authority: bytes | None, label: str = "mallory") -> dict[str, Any]:
    """A slot as FORMAT.md describes one: v2 (the user's X25519 key and A sealed by the
    passphrase, the master wrapped to the public key) if ``authority`` is given, else v1."""
    salt = os.urandom(16)
    kdf = {"algorithm": "argon2id", "ops": 1, "mem_kib": 8192, "salt": b64e(salt)}
    k_slot = nacl.pwhash.argon2id.kdf(32, passphrase, salt, opslimit=1, memlimit=8192 * 1024)
    slot: dict[str, Any] = {"id": sid, "label": label, "created": "2026-12-01T00:00:00Z", "kdf": kdf}
    if authority is None:
        ad = b"cryptfs/v1/slot" + volume_id + u32(sid) + canonical(kdf)
        return slot | {"wrapped": b64e(gcm_seal(k_slot, master, ad))}
    u = os.urandom(32)
    public = x25519_public(u)
    ad = b"cryptfs/v2/slot" + volume_id + u32(sid) + canonical(kdf) + public
    return slot | {"public": b64e(public), "wrapped": b64e(gcm_seal(k_slot, u + authority, ad)),
                   "master": b64e(x25519_wrap(master, public, "cryptfs/v2/slot-master",
                                              volume_id + u32(sid) + u32(key_id) + authority))}


def forge(conf: dict[str, Any], master: bytes, *, authority: bytes | None, base: bytes,
          slots: bool = True, recovery: bool = True) -> None:
    """Rewrite ``conf`` for a master of the forger's choosing: `base` re-sealed under it, the
    master wrapped to every v2 slot's public key (``slots``) and to the recovery key
    (``recovery``), with A in the ad if the forger knows it (``authority``), else without;
    everything sealed under the real master or base key that the forger cannot redo
    (`retired`, `policy`, `chain`) is dropped.  The caller re-MACs with ``master``."""
    vid = bytes.fromhex(conf["volume_id"])
    a = authority or b""
    conf["base"] = b64e(gcm_seal(hkdf(master, "cryptfs/v2/base"), base, vid))
    for k in ("retired", "policy", "chain"):
        conf.pop(k, None)
    if slots:
        for s in conf["slots"]:
            if "public" in s:
                s["master"] = b64e(x25519_wrap(master, base64.b64decode(s["public"]),
                                               "cryptfs/v2/slot-master",
                                               vid + u32(s["id"]) + u32(conf["key_id"]) + a))
    if recovery:
        rec = conf["recovery"]
        rec["wrapped"] = b64e(x25519_wrap(master, base64.b64decode(rec["public"]),
                                          "cryptfs/v1/recovery", b"cryptfs/v1/recovery" + vid + a))


def _outsider(slots: bool = True, recovery: bool = True, edit=None):
    """An outsider's forgery: a new master M' and base, wrapped to the users' public keys
    (all an outsider knows) without A, the config re-MACed with M'."""
    def t(backing: Path, vol: Volume) -> None:
        master = os.urandom(32)

        def e(c: dict[str, Any]) -> None:
            forge(c, master, authority=None, base=os.urandom(32), slots=slots, recovery=recovery)
            if edit is not None:
                edit(c)
        remac(backing, master, e)
    return t


def _base_substituted(backing: Path, vol: Volume) -> None:
    """A holder of the current master seals another base key into `base`: the sealing
    verifies, the authority check does not."""
    vid = bytes.fromhex(vol.conf["volume_id"])
    remac(backing, vol.keys.master, lambda c: c.update(
        base=b64e(gcm_seal(hkdf(vol.keys.master, "cryptfs/v2/base"), os.urandom(32), vid))))


def _v1_slot_added(backing: Path, vol: Volume) -> None:
    """A holder of the master adds a v1 slot to a rotated config."""
    vid = bytes.fromhex(vol.conf["volume_id"])
    slot = make_slot(vid, 9, b"v1 slot", vol.keys.master, vol.keys.key_id, authority=None)
    remac(backing, vol.keys.master, lambda c: c["slots"].append(slot))


def _chain0(c: dict[str, Any]) -> tuple[dict[str, Any], str]:
    return c["chain"], "mac"


# -- fields added after sealing, by a holder of the master who seals the config again: only
# "no object holds a key this page does not name for it" stops these (the MAC verifies)
ADDED_FIELD = "pepper"
ADDED_AT: dict[str, Any] = {
    "top": lambda c: c,
    "kdf": lambda c: c["kdf"],
    "slot": lambda c: c["slots"][0],
    "slot-kdf": lambda c: c["slots"][0]["kdf"],
    "recovery": lambda c: c["recovery"],
    "retired": lambda c: c["retired"][0],
    "chain": lambda c: c["chain"],
    "rotation": lambda c: c.setdefault("rotation", {"kind": "wrap-key", "started": "2026-01-01T00:00:00Z"}),
    "audit": lambda c: c.setdefault("audit", {"dir": "/var/log/cryptfs-audit", "key": "cryptfs-audit+x"}),
}


def _field_added(where: str):
    return _resealed(lambda c: ADDED_AT[where](c).update({ADDED_FIELD: True}))


def _policy_rule_field_added(backing: Path, vol: Volume) -> None:
    """A holder of the master (so of the base key) adds a field to a policy rule, seals the
    policy and the config again."""
    vid = bytes.fromhex(vol.conf["volume_id"])
    pkey, ad = hkdf(vol.keys.base, "cryptfs/v2/policy"), b"cryptfs/v2/policy" + vid
    sealed = base64.b64decode(vol.conf["policy"])
    policy = json.loads(gcm_open(pkey, sealed[:12], sealed[12:], ad, "policy"))
    policy["rules"][0][ADDED_FIELD] = True
    text = json.dumps(policy).encode()
    remac(backing, vol.keys.master,
          lambda c: c.update(policy=b64e(gcm_seal(pkey, text, ad))))


def _key_named_twice(backing: Path, vol: Volume) -> None:
    """`key_id` named twice with the same value: the parsed object, so the MAC, is unchanged;
    a reader that kept the first of two different values would see another config."""
    p = backing / "cryptfs.conf"
    text = p.read_text().lstrip()
    assert text.startswith("{")
    p.write_text(f'{{"key_id": {vol.conf["key_id"]}, ' + text[1:])


def symmetric_file(vol: Volume) -> bytes:
    return min(p for p, e in vol.entries.items()
               if e.kind == "file" and not e.hybrid and e.key_ids and len(e.data) > 100)


def reheader(vol: Volume, plain: bytes, edit) -> None:
    """Rewrite a symmetric file's header with ``edit(stanzas, file_key, ad) -> stanzas`` and a
    valid header MAC (what a holder of the volume key can do): blocks are bound to the file id
    and their index, not to their offset, so they stay valid when H changes.  Only the stanza
    rules can catch the result."""
    bp = vol.entries[plain].backing
    raw = Path(bp).read_bytes()
    hlen, mode_id, flags, file_id, stanzas = split_header(raw)
    ad = raw[0:8] + file_id
    (kid, body), = [(struct.unpack(">I", b[:4])[0], b) for t, b in stanzas if t == STANZA_SYMMETRIC]
    file_key = gcm_open(vol.keys.wraps[kid], body[4:16], body[16:64], ad, "file key wrap")
    new = edit(stanzas, file_key, ad, vol.keys.wraps[kid], kid)
    blob = b"".join(struct.pack(">BH", t, len(b)) + b for t, b in new)
    h = 29 + len(blob) + 32
    head = raw[0:10] + struct.pack(">H", h) + file_id + bytes([len(new)]) + blob
    mac_key = hkdf(file_key, "cryptfs/v1/file", 64)[32:]
    Path(bp).write_bytes(head + hmac.new(mac_key, head, hashlib.sha256).digest() + raw[hlen:])


def _sym_stanza(wrap_key: bytes, kid: int, file_key: bytes, ad: bytes) -> tuple[int, bytes]:
    nonce = os.urandom(12)
    return STANZA_SYMMETRIC, struct.pack(">I", kid) + nonce + AESGCM(wrap_key).encrypt(nonce, file_key, ad)


STANZA_EDITS: dict[str, Any] = {
    # the control: the same rewrite with nothing added must still read
    "none": lambda st, fk, ad, wk, kid: st,
    "unknown-type-after": lambda st, fk, ad, wk, kid: [*st, (7, b"later")],
    "unknown-type-empty-after": lambda st, fk, ad, wk, kid: [*st, (200, b"")],
    "symmetric-63-after": lambda st, fk, ad, wk, kid: [*st, (STANZA_SYMMETRIC, bytes(63))],
    "x25519-87-after": lambda st, fk, ad, wk, kid: [*st, (STANZA_X25519, bytes(87))],
    "second-symmetric-other-key": lambda st, fk, ad, wk, kid: [*st, _sym_stanza(wk, kid, os.urandom(32), ad)],
    "second-symmetric-unopenable": lambda st, fk, ad, wk, kid: [
        *st, (STANZA_SYMMETRIC, struct.pack(">I", kid) + os.urandom(60))],
}


TAMPERS_V2 = {
    # config fields; the MAC catches them
    "conf-retired-wrapped": _conf(_flip_b64_at(_retired0)),
    "conf-retired-key-id": _conf(_retired_key_id),
    "conf-retired-removed": _conf(_pop("retired")),
    "conf-base": _conf(_flip_b64_at(lambda c: (c, "base"))),
    "conf-base-removed": _conf(_pop("base")),
    "conf-policy": _conf(_flip_b64_at(lambda c: (c, "policy"))),
    "conf-policy-removed": _conf(_pop("policy")),
    "conf-rotation-added": _conf(_set("rotation", {"kind": "reencrypt", "started": "2026-01-01T00:00:00Z"})),
    "conf-slot-public": _conf(_flip_b64_at(_slot0("public"))),
    "conf-slot-master": _conf(_flip_b64_at(_slot0("master"))),
    "conf-slot-master-tag": _conf(_flip_b64_at(_slot0("master"), 79)),
    "conf-slot-publics-swapped": _conf(_swap_slot_field("public")),
    "conf-slot-masters-swapped": _conf(_swap_slot_field("master")),
    "conf-slot-downgraded-to-v1": _conf(_downgrade_slot0),
    "conf-recovery-public": _conf(_flip_b64_at(lambda c: (c["recovery"], "public"))),
    "conf-recovery-wrapped": _conf(_flip_b64_at(lambda c: (c["recovery"], "wrapped"))),
    "conf-version-1": _conf(_as_version_1),
    "conf-chain-mac": _conf(_flip_b64_at(_chain0)),
    "conf-chain-from": _conf(lambda c: c["chain"].update({"from": 0})),
    "conf-chain-removed": _conf(_pop("chain")),
    "conf-recovery-auth-removed": _conf(lambda c: c["recovery"].pop("auth")),
    # the same kind of edits by someone who holds the master and re-MACs the config: the
    # sealed fields' own authentication (and the v1/v2 rules) must catch them
    "resealed-base": _resealed(_flip_b64_at(lambda c: (c, "base"))),
    "resealed-base-removed": _resealed(_pop("base")),
    "resealed-retired-wrapped": _resealed(_flip_b64_at(_retired0)),
    "resealed-retired-key-id": _resealed(_retired_key_id),
    "resealed-retired-removed": _resealed(_pop("retired")),
    "resealed-retired-null": _resealed(_set("retired", None)),
    "resealed-policy": _resealed(_flip_b64_at(lambda c: (c, "policy"))),
    "resealed-key-id": _resealed(lambda c: c.update(key_id=c["key_id"] + 1)),
    "resealed-version-1": _resealed(_as_version_1),
    "resealed-rotation-bad": _resealed(_set("rotation", {"kind": "everything"})),
    "resealed-base-substituted": _base_substituted,
    "resealed-v1-slot-added": _v1_slot_added,
    "resealed-recovery-auth-false": _resealed(lambda c: c["recovery"].update(auth=False)),
    "resealed-chain-from-current": _resealed(lambda c: c["chain"].update({"from": c["key_id"]})),
    "resealed-chain-null": _resealed(_set("chain", None)),
    "resealed-chain-mac-short": _resealed(lambda c: c["chain"].update(mac=b64e(bytes(31)))),
    # an outsider (who knows the public keys, not A) wraps a master of their choosing to the
    # users and/or the recovery key and re-MACs with it: A is not in the forged ads
    "forged-slot-masters-outsider": _outsider(recovery=False),
    "forged-recovery-outsider": _outsider(slots=False),
    "forged-all-outsider": _outsider(),
    "forged-all-outsider-auth-removed": _outsider(edit=lambda c: c["recovery"].pop("auth")),
    # X25519 stanzas and padding of a hybrid file both readers are recipients of
    "x25519-root-epk": _stanza_flip("root", 8),
    "x25519-root-sealed-key": _stanza_flip("root", 50),
    "x25519-root-poly-tag": _stanza_flip("root", 87),
    "x25519-recovery-epk": _stanza_flip("recovery", 20),
    "x25519-recovery-sealed-key": _stanza_flip("recovery", 70),
    "padding-byte": t_padding_byte,
    "padding-type-unknown": t_padding_type_unknown,
    "x25519-type-symmetric": t_x25519_type_symmetric,
    "hybrid-header-from-other-file": t_hybrid_header_from_other_file,
    "symmetric-stanza-added": t_symmetric_stanza_added,
    "hybrid-block": lambda backing, vol: t_last_byte(vol, HYBRID_FILE),
    "hybrid-sparse-zero-final-block": t_hybrid_sparse_final,
    # fields added after sealing, at every level, and a key named twice
    **{f"resealed-field-added-{where}": _field_added(where) for where in ADDED_AT},
    "resealed-field-added-policy-rule": _policy_rule_field_added,
    "conf-key-named-twice": _key_named_twice,
    # a header whose MAC is right (made by a holder of the volume key) but whose stanzas after
    # the one that opens break the stanza rules
    **{f"stanza-{name}": (lambda name: lambda backing, vol: reheader(vol, symmetric_file(vol),
                                                                       STANZA_EDITS[name]))(name)
       for name in STANZA_EDITS if name != "none"},
}
# A tampered stanza is the reader's own or another recipient's; the other recipient's stanza
# is caught by the header MAC, so both readers must fail on all of these.
TAMPER_READERS = ("root", "recovery")


@pytest.fixture(params=SAMPLES_V2, ids=[s.name for s in SAMPLES_V2])
def v2_copy(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Volume, dict[str, Any]]:
    backing, manifest = copy_sample(request.param, tmp_path / "vol")
    return backing, decrypt_volume(backing, SAMPLE_PASS), sample_readers(backing, manifest)


@pytest.mark.parametrize("tamper", list(TAMPERS_V2))
def test_tampering_v2_raises(v2_copy: tuple[Path, Volume, dict[str, Any]], tamper: str) -> None:
    backing, vol, readers = v2_copy
    for who in TAMPER_READERS:  # both open the file and the config before the tamper
        again = decrypt_volume(backing, **readers[who])
        assert again.entries[HYBRID_FILE].readable and again.entries[HYBRID_FILE].hybrid
    TAMPERS_V2[tamper](backing, vol)
    for who in TAMPER_READERS:
        with pytest.raises(SpecError):
            decrypt_volume(backing, **readers[who])


def test_v2_untampered_controls(v2_copy: tuple[Path, Volume, dict[str, Any]]) -> None:
    """The v2 tampers fail for the right reason: re-MACing an unchanged config, re-serialising
    it, and zeroing the padding of a hybrid header (it is ignored, but MACed: so only the
    unchanged zeros pass) all still decrypt."""
    backing, vol, readers = v2_copy

    def views() -> dict[str, dict[bytes, tuple[bool, bytes]]]:
        return {who: {p: (e.readable, e.data) for p, e in decrypt_volume(backing, **how).entries.items()}
                for who, how in readers.items()}

    before = views()
    remac(backing, vol.keys.master, lambda c: None)
    _conf_edit(lambda c: None)(vol)
    assert views() == before
    bp, off, slen = _padding(backing, vol)
    assert Path(bp).read_bytes()[off:off + slen] == bytes(slen)


def test_rewritten_header_control(v2_copy: tuple[Path, Volume, dict[str, Any]]) -> None:
    """The stanza tampers fail for the right reason: the same header rewrite and re-MAC with
    nothing added still reads, for both readers, and so does a second symmetric stanza that
    opens to the same file key (every stanza opens, and all agree)."""
    backing, vol, readers = v2_copy
    plain = symmetric_file(vol)
    for edit in (STANZA_EDITS["none"],
                 lambda st, fk, ad, wk, kid: [*st, _sym_stanza(wk, kid, fk, ad), (0, bytes(5))]):
        reheader(vol, plain, edit)
        for how in readers.values():
            assert decrypt_volume(backing, **how).entries[plain].data == vol.entries[plain].data


def test_not_a_recipient_is_not_damage(v2_copy: tuple[Path, Volume, dict[str, Any]]) -> None:
    """A hybrid file with no stanza for the reader's keys raises NotRecipient (not SpecError);
    the rest of the volume reads.  Its stanzas still name its recipients."""
    backing, vol, readers = v2_copy
    raw = Path(vol.entries[DROPBOX_FILE].backing).read_bytes()
    with pytest.raises(NotRecipient) as info:
        decrypt_file(vol.keys, raw)
    assert not isinstance(info.value, SpecError)
    e = vol.entries[DROPBOX_FILE]
    assert not e.readable and e.hybrid and e.data == b""
    assert sorted(recipient_names(vol.conf)[t] for t in e.tags) == ["agent7", "recovery"]
    assert vol.unreadable() == {p for p, x in vol.entries.items()
                                if p.startswith(b"dropbox/") and x.kind == "file"}
    for who in ("agent7", "recovery"):
        other = decrypt_volume(backing, **readers[who])
        assert other.entries[DROPBOX_FILE].readable
    # the limit of a reader that is not a recipient: it cannot tell damage from "not mine"
    flip(vol.entries[DROPBOX_FILE].backing, len(raw) - 1)
    assert not decrypt_volume(backing, **readers["root"]).entries[DROPBOX_FILE].readable
    with pytest.raises(SpecError):
        decrypt_volume(backing, **readers["agent7"])


@pytest.mark.parametrize("edit", [(3, 0x01), (-3, 0x02)], ids=["tag", "type-to-padding"])
def test_own_stanza_unnamed_reads_as_not_a_recipient(v2_copy: tuple[Path, Volume, dict[str, Any]],
                                                      edit: tuple[int, int]) -> None:
    """An edit that leaves no stanza naming the reader's key (its tag changed, or its type
    made padding) makes the file "not a recipient" for that reader, as FORMAT.md says of a
    hybrid file whose stanzas name none of its keys.  Another recipient still detects the
    edit (header MAC)."""
    backing, vol, readers = v2_copy
    bp, off = x25519_stanza_of(vol, HYBRID_FILE, "root")
    flip(bp, off + edit[0], edit[1])
    assert not decrypt_volume(backing, **readers["root"]).entries[HYBRID_FILE].readable
    with pytest.raises(SpecError, match="header MAC"):
        decrypt_volume(backing, **readers["recovery"])


def test_v2_sample_chain(v2_copy: tuple[Path, Volume, dict[str, Any]]) -> None:
    """The sample's `chain` (its rotate --slots) verifies with generation 1's master, which
    the config's `retired` holds; with nothing else."""
    backing, vol, readers = v2_copy
    assert vol.conf["chain"]["from"] == 1 and vol.keys.key_id == 2
    for how in readers.values():
        again = decrypt_volume(backing, **how)
        assert again.keys.retired[1] == vol.keys.retired[1] != vol.keys.master
        verify_chain(again.keys.retired[1], 1, again)
    for master, gen in [(vol.keys.master, 1), (vol.keys.master, 2), (os.urandom(32), 1),
                        (vol.keys.retired[1], 2)]:
        with pytest.raises(SpecError, match="chain"):
            verify_chain(master, gen, vol)


MALLORY = b"a former user's passphrase"


def former_user_forgery(backing: Path, vol: Volume) -> bytes:
    """The v2 sample's config forged by a former user, who kept A, the base key and
    generation 1's master: generation 3 with a master of their choosing (returned), a chain
    from generation 1, the retired generation 1, the policy, and a slot of their own
    (passphrase MALLORY) besides everyone's."""
    a, vid = vol.keys.authority, bytes.fromhex(vol.conf["volume_id"])
    assert a is not None
    m3, master1 = os.urandom(32), vol.keys.retired[1]

    def edit(c: dict[str, Any]) -> None:
        c["key_id"] = 3
        policy = c["policy"]  # sealed under the base key's policy key: still good
        forge(c, m3, authority=a, base=vol.keys.base)
        c["policy"] = policy
        c["retired"] = [{"key_id": 1, "wrapped": b64e(gcm_seal(hkdf(m3, "cryptfs/v2/retired"),
                                                               master1, vid + u32(1)))}]
        c["chain"] = {"from": 1, "mac": b64e(chain_mac(master1, vid, 1, 3, m3))}
        c["slots"].append(make_slot(vid, 2, MALLORY, m3, 3, authority=a) |
                          {"user": "mallory", "uid": 4242, "role": "admin"})
    remac(backing, m3, edit)
    return m3


@pytest.mark.mount
def test_a_running_mount_does_not_follow_a_forged_generation(tmp_path: Path) -> None:
    """FORMAT.md: a running mount that holds generation 2 follows a new generation only if
    its `chain` verifies with generation 2's master.  The former user's forgery (which a
    cold reader accepts) is not followed: files created afterwards still name generation 2
    and the real recipients, and the config is left as it was found."""
    backing, manifest = copy_sample(SAMPLES_V2[0], tmp_path / "vol")
    vol = decrypt_volume(backing, SAMPLE_PASS)
    pw = tmp_path / "pw"
    pw.write_text(manifest["passphrase"] + "\n")
    m = new_mount(tmp_path, backing, pw)
    m.start()
    try:
        former_user_forgery(backing, vol)
        forged = (backing / "cryptfs.conf").read_bytes()
        for name in ("after-forgery.bin", "hybrid/after-forgery.bin", "hybrid/x/after-forgery.bin"):
            (m.mnt / name).write_bytes(name.encode())
    finally:
        m.stop()
    assert (backing / "cryptfs.conf").read_bytes() == forged
    (backing / "cryptfs.conf").write_bytes((SAMPLES_V2[0] / "cryptfs.conf").read_bytes())
    after = decrypt_volume(backing, SAMPLE_PASS)
    names = recipient_names(after.conf)
    assert after.entries[b"after-forgery.bin"].key_ids == [2]
    assert after.entries[b"after-forgery.bin"].data == b"after-forgery.bin"
    assert sorted(names[t] for t in after.entries[b"hybrid/after-forgery.bin"].tags) == \
        ["recovery", "root"]
    assert sorted(names[t] for t in after.entries[b"hybrid/x/after-forgery.bin"].tags) == \
        ["agent7", "recovery", "root"]


def test_forgeries_and_the_authority_key(v2_copy: tuple[Path, Volume, dict[str, Any]]) -> None:
    """Why the outsider forgeries (TAMPERS_V2 "forged-*") are refused, and what is not
    detected.  The same forgery with A in the ads passes every wrap and the MAC, and is
    then refused by the authority check unless the forger also knows the base key.  A former
    user knows both (and generation 1's master, not the current one): their forged config,
    with a slot of their own, opens cold (FORMAT.md, "Not detected"), and only `chain`
    keeps a running holder of the current master from following it."""
    backing, vol, readers = v2_copy
    original = (backing / "cryptfs.conf").read_bytes()
    a = vol.keys.authority
    assert a == hkdf(vol.keys.base, "cryptfs/v2/authority")

    m = os.urandom(32)  # (1) A known, the base key not
    remac(backing, m, lambda c: forge(c, m, authority=a, base=os.urandom(32)))
    for how in readers.values():
        with pytest.raises(SpecError, match="authority key does not match"):
            open_config(backing, **how)

    # (2) a former user: A, the base key and generation 1's master (not generation 2's)
    (backing / "cryptfs.conf").write_bytes(original)
    m3 = former_user_forgery(backing, vol)
    master1 = vol.keys.retired[1]
    for how in [*readers.values(), {"passphrase": MALLORY}]:
        conf, keys = open_config(backing, **how)  # a fresh unlock accepts it
        assert keys.master == m3 and keys.key_id == 3 and keys.base == vol.keys.base
        assert keys.policy == vol.keys.policy
        with pytest.raises(SpecError, match="chain"):  # a holder of generation 2 does not
            verify_chain(vol.keys.master, 2, (conf, keys))
        verify_chain(master1, 1, (conf, keys))  # (a genuine link from generation 1)
    gen1 = next(p for p, e in vol.entries.items() if e.kind == "file" and e.key_ids == [1])
    assert decrypt_file(keys, Path(vol.entries[gen1].backing).read_bytes())[0] == vol.entries[gen1].data


def test_recovery_auth_removed(v2_copy: tuple[Path, Volume, dict[str, Any]], tmp_path: Path) -> None:
    """A version 2 config may hold a recovery without "auth" (one made for a version 1
    config), so removing "auth" is not refused as such; what refuses the edits:

    - by a holder of the master (re-MACed): the wrap was made with A in its ad, so the
      recovery key no longer opens it; a passphrase still opens the config;
    - by an outsider (a master of their own, wrapped to the recovery key without A): the
      check of the file's A against the config's base key, after the MAC.  A -1 key file
      (no A) cannot make that check: it accepts the forgery."""
    backing, vol, readers = v2_copy
    original = (backing / "cryptfs.conf").read_bytes()
    remac(backing, vol.keys.master, lambda c: c["recovery"].pop("auth"))
    assert decrypt_volume(backing, SAMPLE_PASS).keys.master == vol.keys.master
    with pytest.raises(SpecError, match="recovery wrapped"):
        decrypt_volume(backing, **readers["recovery"])

    (backing / "cryptfs.conf").write_bytes(original)
    _outsider(slots=False, edit=lambda c: c["recovery"].pop("auth"))(backing, vol)
    with pytest.raises(SpecError, match="config MAC"):
        open_config(backing, SAMPLE_PASS)
    with pytest.raises(SpecError, match="authority key does not match"):
        open_config(backing, **readers["recovery"])
    magic, vid, r, _ = _key_line(readers["recovery"]["recovery_key"])
    v1_file = tmp_path / "v1.key"
    v1_file.write_text(f"{RECOVERY_MAGIC_V1}:{vid}:{r}\n")
    _, keys = open_config(backing, recovery_key=v1_file)  # not detected without A
    assert keys.master != vol.keys.master and keys.authority is None


def _key_line(key_file: Path) -> list[str]:
    """The key line of a recovery key file, split at ':'."""
    return next(ln for ln in key_file.read_text().splitlines()
                if ln.strip() and not ln.startswith("#")).split(":")


def test_wrong_recovery_key(v2_copy: tuple[Path, Volume, dict[str, Any]], tmp_path: Path) -> None:
    backing, vol, readers = v2_copy
    magic, vid, r, a = _key_line(readers["recovery"]["recovery_key"])
    assert magic == RECOVERY_MAGIC
    other = tmp_path / "other.key"
    other.write_text(f"{magic}:{vid}:{base64.b64encode(os.urandom(32)).decode()}:{a}\n")
    with pytest.raises(SpecError, match="does not match"):
        decrypt_volume(backing, recovery_key=other)
    other.write_text(f"{magic}:{'00' * 16}:{r}:{a}\n")
    with pytest.raises(SpecError, match="another volume"):
        decrypt_volume(backing, recovery_key=other)


def test_recovery_key_file_formats(v2_copy: tuple[Path, Volume, dict[str, Any]],
                                   tmp_path: Path) -> None:
    """An "auth" recovery needs the A part of the key file: a -1 line (r only), a -2 line
    without A, or a -2 line with another A are refused; comments and blank lines are not
    part of the key."""
    backing, vol, readers = v2_copy
    magic, vid, r, a = _key_line(readers["recovery"]["recovery_key"])
    assert vol.conf["recovery"]["auth"] is True
    assert base64.b64decode(a) == hkdf(vol.keys.base, "cryptfs/v2/authority") == vol.keys.authority
    f = tmp_path / "edited.key"
    f.write_text(f"\n# a comment\n\n{magic}:{vid}:{r}:{a}\n\n# another\n")
    rkeys = decrypt_volume(backing, recovery_key=f).keys
    assert rkeys.master == vol.keys.master and rkeys.authority == vol.keys.authority
    for line, why in [(f"{RECOVERY_MAGIC_V1}:{vid}:{r}", "no authority key"),
                      (f"{RECOVERY_MAGIC}:{vid}:{r}", "bad key line"),
                      (f"{RECOVERY_MAGIC_V1}:{vid}:{r}:{a}", "bad key line"),
                      (f"{RECOVERY_MAGIC}:{vid}:{r}:", "bad base64|0 bytes|44 characters"),
                      (f"{RECOVERY_MAGIC}:{vid}:{r}:{a}:{a}", "bad key line"),
                      (f"{RECOVERY_MAGIC}:{vid}:{r}:{base64.b64encode(os.urandom(32)).decode()}",
                       "recovery wrapped")]:
        f.write_text(line + "\n")
        with pytest.raises(SpecError, match=why):
            decrypt_volume(backing, recovery_key=f)
    f.write_text(f"{magic}:{vid}:{r}:{a}\n{magic}:{vid}:{r}:{a}\n")  # two key lines
    with pytest.raises(SpecError, match="exactly one"):
        decrypt_volume(backing, recovery_key=f)


def test_v1_recovery_key_file_and_upgraded_volumes(tmp_path: Path) -> None:
    """A version 1 config's recovery has no "auth", and its key file is a -1 line; it stays
    so when the config becomes version 2 and is rotated."""
    src = DATA / "sample-v1-users-recovery"
    backing, manifest = copy_sample(src, tmp_path / "vol")
    key = backing.parent / "recovery.key"
    assert _key_line(key)[0] == RECOVERY_MAGIC_V1 and len(_key_line(key)) == 3
    vol = decrypt_volume(backing, recovery_key=key)
    assert vol.conf["cryptfs"] == 1 and "auth" not in vol.conf["recovery"]
    assert vol.keys.authority is None
    # "auth" added to a v1 config by a holder of the master (re-MACed): refused
    original = (backing / "cryptfs.conf").read_bytes()
    remac(backing, vol.keys.master, lambda c: c["recovery"].update(auth=True))
    with pytest.raises(SpecError, match="version 1 config with version 2"):
        decrypt_volume(backing, manifest["passphrase"].encode())
    (backing / "cryptfs.conf").write_bytes(original)

    # the volume becomes version 2 (its slots upgraded by `cryptfs passwd`), and is rotated:
    # the recovery keeps no "auth", and its -1 key file keeps opening it
    from conftest import run_cli

    old_pw, new_pw = tmp_path / "old", tmp_path / "new"
    for who, phrase in [("root", manifest["passphrase"]), ("agent7", manifest["agent_passphrase"])]:
        old_pw.write_text(phrase + "\n")
        new_pw.write_text(f"{who}'s new passphrase\n")
        run_cli("passwd", str(backing), "--passphrase-file", str(old_pw),
                "--new-passphrase-file", str(new_pw))
        up = decrypt_volume(backing, f"{who}'s new passphrase".encode())
        assert up.conf["cryptfs"] == 2 and "auth" not in up.conf["recovery"]
        assert up.keys.authority == hkdf(up.keys.base, "cryptfs/v2/authority")
        assert decrypt_volume(backing, recovery_key=key).keys.authority is None
    new_pw.write_text("root's new passphrase\n")  # (the admin rotates: docs/POLICY.md)
    run_cli("rotate", str(backing), "--slots", "--passphrase-file", str(new_pw))
    readers: list[dict[str, Any]] = [{"passphrase": b"root's new passphrase"},
                                     {"passphrase": b"agent7's new passphrase"},
                                     {"recovery_key": key}]
    for how in readers:
        rotated = decrypt_volume(backing, **how)
        assert rotated.keys.key_id == 2 and "auth" not in rotated.conf["recovery"]
        verify_chain(vol.keys.master, 1, rotated)
        assert {p: e.data for p, e in rotated.entries.items()} == \
            {p: e.data for p, e in vol.entries.items()}


def recovery_master(backing: Path, key_file: Path) -> bytes:
    """The master key from the recovery key file, as FORMAT.md describes it
    (X25519 and ChaCha20-Poly1305 straight from the library, not cryptfs)."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    line = next(ln for ln in key_file.read_text().splitlines() if not ln.startswith("#"))
    magic, vid, b64r, b64a = line.split(":")
    assert magic == "CRYPTFS-RECOVERY-KEY-2"
    conf = json.loads((backing / "cryptfs.conf").read_text())
    assert vid == conf["volume_id"] and conf["recovery"]["auth"] is True
    r = X25519PrivateKey.from_private_bytes(base64.b64decode(b64r))
    pub = r.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert pub == base64.b64decode(conf["recovery"]["public"])
    wrapped = base64.b64decode(conf["recovery"]["wrapped"])
    assert len(wrapped) == 80
    epk = wrapped[:32]
    shared = r.exchange(X25519PublicKey.from_public_bytes(epk))
    k = HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + pub,
             info=b"cryptfs/v1/recovery").derive(shared)
    return ChaCha20Poly1305(k).decrypt(bytes(12), wrapped[32:],
                                       b"cryptfs/v1/recovery" + bytes.fromhex(vid)
                                       + base64.b64decode(b64a))


def test_recovery_key_opens_the_master_as_the_spec_says(tmp_path: Path) -> None:
    from conftest import run_cli

    pf = tmp_path / "pass"
    pf.write_bytes(PASSPHRASE + b"\n")
    run_cli("init", str(tmp_path / "b"), "--passphrase-file", str(pf), "--recovery-key",
            str(tmp_path / "rk"), "--kdf-memory", "8", "--kdf-iterations", "1")
    master = recovery_master(tmp_path / "b", tmp_path / "rk")
    _, keys = open_config(tmp_path / "b", PASSPHRASE)  # the config MAC covers "recovery" too
    assert master == keys.master
    _, rkeys = open_config(tmp_path / "b", recovery_key=tmp_path / "rk")
    assert rkeys.master == master and rkeys.slot_id is None and keys.slot_id == 0
    assert list(rkeys.private) != list(keys.private)  # each holds its own X25519 key
    # the slot and the key file hold the same authority key, the base key's
    assert keys.authority == rkeys.authority == hkdf(keys.base, "cryptfs/v2/authority")
    assert "chain" not in json.loads((tmp_path / "b" / "cryptfs.conf").read_text())  # no rotation yet


# ---------------------------------------------------------------------------------------------
# 3c. cryptfs refuses what this decryptor refuses: the fields and stanzas FORMAT.md forbids
# ---------------------------------------------------------------------------------------------

FIELD_TAMPERS = [*(f"resealed-field-added-{w}" for w in ADDED_AT), "resealed-field-added-policy-rule",
                 "conf-key-named-twice"]
STANZA_TAMPERS = [f"stanza-{n}" for n in STANZA_EDITS if n != "none"]


def _cli_refusal(res: Any, code: int, *words: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode == code, out
    assert "Traceback" not in out and all(w in out for w in words), out


@pytest.mark.mount
@pytest.mark.parametrize("tamper", FIELD_TAMPERS)
def test_cryptfs_refuses_a_config_field_added_after_sealing(tamper: str, tmp_path: Path) -> None:
    """A config with a field added (and the MAC made again by a holder of the master), or a key
    named twice: `cryptfs info`, `fsck` and `mount` refuse it, naming the field."""
    backing, _ = copy_sample(SAMPLES_V2[0], tmp_path / "vol")
    TAMPERS_V2[tamper](backing, decrypt_volume(backing, SAMPLE_PASS))
    pf = tmp_path / "pass"
    pf.write_bytes(SAMPLE_PASS + b"\n")
    if tamper == "conf-key-named-twice":
        words: tuple[str, ...] = ("names the field 'key_id' twice",)
    elif tamper.endswith("policy-rule"):  # sealed: only a reader with the key sees inside
        words = ("unknown field policy.rules[", f"].{ADDED_FIELD}: not written by this release; refused")
    else:
        where = {"top": "", "kdf": "kdf.", "slot": "slots[0].", "slot-kdf": "slots[0].kdf.",
                 "recovery": "recovery.", "retired": "retired[0].", "chain": "chain.",
                 "rotation": "rotation.", "audit": "audit."}[tamper.rsplit("-added-", 1)[1]]
        words = (f"unknown field {where}{ADDED_FIELD}: not written by this release; refused",)
    sealed_only = tamper.endswith("policy-rule")
    info = run_cli("info", str(backing), check=False)
    if sealed_only:
        assert info.returncode == 0  # `info` opens nothing sealed (FORMAT.md says so of it)
    else:
        _cli_refusal(info, 4, *words)
    _cli_refusal(run_cli("fsck", str(backing), "--passphrase-file", str(pf), check=False),
                 6 if sealed_only else 4, *words)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(pf), check=False)
    try:
        _cli_refusal(res, 4, *words)
        assert not os.path.ismount(mnt)
    finally:
        if os.path.ismount(mnt):
            os.system(f"fusermount3 -u {mnt}")  # noqa: S605 - (only if the test failed)


@pytest.mark.mount
@pytest.mark.parametrize("tamper", STANZA_TAMPERS)
def test_cryptfs_refuses_a_stanza_after_the_one_that_opens(tamper: str, tmp_path: Path) -> None:
    """A header with a valid MAC whose stanzas after the opening one break the rules: the
    mount answers EIO and logs it, fsck reports the header; the rest of the volume reads."""
    backing, manifest = copy_sample(SAMPLES_V2[0], tmp_path / "vol")
    vol = decrypt_volume(backing, SAMPLE_PASS)
    plain = symmetric_file(vol)
    TAMPERS_V2[tamper](backing, vol)
    pf = tmp_path / "pass"
    pf.write_bytes(SAMPLE_PASS + b"\n")
    res = run_cli("fsck", str(backing), "--passphrase-file", str(pf), check=False)
    _cli_refusal(res, 6, f"damaged: /{plain.decode()}: header", "1 damaged item(s)")
    m = new_mount(tmp_path, backing, pf)
    m.start()
    try:
        with pytest.raises(OSError) as err:
            m.path(plain.decode()).read_bytes()
        assert err.value.errno == 5  # EIO
        other = min(p for p, e in vol.entries.items()
                    if e.kind == "file" and e.readable and p != plain)
        assert m.path(other.decode()).read_bytes() == vol.entries[other].data
    finally:
        m.stop()
    log = m.log_text()
    assert "integrity" in log and vol.entries[plain].data[:16] not in log.encode()
