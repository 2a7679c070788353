"""Operations on the backing tree that both the filesystem and fsck need.

Everything takes directory file descriptors (O_PATH is enough where noted)
and backing names; nothing here knows about FUSE.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from cryptfs import sysio
from cryptfs.modes import IntegrityError
from cryptfs.modes.rand import random_bytes
from cryptfs.names import (
    DIRIV_LEN,
    DIRIV_NAME,
    LONG_PREFIX,
    LONG_SUFFIX,
    TMP_PREFIX,
    NameCodec,
    is_cryptfs_entry,
    long_name,
    new_diriv,
)

O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def proc_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def open_dir(path_fd: int) -> int:
    """A readable directory fd from an O_PATH one."""
    return os.open(proc_path(path_fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def write_diriv(dir_fd: int, diriv: bytes | None = None) -> bytes:
    diriv = diriv or new_diriv()
    fd = os.open(DIRIV_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444,
                 dir_fd=dir_fd)
    try:
        sysio.write_all(fd, diriv)
    finally:
        os.close(fd)
    return diriv


def read_diriv(dir_fd: int) -> bytes:
    """The directory's IV; ``dir_fd`` may be O_PATH."""
    try:
        fd = os.open(DIRIV_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        raise IntegrityError("directory IV missing") from None
    try:
        iv = os.read(fd, DIRIV_LEN + 1)
    finally:
        os.close(fd)
    if len(iv) != DIRIV_LEN:
        raise IntegrityError("directory IV has the wrong length")
    return iv


def write_long_name(dir_fd: int, backing: str, c_name: str) -> bool:
    """Store the full encrypted name of a long-name entry beside it (atomically).

    Returns True when the side file did not exist before, so that a caller
    whose operation then fails knows to remove it again.
    """
    side = backing + LONG_SUFFIX
    try:
        os.stat(side, dir_fd=dir_fd, follow_symlinks=False)
        existed = True
    except FileNotFoundError:
        existed = False
    sysio.replace_file_at(dir_fd, side, c_name.encode("ascii"), 0o444,
                          f"{TMP_PREFIX}{random_bytes(8).hex()}{LONG_SUFFIX}")
    return not existed


def remove_long_name(dir_fd: int, backing: str, c_name: str | None = None) -> None:
    """Remove a long-name entry's side file.  Given ``c_name`` (what the side
    file holds), put it back if the entry exists by then: another mount of
    the same backing directory (another server) may have made that name
    meanwhile, and the side file is the same whoever writes it."""
    if backing.startswith(LONG_PREFIX):
        if c_name is not None and _exists(dir_fd, backing):
            return  # (made again by another mount already: the side file is its)
        try:
            os.unlink(backing + LONG_SUFFIX, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        if c_name is not None:
            keep_long_name(dir_fd, backing, c_name)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def keep_long_name(dir_fd: int, backing: str, c_name: str) -> None:
    """Write the side file of an existing long-name entry if it is missing.

    With two mounts of one backing directory, every operation that removes a
    side file checks the entry afterwards and every one that makes an entry
    checks the side file afterwards: whichever comes last puts it back."""
    if _exists(dir_fd, backing) and not _exists(dir_fd, backing + LONG_SUFFIX):
        write_long_name(dir_fd, backing, c_name)


def read_long_name(dir_fd: int, backing: str) -> str:
    try:
        fd = os.open(backing + LONG_SUFFIX, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        raise IntegrityError("long name file missing") from None
    try:
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        c_name = raw.decode("ascii")
    except UnicodeDecodeError:
        raise IntegrityError("long name file is not ASCII") from None
    if long_name(c_name) != backing:
        raise IntegrityError("long name file does not match its entry")
    return c_name


def decrypt_entry(dir_fd: int, backing: str, diriv: bytes, codec: NameCodec) -> bytes:
    c_name = read_long_name(dir_fd, backing) if backing.startswith(LONG_PREFIX) else backing
    return codec.decrypt(c_name, diriv)


def plain_path(root: str, dir_fd: int, codec: NameCodec) -> bytes | None:
    """The plaintext path (``/a/b``) of the directory open as ``dir_fd`` in the
    tree whose real path is ``root``; None if it is no longer in the tree
    (removed) or a name does not decrypt."""
    real = os.readlink(proc_path(dir_fd))
    rel = os.path.relpath(real, root)
    if rel == ".":
        return b"/"
    if rel.startswith("..") or real.endswith(" (deleted)"):
        return None
    out = []
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in rel.split("/"):
            out.append(decrypt_entry(fd, part, read_diriv(fd), codec))
            sub = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW,
                          dir_fd=fd)
            os.close(fd)
            fd = sub
    except (OSError, IntegrityError):
        return None
    finally:
        os.close(fd)
    return b"/" + b"/".join(out)


def list_entries(list_fd: int) -> list[str]:
    """Backing names of user entries (skips .diriv, side files, temporaries)."""
    return [n for n in os.listdir(list_fd) if is_cryptfs_entry(n)]


def make_dir(parent_fd: int, backing: str, mode: int, owner: tuple[int, int] | None) -> bytes:
    """Create a directory with its IV, atomically: build it under a temporary
    name, then rename it into place.  Returns the new directory's IV."""
    tmp = temp_name()
    os.mkdir(tmp, 0o700, dir_fd=parent_fd)
    try:
        dfd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=parent_fd)
        try:
            diriv = write_diriv(dfd)
            if owner is not None:
                os.fchown(dfd, owner[0], owner[1])
            os.fchmod(dfd, mode & 0o7777)
        finally:
            os.close(dfd)
        _rename_new(parent_fd, tmp, backing)
    except BaseException:
        remove_empty_dir(parent_fd, tmp)
        raise
    return diriv


def temp_name() -> str:
    """A backing name for an entry under construction (hidden from listings)."""
    return f"{TMP_PREFIX}{random_bytes(8).hex()}"


def _no_noreplace(e: OSError) -> bool:
    return e.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


def publish(dir_fd: int, tmp: str, backing: str) -> None:
    """Give the finished non-directory ``tmp`` its name, never over an entry
    that appeared meanwhile (another server made the same name): EEXIST then,
    and ``tmp`` stays for the caller to remove."""
    try:
        sysio.renameat2(dir_fd, tmp, dir_fd, backing, sysio.RENAME_NOREPLACE)
        return
    except OSError as e:
        if not _no_noreplace(e):
            raise
    # (a backing filesystem without RENAME_NOREPLACE: link(2) never replaces)
    os.link(tmp, backing, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    os.unlink(tmp, dir_fd=dir_fd)


def _rename_new(dir_fd: int, tmp: str, backing: str) -> None:
    """Rename a new directory into place, never over an entry that appeared
    meanwhile (another server's mkdir of the same name): EEXIST then."""
    try:
        sysio.renameat2(dir_fd, tmp, dir_fd, backing, sysio.RENAME_NOREPLACE)
        return
    except OSError as e:
        if not _no_noreplace(e):
            raise
    try:  # (a backing filesystem without RENAME_NOREPLACE)
        os.rename(tmp, backing, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST)) from None
        raise


@contextlib.contextmanager
def _emptied(parent_fd: int, backing: str) -> Iterator[None]:
    """Remove the IV of a backing directory that holds nothing else, for an
    rmdir or rename-over inside the block; put it back if the block fails."""
    dfd = os.open(backing, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW,
                  dir_fd=parent_fd)
    try:
        names = os.listdir(dfd)
        if any(n != DIRIV_NAME for n in names):
            raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY))
        diriv = None
        if names:
            try:
                diriv = read_diriv(dfd)
            except IntegrityError:
                diriv = None  # a damaged IV is not worth restoring
            os.unlink(DIRIV_NAME, dir_fd=dfd)
        try:
            yield
        except OSError:
            if diriv is not None:
                write_diriv(dfd, diriv)
            raise
    finally:
        os.close(dfd)


def remove_empty_dir(parent_fd: int, backing: str) -> None:
    """rmdir a backing directory that holds only its IV."""
    with _emptied(parent_fd, backing):
        os.rmdir(backing, dir_fd=parent_fd)


def rename_over(old_dir_fd: int, old: str, new_dir_fd: int, new: str) -> None:
    """rename(2), where replacing an empty directory first removes its IV."""
    try:
        target = os.stat(new, dir_fd=new_dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        target = None
    if target is None or not stat.S_ISDIR(target.st_mode):
        os.rename(old, new, src_dir_fd=old_dir_fd, dst_dir_fd=new_dir_fd)
        return
    with _emptied(new_dir_fd, new):
        os.rename(old, new, src_dir_fd=old_dir_fd, dst_dir_fd=new_dir_fd)
