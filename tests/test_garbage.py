"""Foreign and broken entries in the backing tree, and errors inside handlers.

Nothing that someone drops into (or breaks in) the backing directory may
hide the rest of a directory, take the mount down or crash fsck: the mount
hides what does not decrypt (or answers EIO for that one entry), and fsck
names every such item and exits 6.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import CRYPTFS, Mount, daemon_gone, run_cli

LONG1 = "long-name-" + "x" * 190 + ".txt"  # 200 bytes: its encrypted name is > 255 bytes
LONG2 = "second-long-name-" + "y" * 180
LONG3 = "third-long-name-" + "z" * 180


def ino_map(d: Path) -> dict[int, Path]:
    return {p.lstat().st_ino: p for p in d.iterdir()}


def backing_of(mount: Mount, *parts: str) -> Path:
    """The backing path of a plaintext path (found by inode: FUSE inode = backing inode)."""
    ino = os.lstat(mount.path(*parts)).st_ino
    for p in [mount.backing / "tree", *(mount.backing / "tree").rglob("*")]:
        if p.lstat().st_ino == ino and p.name != ".diriv":
            return p
    raise AssertionError(f"no backing entry for {parts}")


def assert_eio(fn) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as ei:
        fn()
    assert ei.value.errno == errno.EIO, ei.value


def fsck_bytes(backing: Path, passfile: Path, env: dict[str, str] | None = None
               ) -> tuple[int, str, str]:
    res = subprocess.run(CRYPTFS + ["fsck", str(backing), "--passphrase-file", str(passfile)],
                         capture_output=True, env=env, timeout=120)
    return (res.returncode, res.stdout.decode("utf-8", "backslashreplace"),
            res.stderr.decode("utf-8", "backslashreplace"))


def log_levels(mount: Mount) -> list[tuple[str, str]]:
    out = []
    for line in mount.log_text().splitlines():
        m = re.search(r" ([A-Z]+): (.*)$", line)
        out.append((m[1], m[2]) if m else ("", line))
    return out


def test_foreign_entries_are_hidden_and_reported(mount: Mount, passfile: Path) -> None:
    m = mount
    m.path("a.txt").write_bytes(b"alpha " * 1000)
    m.path("b.bin").write_bytes(bytes(range(256)) * 40)
    m.path("d").mkdir()
    m.path("d", "inner.txt").write_bytes(b"inner")
    m.path(LONG1).write_bytes(b"long one")
    m.path("broken_iv").mkdir()
    m.path("broken_iv", "lost.txt").write_bytes(b"unreachable")
    m.path("side").mkdir()
    m.path("side", LONG2).write_bytes(b"long two")
    m.path("side", "kept.txt").write_bytes(b"kept")
    broken_iv = backing_of(m, "broken_iv")
    side = backing_of(m, "side")
    long2 = backing_of(m, "side", LONG2)
    m.stop()

    tree = m.backing / "tree"
    rel_side = f"tree/{side.name}"
    (tree / "Zm9yZWlnbkdhcmJhZ2VOYW1lWFla").write_bytes(os.urandom(5000))
    (tree / "A").write_bytes(b"short name")
    (tree / "notes.txt").write_bytes(b"dropped here by someone")
    (tree / ".hidden").write_bytes(b"dot file")
    (tree / "x.y.z").write_bytes(b"")
    (tree / "Rm9yZWlnbkRpcmVjdG9yeQ").mkdir()  # a directory without .diriv
    (tree / "Rm9yZWlnbkRpcmVjdG9yeQ" / "child").write_bytes(b"c")
    (tree / "L.b3JwaGFu.name").write_text("orphan side file")
    (tree / "L.bm9zaWRlZmlsZQ").write_bytes(b"entry without its side file")
    (tree / "T.0011223344556677").mkdir()  # leftover of an interrupted mkdir
    (tree / "U3ltbGlua0dhcmJhZ2U").symlink_to("/nonexistent/target")
    (broken_iv / ".diriv").unlink()
    side_file = Path(str(long2) + ".name")
    side_file.chmod(0o644)
    side_file.write_text("QUJD" * 80)  # ASCII, but not the name its entry was made from

    m.start()
    assert sorted(os.listdir(m.mnt)) == sorted(["a.txt", "b.bin", "d", LONG1, "broken_iv", "side"])
    assert m.path("a.txt").read_bytes() == b"alpha " * 1000
    assert m.path("b.bin").read_bytes() == bytes(range(256)) * 40
    assert m.path("d", "inner.txt").read_bytes() == b"inner"
    assert m.path(LONG1).read_bytes() == b"long one"
    assert os.listdir(m.path("d")) == ["inner.txt"]
    assert os.listdir(m.path("side")) == ["kept.txt"]  # the broken long name is hidden
    assert m.path("side", "kept.txt").read_bytes() == b"kept"
    # a directory without its IV cannot be listed: EIO for it alone
    assert_eio(lambda: os.listdir(m.path("broken_iv")))
    assert_eio(lambda: os.stat(m.path("broken_iv", "lost.txt")))
    # foreign names are not reachable under their backing names either
    for name in ("notes.txt", ".hidden", "A", "Zm9yZWlnbkdhcmJhZ2VOYW1lWFla", "T.0011223344556677"):
        with pytest.raises(FileNotFoundError):
            os.stat(m.path(name))
    # and the mount still works for writing
    m.path("new.txt").write_bytes(b"fresh")
    assert m.path("new.txt").read_bytes() == b"fresh"
    assert os.path.ismount(m.mnt)

    entries = log_levels(m)
    assert "Traceback" not in m.log_text()
    warnings = [msg for level, msg in entries if level == "WARNING"]
    # root: random name, "A", the foreign directory, L.<no side file>, the symlink
    assert "directory inode 1: 5 entries that do not decrypt are hidden" in warnings
    side_ino = os.stat(m.path("side")).st_ino
    assert f"directory inode {side_ino}: 1 entries that do not decrypt are hidden" in warnings
    iv_ino = os.stat(m.path("broken_iv")).st_ino
    errors = {msg for level, msg in entries if level == "ERROR"}
    assert errors == {f"integrity failure: inode {iv_ino} header: directory IV missing"}
    m.stop()

    code, out, err = fsck_bytes(m.backing, passfile)
    assert "Traceback" not in err
    damaged = sorted(ln for ln in out.splitlines() if ln.startswith("damaged: "))
    assert damaged == sorted([
        "damaged: /broken_iv: directory IV missing; its 1 entries cannot be named",
        "damaged: tree/.hidden: foreign file (not created by cryptfs)",
        "damaged: tree/A: name does not decrypt (bad base64)",
        "damaged: tree/L.b3JwaGFu.name: long-name file without its entry",
        "damaged: tree/L.bm9zaWRlZmlsZQ: name does not decrypt (long name file missing)",
        "damaged: tree/Rm9yZWlnbkRpcmVjdG9yeQ: name does not decrypt "
        "(name failed authentication)",
        "damaged: tree/T.0011223344556677: leftover temporary entry (interrupted create)",
        "damaged: tree/U3ltbGlua0dhcmJhZ2U: name does not decrypt (name failed authentication)",
        "damaged: tree/Zm9yZWlnbkdhcmJhZ2VOYW1lWFla: name does not decrypt "
        "(name failed authentication)",
        "damaged: tree/notes.txt: foreign file (not created by cryptfs)",
        "damaged: tree/x.y.z: foreign file (not created by cryptfs)",
        f"damaged: {rel_side}/{long2.name}: name does not decrypt "
        "(long name file does not match its entry)",
    ]), out
    assert code == 6
    assert err.splitlines() == [f"cryptfs: error: 12 damaged item(s) in {m.backing}"]
    # the healthy files were all checked (and counted)
    assert out.splitlines()[-1].startswith("checked 4 directories, 6 files (")


def test_binary_long_name_side_file_hides_only_its_entry(mount: Mount, passfile: Path) -> None:
    """A side file ``L.<h>.name`` whose content is not ASCII is one broken entry, like any
    other: the rest of its directory lists, fsck reports it (no traceback)."""
    m = mount
    m.path("sub").mkdir()
    m.path("sub", LONG3).write_bytes(b"long three")
    m.path("sub", "ok.txt").write_bytes(b"still here")
    sub = backing_of(m, "sub")
    long3 = backing_of(m, "sub", LONG3)
    m.stop()
    side_file = Path(str(long3) + ".name")
    side_file.chmod(0o644)
    side_file.write_bytes(b"\xff\xfe" + os.urandom(100))

    m.start()
    assert sorted(os.listdir(m.mnt)) == ["sub"]
    assert m.path("sub", "ok.txt").read_bytes() == b"still here"
    listing_error = None
    try:
        listing = os.listdir(m.path("sub"))
    except OSError as e:
        listing_error = e
        listing = None
    assert os.path.ismount(m.mnt)
    assert listing_error is None, listing_error
    assert listing == ["ok.txt"]
    assert "internal error" not in m.log_text(), m.log_text()
    m.stop()

    code, out, err = fsck_bytes(m.backing, passfile)
    assert "Traceback" not in err, err
    damaged = [ln for ln in out.splitlines() if ln.startswith("damaged: ")]
    assert len(damaged) == 1, out
    assert damaged[0].startswith(f"damaged: tree/{sub.name}/{long3.name}: name does not decrypt (")
    assert code == 6


def test_backing_name_not_utf8(mount: Mount, passfile: Path) -> None:
    """A backing name that is not UTF-8: hidden on the mount, reported by fsck, also under
    a UTF-8 locale with strict stdout (as en_US.UTF-8 gives Python)."""
    m = mount
    m.path("good.txt").write_bytes(b"good")
    m.stop()
    with open(os.path.join(os.fsencode(m.backing / "tree"), b"\xff\xfegarbage"), "wb") as f:
        f.write(b"junk")

    m.start()
    assert os.listdir(m.mnt) == ["good.txt"]
    assert m.path("good.txt").read_bytes() == b"good"
    m.stop()

    for env in (None, {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}):
        code, out, err = fsck_bytes(m.backing, passfile, env)
        assert "Traceback" not in err, err
        damaged = [ln for ln in out.splitlines() if ln.startswith("damaged: ")]
        assert len(damaged) == 1, out
        assert damaged[0].startswith("damaged: tree/")
        assert damaged[0].endswith("garbage: name does not decrypt (bad base64)")
        assert code == 6


# --- item 6: an exception inside a handler never ends the mount ---------------------------------------
def _assert_serving(m: Mount, pid: int, round_no: int) -> None:
    assert not daemon_gone(pid)
    assert os.path.ismount(m.mnt)
    assert m.path("control.bin").read_bytes() == b"control" * 3000
    p = m.path(f"new-{round_no}.txt")
    p.write_bytes(b"written after an error %d" % round_no)
    assert p.read_bytes() == b"written after an error %d" % round_no


def test_handler_errors_never_end_the_mount(mount: Mount) -> None:
    m = mount
    m.path("control.bin").write_bytes(b"control" * 3000)
    m.path("bad_header.txt").write_bytes(b"header will be broken" * 100)
    m.path("noiv").mkdir()
    m.path("noiv", "x").write_bytes(b"x")
    os.symlink("target-of-the-link", m.path("link"))
    m.path("tagged.txt").write_bytes(b"tagged")
    os.setxattr(m.path("tagged.txt"), "user.note", b"a note")
    b_header = backing_of(m, "bad_header.txt")
    b_noiv = backing_of(m, "noiv")
    b_link = backing_of(m, "link")
    b_tagged = backing_of(m, "tagged.txt")
    m.stop()

    raw = bytearray(b_header.read_bytes())
    raw[100] ^= 0x01  # inside the header MAC
    b_header.write_bytes(bytes(raw))
    (b_noiv / ".diriv").unlink()
    b_link.unlink()
    b_link.symlink_to("bm90IGEgc2VhbGVkIHRhcmdldA")
    (c_name,) = [n for n in os.listxattr(b_tagged) if n.startswith("user.cryptfs.")]
    os.setxattr(b_tagged, c_name, os.urandom(40))

    m.start()
    pid = m.pid
    assert os.stat(m.path("bad_header.txt")).st_size == len(b"header will be broken" * 100)
    for i in range(5):
        assert_eio(lambda: open(m.path("bad_header.txt"), "rb"))
        _assert_serving(m, pid, i)
    assert_eio(lambda: os.listdir(m.path("noiv")))
    assert_eio(lambda: os.stat(m.path("noiv", "x")))
    _assert_serving(m, pid, 10)
    assert_eio(lambda: os.readlink(m.path("link")))
    _assert_serving(m, pid, 11)
    assert os.listxattr(m.path("tagged.txt")) == ["user.note"]
    assert_eio(lambda: os.getxattr(m.path("tagged.txt"), "user.note"))
    assert m.path("tagged.txt").read_bytes() == b"tagged"
    _assert_serving(m, pid, 12)
    # a damaged file can still be removed
    os.unlink(m.path("bad_header.txt"))
    assert "bad_header.txt" not in os.listdir(m.mnt)
    _assert_serving(m, pid, 13)

    text = m.log_text()
    assert "Traceback" not in text
    assert text.count(" INFO: mounted ") == 2 and text.count(" INFO: unmounted ") == 1
    errors = {msg for level, msg in log_levels(m) if level == "ERROR"}
    ino = {n: os.lstat(m.path(n)).st_ino for n in ("noiv", "link", "tagged.txt")}
    for name, reason in (("noiv", "directory IV missing"),
                         ("link", "symlink target failed authentication"),
                         ("tagged.txt", "xattr value failed authentication")):
        hits = [e for e in errors if e.startswith(f"integrity failure: inode {ino[name]} ")]
        assert len(hits) == 1 and hits[0].endswith(f": {reason}"), (name, errors)
    assert len([e for e in errors if "header failed authentication" in e]) == 1
    assert all(e.startswith("integrity failure: inode ") for e in errors), errors
    m.stop()  # the daemon still exits cleanly on unmount
    assert m.log_text().count(" INFO: unmounted ") == 2


def test_fsck_checks_a_volume_without_damage(mount: Mount, passfile: Path) -> None:
    """Sanity for the reports above: the same kinds of entries, undamaged, fsck clean."""
    m = mount
    m.path("d").mkdir()
    m.path("d", LONG1).write_bytes(b"1")
    os.symlink("t", m.path("d", "ln"))
    m.path("f").write_bytes(b"f" * 9000)
    os.setxattr(m.path("f"), "user.k", b"v")
    m.stop()
    res = run_cli("fsck", str(m.backing), "--passphrase-file", str(passfile), check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines() == [
        "checked 2 directories, 2 files (4 blocks), 1 symlinks: clean"]


def test_entry_on_another_filesystem_hides_only_itself(mount: Mount) -> None:
    """A mount inside the backing tree: that entry is refused, the listing
    still shows the rest, and the daemon keeps no descriptors for it."""
    mount.path("ex").mkdir()
    mount.path("ex", "zz").mkdir()
    for n in ("a", "b", "c"):
        mount.path("ex", n).write_bytes(n.encode())
    mount.stop()
    tree = mount.backing / "tree"
    (ex,) = [p for p in tree.iterdir() if p.is_dir()]
    (zz,) = [p for p in ex.iterdir() if p.is_dir()]
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(zz)], check=True)
    try:
        mount.start()
        before = len(os.listdir(f"/proc/{mount.pid}/fd"))
        assert sorted(os.listdir(mount.path("ex"))) == ["a", "b", "c"]
        assert mount.path("ex", "b").read_bytes() == b"b"
        assert "an entry is hidden (Invalid cross-device link)" in mount.log_text()
        assert len(os.listdir(f"/proc/{mount.pid}/fd")) <= before + 4  # ex, a, b, c; not zz
        mount.stop()
    finally:
        subprocess.run(["umount", "-l", str(zz)], check=False)
