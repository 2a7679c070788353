"""Regression tests for the security review (findings 1-8, /tmp/bugs/review-*.md) and
commit 7a54935 that answers it, on real components: CLI processes, real FUSE mounts,
a real key agent with real system users.

1. a forged config: an outsider's (no key) is refused by passphrase unlock, mount,
   fsck and recovery; a removed user's, or an old config put back, is not followed
   by a running passphrase mount or a running agent (a cold unlock accepting a
   former user's forgery is the documented limit: README, docs/FORMAT.md);
2. ``user remove --revoke`` during an unfinished rotation makes a new generation;
3. a config change made during a mounted rotation survives its finish;
4. a pending re-encryption journal is never overwritten, and a mount refuses to
   start when it cannot be replayed;
5. a directory the walk cannot list keeps the old generation;
6. a file the walk cannot rewrite does not abort the walk and keeps the old generation;
7. the directory policy fails closed when a directory's path cannot be worked out;
8. root's own key is used on an agent mount.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pwd
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import CRYPTFS as CRYPTFS_CLI
from conftest import PASSPHRASE, Mount, make_volume, new_mount, require_fuse, run_cli
from cryptfs import rotate as rot
from cryptfs.config import (
    _SLOT_MASTER_LABEL,
    Recovery,
    VolumeConfig,
    _slot_master_ad,
    b64e,
    load_config,
    save_config,
)
from cryptfs.content import ContentFile, read_stanzas
from cryptfs.errors import NotAVolume, WrongPassphrase
from cryptfs.keys import VolumeKeys
from cryptfs.modes import x25519
from cryptfs.modes.errors import IntegrityError, NotARecipient
from cryptfs.modes.rand import random_bytes
from cryptfs.secret import Secret
from cryptfs.volume import open_volume
from multiuser import (
    ROOT_PASSPHRASE,
    USERS,
    Shared,
    backing_of,
    cli_as,
    give_recovery_key,
    make_shared_volume,
    run_as,
    shared_scenario,
    shared_tempdir,
)

pytestmark = pytest.mark.mount

ALICE, BOB, CAROL = "cfs-alice", "cfs-bob", "cfs-carol"
PADDING, SYMMETRIC, X25519 = 0, 1, 2
KDF_ARGS = ("--kdf-memory", "8", "--kdf-iterations", "1")
CSV = b"customer;card\nsmith;4111 1111 1111 1111\n"
BIG_FILES = 72  # x 8 MiB: a --reencrypt walk that lasts long enough to change the config during it


# -- helpers ----------------------------------------------------------------------------------------

def pass_file(directory: Path, name: str, secret: bytes) -> Path:
    p = directory / f"{name}.pass"
    p.write_bytes(secret + b"\n")
    p.chmod(0o644)
    return p


def conf_bytes(backing: Path) -> bytes:
    return (backing / "cryptfs.conf").read_bytes()


def put_conf(backing: Path, data: bytes) -> None:
    """Replace cryptfs.conf the way someone with write access to the backing directory would."""
    tmp = backing / "cryptfs.conf.planted"
    tmp.write_bytes(data)
    os.replace(tmp, backing / "cryptfs.conf")


def backing_files(backing: Path) -> list[tuple[str, Path]]:
    """(path relative to the tree, backing path) of every file of the volume."""
    out = []
    for dfd, name, rel in rot.regular_files(str(backing / "tree")):
        out.append((rel, Path(os.readlink(f"/proc/self/fd/{dfd}")) / name))
    return sorted(out)




def stanzas_of(path: Path) -> list[tuple[int, bytes]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return [(st.type, bytes(st.body)) for st in read_stanzas(fd)]
    finally:
        os.close(fd)


def symmetric_generations(path: Path) -> list[int]:
    """The key generations (key_id) of a header's symmetric stanzas (docs/FORMAT.md)."""
    return [struct.unpack(">I", body[:4])[0] for t, body in stanzas_of(path) if t == SYMMETRIC]


def opened_with(path: Path, keys: VolumeKeys, privates: list[bytes]) -> bytes | None:
    """The plaintext of a backing file if these keys open its header, else None."""
    fd = os.open(path, os.O_RDONLY)
    try:
        cf = ContentFile.load(fd, keys.keyring(privates))
        return cf.read(0, 1 << 24)
    except (IntegrityError, NotARecipient):
        return None
    finally:
        os.close(fd)


