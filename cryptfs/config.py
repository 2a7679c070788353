"""The volume config: ``BACKING/cryptfs.conf``, a JSON object.

It holds the format version, default mode, feature flags, the default KDF
cost, the key generation, and the list of key slots.  A user slot holds the
user's X25519 key pair: the private key wrapped under a key stretched from
their passphrase with Argon2id (as LUKS keyslots do), the public key, and the
master key wrapped to that public key, so a new master reaches every user
without their passphrases.  (Older "v1" slots wrap the master directly under
the passphrase; they are still read.)  The whole
object except ``mac`` is authenticated with HMAC-SHA256 under a key derived
from the master key, so after unlocking, any edited, added, removed or
downgraded field is detected.  The exact layout is in docs/FORMAT.md.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import hmac
import json
import os
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from cryptfs import lineage, sysio
from cryptfs.errors import BackingIOError, NotAVolume, WrongPassphrase
from cryptfs.keys import MASTER_KEY_LEN, VolumeKeys
from cryptfs.lineage import Link
from cryptfs.modes import NotForMe, content_mode_by_name, x25519
from cryptfs.modes.errors import IntegrityError
from cryptfs.modes.kdf import ARGON2_SALT_LEN, MIN_MEM_KIB, MIN_OPS, argon2id, hkdf
from cryptfs.modes.rand import random_bytes
from cryptfs.modes.seal import OVERHEAD, Seal
from cryptfs.roles import ROLES
from cryptfs.secret import Secret

CONFIG_NAME = "cryptfs.conf"
TREE_NAME = "tree"
FORMAT_VERSION = 2  # written when a v2 feature is used; version 1 configs are still read
READ_VERSIONS = (1, 2)
FEATURES = frozenset({"aead-blocks", "last-block-flag", "siv-names", "long-names", "xattrs"})

# Default Argon2id cost of a key slot.  128 MiB x 3 passes: ~0.5 s on one core
# here, and 20 users unlocking at once need 2.5 GiB (see docs/PERFORMANCE.md).
DEFAULT_OPS = 3
DEFAULT_MEM_KIB = 128 * 1024
MAX_OPS = 64
MAX_MEM_KIB = 4096 * 1024  # 4 GiB

_SEALED_KEY_LEN = OVERHEAD + 32  # a 32-byte key sealed (cryptfs.modes.seal)
USER_KEY_LEN = 64  # a v2 slot's secret: the user's X25519 private key || the volume authority key
_SEALED_USER_KEY_LEN = OVERHEAD + USER_KEY_LEN
_SLOT_MASTER_LABEL = b"cryptfs/v2/slot-master"
_SLOT_MASTER_LEN = x25519.KEY_LEN + MASTER_KEY_LEN + x25519.TAG_LEN
ROTATION_KINDS = ("wrap-key", "reencrypt")  # (a `--slots` rotation finishes at once: no record)

# Every field this release writes, per object.  A config holding any other
# is refused before anything in it is used: a newer release's field (perhaps
# one that restricts something) must not be silently ignored, and a field
# added after sealing must not pass because it was dropped before the MAC.
TOP_FIELDS = frozenset({"cryptfs", "volume_id", "created", "default_mode", "features", "kdf",
                        "key_id", "slots", "recovery", "base", "retired", "rotation", "policy",
                        "chain", "lineage", "audit", "mac"})
KDF_FIELDS = frozenset({"algorithm", "ops", "mem_kib"})  # the default cost: no salt
SLOT_KDF_FIELDS = KDF_FIELDS | {"salt"}
SLOT_FIELDS = frozenset({"id", "label", "created", "kdf", "wrapped", "public", "master",
                         "user", "uid", "role"})
RECOVERY_FIELDS = frozenset({"public", "wrapped", "auth"})
RETIRED_FIELDS = frozenset({"key_id", "wrapped"})
ROTATION_FIELDS = frozenset({"kind", "started"})
CHAIN_FIELDS = frozenset({"from", "mac"})
AUDIT_FIELDS = frozenset({"dir", "key"})


class UnknownField(ValueError):
    """A config (or policy) object holds a field this release does not write."""

    def __init__(self, where: str) -> None:
        super().__init__(f"unknown field {where}: not written by this release; refused")


def refuse_unknown(obj: Any, known: frozenset[str], where: str = "") -> None:
    """UnknownField for the first key of ``obj`` (if a dict) not in ``known``."""
    if isinstance(obj, dict):
        for k in sorted(set(obj) - known, key=str):
            raise UnknownField(f"{where}{k}")


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different (a reader that keeps the first
    of two equal keys and one that keeps the last must not see two configs)."""
    seen: set[str] = set()
    for k, _ in pairs:
        if k in seen:
            raise _DuplicateKey(repr(k))
        seen.add(k)
    return dict(pairs)


