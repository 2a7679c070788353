"""init, info, passwd, fsck: commands on a backing directory."""

from __future__ import annotations

import click

from cryptfs import fsck as fsck_mod
from cryptfs.cli.common import passphrase_option, read_passphrase, reports_errors
from cryptfs.config import DEFAULT_MEM_KIB, DEFAULT_OPS, FORMAT_VERSION, Kdf, load_config
from cryptfs.errors import DamageFound
from cryptfs.modes import CONTENT_MODES
from cryptfs.volume import change_passphrase, init_volume, open_volume

MODE_NAMES = [m.name for m in CONTENT_MODES.values()]


def kdf_options(fn):  # type: ignore[no-untyped-def]
    fn = click.option("--kdf-iterations", type=click.IntRange(1, 64), default=DEFAULT_OPS,
                      show_default=True, help="Argon2id passes.")(fn)
    fn = click.option("--kdf-memory", type=click.IntRange(8, 4096), default=DEFAULT_MEM_KIB // 1024,
                      show_default=True, metavar="MIB",
                      help="Argon2id memory per unlock, in MiB.")(fn)
    return fn


@click.command()
@click.argument("backing", type=click.Path(file_okay=False))
@click.option("--mode", type=click.Choice(MODE_NAMES), default="aes-256-gcm", show_default=True,
              help="Default content cipher for new files.")
@passphrase_option()
@kdf_options
@reports_errors
def init(backing: str, mode: str, passphrase_file: str | None, kdf_memory: int,
         kdf_iterations: int) -> None:
    """Create a new encrypted volume in BACKING (a new or empty directory).

    Asks for the passphrase of the first key slot twice (unless
    --passphrase-file is given).
    """
    pw = read_passphrase(passphrase_file, "New volume passphrase", confirm=True)
    with pw:
        vol = init_volume(backing, mode, pw, Kdf(kdf_iterations, kdf_memory * 1024))
    vol.close()
    click.echo(f"created cryptfs volume {vol.config.volume_id.hex()} in {backing} "
               f"(mode {mode}, key slot 0)")


@click.command()
@click.argument("backing", type=click.Path(file_okay=False))
@reports_errors
def info(backing: str) -> None:
    """Show a volume's format, mode, key slots and KDF cost (no secrets).

    Needs no passphrase, so nothing shown here is authenticated; fsck checks it.
    """
    cfg = load_config(backing)
    click.echo(f"volume id:     {cfg.volume_id.hex()}")
    click.echo(f"format:        cryptfs version {FORMAT_VERSION}")
    click.echo(f"created:       {cfg.created}")
    click.echo(f"default mode:  {cfg.default_mode}")
    click.echo(f"features:      {', '.join(cfg.features)}")
    click.echo(f"key id:        {cfg.key_id}")
    click.echo(f"default KDF:   argon2id, {cfg.kdf.ops} passes, {cfg.kdf.mem_kib // 1024} MiB")
    click.echo(f"key slots:     {len(cfg.slots)}")
    for s in cfg.slots:
        extra = "".join(f", {k}={v}" for k, v in sorted(s.extra.items()))
        click.echo(f"  slot {s.id}: {s.label} (created {s.created}; argon2id {s.kdf.ops} passes, "
                   f"{s.kdf.mem_kib // 1024} MiB{extra})")


@click.command()
@click.argument("backing", type=click.Path(file_okay=False))
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
        vol = open_volume(backing, old)
    try:
        new = read_passphrase(new_passphrase_file, "New passphrase", confirm=True)
        with new:
            change_passphrase(vol, new)
        click.echo(f"passphrase of key slot {vol.slot.id} ({vol.slot.label}) changed")
    finally:
        vol.close()


@click.command()
@click.argument("backing", type=click.Path(file_okay=False))
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
        report = fsck_mod.check(vol, on_problem=lambda p: click.echo(f"damaged: {p}"))
    finally:
        vol.close()
    click.echo(f"checked {report.dirs} directories, {report.files} files "
               f"({report.blocks} blocks), {report.symlinks} symlinks: "
               + ("clean" if report.clean else f"{len(report.problems)} problem(s)"))
    if not report.clean:
        raise DamageFound(f"{len(report.problems)} damaged item(s) in {backing}")
