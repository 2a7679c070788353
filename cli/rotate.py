"""cryptfs rotate: new key generations, offline or through the live mount."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import click

from cryptfs import control
from cryptfs import rotate as rot
from cryptfs.cli.common import (
    passphrase_option,
    read_passphrase,
    recorded,
    reports_errors,
    require_role,
    say,
    unlock_recorded,
)
from cryptfs.cli.params import PathArg
from cryptfs.errors import BackingIOError, CryptfsError, DamageFound, MountError, UsageError
from cryptfs.mounttable import mount_of_backing
from cryptfs.presence import ANOTHER_MOUNT
from cryptfs.recovery import read_key_file, unlock_with_recovery_key
from cryptfs.secret import Secret
from cryptfs.volume import UnlockedVolume, Volume

WAIT_FOR_MOUNT = 30.0  # seconds for a mount to take up a new key generation


class RotationIncomplete(CryptfsError):
    exit_code = 1


class Meter:
    """Progress with an ETA on a terminal (standard error); nothing in a pipe."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.shown = False

    def __call__(self, p: rot.Progress | dict[str, Any]) -> None:
        if not self.tty:
            return
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        d = p.to_json() if isinstance(p, rot.Progress) else p
        done, total, elapsed = int(d["done"]), int(d["total"]), float(d["elapsed"])
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = f"{(total - done) / rate:.0f} s" if rate > 0 and total else "?"
        pct = 100 * done / total if total else 100
        sys.stderr.write(f"\r{self.kind}: {done}/{total} files ({pct:.0f}%), "
                         f"{int(d['bytes']) / 2**20:.1f} MiB, ETA {eta}   ")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


def run_rotation(vol: UnlockedVolume, kind: str, recovery: Secret | None,
                 new_generation: bool = False) -> None:
    """Start (or resume) a rotation of ``kind`` on an opened volume and carry it
    out: through the mount if the volume is mounted, else here."""
    mnt = mount_of_backing(vol.backing)
    hold = None
    alone = False
    if mnt is None:
        hold = rot.hold_volume(vol.backing, exclusive=True)
        alone = True
        done = rot.replay_journal(vol.backing)
        if done:
            say(done)
    elif rot.reencrypts(vol.config, kind, new_generation):
        # (before anything changes; resuming an unfinished re-encryption changes
        # nothing in the config, and the mount checks for itself when asked to walk)
        _hold_alone(mnt, continues=kind != "reencrypt")
        alone = True
    try:
        made = rot.begin(vol, kind, new_generation, alone=alone)
        running = vol.config.rotation["kind"] if vol.config.rotation else kind
        click.echo(("new" if made else "resuming: the unfinished rotation to") +
                   f" key generation {vol.config.key_id} ({running})")
        started = time.monotonic()
        meter = Meter(running)
        prog: dict[str, Any]
        idle: dict[str, Any] = {"state": "finished", "total": 0, "done": 0, "changed": 0, "bytes": 0,
                "message": ""}
        if mnt is not None:
            # (--slots has nothing to walk: the mount is only told at once, if it
            # can take the new generation now; else it does when a user unlocks.)
            prog = _through_mount(mnt, meter, wait=running != "slots") or idle
        elif running == "slots":
            prog = idle
        else:
            privates = [vol.private_key.reveal()] if vol.private_key is not None else []
            if recovery is not None:
                privates.append(recovery.reveal())
            p = rot.walk(vol, running, vol.keys.keyring(privates), on_progress=meter)
            prog = p.to_json()
        meter.close()
    finally:
        if hold is not None:
            os.close(hold)
        if mnt is not None and alone:
            # (ignored by the mount while the walk runs, which gives the volume
            # back when it ends; a walk that re-encrypts makes the mount hold
            # it alone again anyway, so this never lets one run unguarded)
            with contextlib.suppress(OSError):
                control.release_alone(mnt)
    elapsed = time.monotonic() - started
    if running != "slots" or mnt is not None:
        files = int(prog.get("done", 0))
        rate = f"{files / elapsed:.0f} files/s" if elapsed > 0 else "-"
        where = f" through the mount on {mnt}" if mnt else ""
        if running == "reencrypt":
            mib = int(prog.get("bytes", 0)) / 2**20
            click.echo(f"{running}: {files} file(s) looked at, {prog.get('changed', 0)} "
                       f"re-encrypted, {mib:.1f} MiB in {elapsed:.1f} s ({rate}, "
                       f"{mib / elapsed if elapsed > 0 else 0:.1f} MiB/s){where}")
        else:
            click.echo(f"{running}: {files} file(s) looked at, {prog.get('changed', 0)} "
                       f"header(s) re-wrapped in {elapsed:.1f} s ({rate}){where}")
    state = prog.get("state")
    if state == "failed":
        raise MountError(f"the rotation failed in the mount: {prog.get('message')}",
                         hint="run cryptfs rotate again to resume")
    if state == "finished":
        if running != "slots" or mnt is not None:
            click.echo("done: the old key generations are forgotten")
        else:
            click.echo("done: new files use the new generation; existing files keep theirs "
                       "(--wrap-key re-wraps them)")
        return
    click.echo(("the old key generations are forgotten, but not everything was done:"
                if prog.get("forgotten") else
                "not finished: the old key generations are kept until it is:"), err=True)
    for e in prog.get("examples") or []:
        say(f"  not done: {e}", err=True)
    if int(prog.get("failed", 0)):
        raise BackingIOError(f"rotation incomplete: {prog.get('message')}")
    if int(prog.get("damaged", 0)):
        raise DamageFound(f"rotation incomplete: {prog.get('message')}",
                          hint="fsck the volume; run cryptfs rotate again to finish")
    raise RotationIncomplete(f"rotation {state}: {prog.get('message')}",
                             hint="to include those hybrid files, rotate offline with "
                                  "--recovery-key" if int(prog.get("skipped", 0)) else
                                  "run the same command again")


