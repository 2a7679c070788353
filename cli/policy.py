"""cryptfs policy set|unset|show, and cryptfs share: modes per directory, hybrid recipients."""

from __future__ import annotations

import errno
import os

import click

from cryptfs.cli.common import passphrase_option, read_passphrase, recorded, reports_errors, unlock_recorded
from cryptfs.errors import UsageError
from cryptfs.export import cryptfs_mount_of
from cryptfs.ops import RECIPIENTS_XATTR, SHARE_XATTR
from cryptfs.policy import Rule, load_policy, mode_choices, normalise, parse_mode, store_policy
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
@click.argument("backing", type=click.Path(file_okay=False))
@click.argument("directory")
@click.option("--mode", "mode", required=True, type=click.Choice(mode_choices()),
              help="aes-256-gcm or xchacha20-poly1305: symmetric, every unlocked user reads "
                   "the files.  hybrid[-CIPHER]: each file key is wrapped to its recipients "
                   "only (its creator, the --recipient users, the recovery key).")
@click.option("--recipient", "recipients", multiple=True, metavar="USER",
              help="A user whose key every new file is also wrapped to (hybrid; repeatable).")
@click.option("--dropbox", is_flag=True,
              help="Write-only for everyone else: the creator is not a recipient, so a writer "
                   "cannot read a file back once it is closed (hybrid).")
@passphrase_option(help_text=AUTH_HELP)
@reports_errors
def set_(backing: str, directory: str, mode: str, recipients: tuple[str, ...], dropbox: bool,
         passphrase_file: str | None) -> None:
    """Set the rule of DIRECTORY (a path inside the volume, e.g. /recordings)."""
    vol = _open(backing, passphrase_file)
    try:
        name, hybrid = parse_mode(mode, vol.config.default_mode)
        if (recipients or dropbox) and not hybrid:
            raise UsageError("--recipient and --dropbox need a hybrid mode",
                             hint="e.g. --mode hybrid")
        publics = vol.config.publics()
        missing = [r for r in recipients if r not in publics]
        if missing:
            raise UsageError(f"no user of this volume with a key pair is called "
                             f"{', '.join(missing)}", hint="see: cryptfs user list")
        if dropbox and not recipients and vol.config.recovery is None:
            raise UsageError("a drop box nobody could read: name a --recipient (or give the "
                             "volume a recovery key)")
        rules = load_policy(vol.config, vol.keys)
        rule = Rule(normalise(directory), name, hybrid, tuple(dict.fromkeys(recipients)), dropbox)
        rules.rules[rule.path] = rule
        with recorded(backing, vol.config, "policy-set", path=rule.path, mode=mode,
                      recipients=list(rule.recipients), dropbox=dropbox):
            store_policy(vol.config, vol.keys, rules)
            vol.save_config()
        recovery = vol.config.recovery is not None
    finally:
        vol.close()
    click.echo(f"{rule.path}: {_describe(rule, recovery)}")


@policy.command("unset")
@click.argument("backing", type=click.Path(file_okay=False))
@click.argument("directory")
@passphrase_option(help_text=AUTH_HELP)
@reports_errors
def unset(backing: str, directory: str, passphrase_file: str | None) -> None:
    """Remove the rule of DIRECTORY (new files there follow the rule above it)."""
    vol = _open(backing, passphrase_file)
    try:
        rules = load_policy(vol.config, vol.keys)
        path = normalise(directory)
        if rules.rules.pop(path, None) is None:
            raise UsageError(f"{path} has no rule", hint=f"see: cryptfs policy show {backing}")
        with recorded(backing, vol.config, "policy-unset", path=path):
            store_policy(vol.config, vol.keys, rules)
            vol.save_config()
    finally:
        vol.close()
    click.echo(f"{path}: rule removed")


@policy.command("show")
@click.argument("backing", type=click.Path(file_okay=False))
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
    click.echo(f"/ (default): {default}" + (" (no rule)" if "/" not in rules.rules else ""))
    for path, rule in sorted(rules.rules.items()):
        click.echo(f"{path}: {_describe(rule, recovery)}")


def _describe(rule: Rule, recovery: bool) -> str:
    if not rule.hybrid:
        return f"{rule.mode} (symmetric: every unlocked user)"
    who = ([] if rule.dropbox else ["the creator"]) + list(rule.recipients) \
        + (["the recovery key"] if recovery else [])
    return (f"{rule.mode_name}{' drop box' if rule.dropbox else ''}: readable by "
            + ", ".join(who))


@click.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--with", "with_", multiple=True, metavar="USER",
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
    if cryptfs_mount_of(path) is None:
        raise UsageError(f"{path} is not on a mounted cryptfs volume")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    if with_ and not os.access(path, os.W_OK):
        raise UsageError(f"cannot share {path}: you may not write it (sharing rewrites the "
                         "file's header, so it needs write permission)")
    for name in with_:
        try:
            os.setxattr(path, SHARE_XATTR, name.encode("utf-8"))
        except OSError as e:
            why = {
                errno.EACCES: "you are not one of its recipients (or not unlocked)",
                errno.ENOENT: f"{name} is not a user of this volume with a key pair",
                errno.EINVAL: "it is not a hybrid file (every unlocked user reads it already)",
                errno.ENOSPC: "its header has no room for another recipient (copy the file "
                              "to re-create it with the directory's recipients)",
            }.get(e.errno or 0, e.strerror or str(e))
            raise UsageError(f"cannot share {path} with {name}: {why}") from None
        click.echo(f"shared {path} with {name}")
    try:
        names = os.getxattr(path, RECIPIENTS_XATTR).decode("utf-8", "replace").split()
    except OSError as e:
        raise UsageError(f"cannot read the recipients of {path}: {e.strerror}") from None
    if list_:
        click.echo("\n".join(names) if names else "(symmetric: every unlocked user)")

