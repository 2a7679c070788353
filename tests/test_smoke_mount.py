"""The shortest path through a real mount: write, read back, see only ciphertext below."""

from pathlib import Path

from conftest import Mount, run_cli


def test_write_read_and_backing_is_ciphertext(mount: Mount) -> None:
    secret = b"CUSTOMER-4711 Zhang Wei +86 138 0013 8000\n" * 100
    mount.path("notes.txt").write_bytes(secret)
    assert mount.path("notes.txt").read_bytes() == secret
    assert sorted(p.name for p in mount.mnt.iterdir()) == ["notes.txt"]
    backing_files = [p for p in mount.backing.rglob("*") if p.is_file()]
    for p in backing_files:
        raw = p.read_bytes()
        assert b"Zhang" not in raw and b"CUSTOMER" not in raw
        assert b"notes" not in p.name.encode()
    mount.stop()
    mount.start()
    assert mount.path("notes.txt").read_bytes() == secret


def test_fsck_clean_after_use(mount: Mount, passfile: Path) -> None:
    mount.path("d").mkdir()
    mount.path("d", "f").write_bytes(b"x" * 10000)
    mount.stop()
    res = run_cli("fsck", str(mount.backing), "--passphrase-file", str(passfile))
    assert "clean" in res.stdout
    assert "2 directories, 1 files" in res.stdout
