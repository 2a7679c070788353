"""Every name of a hard-linked file, and the rules that govern it.

A mask or trusted-programs rule governs the files whose *names* lie under
its directory (cryptfs.policy).  A file with several hard links has several
names, possibly under different rules; it is protected by every rule that
governs any of them (docs/POLICY.md, "Hard links").  This module finds those
names in the backing tree.  It knows nothing of FUSE: it takes the tree's
path, the name codec and the policy.

How a file's names are found (:func:`find_names`):

1. The backing subtrees of the directories whose rule restricts (masks or
   programs) are walked with names decrypted: a rule can only govern a name
   under its directory.  ``os.scandir`` gives each entry's inode number
   without a stat; a match is confirmed with one ``stat`` (device and inode).
2. If that found fewer names than the file's link count, the rest of the
   tree is walked by inode number alone (no decryption): names there lie
   under no restricting rule.
3. A name found under a rule directory whose plaintext is unknown (it, or a
   directory above it, does not decrypt), and a name not found at all (a
   link outside the tree), is *unknown*: callers fail closed for it.

Both walks stop as soon as every link is accounted for.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Generator
from dataclasses import dataclass

from cryptfs import tree
from cryptfs.modes import IntegrityError
from cryptfs.names import NameCodec, is_cryptfs_entry
from cryptfs.policy import MaskRule, Policy, Rule

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_REMEMBERED = 4096  # inodes whose names are cached


@dataclass(frozen=True)
class Names:
    """The names of one file that a restricting rule could govern."""

    found: tuple[tuple[str, str], ...]  # (plaintext directory, plaintext name) under rule dirs
    unknown: int = 0  # names whose place is not known (fail closed for them)

    def masks(self, policy: Policy) -> set[MaskRule]:
        """Every mask that some name falls under."""
        return {m for d, n in self.found if (m := policy.mask_for(d, n)) is not None}

    def programs(self, policy: Policy) -> list[Rule]:
        """Every trusted-programs rule that governs some name; with an unknown
        name, every trusted-programs rule of the policy (any could govern it)."""
        if self.unknown:
            rules = [r for r in policy.rules.values() if r.programs]
        else:
            rules = [r for d, _ in self.found if (r := policy.programs_for(d)) is not None]
        return sorted(set(rules), key=lambda r: r.path)

    def without(self, directory: str, name: str) -> Names:
        """These names but one (what is left after an unlink)."""
        rest = list(self.found)
        if (directory, name) in rest:
            rest.remove((directory, name))
        return Names(tuple(rest), self.unknown)

    def renamed(self, src: str, old: str, dst: str, new: str, policy: Policy) -> Names:
        """These names after ``src/old`` became ``dst/new``: the new one is
        among them if a restricting rule may govern it (as :func:`find_names`
        would have found it)."""
        after = self.without(src, old)
        if any(under(dst, d) for d in restricting_dirs(policy)):
            return Names(after.found + ((dst, new),), after.unknown)
        return after


def restricting_dirs(policy: Policy) -> list[str]:
    """The topmost directories of rules that restrict (masks or programs):
    every name such a rule governs lies under one of them."""
    dirs = sorted(p for p, r in policy.rules.items() if r.masks or r.programs)
    top: list[str] = []
    for p in dirs:
        if not any(under(p, t) for t in top):
            top.append(p)
    return top


def under(path: str, directory: str) -> bool:
    """Whether plaintext ``path`` is ``directory`` or lies below it."""
    return directory == "/" or path == directory or path.startswith(directory + "/")


class _Blind(Exception):
    """A rule's directory exists, maybe, but cannot be reached (a directory
    IV on its way is damaged, or a directory cannot be read)."""


def _plain_dir_rel(root_fd: int, path: str, codec: NameCodec) -> str | None:
    """The backing path (relative to the tree) of plaintext directory ``path``;
    None if there is no such directory."""
    fd = os.dup(root_fd)
    rel = []
    try:
        for part in (p for p in path.split("/") if p):
            backing, _ = codec.backing_name(part.encode("utf-8", "surrogateescape"),
                                            tree.read_diriv(fd))
            sub = os.open(backing, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = sub
            rel.append(backing)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, IntegrityError):
        raise _Blind from None
    finally:
        os.close(fd)
    return "/".join(rel) or "."


Entry = tuple[int, str | None, bytes | None, os.DirEntry[str]]


def _entries(root_fd: int, top: str, top_plain: str | None, codec: NameCodec | None,
             skip: set[tuple[int, int]], skip_rel: frozenset[str] = frozenset()
             ) -> Generator[Entry, None, None]:
    """Every entry that is not a directory at or below ``top`` (a backing path
    relative to ``root_fd``), as (its directory's fd, that directory's
    plaintext path or None if unknown or not asked for, its IV or None, the
    entry).  Directories in ``skip`` (device, inode) or at a backing path in
    ``skip_rel`` are not entered; each one entered is added to ``skip``;
    nothing on another filesystem is."""
    dev = os.fstat(root_fd).st_dev
    stack: list[tuple[str, str | None]] = [(top, top_plain)]
    while stack:
        rel, plain = stack.pop()
        if rel in skip_rel:
            continue
        try:
            fd = os.open(rel, _DIR_FLAGS, dir_fd=root_fd)
        except OSError:
            continue  # (removed meanwhile, or not a directory any more)
        try:
            st = os.fstat(fd)
            if st.st_dev != dev or (st.st_dev, st.st_ino) in skip:
                continue
            skip.add((st.st_dev, st.st_ino))
            diriv: bytes | None = None
            if codec is not None:
                try:
                    diriv = tree.read_diriv(fd)
                except (OSError, IntegrityError):
                    diriv = None  # (names here stay unknown)
            with os.scandir(fd) as it:
                entries = [e for e in it if is_cryptfs_entry(e.name)]
            for e in entries:
                try:
                    is_dir = e.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if not is_dir:
                    yield fd, plain, diriv, e
                    continue
                sub_plain = None
                if plain is not None and diriv is not None and codec is not None:
                    try:
                        p_name = tree.decrypt_entry(fd, e.name, diriv, codec)
                        sub_plain = posixpath.join(plain, p_name.decode("utf-8", "surrogateescape"))
                    except (OSError, IntegrityError):
                        sub_plain = None
                stack.append((e.name if rel == "." else f"{rel}/{e.name}", sub_plain))
        finally:
            os.close(fd)


def _is_it(dir_fd: int, e: os.DirEntry[str], st: os.stat_result) -> bool:
    """Whether entry ``e`` is the file ``st`` (inode from the listing, confirmed by a stat)."""
    try:
        if e.inode() != st.st_ino:
            return False
        here = os.stat(e.name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino)


def _plain_name(dir_fd: int, diriv: bytes | None, e: os.DirEntry[str],
                codec: NameCodec) -> str | None:
    if diriv is None:
        return None
    try:
        return tree.decrypt_entry(dir_fd, e.name, diriv, codec).decode("utf-8", "surrogateescape")
    except (OSError, IntegrityError):
        return None


def find_names(tree_root: str, codec: NameCodec, st: os.stat_result, policy: Policy) -> Names:
    """The names of the file ``st`` (its fstat) under the directories of the
    policy's restricting rules, and how many of its names are unknown."""
    root_fd = os.open(tree_root, _DIR_FLAGS)
    try:
        found: list[tuple[str, str]] = []
        unplaced = 0  # found under a rule directory, but the name or a directory's does not decrypt
        walked: set[tuple[int, int]] = set()
        tops: set[str] = set()
        for d in restricting_dirs(policy):
            try:
                rel = _plain_dir_rel(root_fd, d, codec)
            except _Blind:
                # (names below it cannot be told from names elsewhere: every
                # name not found yet is unknown)
                return Names(tuple(found), max(unplaced, st.st_nlink - len(found)))
            if rel is None:
                continue  # (no such directory: it holds no name)
            tops.add(rel)
            gen = _entries(root_fd, rel, d, codec, walked)
            try:
                for dir_fd, plain, diriv, e in gen:
                    if not _is_it(dir_fd, e, st):
                        continue
                    name = _plain_name(dir_fd, diriv, e, codec) if plain is not None else None
                    if plain is None or name is None:
                        unplaced += 1
                    else:
                        found.append((plain, name))
                    if len(found) + unplaced >= st.st_nlink:
                        return Names(tuple(found), unplaced)
            finally:
                gen.close()
        # The names not found yet: elsewhere in the tree (under no restricting
        # rule), or outside it.  (Nothing below a rule's directory counts as
        # elsewhere, even if it could not be read the first time.)
        outside = 0
        gen = _entries(root_fd, ".", None, None, set(), frozenset(tops))
        try:
            for dir_fd, _, _, e in gen:
                if _is_it(dir_fd, e, st):
                    outside += 1
                    if len(found) + unplaced + outside >= st.st_nlink:
                        break
        finally:
            gen.close()
        return Names(tuple(found), unplaced + max(0, st.st_nlink - len(found) - unplaced - outside))
    finally:
        os.close(root_fd)


