"""Tampering with a volume's backing files, in both content modes.

Every case: mount, write, unmount, edit one backing file, remount, then check
that the damaged range reads as EIO (and nothing else does), that the daemon
logs one ``integrity failure: inode N <where>`` kind of line for that file and
no secret, that the mount keeps serving everything else, and that
``cryptfs fsck`` names the file and the damaged blocks (exit 6).

All cases of one mode share one volume and one mount (two mount cycles per
mode instead of two per case); each case is its own test.

Reads of "healthy" blocks use ``POSIX_FADV_RANDOM``: it switches kernel
readahead off for the descriptor, so a pread of block k sends exactly one
FUSE read for block k and a damaged neighbour cannot taint it.
"""

from __future__ import annotations

import base64
import errno
import os
import re
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import PASSPHRASE, Mount, daemon_gone, make_volume, new_mount, run_cli, unlock
from cryptfs.content import ContentFile
from cryptfs.modes.kdf import hkdf

BS = 4096
OVERHEAD = {"aes-256-gcm": 28, "xchacha20-poly1305": 40}
MODE_ID = {"aes-256-gcm": 1, "xchacha20-poly1305": 2}
HEADER_LEN = 128  # 29-byte prefix + one 67-byte symmetric stanza + 32-byte MAC
MARK = b"PLAINTEXT-"  # starts every plaintext block; must never reach the log

TEN = 9 * BS + 1234  # ten blocks, the final one partial
FOUR_FULL = 4 * BS  # four blocks, the final one full


def plaintext(name: str, size: int) -> bytes:
    """Distinct, recognisable content: every block starts with its own marker."""
    import random

    buf = bytearray(random.Random(name).randbytes(size))
    for i in range(0, size, BS):
        m = MARK + f"{name}-{i // BS}|".encode()
        buf[i : i + len(m)] = m[: size - i]
    return bytes(buf)


# --- geometry of a backing file --------------------------------------------------------------
@dataclass
class Geo:
    h: int  # header length
    o: int  # per-block overhead
    donor: bytes  # the whole backing file of an untouched file of the same size (TEN)

    @property
    def cb(self) -> int:
        return BS + self.o

    def off(self, block: int) -> int:
        return self.h + block * self.cb

    def block(self, raw: bytes | bytearray, i: int) -> bytes:
        return bytes(raw[self.off(i) : self.off(i) + self.cb])


def flip(pos: Callable[[Geo], int], bit: int = 0x10) -> Callable[[bytearray, Geo], bytes]:
    def edit(raw: bytearray, g: Geo) -> bytes:
        raw[pos(g)] ^= bit
        return bytes(raw)

    return edit


def cut(length: Callable[[Geo, int], int]) -> Callable[[bytearray, Geo], bytes]:
    def edit(raw: bytearray, g: Geo) -> bytes:
        return bytes(raw[: length(g, len(raw))])

    return edit


def append_block(src: int) -> Callable[[bytearray, Geo], bytes]:
    def edit(raw: bytearray, g: Geo) -> bytes:
        return bytes(raw) + g.block(raw, src)

    return edit


def swap(a: int, b: int) -> Callable[[bytearray, Geo], bytes]:
    def edit(raw: bytearray, g: Geo) -> bytes:
        ba, bb = g.block(raw, a), g.block(raw, b)
        raw[g.off(a) : g.off(a) + g.cb] = bb
        raw[g.off(b) : g.off(b) + g.cb] = ba
        return bytes(raw)

    return edit


def foreign_block(i: int) -> Callable[[bytearray, Geo], bytes]:
    def edit(raw: bytearray, g: Geo) -> bytes:
        raw[g.off(i) : g.off(i) + g.cb] = g.block(g.donor, i)
        return bytes(raw)

    return edit


def foreign_header(raw: bytearray, g: Geo) -> bytes:
    raw[: g.h] = g.donor[: g.h]
    return bytes(raw)


def zero_block(i: int) -> Callable[[bytearray, Geo], bytes]:
    def edit(raw: bytearray, g: Geo) -> bytes:
        raw[g.off(i) : g.off(i) + g.cb] = bytes(g.cb)
        return bytes(raw)

    return edit


