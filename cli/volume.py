"""init, info, passwd, fsck: commands on a backing directory."""

from __future__ import annotations

import os
import sys

import click

from cryptfs import fsck as fsck_mod
from cryptfs.audit import commands
from cryptfs.cli.common import (
    command_name,
    invoking_user,
    passphrase_option,
    read_passphrase,
    recorded,
    reports_errors,
    say,
    unlock_recorded,
)
from cryptfs.cli.params import PathArg, UserName
from cryptfs.config import DEFAULT_MEM_KIB, DEFAULT_OPS, Kdf, load_config
from cryptfs.errors import DamageFound, UsageError
from cryptfs.export import export as export_file
from cryptfs.export import parse_recipients, recipients_from_file
from cryptfs.modes import CONTENT_MODES
from cryptfs.mounttable import volume_of_path
from cryptfs.recovery import add_recovery, create_key_file, extract, open_for_recovery
from cryptfs.users import ROLES, set_passphrase, user_fields
from cryptfs.volume import discard_new_volume, init_volume, open_volume

MODE_NAMES = [m.name for m in CONTENT_MODES.values()]


def kdf_options(fn):  # type: ignore[no-untyped-def]
    fn = click.option("--kdf-iterations", type=click.IntRange(1, 64), default=DEFAULT_OPS,
                      show_default=True, help="Argon2id passes.")(fn)
    fn = click.option("--kdf-memory", type=click.IntRange(8, 4096), default=DEFAULT_MEM_KIB // 1024,
                      show_default=True, metavar="MIB",
                      help="Argon2id memory per unlock, in MiB.")(fn)
    return fn


@click.command()
@click.argument("backing", type=PathArg(file_okay=False))
@click.option("--mode", type=click.Choice(MODE_NAMES), default="aes-256-gcm", show_default=True,
              help="Default content cipher for new files.")
@click.option("--user", "first_user", metavar="NAME", type=UserName(),
              help="System user who owns the first key slot (default: you; $SUDO_USER under "
              "sudo).")
@click.option("--role", type=click.Choice(ROLES), default="admin", show_default=True,
              help="Role of the first user.")
@click.option("--recovery-key", "recovery_key", type=PathArg(dir_okay=False), metavar="FILE",
              help="Write the private half of the volume's recovery key to FILE (a new file, "
              "mode 0600), for the data owner to keep offline: with it alone, "
              "`cryptfs recover` decrypts the whole volume, hybrid files included.")
@click.option("--no-recovery-key", "no_recovery_key", is_flag=True,
              help="Make the volume without a recovery key (files then depend on users' "
              "passphrases alone).")
@passphrase_option()
@kdf_options
@reports_errors
def init(backing: str, mode: str, first_user: str | None, role: str, recovery_key: str | None,
         no_recovery_key: bool, passphrase_file: str | None, kdf_memory: int,
         kdf_iterations: int) -> None:
    """Create a new encrypted volume in BACKING (a new or empty directory).

    Asks for the passphrase of the first key slot twice (unless
    --passphrase-file is given).  That slot belongs to a system user, so the
    key agent can unlock it for them; add more with `cryptfs user add`.
    Every volume gets a recovery key (--recovery-key FILE) unless
    --no-recovery-key says otherwise.
    """
    if recovery_key is None and not no_recovery_key:
        raise UsageError("name the file for the volume's recovery key: --recovery-key FILE",
                         hint="the data owner keeps it offline; --no-recovery-key makes a "
                              "volume without one")
    if recovery_key is not None and no_recovery_key:
        raise UsageError("--recovery-key and --no-recovery-key exclude each other")
    fields = user_fields(first_user or invoking_user("pass --user NAME"), role)
    pw = read_passphrase(passphrase_file, "New volume passphrase", confirm=True)
    key_fd = create_key_file(recovery_key) if recovery_key else None
    try:
        made = not os.path.lexists(backing)
        with pw:
            vol = init_volume(backing, mode, pw, Kdf(kdf_iterations, kdf_memory * 1024), fields)
        try:
            if key_fd is not None:
                add_recovery(vol, key_fd)
        except BaseException:
            discard_new_volume(vol.backing, made)  # (no volume without the key it was promised)
            raise
        finally:
            vol.close()
    except BaseException:
        if key_fd is not None and recovery_key:
            os.unlink(recovery_key)
        raise
    finally:
        if key_fd is not None:
            os.close(key_fd)
    say(f"created cryptfs volume {vol.config.volume_id.hex()} in {backing} "
        f"(mode {mode}; key slot 0 for {fields['user']}, role {role})")
    if recovery_key:
        say(f"recovery key written to {recovery_key}: keep it offline, apart from the "
            "volume")


