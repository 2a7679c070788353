"""cryptfs policy set|unset|show, and cryptfs share: modes per directory, hybrid recipients."""

from __future__ import annotations

import copy
import errno
import hashlib
import os
import stat

import click

from cryptfs import control
from cryptfs.cli.common import (
    passphrase_option,
    read_passphrase,
    recorded,
    reports_errors,
    require_role,
    say,
    unlock_recorded,
)
from cryptfs.cli.params import PathArg, UserName
from cryptfs.config import VolumeConfig
from cryptfs.errors import UsageError
from cryptfs.links import Straddler, straddling
from cryptfs.masking import FORMATS, parse_columns
from cryptfs.mounttable import volume_of_path
from cryptfs.names import NameCodec
from cryptfs.policy import (
    UNTRUSTED,
    MaskRule,
    Program,
    Rule,
    load_policy,
    mode_choices,
    parse_mode,
    store_policy,
    volume_dir,
)
from cryptfs.printable import shown
from cryptfs.volume import Volume

AUTH_HELP = "Read the passphrase of a user of the volume from this file ('-': stdin)."


def _open(backing: str, passphrase_file: str | None) -> Volume:
    pw = read_passphrase(passphrase_file, "Passphrase")
    with pw:
        return unlock_recorded(backing, pw)


@click.group()
def policy() -> None:
    """Choose how new files of a directory are encrypted.

    A rule on a directory applies to files created in it and in directories
    below it (the deepest rule wins).  Existing files keep the mode they
    were written in, so a volume mixes modes freely.  Rules name
    directories by their path inside the volume; they are stored encrypted
    and authenticated in the volume config.
    """


@policy.command("set")
@click.argument("backing", type=PathArg(file_okay=False))
@click.argument("directory")
@click.option("--mode", "mode", required=True, type=click.Choice(mode_choices()),
              help="aes-256-gcm or xchacha20-poly1305: symmetric, every unlocked user reads "
                   "the files.  hybrid[-CIPHER]: each file key is wrapped to its recipients "
                   "only (its creator, the --recipient users, the recovery key).")
@click.option("--recipient", "recipients", multiple=True, metavar="USER", type=UserName(),
              help="A user whose key every new file is also wrapped to (hybrid; repeatable).")
@click.option("--dropbox", is_flag=True,
              help="Write-only for everyone else: the creator is not a recipient, so a writer "
                   "cannot read a file back once it is closed (hybrid).")
@click.option("--program", "programs", multiple=True, metavar="PATH",
              help="Only this program (its executable's absolute path) may open files here "
                   "and below; repeat for several.  Others get 'permission denied'.")
@click.option("--pin", is_flag=True,
              help="With --program: also pin each program by the SHA-256 of its executable "
                   "as it is now (an updated binary is then refused until the rule is set "
                   "again).")
@click.option("--any-program", is_flag=True,
              help="Any program may open files here (lifts a --program rule from above).")
@click.option("--mask", "mask_glob", metavar="GLOB",
              help="Show files whose names match GLOB (e.g. '*.csv') masked to agents on a "
                   "shared mount; with --mask-format and --column.")
@click.option("--mask-format", type=click.Choice(sorted(FORMATS)), default="csv",
              show_default=True, help="With --mask: csv or tsv, with a header row.")
@click.option("--column", "columns", multiple=True, metavar="NAME=FUNCTION",
              help="With --mask: what column NAME shows: keep, mask, first:N, last:M, "
                   "first:N,last:M, surname or token (repeatable; a column not named is "
                   "masked).")
@click.option("--no-masks", is_flag=True, help="No masked views here (lifts a --mask from above).")
@click.option("--untrusted", type=click.Choice(UNTRUSTED), default="deny", show_default=True,
              help="With --program: what another program gets: 'permission denied', or a "
                   "read-only view of the file's encrypted bytes.")
