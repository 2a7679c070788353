"""cryptfs audit attach|detach: bind a volume to its access log."""

from __future__ import annotations

import os

import click

from cryptfs.audit import PUB_NAME, check_log, commands
from cryptfs.cli.audit import audit
from cryptfs.cli.common import (
    command_name,
    passphrase_option,
    read_passphrase,
    reports_errors,
    require_role,
    say,
    unlock_recorded,
)
from cryptfs.cli.params import PathArg
from cryptfs.config import VolumeConfig
from cryptfs.errors import UsageError
from cryptfs.mounttable import within


@audit.command("attach")
@click.argument("backing", type=PathArg(file_okay=False, exists=True))
@click.argument("logdir", type=PathArg(file_okay=False, exists=True))
@passphrase_option()
@reports_errors
def attach(backing: str, logdir: str, passphrase_file: str | None) -> None:
    """Bind the volume in BACKING to the access log in LOGDIR.

    The config then names the log and its verifier key (under the master
    key's MAC).  Every mount of the volume writes that log, without
    --audit-log and refusing any other; so do the commands that change the
    volume or take data out of it (user and policy changes, passwd, rotate,
    recover, export).  A command whose record cannot be written does nothing.
    The first record in LOGDIR is this attach.
    """
    check_log(logdir)
    try:
        with open(os.path.join(logdir, PUB_NAME), encoding="utf-8") as f:
            key = f.read(4096).strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {os.path.join(logdir, PUB_NAME)}: "
                         f"{getattr(e, 'strerror', e)}") from None
    where = os.path.realpath(logdir)
    if within(where, os.path.realpath(backing)):
        raise UsageError("the access log cannot live inside the volume's backing directory")
    with read_passphrase(passphrase_file, "Passphrase") as pw:
        vol = unlock_recorded(backing, pw)
    try:
        require_role(backing, vol, "audit-attach", "bind the volume to a log")
        def change(cfg: VolumeConfig) -> None:  # (on the config as it is now: update_config)
            if cfg.audit is not None and cfg.audit["dir"] != where:
                raise UsageError(f"{backing} is already bound to the access log in "
                                 f"{cfg.audit['dir']}", hint="cryptfs audit detach it first")
            cfg.audit = {"dir": where, "key": key}

        change(vol.config)
        commands.bound_log(where, key)
        with commands.recorded(backing, vol.config, "audit-attach", logdir=where,
                                   command=command_name()):
            vol.update_config(change)
    finally:
        vol.close()
    say(f"{backing} now records every access in {where}")


@audit.command("detach")
@click.argument("backing", type=PathArg(file_okay=False, exists=True))
@click.option("--force", is_flag=True,
              help="Detach even if the log cannot be written (it is lost or damaged): the "
                   "detach itself is then not recorded.")
@passphrase_option()
@reports_errors
def detach(backing: str, force: bool, passphrase_file: str | None) -> None:
    """Stop binding the volume in BACKING to its access log.

    The detach is the log's last record from this volume.  Mounts started
    before keep writing the log until they are unmounted.
    """
    with read_passphrase(passphrase_file, "Passphrase") as pw:
        vol = unlock_recorded(backing, pw)
    try:
        require_role(backing, vol, "audit-detach", "unbind the volume from its log")
        cfg = vol.config
        if cfg.audit is None:
            raise UsageError(f"{backing} is not bound to an access log")
        try:
            commands.record(backing, cfg, "audit-detach", logdir=cfg.audit["dir"],
                                command=command_name())
        except commands.LogUnavailable:
            if not force:
                raise
            click.echo(f"cryptfs: warning: the detach is not recorded in {cfg.audit['dir']}",
                       err=True)
        where = cfg.audit["dir"]

        def detached(fresh: VolumeConfig) -> None:  # (on the config as it is now)
            if fresh.audit != cfg.audit:
                raise UsageError("the volume's access log binding was changed by another "
                                 "command while this one ran: nothing was changed",
                                 hint="run the command again")
            fresh.audit = None

        vol.update_config(detached)
    finally:
        vol.close()
    say(f"{backing} no longer records its accesses in {where}")