def zero_final(raw: bytearray, g: Geo) -> bytes:
    start = g.off((len(raw) - g.h) // g.cb)
    raw[start:] = bytes(len(raw) - start)
    return bytes(raw)


HEADER_FAIL = "header: header failed authentication"


@dataclass(frozen=True)
class Case:
    name: str
    size: int
    edit: Callable[[bytearray, Geo], bytes]
    bad: tuple[int, ...] | None  # blocks that must fail; None: open itself fails
    fsck: str  # what fsck says after "damaged: /<name>: "
    log: str = ""  # open failures: "<where>: <reason>" in the log line
    apparent: int | None = None  # st_size on the mount after the edit (block cases)
    sparse: bool = False  # written with a hole (blocks 1..7 never written)


def blocks_fsck(*bad: int) -> str:
    return f"{len(bad)} damaged block(s): " + ", ".join(map(str, bad))


def header_case(name: str, pos: Callable[[Geo], int], bit: int = 0x10) -> Case:
    return Case(name, TEN, flip(pos, bit), None, HEADER_FAIL, HEADER_FAIL)


CASES = [
    # one flipped bit in a middle block: its nonce, its ciphertext, its tag
    Case("mid_nonce", TEN, flip(lambda g: g.off(3) + 1), (3,), blocks_fsck(3), apparent=TEN),
    Case("mid_body", TEN, flip(lambda g: g.off(5) + g.o + 700), (5,), blocks_fsck(5),
         apparent=TEN),
    Case("mid_tag", TEN, flip(lambda g: g.off(6) + g.cb - 1), (6,), blocks_fsck(6),
         apparent=TEN),
    Case("final_body", TEN, flip(lambda g: g.off(9) + g.o + 5), (9,), blocks_fsck(9),
         apparent=TEN),
    # the header, region by region (see cryptfs/header.py for the layout)
    header_case("hdr_magic", lambda g: 2),
    header_case("hdr_version", lambda g: 6, 0x02),
    header_case("hdr_mode", lambda g: 7, 0x04),
    header_case("hdr_flag_sparse", lambda g: 9, 0x01),  # a known flag: only the MAC catches it
    header_case("hdr_flag_unknown", lambda g: 8, 0x80),
    header_case("hdr_length", lambda g: 11, 0x01),
    header_case("hdr_file_id", lambda g: 20),
    header_case("hdr_stanza_count", lambda g: 28, 0x02),
    header_case("hdr_stanza_type", lambda g: 29, 0x02),
    header_case("hdr_stanza_key_id", lambda g: 35, 0x01),
    header_case("hdr_stanza_wrapped", lambda g: 70),
    header_case("hdr_mac_first", lambda g: g.h - 32, 0x01),
    header_case("hdr_mac_last", lambda g: g.h - 1, 0x80),
    # cuts
    Case("final_truncated", TEN, cut(lambda g, n: n - 5), (9,), blocks_fsck(9),
         apparent=TEN - 5),
    Case("final_shorter_than_overhead", TEN, cut(lambda g, n: g.off(9) + 10), None,
         "block 9: final block truncated", "block 9: final block truncated"),
    Case("cut_at_block_boundary", TEN, cut(lambda g, n: g.off(6)), (5,), blocks_fsck(5),
         apparent=6 * BS),
    Case("cut_full_file_at_boundary", FOUR_FULL, cut(lambda g, n: g.off(2)), (1,),
         blocks_fsck(1), apparent=2 * BS),
    Case("cut_after_header", TEN, cut(lambda g, n: g.h), None,
         "block 0: file shorter than its header and final block",
         "block 0: file shorter than its header and final block"),
    Case("emptied", TEN, cut(lambda g, n: 0), None,
         "header: empty backing file (header missing)",
         "header: empty backing file (header missing)"),
    # blocks added, moved, replaced
    Case("block_appended", TEN, append_block(1), (9, 10), blocks_fsck(9, 10),
         apparent=TEN + BS),
    Case("block_appended_to_full", FOUR_FULL, append_block(1), (3, 4), blocks_fsck(3, 4),
         apparent=FOUR_FULL + BS),
    Case("blocks_swapped", TEN, swap(2, 6), (2, 6), blocks_fsck(2, 6), apparent=TEN),
    Case("block_from_other_file", TEN, foreign_block(3), (3,), blocks_fsck(3), apparent=TEN),
    Case("header_from_other_file", TEN, foreign_header, tuple(range(10)),
         blocks_fsck(*range(10)), apparent=TEN),
    Case("zero_block_not_sparse", TEN, zero_block(4), (4,), blocks_fsck(4), apparent=TEN),
    # a sparse file accepts all-zero blocks in its holes, but never as its final block
    Case("zero_final_block_sparse", 8 * BS + 1234, zero_final, (8,), blocks_fsck(8),
         apparent=8 * BS + 1234, sparse=True),
]
CONTROLS = {"donor.bin": TEN, "small.txt": 300, "big.bin": 40 * BS + 17}
SPARSE_OK = "sparse_ok.bin"  # an untouched sparse file: its holes read as zeros
SPARSE_OK_SIZE = 8 * BS + 1234


def sparse_content(name: str, size: int) -> bytes:
    """Block 0 and the final block hold data; blocks 1..7 are a hole."""
    data = bytearray(size)
    full = plaintext(name, size)
    data[:100] = full[:100]
    data[8 * BS :] = full[8 * BS :]
    return bytes(data)


def write_sparse(path: Path, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.pwrite(fd, content[:100], 0)
        os.pwrite(fd, content[8 * BS :], 8 * BS)
    finally:
        os.close(fd)


def content_of(case: Case) -> bytes:
    if case.sparse:
        return sparse_content(case.name, case.size)
    return plaintext(case.name, case.size)


# --- the shared, tampered volume -----------------------------------------------------------------
LOG_LINE = re.compile(r" (?P<level>[A-Z]+): (?P<msg>.*)$")
INTEGRITY = re.compile(r"^integrity failure: inode (?P<ino>\d+) (?P<rest>(header|block \d+): .+)$")


@dataclass
class Tampered:
    mode: str
    mount: Mount
    inodes: dict[str, int]
    clean_fsck: tuple[int, str, str]
    fsck: tuple[int, str, str]
    secrets: list[bytes] = field(default_factory=list)

    def log_entries(self) -> list[tuple[str, str]]:
        out = []
        for line in self.mount.log_text().splitlines():
            m = LOG_LINE.search(line)
            out.append((m["level"], m["msg"]) if m else ("", line))
        return out

    def integrity_lines(self, name: str) -> list[str]:
        ino = self.inodes[name]
        found = []
        for level, msg in self.log_entries():
            m = INTEGRITY.match(msg)
            if m and int(m["ino"]) == ino:
                assert level == "ERROR", msg
                found.append(m["rest"])
        return found

    def fsck_lines(self) -> list[str]:
        return [ln for ln in self.fsck[1].splitlines() if ln.startswith("damaged: ")]


def key_material(backing: Path, files: list[Path]) -> list[bytes]:
    """The volume's master and derived keys, and every file's key, in the encodings a
    log could show them (raw is not text, so hex and base64)."""
    vol = unlock(backing)
    try:
        master = vol.keys.master.reveal()
        keys = [master] + [hkdf(master, label) for label in
                           (b"cryptfs/v1/config", b"cryptfs/v1/wrap", b"cryptfs/v1/symlink",
                            b"cryptfs/v1/xattr")]
        keys.append(hkdf(master, b"cryptfs/v1/names", 64))
        for p in files:
            fd = os.open(p, os.O_RDONLY)
            try:
                hdr = ContentFile.load(fd, vol.keys.wrapper).header
            finally:
                os.close(fd)
            keys += [hdr.file_key, *hdr.keys()]
    finally:
        vol.close()
    out = [PASSPHRASE]
    for k in keys:
        out += [k.hex().encode(), base64.b64encode(k), base64.urlsafe_b64encode(k).rstrip(b"=")]
    return out


def backing_by_inode(backing: Path) -> dict[int, Path]:
    return {p.stat().st_ino: p for p in (backing / "tree").iterdir() if p.is_file()}


def fsck(backing: Path, passfile: Path) -> tuple[int, str, str]:
    res = run_cli("fsck", str(backing), "--passphrase-file", str(passfile), check=False)
    return res.returncode, res.stdout, res.stderr


@pytest.fixture(scope="module", params=list(OVERHEAD))
def tampered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Tampered]:
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"tamper-{mode}")
    passfile = tmp / "passphrase"
    passfile.write_bytes(PASSPHRASE + b"\n")
    backing = make_volume(tmp / "backing", mode)
    m = new_mount(tmp, backing, passfile)
    try:
        m.start()
        for name, size in CONTROLS.items():
            m.path(name).write_bytes(plaintext(name, size))
        write_sparse(m.path(SPARSE_OK), sparse_content(SPARSE_OK, SPARSE_OK_SIZE))
        for case in CASES:
            if case.sparse:
                write_sparse(m.path(case.name), content_of(case))
            else:
                m.path(case.name).write_bytes(content_of(case))
        names = [c.name for c in CASES] + list(CONTROLS) + [SPARSE_OK]
        inodes = {n: os.stat(m.path(n)).st_ino for n in names}
        m.stop()

        clean = fsck(backing, passfile)
        by_ino = backing_by_inode(backing)
        files = {n: by_ino[ino] for n, ino in inodes.items()}
        secrets = key_material(backing, list(files.values()))
        donor = files["donor.bin"].read_bytes()
        o = OVERHEAD[mode]
        # The backing files are laid out as cryptfs/content.py documents.
        assert donor[7] == MODE_ID[mode]
        assert struct.unpack_from(">H", donor, 10)[0] == HEADER_LEN
        assert len(donor) == HEADER_LEN + 9 * (BS + o) + 1234 + o
        for sp in (SPARSE_OK, "zero_final_block_sparse"):
            assert struct.unpack_from(">H", files[sp].read_bytes(), 8)[0] & 1, "not sparse"
        geo = Geo(HEADER_LEN, o, donor)
        for case in CASES:
            p = files[case.name]
            p.write_bytes(case.edit(bytearray(p.read_bytes()), geo))

        damaged = fsck(backing, passfile)
        m.start()
        yield Tampered(mode, m, inodes, clean, damaged, secrets)
    finally:
        m.stop()


