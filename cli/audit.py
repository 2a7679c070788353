"""cryptfs audit init|verify: the tamper-evident access log."""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from collections.abc import Iterable
from typing import Any

import click

from cryptfs.audit.chain import KEY_NAME, parse_verifier
from cryptfs.audit.collector import read_collector
from cryptfs.audit.events import EVENTS, unknown_events
from cryptfs.audit.export import FORMATS, WRITERS, Filter, parse_time, records
from cryptfs.audit.export import follow as follow_records
from cryptfs.audit.merge import check_together, follow_many, holds_log, merged
from cryptfs.audit.verify import Verdict
from cryptfs.audit.verify import verify as verify_log
from cryptfs.audit.writer import init_log
from cryptfs.cli.common import refuse_inside_a_volume, reports_errors, say
from cryptfs.cli.params import PathArg, Seconds
from cryptfs.errors import CryptfsError, UsageError


class LogDamaged(CryptfsError):
    exit_code = 6


@click.group()
def audit() -> None:
    """The access log: hash-chained records sealed by forward-evolving keys.

    Every record is chained to the one before it; checkpoints signed with
    Ed25519 seal the chain at intervals, each with a new key (the old one is
    erased), so whoever takes the machine later cannot re-sign what was
    sealed.  An auditor needs only the log and its first public key.
    """


@audit.command("init")
@click.argument("logdir", type=PathArg(file_okay=False))
@click.option("--log-id", default=None, metavar="NAME",
              help="Name of the log in its checkpoints (default: the directory's name).")
@click.option("--server", default=None, metavar="NAME",
              help="The server name its records carry, whoever writes them (default: the host "
                   "name of the machine that writes each record; `cryptfs mount --server` "
                   "gives another).")
@reports_errors
def init(logdir: str, log_id: str | None, server: str | None) -> None:
    """Create an access log in LOGDIR and print its verifier key.

    Give the printed key (also in LOGDIR/audit.pub) to the auditors, and keep
    a copy away from the machine: with it alone, `cryptfs audit verify`
    proves that sealed records were not changed.
    """
    if log_id == "":  # (it fell back to the directory's name, where --server "" is refused)
        raise UsageError("--log-id names the log: give a name, or leave the option out")
    name = log_id or os.path.basename(os.path.abspath(logdir))
    if not name or any(c.isspace() or c == "/" for c in name):
        raise UsageError(f"unusable log name {name!r}: no spaces or slashes")
    refuse_inside_a_volume(logdir, "the access log")
    pub = init_log(logdir, name, server)
    click.echo(pub)


def _read_key(key: str) -> bytes:
    text = key
    if os.path.exists(key):
        try:
            with open(key, encoding="utf-8") as f:
                text = f.read(4096)
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read the verifier key {key}: {getattr(e, 'strerror', e)}") \
                from None
    elif not key.startswith(KEY_NAME + "+"):
        raise UsageError(f"--key {key}: no such file, and not a verifier key (cryptfs-audit+...)",
                         hint="give the key's text, or the file holding it (LOGDIR/audit.pub "
                              "as it was made, kept elsewhere)")
    return parse_verifier(text)


@audit.command("verify")
@click.argument("logdirs", nargs=-1, required=True, metavar="LOGDIR...",
                type=PathArg(file_okay=False, exists=True))
@click.option("--key", "keys", required=True, multiple=True, metavar="PUB",
              help="The log's verifier key (cryptfs-audit+...), or a file holding it "
                   "(LOGDIR/audit.pub, from a copy kept elsewhere).  With several LOGDIRs, "
                   "once per LOGDIR, in the same order.")
@click.option("--max-age", type=Seconds(0, min_open=True), default=None, metavar="SECONDS",
              help="Also fail if the last seal is older than this (a live log is sealed at "
                   "least every minute: an old last seal means a cut tail).")
