"""The block engine and file header, on plain backing files (no mount)."""

from __future__ import annotations

import gc
import os
import random
import time
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tmpfs
from cryptfs.content import (
    BS,
    READ_AHEAD,
    BlockError,
    ContentFile,
    backing_size,
    n_blocks,
    plain_size,
)
from cryptfs.header import FileHeader
from cryptfs.modes import CONTENT_MODES, IntegrityError, x25519
from cryptfs.modes.wrap import Keyring, RecipientWrapper, SymmetricWrapper

WRAPPER = SymmetricWrapper(bytes(range(32)), key_id=1)
MODES = list(CONTENT_MODES.values())


@pytest.fixture(params=MODES, ids=lambda m: m.name)
def mode(request):
    return request.param


def new_file(tmp_path, mode, name="f"):
    fd = os.open(tmp_path / name, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    return ContentFile.create(fd, mode, WRAPPER)


@settings(max_examples=300, deadline=None)
@given(p_size=st.integers(0, 10**9), h_len=st.integers(93, 400), overhead=st.sampled_from([28, 40]))
def test_size_arithmetic_inverts(p_size, h_len, overhead) -> None:
    assert plain_size(backing_size(p_size, h_len, overhead), h_len, overhead) == p_size
    assert n_blocks(p_size) == max(1, -(-p_size // BS))


def test_empty_file_has_header_and_one_empty_final_block(tmp_path, mode) -> None:
    cf = new_file(tmp_path, mode)
    assert cf.size == 0
    assert os.fstat(cf.fd).st_size == cf.h_len + mode.overhead
    again = ContentFile.load(cf.fd, WRAPPER)
    assert again.size == 0 and again.read(0, 100) == b""


def test_header_round_trip_and_tamper(tmp_path, mode) -> None:
    hdr = FileHeader.new(mode, WRAPPER)
    raw = hdr.encode()
    assert len(raw) == hdr.length == 29 + 3 + 64 + 32
    back = FileHeader.decode(raw + b"trailing content", WRAPPER)
    assert (back.file_id, back.file_key, back.mode) == (hdr.file_id, hdr.file_key, hdr.mode)
    for i in range(len(raw)):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        with pytest.raises(IntegrityError):
            FileHeader.decode(bytes(bad), WRAPPER)
    with pytest.raises(IntegrityError):
        FileHeader.decode(raw, SymmetricWrapper(bytes(32), key_id=1))


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200))
def test_header_parser_decodes_or_raises_integrity_error(raw) -> None:
    with pytest.raises(IntegrityError):
        FileHeader.decode(raw, WRAPPER)  # random bytes never authenticate


def test_random_operations_match_a_plain_file(tmp_path, mode) -> None:
    """Seeded random writes, truncates and holes compared with a plain file."""
    rng = random.Random(1234)
    cf = new_file(tmp_path, mode)
    shadow = bytearray()
    for step in range(1500):
        op = rng.random()
        if op < 0.55:
            off = rng.choice([rng.randrange(0, len(shadow) + 1),
                              rng.randrange(0, 3 * BS), len(shadow) + rng.randrange(0, 5 * BS)])
            data = rng.randbytes(rng.choice([1, 7, BS - 1, BS, BS + 1, rng.randrange(1, 3 * BS)]))
            assert cf.write(off, data) == len(data)
            if off > len(shadow):
                shadow.extend(bytes(off - len(shadow)))
            shadow[off : off + len(data)] = data
        elif op < 0.75:
            size = rng.choice([0, rng.randrange(0, len(shadow) + 1), len(shadow) + rng.randrange(0, 4 * BS),
                               rng.randrange(0, 4) * BS])
            cf.truncate(size)
            if size < len(shadow):
                del shadow[size:]
            else:
                shadow.extend(bytes(size - len(shadow)))
        else:
            off = rng.randrange(0, len(shadow) + BS)
            n = rng.randrange(0, 3 * BS)
            assert cf.read(off, n) == bytes(shadow[off : off + n]), step
        assert cf.size == len(shadow)
        if step % 100 == 0:
            reloaded = ContentFile.load(cf.fd, WRAPPER)
            assert reloaded.size == len(shadow)
            assert reloaded.read(0, len(shadow) + 1) == bytes(shadow)
            assert reloaded.verify() == []
    assert ContentFile.load(cf.fd, WRAPPER).read(0, len(shadow)) == bytes(shadow)


def test_holes_are_sparse_and_read_as_zeros(tmp_path, mode) -> None:
    cf = new_file(tmp_path, mode)
    cf.write(0, b"head")
    cf.write(100 * BS, b"tail")
    assert cf.header.sparse
    assert ContentFile.load(cf.fd, WRAPPER).header.sparse  # the flag is in the header
    assert cf.read(0, 4) == b"head"
    assert cf.read(50 * BS, 10) == bytes(10)
    assert cf.read(100 * BS, 10) == b"tail"
    assert os.fstat(cf.fd).st_blocks * 512 < 10 * BS  # the hole costs no disk
    cf.truncate(1 << 33)  # 8 GiB, instantly
    assert cf.size == 1 << 33
    assert cf.read((1 << 33) - 3, 10) == bytes(3)
    assert ContentFile.load(cf.fd, WRAPPER).verify() == []


def test_zero_block_in_a_file_without_holes_is_an_error(tmp_path, mode) -> None:
    cf = new_file(tmp_path, mode)
    cf.write(0, os.urandom(5 * BS))
    assert not cf.header.sparse
    os.pwrite(cf.fd, bytes(cf.c_block), cf.h_len + 2 * cf.c_block)
    cf2 = ContentFile.load(cf.fd, WRAPPER)
    with pytest.raises(BlockError) as e:
        cf2.read(2 * BS, 10)
    assert e.value.block == 2
    assert cf2.verify() == [2]


def test_cut_at_block_boundary_is_detected(tmp_path, mode) -> None:
    cf = new_file(tmp_path, mode)
    cf.write(0, os.urandom(4 * BS + 100))
    os.ftruncate(cf.fd, cf.h_len + 2 * cf.c_block)  # two whole blocks left
    cf2 = ContentFile.load(cf.fd, WRAPPER)
    assert cf2.size == 2 * BS
    with pytest.raises(BlockError) as e:
        cf2.read(BS, 10)
    assert e.value.block == 1  # the new final block was not sealed as final
    os.ftruncate(cf.fd, cf.h_len)  # nothing but the header
    with pytest.raises(BlockError):
        ContentFile.load(cf.fd, WRAPPER)


def test_blocks_swapped_or_copied_between_files_fail(tmp_path, mode) -> None:
    a, b = new_file(tmp_path, mode, "a"), new_file(tmp_path, mode, "b")
    a.write(0, b"A" * (3 * BS))
    b.write(0, b"B" * (3 * BS))
    blk0 = os.pread(a.fd, a.c_block, a.h_len)
    blk1 = os.pread(a.fd, a.c_block, a.h_len + a.c_block)
    os.pwrite(a.fd, blk1, a.h_len)
    os.pwrite(a.fd, blk0, a.h_len + a.c_block)
    a2 = ContentFile.load(a.fd, WRAPPER)
    assert a2.verify() == [0, 1]
    os.pwrite(b.fd, os.pread(a.fd, a.c_block, a.h_len + 2 * a.c_block - a.c_block), b.h_len + b.c_block)
    assert ContentFile.load(b.fd, WRAPPER).verify() == [1]
    os.pwrite(b.fd, os.pread(a.fd, a.h_len, 0), 0)  # a's header on b's blocks
    bad = ContentFile.load(b.fd, WRAPPER)  # the header itself is valid...
    assert bad.verify() == [0, 1, 2]  # ...but no block opens under it


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 256 KiB tmpfs, to run out of space on."""
    with tmpfs(tmp_path / "tiny", "size=256k") as d:
        yield d


def test_disk_full_keeps_the_old_content(tiny_fs, mode) -> None:
    import errno

    cf = new_file(tiny_fs, mode)
    original = os.urandom(10 * BS + 123)
    cf.write(0, original)
    with pytest.raises(OSError) as e:
        cf.write(len(original), os.urandom(400 * 1024))  # more than the filesystem holds
    assert e.value.errno == errno.ENOSPC
    assert cf.size == len(original)
    again = ContentFile.load(cf.fd, WRAPPER)
    assert again.size == len(original)
    assert again.read(0, 1 << 20) == original
    assert again.verify() == []
    filler = os.open(tiny_fs / "filler", os.O_WRONLY | os.O_CREAT)  # take every block left
    with pytest.raises(OSError):
        while True:
            os.write(filler, bytes(4096))
    os.close(filler)
    with pytest.raises(OSError) as e:
        cf.truncate(10 << 20 | 77)  # growing: its new final block cannot be stored
    assert e.value.errno == errno.ENOSPC
    assert cf.size == len(original)
    assert ContentFile.load(cf.fd, WRAPPER).read(0, 1 << 20) == original


# --- read-ahead of the backing file for a sequential reader ----------------------------------
def _resident(fd: int, off: int, length: int) -> float:
    """The share of the backing file's pages in [off, off + length) that are in the page
    cache (mincore(2) on a read-only mapping, which touches none of them)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = os.sysconf("SC_PAGE_SIZE")
    start = off // page * page
    n = (off + length - start + page - 1) // page
    addr = libc.mmap(None, n * page, 1, 1, fd, start)  # PROT_READ, MAP_SHARED
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vec = (ctypes.c_ubyte * n)()
        assert libc.mincore(addr, n * page, vec) == 0, os.strerror(ctypes.get_errno())
        return sum(v & 1 for v in vec) / n
    finally:
        libc.munmap(addr, n * page)


def _cold(cf: ContentFile) -> None:
    os.fsync(cf.fd)
    os.posix_fadvise(cf.fd, 0, 0, os.POSIX_FADV_DONTNEED)
    assert _resident(cf.fd, 0, os.fstat(cf.fd).st_size) < 0.05


def _eventually_resident(fd: int, off: int, length: int) -> float:
    deadline = time.monotonic() + 5
    while (share := _resident(fd, off, length)) < 0.9 and time.monotonic() < deadline:
        time.sleep(0.02)
    return share


def test_a_sequential_reader_gets_the_backing_file_read_ahead(tmp_path, mode) -> None:
    """Reads of 128 KiB one after the other (as the kernel's read-ahead sends them): the
    backing bytes up to READ_AHEAD past the last read are asked for (POSIX_FADV_WILLNEED),
    so the disk works on them while the daemon decrypts; a reader that jumps asks for
    nothing ahead."""
    cf = new_file(tmp_path, mode)
    data = random.Random(7).randbytes(8 << 20)
    cf.write(0, data)
    chunk = 128 << 10
    _cold(cf)
    # The first read of a file counts as sequential (it starts where a new reader is).
    # The kernel's own read-ahead of that pread reaches about 1 MiB; the hint reaches
    # READ_AHEAD (2 MiB) past the read.
    assert cf.read(0, chunk) == data[:chunk]
    far = cf._c_off(chunk // BS) + READ_AHEAD - (256 << 10)
    assert _eventually_resident(cf.fd, far, 128 << 10) > 0.9
    assert cf.read(chunk, chunk) == data[chunk:2 * chunk]       # the next one asks further
    assert _eventually_resident(cf.fd, far + chunk, 128 << 10) > 0.9
    _cold(cf)
    for off in (5 << 20, 3 << 20):               # jumps: never where the last read ended
        assert cf.read(off, chunk) == data[off:off + chunk]
    time.sleep(0.3)
    assert _resident(cf.fd, cf._c_off(((3 << 20) + chunk) // BS) + (1 << 20), 128 << 10) == 0
    # small sequential reads leave read-ahead to the kernel; none past the end of the file
    _cold(cf)
    for off in range(0, 8 * 4096, 4096):
        assert cf.read(off, 4096) == data[off:off + 4096]
    time.sleep(0.3)
    assert _resident(cf.fd, cf._c_off(64) + (1 << 20), 128 << 10) == 0
    assert cf.read((8 << 20) - chunk, chunk) == data[-chunk:]   # the end: nothing to ask


# --- a header checked once, compared at the next load (CheckedHeader) ---------------------------
class CountingKeyring(Keyring):
    """The real keyring; it counts the unwraps, i.e. the full header checks."""

    def __init__(self) -> None:
        super().__init__({WRAPPER.key_id: WRAPPER})
        self.unwraps = 0

    def unwrap(self, stanzas, ad):
        self.unwraps += 1
        return super().unwrap(stanzas, ad)


def test_a_header_made_or_checked_here_is_compared_not_checked_again(tmp_path, mode) -> None:
    ring = CountingKeyring()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | os.O_EXCL)
    made = ContentFile.create(fd, mode, WRAPPER, opener=ring)
    made.write(0, b"x" * 5000)
    again = ContentFile.load(fd, ring, made.checked)
    assert ring.unwraps == 0 and again.header is made.header
    assert again.size == 5000 and again.read(0, 6000) == b"x" * 5000
    # without what was kept, or with another keyring object: the full check
    loaded = ContentFile.load(fd, ring)
    assert ring.unwraps == 1 and loaded.header is not made.header
    other = CountingKeyring()
    ContentFile.load(fd, other, loaded.checked)
    assert other.unwraps == 1
    # what a load checked is kept for the next load with the same keyring
    assert ContentFile.load(fd, ring, loaded.checked).header is loaded.header
    assert ring.unwraps == 1


def test_a_header_changed_on_disk_is_checked_in_full(tmp_path, mode) -> None:
    ring = CountingKeyring()
    cf = new_file(tmp_path, mode)
    cf.write(0, b"y" * 100)
    kept = ContentFile.load(cf.fd, ring).checked
    raw = os.pread(cf.fd, cf.h_len, 0)
    for pos in range(cf.h_len):  # every byte of the header, one at a time
        os.pwrite(cf.fd, bytes([raw[pos] ^ 0x40]), pos)
        with pytest.raises(BlockError):
            ContentFile.load(cf.fd, ring, kept)
        os.pwrite(cf.fd, raw[pos : pos + 1], pos)
    assert ContentFile.load(cf.fd, ring, kept).read(0, 100) == b"y" * 100


def test_a_header_kept_does_not_outlive_its_keyring(tmp_path, mode) -> None:
    """Kept headers hold their keyring weakly: once a mount drops a keyring (keys,
    users or roles changed), nothing matches it and it is not kept alive."""
    ring = CountingKeyring()
    cf = new_file(tmp_path, mode)
    kept = ContentFile.load(cf.fd, ring).checked
    assert kept.checked_by(ring)
    gone = weakref.ref(ring)
    del ring
    gc.collect()
    assert gone() is None
    assert not kept.checked_by(CountingKeyring())


def test_a_hybrid_header_is_not_taken_as_known_at_creation(tmp_path) -> None:
    """Only the recipients' keys open a hybrid header: what it was made with says
    nothing about the keyring that will open it, so the first load checks it."""
    hybrid = RecipientWrapper([x25519.public_key(x25519.new_private_key())])
    fd = os.open(tmp_path / "h", os.O_RDWR | os.O_CREAT | os.O_EXCL)
    cf = ContentFile.create(fd, MODES[0], hybrid, opener=CountingKeyring())
    assert cf.header.hybrid and cf.checked is None