@passphrase_option(help_text=AUTH_HELP)
@reports_errors
def set_(backing: str, directory: str, mode: str, recipients: tuple[str, ...], dropbox: bool,
         programs: tuple[str, ...], pin: bool, any_program: bool, mask_glob: str | None,
         mask_format: str, columns: tuple[str, ...], no_masks: bool, untrusted: str,
         passphrase_file: str | None) -> None:
    """Set the rule of DIRECTORY (a path inside the volume, e.g. /recordings).

    The rule says how new files there are encrypted and, with --program,
    which programs may open files there at all (docs/POLICY.md says what
    such a check can and cannot stop).  Without --program or --any-program,
    the programs are as the rule above says.
    """
    trusted = _programs(programs, pin, any_program)
    if untrusted != "deny" and not programs:
        raise UsageError("--untrusted goes with --program")
    fmt_given = (click.get_current_context().get_parameter_source("mask_format")
                 == click.core.ParameterSource.COMMANDLINE)
    if fmt_given and mask_glob is None:  # (it was taken, and did nothing)
        raise UsageError("--mask-format goes with --mask")
    masks = _masks(mask_glob, mask_format, columns, no_masks)
    vol = _open(backing, passphrase_file)
    try:
        require_role(backing, vol, "policy-set", "set the policy")
        name, hybrid = parse_mode(mode, vol.config.default_mode)
        if (recipients or dropbox) and not hybrid:
            raise UsageError("--recipient and --dropbox need a hybrid mode",
                             hint="e.g. --mode hybrid")
        rule = Rule(volume_dir(directory), name, hybrid, tuple(dict.fromkeys(recipients)), dropbox,
                    trusted, untrusted, masks)

        def change(cfg: VolumeConfig) -> None:  # (on the config as it is now: see update_config)
            publics = cfg.publics()
            missing = [r for r in recipients if r not in publics]
            if missing:
                raise UsageError(f"no user of this volume with a key pair is called "
                                 f"{', '.join(missing)}", hint="see: cryptfs user list")
            if dropbox and not recipients and cfg.recovery is None:
                raise UsageError("a drop box nobody could read: name a --recipient (or give the "
                                 "volume a recovery key)")
            rules = load_policy(cfg, vol.keys)
            rules.rules[rule.path] = rule
            store_policy(cfg, vol.keys, rules)

        change(copy.deepcopy(vol.config))  # (refused before anything is recorded)
        with recorded(backing, vol.config, "policy-set", path=rule.path, mode=mode,
                      recipients=list(rule.recipients), dropbox=dropbox,
                      programs=None if trusted is None else [p.path for p in trusted]):
            vol.update_config(change)
        recovery = vol.config.recovery is not None
        straddlers = _straddlers(vol, rule)
    finally:
        vol.close()
    say(f"{rule.path}: {_describe(rule, recovery)}")
    _warn_straddlers(rule.path, straddlers)


def _straddlers(vol: Volume, rule: Rule) -> list[Straddler] | str:
    """Files with hard links inside and outside a rule that restricts (a
    message instead if the tree cannot be read)."""
    if not (rule.masks or rule.programs):
        return []
    try:
        return straddling(vol.tree, NameCodec(vol.keys), rule.path)
    except OSError as e:
        return e.strerror or str(e)


def _warn_straddlers(path: str, found: list[Straddler] | str) -> None:
    if isinstance(found, str):
        say(f"cryptfs: warning: cannot look for hard-linked files across {path} "
            f"({found}): a file with names inside and outside it is protected under "
            "every name", err=True)
        return
    if not found:
        return
    say(f"cryptfs: warning: {len(found)} file(s) with hard links both inside and outside "
        f"{path}: each is now protected by this rule under every one of its names "
        "(docs/POLICY.md, hard links):", err=True)
    for s in found:
        more = f" (and {s.missing} name(s) outside the tree or that do not decrypt)" \
            if s.missing else ""
        say("cryptfs: warning:   " + " = ".join(map(shown, s.names)) + more, err=True)


def _masks(glob: str | None, fmt: str, columns: tuple[str, ...], none: bool
           ) -> tuple[MaskRule, ...] | None:
    if none and (glob or columns):
        raise UsageError("--no-masks and --mask exclude each other")
    if none:
        return ()
    if glob is None:
        if columns:
            raise UsageError("--column goes with --mask")
        return None
    if not glob or "/" in glob:
        raise UsageError(f"--mask {glob!r}: a pattern of file names, e.g. '*.csv'")
    try:
        parsed = parse_columns(columns)
    except ValueError as e:
        raise UsageError(f"--column: {e}",
                         hint="FUNCTION: keep, mask, first:N, last:M, first:N,last:M, surname, "
                              "token") from None
    return (MaskRule(glob, fmt, tuple(sorted((k, str(f)) for k, f in parsed.items()))),)