@click.command()
@click.argument("backing", type=PathArg(file_okay=False))
@reports_errors
def info(backing: str) -> None:
    """Show a volume's format, mode, key slots and KDF cost (no secrets).

    Needs no passphrase, so nothing shown here is authenticated; fsck checks it.
    """
    cfg = load_config(backing)
    click.echo(f"volume id:     {cfg.volume_id.hex()}")
    click.echo(f"format:        cryptfs config version {cfg.version}")
    click.echo(f"created:       {cfg.created}")
    click.echo(f"default mode:  {cfg.default_mode}")
    click.echo(f"features:      {', '.join(cfg.features)}")
    click.echo(f"key id:        {cfg.key_id} (key generation)"
               + (f"; retired generations still in use: {', '.join(map(str, sorted(cfg.retired)))}"
                  if cfg.retired else ""))
    if cfg.rotation:
        click.echo(f"rotation:      {cfg.rotation['kind']} started {cfg.rotation['started']}, "
                   "unfinished (run cryptfs rotate again to finish)")
    click.echo(f"recovery key:  {'yes' if cfg.recovery else 'no'}")
    click.echo(f"policy:        {'yes (encrypted; cryptfs policy show)' if cfg.policy else 'none'}")
    click.echo(f"default KDF:   argon2id, {cfg.kdf.ops} passes, {cfg.kdf.mem_kib // 1024} MiB")
    click.echo(f"key slots:     {len(cfg.slots)}")
    for s in cfg.slots:
        extra = "".join(f", {k}={v}" for k, v in sorted(s.extra.items()))
        say(f"  slot {s.id}: {s.label} (created {s.created}; argon2id {s.kdf.ops} passes, "
            f"{s.kdf.mem_kib // 1024} MiB{extra}; "
            + ("user key pair" if s.v2 else "v1: no key pair, cannot follow a rotation")
            + ")")


@click.command()
@click.argument("backing", type=PathArg(file_okay=False))
@passphrase_option(help_text="Read the current passphrase from this file ('-': stdin).")
@passphrase_option("--new-passphrase-file",
                   help_text="Read the new passphrase from this file ('-': stdin).")
@reports_errors
def passwd(backing: str, passphrase_file: str | None, new_passphrase_file: str | None) -> None:
    """Change the passphrase of the key slot that the current passphrase opens.

    Only that slot is rewritten; no file is touched.
    """
    old = read_passphrase(passphrase_file, "Current passphrase")
    with old:
        vol = unlock_recorded(backing, old)
    try:
        new = read_passphrase(new_passphrase_file, "New passphrase", confirm=True)
        with new, recorded(backing, vol.config, "passwd", target=vol.slot.label):
            set_passphrase(vol, vol.slot, new)
        say(f"passphrase of key slot {vol.slot.id} ({vol.slot.label}) changed")
    finally:
        vol.close()


@click.command()
@click.argument("backing", type=PathArg(file_okay=False))
@passphrase_option()
@reports_errors
def fsck(backing: str, passphrase_file: str | None) -> None:
    """Check every name, header, block, symlink and xattr of a volume.

    Prints one line per damaged item and exits 6 if it found any damage.
    Run it on an unmounted volume.
    """
    pw = read_passphrase(passphrase_file, "Passphrase")
    with pw:
        vol = open_volume(backing, pw)
    try:
        report = fsck_mod.check(vol, on_problem=lambda p: say(f"damaged: {p}"))
    finally:
        vol.close()
    click.echo(f"checked {report.dirs} directories, {report.files} files "
               f"({report.blocks} blocks), {report.symlinks} symlinks: "
               + ("clean" if report.clean else f"{len(report.problems)} problem(s)"))
    if report.sealed:
        click.echo(f"{report.sealed} hybrid file(s) not checked: this passphrase's user is not a "
                   "recipient (the recovery key opens them: cryptfs recover)")
    if not report.clean:
        raise DamageFound(f"{len(report.problems)} damaged item(s) in {backing}")