@reports_errors
def verify(logdirs: tuple[str, ...], keys: tuple[str, ...], max_age: float | None) -> None:
    """Check the log in LOGDIR: exit 0 only if every sealed record is intact.

    Reports valid, modified, missing, reordered, unsealed-tail and gap counts,
    the servers its records name, and the first bad record.  Exit 6 on any
    problem.

    Several LOGDIRs (one per server of a shared volume, and their key
    agents'): each is checked on its own, with its own --key, and reported
    under the servers its records name.
    """
    if len(keys) != len(logdirs):
        raise UsageError(f"{len(keys)} --key for {len(logdirs)} LOGDIR: give one per LOGDIR, in "
                         "the same order")
    publics = [_read_key(k) for k in keys]
    for logdir in logdirs:
        holds_log(logdir)  # (an empty or wrong directory is not a valid log)
    check_together(list(logdirs))
    if len(logdirs) == 1:
        v = _verify_one(logdirs[0], publics[0], max_age)
        if not v.ok:
            raise LogDamaged(f"the access log in {logdirs[0]} does not verify "
                             f"({len(v.problems)} problem(s))")
        return
    bad = []
    for logdir, public in zip(logdirs, publics, strict=True):
        say(f"== {logdir}")
        v = _verify_one(logdir, public, max_age)
        if not v.ok:
            click.echo(f"verdict: DOES NOT VERIFY ({len(v.problems)} problem(s))")
            bad.append(f"{_servers(v)} ({logdir}): {v.first_bad}")
    if bad:
        raise LogDamaged(f"{len(bad)} of {len(logdirs)} access logs do not verify: "
                         + "; ".join(bad))


def _servers(v: Verdict) -> str:
    """The servers a log's records name, as words."""
    if not v.servers:
        return "no server named"
    return ("server " if len(v.servers) == 1 else "servers ") + ", ".join(sorted(v.servers))


def _verify_one(logdir: str, public: bytes, max_age: float | None) -> Verdict:
    v = verify_log(logdir, public)
    click.echo(f"segments: {v.segments}, seals: {v.epochs}")
    click.echo(f"valid: {v.valid}  modified: {v.modified}  missing: {v.missing}  "
               f"reordered: {v.reordered}  gaps: {v.gaps}  bad seals: {v.bad_seals}  "
               f"unsealed tail: {v.unsealed}")
    if len(v.servers) == 1:
        click.echo(f"server: {next(iter(v.servers))}")
    elif v.servers:
        click.echo("servers: " + ", ".join(f"{name} ({n} records)"
                                           for name, n in sorted(v.servers.items())))
    if v.last_seal_ns is not None:
        age = time.time() - v.last_seal_ns / 1e9
        click.echo(f"last seal: {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(v.last_seal_ns / 1e9))}"
                   f" ({age:.0f} s ago)")
        if max_age is not None and age > max_age:
            v.bad(logdir, f"the last seal is {age:.0f} s old (more than {max_age:g} s): "
                          "the tail may have been cut")
    elif max_age is not None:
        v.bad(logdir, "the log holds no seal at all: it was cut back, or never sealed")
    if v.first_bad:
        click.echo(f"first bad: {v.first_bad}")
    if v.ok:
        click.echo("verdict: valid" + (f" ({v.unsealed} record(s) after the last seal are not "
                                       "proven yet)" if v.unsealed else "")
                   + ("; it holds no record: new, or every segment removed (--max-age "
                      "tells them apart)" if not v.segments else ""))
    return v


def selection_options(fn):  # type: ignore[no-untyped-def]
    """The options that select records (export, follow, forward)."""
    for opt in reversed([
        click.option("--since", metavar="TIME", help="Only records at or after TIME (ISO 8601, "
                                                       "or seconds since 1970; UTC)."),
        click.option("--until", metavar="TIME", help="Only records at or before TIME."),
        click.option("--user", metavar="NAME|UID", help="Only this user's records."),
        click.option("--path", "path_glob", metavar="GLOB",
                     help="Only records whose path (or new path) matches, e.g. '/customers/*'."),
        click.option("--event", "events", multiple=True, metavar="EVENT",
                     help="Only these events (repeatable), e.g. --event open --event unlink."),
    ]):
        fn = opt(fn)
    return fn


def record_filters(fn):  # type: ignore[no-untyped-def]
    """--format and the options that select records (export and follow)."""
    fn = selection_options(fn)
    return click.option("--format", "fmt", type=click.Choice(FORMATS), default="jsonl",
                        show_default=True,
                        help="jsonl: the records as written; csv: fixed columns with a header; "
                             "cef: ArcSight CEF; ecs: Elastic Common Schema 8.11; ocsf: OCSF 1.1 "
                             "File System Activity.")(fn)


