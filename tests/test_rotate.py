"""Key rotation: `cryptfs rotate --slots | --wrap-key | --reencrypt` and `user remove --revoke`.

Every test checks content, not exit codes alone: the sha256 of every file
through a mount, fsck, the config's key generations, and the backing files
byte by byte (which bytes a rotation may change and which it must not).

* offline rotations of a volume with files of every shape;
* revocation: a saved copy of the old config plus the removed user's
  passphrase must open no file key afterwards (and does before: the control);
* re-encryption: file keys taken before it decrypt no block afterwards;
* SIGKILL at random moments (offline walk, the mount daemon, the CLI that
  follows the mount), then finishing by running the command again;
* users writing through the mount during a mounted re-encryption;
* progress on a terminal, quiet in a pipe; v1 slots; bad input.

Random kill moments come from one seed, printed (and taken from
CRYPTFS_TEST_SEED when set, to replay a failure).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CRYPTFS, PASSPHRASE, Mount, make_volume, new_mount, run_cli
from cryptfs import rotate as rot
from cryptfs.config import VolumeConfig
from cryptfs.content import ContentFile
from cryptfs.errors import NotAVolume
from cryptfs.header import FLAG_SPARSE, MAC_LEN, PREFIX, PREFIX_LEN, FileHeader, peek
from cryptfs.modes import BLOCK_SIZE, IntegrityError, NotForMe
from cryptfs.modes.wrap import (
    STANZA_SYMMETRIC,
    Stanza,
    decode_stanzas,
    is_hybrid,
    recipient_tag,
    recipient_tags,
)
from cryptfs.names import is_cryptfs_entry
from cryptfs.secret import Secret
from cryptfs.volume import open_volume
from multiuser import ensure_users

FAST = ("--kdf-memory", "8", "--kdf-iterations", "1")
JOURNAL = "cryptfs.rotate.journal"
ROTATE_XATTR = "user.cryptfs.rotate"
SAMPLE_V1 = Path(__file__).parent / "data" / "sample-v1-aes-256-gcm"
SAMPLE_PASSPHRASE = b"cryptfs sample volume"
SIZES = [0, 1, 100, 4095, 4096, 4097, 8191, 8192, 3 * 4096 + 5, 65536, 100_003, 262_144 + 17]
MIB = 1 << 20


def _seed() -> int:
    env = os.environ.get("CRYPTFS_TEST_SEED")
    seed = int(env) if env else random.randrange(1 << 32)
    print(f"random seed {seed} (replay with CRYPTFS_TEST_SEED={seed})")
    return seed


def data(tag: str, size: int) -> bytes:
    return random.Random(tag).randbytes(size)


# -- the plaintext side -------------------------------------------------------------------------
def populate(root: Path, n: int = 180) -> None:
    """Files of every shape: empty, one byte, exactly one block, block +- 1,
    multi-block, long names, a sparse file, hard links, xattrs, symlinks."""
    dirs = ["", "a", "a/b", "a/b/c", "deep/er/still", "名前"]
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "empty-dir").mkdir()
    for i in range(n):
        size = SIZES[i % len(SIZES)] if i % 3 else random.Random(i).randrange(0, 40_000)
        (root / dirs[i % len(dirs)] / f"f{i:03d}").write_bytes(data(f"f{i}", size))
    (root / "exactly-4096").write_bytes(data("4096", 4096))
    for i, name in enumerate(["x" * 255, "é" * 127, "L" * 200 + ".txt"]):
        (root / "a" / name).write_bytes(data(name, 5000 * i + 3))
    with open(root / "sparse", "wb") as f:  # holes before, between and after data
        f.write(b"head")
        f.seek(40 * 4096 + 7)
        f.write(b"middle")
        f.truncate(100 * 4096 + 3)
    os.link(root / "a" / "f001", root / "hl-one")
    os.link(root / "a" / "f001", root / "a" / "b" / "hl-two")
    os.link(root / "a" / ("x" * 255), root / "hl-long")
    os.setxattr(root / "f000", "user.note", b"a file with a note")
    os.setxattr(root / "a", "user.dir", b"on a directory")
    os.setxattr(root / "a" / "f001", "user.big", data("xattr", 3000))
    os.symlink("a/f001", root / "link-rel")
    os.symlink("/nowhere/at/all", root / "dangling")
    os.symlink("t" * 2000, root / "a" / "long-target")
    os.chmod(root / "a" / "f007", 0o600)


def _xattrs(path: str) -> dict[str, bytes]:
    return {n: os.getxattr(path, n) for n in sorted(os.listxattr(path))}


def snapshot(root: Path) -> dict[str, Any]:
    """Everything a user sees: types, sha256, sizes, modes, link counts,
    xattrs, symlink targets, and which paths are one file (hard links)."""
    out: dict[str, Any] = {}
    inodes: dict[int, list[str]] = {}

    def walk(p: str, rel: str) -> None:
        for e in sorted(os.scandir(p), key=lambda e: e.name):
            r = f"{rel}/{e.name}" if rel else e.name
            st = os.lstat(e.path)
            if stat.S_ISLNK(st.st_mode):
                out[r] = ("link", os.readlink(e.path))
            elif stat.S_ISDIR(st.st_mode):
                out[r] = ("dir", stat.S_IMODE(st.st_mode), _xattrs(e.path))
                walk(e.path, r)
            else:
                with open(e.path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[r] = ("file", digest, st.st_size, stat.S_IMODE(st.st_mode), st.st_nlink,
                          _xattrs(e.path))
                inodes.setdefault(st.st_ino, []).append(r)

    walk(str(root), "")
    out["<hard links>"] = sorted(sorted(v) for v in inodes.values() if len(v) > 1)
    return out


def snapshot_without(root: Path, *skip: str) -> dict[str, Any]:
    """A snapshot of ``root`` with files that cannot be read whole left out."""
    out: dict[str, Any] = {}
    for e in sorted(os.scandir(root), key=lambda e: e.name):
        if e.name in skip:
            continue
        if e.is_file(follow_symlinks=False):
            st = os.lstat(e.path)
            out[e.name] = ("file", hashlib.sha256(Path(e.path).read_bytes()).hexdigest(),
                           st.st_size, stat.S_IMODE(st.st_mode), st.st_nlink, _xattrs(e.path))
    out["<hard links>"] = []
    return out


def mtimes(root: Path) -> dict[str, int]:
    out = {}
    for top, _dirs, files in os.walk(root):
        for n in files:
            p = os.path.join(top, n)
            out[os.path.relpath(p, root)] = os.lstat(p).st_mtime_ns
    return out


@contextlib.contextmanager
def mounted(tmp_path: Path, backing: Path, pf: Path, name: str = "check", *extra: str
            ) -> Iterator[Mount]:
    m = new_mount(tmp_path, backing, pf, name)
    m.start(*extra)
    try:
        yield m
    finally:
        m.stop()


def read_back(tmp_path: Path, backing: Path, pf: Path, name: str = "check") -> dict[str, Any]:
    with mounted(tmp_path, backing, pf, name) as m:
        return snapshot(m.mnt)


def fsck_clean(backing: Path, pf: Path) -> str:
    res = run_cli("fsck", str(backing), "--passphrase-file", str(pf), check=False)
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and any(line.endswith(": clean") for line in lines), \
        res.stdout + res.stderr
    return res.stdout


# -- the backing side ---------------------------------------------------------------------------
def conf(backing: Path) -> dict[str, Any]:
    return json.loads((backing / "cryptfs.conf").read_text())  # type: ignore[no-any-return]


def backing_files(backing: Path) -> dict[int, tuple[str, bytes]]:
    """inode -> (backing path, whole content) of every regular file of the tree."""
    out = {}
    for top, _dirs, files in os.walk(backing / "tree"):
        for n in files:
            p = os.path.join(top, n)
            st = os.lstat(p)
            if is_cryptfs_entry(n) and stat.S_ISREG(st.st_mode):
                out[st.st_ino] = (p, Path(p).read_bytes())
    return out


def header_len(raw: bytes) -> int:
    return peek(raw[:12])[1]


def stanzas_of(raw: bytes) -> list[Stanza]:
    count = PREFIX.unpack_from(raw)[-1]
    return decode_stanzas(memoryview(raw)[PREFIX_LEN:header_len(raw) - MAC_LEN], count)[0]


def file_id(raw: bytes) -> bytes:
    return raw[12:28]


def sparse(raw: bytes) -> bool:
    return bool(int.from_bytes(raw[8:10], "big") & FLAG_SPARSE)


def generations(raw: bytes) -> set[int]:
    """The key ids of a header's symmetric stanzas."""
    return {int.from_bytes(st.body[:4], "big") for st in stanzas_of(raw) if st.type == STANZA_SYMMETRIC}


