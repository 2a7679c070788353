"""Several servers' logs as one story: records merged by time, each naming its server.

Each server (its own mount of a shared volume, its own key agent) writes a
log of its own; every record carries ``server``, the name its writer was
given (chained and sealed with the rest, cryptfs.audit.writer).  An auditor
reads them together:

- **Order.** By ``time_ns``, then ``server``, then ``log`` (two logs of one
  server: its mount's and its agent's), then ``seq``.  Within one log the
  records keep their own order (``seq``) whatever their clock says: a merge
  of logs each in ``seq`` order, so a clock stepped back on one server moves
  no record before another of its own log.  The order depends only on the
  records, not on the order the logs are given in, so a merge of the logs
  and a merge of a collector's copy of them (cryptfs.audit.collector) agree.
- **Checks.** The logs given together must be distinct logs (not one log
  twice, or a copy of it) and of one volume: they must share a volume that
  their records name (a key agent's log may name several).
"""

from __future__ import annotations

import heapq
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from cryptfs.audit.chain import KEY_FILE, PUB_NAME, SEGMENT_RE
from cryptfs.audit.export import Tail
from cryptfs.errors import BackingIOError, UsageError


def merge_key(r: dict[str, Any]) -> tuple[int, str, str, int]:
    """Where a record goes in the merged story.  (A record without a usable
    time or seq, from an edited log, goes first: `audit verify` judges it.)"""
    t, seq, log_id = r.get("time_ns"), r.get("seq"), r.get("log")
    return (t if isinstance(t, int) else -1, server_of(r),
            log_id if isinstance(log_id, str) else "", seq if isinstance(seq, int) else 0)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def merged(logs: Iterable[Iterable[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """The records of several logs (each in its own order) merged by :func:`merge_key`."""
    return heapq.merge(*logs, key=merge_key)


def server_of(r: dict[str, Any]) -> str:
    """The server a record names ("" for a record written before records named one)."""
    s = r.get("server")
    return s if isinstance(s, str) else ""


# (records are canonical JSON: inside a string a '"' is always escaped, so
# this finds the volume field of each record and nothing inside a value)
_VOLUME = re.compile(rb'"volume":"([0-9a-f]+)"')


def volumes_of(logdir: str) -> set[str]:
    """The volumes the records of a log name (a mount's log: one; an agent's: any)."""
    found: set[bytes] = set()
    try:
        for name in os.listdir(logdir):
            if SEGMENT_RE.match(name):
                with open(os.path.join(logdir, name), "rb") as f:
                    found.update(_VOLUME.findall(f.read().split(b"\0", 1)[0]))
    except OSError as e:
        raise BackingIOError(f"cannot read the access log in {logdir}: {e.strerror}") from None
    return {v.decode("ascii") for v in found}


def holds_log(logdir: str) -> None:
    """Refuse (UsageError) a directory that holds nothing of an access log
    (an auditor's copy may hold only the segments and audit.pub)."""
    try:
        names = os.listdir(logdir)
    except OSError as e:
        raise BackingIOError(f"cannot read the access log in {logdir}: {e.strerror}") from None
    if not any(n in (PUB_NAME, KEY_FILE) or SEGMENT_RE.match(n) for n in names):
        raise UsageError(f"{logdir} holds no access log")


def _identity(logdir: str) -> tuple[bytes | None, bytes | None]:
    """What tells one log from another: its verifier key (random at `audit
    init`), and the hash of its first record."""
    pub = first = None
    try:
        with open(os.path.join(logdir, PUB_NAME), "rb") as f:
            pub = f.read(4096).strip() or None
    except OSError:
        pass
    try:
        with open(os.path.join(logdir, "segment-000001.log"), "rb") as f:
            head = f.read(1 << 16)
        m = re.search(rb'"seq":1,[^\n]*"h":"([A-Za-z0-9+/=]+)"}\n', head)
        first = m.group(1) if m else None
    except OSError:
        pass
    return pub, first


def check_together(logdirs: list[str]) -> None:
    """Refuse (UsageError) logs that cannot be one story: the same log twice,
    or logs that share no volume."""
    if len(logdirs) < 2:
        return
    for d in logdirs:
        holds_log(d)
    seen: list[tuple[str, tuple[bytes | None, bytes | None]]] = []
    for d in logdirs:
        ident = _identity(d)
        for other, oid in seen:
            same_dir = os.path.exists(d) and os.path.exists(other) and os.path.samefile(d, other)
            if same_dir or any(a is not None and a == b for a, b in zip(ident, oid, strict=True)):
                raise UsageError(f"{other} and {d} are the same log (or copies of it): give each "
                                 "log once")
        seen.append((d, ident))
    named = [(d, v) for d in logdirs if (v := volumes_of(d))]
    if len(named) < 2:
        return
    common = set.intersection(*(v for _, v in named))
    if not common:
        listing = "; ".join(f"{d}: {', '.join(sorted(x[:16] for x in v))}" for d, v in named)
        raise UsageError(f"these logs are not of one volume ({listing})",
                         hint="give the logs of the servers that serve one volume (and their "
                              "key agents')")


def follow_many(logdirs: list[str], from_start: bool = False, poll: float = 0.2,
                stop: Callable[[], bool] = lambda: False) -> Iterator[dict[str, Any]]:
    """Several live logs at once, like ``tail -f``: with ``from_start``, what
    they hold first, merged by time; then records as they arrive, each
    look at the logs merged by time (interleaved by arrival)."""
    tails = [Tail(d, from_start) for d in logdirs]

    def drain(t: Tail) -> Iterator[dict[str, Any]]:
        while True:
            batch = t.read()
            if not t.moved:
                return
            yield from batch

    if from_start:
        yield from merged(drain(t) for t in tails)
    while not stop():
        batches, moved = [], False
        for t in tails:
            batch = t.read()
            moved = moved or t.moved
            if batch:
                batches.append(batch)
        yield from merged(batches)
        if not moved:
            time.sleep(poll)
