"""Entry point of the ``cryptfs`` command."""

from __future__ import annotations

import os
import sys

import click

from cryptfs import __version__
from cryptfs.cli import agent, audit, mounting, policy, rotate, users, volume
from cryptfs.cli.common import EXIT_CODE_HELP
from cryptfs.errors import BackingIOError


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
    try:
        cli(prog_name="cryptfs", standalone_mode=True)
        # (what a command printed is flushed here, where a failure can still be
        # told: at the interpreter's exit a full disk was silently ignored)
        sys.stdout.flush()
    except OSError as e:  # --help or --version onto a full disk, or a late flush
        _stdout_failed(e)
    except SystemExit as e:
        try:
            sys.stdout.flush()
        except OSError as e2:
            _stdout_failed(e2)
        raise e


def _stdout_failed(e: OSError) -> None:
    try:
        sys.stderr.write(f"cryptfs: error: cannot write standard output: {e.strerror or e}\n")
    except OSError:
        pass
    os._exit(BackingIOError.exit_code)  # (no second flush of the same full buffer)


if __name__ == "__main__":
    main()