@click.command()
@click.argument("backing", type=PathArg(file_okay=False))
@click.argument("paths", nargs=-1, metavar="[PATH]...")
@click.option("--recovery-key", "recovery_key", required=True, type=PathArg(dir_okay=False),
              metavar="FILE", help="The recovery key file that `cryptfs init --recovery-key` wrote.")
@click.option("--out", required=True, type=PathArg(file_okay=False),
              help="Write the plaintext here: a new directory (made 0700), or an empty one of "
                   "yours that no one else may enter.")
@reports_errors
def recover(backing: str, paths: tuple[str, ...], recovery_key: str, out: str) -> None:
    """Decrypt the volume in BACKING (or only PATHs in it) with its recovery key.

    The disaster-recovery path: no mount, no user, no passphrase.  PATHs are
    paths inside the volume (e.g. calls/2026 or /customers.csv).  Damaged
    files are listed and not written; the exit code is then 6.
    """
    vol = open_for_recovery(backing, recovery_key)
    try:
        with recorded(backing, vol.config, "recovery", path=list(paths) or ["/"],
                      out=os.path.abspath(out)):
            done = extract(vol, out, [os.fsencode(p) for p in paths],
                           on_problem=lambda p: say(f"damaged: {p}", err=True))
    finally:
        vol.close()
    say(f"recovered {done.files} files ({done.bytes} bytes), {done.dirs} directories, "
        f"{done.symlinks} symlinks into {out}"
        + (f"; {len(done.problems)} problem(s)" if done.problems else ""))
    if done.problems:
        raise DamageFound(f"{len(done.problems)} item(s) could not be recovered"
                          + (f"; no such path in the volume: {', '.join(done.missing)}"
                             if done.missing else ""))
    if done.missing:
        raise UsageError(f"no such path in the volume: {', '.join(done.missing)}",
                         hint="PATHs are named from the volume's root, e.g. calls/2026")


@click.command()
@click.argument("path", type=PathArg(dir_okay=False))
@click.option("--to", "to", multiple=True, metavar="RECIPIENT",
              help="An age X25519 recipient (age1...); repeat for several.")
@click.option("-R", "--recipients-file", "recipients_file", type=PathArg(dir_okay=False),
              help="Recipients, one per line (as age -R).")
@click.option("--out", type=PathArg(dir_okay=False),
              help="Write the age file here (a new file); default: standard output.")
@reports_errors
def export(path: str, to: tuple[str, ...], recipients_file: str | None, out: str | None) -> None:
    """Write PATH, a file on a mounted volume, as a standard age file.

    For handing data outside the volume: any age implementation (`age -d -i
    KEY FILE`) decrypts it with the recipient's key.  The file is read
    through the mount, so its access rules apply to whoever exports.
    """
    texts = list(dict.fromkeys(  # (one recipient given twice counted twice)
        list(to) + (recipients_from_file(recipients_file) if recipients_file else [])))
    recipients = parse_recipients(texts)
    if out is None and sys.stdout.isatty():
        raise UsageError("the age file is binary: give --out FILE or redirect standard output")
    on = volume_of_path(path)
    if on is not None:
        # Recorded by the mount the file is read through, in the log it writes
        # (the exporting user may have no access to the backing directory).
        commands.through_mount(on[0], "export", path=on[1], recipients=texts,
                                   out=os.path.abspath(out) if out else "-",
                                   command=command_name())
    size = export_file(path, recipients, out, sys.stdout.buffer)
    if out is not None:
        say(f"exported {path} ({size} bytes) to {out} for {len(recipients)} recipient(s)")
