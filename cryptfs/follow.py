"""Following the volume's config while running: one home for the mount and the key agent.

A running mount and a running key agent each hold one key generation of a
volume and the config they read.  Commands change the config underneath
them (a user added, removed or revoked, a policy set, a key rotated), on
this server or on another one that shares the backing storage.  This
module is what both use to notice and follow such a change:

- the config's **stamp**, ``(inode, mtime_ns, size, ctime_ns)`` of
  ``cryptfs.conf``: a config writer replaces the file (new inode); ctime is
  in too, because a writer can set the mtime back and keep inode and size;
- **when to look**: on the requests that depend on the config (a stat),
  and every ``CHECK_EVERY`` seconds from a timer, so an idle mount follows
  too; :func:`changed` says whether to read it.  Inotify is not used: it
  does not see another host's writes on shared storage;
- **re-reading and authenticating** the config under the held key
  (:func:`reopen`), and **following a rotation** (:func:`follow`): a newer
  generation is opened through a user key this process holds and followed
  only if a holder of the held generation made it, directly or through
  generations in between (``VolumeConfig.follows``: ``chain`` and the signed
  ``lineage``), so neither a config put back from earlier nor one forged by
  a removed user is followed.

The bound this gives is in docs/MULTISERVER.md ("Administration reaches
every server").  No trio and no FUSE here; the only I/O is a stat and a
read of the config through a descriptor of the backing directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from cryptfs.config import CONFIG_NAME, load_config_at, user_authority
from cryptfs.errors import CryptfsError, NotAVolume
from cryptfs.keys import VolumeKeys
from cryptfs.secret import Secret

if TYPE_CHECKING:
    from cryptfs.config import Slot, VolumeConfig

CHECK_EVERY = 1.0  # seconds between looks at the config's stamp (a mount, the key agent)
BOUND = 3.0  # seconds: an admin change is in effect on every running mount within this
SETTLE = BOUND  # seconds a rotation's walk keeps the old generation at least (other servers follow)

Stamp = tuple[int, int, int, int]


def stamp_at(dir_fd: int) -> Stamp:
    """The config's stamp in the backing directory open as ``dir_fd`` (OSError
    if it cannot be stat'ed, e.g. FileNotFoundError)."""
    st = os.stat(CONFIG_NAME, dir_fd=dir_fd, follow_symlinks=False)
    return st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns


def stamp_or_none(dir_fd: int) -> Stamp | None:
    """The stamp, or None if there is none to be had (None never equals a stamp)."""
    try:
        return stamp_at(dir_fd)
    except OSError:
        return None


def read_at(dir_fd: int, where: str) -> tuple[Stamp | None, VolumeConfig]:
    """The config and the stamp it was read under, taken first: a change made
    while it is read shows as another stamp at the next look.  NotAVolume if
    there is no config (or it cannot be parsed)."""
    stamp = stamp_or_none(dir_fd)
    if stamp is None:
        try:
            os.stat(CONFIG_NAME, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise NotAVolume(f"{where} is not a cryptfs volume (no {CONFIG_NAME})") from None
        except OSError as e:
            raise NotAVolume(f"{where}/{CONFIG_NAME}: {e.strerror}") from None
    return stamp, load_config_at(dir_fd, where)


def changed(known: Stamp | None, now: Stamp | None) -> bool:
    """Whether the config is not the version last used (``known``; None: none
    known yet, or forgotten so that it is read again).  A config that cannot
    be stat'ed (``now`` None) counts as changed only from a known stamp, so
    a storage outage is noticed once, not on every request."""
    return now != known


Holder = tuple["Slot | None", Secret]  # a user key this process holds, and its slot in a config


def follow(fresh: VolumeConfig, since: VolumeKeys, holders: Iterable[Holder]) -> tuple[VolumeKeys, int]:
    """The keys of ``fresh``, a newer generation than ``since``, opened through
    the first of ``holders`` (user keys, each with its slot in ``fresh``)
    whose slot opens it and which shows that a holder of ``since`` made it.
    Returns the keys and the index of that holder.

    NotAVolume: a held user key opens it, but it does not descend from
    ``since`` (put back from earlier, or forged): not to be followed.
    CryptfsError: no held user key opens it (yet)."""
    opened_any = False
    for i, (slot, private) in enumerate(holders):
        opened = fresh.slot_master(slot, private) if slot is not None else None
        if opened is None:
            continue
        opened_any = True
        with opened.master:
            try:
                keys = fresh.open_keys(opened.master, user_authority(private.reveal()))
            except CryptfsError:
                continue
        if fresh.follows(since, keys):
            return keys, i
        keys.close()
    if opened_any:
        raise NotAVolume("its key generation was not made by a holder of the current one "
                         "(a config put back from earlier, or forged): not followed")
    raise CryptfsError("its key was rotated and no key slot whose user key is held here has "
                       "the new one")


def descends(fresh: VolumeConfig, since: VolumeKeys, master: Secret, authority: bytes) -> bool:
    """Whether ``master`` (with the opener's ``authority`` key) authenticates
    ``fresh`` and a holder of ``since`` made that generation."""
    try:
        new = fresh.open_keys(master, authority)
    except CryptfsError:
        return False
    try:
        return bool(fresh.follows(since, new))
    finally:
        new.close()


def reopen(fresh: VolumeConfig, volume_id: bytes, held: VolumeKeys,
           holders: Callable[[], Iterable[Holder]]) -> VolumeKeys:
    """The keys under which ``fresh`` (the config re-read) is used from now on:
    the held generation's, if it still is that one (authenticated with it),
    else the rotated one's (:func:`follow`).  CryptfsError (NotAVolume if it
    must never be followed) if it cannot be used."""
    if fresh.volume_id != volume_id:
        raise NotAVolume("the backing directory holds another volume now")
    if fresh.key_id == held.key_id:
        return fresh.open_keys(held.master)
    if fresh.key_id < held.key_id:
        raise NotAVolume(f"its key generation ({fresh.key_id}) is older than the one held "
                         f"({held.key_id}): put back from earlier, not followed")
    keys, _ = follow(fresh, held, holders())
    return keys
