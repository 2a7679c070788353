"""Verifying the access log with the epoch-0 verifier key alone (``cryptfs audit verify``).

Follows the chain and the keys each seal certifies (cryptfs.audit.chain) and
counts what is valid, modified, missing, reordered or unsealed.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field

from cryptfs.audit.chain import (
    SEGMENT_RE,
    ZERO,
    Checkpoint,
    b64,
    canonical,
    is_seq,
    parsed_lines,
    unb64,
    written_form,
)
from cryptfs.errors import BackingIOError

log = logging.getLogger("cryptfs")

@dataclass
class Verdict:
    valid: int = 0  # records whose chain and seal check out
    modified: int = 0  # records whose hash does not match their content
    missing: int = 0  # records a checkpoint or the sequence says exist but are not there
    reordered: int = 0  # segments out of order (by name, header or sequence)
    unsealed: int = 0  # records after the last checkpoint
    gaps: int = 0  # breaks in the sequence numbers
    bad_seals: int = 0  # checkpoints that do not verify or do not match the chain
    first_bad: str | None = None
    segments: int = 0
    epochs: int = 0
    last_seal_ns: int | None = None
    problems: list[str] = field(default_factory=list)
    servers: dict[str, int] = field(default_factory=dict)  # server named -> its records

    @property
    def ok(self) -> bool:
        return not (self.modified or self.missing or self.reordered or self.gaps
                    or self.bad_seals or self.problems)

    def bad(self, where: str, what: str) -> None:
        self.problems.append(f"{where}: {what}")
        if self.first_bad is None:
            self.first_bad = f"{where}: {what}"


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BackingIOError(f"{path}: {e.strerror}") from None


def _after_the_nuls(data: bytes) -> int | None:
    """Where the NUL bytes start, if anything but NUL follows them.

    Readers stop at the first NUL: a segment being written ends with reserved
    NUL bytes (cryptfs.audit.writer), and one a crash left open may too.  But
    nothing the writer does puts other bytes after them, so a NUL written into a
    segment would hide every record after it -- unless this says so."""
    nul = data.find(b"\0")
    if nul < 0 or not data[nul:].strip(b"\0"):
        return None
    return nul


def verify(logdir: str, public: bytes) -> Verdict:
    """Check a log directory with the epoch-0 public key alone."""
    v = Verdict()
    try:
        names = sorted(n for n in os.listdir(logdir) if SEGMENT_RE.match(n))
    except OSError as e:
        raise BackingIOError(f"{logdir}: {e.strerror}") from None
    if not names:
        return v  # a log nothing was written to yet
    key, epoch, h, seq = public, 0, ZERO, 0
    pending = 0  # records since the last good seal
    pending_bad = 0  # of which do not match their hash
    expected_index = 1
    log_id: str | None = None
    for name in names:
        index = int(SEGMENT_RE.match(name).group(1))  # type: ignore[union-attr]
        v.segments += 1
        if index != expected_index:
            v.missing += 1
            v.bad(name, f"segment {expected_index} is missing (the next present is {index})")
        expected_index = index + 1
        first = True
        data = _read(os.path.join(logdir, name))
        hidden = _after_the_nuls(data)
        if hidden is not None and name == names[-1]:
            # (the live segment: a record may have been copied in while it was read)
            data = _read(os.path.join(logdir, name))
            hidden = _after_the_nuls(data)
        if hidden is not None:
            v.modified += 1
            v.bad(name, f"bytes other than NUL after the NUL bytes at offset {hidden}: what "
                        "follows is hidden from readers (overwritten, or a torn write)")
        for line_no, (raw, obj) in enumerate(parsed_lines(data), 1):
            where = f"{name} line {line_no} (seq {obj.get('seq', '?')})"
            if "_unparsable" in obj:
                v.modified += 1
                v.bad(f"{name} line {line_no}", f"not JSON: {obj['_unparsable']!r}")
                continue
            if "seq" not in obj and not written_form(raw, obj):
                # (a record's written form is checked below, with its hash)
                v.modified += 1
                v.bad(where, "its bytes are not the line as written (duplicate keys, spacing, "
                             "key order or escapes changed): edited")
                continue
            if first:
                first = False
                if "segment" not in obj:
                    v.bad(name, "no segment header")
                else:
                    if obj.get("segment") != index:
                        v.reordered += 1
                        v.bad(name, f"its header says segment {obj.get('segment')}: renamed or "
                                    "reordered")
                    if log_id is not None and obj.get("log") != log_id:
                        v.bad(name, "belongs to another log")
                    if obj.get("prev") != b64(h):
                        v.bad(name, "does not continue from the previous segment's last record")
                    continue
            if "checkpoint" in obj:
                try:
                    if not isinstance(obj["checkpoint"], str):
                        raise ValueError("not a signed note")
                    cp = Checkpoint.open(obj["checkpoint"], key)
                except (ValueError, TypeError) as e:
                    v.bad_seals += 1
                    if epoch == 0 and str(e).startswith("signed by the key with id"):
                        # (the key given checks the first seal only: the usual cause is
                        # the verifier key of another log)
                        v.bad(name, f"the first seal is {e}, the key given: the key of "
                                    "another log, or this log was re-sealed")
                    else:
                        v.bad(name, f"checkpoint of epoch {epoch} does not verify ({e}): "
                                    "re-sealed or edited")
                    continue
                if cp.epoch != epoch or cp.size != seq or cp.root != h:
                    v.bad_seals += 1
                    if cp.size > seq:
                        v.missing += cp.size - seq
                    v.bad(name, f"checkpoint of epoch {cp.epoch} seals {cp.size} records, "
                                f"but the chain has {seq}")
                    continue
                log_id = log_id or cp.log_id
                v.valid += pending - pending_bad
                pending = pending_bad = 0
                key, epoch = cp.next_key, epoch + 1
                v.epochs += 1
                v.last_seal_ns = cp.time_ns
                continue
            if not (is_seq(obj.get("seq")) and isinstance(obj.get("h"), str)):
                v.modified += 1
                v.bad(where, "not a record")
                continue
            rec = {k: val for k, val in obj.items() if k != "h"}
            if obj["seq"] != seq + 1:
                if obj["seq"] <= seq:
                    v.reordered += 1
                    v.bad(where, f"sequence goes back (after {seq})")
                else:
                    v.gaps += 1
                    v.missing += obj["seq"] - seq - 1
                    v.bad(where, f"records {seq + 1}..{obj['seq'] - 1} are missing")
            body = canonical(rec)
            got = hashlib.sha256(h + body).digest()  # = chain(h, rec)
            try:
                claimed = unb64(obj["h"])
            except (ValueError, TypeError):
                claimed = b""
            if got != claimed:
                # Either the record was edited (its content no longer gives its h)
                # or something before it changed (then its h is right but the chain
                # it continues is not).
                v.modified += 1
                pending_bad += 1
                v.bad(where, "its content does not match its hash: edited, or the chain before "
                             "it was")
            elif not written_form(raw, obj, body):
                # The content gives the hash, but the bytes of the line are not
                # the ones the chain covers: a reader that keeps another of two
                # duplicate keys sees other values.
                v.modified += 1
                pending_bad += 1
                v.bad(where, "its bytes are not the record as written (duplicate keys, "
                             "spacing, key order or escapes changed): edited")
            h, seq = claimed or got, obj["seq"]
            pending += 1
            server = obj.get("server")
            if isinstance(server, str):  # (older records name none)
                v.servers[server] = v.servers.get(server, 0) + 1
    v.unsealed = pending
    return v