def _refuse_unknown_fields(d: dict[str, Any]) -> None:
    """Every object of the config, checked for fields this release does not write."""
    def items(key: str) -> list[Any]:
        v = d.get(key)
        return v if isinstance(v, list) else []

    refuse_unknown(d, TOP_FIELDS)
    refuse_unknown(d.get("kdf"), KDF_FIELDS, "kdf.")
    for i, slot in enumerate(items("slots")):
        refuse_unknown(slot, SLOT_FIELDS, f"slots[{i}].")
        if isinstance(slot, dict):
            refuse_unknown(slot.get("kdf"), SLOT_KDF_FIELDS, f"slots[{i}].kdf.")
    refuse_unknown(d.get("recovery"), RECOVERY_FIELDS, "recovery.")
    for i, item in enumerate(items("retired")):
        refuse_unknown(item, RETIRED_FIELDS, f"retired[{i}].")
    refuse_unknown(d.get("rotation"), ROTATION_FIELDS, "rotation.")
    refuse_unknown(d.get("chain"), CHAIN_FIELDS, "chain.")
    refuse_unknown(d.get("audit"), AUDIT_FIELDS, "audit.")


def b64e(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def b64d(s: object) -> bytes:
    if not isinstance(s, str):
        raise ValueError("expected a base64 string")
    return base64.b64decode(s, validate=True)


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass
class Kdf:
    ops: int
    mem_kib: int
    salt: bytes = b""

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"algorithm": "argon2id", "ops": self.ops, "mem_kib": self.mem_kib}
        if self.salt:
            d["salt"] = b64e(self.salt)
        return d

    @classmethod
    def from_json(cls, d: Any) -> Kdf:
        if not isinstance(d, dict) or d.get("algorithm") != "argon2id":
            raise ValueError("unsupported KDF")
        ops, mem = d.get("ops"), d.get("mem_kib")
        if not isinstance(ops, int) or not isinstance(mem, int):
            raise ValueError("bad KDF cost")
        # Bounded both ways: an edited config must not turn unlocking into a
        # memory or CPU bomb.
        if not (MIN_OPS <= ops <= MAX_OPS and MIN_MEM_KIB <= mem <= MAX_MEM_KIB):
            raise ValueError("KDF cost out of range")
        salt = b64d(d["salt"]) if "salt" in d else b""
        if "salt" in d and len(salt) != ARGON2_SALT_LEN:
            raise ValueError("bad KDF salt length")
        return cls(ops, mem, salt)


_SLOT_FIELDS = ("id", "label", "kdf", "wrapped", "created", "public", "master")  # (not `extra`)


