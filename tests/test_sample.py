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


def test_there_are_samples_for_both_modes_and_for_users_and_recovery() -> None:
    assert [p.name for p in SAMPLES] == ["sample-v1-aes-256-gcm", "sample-v1-users-recovery",
                                         "sample-v1-xchacha20-poly1305"]


def test_sample_users_and_recovery_key(tmp_path) -> None:
    backing, manifest = copy_sample(DATA / "sample-v1-users-recovery", tmp_path)
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
    for e in manifest["entries"]:
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


def test_sample_reads_back_on_a_mount(sample, tmp_path) -> None:
    backing, manifest = sample
    pw = tmp_path / "pw"
    pw.write_text(manifest["passphrase"] + "\n")
    m = new_mount(tmp_path, backing, pw)
    m.start()
    try:
        root = os.fsencode(m.mnt)
        for e in manifest["entries"]:
            path = os.path.join(root, bytes.fromhex(e["path"]))
            if e["type"] == "dir":
                assert os.path.isdir(path)
            elif e["type"] == "symlink":
                assert os.readlink(path) == e["target"].encode()
            else:
                data = open(path, "rb").read()
                assert len(data) == e["size"] == os.stat(path).st_size
                assert hashlib.sha256(data).hexdigest() == e["sha256"]
        top = {bytes.fromhex(e["path"]) for e in manifest["entries"] if b"/" not in bytes.fromhex(e["path"])}
        assert set(os.listdir(root)) == top
    finally:
        m.stop()
    res = run_cli("fsck", str(backing), "--passphrase-file", str(pw))
    assert res.stdout.rstrip().endswith("clean")