class NamesCache:
    """The names found per file, valid while its ctime and link count (a link
    or unlink changes them), the policy object and the mount's own count of
    the renames, links and removals it made stay the same."""

    def __init__(self, enabled: bool = True) -> None:
        self._names: dict[tuple[int, int], tuple[tuple[int, int, int], Policy, Names]] = {}
        self._enabled = enabled  # off: every lookup misses (shared storage)

    def get(self, st: os.stat_result, policy: Policy, epoch: int) -> Names | None:
        if not self._enabled:
            return None
        hit = self._names.get((st.st_dev, st.st_ino))
        if hit is None or hit[0] != (st.st_ctime_ns, st.st_nlink, epoch) or hit[1] is not policy:
            return None
        return hit[2]

    def put(self, st: os.stat_result, policy: Policy, epoch: int, names: Names) -> None:
        if not self._enabled:
            return
        if len(self._names) >= MAX_REMEMBERED:
            self._names.clear()
        self._names[(st.st_dev, st.st_ino)] = ((st.st_ctime_ns, st.st_nlink, epoch), policy, names)

    def restamp(self, before: os.stat_result, after: os.stat_result, policy: Policy,
                epoch: int) -> None:
        """The file's times were set (its ctime moved, its names did not): what
        was known of its names under ``before`` holds under ``after``.  The
        writeback cache writes times back after every rename and write, which
        would otherwise make each next guard walk the tree again."""
        names = self.get(before, policy, epoch)
        if names is not None and after.st_nlink == before.st_nlink:
            self.put(after, policy, epoch, names)

    def drop(self, st: os.stat_result) -> None:
        """Forget what was known of the names of the file ``st``."""
        self._names.pop((st.st_dev, st.st_ino), None)

    def clear(self) -> None:
        self._names.clear()