# --- the tests -----------------------------------------------------------------------------------
def read_block_range(fd: int, off: int, length: int) -> bytes:
    return os.pread(fd, length, off)


def assert_eio(fn: Callable[[], object]) -> None:
    with pytest.raises(OSError) as ei:
        fn()
    assert ei.value.errno == errno.EIO, ei.value


def assert_alive(t: Tampered) -> None:
    m = t.mount
    assert os.path.ismount(m.mnt)
    assert not daemon_gone(m.pid)
    assert m.path("small.txt").read_bytes() == plaintext("small.txt", 300)
    fd = os.open(m.path("big.bin"), os.O_RDONLY)
    try:
        assert os.pread(fd, 50, 39 * BS) == plaintext("big.bin", 40 * BS + 17)[39 * BS : 39 * BS + 50]
    finally:
        os.close(fd)


def test_fsck_of_untouched_volume_is_clean(tampered: Tampered) -> None:
    code, out, err = tampered.clean_fsck
    assert code == 0, out + err
    n_files = len(CASES) + len(CONTROLS) + 1
    assert out.splitlines()[-1].startswith(f"checked 1 directories, {n_files} files (")
    assert out.splitlines()[-1].endswith(": clean")
    assert "damaged" not in out and err == ""


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_tampered_file(tampered: Tampered, case: Case) -> None:
    m = tampered.mount
    path = m.path(case.name)
    original = content_of(case)
    assert case.name in os.listdir(m.mnt)
    assert stat.S_ISREG(os.stat(path).st_mode)

    if case.bad is None:
        # The damage is in what open() authenticates: open fails, nothing is served.
        for _ in range(3):
            assert_eio(lambda: open(path, "rb"))
        assert set(tampered.integrity_lines(case.name)) == {case.log}
    else:
        assert os.stat(path).st_size == case.apparent
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            n = -(-case.apparent // BS)
            good = [b for b in range(n) if b not in case.bad]
            if good:
                # a small read at the start of the first healthy block: no error, no log line
                first = good[0]
                before = tampered.integrity_lines(case.name)
                assert os.pread(fd, 16, first * BS) == original[first * BS : first * BS + 16]
                assert tampered.integrity_lines(case.name) == before
            for b in range(n):
                off = b * BS
                length = min(BS, case.apparent - off)
                if b in case.bad:
                    assert_eio(lambda off=off, length=length: os.pread(fd, length, off))
                    # a one-byte read inside the damaged block fails as well
                    assert_eio(lambda off=off: os.pread(fd, 1, off + 100))
                else:
                    assert os.pread(fd, length, off) == original[off : off + length], b
        finally:
            os.close(fd)
        assert set(tampered.integrity_lines(case.name)) == {
            f"block {b}: authentication failed" for b in case.bad}
    # A plain whole-file read fails (EIO), it never returns wrong or short data.
    assert_eio(path.read_bytes)
    assert_alive(tampered)

    lines = [ln for ln in tampered.fsck_lines() if ln.startswith(f"damaged: /{case.name}: ")]
    assert lines == [f"damaged: /{case.name}: {case.fsck}"]


def test_fsck_exit_6_names_exactly_the_damaged_files(tampered: Tampered) -> None:
    code, out, err = tampered.fsck
    assert code == 6, out + err
    lines = tampered.fsck_lines()
    assert sorted(ln.split(":")[1].strip() for ln in lines) == sorted(f"/{c.name}" for c in CASES)
    n_files = len(CASES) + len(CONTROLS) + 1
    assert out.splitlines()[-1].startswith(f"checked 1 directories, {n_files} files (")
    assert out.splitlines()[-1].endswith(f": {len(CASES)} problem(s)")
    assert err.splitlines() == [
        f"cryptfs: error: {len(CASES)} damaged item(s) in {tampered.mount.backing}"]
    for control in [*CONTROLS, SPARSE_OK]:
        assert control not in out


def test_untouched_files_still_read_exactly(tampered: Tampered) -> None:
    m = tampered.mount
    for name, size in CONTROLS.items():
        assert m.path(name).read_bytes() == plaintext(name, size)
    # holes of a sparse file read as zeros (its header says it may have holes)
    data = m.path(SPARSE_OK).read_bytes()
    assert data == sparse_content(SPARSE_OK, SPARSE_OK_SIZE)
    assert data[BS : 8 * BS] == bytes(7 * BS)
    for name in [*CONTROLS, SPARSE_OK]:
        assert tampered.integrity_lines(name) == []


def test_log_holds_only_integrity_lines_and_no_secrets(tampered: Tampered) -> None:
    m = tampered.mount
    for case in CASES:  # make sure every damaged file has been touched at least once
        assert_eio(m.path(case.name).read_bytes)
    assert_alive(tampered)
    text = m.log_text()
    assert "Traceback" not in text
    seen = set()
    for level, msg in tampered.log_entries():
        if level == "INFO":
            # (the request counts at unmount: opcode names and numbers only)
            assert (msg.startswith("mounted ") or msg.startswith("unmounted ")
                    or re.fullmatch(r"served \d+ requests: [a-z_]+ \d+(, [a-z_]+ \d+)*", msg)
                    or re.fullmatch(r"request loop: \d+ requests found by polling, \d+ polls "
                                    r"ran out, slept \d+ times", msg)
                    or re.fullmatch(r"time per request, decode to reply written: [a-z_]+ "
                                    r"[\d.]+ us \(\d+%\)(, [a-z_]+ [\d.]+ us \(\d+%\))*", msg)), msg
            continue
        assert level == "ERROR", msg
        hit = INTEGRITY.match(msg)
        assert hit, msg
        seen.add(int(hit["ino"]))
    assert seen == {tampered.inodes[c.name] for c in CASES}
    raw = text.encode()
    assert MARK not in raw
    for secret in tampered.secrets:
        assert secret not in raw


# --- a header changed while the volume is mounted ------------------------------------------------
# The mount keeps the header it last checked after the last close (cryptfs.content's
# CheckedHeader), so the next open can compare bytes instead of authenticating again.
# These cases change the backing header between two opens of one mount: any change
# must be authenticated in full (EIO and a log line), never served from what was kept.
@pytest.mark.parametrize("where", ["magic", "length", "file_id", "wrapped", "mac", "foreign"])
def test_a_header_changed_between_opens_of_one_mount_fails(where: str, mount: Mount) -> None:
    content = plaintext("victim", 3 * BS + 5)
    mount.path("victim").write_bytes(content)
    mount.path("donor").write_bytes(plaintext("donor", 100))
    assert mount.path("victim").read_bytes() == content  # checked, closed, kept
    by_ino = backing_by_inode(mount.backing)
    victim = by_ino[os.stat(mount.path("victim")).st_ino]
    raw = bytearray(victim.read_bytes())
    pos = {"magic": 2, "length": 11, "file_id": 20, "wrapped": 70, "mac": HEADER_LEN - 1}
    if where == "foreign":  # another file's header: valid, authentic, the wrong key
        donor = by_ino[os.stat(mount.path("donor")).st_ino].read_bytes()
        changed = donor[:HEADER_LEN] + raw[HEADER_LEN:]
    else:
        changed = bytearray(raw)
        changed[pos[where]] ^= 0x01
    with open(victim, "r+b") as f:
        f.write(changed[:HEADER_LEN])
    if where == "foreign":
        # the header authenticates (it is the donor's), so open works; no block does
        fd = os.open(mount.path("victim"), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # (pages the write left)
            assert_eio(lambda: os.pread(fd, 100, 0))
        finally:
            os.close(fd)
        assert "integrity failure: inode" in mount.log_text()
    else:
        assert_eio(lambda: open(mount.path("victim"), "rb"))
        assert re.search(r"integrity failure: inode \d+ header: ", mount.log_text())
    # put back as it was: the same mount reads it again
    with open(victim, "r+b") as f:
        f.write(raw[:HEADER_LEN])
    assert mount.path("victim").read_bytes() == content


def test_a_forged_layout_hint_gives_eio_once_never_a_wrong_size(tmp_path: Path, backing: Path,
                                                                passfile: Path) -> None:
    """The layout hint (an unauthenticated xattr of the backing file) gives the
    size a mount reports before it reads the header. A storage admin raised its
    header length by two blocks: a passphrase mount then reported 3,008 bytes
    of an 11,200-byte file, `cat` and `cp` stopped there without an error (the
    writeback cache keeps that size), and `>>` wrote into the middle of the
    file. Now the open that finds the disagreement fails with EIO (an integrity
    failure in the log), the hint is put right, and the next open reads all of
    it, with appends at the true end."""
    m = new_mount(tmp_path, backing, passfile)
    m.start()
    data = b"".join(b"line %05d of the real file\n" % i for i in range(400))
    m.path("data.txt").write_bytes(data)
    m.stop()
    (f,) = [p for p in (backing / "tree").iterdir() if p.is_file() and not p.name.startswith(".")]
    mode_id, h_len = struct.unpack(">BH", os.getxattr(f, "user.cryptfs-layout"))
    os.setxattr(f, "user.cryptfs-layout", struct.pack(">BH", mode_id, h_len + 2 * 4124))
    m.start()
    try:
        assert os.stat(m.path("data.txt")).st_size == len(data) - 2 * 4096  # (the forged size)
        with pytest.raises(OSError) as e:
            m.path("data.txt").read_bytes()
        assert e.value.errno == errno.EIO
        assert os.getxattr(f, "user.cryptfs-layout") == struct.pack(">BH", mode_id, h_len)
        # A program that tries again at once, before the kernel has let go, gets
        # EIO again, never the short size (a review found the retry served it).
        for _ in range(3):
            try:
                got = m.path("data.txt").read_bytes()
            except OSError as again:
                assert again.errno == errno.EIO
            else:
                assert got == data
                break
        deadline = time.monotonic() + 10  # (the kernel forgets the inode, then looks it up anew)
        while os.stat(m.path("data.txt")).st_size != len(data) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.stat(m.path("data.txt")).st_size == len(data)
        assert m.path("data.txt").read_bytes() == data
        with open(m.path("data.txt"), "ab") as out:
            out.write(b"APPENDED\n")
        assert m.path("data.txt").read_bytes() == data + b"APPENDED\n"
    finally:
        m.stop()
    log = m.log.read_text()
    assert "integrity failure" in log and "the layout hint disagrees with the header" in log, log
    assert fsck(backing, passfile)[0] == 0