def forge_as_former_user(backing: Path, kept: bytes, passphrase: bytes, name: str,
                         shrink: bool = False) -> tuple[VolumeConfig, VolumeKeys, bytes]:
    """What a removed user who kept an old config (and so the base and authority keys)
    can write: the current config's public parts, a master of their choosing wrapped to
    every slot with the authority key, their own slot added back, no (valid) chain.
    Returns the config, its keys and the user's X25519 private key."""
    old = VolumeConfig.from_bytes(kept)
    old_keys, slot, user_key = old.unlock(Secret(passphrase))
    base = old_keys.base.reveal()
    cfg = load_config(str(backing))
    master = random_bytes(32)
    keys = VolumeKeys(Secret(master), cfg.key_id + 1, Secret(base))
    cfg.key_id = keys.key_id
    cfg.base = keys.base_wrap.seal(base, cfg.volume_id)
    cfg.retired, cfg.rotation, cfg.chain = {}, None, None
    assert user_key is not None  # a v2 slot
    private = user_key.reveal()[:32]
    cfg.slots.append(old.make_slot(keys, Secret(passphrase), name,
                                   slot_id=max(s.id for s in cfg.slots) + 1,
                                   private=Secret(private), **slot.extra))
    for s in cfg.slots:
        s.master = x25519.wrap(master, s.public, _SLOT_MASTER_LABEL,
                               _slot_master_ad(cfg.volume_id, s.id, cfg.key_id, keys.authority))
        if shrink:
            s.created, s.label = "-", s.label[:1]
    if shrink:
        cfg.created = "-"
    if cfg.recovery is not None:
        cfg.recovery = Recovery.to(cfg.recovery.public, Secret(master), cfg.volume_id,
                                   keys.authority)
    cfg.seal(keys)
    old_keys.close()
    return cfg, keys, private


def compact_bytes(cfg: VolumeConfig) -> bytes:
    """The config as compact JSON (the MAC covers the canonical body, not the layout)."""
    d = cfg.body()
    d["mac"] = b64e(cfg.mac)
    return json.dumps(d, separators=(",", ":"), sort_keys=True).encode()


