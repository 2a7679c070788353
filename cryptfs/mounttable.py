"""The mount table: which cryptfs mounts there are, read from /proc/self/mountinfo.

A cryptfs mount names its volume in the source field as ``cryptfs:<real
path of the backing directory>`` (cryptfs.mount.fuse_options).  Pure
reading: a command may ask where a volume is mounted without loading the
filesystem.
"""

from __future__ import annotations

import os
import re

from cryptfs.errors import UsageError

_OCTAL = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    """A mountinfo field: space, tab, newline and backslash are written as \\ooo."""
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8) & 0xFF]), field))


_USER_ID = re.compile(rb"(?:^|,)user_id=(\d+)(?:,|$)")


def _mountinfo() -> list[tuple[str, str, str, int | None]]:
    """(mountpoint, fstype, source, maker) of every mount in /proc/self/mountinfo;
    ``maker`` is the uid that made a FUSE mount (its ``user_id=`` super option:
    the kernel's, which no mount can choose for itself), None for the others."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            left, _, right = line.partition(b" - ")
            fields, rfields = left.split(), right.split()
            if len(fields) < 5 or len(rfields) < 2:
                continue
            maker = None
            if rfields[0].startswith(b"fuse") and len(rfields) >= 3:
                m = _USER_ID.search(rfields[2])
                maker = int(m.group(1)) if m else None
            out.append((_unescape(fields[4]), os.fsdecode(rfields[0]), _unescape(rfields[1]),
                        maker))
    return out


def mounts() -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, source) from /proc/self/mountinfo."""
    return [(mp, fstype, source) for mp, fstype, source, _ in _mountinfo()]


def mounts_of_backing(backing: str) -> list[str]:
    """The mountpoints where cryptfs mounts ``backing`` on this host (found by its
    real path, whatever path names it).

    The source field names the backing directory, but any user may mount a
    FUSE filesystem of their own that names any directory there
    (``fusermount3 -o fsname=cryptfs:/srv/backing``): such a mount would make
    root's commands refuse the real mount, or talk to it instead.  So only a
    mount made by root, or by the owner of the backing directory (who may
    mount it), counts."""
    real = os.path.realpath(backing)
    want = "cryptfs:" + real
    found = [(mp, maker) for mp, fstype, source, maker in _mountinfo()
             if source == want and fstype.startswith("fuse")]
    if not found:
        return []
    try:
        owner = os.stat(real).st_uid
    except OSError:
        owner = 0
    return [mp for mp, maker in found if maker in (0, owner)]


def mount_of_backing(backing: str) -> str | None:
    """The mountpoint where ``backing`` is mounted by cryptfs, if it is.  Refused
    if it is mounted more than once: only one mount can walk the files, and the
    others would keep old keys and file keys."""
    found = mounts_of_backing(backing)
    if len(found) > 1:
        raise UsageError(f"{backing} is mounted {len(found)} times ({', '.join(found)}): "
                         "unmount all but one, then rotate")
    return found[0] if found else None


def within(path: str, top: str) -> bool:
    """Whether ``path`` is ``top`` or below it.  Both must be resolved already
    (os.path.realpath): resolving here would stat every mount point a caller
    loops over, and a FUSE mount nobody answers would hang it."""
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def volume_of_path(path: str) -> tuple[str, str] | None:
    """(mountpoint, path inside the volume) of a path on a cryptfs mount, or
    None if it is on none."""
    where = os.path.realpath(path)
    best: tuple[str, str] | None = None
    for mp, fstype, source in mounts():
        if not (fstype.startswith("fuse") and source.startswith("cryptfs:")):
            continue
        if within(where, mp):
            if best is None or len(mp) > len(best[0]):
                best = (mp, source)
    if best is None:
        return None
    return best[0], "/" + os.path.relpath(where, best[0]).removeprefix(".")


def is_fuse_mount(mnt: str, fstype: str | None = None) -> bool:
    for mp, typ, _src in mounts():
        if mp == mnt and (typ == fstype if fstype else typ.startswith("fuse")):
            return True
    return False


def backing_of(path: str) -> str:
    """The backing directory of the cryptfs mount on ``path``, or ``path`` itself
    (real) if no cryptfs is mounted there."""
    real = os.path.realpath(path)
    for mp, fstype, source in mounts():
        if mp == real and fstype.startswith("fuse") and source.startswith("cryptfs:"):
            return source.split(":", 1)[1]
    return real
