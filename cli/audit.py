"""cryptfs audit init|verify: the tamper-evident access log."""

from __future__ import annotations

import io
import os
import signal
import sys
import time

import click

from cryptfs.audit.chain import parse_verifier
from cryptfs.audit.export import FORMATS, WRITERS, Filter, parse_time, records
from cryptfs.audit.export import follow as follow_records
from cryptfs.audit.verify import verify as verify_log
from cryptfs.audit.writer import init_log
from cryptfs.cli.common import reports_errors
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
@click.argument("logdir", type=click.Path(file_okay=False))
@click.option("--log-id", default=None, metavar="NAME",
              help="Name of the log in its checkpoints (default: the directory's name).")
@reports_errors
def init(logdir: str, log_id: str | None) -> None:
    """Create an access log in LOGDIR and print its verifier key.

    Give the printed key (also in LOGDIR/audit.pub) to the auditors, and keep
    a copy away from the machine: with it alone, `cryptfs audit verify`
    proves that sealed records were not changed.
    """
    name = log_id or os.path.basename(os.path.abspath(logdir))
    if not name or any(c.isspace() or c == "/" for c in name):
        raise UsageError(f"unusable log name {name!r}: no spaces or slashes")
    pub = init_log(logdir, name)
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
    return parse_verifier(text)


@audit.command("verify")
@click.argument("logdir", type=click.Path(file_okay=False, exists=True))
@click.option("--key", "key", required=True, metavar="PUB",
              help="The log's verifier key (cryptfs-audit+...), or a file holding it "
                   "(LOGDIR/audit.pub, from a copy kept elsewhere).")
@click.option("--max-age", type=float, default=None, metavar="SECONDS",
              help="Also fail if the last seal is older than this (a live log is sealed at "
                   "least every minute: an old last seal means a cut tail).")
@reports_errors
def verify(logdir: str, key: str, max_age: float | None) -> None:
    """Check the log in LOGDIR: exit 0 only if every sealed record is intact.

    Reports valid, modified, missing, reordered, unsealed-tail and gap counts
    and the first bad record.  Exit 6 on any problem.
    """
    v = verify_log(logdir, _read_key(key))
    click.echo(f"segments: {v.segments}, seals: {v.epochs}")
    click.echo(f"valid: {v.valid}  modified: {v.modified}  missing: {v.missing}  "
               f"reordered: {v.reordered}  gaps: {v.gaps}  bad seals: {v.bad_seals}  "
               f"unsealed tail: {v.unsealed}")
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
    if not v.ok:
        raise LogDamaged(f"the access log in {logdir} does not verify "
                         f"({len(v.problems)} problem(s))")
    click.echo("verdict: valid" + (f" ({v.unsealed} record(s) after the last seal are not "
                                   "proven yet)" if v.unsealed else ""))


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
    return Filter(since=parse_time(since) if since else None,
                     until=parse_time(until) if until else None,
                     user=user, path=path_glob, event=events)


@audit.command("export")
@click.argument("logdir", type=click.Path(file_okay=False, exists=True))
@record_filters
@reports_errors
def export(logdir: str, fmt: str, since: str | None, until: str | None, user: str | None,
           path_glob: str | None, events: tuple[str, ...]) -> None:
    """Write the records of the log in LOGDIR to standard output.

    Exporting does not verify: run `cryptfs audit verify` for that.
    """
    flt = make_filter(since, until, user, path_glob, events)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    _tolerant_stdout()  # `| head` ends it quietly, as with cat
    for chunk in WRITERS[fmt](r for r in records(logdir) if flt(r)):
        sys.stdout.write(chunk)


@audit.command("follow")
@click.argument("logdir", type=click.Path(file_okay=False, exists=True))
@click.option("--from-start", is_flag=True, help="Print the records already there first.")
@record_filters
@reports_errors
def follow(logdir: str, from_start: bool, fmt: str, since: str | None, until: str | None,
           user: str | None, path_glob: str | None, events: tuple[str, ...]) -> None:
    """Print records of the log in LOGDIR as they are written (like tail -f).

    Ctrl-C stops it.  The csv header is printed once.
    """
    flt = make_filter(since, until, user, path_glob, events)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    _tolerant_stdout()
    try:
        for chunk in WRITERS[fmt](r for r in follow_records(logdir, from_start) if flt(r)):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
from cryptfs.cli import audit_bind  # noqa: E402,F401,I001  (registers "audit attach|detach")
from cryptfs.cli import audit_report  # noqa: E402,F401  (registers "audit report")
from cryptfs.cli import audit_forward  # noqa: E402,F401  (registers "audit forward")
