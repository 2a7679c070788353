"""cryptfs audit forward: the access log to a syslog collector as it is written."""

from __future__ import annotations

import logging
import os
import signal
import sys

import click

from cryptfs.audit import syslog
from cryptfs.cli.audit import audit, make_filter, selection_options
from cryptfs.cli.common import reports_errors
from cryptfs.cli.params import PathArg, Seconds
from cryptfs.errors import UsageError
from cryptfs.mounttable import within


@audit.command("forward")
@click.argument("logdir", type=PathArg(file_okay=False, exists=True))
@click.option("--to", "target", required=True, metavar="HOST:PORT",
              help="The collector: a syslog server taking RFC 5424 over TCP with octet-counted "
                   "framing (rsyslog imtcp, syslog-ng syslog(), ...). [IPv6]:PORT for an "
                   "IPv6 address.")
@click.option("--state", type=PathArg(dir_okay=False), metavar="FILE",
              help="Where to keep the number of the last record delivered, so that a restart "
                   "goes on where it stopped (default: LOGDIR/forward-HOST-PORT.cursor).")
@click.option("--from-start", is_flag=True,
              help="With no state file yet, send the records already in the log first "
                   "(default: from the next record written). An existing state file wins.")
@click.option("--facility", type=click.Choice(list(syslog.FACILITIES)), default=syslog.DEFAULT_FACILITY,
              show_default=True, help="The syslog facility of the messages.")
@click.option("--hostname", metavar="NAME",
              help="The HOSTNAME field (default: this machine's host name).")
@click.option("--enterprise-id", type=click.IntRange(1, 2**32 - 1), default=syslog.EXAMPLE_PEN,
              show_default=True, metavar="PEN",
              help="The IANA enterprise number in the SD-ID cryptfs@PEN (the default is the "
                   "one reserved for documentation; use your organisation's if it has one).")
@click.option("--retry-max", type=Seconds(0.1, 3600), default=30.0, show_default=True,
              metavar="SECONDS", help="Longest wait between attempts to reconnect.")
@selection_options
@reports_errors
def forward(logdir: str, target: str, state: str | None, from_start: bool, facility: str,
            hostname: str | None, enterprise_id: int, retry_max: float, since: str | None,
            until: str | None, user: str | None, path_glob: str | None,
            events: tuple[str, ...]) -> None:
    """Send the records of the log in LOGDIR to a syslog collector as written.

    One RFC 5424 message per record, over TCP (octet-counted framing).  Each
    carries the record's seq as [meta sequenceId], its fields as structured
    data [cryptfs@PEN ...], and the record itself as JSON (the layout is in
    docs/AUDIT.md).  The state file remembers the last record delivered:
    stopped and started again, it resumes with no gap and no duplicate.
    When the connection is lost it reconnects, with a growing pause, and
    sends again every record the collector had not acknowledged, so around
    a reconnect (or after a crash) a record may arrive twice: the collector
    drops a message whose log and seq it already has.

    Ctrl-C or SIGTERM stops it with the state saved.  Exit 2 for bad options
    or an unusable state file, 6 if the log no longer holds the record the
    state file names (rewritten or replaced), 7 if the log cannot be read or
    the collector cannot be reached at start.
    """
    host, port = syslog.parse_target(target)
    if state is not None:
        _state_outside_the_log(logdir, state)
    if hostname is not None:
        syslog.check_hostname(hostname)
    stopping: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stopping.append(signum)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("cryptfs: %(message)s"))
    logger = logging.getLogger("cryptfs.forward")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        syslog.Forwarder(logdir, host, port, state or syslog.default_state(logdir, host, port),
                     select_record=make_filter(since, until, user, path_glob, events),
                     from_start=from_start, hostname=hostname,
                     facility=syslog.FACILITIES[facility], enterprise_id=enterprise_id,
                     retry_max=retry_max, stop=lambda: bool(stopping)).run()
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
        logger.removeHandler(handler)


def _state_outside_the_log(logdir: str, state: str) -> None:
    """A state file may live in LOGDIR (the default does) under a ``.cursor`` name
    only: any other name there may be one of the log's own files (audit.key holds
    JSON with a seq too, and was once taken for a state file and overwritten)."""
    where = os.path.realpath(state)
    if within(where, os.path.realpath(logdir)) and not where.endswith(".cursor"):
        raise UsageError(f"--state {state} is inside the log directory {logdir}",
                         hint="name it *.cursor there, or put it elsewhere")