def wait_for(pred: Callable[[], bool], timeout: float = 10, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return pred()


# -- 1. forged configs ------------------------------------------------------------------------------

def _outsider_forgery(backing: Path, bind_recovery: bool) -> None:
    """Someone with write access to the backing directory and no key at all: a master of
    their choosing wrapped to every public key in the config, the config re-MACed.  They
    cannot know the authority key, so the best they can bind is one derived from their
    own master (or, ``bind_recovery=False``, none for the recovery key)."""
    cfg = load_config(str(backing))
    master = random_bytes(32)
    keys = VolumeKeys(Secret(master), cfg.key_id)  # no `base`: base = this master
    cfg.base = None
    for s in cfg.slots:
        s.master = x25519.wrap(master, s.public, _SLOT_MASTER_LABEL,
                               _slot_master_ad(cfg.volume_id, s.id, cfg.key_id, keys.authority))
    assert cfg.recovery is not None
    cfg.recovery = Recovery.to(cfg.recovery.public, Secret(master), cfg.volume_id,
                               keys.authority if bind_recovery else None)
    cfg.seal(keys)
    save_config(str(backing), cfg)


@pytest.mark.parametrize("bind_recovery", [True, False], ids=["recovery-bound", "recovery-unbound"])
def test_outsiders_forged_config_is_refused_by_unlock_mount_fsck_and_recovery(
        tmp_path: Path, bind_recovery: bool) -> None:
    require_fuse()
    backing = make_shared_volume(tmp_path / "backing")
    key = tmp_path / "recovery.key"
    give_recovery_key(backing, ROOT_PASSPHRASE, key)
    assert key.read_text().count("CRYPTFS-RECOVERY-KEY-2:") == 1
    root_pass = pass_file(tmp_path, "root", ROOT_PASSPHRASE)
    alice_pass = pass_file(tmp_path, "alice", USERS[ALICE][1])
    m = new_mount(tmp_path, backing, root_pass)
    m.start()
    try:
        m.path("crm").mkdir()
        m.path("crm", "customers.csv").write_bytes(CSV)
    finally:
        m.stop()
    real = conf_bytes(backing)

    _outsider_forgery(backing, bind_recovery)
    assert conf_bytes(backing) != real

    for pw in (ROOT_PASSPHRASE, USERS[ALICE][1]):
        with pytest.raises(NotAVolume, match="failed authentication"):
            open_volume(str(backing), Secret(pw))
    res = run_cli("mount", str(backing), str(m.mnt), "--passphrase-file", str(alice_pass),
                  check=False)
    assert res.returncode == 4 and "failed authentication" in res.stderr
    assert not os.path.ismount(m.mnt)
    res = run_cli("fsck", str(backing), "--passphrase-file", str(root_pass), check=False)
    assert res.returncode == 4 and "failed authentication" in res.stderr
    assert "clean" not in res.stdout
    out = tmp_path / "recovered-forged"
    res = run_cli("recover", str(backing), "--recovery-key", str(key), "--out", str(out),
                  check=False)
    assert res.returncode == 4, res.stdout + res.stderr
    assert not out.exists() or not any(out.rglob("*"))

    # The real config put back: everything is there, through every door.
    put_conf(backing, real)
    res = run_cli("fsck", str(backing), "--passphrase-file", str(root_pass))
    assert "clean" in res.stdout
    out = tmp_path / "recovered"
    run_cli("recover", str(backing), "--recovery-key", str(key), "--out", str(out))
    assert (out / "crm" / "customers.csv").read_bytes() == CSV
    m.passfile = alice_pass
    m.start()
    try:
        assert m.path("crm", "customers.csv").read_bytes() == CSV
    finally:
        m.stop()


def test_passphrase_mount_does_not_follow_a_removed_users_forgery_or_an_old_config(
        tmp_path: Path) -> None:
    backing = make_shared_volume(tmp_path / "backing")
    root_pass = pass_file(tmp_path, "root", ROOT_PASSPHRASE)
    m = new_mount(tmp_path, backing, root_pass)
    m.start()
    try:
        m.path("before.txt").write_bytes(CSV)
        kept = conf_bytes(backing)  # bob's copy, while he is a user
        out = run_cli("user", "remove", str(backing), BOB, "--revoke",
                      "--passphrase-file", str(root_pass)).stdout
        assert "through the mount" in out and "access revoked" in out
        real = load_config(str(backing))
        assert real.key_id == 2 and BOB not in [s.label for s in real.slots]
        real_bytes = conf_bytes(backing)

        # bob (removed) forges generation 3 with his slot back and a master he knows.
        forged, forged_keys, bob_private = forge_as_former_user(backing, kept, USERS[BOB][1], BOB)
        save_config(str(backing), forged)
        m.path("after-forgery.txt").write_bytes(b"written after the forgery\n")
        assert m.path("after-forgery.txt").read_bytes() == b"written after the forgery\n"
        assert m.path("before.txt").read_bytes() == CSV
        assert "not followed" in m.log_text()
        files = dict(backing_files(backing))
        assert len(files) == 2
        for path in files.values():
            assert symmetric_generations(path) == [2]  # the real generation, not bob's 3
            assert opened_with(path, forged_keys, [bob_private]) is None

        # The documented limit (README, docs/FORMAT.md "Not detected"): a cold unlock
        # cannot check the chain, so it accepts a former user's forgery.
        vol = open_volume(str(backing), Secret(USERS[ALICE][1]))
        try:
            assert vol.keys.key_id == 3 and BOB in [s.label for s in vol.config.slots]
        finally:
            vol.close()

        # An old config put back (bob's kept copy: generation 1, his slot in it).
        put_conf(backing, kept)
        m.path("after-rollback.txt").write_bytes(b"written after the rollback\n")
        assert m.log_text().count("not followed") >= 2
        old_vol = VolumeConfig.from_bytes(kept)
        old_keys, _, old_user_key = old_vol.unlock(Secret(USERS[BOB][1]))
        assert old_user_key is not None
        try:
            files = dict(backing_files(backing))
            assert len(files) == 3
            for path in files.values():
                assert symmetric_generations(path) == [2]
                assert opened_with(path, old_keys, [old_user_key.reveal()]) is None
        finally:
            old_keys.close()
        assert m.path("after-rollback.txt").read_bytes() == b"written after the rollback\n"
        put_conf(backing, real_bytes)
    finally:
        m.stop()
    m.start()
    try:
        assert m.path("before.txt").read_bytes() == CSV
        assert m.path("after-forgery.txt").read_bytes() == b"written after the forgery\n"
        assert m.path("after-rollback.txt").read_bytes() == b"written after the rollback\n"
    finally:
        m.stop()


def _root_unlocked_shared_dir(s: Shared) -> Path:
    res = subprocess.run([*CRYPTFS_CLI, "unlock", str(s.mount.mnt), "--passphrase-file",
                          str(s.passfiles["root"])], env={**os.environ, **s.agent.env},
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    d = s.path("shared")
    d.mkdir()
    d.chmod(0o1777)
    res = subprocess.run([*CRYPTFS_CLI, "lock"], env={**os.environ, **s.agent.env},
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return d


def _unlock_ok(s: Shared, user: str) -> None:
    res = s.unlock(user)
    assert res.returncode == 0 and res.stdout.startswith("unlocked "), res.stdout + res.stderr


def _write_as(user: str, path: Path, data: bytes) -> subprocess.CompletedProcess[bytes]:
    return run_as(user, "/bin/sh", "-c", f"cat > '{path}'", input=data)


def test_agent_does_not_follow_a_removed_users_forgery_or_an_old_config() -> None:
    require_fuse()
    with shared_scenario() as s:
        shared = _root_unlocked_shared_dir(s)
        _unlock_ok(s, ALICE)
        before = shared / "before.txt"
        assert _write_as(ALICE, before, CSV).returncode == 0
        kept = conf_bytes(s.backing)  # bob's copy, while he is a user
        out = run_cli("user", "remove", str(s.backing), BOB, "--revoke",
                      "--passphrase-file", str(s.passfiles["root"])).stdout
        assert "access revoked" in out
        assert wait_for(lambda: "rotated to generation 2; sessions follow" in s.agent.log_text(), 8)
        assert run_as(ALICE, "cat", str(before)).stdout == CSV  # alice followed
        real = conf_bytes(s.backing)

        # bob forges generation 3: the agent does not follow, every session ends.
        forged, forged_keys, bob_private = forge_as_former_user(s.backing, kept, USERS[BOB][1], BOB)
        save_config(str(s.backing), forged)
        assert wait_for(lambda: "not followed" in s.agent.log_text(), 8), s.agent.log_text()
        res = run_as(ALICE, "cat", str(before))
        assert res.returncode != 0 and CSV not in res.stdout
        res = _write_as(ALICE, shared / "after-forgery.txt", b"would be bob's\n")
        assert res.returncode != 0
        assert len(backing_files(s.backing)) == 1
        assert opened_with(backing_files(s.backing)[0][1], forged_keys, [bob_private]) is None

        # The real config back: alice unlocks again and finds her file.
        put_conf(s.backing, real)
        _unlock_ok(s, ALICE)
        assert run_as(ALICE, "cat", str(before)).stdout == CSV

        # An old config put back (generation 1, bob's slot in it): not followed either.
        put_conf(s.backing, kept)
        assert wait_for(lambda: s.agent.log_text().count("not followed") >= 2, 8)
        res = run_as(ALICE, "cat", str(before))
        assert res.returncode != 0 and CSV not in res.stdout
        # Every session ended, so nothing held can check a chain; but the agent that
        # refused this config does not take it from a cold unlock either.
        res = s.unlock(BOB)
        assert res.returncode != 0 and "refused by the running agent" in res.stderr, \
            res.stdout + res.stderr
        assert "this agent refused the volume's config earlier and last verified generation " \
            "2" in s.agent.log_text()
        res = run_as(BOB, "cat", str(before))
        assert res.returncode != 0 and CSV not in res.stdout
        for line in s.agent.log_text().splitlines():
            assert "rotated to generation 1" not in line and "rotated to generation 3" not in line
        # The generation it last verified, put back, is unlocked again (and lifts that).
        put_conf(s.backing, real)
        _unlock_ok(s, ALICE)
        assert run_as(ALICE, "cat", str(before)).stdout == CSV
        assert "unlocks are allowed again" in s.agent.log_text()


def _overwrite_keeping_stamp(backing: Path, data: bytes) -> None:
    """Rewrite cryptfs.conf in place with the same inode, size and mtime, padding ``data``
    with JSON whitespace (the ctime changes: the config watches see it within a period)."""
    p = backing / "cryptfs.conf"
    st = os.stat(p)
    assert len(data) <= st.st_size, (len(data), st.st_size)
    fd = os.open(p, os.O_WRONLY)
    try:
        os.pwrite(fd, data + b" " * (st.st_size - len(data)), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = os.stat(p)
    assert (now.st_ino, now.st_mtime_ns, now.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size)


def test_agent_unlock_does_not_switch_a_held_volume_to_an_unchained_generation() -> None:
    """The removed user unlocks as the config watch judges the forged config, before or
    after it (the file keeps its inode, size and mtime; its ctime tells the watch).
    Before: the unlock's own chain check refuses it (``Store.open`` once replaced the
    held master with the forged one, silently).  After: every session has ended and
    the unlock is a cold one, which the agent that refused this config refuses too."""
    require_fuse()
    with shared_scenario() as s:
        shared = _root_unlocked_shared_dir(s)
        _unlock_ok(s, ALICE)
        kept = conf_bytes(s.backing)
        run_cli("user", "remove", str(s.backing), BOB, "--revoke",
                "--passphrase-file", str(s.passfiles["root"]))
        assert wait_for(lambda: "rotated to generation 2; sessions follow" in s.agent.log_text(), 8)
        forged, _, _ = forge_as_former_user(s.backing, kept, USERS[BOB][1], BOB, shrink=True)
        _overwrite_keeping_stamp(s.backing, compact_bytes(forged))
        bob = s.unlock(BOB)
        assert bob.returncode != 0, bob.stdout + bob.stderr
        bob_write = _write_as(BOB, shared / "bob.txt", b"bob is back\n")
        time.sleep(3)  # more than one config-watch period
        # Either refusal is fine (refuse bob's unlock, or end the sessions as the config
        # watch does): what must not happen is a silent switch to bob's generation.
        assert "not followed" in s.agent.log_text(), (bob.stdout, s.agent.log_text())
        assert bob_write.returncode != 0
        assert not any(rel.endswith("bob.txt") for rel, _ in backing_files(s.backing))


# -- 2. revoke during an unfinished rotation -----------------------------------------------------

@pytest.mark.parametrize("where", ["offline", "mounted"])
def test_revoke_during_an_unfinished_rotation_makes_a_new_generation(
        tmp_path: Path, where: str) -> None:
    require_fuse()
    backing = make_shared_volume(tmp_path / "backing")
    root_pass = pass_file(tmp_path, "root", ROOT_PASSPHRASE)
    data = {f"f{i:02d}.bin": os.urandom(40_000 + i) for i in range(12)}
    m = new_mount(tmp_path, backing, root_pass)
    m.start()
    try:
        m.path("sub").mkdir()
        for name, blob in data.items():
            m.path("sub" if name < "f06" else "", name).write_bytes(blob)
    finally:
        m.stop()
    # A --reencrypt that never got past its first step (killed: power cut, crash, ENOSPC).
    vol = open_volume(str(backing), Secret(ROOT_PASSPHRASE))
    try:
        assert rot.begin(vol, "reencrypt")
    finally:
        vol.close()
    unfinished = load_config(str(backing))
    assert unfinished.key_id == 2 and unfinished.rotation is not None
    assert unfinished.rotation["kind"] == "reencrypt"
    kept = conf_bytes(backing)  # bob, still a user, has the config as it is now
    kept_cfg = VolumeConfig.from_bytes(kept)
    bob_keys, _, bob_user_key = kept_cfg.unlock(Secret(USERS[BOB][1]))
    assert bob_user_key is not None
    files = backing_files(backing)
    assert len(files) == 12
    assert all(opened_with(p, bob_keys, [bob_user_key.reveal()]) is not None for _, p in files)

    if where == "mounted":
        m.start()
    try:
        res = run_cli("user", "remove", str(backing), BOB, "--revoke",
                      "--passphrase-file", str(root_pass))
        assert "new key generation 3 (reencrypt)" in res.stdout, res.stdout
        assert ("through the mount" in res.stdout) == (where == "mounted")
        assert "access revoked" in res.stdout
        cfg = load_config(str(backing))
        assert cfg.key_id == 3 and cfg.rotation is None and not cfg.retired
        assert BOB not in [s.label for s in cfg.slots]
        with pytest.raises(WrongPassphrase):
            cfg.unlock(Secret(USERS[BOB][1]))
        # bob's kept config and passphrase (generation 2, and 1 retired in it) open no
        # file key of the volume any more.
        files = backing_files(backing)
        assert len(files) == 12
        for _, p in files:
            assert symmetric_generations(p) == [3]
            assert opened_with(p, bob_keys, [bob_user_key.reveal()]) is None
        if where == "offline":
            m.start()
        for name, blob in data.items():
            assert m.path("sub" if name < "f06" else "", name).read_bytes() == blob
    finally:
        m.stop()
        bob_keys.close()


# -- 3. a config change made during a mounted rotation -------------------------------------------

def test_config_changes_made_during_a_mounted_rotation_survive_its_finish(tmp_path: Path) -> None:
    require_fuse()
    backing = make_shared_volume(tmp_path / "backing")
    root_pass = pass_file(tmp_path, "root", ROOT_PASSPHRASE)
    m = new_mount(tmp_path, backing, root_pass)
    m.start()
    try:
        blob = os.urandom(8 << 20)
        for i in range(BIG_FILES):
            m.path(f"big{i:02d}").write_bytes(blob)
        rotation = subprocess.Popen(
            [*CRYPTFS_CLI, "rotate", str(backing), "--reencrypt", "--passphrase-file",
             str(root_pass)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_for(lambda: "walking the files" in m.log_text(), 20, 0.02), m.log_text()
            t0 = time.monotonic()
            res = run_cli("policy", "set", str(backing), "/h", "--mode", "hybrid",
                          "--passphrase-file", str(root_pass))
            assert res.stdout.startswith("/h: hybrid")
            run_cli("user", "remove", str(backing), CAROL, "--passphrase-file", str(root_pass))
            changes_took = time.monotonic() - t0
            # Both changes were made while the walk ran (else this test proves nothing).
            assert rotation.poll() is None and "walked" not in m.log_text(), \
                f"the walk ended within {changes_took:.1f} s: give it more files"
            out, err = rotation.communicate(timeout=120)
        finally:
            if rotation.poll() is None:
                rotation.kill()
        assert rotation.returncode == 0, out + err
        assert "done: the old key generations are forgotten" in out
        cfg = load_config(str(backing))
        assert cfg.key_id == 2 and cfg.rotation is None and not cfg.retired
        assert CAROL not in [s.label for s in cfg.slots]
        with pytest.raises(WrongPassphrase):
            cfg.unlock(Secret(USERS[CAROL][1]))
        shown = run_cli("policy", "show", str(backing), "--passphrase-file", str(root_pass)).stdout
        assert "/h: hybrid" in shown
        # ...and the mount applies it: a new file in /h is wrapped to its creator only.
        m.path("h").mkdir()
        m.path("h", "new.txt").write_bytes(CSV)
        assert m.path("h", "new.txt").read_bytes() == CSV
        types = [t for t, _ in stanzas_of(backing_of(backing, ROOT_PASSPHRASE, "h/new.txt"))]
        assert SYMMETRIC not in types and types.count(X25519) == 1
        assert m.path("big00").read_bytes() == blob
    finally:
        for i in range(BIG_FILES):  # (do not leave half a GiB in pytest's kept tmp dirs)
            with contextlib.suppress(OSError):
                m.path(f"big{i:02d}").unlink()
        m.stop()


# -- 4. a pending re-encryption journal ----------------------------------------------------------

def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _fill(path: Path) -> None:
    """Write ``path`` until its file system is full."""
    chunk = os.urandom(1 << 20)
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(chunk)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                return


def test_pending_journal_is_never_overwritten_and_a_mount_refuses_to_start(
        tmp_path: Path, passfile: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_fuse()
    fs = tmp_path / "fs"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(fs)], check=True)
    m = new_mount(tmp_path, fs / "backing", passfile)
    try:
        backing = make_volume(fs / "backing")
        big, notes = os.urandom(6 << 20), b"notes that must survive\n"
        m.start()
        try:
            m.path("big.bin").write_bytes(big)
            m.path("notes.txt").write_bytes(notes)
        finally:
            m.stop()

        # A re-encryption of big.bin stops half-way through copying the new image over
        # the file (its old header, so its old file key, is gone): the journal is then
        # the only full copy of big.bin.
        vol = open_volume(str(backing), Secret(PASSPHRASE))
        try:
            assert rot.begin(vol, "reencrypt")
            rel, path = next((r, p) for r, p in backing_files(backing)
                             if p.stat().st_size > 1 << 20)

            def half_apply(jfd: int, fd: int, length: int, *_: object) -> None:
                os.ftruncate(fd, 0)
                os.pwrite(fd, os.pread(jfd, length // 2, 0), 0)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(rot, "_apply", half_apply)
            fd = os.open(path, os.O_RDWR)
            try:
                with pytest.raises(OSError):
                    rot.rotate_one(fd, None, vol.keys.keyring(), vol.keys, vol.config,
                                   "reencrypt", str(backing), f"tree/{rel}")
            finally:
                os.close(fd)
            monkeypatch.undo()
        finally:
            vol.close()
        journal = backing / rot.JOURNAL
        digest = _digest(journal)

        # The disk is full, so the journal cannot be copied back: no mount, no rotation,
        # and neither touches the journal.
        _fill(fs / "ballast")
        res = run_cli("mount", str(backing), str(m.mnt), "--passphrase-file", str(passfile),
                      "--log-file", str(m.log), check=False)
        assert res.returncode != 0
        assert "interrupted re-encryption cannot be finished" in res.stderr, res.stderr
        assert not os.path.ismount(m.mnt)
        res = run_cli("rotate", str(backing), "--reencrypt", "--passphrase-file", str(passfile),
                      check=False)
        assert res.returncode != 0 and "No space left" in res.stderr, res.stdout + res.stderr
        assert _digest(journal) == digest

        # Space again, but the journal is out of the way while the volume is mounted
        # (as if it appeared during the mount): a rotation through the mount must not
        # write its own journal over it.
        (fs / "ballast").unlink()
        os.rename(journal, fs / "journal.aside")
        m.start()
        try:
            with pytest.raises(OSError) as e:
                m.path("big.bin").read_bytes()  # half of it is the new image
            assert e.value.errno == errno.EIO
            os.rename(fs / "journal.aside", journal)
            res = run_cli("rotate", str(backing), "--reencrypt", "--passphrase-file",
                          str(passfile), check=False)
            assert res.returncode != 0, res.stdout + res.stderr
            assert "through the mount" in res.stdout and "old key generation is kept" in res.stderr
            assert _digest(journal) == digest
            assert m.path("notes.txt").read_bytes() == notes
            assert load_config(str(backing)).retired  # the old generation is kept
        finally:
            m.stop()

        # The next mount copies the journal back: big.bin is whole again.
        m.start()
        try:
            assert "finished the interrupted re-encryption" in m.log_text()
            assert not journal.exists()
            assert m.path("big.bin").read_bytes() == big
            assert m.path("notes.txt").read_bytes() == notes
        finally:
            m.stop()
        res = run_cli("rotate", str(backing), "--reencrypt", "--passphrase-file", str(passfile))
        assert "done: the old key generations are forgotten" in res.stdout
        assert "clean" in run_cli("fsck", str(backing), "--passphrase-file", str(passfile)).stdout
    finally:
        m.stop()
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


# -- 5./6. what the walk cannot list or rewrite --------------------------------------------------

def _chown_tree(top: Path, user: str) -> None:
    pw = pwd.getpwnam(user)
    os.chown(top, pw.pw_uid, pw.pw_gid)
    for d, dirs, files in os.walk(top):
        for n in dirs + files:
            os.chown(os.path.join(d, n), pw.pw_uid, pw.pw_gid, follow_symlinks=False)


def _alices_volume(files: dict[str, bytes]) -> tuple[Path, Path, Mount]:
    """A volume of cfs-alice's own (her passphrase, her files in the backing directory),
    under a 0755 directory she can reach; mounted by root (non-root FUSE is not allowed
    here) with her passphrase."""
    d = shared_tempdir("cryptfs-review-")
    pw = pass_file(d, "alice", USERS[ALICE][1])
    backing = d / "b"
    run_cli("init", "--no-recovery-key", str(backing), "--user", ALICE, "--passphrase-file", str(pw),
            *KDF_ARGS)
    m = new_mount(d, backing, pw)
    m.start()
    try:
        for rel, data in files.items():
            m.path(rel).parent.mkdir(parents=True, exist_ok=True)
            m.path(rel).write_bytes(data)
    finally:
        m.stop()
    return backing, pw, m


def _all_read(m: Mount, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert m.path(rel).read_bytes() == data, rel


def _generations(backing: Path) -> list[list[int]]:
    return [symmetric_generations(p) for _, p in backing_files(backing)]


def test_unlistable_directory_keeps_the_old_generation_and_every_file_reads() -> None:
    require_fuse()
    files = {"private/return.txt": b"tax 2025\n", "pub.txt": b"public\n"}
    backing, pw, m = _alices_volume(files)
    try:
        m.start()
        try:
            m.path("private").chmod(0o000)  # alice's own doing; the backing directory mirrors it
        finally:
            m.stop()
        _chown_tree(backing, ALICE)
        res = cli_as(ALICE, "rotate", str(backing), "--wrap-key", "--passphrase-file", str(pw))
        assert res.returncode == 7 and "Permission denied" in res.stderr, res.stdout + res.stderr
        assert "done" not in res.stdout
        cfg = load_config(str(backing))
        assert cfg.key_id == 2 and set(cfg.retired) == {1} and cfg.rotation is not None
        m.start()
        try:
            m.path("private").chmod(0o700)
            _all_read(m, files)
        finally:
            m.stop()
        # The file the walk could not see still names generation 1, which is kept.
        assert symmetric_generations(backing_of(backing, USERS[ALICE][1], "private/return.txt")) == [1]
        # Once it can be listed, the same command finishes, and still every file reads.
        res = cli_as(ALICE, "rotate", str(backing), "--wrap-key", "--passphrase-file", str(pw))
        assert res.returncode == 0 and "done: the old key generations are forgotten" in res.stdout
        cfg = load_config(str(backing))
        assert cfg.key_id == 2 and not cfg.retired and cfg.rotation is None
        assert _generations(backing) == [[2], [2]]
        m.start()
        try:
            _all_read(m, files)
        finally:
            m.stop()
    finally:
        shutil.rmtree(backing.parent, ignore_errors=True)


@pytest.mark.parametrize("how", ["read-only-offline-as-owner", "immutable-through-the-mount"])
def test_unwritable_file_keeps_the_old_generation_and_the_walk_goes_on(how: str) -> None:
    require_fuse()
    files = {"a.txt": b"first\n", "locked.txt": b"cannot be rewritten\n", "z/b.txt": b"last\n"}
    backing, pw, m = _alices_volume(files)
    locked = None
    try:
        if how == "read-only-offline-as-owner":
            m.start()
            try:
                m.path("locked.txt").chmod(0o444)
            finally:
                m.stop()
            _chown_tree(backing, ALICE)
            res = cli_as(ALICE, "rotate", str(backing), "--wrap-key", "--passphrase-file", str(pw))
        else:
            locked = backing_of(backing, USERS[ALICE][1], "locked.txt")
            subprocess.run(["chattr", "+i", str(locked)], check=True)
            m.start()
            res = run_cli("rotate", str(backing), "--wrap-key", "--passphrase-file", str(pw),
                          check=False)
            assert "through the mount" in res.stdout
        assert res.returncode == 7, res.stdout + res.stderr
        assert "could not be read or written, so the old key generation is kept" in res.stderr
        cfg = load_config(str(backing))
        assert cfg.key_id == 2 and set(cfg.retired) == {1} and cfg.rotation is not None
        # The walk did not stop at that file: the others are on the new generation.
        gens = dict(backing_files(backing))
        locked_path = backing_of(backing, USERS[ALICE][1], "locked.txt")
        assert symmetric_generations(locked_path) == [1]
        assert sorted(symmetric_generations(p) for p in gens.values()) == [[1], [2], [2]]
        if not os.path.ismount(m.mnt):
            m.start()
        try:
            _all_read(m, files)
            if locked is None:
                m.path("locked.txt").chmod(0o644)
        finally:
            m.stop()
        if locked is not None:
            subprocess.run(["chattr", "-i", str(locked)], check=True)
            locked = None
            res = run_cli("rotate", str(backing), "--wrap-key", "--passphrase-file", str(pw))
        else:
            res = cli_as(ALICE, "rotate", str(backing), "--wrap-key", "--passphrase-file", str(pw))
        assert res.returncode == 0 and "done: the old key generations are forgotten" in res.stdout
        assert not load_config(str(backing)).retired
        assert _generations(backing) == [[2], [2], [2]]
        m.start()
        try:
            _all_read(m, files)
        finally:
            m.stop()
    finally:
        m.stop()
        if locked is not None:
            subprocess.run(["chattr", "-i", str(locked)], capture_output=True)
        shutil.rmtree(backing.parent, ignore_errors=True)


def test_an_incomplete_rotation_does_not_claim_the_old_generations_are_forgotten(
        tmp_path: Path, passfile: Path) -> None:
    """When a file could not be rewritten the old generation is kept (checked above);
    the command must not tell the operator the opposite."""
    backing = make_volume(tmp_path / "backing")
    m = new_mount(tmp_path, backing, passfile)
    m.start()
    try:
        m.path("f.txt").write_bytes(b"x\n")
    finally:
        m.stop()
    (_, locked), = backing_files(backing)
    subprocess.run(["chattr", "+i", str(locked)], check=True)
    try:
        res = run_cli("rotate", str(backing), "--wrap-key", "--passphrase-file", str(passfile),
                      check=False)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert res.returncode == 7 and load_config(str(backing)).retired
    assert "old key generations are forgotten" not in res.stdout + res.stderr, res.stderr


# -- 7. the policy fails closed ------------------------------------------------------------------

def test_policy_fails_closed_when_a_directorys_path_cannot_be_worked_out(tmp_path: Path) -> None:
    require_fuse()
    backing = make_shared_volume(tmp_path / "backing")
    root_pass = pass_file(tmp_path, "root", ROOT_PASSPHRASE)
    run_cli("policy", "set", str(backing), "/Acme-merger-calls", "--mode", "hybrid",
            "--passphrase-file", str(root_pass))
    m = new_mount(tmp_path, backing, root_pass)
    moved = tmp_path / "backing-moved"
    m.start()
    try:
        cases = m.path("Acme-merger-calls")
        cases.mkdir()
        (cases / "before.txt").write_bytes(b"before\n")
        os.rename(backing, moved)  # the storage directory is renamed while mounted
        with pytest.raises(PermissionError):
            (cases / "after.txt").write_bytes(b"customer secrets\n")
        assert sorted(os.listdir(cases)) == ["before.txt"]
        assert (cases / "before.txt").read_bytes() == b"before\n"
        m.path("top.txt").write_bytes(b"the root directory's rule is known\n")
    finally:
        m.stop()
        if moved.exists():
            os.rename(moved, backing)
    assert "create refused" in m.log_text()
    assert "Acme" not in m.log_text()  # a rule's path is secret: never logged
    before = backing_of(backing, ROOT_PASSPHRASE, "Acme-merger-calls/before.txt")
    assert [t for t, _ in stanzas_of(before) if t != PADDING] == [X25519]  # root, the creator
    assert [p.name for p in before.parent.iterdir() if p.name != ".diriv"] == [before.name]
    m.start()
    try:
        assert m.path("top.txt").read_bytes() == b"the root directory's rule is known\n"
        assert m.path("Acme-merger-calls", "before.txt").read_bytes() == b"before\n"
    finally:
        m.stop()


# -- 8. root's own key on an agent mount ---------------------------------------------------------

def test_root_with_a_slot_reads_its_own_hybrid_file_on_an_agent_mount() -> None:
    require_fuse()
    with shared_scenario() as s:
        env = {**os.environ, **s.agent.env}
        res = subprocess.run([*CRYPTFS_CLI, "unlock", str(s.mount.mnt), "--passphrase-file",
                              str(s.passfiles["root"])], env=env, capture_output=True, text=True)
        assert res.returncode == 0 and "key slot 0" in res.stdout, res.stderr
        run_cli("policy", "set", str(s.backing), "/h", "--mode", "hybrid",
                "--passphrase-file", str(s.passfiles["root"]))
        s.path("h").mkdir(mode=0o755)
        f = s.path("h", "root-notes.txt")
        f.write_bytes(b"root's own hybrid file\n")
        assert f.read_bytes() == b"root's own hybrid file\n"
        with open(f, "r+b") as fh:  # and it stays writable: the file key opens
            fh.seek(0, os.SEEK_END)
            fh.write(b"more\n")
        assert f.read_bytes() == b"root's own hybrid file\nmore\n"
        res = subprocess.run([*CRYPTFS_CLI, "share", str(f), "--list"], env=env,
                             capture_output=True, text=True)
        assert res.returncode == 0 and res.stdout.split() == ["root"], res.stdout + res.stderr
        res = subprocess.run([*CRYPTFS_CLI, "share", str(f), "--with", ALICE], env=env,
                             capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
        _unlock_ok(s, ALICE)
        assert run_as(ALICE, "cat", str(f)).stdout == b"root's own hybrid file\nmore\n"
        _unlock_ok(s, BOB)  # not a recipient
        denied = run_as(BOB, "cat", str(f))
        assert denied.returncode != 0 and b"root's own" not in denied.stdout
        path = backing_of(s.backing, ROOT_PASSPHRASE, "h/root-notes.txt")
        assert [t for t, _ in stanzas_of(path) if t != PADDING] == [X25519, X25519]