def blocks(raw: bytes) -> list[tuple[int, bytes, bool]]:
    """(block number, sealed block, last) of a backing file."""
    mode, h = peek(raw[:12])
    step = BLOCK_SIZE + mode.overhead
    body = raw[h:]
    n = max(1, -(-len(body) // step))
    return [(i, body[i * step:(i + 1) * step], i == n - 1) for i in range(n)]


def file_keys(backing: Path, keyring: Any) -> dict[int, FileHeader]:
    """inode -> the authenticated header (with its file key) of every file."""
    out = {}
    for ino, (_p, raw) in backing_files(backing).items():
        out[ino] = FileHeader.decode(raw, keyring)
    return out


def copy_volume(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)  # keeps hard links and xattrs
    return dst


def rotate_cmd(backing: Path, kind: str, pf: Path, *extra: str) -> list[str]:
    return CRYPTFS + ["rotate", str(backing), f"--{kind}", "--passphrase-file", str(pf), *extra]


def no_traceback(*texts: str) -> None:
    for t in texts:
        assert "Traceback" not in t and "internal error" not in t, t


def progress(mnt: Path) -> dict[str, Any]:
    return json.loads(os.getxattr(mnt, ROTATE_XATTR))  # type: ignore[no-any-return]


def wait_for(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step)


def assert_finished(backing: Path, key_id: int | None = None) -> None:
    """No rotation left: no journal, no retired generation, every symmetric
    header under the current generation."""
    c = conf(backing)
    assert "rotation" not in c and "retired" not in c, c
    assert not (backing / JOURNAL).exists() and not (backing / (JOURNAL + ".tmp")).exists()
    if key_id is not None:
        assert c["key_id"] == key_id
    for _ino, (p, raw) in backing_files(backing).items():
        gens = generations(raw)
        assert gens in (set(), {c["key_id"]}), (p, gens, c["key_id"])


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """A populated volume (symmetric files, and hybrid ones in /hy whose recipient
    is the volume's owner), its passphrase file and its snapshot; copied per test."""
    base = tmp_path_factory.mktemp("rotate-template")
    pf = base / "pass"
    pf.write_bytes(PASSPHRASE + b"\n")
    backing = make_volume(base / "backing")
    run_cli("policy", "set", str(backing), "/hy", "--mode", "hybrid", "--passphrase-file", str(pf))
    with mounted(base, backing, pf, "mnt") as m:
        populate(m.mnt)
        (m.mnt / "hy").mkdir()
        for i, size in enumerate(SIZES[:8]):
            (m.mnt / "hy" / f"h{i}").write_bytes(data(f"h{i}", size))
        snap = snapshot(m.mnt)
    assert len([v for v in snap.values() if v[0] == "file"]) > 195
    return backing, pf, snap


@pytest.fixture(scope="module")
def big_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """About 100 files, four of them several MiB, plus hybrid files: for kills."""
    base = tmp_path_factory.mktemp("rotate-big")
    pf = base / "pass"
    pf.write_bytes(PASSPHRASE + b"\n")
    backing = make_volume(base / "backing")
    run_cli("policy", "set", str(backing), "/hy", "--mode", "hybrid", "--passphrase-file", str(pf))
    with mounted(base, backing, pf, "mnt") as m:
        (m.mnt / "d").mkdir()
        (m.mnt / "hy").mkdir()
        for i in range(90):
            (m.mnt / "d" / f"s{i:03d}").write_bytes(data(f"s{i}", SIZES[i % len(SIZES)] + i))
        for i in range(6):
            (m.mnt / "hy" / f"h{i}").write_bytes(data(f"hy{i}", 5000 * i))
        for i, size in enumerate([3 * MIB + 1, 5 * MIB, 6 * MIB + 4097, 4 * MIB - 3]):
            (m.mnt / f"big{i}").write_bytes(data(f"big{i}", size))
        os.link(m.mnt / "big0", m.mnt / "d" / "big0-link")
        snap = snapshot(m.mnt)
    return backing, pf, snap


# == 1. offline rotations keep every file ==========================================================
@pytest.mark.parametrize("kind", ["slots", "wrap-key", "reencrypt"])
def test_offline_rotation_keeps_every_file(kind: str, template: tuple[Path, Path, dict[str, Any]],
                                           tmp_path: Path) -> None:
    src, pf, snap = template
    backing = copy_volume(src, tmp_path / "backing")
    before_conf, before = conf(backing), backing_files(backing)
    old_id = before_conf["key_id"]
    assert all(generations(raw) in (set(), {old_id}) for _, raw in before.values())
    assert any(sparse(raw) for _, raw in before.values())  # the sparse file has holes

    res = run_cli("rotate", str(backing), f"--{kind}", "--passphrase-file", str(pf))
    no_traceback(res.stdout, res.stderr)
    assert f"new key generation {old_id + 1} ({kind})" in res.stdout
    assert res.stdout.splitlines()[-1].startswith("done: ")
    assert res.stderr == ""  # a pipe: no progress

    after_conf = conf(backing)
    new_id = after_conf["key_id"]
    assert new_id == old_id + 1
    assert "rotation" not in after_conf
    if kind == "slots":
        assert [r["key_id"] for r in after_conf["retired"]] == [old_id]
    else:
        assert "retired" not in after_conf
    # The slot's master is wrapped anew; its passphrase-wrapped private key is not.
    assert after_conf["slots"][0]["master"] != before_conf["slots"][0]["master"]
    assert after_conf["slots"][0]["wrapped"] == before_conf["slots"][0]["wrapped"]

    after = backing_files(backing)
    assert after.keys() == before.keys()  # rewritten in place: the same inodes
    n_hybrid = 0
    for ino, (path, old) in before.items():
        new = after[ino][1]
        h = header_len(old)
        hybrid = is_hybrid(stanzas_of(old))
        n_hybrid += hybrid
        if kind == "slots" or (kind == "wrap-key" and hybrid):
            # (a hybrid file of users who all still have slots needs no re-wrap)
            assert new == old, path
            continue
        assert len(new) == len(old) and header_len(new) == h, path
        if kind == "wrap-key":
            assert new[h:] == old[h:], f"{path}: a content block changed"
            assert new[:h] != old[:h] and file_id(new) == file_id(old), path
            assert generations(new) == {new_id}
        else:
            assert file_id(new) != file_id(old), path
            # Every block that holds ciphertext is new; a hole of a sparse file
            # (all zero bytes, no ciphertext) may stay a hole.
            same = [i for (i, b_old, _), (_, b_new, _) in zip(blocks(old), blocks(new))
                    if b_old == b_new and (any(b_old) or not sparse(old))]
            assert same == [], f"{path}: blocks {same} not re-encrypted"
            assert len(blocks(new)) == len(blocks(old))
            if hybrid:
                assert recipient_tags(stanzas_of(new)) == recipient_tags(stanzas_of(old))
            else:
                assert generations(new) == {new_id}
    assert n_hybrid == 8

    with mounted(tmp_path, backing, pf) as m:
        assert snapshot(m.mnt) == snap
        (m.mnt / "written-after").write_bytes(b"new generation")
    fsck_clean(backing, pf)
    fresh = [raw for p, raw in backing_files(backing).values() if raw not in
             {r for _, r in after.values()}]
    assert len(fresh) == 1 and generations(fresh[0]) == {new_id}  # new files: new generation

    if kind == "slots":  # --wrap-key then finishes what --slots left
        run_cli("rotate", str(backing), "--wrap-key", "--passphrase-file", str(pf))
        assert_finished(backing, new_id + 1)
        again = read_back(tmp_path, backing, pf, "again")
        assert again.pop("written-after")[1] == hashlib.sha256(b"new generation").hexdigest()
        assert again == snap


@pytest.mark.parametrize("kind", ["slots", "wrap-key", "reencrypt"])
def test_mounted_rotation_of_each_kind(kind: str, template: tuple[Path, Path, dict[str, Any]],
                                       tmp_path: Path) -> None:
    """Through the mount: a file held open across the rotation keeps working,
    new files get the new generation, and the mount ends up where an offline
    rotation would."""
    src, pf, snap = template
    backing = copy_volume(src, tmp_path / "backing")
    before = backing_files(backing)
    with mounted(tmp_path, backing, pf, "mnt") as m:
        held = os.open(m.mnt / "a" / "b" / "f008", os.O_RDWR)
        try:
            res = run_cli("rotate", str(backing), f"--{kind}", "--passphrase-file", str(pf))
            no_traceback(res.stdout, res.stderr)
            assert f"through the mount on {m.mnt}" in res.stdout and "done" in res.stdout
            os.pwrite(held, b"written through a descriptor opened before", 0)
            os.fsync(held)
        finally:
            os.close(held)
        after_snap = snapshot(m.mnt)
        expected = bytearray(data("f8", SIZES[8]))
        expected[:42] = b"written through a descriptor opened before"
        assert (m.mnt / "a" / "b" / "f008").read_bytes() == expected
        (m.mnt / "written-after").write_bytes(b"new generation")
        assert progress(m.mnt)["state"] == "finished"
    assert after_snap.pop("a/b/f008")[1] == hashlib.sha256(expected).hexdigest()
    assert {k: v for k, v in snap.items() if k != "a/b/f008"} == after_snap
    c = conf(backing)
    assert c["key_id"] == 2 and "rotation" not in c
    assert ("retired" in c) == (kind == "slots")
    after = backing_files(backing)
    for ino, (path, raw) in after.items():
        if ino not in before:
            assert generations(raw) == {2}, path  # the file written after
        elif kind == "slots":
            assert generations(raw) in (set(), {1}), path
        else:
            assert generations(raw) in (set(), {2}), path
            assert (file_id(raw) != file_id(before[ino][1])) == (kind == "reencrypt"), path
    assert len(after) == len(before) + 1
    fsck_clean(backing, pf)


def test_an_unfinished_rotation_is_resumed_by_a_weaker_kind_and_replaced_by_a_stronger(
        template: tuple[Path, Path, dict[str, Any]], tmp_path: Path) -> None:
    src, pf, snap = template
    backing = copy_volume(src, tmp_path / "backing")

    def started(kind: str) -> None:  # killed right after the new generation was saved
        vol = open_volume(str(backing), Secret(PASSPHRASE))
        try:
            assert rot.begin(vol, kind)
        finally:
            vol.close()

    def ids() -> set[bytes]:
        return {file_id(raw) for _, raw in backing_files(backing).values()}

    started("wrap-key")
    assert conf(backing)["rotation"]["kind"] == "wrap-key"
    res = run_cli("rotate", str(backing), "--slots", "--passphrase-file", str(pf))
    assert "resuming: the unfinished rotation to key generation 2 (wrap-key)" in res.stdout
    assert_finished(backing, 2)

    started("wrap-key")  # generation 3, unfinished; a re-encryption goes further: generation 4
    first = ids()
    res = run_cli("rotate", str(backing), "--reencrypt", "--passphrase-file", str(pf))
    assert "new key generation 4 (reencrypt)" in res.stdout
    assert_finished(backing, 4)
    assert not ids() & first

    started("reencrypt")  # generation 5, unfinished; --wrap-key finishes the re-encryption
    second = ids()
    res = run_cli("rotate", str(backing), "--wrap-key", "--passphrase-file", str(pf))
    assert "resuming: the unfinished rotation to key generation 5 (reencrypt)" in res.stdout
    assert_finished(backing, 5)
    assert not ids() & second
    assert read_back(tmp_path, backing, pf) == snap
    fsck_clean(backing, pf)


@pytest.mark.parametrize("where", ["offline", "mounted"])
def test_a_damaged_file_is_reported_and_keeps_its_good_blocks(where: str, tmp_path: Path,
                                                              passfile: Path) -> None:
    backing = make_volume(tmp_path / "backing")
    victim = data("victim", 3 * 4096 + 5)
    with mounted(tmp_path, backing, passfile, "fill") as m:
        for i in range(10):
            (m.mnt / f"ok{i}").write_bytes(data(f"ok{i}", 5000 * i))
        (m.mnt / "victim").write_bytes(victim)
        ino = os.stat(m.mnt / "victim").st_ino
        good = snapshot(m.mnt)
    path, raw = backing_files(backing)[ino]
    h = header_len(raw)
    with open(path, "r+b") as f:  # one bit of block 1
        f.seek(h + (4096 + 28) + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    del good["victim"]

    if where == "offline":
        res = run_cli("rotate", str(backing), "--reencrypt", "--passphrase-file", str(passfile),
                      check=False)
    else:
        with mounted(tmp_path, backing, passfile, "live") as m:
            res = run_cli("rotate", str(backing), "--reencrypt", "--passphrase-file", str(passfile),
                          check=False)
    no_traceback(res.stdout, res.stderr)
    assert res.returncode == 6, res.stdout + res.stderr
    assert "1 damaged file(s)" in res.stderr and os.path.relpath(path, backing) in res.stderr
    c = conf(backing)
    assert "rotation" not in c and "retired" not in c  # the old generation is forgotten anyway
    assert generations(backing_files(backing)[ino][1]) == {c["key_id"]}  # but re-wrapped
    with mounted(tmp_path, backing, passfile, "after") as m:
        snap = snapshot_without(m.mnt, "victim")
        assert snap == good
        fd = os.open(m.mnt / "victim", os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == victim[:4096]
            assert os.pread(fd, 8192, 2 * 4096) == victim[2 * 4096:]  # blocks 2 and 3
            with pytest.raises(OSError) as e:
                os.pread(fd, 4096, 4096)
            assert e.value.errno == 5
        finally:
            os.close(fd)
    res = run_cli("fsck", str(backing), "--passphrase-file", str(passfile), check=False)
    damaged = [line for line in res.stdout.splitlines() if line.startswith("damaged: ")]
    assert res.returncode == 6 and len(damaged) == 1 and "/victim" in damaged[0], res.stdout


@pytest.mark.parametrize("where", ["offline", "mounted"])
@pytest.mark.parametrize("kind", ["wrap-key", "reencrypt"])
def test_rotation_keeps_modification_times(kind: str, where: str,
                                           template: tuple[Path, Path, dict[str, Any]],
                                           tmp_path: Path) -> None:
    """A rotation changes no plaintext, so no file may look modified (backups and
    rsync go by mtime: a rotated 1 TB volume would be copied in full again;
    /tmp/bugs/rotate-mtime.md)."""
    src, pf, _snap = template
    backing = copy_volume(src, tmp_path / "backing")
    with mounted(tmp_path, backing, pf, "before") as m:
        os.utime(m.mnt / "a" / "f001", ns=(10**18, 10**18))
        os.utime(m.mnt / "sparse", ns=(10**9, 10**9))
        before = mtimes(m.mnt)
        if where == "mounted":
            run_cli("rotate", str(backing), f"--{kind}", "--passphrase-file", str(pf))
            during = mtimes(m.mnt)  # as this very mount shows them
    if where == "offline":
        run_cli("rotate", str(backing), f"--{kind}", "--passphrase-file", str(pf))
    with mounted(tmp_path, backing, pf, "after") as m:
        after = mtimes(m.mnt)
    changed = sorted(p for p in before if before[p] != after[p])
    assert changed == [], f"{len(changed)} of {len(before)} mtimes changed, e.g. {changed[:3]}"
    if where == "mounted":
        assert during == before


# == 2. revocation ===============================================================================
ROOT_PW = b"root passphrase of the revocation test"
BOB_PW = b"bob's passphrase, soon revoked"


def _users_volume(tmp_path: Path, dropbox: bool = True) -> dict[str, Any]:
    """A CLI-made volume: root (first slot), cfs-bob, a recovery key; symmetric
    files, hybrid files for root + bob + recovery (/shared) and, with
    ``dropbox``, for bob + recovery only (/drop: root cannot open them)."""
    ensure_users()
    root_pf, bob_pf = tmp_path / "root.pass", tmp_path / "bob.pass"
    root_pf.write_bytes(ROOT_PW + b"\n")
    bob_pf.write_bytes(BOB_PW + b"\n")
    backing, rk = tmp_path / "backing", tmp_path / "recovery.key"
    run_cli("init", str(backing), "--passphrase-file", str(root_pf), "--recovery-key", str(rk), *FAST)
    run_cli("user", "add", str(backing), "cfs-bob", "--passphrase-file", str(root_pf),
            "--new-passphrase-file", str(bob_pf), *FAST)
    run_cli("policy", "set", str(backing), "/shared", "--mode", "hybrid", "--recipient", "cfs-bob",
            "--passphrase-file", str(root_pf))
    if dropbox:
        run_cli("policy", "set", str(backing), "/drop", "--mode", "hybrid-xchacha20-poly1305",
                "--recipient", "cfs-bob", "--dropbox", "--passphrase-file", str(root_pf))
    with mounted(tmp_path, backing, root_pf, "setup") as m:
        for d in ("sub", "shared", "drop") if dropbox else ("sub", "shared"):
            (m.mnt / d).mkdir()
        for i in range(24):
            (m.mnt / ("sub" if i % 2 else "") / f"sym{i}").write_bytes(data(f"sym{i}", SIZES[i % 12]))
        for i in range(8):
            (m.mnt / "shared" / f"h{i}").write_bytes(data(f"h{i}", SIZES[i] + 7))
        if dropbox:
            for i in range(5):
                (m.mnt / "drop" / f"d{i}").write_bytes(data(f"d{i}", 3000 * i))
    return {"backing": backing, "root_pf": root_pf, "bob_pf": bob_pf, "rk": rk}


def _recovered(backing: Path, rk: Path, out: Path) -> dict[str, str]:
    """sha256 of every file, decrypted with the recovery key (it opens all of them)."""
    run_cli("recover", str(backing), "--recovery-key", str(rk), "--out", str(out))
    sums = {}
    for top, _dirs, files in os.walk(out):
        for n in files:
            p = os.path.join(top, n)
            sums[os.path.relpath(p, out)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return sums


def _bob_old_keyring(old_conf: bytes) -> tuple[Any, Any]:
    """What bob holds with a saved config and his passphrase: the old keys (and his
    private key) as one keyring, and his private key alone as another."""
    cfg = VolumeConfig.from_bytes(old_conf)
    keys, slot, private = cfg.unlock(Secret(BOB_PW))
    assert slot.extra["user"] == "cfs-bob" and private is not None
    only_private = keys.keyring([private.reveal()])
    only_private.symmetric = {}
    return keys.keyring([private.reveal()]), only_private


def _opened_by(backing: Path, keyring: Any) -> dict[str, bool]:
    """Backing path -> whether ``keyring`` unwraps that file's key (FileHeader.decode)."""
    out = {}
    for _ino, (p, raw) in backing_files(backing).items():
        try:
            FileHeader.decode(raw, keyring)
            out[p] = True
        except (IntegrityError, NotForMe):
            out[p] = False
    return out


def _kinds(backing: Path) -> dict[str, int]:
    files = [raw for _, raw in backing_files(backing).values()]
    return {"hybrid": sum(is_hybrid(stanzas_of(r)) for r in files), "all": len(files)}


@pytest.mark.parametrize("where", ["offline", "mounted"])
def test_revoke_an_old_config_and_passphrase_open_no_file_key(where: str, tmp_path: Path) -> None:
    v = _users_volume(tmp_path, dropbox=where == "offline")
    backing, root_pf, rk = v["backing"], v["root_pf"], v["rk"]
    plain = _recovered(backing, rk, tmp_path / "before")
    old_conf = (backing / "cryptfs.conf").read_bytes()  # bob keeps a copy, and his passphrase
    kr, bob_private_only = _bob_old_keyring(old_conf)
    bob_tag = recipient_tag(VolumeConfig.from_bytes(old_conf).publics()["cfs-bob"])

    # Control: the very same code opens every single file before the revocation.
    control = _opened_by(backing, kr)
    counts = _kinds(backing)
    assert sum(_opened_by(backing, bob_private_only).values()) == counts["hybrid"]
    n_drop = 5 if where == "offline" else 0
    assert all(control.values()) and len(control) == counts["all"] == 24 + 8 + n_drop
    assert counts["hybrid"] == 8 + n_drop

    args = ["user", "remove", str(backing), "cfs-bob", "--revoke", "--passphrase-file", str(root_pf)]
    if where == "offline":
        res = run_cli(*args, "--recovery-key", str(rk))
    else:
        with mounted(tmp_path, backing, root_pf, "live") as m:
            res = run_cli(*args)
            assert f"through the mount on {m.mnt}" in res.stdout
            live = snapshot(m.mnt)  # the mount followed the new generation
        assert {k: val[1] for k, val in live.items() if k in plain} == plain
    no_traceback(res.stdout, res.stderr)
    assert "removed cfs-bob (key slot 1), access revoked" in res.stdout

    after = _opened_by(backing, kr)
    assert len(after) == len(control)
    assert not any(after.values()), [p for p, ok in after.items() if ok]
    for _ino, (p, raw) in backing_files(backing).items():
        assert bob_tag not in recipient_tags(stanzas_of(raw)), p
    # His private key alone (the hybrid files' way in) opens none either.
    assert sum(_opened_by(backing, bob_private_only).values()) == 0
    # The old master does not even authenticate the new config; bob's passphrase opens no slot.
    new_cfg = VolumeConfig.from_bytes((backing / "cryptfs.conf").read_bytes())
    assert "cfs-bob" not in new_cfg.publics() and new_cfg.key_id == 2 and not new_cfg.retired
    with pytest.raises(NotAVolume):
        new_cfg.open_keys(VolumeConfig.from_bytes(old_conf).unlock(Secret(BOB_PW))[0].master)
    res = run_cli("fsck", str(backing), "--passphrase-file", str(v["bob_pf"]), check=False)
    assert res.returncode == 3 and "wrong passphrase" in res.stderr
    if where == "offline":
        # The old config put back (it is still authentic): bob's slot opens again and
        # he sees names (the name key is kept), but not one byte of content.
        new_conf = (backing / "cryptfs.conf").read_bytes()
        (backing / "cryptfs.conf").write_bytes(old_conf)
        try:
            with mounted(tmp_path, backing, v["bob_pf"], "put-back") as m:
                assert sorted(os.listdir(m.mnt)) == sorted(
                    {p.split("/")[0] for p in plain} | {"sub", "shared", "drop"})
                n = 0
                for p in plain:
                    with pytest.raises(OSError) as e:
                        (m.mnt / p).read_bytes()
                    assert e.value.errno in (5, 13), (p, e.value)  # EIO, or EACCES (hybrid)
                    n += 1
                assert n == len(plain) == len(control)
        finally:
            (backing / "cryptfs.conf").write_bytes(new_conf)
    # Nothing was lost: every file decrypts as before, fsck is clean.
    assert _recovered(backing, rk, tmp_path / "after") == plain
    fsck_clean(backing, root_pf)
    assert_finished(backing, 2)


def test_revoke_without_the_recovery_key_reports_the_files_it_could_not_reach(tmp_path: Path) -> None:
    """Drop-box files are bob's and the recovery key's only: root's revocation
    cannot re-wrap them, says so (exit 1, not a traceback), and a rotation
    with the recovery key then removes bob from them too."""
    v = _users_volume(tmp_path)
    backing, root_pf, rk = v["backing"], v["root_pf"], v["rk"]
    plain = _recovered(backing, rk, tmp_path / "before")
    old_conf = (backing / "cryptfs.conf").read_bytes()
    kr, _ = _bob_old_keyring(old_conf)
    res = run_cli("user", "remove", str(backing), "cfs-bob", "--revoke", "--passphrase-file",
                  str(root_pf), check=False)
    no_traceback(res.stdout, res.stderr)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "5 hybrid file(s)" in res.stderr and "--recovery-key" in res.stderr
    still = [p for p, ok in _opened_by(backing, kr).items() if ok]
    assert len(still) == 5 and all(is_hybrid(stanzas_of(Path(p).read_bytes())) for p in still)
    assert "cfs-bob" not in VolumeConfig.from_bytes((backing / "cryptfs.conf").read_bytes()).publics()

    res = run_cli("rotate", str(backing), "--wrap-key", "--recovery-key", str(rk),
                  "--passphrase-file", str(root_pf))
    no_traceback(res.stdout, res.stderr)
    assert not any(_opened_by(backing, kr).values())
    assert _recovered(backing, rk, tmp_path / "after") == plain
    fsck_clean(backing, root_pf)
    assert_finished(backing)


@pytest.mark.parametrize("where", ["offline", "mounted"])
def test_revoke_while_a_rotation_is_unfinished_still_revokes(where: str, tmp_path: Path) -> None:
    """A rotation left unfinished (killed, say) must not turn a later revocation
    into a no-op: bob's copy of the config taken meanwhile holds the current
    generation, so only a new one shuts him out."""
    v = _users_volume(tmp_path, dropbox=False)
    backing, root_pf, rk = v["backing"], v["root_pf"], v["rk"]
    plain = _recovered(backing, rk, tmp_path / "before")
    vol = open_volume(str(backing), Secret(ROOT_PW))
    try:
        assert rot.begin(vol, "reencrypt")  # and then the process was killed
    finally:
        vol.close()
    old_conf = (backing / "cryptfs.conf").read_bytes()
    kr, _ = _bob_old_keyring(old_conf)
    assert all(_opened_by(backing, kr).values())

    args = ["user", "remove", str(backing), "cfs-bob", "--revoke", "--passphrase-file", str(root_pf)]
    if where == "offline":
        res = run_cli(*args, "--recovery-key", str(rk), check=False)
    else:
        with mounted(tmp_path, backing, root_pf, "live"):
            res = run_cli(*args, check=False)
    no_traceback(res.stdout, res.stderr)
    assert res.returncode == 0, res.stdout + res.stderr
    new_cfg = VolumeConfig.from_bytes((backing / "cryptfs.conf").read_bytes())
    assert "cfs-bob" not in new_cfg.publics(), "the removal was lost"
    assert new_cfg.key_id > 2, "no new key generation: bob's copy opens the current master"
    opened = [p for p, ok in _opened_by(backing, kr).items() if ok]
    assert opened == [], f"bob still opens {len(opened)} file keys"
    assert _recovered(backing, rk, tmp_path / "after") == plain
    assert_finished(backing)


def test_config_changes_during_a_mounted_walk_are_kept(tmp_path: Path) -> None:
    """The mount ends its walk by saving the config: it must not put back what
    was changed meanwhile (a user removed, a policy set)."""
    v = _users_volume(tmp_path, dropbox=False)
    backing, root_pf = v["backing"], v["root_pf"]
    with mounted(tmp_path, backing, root_pf, "live") as m:
        for i in range(3):
            (m.mnt / f"big{i}").write_bytes(data(f"walk{i}", 4 * MIB))
        p = subprocess.Popen(rotate_cmd(backing, "reencrypt", root_pf), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)

        def running() -> bool:
            try:
                return progress(m.mnt).get("state") == "running"
            except OSError:
                return False
        wait_for(running, 20, "the mount's walk", step=0)
        daemon = m.pid
        os.kill(daemon, signal.SIGSTOP)  # the walk is paused while the admin works
        try:
            assert conf(backing)["rotation"]["kind"] == "reencrypt"
            res = run_cli("user", "remove", str(backing), "cfs-bob", "--passphrase-file", str(root_pf))
            assert "removed cfs-bob" in res.stdout
            run_cli("policy", "set", str(backing), "/later", "--mode", "xchacha20-poly1305",
                    "--passphrase-file", str(root_pf))
        finally:
            os.kill(daemon, signal.SIGCONT)
        out, err = p.communicate(timeout=60)
        no_traceback(out, err)
        assert p.returncode == 0 and "done" in out, out + err
    cfg = VolumeConfig.from_bytes((backing / "cryptfs.conf").read_bytes())
    assert [s.extra.get("user") for s in cfg.slots] == ["root"], "the removed user is back"
    assert cfg.policy is not None
    res = run_cli("policy", "show", str(backing), "--passphrase-file", str(root_pf))
    assert "/later: xchacha20-poly1305" in res.stdout
    res = run_cli("fsck", str(backing), "--passphrase-file", str(v["bob_pf"]), check=False)
    assert res.returncode == 3


def test_revoke_through_a_shared_agent_mount(shared: Any) -> None:
    """`user remove --revoke` while the volume is served by a shared --agent mount
    and the revoked user is unlocked: the agent follows the new generation,
    the others go on without unlocking again, the revoked user is locked out,
    and the saved old config opens no file key."""
    from multiuser import USERS, run_as

    for user in ("root", "cfs-alice", "cfs-bob"):
        res = shared.unlock(user)
        assert res.returncode == 0, res.stderr
    files = {f"doc{i}": data(f"doc{i}", SIZES[i % len(SIZES)] + i) for i in range(20)}
    for name, content in files.items():
        shared.path(name).write_bytes(content)
    shared.path("big").write_bytes(data("agent-big", 2 * MIB))
    files["big"] = data("agent-big", 2 * MIB)
    for user in ("cfs-alice", "cfs-bob"):
        r = run_as(user, "cat", str(shared.path("doc3")))
        assert r.returncode == 0 and r.stdout == files["doc3"], r.stderr
    old_conf = (shared.backing / "cryptfs.conf").read_bytes()
    bob_pw = USERS["cfs-bob"][1]
    cfg = VolumeConfig.from_bytes(old_conf)
    keys, _slot, private = cfg.unlock(Secret(bob_pw))
    assert private is not None
    old_kr = keys.keyring([private.reveal()])
    assert all(_opened_by(shared.backing, old_kr).values())

    res = run_cli("user", "remove", str(shared.backing), "cfs-bob", "--revoke",
                  "--passphrase-file", str(shared.passfiles["root"]), timeout=90)
    no_traceback(res.stdout, res.stderr)
    assert f"through the mount on {shared.mount.mnt}" in res.stdout
    assert "access revoked" in res.stdout

    for name, content in files.items():  # alice reads on, without unlocking again
        r = run_as("cfs-alice", "cat", str(shared.path(name)))
        assert r.returncode == 0 and r.stdout == content, (name, r.stderr)
    t = time.monotonic()
    r = run_as("cfs-bob", "cat", str(shared.path("doc3")))
    while r.returncode == 0 and time.monotonic() - t < 4:
        # "cryptfs user remove takes effect within about 2 s" (docs/AGENT.md: the
        # agent's config watch ends the sessions of users whose slot is gone)
        time.sleep(0.1)
        r = run_as("cfs-bob", "cat", str(shared.path("doc3")))
    assert r.returncode != 0 and r.stdout == b"" and b"Permission denied" in r.stderr, \
        f"bob still reads {time.monotonic() - t:.1f} s after his revocation"
    assert not any(_opened_by(shared.backing, old_kr).values())
    assert_finished(shared.backing, 2)
    shared.mount.stop()
    fsck_clean(shared.backing, shared.passfiles["root"])


def test_reencrypt_makes_file_keys_taken_before_useless(template: tuple[Path, Path, dict[str, Any]],
                                                       tmp_path: Path) -> None:
    src, pf, snap = template
    backing = copy_volume(src, tmp_path / "backing")
    vol = open_volume(str(backing), Secret(PASSPHRASE))
    try:
        taken = file_keys(backing, vol.keyring())  # every file key, hybrid ones included
    finally:
        vol.close()
    before = backing_files(backing)

    def try_open(hdr: FileHeader, fid: bytes, raw: bytes, only_first: bool = False) -> list[int]:
        """Blocks of ``raw`` that the key of ``hdr`` (with file id ``fid``) opens."""
        cipher = FileHeader(hdr.mode, 0, fid, hdr.stanzas, hdr.file_key).cipher()
        opened = []
        for i, sealed, last in blocks(raw)[:1] if only_first else blocks(raw):
            for flag in {last, not last}:
                try:
                    cipher.open(i, sealed, flag)
                    opened.append(i)
                except IntegrityError:
                    pass
        return opened

    # Control: before, each key opens every block of its file that is not a hole.
    for ino, hdr in taken.items():
        raw = before[ino][1]
        want = [i for i, sealed, _ in blocks(raw) if any(sealed)]
        assert try_open(hdr, file_id(raw), raw) == want and want, before[ino][0]

    run_cli("rotate", str(backing), "--reencrypt", "--passphrase-file", str(pf))
    after = backing_files(backing)
    assert after.keys() == taken.keys()
    others = list(taken.values())
    for ino, hdr in taken.items():
        path, raw = after[ino]
        assert file_id(raw) != hdr.file_id
        # Its own old key, with the old file id and with the new one: no block at all.
        assert try_open(hdr, hdr.file_id, raw) == [], path
        assert try_open(hdr, file_id(raw), raw) == [], path
        # Nor any other file's old key (first block).
        assert not any(try_open(o, file_id(raw), raw, only_first=True) for o in others), path
    vol = open_volume(str(backing), Secret(PASSPHRASE))
    try:
        now = file_keys(backing, vol.keyring())
    finally:
        vol.close()
    assert not {h.file_key for h in now.values()} & {h.file_key for h in taken.values()}
    assert read_back(tmp_path, backing, pf) == snap
    fsck_clean(backing, pf)


# == 3. kills ===================================================================================
def _start_rotate(backing: Path, kind: str, pf: Path) -> subprocess.Popen[str]:
    """`cryptfs rotate` in the background, its standard output unbuffered (so its
    first line tells when the walk starts)."""
    return subprocess.Popen(rotate_cmd(backing, kind, pf), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _walk_started(p: subprocess.Popen[str]) -> bool:
    """Wait for the line `cryptfs rotate` prints once the new generation is saved
    (or an unfinished one is resumed), right before it walks."""
    assert p.stdout is not None
    while line := p.stdout.readline():
        if line.startswith(("new key generation", "resuming")):
            return True
    return False


def _calibrate(src: Path, tmp_path: Path, kind: str, pf: Path) -> tuple[float, float]:
    """Seconds from the start of `cryptfs rotate` on a copy of ``src`` to the
    start of its walk, and the length of the walk (with the final sync)."""
    scratch = copy_volume(src, tmp_path / "calibrate")
    subprocess.run(["sync"], check=True)
    t0 = time.monotonic()
    p = _start_rotate(scratch, kind, pf)
    assert _walk_started(p)
    t_begin = time.monotonic() - t0
    out, err = p.communicate()
    t_walk = time.monotonic() - t0 - t_begin
    assert p.returncode == 0, out + err
    shutil.rmtree(scratch)
    return t_begin, t_walk


def _enough(history: list[tuple[str, int, bool, bool]]) -> bool:
    """At least four rotations killed, two of them inside the walk."""
    killed = sum(code == -signal.SIGKILL for _, code, _, _ in history)
    mid_walk = sum(inside for _, _, inside, _ in history)
    return killed >= 4 and mid_walk >= 2


@pytest.mark.serial
@pytest.mark.parametrize("kind", ["wrap-key", "reencrypt"])
def test_offline_rotation_killed_at_random_moments(kind: str, tmp_path: Path,
                                                   big_template: tuple[Path, Path, dict[str, Any]]
                                                   ) -> None:
    src, pf, snap = big_template
    seed = _seed()
    rng = random.Random(seed)
    backing = copy_volume(src, tmp_path / "backing")
    if kind == "wrap-key":
        # Re-wrapping a header takes ~0.1 ms: many more files make a walk long enough to hit.
        with mounted(tmp_path, backing, pf, "fill") as m:
            (m.mnt / "many").mkdir()
            for i in range(1000):
                (m.mnt / "many" / f"m{i:04d}").write_bytes(data(f"m{i}", i % 300))
            snap = snapshot(m.mnt)
    t_begin, t_walk = _calibrate(backing, tmp_path, kind, pf)
    start_id = conf(backing)["key_id"]
    history = []
    # A kill inside a walk leaves the rest of it to the next rotate, which resumes: that walk
    # is shorter than the calibrated one, so the delays are drawn from what is left of it
    # (a guess: elapsed time is not progress). Eight kills are tried, more (up to 20) when
    # too few of them landed, which a slow or a fast moment of the machine can cause.
    walk_left = t_walk
    it = 0
    while it < 8 or (it < 20 and not _enough(history)):
        p = _start_rotate(backing, kind, pf)
        if kind == "reencrypt" and it == 0:
            # A kill with a completed journal in place (its copy over the file under way).
            when = "journal"
            deadline = time.monotonic() + 10
            while p.poll() is None and time.monotonic() < deadline \
                    and not (backing / JOURNAL).exists():
                pass
            walked = 0.0
        elif it in (1, 2):  # anywhere: starting up, unlocking, saving the new generation, walking
            delay = rng.uniform(0, 1.05 * (t_begin + walk_left))
            when = f"{delay:.3f}s after the start"
            time.sleep(delay)
            walked = max(0.0, delay - t_begin)
        else:  # somewhere in the walk
            _walk_started(p)
            delay = rng.uniform(0, 0.8 * walk_left)  # (its end: sync, interpreter exit)
            when = f"{delay:.3f}s into the walk"
            time.sleep(delay)
            walked = delay
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate(timeout=30)
        no_traceback(out, err)
        interrupted = "rotation" in conf(backing)
        history.append((when, p.returncode, interrupted, (backing / JOURNAL).exists()))
        walk_left = max(0.25 * t_walk, walk_left - walked) if interrupted else t_walk
        it += 1
    print(f"calibrated: the walk starts after {t_begin:.3f} s and takes {t_walk:.3f} s; "
          "(when, exit, walk interrupted, journal left):", history)
    assert _enough(history), f"seed {seed}: {history}"
    if "rotation" in conf(backing):  # the last kill left it unfinished: info says so
        info = run_cli("info", str(backing)).stdout
        assert f"rotation:      {kind} started" in info and "unfinished" in info, info

    journal_left = (backing / JOURNAL).exists()
    for _ in range(3):
        res = run_cli("rotate", str(backing), f"--{kind}", "--passphrase-file", str(pf), check=False)
        no_traceback(res.stdout, res.stderr)
        if res.returncode == 0:
            break
    assert res.returncode == 0, f"seed {seed}: {history}\n{res.stdout}{res.stderr}"
    if journal_left:
        assert "finished the interrupted re-encryption of one file" in res.stdout
    assert conf(backing)["key_id"] > start_id
    assert_finished(backing)
    assert read_back(tmp_path, backing, pf) == snap, f"seed {seed}: {history}"
    fsck_clean(backing, pf)


def test_journal_replay_after_a_torn_copy(big_template: tuple[Path, Path, dict[str, Any]],
                                          tmp_path: Path) -> None:
    """The moment a kill is hardest to hit: the journal complete, the file half
    overwritten with its new image.  Both the next rotation and the next mount
    copy the journal over the file again."""
    src, pf, snap = big_template
    for where in ("rotate", "mount"):
        backing = copy_volume(src, tmp_path / f"backing-{where}")
        vol = open_volume(str(backing), Secret(PASSPHRASE))
        real_apply = rot._apply

        def torn(jfd: int, fd: int, length: int, cut: bool = where == "mount") -> None:
            if cut:  # (cut short first, as a copy that keeps holes does)
                os.ftruncate(fd, 0)
            os.pwrite(fd, os.pread(jfd, length // 2, 0), 0)  # half the new image, then "killed"
            raise KeyboardInterrupt

        rot._apply = torn  # type: ignore[assignment]
        try:
            assert rot.begin(vol, "reencrypt")
            big = next(p for p, raw in backing_files(backing).values() if len(raw) > 5 * MIB)
            fd = os.open(big, os.O_RDWR)
            try:
                content = ContentFile.load(fd, vol.keyring())
                with pytest.raises(KeyboardInterrupt):
                    rot.reencrypt(fd, content, vol.keys, vol.config, str(backing),
                                  os.path.relpath(big, backing))
            finally:
                os.close(fd)
        finally:
            rot._apply = real_apply  # type: ignore[assignment]
            vol.close()
        assert (backing / JOURNAL).exists()
        if where == "mount":
            with mounted(tmp_path, backing, pf, "replay") as m:
                assert not (backing / JOURNAL).exists()
                assert "finished the interrupted re-encryption of one file" in m.log_text()
                res = run_cli("rotate", str(backing), "--reencrypt", "--passphrase-file", str(pf))
                assert "resuming" in res.stdout
                assert snapshot(m.mnt) == snap
        else:
            res = run_cli("rotate", str(backing), "--reencrypt", "--passphrase-file", str(pf))
            assert "finished the interrupted re-encryption of one file" in res.stdout
            assert "resuming" in res.stdout
            assert read_back(tmp_path, backing, pf) == snap
        no_traceback(res.stdout, res.stderr)
        assert_finished(backing)
        fsck_clean(backing, pf)


def test_mount_daemon_killed_mid_reencrypt(big_template: tuple[Path, Path, dict[str, Any]],
                                           tmp_path: Path) -> None:
    src, pf, snap = big_template
    seed = _seed()
    rng = random.Random(seed)
    backing = copy_volume(src, tmp_path / "backing")
    m = new_mount(tmp_path, backing, pf)
    m.start()
    try:
        p = subprocess.Popen(rotate_cmd(backing, "reencrypt", pf), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        if rng.random() < 0.5:
            trigger = "journal"
            wait_for(lambda: (backing / JOURNAL).exists() or (backing / (JOURNAL + ".tmp")).exists(),
                     20, "the mount's journal", step=0)
        else:
            trigger = "progress"
            target = rng.randrange(1, 40)

            def far_enough() -> bool:
                try:
                    prog = progress(m.mnt)
                except OSError:
                    return False
                return prog.get("state") == "running" and int(prog["done"]) >= target
            wait_for(far_enough, 20, "the mount's walk")
        m.kill()
        out, err = p.communicate(timeout=30)
        no_traceback(out, err)
        assert p.returncode != 0, f"seed {seed} ({trigger}): the CLI says {out}"
        assert "lost the mount" in err or "failed" in err, err
        assert conf(backing)["rotation"]["kind"] == "reencrypt"
        journal_left = (backing / JOURNAL).exists()

        m.start()  # replays the journal
        assert not (backing / JOURNAL).exists()
        if journal_left:
            assert "finished the interrupted re-encryption of one file" in m.log_text()
        res = run_cli("rotate", str(backing), "--reencrypt", "--passphrase-file", str(pf))
        no_traceback(res.stdout, res.stderr)
        assert "resuming" in res.stdout and "done" in res.stdout
        assert f"through the mount on {m.mnt}" in res.stdout
        assert snapshot(m.mnt) == snap, f"seed {seed} ({trigger})"
    finally:
        m.stop()
    assert_finished(backing, 2)
    assert read_back(tmp_path, backing, pf) == snap
    fsck_clean(backing, pf)


def test_cli_killed_while_the_mount_walks(big_template: tuple[Path, Path, dict[str, Any]],
                                          tmp_path: Path) -> None:
    """The walk is the mount's: killing the command that asked for it changes
    nothing, the walk goes on, and running the command again follows that same
    walk to its end (no new generation).  The daemon is stopped (SIGSTOP)
    while the second command starts, so the walk cannot end before it looks."""
    src, pf, snap = big_template
    backing = copy_volume(src, tmp_path / "backing")
    with mounted(tmp_path, backing, pf, "mnt") as m:
        p = subprocess.Popen(rotate_cmd(backing, "reencrypt", pf), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)

        def walked(at_least: int) -> Callable[[], bool]:
            def check() -> bool:
                try:
                    prog = progress(m.mnt)
                except OSError:
                    return False
                return prog.get("state") == "finished" or (
                    prog.get("state") == "running" and int(prog["done"]) >= at_least)
            return check
        wait_for(walked(1), 20, "the mount's walk", step=0)
        p.kill()
        p.communicate(timeout=10)
        done = int(progress(m.mnt)["done"])
        wait_for(walked(done + 1), 20, "the walk to go on without the command", step=0)
        daemon = m.pid
        os.kill(daemon, signal.SIGSTOP)
        try:
            assert conf(backing)["rotation"]["kind"] == "reencrypt", "the walk ended too soon"
            again = _start_rotate(backing, "reencrypt", pf)
            assert again.stdout is not None
            first = again.stdout.readline()
        finally:
            os.kill(daemon, signal.SIGCONT)
        out, err = again.communicate(timeout=60)
        no_traceback(first, out, err)
        assert again.returncode == 0, first + out + err
        # It followed the walk already under way (else it would have made generation 3).
        assert first.startswith("resuming: the unfinished rotation to key generation 2 (reencrypt)")
        assert "done" in out
        assert progress(m.mnt)["state"] == "finished"
        assert snapshot(m.mnt) == snap
    assert_finished(backing, 2)
    fsck_clean(backing, pf)


# == 4. users keep working during a mounted rotation ===============================================
WRITER = r"""
import hashlib, json, os, random, sys, time
mnt, ready, stop, out, seed = sys.argv[1:6]
rng = random.Random(seed)
state = {}
for n in sorted(os.listdir(os.path.join(mnt, "w"))):
    with open(os.path.join(mnt, "w", n), "rb") as f:
        state["w/" + n] = bytearray(f.read())
os.makedirs(os.path.join(mnt, "new"), exist_ok=True)
held = os.open(os.path.join(mnt, "w", "held"), os.O_WRONLY | os.O_APPEND)  # open throughout
errors, ops, i = [], [], 0
open(ready, "w").close()
while not os.path.exists(stop) or i < 100:
    i += 1
    rel = rng.choice(sorted(state))
    try:
        op = rng.random()
        if op < 0.15:
            chunk = rng.randbytes(rng.randrange(1, 3000))
            os.write(held, chunk)
            state["w/held"] += chunk
        elif op < 0.4:
            chunk = rng.randbytes(rng.randrange(1, 9000))
            with open(os.path.join(mnt, rel), "ab") as f:
                f.write(chunk)
            state[rel] += chunk
        elif op < 0.55 and state[rel]:
            off = rng.randrange(len(state[rel]))
            chunk = rng.randbytes(rng.randrange(1, 6000))
            fd = os.open(os.path.join(mnt, rel), os.O_WRONLY)
            try:
                os.pwrite(fd, chunk, off)
            finally:
                os.close(fd)
            state[rel][off:off + len(chunk)] = chunk
        elif op < 0.75:
            rel = f"new/n{i:05d}"
            state[rel] = bytearray(rng.randbytes(rng.choice([0, 1, 4096, 5000, 70000])))
            with open(os.path.join(mnt, rel), "wb") as f:
                f.write(state[rel])
        elif len(state[rel]) < 2_000_000:
            with open(os.path.join(mnt, rel), "rb") as f:
                if f.read() != state[rel]:
                    errors.append(f"{rel}: read back differs")
        ops.append(time.monotonic())
    except OSError as e:
        errors.append(f"{rel}: {e!r}")
os.close(held)
with open(out, "w") as f:
    json.dump({"files": {k: hashlib.sha256(v).hexdigest() for k, v in state.items()},
               "errors": errors, "ops": ops}, f)
"""


def test_users_keep_working_during_a_mounted_reencryption(tmp_path: Path) -> None:
    seed = _seed()
    pf = tmp_path / "pass"
    pf.write_bytes(PASSPHRASE + b"\n")
    backing = make_volume(tmp_path / "backing")
    with mounted(tmp_path, backing, pf, "mnt") as m:
        (m.mnt / "w").mkdir()
        (m.mnt / "still").mkdir()
        for i in range(40):
            (m.mnt / "w" / f"f{i:02d}").write_bytes(data(f"w{i}", SIZES[i % len(SIZES)]))
        (m.mnt / "w" / "held").write_bytes(data("held", 10_000))
        for i in range(4):
            (m.mnt / "w" / f"big{i}").write_bytes(data(f"wbig{i}", 3 * MIB + i))
            (m.mnt / "still" / f"big{i}").write_bytes(data(f"sbig{i}", 4 * MIB + i))
        for i in range(60):
            (m.mnt / "still" / f"s{i}").write_bytes(data(f"s{i}", 777 * i))
        untouched = snapshot(m.mnt / "still")

        ready, stop, out = tmp_path / "ready", tmp_path / "stop", tmp_path / "writer.json"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(m.mnt), str(ready), str(stop),
                                   str(out), str(seed)], stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: ready.exists() or writer.poll() is not None, 30, "the writer", 0.01)
            assert writer.poll() is None, writer.stderr.read() if writer.stderr else ""
            t0 = time.monotonic()
            res = run_cli("rotate", str(backing), "--reencrypt", "--passphrase-file", str(pf))
            t1 = time.monotonic()
        finally:
            stop.touch()
            _, err = writer.communicate(timeout=60)
        assert writer.returncode == 0, err
        no_traceback(res.stdout, res.stderr)
        assert "done" in res.stdout
        w = json.loads(out.read_text())
        assert w["errors"] == [], f"seed {seed}: {w['errors'][:5]}"
        during = [t for t in w["ops"] if t0 < t < t1]
        assert len(during) >= 10, f"only {len(during)} operations during the rotation ({t1 - t0:.2f} s)"
        for rel, digest in w["files"].items():
            got = hashlib.sha256((m.mnt / rel).read_bytes()).hexdigest()
            assert got == digest, f"seed {seed}: {rel}"
        assert snapshot(m.mnt / "still") == untouched
        assert progress(m.mnt)["state"] == "finished"
    assert_finished(backing, 2)  # files made during the walk too: nothing on the old generation
    fsck_clean(backing, pf)
    with mounted(tmp_path, backing, pf, "again") as m:  # and from a fresh mount
        for rel, digest in w["files"].items():
            assert hashlib.sha256((m.mnt / rel).read_bytes()).hexdigest() == digest, rel


# == 5. progress ===============================================================================
def _on_a_terminal(cmd: list[str]) -> tuple[int, str, str]:
    """Run ``cmd`` with its standard error on a pseudo-terminal (standard output a
    pipe); returns the exit code, what the terminal showed, and standard output."""
    master, slave = os.openpty()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    term = b""
    try:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            term += chunk
    finally:
        os.close(master)
    out = p.stdout.read().decode() if p.stdout else ""
    return p.wait(30), term.decode(), out


@pytest.mark.parametrize("where", ["offline", "mounted"])
def test_progress_with_eta_on_a_terminal_quiet_in_a_pipe(
        where: str, big_template: tuple[Path, Path, dict[str, Any]], tmp_path: Path) -> None:
    src, pf, snap = big_template
    backing = copy_volume(src, tmp_path / "backing")
    with contextlib.ExitStack() as stack:
        if where == "mounted":
            stack.enter_context(mounted(tmp_path, backing, pf, "live"))
        code, term, out = _on_a_terminal(rotate_cmd(backing, "reencrypt", pf))
        assert code == 0, term + out
        assert "ETA" in term and "reencrypt: " in term and " files (" in term, term
        assert "Traceback" not in term
        summary = [line for line in out.splitlines() if "files/s" in line]
        assert len(summary) == 1 and summary[0].startswith("reencrypt: "), out
        assert "MiB/s" in summary[0] and ("through the mount" in summary[0]) == (where == "mounted")
        assert "ETA" not in out

        res = run_cli("rotate", str(backing), "--wrap-key", "--passphrase-file", str(pf))
        assert res.stderr == ""  # a pipe: neither progress nor ETA
        assert "ETA" not in res.stdout and "\r" not in res.stdout
        lines = res.stdout.splitlines()
        assert "files/s" in lines[-2] and lines[-2].startswith("wrap-key: ")
        assert lines[-1].startswith("done")
    assert read_back(tmp_path, backing, pf) == snap


# == 6. v1 slots ================================================================================
def test_v1_slot_refuses_rotation_until_passwd_upgrades_it(tmp_path: Path) -> None:
    backing = tmp_path / "sample"
    shutil.copytree(SAMPLE_V1, backing, symlinks=True)
    manifest = json.loads((backing / "MANIFEST.json").read_text())
    (backing / "MANIFEST.json").unlink()
    old_pf, new_pf = tmp_path / "old", tmp_path / "new"
    old_pf.write_bytes(SAMPLE_PASSPHRASE + b"\n")
    new_pf.write_bytes(b"a new passphrase for the sample\n")
    conf_before = (backing / "cryptfs.conf").read_bytes()
    tree_before = backing_files(backing)
    for kind in ("slots", "wrap-key", "reencrypt"):
        res = run_cli("rotate", str(backing), f"--{kind}", "--passphrase-file", str(old_pf),
                      check=False)
        no_traceback(res.stdout, res.stderr)
        assert res.returncode == 2, res.stdout + res.stderr
        assert "key slot(s) 0 (owner)" in res.stderr and "cryptfs passwd" in res.stderr
    assert (backing / "cryptfs.conf").read_bytes() == conf_before
    assert backing_files(backing) == tree_before

    run_cli("passwd", str(backing), "--passphrase-file", str(old_pf), "--new-passphrase-file",
            str(new_pf))
    assert "public" in conf(backing)["slots"][0]  # upgraded: a v2 slot with a key pair
    res = run_cli("rotate", str(backing), "--reencrypt", "--passphrase-file", str(new_pf))
    no_traceback(res.stdout, res.stderr)
    assert "new key generation 2 (reencrypt)" in res.stdout
    assert_finished(backing, 2)
    after = backing_files(backing)
    assert after.keys() == tree_before.keys()
    assert all(file_id(after[i][1]) != file_id(raw) for i, (_, raw) in tree_before.items())
    files = [e for e in manifest["entries"] if e["type"] in ("file", "sparse")]
    read = 0
    with mounted(tmp_path, backing, new_pf) as m:
        root = os.fsencode(m.mnt)
        for e in manifest["entries"]:
            path = os.path.join(root, bytes.fromhex(e["path"]))
            if e["type"] == "symlink":
                assert os.readlink(path) == e["target"].encode()
            elif e["type"] in ("file", "sparse"):
                with open(path, "rb") as f:
                    assert hashlib.sha256(f.read()).hexdigest() == e["sha256"], e["path"]
                read += 1
    assert read == len(files) > 5
    fsck_clean(backing, new_pf)


# == 7. bad input ===============================================================================
def test_no_kind_is_a_usage_error(template: tuple[Path, Path, dict[str, Any]],
                                  tmp_path: Path) -> None:
    src, pf, _ = template
    backing = copy_volume(src, tmp_path / "backing")
    before = (backing / "cryptfs.conf").read_bytes()
    # none, or two (the last one given used to win silently: --slots --wrap-key re-wrapped)
    for kinds in ([], ["--slots", "--wrap-key"], ["--reencrypt", "--slots"]):
        res = run_cli("rotate", str(backing), *kinds, "--passphrase-file", str(pf), check=False)
        assert res.returncode == 2 and "choose one of --slots, --wrap-key, --reencrypt" \
            in res.stderr, kinds
        no_traceback(res.stdout, res.stderr)
    assert (backing / "cryptfs.conf").read_bytes() == before


@pytest.mark.parametrize("case", ["wrong passphrase", "not a volume", "bad recovery key"])
def test_bad_input_is_refused_cleanly(case: str, template: tuple[Path, Path, dict[str, Any]],
                                      tmp_path: Path) -> None:
    src, pf, _ = template
    backing = copy_volume(src, tmp_path / "backing")
    before = (backing / "cryptfs.conf").read_bytes()
    extra: list[str] = []
    target, code, text = backing, 3, "wrong passphrase"
    if case == "wrong passphrase":
        pf = tmp_path / "wrong"
        pf.write_bytes(b"not the passphrase\n")
    elif case == "not a volume":
        target = tmp_path / "plain"
        target.mkdir()
        code, text = 4, "not a cryptfs volume"
    else:
        (tmp_path / "rk").write_text("nothing like a key\n")
        extra = ["--recovery-key", str(tmp_path / "rk")]
        code, text = 2, "not a cryptfs recovery key file"
    res = run_cli("rotate", str(target), "--wrap-key", "--passphrase-file", str(pf), *extra,
                  check=False)
    assert res.returncode == code and text in res.stderr, res.stdout + res.stderr
    no_traceback(res.stdout, res.stderr)
    assert (backing / "cryptfs.conf").read_bytes() == before


def test_an_offline_rotation_holds_off_mounts_and_other_rotations(
        template: tuple[Path, Path, dict[str, Any]], tmp_path: Path) -> None:
    src, pf, snap = template
    backing = copy_volume(src, tmp_path / "backing")
    before = (backing / "cryptfs.conf").read_bytes()
    # What an offline rotation holds while it walks: an exclusive lock on BACKING.
    fd = rot.hold_volume(str(backing), exclusive=True)
    try:
        res = run_cli("rotate", str(backing), "--reencrypt", "--passphrase-file", str(pf), check=False)
        no_traceback(res.stdout, res.stderr)
        assert res.returncode == 2 and "is in use" in res.stderr, res.stderr
        m = new_mount(tmp_path, backing, pf)
        m.mnt.mkdir()
        res = run_cli("mount", str(backing), str(m.mnt), "--passphrase-file", str(pf), check=False)
        no_traceback(res.stdout, res.stderr)
        assert res.returncode == 5 and "an offline rotation is running" in res.stderr, res.stderr
        assert not os.path.ismount(m.mnt)
    finally:
        os.close(fd)
    assert (backing / "cryptfs.conf").read_bytes() == before
    # A real offline rotation, caught (and held still: SIGSTOP) while it walks:
    # a mount and a second rotation are refused the same way.
    with mounted(tmp_path, backing, pf, "fill") as m:
        for i in range(2):
            (m.mnt / f"big{i}").write_bytes(data(f"lock{i}", 4 * MIB))
    p = subprocess.Popen(rotate_cmd(backing, "reencrypt", pf), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (backing / (JOURNAL + ".tmp")).exists() or p.poll() is not None, 20,
                 "the walk", 0)
        os.kill(p.pid, signal.SIGSTOP)
        assert p.poll() is None, "the rotation ended before it could be caught"
        big = tmp_path / "big"
        big.mkdir()
        res = run_cli("mount", str(backing), str(big), "--passphrase-file", str(pf), check=False)
        no_traceback(res.stdout, res.stderr)
        assert res.returncode == 5 and "an offline rotation is running" in res.stderr, res.stderr
        assert not os.path.ismount(big)
        res = run_cli("rotate", str(backing), "--wrap-key", "--passphrase-file", str(pf), check=False)
        no_traceback(res.stdout, res.stderr)
        assert res.returncode == 2 and "is in use" in res.stderr, res.stderr
    finally:
        os.kill(p.pid, signal.SIGCONT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, out + err
    assert_finished(backing, 2)
    assert read_back(tmp_path, backing, pf).items() >= snap.items()


def test_rotation_refuses_a_volume_mounted_twice(template: tuple[Path, Path, dict[str, Any]],
                                                 tmp_path: Path) -> None:
    """Only one mount can walk the files; another would keep old keys and file
    keys (it served EIO for every file once: /tmp/bugs/rotate-two-mounts.md).
    (A second plain mount is refused at mount time: both share storage here.)"""
    src, pf, snap = template
    backing = copy_volume(src, tmp_path / "backing")
    before = (backing / "cryptfs.conf").read_bytes()
    with mounted(tmp_path, backing, pf, "one", "--shared-storage") as one, \
            mounted(tmp_path, backing, pf, "two", "--shared-storage") as two:
        for kind in ("slots", "reencrypt"):
            res = run_cli("rotate", str(backing), f"--{kind}", "--passphrase-file", str(pf),
                          check=False)
            no_traceback(res.stdout, res.stderr)
            assert res.returncode == 2, res.stdout + res.stderr
            assert "mounted 2 times" in res.stderr, res.stderr
            assert str(one.mnt) in res.stderr and str(two.mnt) in res.stderr
        assert (backing / "cryptfs.conf").read_bytes() == before
        assert snapshot(one.mnt) == snap and snapshot(two.mnt) == snap


def test_a_mounted_volume_named_through_a_symlink_is_rotated_by_its_mount(
        template: tuple[Path, Path, dict[str, Any]], tmp_path: Path) -> None:
    src, pf, snap = template
    backing = copy_volume(src, tmp_path / "backing")
    link = tmp_path / "backing-link"
    link.symlink_to(backing)
    with mounted(tmp_path, backing, pf, "mnt") as m:
        res = run_cli("rotate", str(link), "--wrap-key", "--passphrase-file", str(pf), check=False)
        no_traceback(res.stdout, res.stderr)
        assert res.returncode == 0, res.stderr
        assert f"through the mount on {m.mnt}" in res.stdout
        assert snapshot(m.mnt) == snap
    assert_finished(backing, 2)


def test_a_damaged_journal_is_refused_clearly(template: tuple[Path, Path, dict[str, Any]],
                                              tmp_path: Path) -> None:
    src, pf, snap = template
    backing = copy_volume(src, tmp_path / "backing")
    (backing / JOURNAL).write_bytes(b"not a journal at all")
    before = (backing / "cryptfs.conf").read_bytes()
    res = run_cli("rotate", str(backing), "--reencrypt", "--passphrase-file", str(pf), check=False)
    no_traceback(res.stdout, res.stderr)
    assert res.returncode == 4 and f"{JOURNAL} is damaged" in res.stderr, res.stderr
    assert (backing / "cryptfs.conf").read_bytes() == before
    assert (backing / JOURNAL).read_bytes() == b"not a journal at all"  # kept for a human
    # A mount does not serve a volume with a re-encryption it cannot finish: it
    # says so (the file the journal is for may be half rewritten).
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run_cli("mount", str(backing), str(mnt), "--passphrase-file", str(pf), check=False)
    no_traceback(res.stdout, res.stderr)
    assert res.returncode != 0 and f"{JOURNAL} is damaged" in res.stderr, res.stderr
    assert not os.path.ismount(mnt)
    # Once a human has dealt with it (here: it named no file at all), all is well.
    (backing / JOURNAL).unlink()
    assert read_back(tmp_path, backing, pf) == snap
