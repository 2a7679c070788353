"""Per-directory policy: which mode new files of a directory are written in.

A rule names a directory of the volume by its plaintext path and says how
files created in it (and in directories below it, unless a deeper rule
says otherwise) are encrypted::

    {"path": "/recordings", "mode": "xchacha20-poly1305", "hybrid": true,
     "recipients": ["sup1"], "dropbox": true}

- ``mode``: the content cipher.
- ``hybrid``: the file key is wrapped to X25519 recipients only (no volume
  key opens it): the file's creator (unless ``dropbox``), the users named in
  ``recipients``, and the volume's recovery key.  Otherwise it is wrapped
  under the volume's wrap key (symmetric mode), which every unlocked user has.
- ``dropbox``: writers get public keys only: a creator who is not a named
  recipient writes the file but cannot open it again once closed.

Existing files keep the mode they were written in.  The rules are stored in
the volume config, sealed with AES-256-GCM under a key derived from the base
key (they name directories, which are secret), and covered by the config MAC.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptfs.config import UnknownField, VolumeConfig, refuse_unknown
from cryptfs.errors import NotAVolume, UsageError
from cryptfs.keys import VolumeKeys
from cryptfs.masking import FORMATS, Function, Mask
from cryptfs.modes import IntegrityError, content_mode_by_name

_AD = b"cryptfs/v2/policy"
HYBRID_PREFIX = "hybrid-"
MAX_RULES = 1000
UNTRUSTED = ("deny", "ciphertext")
# The fields this release writes (cryptfs.config.refuse_unknown: any other is refused).
POLICY_FIELDS = frozenset({"version", "rules"})
RULE_FIELDS = frozenset({"path", "mode", "hybrid", "recipients", "dropbox", "programs",
                         "untrusted", "masks"})


@dataclass(frozen=True)
class Program:
    """A program allowed to see plaintext: its executable's path, and if
    pinned the SHA-256 of the executable's content (hex)."""

    path: str
    sha256: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, **({"sha256": self.sha256} if self.sha256 else {})}

    @classmethod
    def from_json(cls, d: Any) -> Program:
        if not isinstance(d, dict) or set(d) - {"path", "sha256"}:
            raise ValueError("program")
        path, digest = d.get("path"), d.get("sha256")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError("program path")
        if digest is not None and (not isinstance(digest, str) or len(digest) != 64
                                   or set(digest) - set("0123456789abcdef")):
            raise ValueError("program sha256")
        return cls(path, digest)


@dataclass(frozen=True)
class MaskRule:
    """Files of a directory whose names match ``glob`` are shown masked to
    the roles that see masked data (cryptfs.masking)."""

    glob: str
    fmt: str
    columns: tuple[tuple[str, str], ...]  # (column name, function text)

    def mask(self) -> Mask:
        return Mask(self.fmt, {name: Function.parse(f) for name, f in self.columns})

    def to_json(self) -> dict[str, Any]:
        return {"glob": self.glob, "format": self.fmt, "columns": dict(self.columns)}

    @classmethod
    def from_json(cls, d: Any) -> MaskRule:
        if not isinstance(d, dict) or set(d) != {"glob", "format", "columns"}:
            raise ValueError("mask")
        glob, fmt, columns = d["glob"], d["format"], d["columns"]
        if (not isinstance(glob, str) or not glob or "/" in glob or fmt not in FORMATS
                or not isinstance(columns, dict)
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items())):
            raise ValueError("mask")
        for f in columns.values():
            Function.parse(f)
        return cls(glob, fmt, tuple(sorted(columns.items())))