def _programs(paths: tuple[str, ...], pin: bool, any_program: bool
              ) -> tuple[Program, ...] | None:
    if any_program and paths:
        raise UsageError("--any-program and --program exclude each other")
    if pin and not paths:
        raise UsageError("--pin goes with --program")
    if any_program:
        return ()
    if not paths:
        return None
    out = []
    for path in dict.fromkeys(paths):
        if not os.path.isabs(path):
            raise UsageError(f"--program {path}: give the executable's absolute path")
        real = os.path.realpath(path)
        if not os.path.isfile(real) or not os.access(real, os.X_OK):
            raise UsageError(f"--program {path}: not an executable file")
        if real != path:
            # The kernel names a process's executable by its real path.
            raise UsageError(f"--program {path}: that is a link to {real}; name that instead")
        digest = None
        if pin:
            with open(real, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        out.append(Program(real, digest))
    return tuple(out)


@policy.command("unset")
@click.argument("backing", type=PathArg(file_okay=False))
@click.argument("directory")
@passphrase_option(help_text=AUTH_HELP)
@reports_errors
def unset(backing: str, directory: str, passphrase_file: str | None) -> None:
    """Remove the rule of DIRECTORY (new files there follow the rule above it)."""
    vol = _open(backing, passphrase_file)
    try:
        require_role(backing, vol, "policy-unset", "change the policy")
        path = volume_dir(directory)

        def change(cfg: VolumeConfig) -> None:  # (on the config as it is now: see update_config)
            rules = load_policy(cfg, vol.keys)
            if rules.rules.pop(path, None) is None:
                raise UsageError(f"{path} has no rule", hint=f"see: cryptfs policy show {backing}")
            store_policy(cfg, vol.keys, rules)

        change(copy.deepcopy(vol.config))  # (refused before anything is recorded)
        with recorded(backing, vol.config, "policy-unset", path=path):
            vol.update_config(change)
    finally:
        vol.close()
    say(f"{path}: rule removed")


@policy.command("show")
@click.argument("backing", type=PathArg(file_okay=False))
@passphrase_option(help_text=AUTH_HELP)
@reports_errors
def show(backing: str, passphrase_file: str | None) -> None:
    """List the rules (they are encrypted: a passphrase is needed)."""
    vol = _open(backing, passphrase_file)
    try:
        rules = load_policy(vol.config, vol.keys)
        default = vol.config.default_mode
        recovery = vol.config.recovery is not None
    finally:
        vol.close()
    say(f"/ (default): {default}" + (" (no rule)" if "/" not in rules.rules else ""))
    for path, rule in sorted(rules.rules.items()):
        say(f"{path}: {_describe(rule, recovery)}")


def _describe(rule: Rule, recovery: bool) -> str:
    if not rule.hybrid:
        text = f"{rule.mode} (symmetric: every unlocked user)"
    else:
        who = ([] if rule.dropbox else ["the creator"]) + list(rule.recipients) \
            + (["the recovery key"] if recovery else [])
        text = (f"{rule.mode_name}{' drop box' if rule.dropbox else ''}: readable by "
                + ", ".join(who))
    if rule.programs is not None:
        text += "; programs: " + (", ".join(
            p.path + (f" (sha256 {p.sha256[:12]}...)" if p.sha256 else "") for p in rule.programs)
            or "any")
        if rule.untrusted != "deny":
            text += f"; other programs: the {rule.untrusted}"
    if rule.masks is not None:
        text += "; masked for agents: " + ("; ".join(
            f"{m.glob} ({m.fmt}: " + (", ".join(f"{k}={f}" for k, f in m.columns) or "all masked")
            + ")" for m in rule.masks) or "none")
    return text


@click.command()
@click.argument("path", type=PathArg(dir_okay=False))
@click.option("--with", "with_", multiple=True, metavar="USER", type=UserName(),
              help="The user to add as a recipient (repeatable).")
@click.option("--list", "list_", is_flag=True, help="Only list the file's recipients.")
@reports_errors
def share(path: str, with_: tuple[str, ...], list_: bool) -> None:
    """Let USER read PATH, a hybrid file on a mounted volume.

    Wraps the file's key to USER's public key.  Only a recipient who may
    write the file can: sharing rewrites its header, and the mount opens the
    file key with your own key first.  A hybrid file has room for 4 more
    recipients than it was created with.
    """
    if not with_ and not list_:
        raise UsageError("name a user: --with USER (or --list)")
    if with_ and list_:  # (--list says 'only list': it shared the file all the same)
        raise UsageError("--list only lists: give it without --with")
    if volume_of_path(path) is None:
        raise UsageError(f"{path} is not on a mounted cryptfs volume")
    try:  # (os.path.isfile said "no such file" for one the mount refused: locked, say)
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as e:
        raise UsageError(f"{path}: {e.strerror}",
                         hint="unlock the volume first (cryptfs unlock)"
                         if e.errno in (errno.EACCES, errno.EPERM) else None) from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} is not a regular file")
    if with_ and not os.access(path, os.W_OK):
        raise UsageError(f"cannot share {path}: you may not write it (sharing rewrites the "
                         "file's header, so it needs write permission)")
    for name in with_:
        try:
            control.share(path, name)
        except OSError as e:
            why = {
                errno.EACCES: "you are not one of its recipients (or not unlocked)",
                errno.ENOENT: f"{name} is not a user of this volume with a key pair",
                errno.EINVAL: "it is not a hybrid file (every unlocked user reads it already)",
                errno.ENOSPC: "its header has no room for another recipient (copy the file "
                              "to re-create it with the directory's recipients)",
            }.get(e.errno or 0, e.strerror or str(e))
            raise UsageError(f"cannot share {path} with {name}: {why}") from None
        say(f"shared {path} with {name}")
    try:
        names = control.recipients(path)
    except OSError as e:
        raise UsageError(f"cannot read the recipients of {path}: {e.strerror}") from None
    if list_:
        click.echo("\n".join(map(shown, names)) if names else "(symmetric: every unlocked user)")

