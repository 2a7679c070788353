"""cryptfs user add|remove|list|passwd: key slots of system users."""

from __future__ import annotations

import os

import click

from cryptfs.cli.common import (
    invoking_user,
    passphrase_option,
    read_passphrase,
    recorded,
    reports_errors,
    require_role,
    say,
    unlock_recorded,
)
from cryptfs.cli.params import PathArg, UserName
from cryptfs.cli.rotate import opened_for_rotation, run_rotation
from cryptfs.cli.volume import kdf_options
from cryptfs.config import Kdf, load_config
from cryptfs.errors import UsageError, WrongPassphrase
from cryptfs.users import ROLES, add_user, list_users, remove_user, set_passphrase, slot_for_name

AUTH_HELP = ("Read the passphrase that authorises the change (any user's that opens the "
             "volume) from this file ('-': stdin).")
NEW_HELP = "Read the new passphrase from this file ('-': stdin)."


@click.group()
def user() -> None:
    """Manage the users of a volume: one key slot each, with a role.

    Adding, removing or resetting a user needs a passphrase that already opens
    the volume: being root is not enough.
    """


@user.command("add")
@click.argument("backing", type=PathArg(file_okay=False))
@click.argument("name", type=UserName())
@click.option("--role", type=click.Choice(ROLES), default="agent", show_default=True,
              help="What the user does (later policy decides what each role sees).")
@passphrase_option(help_text=AUTH_HELP)
@passphrase_option("--new-passphrase-file", help_text="Read the new user's passphrase from this "
                   "file ('-': stdin).")
@kdf_options
@reports_errors
def add(backing: str, name: str, role: str, passphrase_file: str | None,
        new_passphrase_file: str | None, kdf_memory: int, kdf_iterations: int) -> None:
    """Give system user NAME their own key slot in BACKING."""
    auth = read_passphrase(passphrase_file, "Passphrase of an existing user (to authorise)")
    with auth:
        vol = unlock_recorded(backing, auth)
    try:
        require_role(backing, vol, "user-add", "add users")
        new = read_passphrase(new_passphrase_file, f"New passphrase for {name}", confirm=True)
        with new, recorded(backing, vol.config, "user-add", target=name, role=role):
            slot = add_user(vol, name, role, new, Kdf(kdf_iterations, kdf_memory * 1024))
    finally:
        vol.close()
    say(f"added {name} (uid {slot.extra['uid']}, role {role}) in key slot {slot.id}")


@user.command("remove")
@click.argument("backing", type=PathArg(file_okay=False))
@click.argument("name", type=UserName())
@click.option("--revoke", is_flag=True,
              help="Also rotate the wrapping key (as `cryptfs rotate --wrap-key`): a copy of "
                   "the old config plus NAME's old passphrase then opens no file key.")
@click.option("--recovery-key", "recovery_key", type=PathArg(dir_okay=False), metavar="FILE",
              help="With --revoke offline: the recovery key, to remove NAME from hybrid files "
                   "your user cannot open.")
@passphrase_option(help_text=AUTH_HELP)
@reports_errors
def remove(backing: str, name: str, revoke: bool, recovery_key: str | None,
           passphrase_file: str | None) -> None:
    """Remove NAME's key slot from BACKING.

    Without --revoke, NAME's passphrase no longer opens the current config,
    but someone who kept a copy of the old config still opens the file keys
    with it; --revoke closes that (docs/FORMAT.md, "Rotation").
    """
    if recovery_key is not None and not revoke:
        raise UsageError("--recovery-key goes with --revoke")
    with opened_for_rotation(backing, passphrase_file, "Passphrase of an existing user (to "
                             "authorise)", recovery_key) as (vol, recovery):
        require_role(backing, vol, "user-remove", "remove users")
        with recorded(backing, vol.config, "user-remove", target=name, revoke=revoke):
            slot = remove_user(vol, name, save=not revoke)
            if revoke:
                # The slot goes with the new key generation, in one config write.
                run_rotation(vol, "wrap-key", recovery, new_generation=True)
    say(f"removed {name} (key slot {slot.id})" + (", access revoked" if revoke else ""))


@user.command("list")
@click.argument("backing", type=PathArg(file_okay=False))
@reports_errors
def list_(backing: str) -> None:
    """List the users of BACKING: name, uid, role, when added, last unlock.

    Needs no passphrase and shows no secret.  It reads the config without
    authenticating it (that needs a key): `cryptfs fsck` checks it.
    """
    users = list_users(load_config(backing), os.path.abspath(backing))
    click.echo(f"{'SLOT':>4}  {'USER':<16} {'UID':>6}  {'ROLE':<10} {'ADDED':<20} LAST UNLOCK")
    for u in users:
        uid = "-" if u.uid is None else str(u.uid)
        say(f"{u.slot_id:>4}  {u.name:<16} {uid:>6}  {u.role:<10} {u.added:<20} "
            f"{u.last_unlock or 'never'}")


@user.command("passwd")
@click.argument("backing", type=PathArg(file_okay=False))
@click.argument("name", required=False, type=UserName())
@passphrase_option(help_text="Read the current passphrase from this file ('-': stdin): NAME's "
                   "own, or any user's to reset NAME's.")
@passphrase_option("--new-passphrase-file", help_text=NEW_HELP)
@kdf_options
@reports_errors
def passwd(backing: str, name: str | None, passphrase_file: str | None,
           new_passphrase_file: str | None, kdf_memory: int, kdf_iterations: int) -> None:
    """Set a new passphrase for NAME's key slot (default: your own).

    The current passphrase may be NAME's own, or (to reset a forgotten one)
    any user's that opens the volume.  Only that slot is rewritten.
    """
    who = name or invoking_user("name the user")
    cfg = load_config(backing)
    slot = slot_for_name(cfg, who)
    if name is None and os.getuid() != 0 and slot.extra.get("uid") != os.getuid():
        raise UsageError(f"the key slot of {who} is not yours")
    old = read_passphrase(passphrase_file, f"Current passphrase (of {who}, or of any user "
                                           "to reset it)")
    with old:
        try:
            vol = unlock_recorded(backing, old)
        except WrongPassphrase:
            raise WrongPassphrase("that passphrase opens no key slot of this volume") from None
    try:
        if slot_for_name(vol.config, who).id != vol.slot.id:  # (resetting someone else's)
            require_role(backing, vol, "passwd", "reset another user's passphrase")
        new = read_passphrase(new_passphrase_file, f"New passphrase for {who}", confirm=True)
        with new, recorded(backing, vol.config, "passwd", target=who):
            fresh = set_passphrase(vol, slot_for_name(vol.config, who), new,
                                   Kdf(kdf_iterations, kdf_memory * 1024))
    finally:
        vol.close()
    say(f"passphrase of {who} (key slot {fresh.id}) changed")