@dataclass(frozen=True)
class Rule:
    path: str
    mode: str
    hybrid: bool = False
    recipients: tuple[str, ...] = ()
    dropbox: bool = False
    # The programs that may open files here (and below, until a deeper rule
    # names its own): None = as the rule above says; () = any program.
    programs: tuple[Program, ...] | None = None
    # What another program gets: "deny" (EACCES) or "ciphertext" (a read-only
    # view of the encrypted bytes).
    untrusted: str = "deny"
    # Masked views here and below (None: as the rule above says; (): none).
    masks: tuple[MaskRule, ...] | None = None

    @property
    def mode_name(self) -> str:
        """The MODE as `cryptfs policy set --mode` takes it."""
        return HYBRID_PREFIX + self.mode if self.hybrid else self.mode

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["recipients"] = list(self.recipients)
        if self.programs is None:
            del d["programs"]  # (rules from before programs keep their exact form)
        else:
            d["programs"] = [p.to_json() for p in self.programs]
        if self.untrusted == "deny":
            del d["untrusted"]
        if self.masks is None:
            del d["masks"]
        else:
            d["masks"] = [m.to_json() for m in self.masks]
        return d

    @classmethod
    def from_json(cls, d: Any) -> Rule:
        if not isinstance(d, dict):
            raise ValueError("rule")
        refuse_unknown(d, RULE_FIELDS, f"policy.rules[{d.get('path')!r}].")
        path, mode = d.get("path"), d.get("mode")
        recipients = d.get("recipients", [])
        if not isinstance(path, str) or normalise(path) != path or not isinstance(mode, str):
            raise ValueError("rule path or mode")
        content_mode_by_name(mode)
        if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
            raise ValueError("rule recipients")
        hybrid, dropbox = d.get("hybrid", False), d.get("dropbox", False)
        if not isinstance(hybrid, bool) or not isinstance(dropbox, bool) or (dropbox and not hybrid):
            raise ValueError("rule flags")
        programs = d.get("programs")
        if programs is not None and not isinstance(programs, list):
            raise ValueError("rule programs")
        untrusted = d.get("untrusted", "deny")
        if untrusted not in UNTRUSTED:
            raise ValueError("rule untrusted")
        masks = d.get("masks")
        if masks is not None and not isinstance(masks, list):
            raise ValueError("rule masks")
        return cls(path, mode, hybrid, tuple(recipients), dropbox,
                   None if programs is None else tuple(Program.from_json(p) for p in programs),
                   untrusted,
                   None if masks is None else tuple(MaskRule.from_json(m) for m in masks))


def normalise(path: str) -> str:
    """``/a/b`` form of a volume path ("a/b/", "/a//b/." -> "/a/b")."""
    p = posixpath.normpath("/" + path.strip())
    return "/" + p.lstrip("/")


NAME_MAX = 255  # bytes of one name in a volume, as in the filesystems under it


def volume_path(path: bytes, example: str = "/customers") -> bytes:
    """A path inside the volume as a user names it, in ``/a/b`` form (bytes: a
    name need not be UTF-8); "", "." and "/" are the root.  ``..`` is refused:
    it named the root ("../.." set the rule of the whole volume) or nothing."""
    if b".." in path.split(b"/"):
        raise UsageError(f"{os.fsdecode(path)!r}: a path inside the volume has no '..'",
                         hint=f"name it from the volume's root, e.g. {example}")
    if any(len(part) > NAME_MAX for part in path.split(b"/")):  # (no such name can exist)
        raise UsageError(f"{os.fsdecode(path)[:60]!r}...: a name in it is longer than "
                         f"{NAME_MAX} bytes")
    return b"/" + posixpath.normpath(b"/" + path).lstrip(b"/")  # (normpath keeps a leading //)


def volume_dir(path: str) -> str:
    """A directory of the volume as a policy command names it (spaces around it
    dropped), normalised; ``..`` refused."""
    return os.fsdecode(volume_path(os.fsencode(path.strip())))


def parse_mode(mode: str, default: str) -> tuple[str, bool]:
    """(content mode, hybrid) from a MODE: a content mode, ``hybrid`` (with the
    volume's default content mode) or ``hybrid-<content mode>``."""
    if mode == "hybrid":
        return default, True
    hybrid = mode.startswith(HYBRID_PREFIX)
    name = mode[len(HYBRID_PREFIX):] if hybrid else mode
    try:
        content_mode_by_name(name)
    except (KeyError, ValueError):
        raise UsageError(f"unknown mode {mode!r}", hint="one of: " + ", ".join(mode_choices())) \
            from None
    return name, hybrid


