"""Entry point of the ``cryptfs`` command."""

from __future__ import annotations

import click

from cryptfs import __version__
from cryptfs.cli import agent, audit, mounting, policy, rotate, users, volume
from cryptfs.cli.common import EXIT_CODE_HELP


@click.group(epilog=EXIT_CODE_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cryptfs")
def cli() -> None:
    """cryptfs: a FUSE filesystem that encrypts every file transparently.

    The backing directory holds only ciphertext; the mountpoint shows
    plaintext to those allowed to see it.
    """


for command in (volume.init, mounting.mount, mounting.unmount, agent.unlock, agent.lock,
                agent.status, users.user, volume.info, volume.fsck, volume.passwd,
                volume.recover, volume.export, policy.policy, policy.share, rotate.rotate, audit.audit):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="cryptfs")


if __name__ == "__main__":
    main()
