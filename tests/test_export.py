"""cryptfs export: a file of a mounted volume as a standard age file, checked
with Debian's real `age` and `age-keygen`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import CRYPTFS, Mount, run_cli
from multiuser import Shared, cli_as, run_as


def _age_key(tmp_path: Path, name: str) -> tuple[Path, str]:
    if shutil.which("age-keygen") is None:
        pytest.fail("age is missing (scripts/run installs Debian's age)")
    key = tmp_path / f"{name}.key"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    recipient = next(line.split(": ")[1] for line in key.read_text().splitlines()
                     if line.startswith("# public key: "))
    return key, recipient


def _age_decrypt(key: Path, path: Path) -> bytes:
    res = subprocess.run(["age", "-d", "-i", str(key), str(path)], capture_output=True,
                         check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_export_decrypts_with_stock_age(mount: Mount, tmp_path: Path) -> None:
    key_a, rec_a = _age_key(tmp_path, "auditor")
    key_b, rec_b = _age_key(tmp_path, "client")
    key_c, _ = _age_key(tmp_path, "stranger")
    data = os.urandom(3 * 1024 * 1024 + 17)  # several age chunks (64 KiB) and a ragged end
    mount.path("recording.wav").write_bytes(data)
    out = tmp_path / "recording.wav.age"
    res = run_cli("export", str(mount.path("recording.wav")), "--to", rec_a, "--to", rec_b,
                  "--to", rec_a, "--out", str(out))  # (one given twice is one recipient)
    assert res.stdout.strip() == (f"exported {mount.path('recording.wav')} ({len(data)} bytes) "
                                  f"to {out} for 2 recipient(s)")
    assert out.read_bytes().startswith(b"age-encryption.org/v1\n")
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    assert _age_decrypt(key_a, out) == data
    assert _age_decrypt(key_b, out) == data
    res = subprocess.run(["age", "-d", "-i", str(key_c), str(out)], capture_output=True)
    assert res.returncode != 0 and b"no identity matched" in res.stderr
    assert data[:4096] not in out.read_bytes()


def test_export_to_standard_output_and_from_a_recipients_file(mount: Mount,
                                                             tmp_path: Path) -> None:
    key, rec = _age_key(tmp_path, "auditor")
    mount.path("notes.txt").write_bytes("客户 called back\n".encode())
    recipients = tmp_path / "recipients.txt"
    recipients.write_text(f"# the auditors\n\n{rec}\n")
    res = subprocess.run(CRYPTFS + ["export", str(mount.path("notes.txt")), "-R", str(recipients)],
                         capture_output=True, check=True)
    (tmp_path / "n.age").write_bytes(res.stdout)
    assert _age_decrypt(key, tmp_path / "n.age") == "客户 called back\n".encode()
    # Standard output on a full disk: an error, not exit 0 with the file lost (pyrage
    # drops its writer's error; a small file's output vanished).
    mount.path("big.bin").write_bytes(os.urandom(1 << 20))  # (pyrage reports that one itself)
    for name in ("notes.txt", "big.bin"):
        with open("/dev/full", "wb") as full:
            res = subprocess.run(CRYPTFS + ["export", str(mount.path(name)), "-R",
                                            str(recipients)], stdout=full, stderr=subprocess.PIPE,
                                 text=True)
        assert res.returncode == 7 and "Traceback" not in res.stderr
        assert res.stderr == ("cryptfs: error: cannot write the age file: No space left on "
                              "device\n"), res.stderr


def test_export_refuses_what_it_should(mount: Mount, tmp_path: Path) -> None:
    _, rec = _age_key(tmp_path, "auditor")
    mount.path("a.txt").write_bytes(b"a")
    out = tmp_path / "a.age"
    out.write_bytes(b"precious")
    cases = [
        (["export", str(mount.path("a.txt")), "--to", rec, "--out", str(out)], 2,
         "never writes over a file"),
        (["export", str(mount.path("a.txt")), "--to", "age1notakey", "--out", str(tmp_path / "b")],
         2, "is not an age X25519 recipient"),
        (["export", str(mount.path("a.txt")), "--out", str(tmp_path / "c")], 2,
         "at least one recipient"),
        (["export", "/etc/hostname", "--to", rec, "--out", str(tmp_path / "d")], 2,
         "is not on a mounted cryptfs volume"),
        (["export", str(mount.path("missing")), "--to", rec, "--out", str(tmp_path / "e")], 7,
         "No such file or directory"),
    ]
    for args, code, text in cases:
        res = run_cli(*args, check=False)
        assert res.returncode == code and text in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr
    assert out.read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_export_on_a_shared_mount_follows_the_session(shared: Shared, tmp_path: Path) -> None:
    """Export reads through the mount: a locked user cannot export, an unlocked one can."""
    key, rec = _age_key(tmp_path, "auditor")
    assert shared.unlock("root").returncode == 0
    shared.path("ledger.csv").write_bytes(b"surname,phone\nZhang,13800138000\n")
    shared.path("ledger.csv").chmod(0o644)
    outdir = shared.root / "exports"
    outdir.mkdir(mode=0o777)
    outdir.chmod(0o777)
    res = cli_as("cfs-alice", "export", str(shared.path("ledger.csv")), "--to", rec, "--out",
                 str(outdir / "locked.age"))
    assert res.returncode == 7 and "Permission denied" in res.stderr
    assert not (outdir / "locked.age").exists()
    assert shared.unlock("cfs-alice").returncode == 0
    res = cli_as("cfs-alice", "export", str(shared.path("ledger.csv")), "--to", rec, "--out",
                 str(outdir / "ledger.age"))
    assert res.returncode == 0, res.stderr
    assert _age_decrypt(key, outdir / "ledger.age") == b"surname,phone\nZhang,13800138000\n"
    assert run_as("cfs-alice", "test", "-O", str(outdir / "ledger.age")).returncode == 0