def _tolerant_stdout() -> None:
    """Text a log holds that is not UTF-8 (an edited log) is written with
    its code escaped rather than ending the export."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")


def make_filter(since: str | None, until: str | None, user: str | None, path_glob: str | None,
            events: tuple[str, ...]) -> Filter:
    first, last = (parse_time(since) if since else None), (parse_time(until) if until else None)
    if first is not None and last is not None and first > last:
        raise UsageError("--since is after --until: no record could be selected")
    unknown = unknown_events(events)
    if unknown:
        raise UsageError(f"no record carries the event {unknown[0]!r}",
                         hint="the events are " + ", ".join(sorted(EVENTS)) + " (docs/AUDIT.md)")
    return Filter(since=first, until=last, user=user, path=path_glob, event=events)


@audit.command("export")
@click.argument("logdirs", nargs=-1, metavar="LOGDIR...",
                type=PathArg(file_okay=False, exists=True))
@click.option("--from-syslog", "syslog_file", metavar="FILE",
              type=PathArg(dir_okay=False, exists=True),
              help="Instead of LOGDIRs: read the records from a syslog collector's file, which "
                   "`cryptfs audit forward` fed (one RFC 5424 message a line, as received), "
                   "each record once, merged by time as LOGDIRs are.")
@record_filters
@reports_errors
def export(logdirs: tuple[str, ...], syslog_file: str | None, fmt: str, since: str | None,
           until: str | None, user: str | None, path_glob: str | None,
           events: tuple[str, ...]) -> None:
    """Write the records of the log in LOGDIR to standard output.

    Several LOGDIRs (the logs of the servers of one shared volume, and of
    their key agents): their records merged by time (then server name, log
    and seq), each naming its server.  --from-syslog FILE reads a collector's
    copy of the same records instead.

    Exporting does not verify: run `cryptfs audit verify` for that.  From a
    collector, a record that two different messages claim (same server, log
    and seq) is exported twice, with a warning, and the exit status is 6.
    """
    flt = make_filter(since, until, user, path_glob, events)
    conflicts: list[tuple[str, str, int]] = []
    if syslog_file is not None:
        if logdirs:
            raise UsageError("give LOGDIRs or --from-syslog FILE, not both")
        got = read_collector(syslog_file)
        if got.damaged:
            say(f"cryptfs: warning: {got.damaged} cryptfs message(s) in {syslog_file} hold "
                "no usable record (cut by the collector, or edited): left out", err=True)
        source: Iterable[dict[str, Any]] = got.records
        conflicts = got.conflicts
        if conflicts:
            shown = ", ".join(f"{srv or '-'}/{log or '-'} seq {seq}"
                              for srv, log, seq in got.conflicts[:5])
            more = f" and {len(got.conflicts) - 5} more" if len(got.conflicts) > 5 else ""
            say(f"cryptfs: warning: {len(got.conflicts)} record(s) in {syslog_file} are "
                f"claimed by two different messages ({shown}{more}): both are exported; "
                "one was not written by that log (run `cryptfs audit verify` on the "
                "server's own log)", err=True)
    elif not logdirs:
        raise UsageError("give a LOGDIR (or several), or --from-syslog FILE")
    else:
        for logdir in logdirs:
            holds_log(logdir)  # (an empty or wrong directory printed nothing, exit 0)
        if len(logdirs) == 1:
            source = records(logdirs[0])
        else:
            check_together(list(logdirs))
            source = merged(records(d) for d in logdirs)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    _tolerant_stdout()  # `| head` ends it quietly, as with cat
    for chunk in WRITERS[fmt](r for r in source if flt(r)):
        sys.stdout.write(chunk)
    if conflicts:
        sys.stdout.flush()
        raise LogDamaged(f"{syslog_file} holds conflicting copies of {len(conflicts)} "
                         "record(s)")


@audit.command("follow")
@click.argument("logdirs", nargs=-1, required=True, metavar="LOGDIR...",
                type=PathArg(file_okay=False, exists=True))
@click.option("--from-start", is_flag=True, help="Print the records already there first.")
@record_filters
@reports_errors
def follow(logdirs: tuple[str, ...], from_start: bool, fmt: str, since: str | None,
           until: str | None, user: str | None, path_glob: str | None,
           events: tuple[str, ...]) -> None:
    """Print records of the log in LOGDIR as they are written (like tail -f).

    Several LOGDIRs: all of them at once, records interleaved as they
    arrive (what one look at the logs finds, merged by time); with
    --from-start, the records already there first, merged by time.

    Ctrl-C stops it.  The csv header is printed once.
    """
    flt = make_filter(since, until, user, path_glob, events)
    for logdir in logdirs:
        holds_log(logdir)  # (else it would wait for a log that never comes)
    if len(logdirs) > 1:
        check_together(list(logdirs))
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    _tolerant_stdout()
    source = follow_records(logdirs[0], from_start) if len(logdirs) == 1 else \
        follow_many(list(logdirs), from_start)
    try:
        for chunk in WRITERS[fmt](r for r in source if flt(r)):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
from cryptfs.cli import audit_bind  # noqa: E402,F401,I001  (registers "audit attach|detach")
from cryptfs.cli import audit_report  # noqa: E402,F401  (registers "audit report")
from cryptfs.cli import audit_forward  # noqa: E402,F401  (registers "audit forward")