@dataclass(frozen=True)
class Straddler:
    """A file with several hard links whose names lie both inside and outside a directory."""

    names: tuple[str, ...]  # its plaintext paths that were found and decrypt, sorted
    missing: int  # names not found in the tree or that do not decrypt


def straddling(tree_root: str, codec: NameCodec, directory: str) -> list[Straddler]:
    """Every file with several hard links that has names both under plaintext
    ``directory`` and elsewhere (or somewhere unknown: a name outside the
    tree, or one that does not decrypt)."""
    root_fd = os.open(tree_root, _DIR_FLAGS)
    files: dict[tuple[int, int], tuple[int, list[str | None]]] = {}
    try:
        for dir_fd, plain, diriv, e in _entries(root_fd, ".", "/", codec, set()):
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
                continue
            name = _plain_name(dir_fd, diriv, e, codec) if plain is not None else None
            path = posixpath.join(plain, name) if plain is not None and name is not None else None
            files.setdefault((st.st_dev, st.st_ino), (st.st_nlink, []))[1].append(path)
    finally:
        os.close(root_fd)
    out = []
    for nlink, paths in files.values():
        known = sorted(p for p in paths if p is not None)
        missing = nlink - len(known)
        inside = any(under(p, directory) for p in known)
        outside = any(not under(p, directory) for p in known)
        if inside and (outside or missing):
            out.append(Straddler(tuple(known), missing))
    return sorted(out, key=lambda s: s.names)
