"""cryptfs audit report: the access log as a page for a person."""

from __future__ import annotations

import os

import click

from cryptfs.audit.chain import KEY_FILE, PUB_NAME, SEGMENT_RE
from cryptfs.audit.export import parse_time
from cryptfs.audit.merge import check_together
from cryptfs.audit.report import LogSource, verdict_text, write_report
from cryptfs.cli.audit import LogDamaged, _read_key, audit
from cryptfs.cli.common import refuse_inside_a_volume, reports_errors
from cryptfs.cli.params import PathArg
from cryptfs.errors import UsageError
from cryptfs.mounttable import within


def _sources(logdirs: tuple[str, ...], keys: tuple[str, ...]) -> list[LogSource]:
    if keys and len(keys) != len(logdirs):
        raise UsageError(f"{len(keys)} --key for {len(logdirs)} LOGDIR: give one per LOGDIR, in "
                         "the same order, or none (then each LOGDIR's audit.pub is used)")
    sources = []
    for i, logdir in enumerate(logdirs):
        names = os.listdir(logdir)
        if not any(n in (PUB_NAME, KEY_FILE) or SEGMENT_RE.match(n) for n in names):
            raise UsageError(f"{logdir} holds no access log")
        stored = os.path.join(logdir, PUB_NAME)
        if keys:
            key = keys[i]
            is_stored = os.path.exists(key) and os.path.exists(stored) and \
                os.path.samefile(key, stored)
        elif os.path.exists(stored):
            key, is_stored = stored, True
        else:
            raise UsageError(f"{logdir} has no {PUB_NAME} to verify it with",
                             hint="give the log's verifier key: --key PUB (one per LOGDIR)")
        sources.append(LogSource(logdir, _read_key(key), is_stored))
    return sources


@audit.command("report")
@click.argument("logdirs", nargs=-1, required=True, metavar="LOGDIR...",
                type=PathArg(file_okay=False, exists=True))
@click.option("--html", "out", required=True, metavar="OUT",
              type=PathArg(dir_okay=False, writable=True),
              help="Write the page to this file (one self-contained HTML file).")
@click.option("--key", "keys", multiple=True, metavar="PUB",
              help="The verifier key (cryptfs-audit+...) of each LOGDIR, or a file holding it; "
                   "repeat it once per LOGDIR, in the same order.  Without it, each LOGDIR's "
                   "audit.pub is used, and the page says that this proves less.")
@click.option("--since", metavar="TIME", help="Only records at or after TIME (ISO 8601, or "
                                               "seconds since 1970; UTC).")
@click.option("--until", metavar="TIME", help="Only records at or before TIME.")
@reports_errors
def report(logdirs: tuple[str, ...], out: str, keys: tuple[str, ...], since: str | None,
           until: str | None) -> None:
    """Write an HTML page on the logs in LOGDIR... for an auditor.

    The page shows first whether each log verifies (as `cryptfs audit
    verify`), then a summary, accesses per user over time, the files and
    programs most accessed, denials, failed unlocks (from a key agent's log)
    and integrity failures.  It is one file, readable without JavaScript and
    without a network: no script, nothing fetched.

    Give the mount's log and the key agent's together to see both on one
    page; and the logs of every server of a shared volume, to see them as
    one story (records merged by time; the tables then name each row's
    server).  Exit 0 if every log verifies, 6 if one does not (the page is
    written all the same, with that verdict first).

    \b
    Example:
      cryptfs audit report /var/log/cryptfs/customers /var/log/cryptfs/agent \\
          --key customers.pub --key agent.pub --since 2026-11-01 --html report.html
    """
    where = os.path.realpath(out)
    for logdir in logdirs:
        if within(where, os.path.realpath(logdir)):
            # (it would replace a segment or the key if it named one: the log is not
            # a place for anything but the log)
            raise UsageError(f"--html {out} is inside the log directory {logdir}",
                             hint="write the report outside the log")
    refuse_inside_a_volume(out, "the report", mounted_too=False)
    sources = _sources(logdirs, keys)
    check_together(list(logdirs))
    rep = write_report(sources, out, since=parse_time(since) if since else None,
                          until=parse_time(until) if until else None)
    for lr in rep.logs:
        _, state = verdict_text(lr)
        click.echo(f"{lr.source.logdir}: {state}")
    click.echo(f"report: {out}")
    bad = [lr.source.logdir for lr in rep.logs if not lr.verdict.ok]
    if bad:
        raise LogDamaged(f"{', '.join(bad)} {'does' if len(bad) == 1 else 'do'} not verify "
                         f"(the report, with that verdict first, is in {out})")