def mode_choices() -> list[str]:
    from cryptfs.modes import CONTENT_MODES
    names = [m.name for m in CONTENT_MODES.values()]
    return names + ["hybrid"] + [HYBRID_PREFIX + n for n in names]


@dataclass
class Policy:
    rules: dict[str, Rule] = field(default_factory=dict)

    def rule_for(self, directory: str) -> Rule | None:
        """The rule of the deepest ruled directory at or above ``directory``."""
        p = directory
        while True:
            rule = self.rules.get(p)
            if rule is not None:
                return rule
            if p == "/":
                return None
            p = posixpath.dirname(p)

    def programs_for(self, directory: str) -> Rule | None:
        """The rule that says which programs may open files in ``directory``:
        the deepest at or above it that names programs (None: any program)."""
        p = directory
        while True:
            rule = self.rules.get(p)
            if rule is not None and rule.programs is not None:
                return rule if rule.programs else None
            if p == "/":
                return None
            p = posixpath.dirname(p)

    def mask_for(self, directory: str, name: str) -> MaskRule | None:
        """The mask of a file ``name`` in ``directory``: of the deepest rule at
        or above it that says anything of masks, the first whose glob matches."""
        p = directory
        while True:
            rule = self.rules.get(p)
            if rule is not None and rule.masks is not None:
                # (case-insensitive: DATA.CSV is a CSV file as much as data.csv)
                return next((m for m in rule.masks
                             if fnmatch.fnmatchcase(name.lower(), m.glob.lower())), None)
            if p == "/":
                return None
            p = posixpath.dirname(p)

    def masks_at(self, path: str) -> tuple[MaskRule, ...]:
        """The masks that apply to files in ``path`` and below (of the deepest
        rule at or above it that says anything of masks)."""
        p = path
        while True:
            rule = self.rules.get(p)
            if rule is not None and rule.masks is not None:
                return rule.masks
            if p == "/":
                return ()
            p = posixpath.dirname(p)

    @property
    def names_masks(self) -> bool:
        return any(r.masks for r in self.rules.values())

    @property
    def names_programs(self) -> bool:
        return any(r.programs for r in self.rules.values())

    def to_bytes(self) -> bytes:
        return json.dumps({"version": 1, "rules": [r.to_json() for _, r in sorted(self.rules.items())]},
                          sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Policy:
        d = json.loads(raw)
        refuse_unknown(d, POLICY_FIELDS, "policy.")
        if not isinstance(d, dict) or d.get("version") != 1 or not isinstance(d.get("rules"), list):
            raise ValueError("policy")
        rules = [Rule.from_json(r) for r in d["rules"]]
        return cls({r.path: r for r in rules})


def load_policy(cfg: VolumeConfig, keys: VolumeKeys) -> Policy:
    """The volume's policy (empty if it has none); the config must be authenticated."""
    if cfg.policy is None:
        return Policy()
    sealed = cfg.policy
    try:
        raw = keys.policy.open(sealed, _AD + cfg.volume_id)
        return Policy.from_bytes(raw)
    except UnknownField as e:
        raise NotAVolume(f"the volume's directory policy: {e}",
                         hint="use the cryptfs release that wrote it") from None
    except (IntegrityError, ValueError, KeyError, UnicodeDecodeError, RecursionError):
        raise NotAVolume("the volume's directory policy does not decrypt or parse: the config "
                         "was damaged") from None


def store_policy(cfg: VolumeConfig, keys: VolumeKeys, policy: Policy) -> None:
    """Seal ``policy`` into ``cfg`` (the caller seals and saves the config)."""
    if not policy.rules:
        cfg.policy = None
        return
    if len(policy.rules) > MAX_RULES:
        raise UsageError(f"a volume holds at most {MAX_RULES} policy rules")
    cfg.policy = keys.policy.seal(policy.to_bytes(), _AD + cfg.volume_id)