@dataclass
class Slot:
    id: int
    label: str
    kdf: Kdf
    # v2: nonce (12) || AES-256-GCM(user's X25519 private key || authority key) (80)
    # v1: nonce (12) || AES-256-GCM(master) (48)
    wrapped: bytes
    created: str
    extra: dict[str, Any] = field(default_factory=dict)  # user, uid, role
    public: bytes | None = None  # v2: the user's X25519 public key
    master: bytes | None = None  # v2: the master key wrapped to ``public``

    @property
    def v2(self) -> bool:
        return self.public is not None

    def to_json(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update(id=self.id, label=self.label, kdf=self.kdf.to_json(),
                 wrapped=b64e(self.wrapped), created=self.created)
        if self.public is not None and self.master is not None:
            d.update(public=b64e(self.public), master=b64e(self.master))
        return d

    @classmethod
    def from_json(cls, d: Any) -> Slot:
        if not isinstance(d, dict):
            raise ValueError("slot is not an object")
        extra = {k: v for k, v in d.items() if k not in _SLOT_FIELDS}
        sid, label, created = d.get("id"), d.get("label"), d.get("created")
        if not isinstance(sid, int) or not isinstance(label, str) or not isinstance(created, str):
            raise ValueError("bad slot fields")
        wrapped = b64d(d.get("wrapped"))
        public = master = None
        if "public" in d or "master" in d:
            public, master = b64d(d.get("public")), b64d(d.get("master"))
            if len(public) != x25519.KEY_LEN or len(master) != _SLOT_MASTER_LEN:
                raise ValueError("bad slot key lengths")
        if len(wrapped) != (_SEALED_USER_KEY_LEN if public is not None else _SEALED_KEY_LEN):
            raise ValueError("bad wrapped key length")
        kdf = Kdf.from_json(d.get("kdf"))
        if not kdf.salt:
            raise ValueError("slot kdf without salt")
        user, uid, role = d.get("user", ""), d.get("uid", 0), d.get("role", ROLES[0])
        if not (isinstance(user, str) and ("user" not in d or user)):
            raise ValueError(f"slot {sid}: user is not a name")
        if not (type(uid) is int and 0 <= uid < 1 << 32):
            raise ValueError(f"slot {sid}: uid is not a user id")
        if role not in ROLES:
            raise ValueError(f"slot {sid}: role is none of {', '.join(ROLES)}")
        return cls(sid, label, kdf, wrapped, created, extra, public, master)


@dataclass
class SlotKeys:
    """What a passphrase opens: the master key, and (v2 slots) the user key:
    their X25519 private key || the volume authority key (``USER_KEY_LEN``)."""

    master: Secret
    private: Secret | None


def user_private(user_key: bytes) -> bytes:
    """The X25519 private key in a user key (or a bare 32-byte private key)."""
    return user_key[:x25519.KEY_LEN]


def user_authority(user_key: bytes) -> bytes:
    return user_key[x25519.KEY_LEN:USER_KEY_LEN]


def _slot_ad(volume_id: bytes, slot: Slot) -> bytes:
    ad = b"cryptfs/v1/slot" + volume_id + struct.pack(">I", slot.id) + canonical(slot.kdf.to_json())
    if slot.public is not None:
        ad = b"cryptfs/v2/slot" + ad[len(b"cryptfs/v1/slot"):] + slot.public
    return ad


def _slot_master_ad(volume_id: bytes, slot_id: int, key_id: int, authority: bytes) -> bytes:
    # The authority key (a secret every user's slot holds) makes a wrap that
    # someone without it made fail: the public keys alone forge nothing.
    return volume_id + struct.pack(">II", slot_id, key_id) + authority


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Recovery:
    """The volume's recovery key: its X25519 public half, and the master key
    wrapped to it (cryptfs.recovery).  The private half is never in the volume."""

    public: bytes
    wrapped: bytes
    auth: bool = False  # wrapped with the authority key in its associated data (v2)

    LABEL = b"cryptfs/v1/recovery"

    @classmethod
    def to(cls, public: bytes, master: Secret, volume_id: bytes, authority: bytes | None
           ) -> Recovery:
        """``master`` wrapped to the recovery public key ``public`` (bound to the
        authority key, which the recovery key file also holds, if given)."""
        ad = cls.LABEL + volume_id + (authority or b"")
        return cls(public, x25519.wrap(master.reveal(), public, cls.LABEL, ad), authority is not None)

    def ad(self, volume_id: bytes, authority: bytes | None) -> bytes:
        return self.LABEL + volume_id + (authority or b"")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"public": b64e(self.public), "wrapped": b64e(self.wrapped)}
        if self.auth:
            d["auth"] = True
        return d

    @classmethod
    def from_json(cls, d: Any) -> Recovery:
        if not isinstance(d, dict):
            raise ValueError("recovery is not an object")
        public, wrapped = b64d(d.get("public")), b64d(d.get("wrapped"))
        if len(public) != 32 or len(wrapped) != 32 + MASTER_KEY_LEN + 16:
            raise ValueError("bad recovery key lengths")
        auth = d.get("auth", False)
        if auth is not True and "auth" in d:
            raise ValueError("bad recovery auth flag")
        return cls(public, wrapped, auth)