def _alone_refused(mnt: str, changed: bool, continues: bool = False) -> UsageError:
    return UsageError(
        ("this command would continue the unfinished re-encryption of the volume, and it "
         if continues else "") +
        f"cannot re-encrypt: {ANOTHER_MOUNT}, and a server that has the volume mounted "
        "would keep the old file keys and write blocks that no longer authenticate: "
        + ("the re-encryption stays recorded as unfinished in the config, and no file was "
           "re-encrypted" if changed else "nothing was changed"),
        hint="unmount the volume on every other server, then run the command again here "
             f"(the mount on {mnt}); --wrap-key is safe while they serve")


def _hold_alone(mnt: str, continues: bool) -> None:
    """Have the mount on ``mnt`` hold the volume alone for a re-encryption."""
    try:
        control.hold_alone(mnt)
    except OSError as e:
        if e.errno == errno.EUSERS:
            raise _alone_refused(mnt, changed=False, continues=continues) from None
        raise MountError(f"the mount on {mnt} cannot hold the volume alone for a "
                         f"re-encryption: {e.strerror}",
                         hint="an older cryptfs mount? remount it with this version"
                         if e.errno == errno.EINVAL else "try again") from None


def _through_mount(mnt: str, meter: Meter, wait: bool = True) -> dict[str, Any] | None:
    """Ask the mount on ``mnt`` to walk its files; follow its progress.  None
    if it does not hold the new generation and ``wait`` is false."""
    deadline = time.monotonic() + WAIT_FOR_MOUNT
    while True:
        try:
            control.start_rotation(mnt)
            break
        except OSError as e:
            # EBUSY: the mount has not got the new key yet (an agent mount gets
            # it from the agent, or reads the config itself, every second).
            if e.errno == errno.EBUSY and not wait:
                return None
            if e.errno == errno.EBUSY and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            if e.errno == errno.EUSERS:  # (a walk that re-encrypts, and another server came)
                raise _alone_refused(mnt, changed=True) from None
            raise MountError(f"the mount on {mnt} refused the rotation: {e.strerror}",
                             hint="is a user with a key slot unlocked there?") from None
    while True:
        try:
            prog = control.rotation_progress(mnt)
        except OSError as e:
            raise MountError(f"lost the mount on {mnt} during the rotation: {e.strerror}",
                             hint="run cryptfs rotate again to finish") from None
        if prog.get("state") != "running":
            return prog
        meter(prog)
        time.sleep(0.1)


@click.command()
@click.argument("backing", type=PathArg(file_okay=False))
@click.option("--slots", "kinds", flag_value="slots", multiple=True,
              help="New master key for every key slot and the recovery key (O(users)); "
                   "existing files keep the old generation.")
@click.option("--wrap-key", "kinds", flag_value="wrap-key", multiple=True,
              help="New master key, and every file header re-wrapped under it; no content "
                   "is rewritten.  Afterwards an old master opens no file key.")
@click.option("--reencrypt", "kinds", flag_value="reencrypt", multiple=True,
              help="New master key and a new key for every file: every block is rewritten.")
@click.option("--recovery-key", "recovery_key", type=PathArg(dir_okay=False), metavar="FILE",
              help="The recovery key file: lets an offline rotation open hybrid files that "
                   "your user is not a recipient of.")
@passphrase_option()
@reports_errors
def rotate(backing: str, kinds: tuple[str, ...], recovery_key: str | None,
           passphrase_file: str | None) -> None:
    """Rotate the keys of the volume in BACKING.

    Works offline and while mounted: a mounted volume is walked by its mount
    (users keep working; each file is rotated between their requests).  A
    run that is interrupted (even by SIGKILL) loses nothing; running the same
    command again finishes it.  Shows progress with an ETA on a terminal.
    """
    if len(set(kinds)) != 1:  # (none, or two: the last one given used to win silently)
        raise click.UsageError("choose one of --slots, --wrap-key, --reencrypt")
    kind = kinds[0]
    if kind == "slots" and recovery_key is not None:  # (it had no effect)
        raise click.UsageError("--recovery-key serves a rotation that walks the files "
                               "(--wrap-key, --reencrypt), not --slots")
    with opened_for_rotation(backing, passphrase_file, "Passphrase", recovery_key) as (vol, recovery):
        require_role(backing, vol, "rotation", "rotate keys")
        with recorded(backing, vol.config, "rotation", kind=kind):
            run_rotation(vol, kind, recovery)


@contextlib.contextmanager
def opened_for_rotation(backing: str, passphrase_file: str | None, prompt: str,
                        recovery_key: str | None) -> Iterator[tuple[Volume, Secret | None]]:
    """The volume opened with a passphrase, and the recovery key of
    ``recovery_key`` (checked against it) if given; both wiped afterwards."""
    recovery, vid = None, b""
    if recovery_key is not None:
        vid, recovery = read_key_file(recovery_key)
    try:
        pw = read_passphrase(passphrase_file, prompt)
        with pw:
            vol = unlock_recorded(backing, pw)
        try:
            if recovery is not None:
                unlock_with_recovery_key(vol.config, vid, recovery).close()
            yield vol, recovery
        finally:
            vol.close()
    finally:
        if recovery is not None:
            recovery.wipe()
