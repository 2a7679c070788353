"""Every release opens, verifies and reads the frozen sample volumes of each format version."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import new_mount, run_cli
from cryptfs import fsck
from cryptfs.secret import Secret
from cryptfs.volume import open_volume

DATA = Path(__file__).parent / "data"
SAMPLES = sorted(p for p in DATA.iterdir() if p.name.startswith("sample-v"))
WITH_RECOVERY = [p for p in SAMPLES if (p / "RECOVERY.key").exists()]


def copy_sample(src: Path, tmp_path: Path) -> tuple[Path, dict]:
    """The sample as a backing directory (its manifest and recovery key moved out)."""
    copy = tmp_path / "sample"
    shutil.copytree(src, copy, symlinks=True)
    manifest = json.loads((copy / "MANIFEST.json").read_text())
    (copy / "MANIFEST.json").unlink()
    if "recovery_key" in manifest:
        (copy / manifest["recovery_key"]).rename(tmp_path / "recovery.key")
    return copy, manifest


@pytest.fixture(params=SAMPLES, ids=lambda p: p.name)
def sample(request, tmp_path) -> tuple[Path, dict]:
    return copy_sample(request.param, tmp_path)


def readable_by(entry: dict, who: str) -> bool:
    """Whether ``who`` (a user name, or "recovery") opens a manifest entry: every holder of
    the volume key opens a symmetric file, only its recipients a hybrid one."""
    return not entry.get("hybrid") or who in entry["recipients"]


def test_there_are_samples_for_both_modes_users_recovery_and_v2() -> None:
    assert [p.name for p in SAMPLES] == ["sample-v1-aes-256-gcm", "sample-v1-users-recovery",
                                         "sample-v1-xchacha20-poly1305", "sample-v2-hybrid"]
    assert [p.name for p in WITH_RECOVERY] == ["sample-v1-users-recovery", "sample-v2-hybrid"]


def test_v2_sample_has_what_it_is_for() -> None:
    """The v2 sample holds every v2 feature: the tests below read them all."""
    conf = json.loads((DATA / "sample-v2-hybrid" / "cryptfs.conf").read_text())
    manifest = json.loads((DATA / "sample-v2-hybrid" / "MANIFEST.json").read_text())
    assert conf["cryptfs"] == 2 and conf["key_id"] == manifest["key_id"] == 2
    assert [r["key_id"] for r in conf["retired"]] == manifest["retired"] == [1]
    assert {"base", "policy", "recovery"} <= conf.keys() and "rotation" not in conf
    assert all({"public", "master"} <= s.keys() for s in conf["slots"])
    files = [e for e in manifest["entries"] if e["type"] in ("file", "sparse")]
    assert {e["mode"] for e in files if e["hybrid"]} == {"aes-256-gcm", "xchacha20-poly1305"}
    assert {e["mode"] for e in files if not e["hybrid"]} == {"aes-256-gcm", "xchacha20-poly1305"}
    assert {e["key_id"] for e in files if not e["hybrid"]} == {1, 2}
    assert any(not readable_by(e, "root") for e in files)       # the drop box
    assert any(not readable_by(e, "agent7") for e in files)     # root's hybrid files
    assert all(readable_by(e, "recovery") for e in files)


@pytest.mark.parametrize("src", WITH_RECOVERY, ids=lambda p: p.name)
def test_sample_users_and_recovery_key(src: Path, tmp_path) -> None:
    backing, manifest = copy_sample(src, tmp_path)
    listing = run_cli("user", "list", str(backing)).stdout.splitlines()
    assert [line.split()[:4] for line in listing[1:]] == [["0", "root", "0", "admin"],
                                                          ["1", "agent7", "4007", "agent"]]
    vol = open_volume(str(backing), Secret(manifest["agent_passphrase"].encode()))
    try:
        assert vol.slot.extra == {"user": "agent7", "uid": 4007, "role": "agent"}
    finally:
        vol.close()
    out = tmp_path / "out"
    run_cli("recover", str(backing), "--recovery-key", str(tmp_path / "recovery.key"), "--out",
            str(out))
    for e in manifest["entries"]:  # the recovery key opens everything, hybrid files included
        path = os.path.join(os.fsencode(out), bytes.fromhex(e["path"]))
        if e["type"] == "symlink":
            assert os.readlink(path) == e["target"].encode()
        elif e["type"] != "dir":
            assert hashlib.sha256(open(path, "rb").read()).hexdigest() == e["sha256"]


def test_sample_verifies(sample) -> None:
    backing, manifest = sample
    vol = open_volume(str(backing), Secret(manifest["passphrase"].encode()))
    try:
        assert vol.config.default_mode == manifest["mode"]
        report = fsck.check(vol)
    finally:
        vol.close()
    assert report.problems == []
    assert report.files == sum(e["type"] in ("file", "sparse") for e in manifest["entries"])


def check_mount(mnt: Path, manifest: dict, who: str) -> None:
    """Every entry of the manifest, read through a mount unlocked by ``who``: the files
    ``who`` opens read back exactly; the others show their size but refuse to open."""
    root = os.fsencode(mnt)
    for e in manifest["entries"]:
        path = os.path.join(root, bytes.fromhex(e["path"]))
        if e["type"] == "dir":
            assert os.path.isdir(path)
        elif e["type"] == "symlink":
            assert os.readlink(path) == e["target"].encode()
        elif readable_by(e, who):
            data = open(path, "rb").read()
            assert len(data) == e["size"] == os.stat(path).st_size
            assert hashlib.sha256(data).hexdigest() == e["sha256"]
        else:
            assert os.stat(path).st_size == e["size"]
            with pytest.raises(PermissionError):
                open(path, "rb")


def test_sample_reads_back_on_a_mount(sample, tmp_path) -> None:
    backing, manifest = sample
    pw = tmp_path / "pw"
    pw.write_text(manifest["passphrase"] + "\n")
    m = new_mount(tmp_path, backing, pw)
    m.start()
    try:
        root = os.fsencode(m.mnt)
        check_mount(m.mnt, manifest, "root")
        top = {bytes.fromhex(e["path"]) for e in manifest["entries"] if b"/" not in bytes.fromhex(e["path"])}
        assert set(os.listdir(root)) == top
    finally:
        m.stop()
    res = run_cli("fsck", str(backing), "--passphrase-file", str(pw))
    lines = res.stdout.rstrip().splitlines()
    assert lines[0].endswith("clean")
    # hybrid files the passphrase's user is not a recipient of are counted, not checked
    skipped = sum(not readable_by(e, "root") for e in manifest["entries"])
    assert lines[1:] == ([f"{skipped} hybrid file(s) not checked: this passphrase's user is not "
                          "a recipient (the recovery key opens them: cryptfs recover)"]
                         if skipped else [])


def test_v2_sample_reads_back_for_its_other_user(tmp_path) -> None:
    """agent7's passphrase mounts the v2 sample too, and opens the drop box (agent7 is its
    recipient) but not root's own hybrid files."""
    backing, manifest = copy_sample(DATA / "sample-v2-hybrid", tmp_path)
    pw = tmp_path / "pw"
    pw.write_text(manifest["agent_passphrase"] + "\n")
    m = new_mount(tmp_path, backing, pw)
    m.start()
    try:
        check_mount(m.mnt, manifest, "agent7")
    finally:
        m.stop()