@dataclass
class VolumeConfig:
    volume_id: bytes
    default_mode: str
    features: list[str]
    kdf: Kdf  # default cost for new slots
    key_id: int
    slots: list[Slot]
    created: str
    mac: bytes = b""
    recovery: Recovery | None = None
    base: bytes | None = None  # the base key sealed under the master (after a rotation)
    retired: dict[int, bytes] = field(default_factory=dict)  # key id -> old master, sealed
    rotation: dict[str, Any] | None = None  # {"kind", "started"} while one is unfinished
    policy: bytes | None = None  # the directory policy, sealed (cryptfs.policy)
    chain: tuple[int, bytes] | None = None  # (previous key id, MAC by the previous master)
    audit: dict[str, str] | None = None  # the access log bound to the volume: {"dir", "key"}
    lineage: list[Link] = field(default_factory=list)  # signed links of the last rotations

    # -- serialisation ---------------------------------------------------------
    @property
    def version(self) -> int:
        """2 if anything of version 2 is in use (an older cryptfs then refuses
        the volume clearly instead of failing to unlock it), else 1."""
        v2 = (any(s.v2 for s in self.slots) or self.base or self.retired or self.rotation
              or self.policy or self.chain or self.audit or self.lineage
              or (self.recovery is not None and self.recovery.auth))
        return FORMAT_VERSION if v2 else 1

    def body(self) -> dict[str, Any]:
        return {
            "cryptfs": self.version,
            "volume_id": self.volume_id.hex(),
            "created": self.created,
            "default_mode": self.default_mode,
            "features": sorted(self.features),
            "kdf": self.kdf.to_json(),
            "key_id": self.key_id,
            "slots": [s.to_json() for s in self.slots],
            # (absent, not null, without a recovery key: older configs keep their MAC)
            **({"recovery": self.recovery.to_json()} if self.recovery else {}),
            **({"base": b64e(self.base)} if self.base else {}),
            **({"retired": [{"key_id": k, "wrapped": b64e(v)} for k, v in sorted(self.retired.items())]}
               if self.retired else {}),
            **({"rotation": self.rotation} if self.rotation else {}),
            **({"policy": b64e(self.policy)} if self.policy else {}),
            **({"chain": {"from": self.chain[0], "mac": b64e(self.chain[1])}} if self.chain else {}),
            **({"audit": dict(self.audit)} if self.audit else {}),
            **({"lineage": lineage.to_json(self.lineage)} if self.lineage else {}),
        }

    def compute_mac(self, keys: VolumeKeys) -> bytes:
        return hmac.new(keys.config_mac_key, canonical(self.body()), "sha256").digest()

    def seal(self, keys: VolumeKeys) -> None:
        self.mac = self.compute_mac(keys)

    def verify(self, keys: VolumeKeys) -> None:
        if not hmac.compare_digest(self.compute_mac(keys), self.mac):
            raise NotAVolume(
                "volume config failed authentication: it was edited or damaged",
                hint="restore cryptfs.conf from a backup",
            )

    def to_bytes(self) -> bytes:
        d = self.body()
        d["mac"] = b64e(self.mac)
        return (json.dumps(d, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> VolumeConfig:
        try:
            d = json.loads(raw, object_pairs_hook=_no_duplicates)
        except _DuplicateKey as e:
            raise NotAVolume(f"volume config names the field {e} twice: it was edited or damaged",
                             hint="restore cryptfs.conf from a backup") from None
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise NotAVolume("volume config is not valid JSON (corrupt?)") from None
        if not isinstance(d, dict) or "cryptfs" not in d:
            raise NotAVolume("volume config is not a cryptfs config")
        version = d["cryptfs"]
        if type(version) is not int:  # (a "2" would read as "version '2' ... reads 1, 2")
            raise NotAVolume(f"volume config's format version {json.dumps(version)[:40]} is not "
                             "a whole number: it was edited or damaged",
                             hint="restore cryptfs.conf from a backup")
        if version not in READ_VERSIONS:
            raise NotAVolume(
                f"volume format version {version!r} is not supported by this cryptfs "
                f"(it reads versions {', '.join(map(str, READ_VERSIONS))})",
                hint="use the cryptfs release that created the volume",
            )
        try:
            _refuse_unknown_fields(d)
            features = d["features"]
            if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
                raise ValueError("features")
            unknown = sorted(set(features) - FEATURES)
            if unknown:
                raise NotAVolume(f"volume uses unknown features: {', '.join(unknown)}",
                                 hint="use a newer cryptfs")
            missing = sorted(FEATURES - set(features))
            if missing:
                raise NotAVolume(f"volume config lacks required features: {', '.join(missing)}")
            mode = d["default_mode"]
            content_mode_by_name(mode)
            key_id = d["key_id"]
            if not isinstance(key_id, int) or key_id < 1:
                raise ValueError("key_id")
            slots = [Slot.from_json(s) for s in d["slots"]]
            if not slots or len({s.id for s in slots}) != len(slots):
                raise ValueError("slots")
            cfg = cls(
                volume_id=bytes.fromhex(d["volume_id"]),
                default_mode=mode,
                features=features,
                kdf=Kdf.from_json(d["kdf"]),
                key_id=key_id,
                slots=slots,
                created=str(d["created"]),
                mac=b64d(d["mac"]),
                recovery=Recovery.from_json(d["recovery"]) if "recovery" in d else None,
                base=_sealed_key(d["base"]) if "base" in d else None,
                retired=_retired_from_json(d.get("retired", []), key_id),
                rotation=_rotation_from_json(d["rotation"]) if "rotation" in d else None,
                policy=b64d(d["policy"]) if "policy" in d else None,
                chain=_chain_from_json(d["chain"], key_id) if "chain" in d else None,
                audit=_audit_from_json(d["audit"]) if "audit" in d else None,
                lineage=lineage.from_json(d["lineage"], key_id) if "lineage" in d else [],
            )
            if cfg.version != version:
                raise NotAVolume(f"volume config says it is version {version} but is version "
                                 f"{cfg.version}: it was edited or damaged",
                                 hint="restore cryptfs.conf from a backup")
            # The MAC is computed over the object as this release writes it
            # (body()); it must be exactly the object as read, or something the
            # parse dropped or normalised (a value's type, an order, a spelling)
            # would go unauthenticated.
            if canonical({**cfg.body(), "mac": b64e(cfg.mac)}) != canonical(d):
                raise NotAVolume("volume config is not in the form this release writes "
                                 "(a value of another type or spelling): it was edited or damaged",
                                 hint="restore cryptfs.conf from a backup")
            return cfg
        except NotAVolume:
            raise
        except UnknownField as e:
            raise NotAVolume(f"volume config: {e}",
                             hint="use the cryptfs release that wrote it, or restore "
                                  "cryptfs.conf from a backup") from None
        except KeyError as e:
            raise NotAVolume(f"volume config is malformed: the field {e.args[0]} is missing",
                             hint="restore cryptfs.conf from a backup") from None
        except (TypeError, ValueError, binascii.Error) as e:
            raise NotAVolume(f"volume config is malformed: a value is not of the kind or form "
                             f"this release writes ({str(e)[:100]})",
                             hint="restore cryptfs.conf from a backup") from None

    # -- keys ------------------------------------------------------------------
    def open_keys(self, master: Secret, authority: bytes | None = None) -> VolumeKeys:
        """The volume's keys from its master key; the config is authenticated first.

        ``authority``: the authority key from the opener's own slot or recovery
        key file; the base key the config holds must give the same one.
        """
        keys = VolumeKeys(Secret(master.reveal()), self.key_id)
        self.verify(keys)
        base = retired = None
        try:
            if self.base is not None:
                base = Secret(keys.base_wrap.open(self.base, self.volume_id))
            retired = {kid: Secret(keys.retired_wrap.open(w, self.volume_id + struct.pack(">I", kid)))
                       for kid, w in self.retired.items()}
        except IntegrityError:
            keys.close()
            raise NotAVolume("volume config holds keys that do not open: it was damaged") from None
        keys.close()
        keys = VolumeKeys(Secret(master.reveal()), self.key_id, base, retired)
        if authority is not None and not hmac.compare_digest(keys.authority, authority):
            keys.close()
            raise NotAVolume("volume config failed authentication: its keys are not this "
                             "volume's (it was replaced or forged)",
                             hint="restore cryptfs.conf from a backup")
        return keys

    def next_key_id(self) -> int:
        return max([self.key_id, *self.retired]) + 1

    def set_generation(self, old: VolumeKeys, master: Secret, retire: bool) -> VolumeKeys:
        """Make ``master`` the next key generation and return its keys.

        The base key, and with ``retire`` the masters of the current and
        retired generations, are sealed under it (a rotation still re-wrapping
        headers needs them); every v2 slot and the recovery key get it, and
        ``chain`` proves that a holder of the previous master made it.  v1
        slots cannot get it (they need a passphrase): the caller refuses
        those first.  The caller seals and saves the config.
        """
        kept = {kid: Secret(m.reveal()) for kid, m in old.retired.items()} if retire else {}
        if retire:
            kept[old.key_id] = Secret(old.master.reveal())
        key_id = self.next_key_id()
        new = VolumeKeys(Secret(master.reveal()), key_id, Secret(old.base.reveal()), kept)
        self.key_id = key_id
        self.base = new.base_wrap.seal(new.base.reveal(), self.volume_id)
        self.retired = {kid: new.retired_wrap.seal(m.reveal(), self.volume_id + struct.pack(">I", kid))
                        for kid, m in kept.items()}
        for slot in self.slots:
            if slot.public is not None:
                slot.master = x25519.wrap(master.reveal(), slot.public, _SLOT_MASTER_LABEL,
                                          _slot_master_ad(self.volume_id, slot.id, key_id,
                                                          new.authority))
        if self.recovery is not None:
            self.recovery = Recovery.to(self.recovery.public, master, self.volume_id,
                                        new.authority if self.recovery.auth else None)
        self.chain = (old.key_id, self.chain_mac(old.master, old.key_id, new))
        self.lineage = lineage.extended(self.lineage, self.volume_id, old, new)
        return new

    def chain_mac(self, previous: Secret, previous_id: int, new: VolumeKeys) -> bytes:
        return hmac.new(hkdf(previous.reveal(), b"cryptfs/v2/chain"),
                        b"cryptfs/v2/chain" + self.volume_id + struct.pack(">II", previous_id, new.key_id)
                        + new.fingerprint, "sha256").digest()

    def follows(self, held: VolumeKeys, new: VolumeKeys) -> bool:
        """Whether this config's generation ``new`` was made by a holder of
        ``held``, directly (``chain``: the generation just before it) or
        through generations in between, each made by a holder of the one
        before (``lineage``: rotations this holder did not see, e.g. two
        within one config check).  What a running agent or mount checks
        before it follows a rotation, so neither a config put back from
        earlier nor one forged by someone who lacks the current master is
        followed."""
        if new.key_id <= held.key_id:
            return False
        if self.chain is not None and self.chain[0] == held.key_id and hmac.compare_digest(
                self.chain[1], self.chain_mac(held.master, held.key_id, new)):
            return True
        return lineage.descends(self.lineage, self.volume_id, held, new)

    def drop_retired(self, keys: VolumeKeys) -> VolumeKeys:
        """Forget the retired generations (no header needs them any more)."""
        self.retired = {}
        fresh = VolumeKeys(Secret(keys.master.reveal()), keys.key_id, Secret(keys.base.reveal()))
        return fresh

    # -- slots -----------------------------------------------------------------
    def make_slot(self, keys: VolumeKeys, passphrase: Secret, label: str,
                  kdf: Kdf | None = None, slot_id: int | None = None,
                  private: Secret | None = None, **extra: Any) -> Slot:
        """A new (v2) slot: a user key pair (``private``, or a fresh one) whose
        private half, with the volume's authority key, is sealed under
        ``passphrase``, and whose public half gets the master.  Appended id
        unless ``slot_id`` is given."""
        cost = kdf or self.kdf
        if slot_id is None:
            slot_id = max((s.id for s in self.slots), default=-1) + 1
        priv = user_private(private.reveal()) if private is not None else x25519.new_private_key()
        public = x25519.public_key(priv)
        slot = Slot(
            id=slot_id,
            label=label,
            kdf=Kdf(cost.ops, cost.mem_kib, random_bytes(ARGON2_SALT_LEN)),
            wrapped=b"",
            created=_now(),
            extra=dict(extra),
            public=public,
            master=x25519.wrap(keys.master.reveal(), public, _SLOT_MASTER_LABEL,
                               _slot_master_ad(self.volume_id, slot_id, self.key_id, keys.authority)),
        )
        k = argon2id(passphrase.reveal(), slot.kdf.salt, slot.kdf.ops, slot.kdf.mem_kib)
        slot.wrapped = Seal(k).seal(priv + keys.authority, _slot_ad(self.volume_id, slot))
        return slot

    def try_slot(self, slot: Slot, passphrase: Secret) -> SlotKeys | None:
        """The keys ``passphrase`` opens in ``slot`` (None if it opens nothing).

        Not yet authenticated: the caller checks the config MAC with the master
        (and the authority key, :meth:`open_keys`)."""
        k = argon2id(passphrase.reveal(), slot.kdf.salt, slot.kdf.ops, slot.kdf.mem_kib)
        try:
            inner = Seal(k).open(slot.wrapped, _slot_ad(self.volume_id, slot))
        except IntegrityError:
            return None
        if slot.public is None or slot.master is None:
            return SlotKeys(Secret(inner), None)
        opened = self.slot_master(slot, Secret(inner))
        if opened is None:  # the passphrase is right: the slot's other fields were changed
            raise NotAVolume("volume config failed authentication: it was edited or damaged",
                             hint="restore cryptfs.conf from a backup")
        return opened

    def slot_master(self, slot: Slot, user_key: Secret) -> SlotKeys | None:
        """The current master from a v2 slot and the user key (None if the
        slot's master was not wrapped to this key with this volume's authority
        key: edited, forged, or another user's)."""
        uk = user_key.reveal()
        if slot.master is None or len(uk) != USER_KEY_LEN \
                or slot.public != x25519.public_key(user_private(uk)):
            return None
        try:
            master = x25519.unwrap(slot.master, user_private(uk), _SLOT_MASTER_LABEL,
                                   _slot_master_ad(self.volume_id, slot.id, self.key_id,
                                                   user_authority(uk)))
        except (NotForMe, IntegrityError):
            return None
        return SlotKeys(Secret(master), user_key)

    def unlock(self, passphrase: Secret, slot_id: int | None = None
               ) -> tuple[VolumeKeys, Slot, Secret | None]:
        """Find the slot this passphrase opens, check the config, return the
        keys, the slot, and the user key (None for a v1 slot)."""
        for slot in self.slots:
            if slot_id is not None and slot.id != slot_id:
                continue
            opened = self.try_slot(slot, passphrase)
            if opened is None:
                continue
            authority = user_authority(opened.private.reveal()) if opened.private else None
            with opened.master:
                keys = self.open_keys(opened.master, authority)
            return keys, slot, opened.private
        raise WrongPassphrase("wrong passphrase: it opens no key slot of this volume")

    def publics(self) -> dict[str, bytes]:
        """User name -> X25519 public key, for the users that have one."""
        out = {}
        for slot in self.slots:
            if slot.public is not None:
                name = slot.extra.get("user")
                out[name if isinstance(name, str) else slot.label] = slot.public
        return out


def _sealed_key(v: Any) -> bytes:
    raw = b64d(v)
    if len(raw) != _SEALED_KEY_LEN:
        raise ValueError("bad sealed key length")
    return raw


def _retired_from_json(v: Any, key_id: int) -> dict[int, bytes]:
    if not isinstance(v, list):
        raise ValueError("retired")
    out = {}
    for item in v:
        kid = item.get("key_id") if isinstance(item, dict) else None
        if not isinstance(kid, int) or kid < 1 or kid == key_id or kid in out:
            raise ValueError("retired key id")
        out[kid] = _sealed_key(item.get("wrapped"))
    return out


def _chain_from_json(v: Any, key_id: int) -> tuple[int, bytes]:
    if not isinstance(v, dict) or not isinstance(v.get("from"), int) or not 1 <= v["from"] < key_id:
        raise ValueError("chain")
    mac = b64d(v.get("mac"))
    if len(mac) != 32:
        raise ValueError("chain mac")
    return v["from"], mac


def _audit_from_json(v: Any) -> dict[str, str]:
    if (not isinstance(v, dict) or set(v) != {"dir", "key"} or not isinstance(v["dir"], str)
            or not os.path.isabs(v["dir"]) or not isinstance(v["key"], str)
            or not v["key"].startswith("cryptfs-audit+")):
        raise ValueError("audit")
    return {"dir": v["dir"], "key": v["key"]}


def _rotation_from_json(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict) or v.get("kind") not in ROTATION_KINDS \
            or not isinstance(v.get("started"), str):
        raise ValueError("rotation")
    return {"kind": v["kind"], "started": v["started"]}


def new_config(default_mode: str, kdf: Kdf) -> VolumeConfig:
    content_mode_by_name(default_mode)
    return VolumeConfig(
        volume_id=random_bytes(16),
        default_mode=default_mode,
        features=sorted(FEATURES),
        kdf=kdf,
        key_id=1,
        slots=[],
        created=_now(),
    )


def config_path(backing: str) -> str:
    return os.path.join(backing, CONFIG_NAME)


CONFIG_RENAME_TRIES = 5  # opens of a config that vanished, 50 ms apart (load_config)


def load_config(backing: str) -> VolumeConfig:
    if not os.path.isdir(backing):
        raise NotAVolume(f"{backing} is not a directory" if os.path.lexists(backing)
                         else f"{backing}: no such directory")
    path = config_path(backing)
    try:
        for attempt in range(CONFIG_RENAME_TRIES):
            try:
                with open(path, "rb") as f:
                    raw = f.read(1 << 20)
                break
            except FileNotFoundError:
                # On shared storage another server's rename of a new config over
                # this one can make the name vanish for an instant to this client
                # (JuiceFS: its cached entry names the replaced file); a volume's
                # tree says the config is coming back.
                if attempt == CONFIG_RENAME_TRIES - 1 or not os.path.isdir(
                        os.path.join(backing, TREE_NAME)):
                    raise
                time.sleep(0.05)
    except FileNotFoundError:
        raise NotAVolume(f"{backing} is not a cryptfs volume (no {CONFIG_NAME})",
                         hint="create one with: cryptfs init " + backing) from None
    except PermissionError:
        raise BackingIOError(f"{path}: permission denied") from None
    except OSError as e:
        raise BackingIOError(f"{path}: {e.strerror}") from None
    return VolumeConfig.from_bytes(raw)


def load_config_at(dir_fd: int, where: str) -> VolumeConfig:
    """The config of the backing directory open as ``dir_fd``: opened without
    following a symlink, without blocking, and only read if it is a regular file
    (for a reader with more rights than whoever controls the directory)."""
    try:
        fd = os.open(CONFIG_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        raise NotAVolume(f"{where} is not a cryptfs volume (no {CONFIG_NAME})") from None
    except OSError as e:
        raise NotAVolume(f"{where}/{CONFIG_NAME}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotAVolume(f"{where}/{CONFIG_NAME} is not a regular file")
        raw = os.read(fd, 1 << 20)
    except OSError as e:
        raise NotAVolume(f"{where}/{CONFIG_NAME}: {e.strerror}") from None
    finally:
        os.close(fd)
    return VolumeConfig.from_bytes(raw)


CONFIG_LOCK_WAIT = 10.0  # seconds a writer waits for another one to finish


@contextlib.contextmanager
def config_lock(backing: str) -> Iterator[None]:
    """Serialise the writers of one volume's config that must not lose each
    other's change (a rotation's new generation, the end of a walk): an
    exclusive ``flock`` on the config file itself, taken again if the file
    was replaced while waiting (a lock on the old inode guards nothing).
    Readers take no lock: the file is only ever replaced whole."""
    path = config_path(backing)
    deadline = time.monotonic() + CONFIG_LOCK_WAIT
    while True:
        try:
            try:  # (for writing where possible: NFS locks need it)
                fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            except PermissionError:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            # (replaced by another server's rename this instant, as its holder let
            # go: a volume's tree says it is coming back; see load_config)
            if time.monotonic() > deadline or not os.path.isdir(
                    os.path.join(backing, TREE_NAME)):
                raise NotAVolume(f"{backing} is not a cryptfs volume (no {CONFIG_NAME})") \
                    from None
            time.sleep(0.01)
            continue
        except OSError as e:
            raise BackingIOError(f"{path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino:
                break
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.ENOENT):
                os.close(fd)
                raise BackingIOError(f"cannot lock {path}: {e.strerror}") from None
        os.close(fd)
        if time.monotonic() > deadline:
            raise BackingIOError(f"{path} is being changed by another command (locked for "
                                 f"more than {CONFIG_LOCK_WAIT:g} s)", hint="try again")
        time.sleep(0.01)
    try:
        yield
    finally:
        os.close(fd)


def save_config(backing: str, cfg: VolumeConfig) -> None:
    """Replace the config atomically (write, fsync, rename, fsync directory)."""
    path = config_path(backing)
    tmp = path + ".tmp"
    data = cfg.to_bytes()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            # (an unchecked write cut short by a full disk, renamed over the config,
            # would have lost every key slot)
            sysio.write_all(fd, data)
            os.fsync(fd)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise BackingIOError(f"cannot write {path}: {e.strerror}") from None
