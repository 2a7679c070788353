"""File content on a backing file descriptor: block arithmetic, seal and open.

Pure of FUSE: works on any open backing fd.  A regular file's backing file is
``header || block 0 || block 1 || ... || block n-1``; every block but the last
holds exactly 4096 bytes of plaintext, the last holds 0..4096 and is sealed
with ``last = 1``.  A file always has at least one (possibly empty) block, so
cutting a file short at any point is detected.

Offsets: ``p_off`` counts plaintext bytes, ``c_off`` backing bytes.  With
``H`` the header length, ``O`` the per-block overhead and ``B = 4096 + O``,
block ``i`` starts at ``c_off = H + i * B``.

Holes: a write or truncate past the end leaves the blocks in between
unwritten (the backing file has a hole there) and sets the header's sparse
flag; in a file so flagged, a non-final block that is all zero bytes reads as
4096 zero bytes.  In a file without the flag, it is an integrity error.
"""

from __future__ import annotations

import errno
import os
import weakref
from collections.abc import Sequence

from cryptfs import sysio
from cryptfs.header import (
    FLAG_SPARSE,
    MAX_HEADER_LEN,
    PREFIX,
    PREFIX_LEN,
    FileHeader,
    KeyUnwrapper,
    KeyWrapper,
    peek,
)
from cryptfs.modes import BLOCK_SIZE, IntegrityError
from cryptfs.modes.content import ContentCipher, ContentMode
from cryptfs.modes.wrap import Stanza, decode_stanzas

BS = BLOCK_SIZE
_RUN_MAX = 512  # blocks per pwritev: two pieces each, IOV_MAX is 1024
_ZERO_PLAIN = bytes(BS)
MAX_OFF = 2**63 - 1  # the largest file offset (off_t)
_ZERO_CHUNK = 256 * BS  # plaintext bytes of zeros written per step (zero, punch)
# Backing bytes a sequential reader is fetched ahead (POSIX_FADV_WILLNEED): the disk
# works on them while this one thread decrypts and answers the read before.  The
# kernel's own read-ahead of the backing file did not keep up (docs/PERFORMANCE.md).
READ_AHEAD = 2 << 20
_READ_AHEAD_FROM = 64 << 10  # (smaller sequential reads: the kernel's read-ahead keeps up)


class BlockError(IntegrityError):
    """An integrity failure located at one block (``block`` is None for the header)."""

    def __init__(self, block: int | None, what: str = "authentication failed") -> None:
        super().__init__(what)
        self.block = block


def pwrite_all(fd: int, pieces: Sequence[bytes], c_off: int) -> None:
    """pwritev that finishes short writes (raises OSError, e.g. ENOSPC, if it cannot)."""
    done = os.pwritev(fd, pieces, c_off)
    total = sum(len(p) for p in pieces)
    if done == total:
        return
    rest = memoryview(b"".join(pieces))[done:]
    c_off += done
    while rest:
        n = os.pwrite(fd, rest, c_off)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        rest = rest[n:]
        c_off += n


def n_blocks(p_size: int) -> int:
    return max(1, -(-p_size // BS))


def plain_size(c_size: int, h_len: int, overhead: int) -> int:
    """Plaintext size of a backing file of ``c_size`` bytes."""
    d = c_size - h_len
    if d < overhead:
        raise BlockError(0, "file shorter than its header and final block")
    q, m = divmod(d, BS + overhead)
    if m == 0:
        return q * BS
    if m < overhead:
        raise BlockError(q, "final block truncated")
    return q * BS + (m - overhead)


def backing_size(p_size: int, h_len: int, overhead: int) -> int:
    n = n_blocks(p_size)
    return h_len + (n - 1) * (BS + overhead) + (p_size - (n - 1) * BS) + overhead


def read_header_bytes(fd: int) -> bytes:
    buf = os.pread(fd, 4096, 0)
    _, h_len = peek(buf)
    if h_len > len(buf):
        buf = os.pread(fd, MAX_HEADER_LEN, 0)
    return buf


def read_stanzas(fd: int) -> list[Stanza]:
    """The header's stanzas as they are on disk, parsed but not authenticated
    (enough to see which keys a file is wrapped to; IntegrityError if malformed)."""
    raw = read_header_bytes(fd)
    if len(raw) < PREFIX_LEN:
        raise IntegrityError("bad header")
    _, h_len = peek(raw)
    count = PREFIX.unpack_from(raw)[-1]
    stanzas, _ = decode_stanzas(memoryview(raw)[PREFIX_LEN:h_len], count)
    return stanzas


class CheckedHeader:
    """A header this process authenticated, or made, with ``wrapper``: its exact
    bytes on disk, parsed, and its cipher.

    Kept on the inode between opens (cryptfs.fs.content_io), so that the next
    open can compare bytes instead of deriving, unwrapping and MACing again.
    It is tied to the wrapper *object*, and holds it weakly: a mount makes new
    keyrings whenever keys, users or roles change, and a header checked under
    the old ones never matches again, nor keeps an old keyring (a user's
    private key) alive."""

    __slots__ = ("raw", "_wrapper", "header", "cipher")

    def __init__(self, raw: bytes, wrapper: KeyUnwrapper, header: FileHeader,
                 cipher: ContentCipher) -> None:
        self.raw = raw
        self._wrapper = weakref.ref(wrapper)
        self.header = header
        self.cipher = cipher

    def checked_by(self, wrapper: KeyUnwrapper) -> bool:
        return self._wrapper() is wrapper

    def matches(self, buf: bytes) -> bool:
        """Whether ``buf`` (which may run past the header) starts with exactly
        this header."""
        n = len(self.raw)
        return len(buf) >= n and buf[:n] == self.raw


class ContentFile:
    """Read, write and truncate one file's plaintext through its backing fd.

    One instance per inode: it caches the plaintext size and the final
    block, so every change of the backing file must go through it.
    """

    def __init__(self, fd: int, header: FileHeader, p_size: int,
                 cipher: ContentCipher | None = None) -> None:
        self.fd = fd
        self.header = header
        self.cipher = cipher if cipher is not None else header.cipher()
        self.h_len = header.length
        self.overhead = header.mode.overhead
        self.c_block = BS + self.overhead
        self.size = p_size
        self._zero_block = bytes(self.c_block)
        # The largest plaintext size whose ciphertext offsets fit in off_t
        # (2**63 - 1): the kernel lets a FUSE file grow to 2**63 - 1 plaintext
        # bytes, and the block overhead pushes the ciphertext past that.
        self.max_size = (MAX_OFF - self.h_len) // self.c_block * BS
        self._tail: tuple[int, bytes] | None = None  # (block_no, plaintext) of the final block
        self.changes = 0  # writes and truncates made through it (what a view was made from)
        self._seq_end = 0   # where the last read ended (the next one there is sequential)
        self._advised = 0   # backing offset up to which read-ahead was asked
        self.checked: CheckedHeader | None = None  # (set by load)

    # -- construction ------------------------------------------------------------
    @classmethod
    def create(cls, fd: int, mode: ContentMode, wrapper: KeyWrapper,
               header: FileHeader | None = None, opener: KeyUnwrapper | None = None
               ) -> ContentFile:
        """Initialise an empty backing file: header (a new one, or ``header``)
        plus one empty final block.

        ``opener``, when given, is the keyring the creator's next open will use
        (the mount's; it holds the volume's keys): a symmetric header is then
        known to it as checked (:class:`CheckedHeader`).  A hybrid one is not:
        only its recipients' keys open it, whatever it was made with."""
        hdr = header or FileHeader.new(mode, wrapper)
        cf = cls(fd, hdr, 0)
        raw = hdr.encode()
        pwrite_all(fd, [raw, cf.cipher.seal(0, b"", True)], 0)
        cf._tail = (0, b"")
        if opener is not None and not hdr.hybrid:
            cf.checked = CheckedHeader(raw, opener, hdr, cf.cipher)
        return cf

    @classmethod
    def load(cls, fd: int, wrapper: KeyUnwrapper, known: CheckedHeader | None = None
             ) -> ContentFile:
        """The file's content engine, its header read and checked now.

        ``known`` is a header this process already authenticated (or made) for
        the same ``wrapper`` object: if the header on disk is that one byte for
        byte, its parsed form is taken as it is, which is what authenticating
        those bytes again with those keys would give.  Anything else is decoded
        and authenticated in full."""
        c_size = os.fstat(fd).st_size
        if c_size == 0:
            raise BlockError(None, "empty backing file (header missing)")
        try:
            raw = read_header_bytes(fd)
            if known is not None and known.checked_by(wrapper) and known.matches(raw):
                hdr, cipher = known.header, known.cipher
            else:
                hdr, cipher = FileHeader.decode(raw, wrapper), None
        except IntegrityError:
            raise BlockError(None, "header failed authentication") from None
        cf = cls(fd, hdr, plain_size(c_size, hdr.length, hdr.mode.overhead), cipher)
        if known is None or cipher is None:
            cf.checked = CheckedHeader(raw[:hdr.length], wrapper, hdr, cf.cipher)
        else:
            cf.checked = known
        return cf

    # -- block helpers -------------------------------------------------------------
    def _c_off(self, block: int) -> int:
        return self.h_len + block * self.c_block

    def _sealed_len(self, block: int, p_size: int) -> int:
        last = n_blocks(p_size) - 1
        if block < last:
            return self.c_block
        return p_size - last * BS + self.overhead

    def _open(self, block: int, sealed: bytes | memoryview, last: bool) -> bytes:
        try:
            return self.cipher.open(block, sealed, last)
        except IntegrityError:
            if self.header.sparse and not last and sealed == self._zero_block:
                return _ZERO_PLAIN
            raise BlockError(block) from None

    def _read_blocks(self, first: int, last: int) -> list[bytes]:
        """Decrypt blocks ``first..last`` (inclusive) of the current content."""
        final = n_blocks(self.size) - 1
        if self._tail is not None and first == last == self._tail[0] == final:
            return [self._tail[1]]
        c_len = (last - first) * self.c_block + self._sealed_len(last, self.size)
        ct = os.pread(self.fd, c_len, self._c_off(first))
        if len(ct) != c_len:
            raise BlockError(first + len(ct) // self.c_block, "backing file truncated")
        mv = memoryview(ct)
        out = []
        for i in range(first, last + 1):
            pos = (i - first) * self.c_block
            end = pos + (self.c_block if i < last else c_len - (last - first) * self.c_block)
            out.append(self._open(i, mv[pos:end], i == final))
        if last == final:
            self._tail = (final, out[-1])
        return out

    def _write_blocks(self, blocks: Sequence[tuple[int, bytes | memoryview]], final: int) -> None:
        """Seal and write ``(block_no, plaintext)`` pairs given in ascending order.

        Each run of consecutive blocks is one ``pwritev`` (at most 512 blocks,
        as the kernel takes at most 1024 pieces per call).
        """
        start = 0
        while start < len(blocks):
            end = start + 1
            while (end < len(blocks) and end - start < _RUN_MAX
                   and blocks[end][0] == blocks[end - 1][0] + 1):
                end += 1
            first_no = blocks[start][0]
            pieces = self.cipher.seal_run(first_no, [pt for _, pt in blocks[start:end]], final)
            pwrite_all(self.fd, pieces, self._c_off(first_no))
            start = end
        last_no, last_pt = blocks[-1]
        if last_no == final:
            self._tail = (final, bytes(last_pt))

    def _mark_sparse(self) -> None:
        if not self.header.sparse:
            self.header = self.header.with_flags(self.header.flags | FLAG_SPARSE)
            pwrite_all(self.fd, [self.header.encode()], 0)

    # -- the three operations ----------------------------------------------------------
    def read(self, p_off: int, length: int) -> bytes:
        if p_off >= self.size or length <= 0:
            return b""
        end = min(self.size, p_off + length)
        first, last = p_off // BS, (end - 1) // BS
        data = b"".join(self._read_blocks(first, last))
        if p_off != self._seq_end:
            self._advised = 0  # (a new sequential run asks for its own read-ahead)
        elif end - p_off >= _READ_AHEAD_FROM and end < self.size:
            self._read_ahead(end)
        self._seq_end = end
        return data[p_off - first * BS : end - first * BS]

    def _read_ahead(self, p_end: int) -> None:
        """Ask the kernel to fetch the backing bytes from plaintext offset ``p_end``
        on to READ_AHEAD, past what was asked before: one hint per read, each for
        the bytes the reader will want a few reads later."""
        c_from = self._c_off(p_end // BS)
        start, stop = max(self._advised, c_from), c_from + READ_AHEAD
        if start >= stop:
            return
        try:
            os.posix_fadvise(self.fd, start, stop - start, os.POSIX_FADV_WILLNEED)
        except OSError:
            return  # a hint only (a backing filesystem may not take it)
        self._advised = stop

    def _fits(self, end: int) -> None:
        """EFBIG, as for a file past the backing filesystem's limit, if plaintext
        up to ``end`` would not fit (:attr:`max_size`)."""
        if end > self.max_size:
            raise OSError(errno.EFBIG, f"past the largest size of an encrypted file "
                                       f"({self.max_size} bytes)")

    def write(self, p_off: int, data: bytes | memoryview) -> int:
        length = len(data)
        if length == 0:
            return 0
        self._fits(p_off + length)
        self.changes += 1
        end = p_off + length
        old_size = self.size
        new_size = max(old_size, end)
        old_final = n_blocks(old_size) - 1
        new_final = n_blocks(new_size) - 1
        first, last = p_off // BS, (end - 1) // BS
        todo: list[tuple[int, bytes | memoryview]] = []
        # What the final block held, to put back should the backing file fill up.
        final_pt = self._read_blocks(old_final, old_final)[0] if new_size > old_size else None

        if new_final > old_final and old_final < first:
            # The old final block stops being final: reseal it, padded to a full block.
            assert final_pt is not None
            todo.append((old_final, final_pt + bytes(BS - len(final_pt))))
            if first > old_final + 1:
                self._mark_sparse()

        mv = memoryview(data)
        for i in range(first, last + 1):
            b_start = i * BS
            b_len = min(BS, new_size - b_start)
            lo = max(p_off, b_start)
            hi = min(end, b_start + b_len)
            piece = mv[lo - p_off : hi - p_off]
            if lo == b_start and hi == b_start + b_len:
                todo.append((i, piece))
                continue
            old = self._read_blocks(i, i)[0] if i <= old_final else b""
            buf = bytearray(b_len)
            buf[: min(len(old), b_len)] = old[:b_len]
            buf[lo - b_start : hi - b_start] = piece
            todo.append((i, bytes(buf)))

        self._write_or_roll_back(todo, new_final, old_size, final_pt)
        self.size = new_size
        return length

    def _write_or_roll_back(self, blocks: Sequence[tuple[int, bytes | memoryview]], final: int,
                            old_size: int, final_pt: bytes | None) -> None:
        """Write blocks; if that fails while the file grows (ENOSPC), cut the
        backing file back to its old length and restore its final block, so
        the file keeps its old size and content instead of a damaged tail."""
        try:
            self._write_blocks(blocks, final)
        except BaseException:  # (ENOSPC most often; whatever stopped it, the file is put back)
            self._tail = None  # the disk may no longer hold what the cache says
            if final_pt is not None:
                self._roll_back(old_size, final_pt)
            raise

    def _roll_back(self, old_size: int, final_pt: bytes) -> None:
        old_final = n_blocks(old_size) - 1
        self._tail = None
        try:
            os.ftruncate(self.fd, backing_size(old_size, self.h_len, self.overhead))
            pwrite_all(self.fd, [self.cipher.seal(old_final, final_pt, True)],
                       self._c_off(old_final))
            self._tail = (old_final, final_pt)
        except OSError:
            pass  # the final block stays damaged: reads of it fail and fsck names it

    def truncate(self, new_size: int) -> None:
        old_size = self.size
        if new_size == old_size:
            return
        self._fits(new_size)
        self.changes += 1
        old_final = n_blocks(old_size) - 1
        new_final = n_blocks(new_size) - 1
        if new_size < old_size:
            (pt,) = self._read_blocks(new_final, new_final)
            keep = new_size - new_final * BS
            self._write_blocks([(new_final, pt[:keep])], new_final)
            os.ftruncate(self.fd, backing_size(new_size, self.h_len, self.overhead))
        else:
            (pt,) = self._read_blocks(old_final, old_final)
            if new_final == old_final:
                todo = [(old_final, pt + bytes(new_size - old_size))]
            else:
                if new_final > old_final + 1:
                    self._mark_sparse()
                todo = [(old_final, pt + bytes(BS - len(pt))),
                        (new_final, bytes(new_size - new_final * BS))]
            self._write_or_roll_back(todo, new_final, old_size, pt)
        self.size = new_size

    # -- fallocate(2) --------------------------------------------------------------------
    def reserve(self, p_off: int, length: int) -> None:
        """Reserve backing space for the blocks of plaintext ``[p_off, p_off+length)``
        (FALLOC_FL_KEEP_SIZE on the backing file: its size and content stay), so
        writing them later cannot fail for want of space.  A block is rewritten
        in place with the same length, so its reserved space is the space it uses."""
        if length <= 0:
            return
        self._fits(p_off + length)
        first, last = p_off // BS, (p_off + length - 1) // BS
        c_start = self._c_off(first)
        sysio.fallocate(self.fd, sysio.FALLOC_FL_KEEP_SIZE, c_start,
                        self._c_off(last) + self.c_block - c_start)

    def zero(self, p_off: int, length: int) -> None:
        """Plaintext ``[p_off, p_off+length)`` (within the size) becomes zero bytes,
        written as sealed blocks of zeros: space stays allocated (FALLOC_FL_ZERO_RANGE)."""
        end = min(self.size, p_off + length)
        pos = p_off
        while pos < end:
            n = min(_ZERO_CHUNK, end - pos)
            self.write(pos, bytes(n))
            pos += n

    def punch(self, p_off: int, length: int) -> None:
        """Plaintext ``[p_off, p_off+length)`` (within the size) reads as zero bytes
        afterwards (FALLOC_FL_PUNCH_HOLE).  Whole blocks before the final one become
        holes of the backing file (the file is flagged sparse, the format's way to
        say such a block reads as zeros); partial blocks at the ends and the final
        block are written as zero plaintext.  A backing file that cannot punch
        holes gets zeros written instead."""
        end = min(self.size, p_off + length)
        if p_off >= end:
            return
        final = n_blocks(self.size) - 1
        first_whole = -(-p_off // BS)
        last_whole = min(end // BS, final) - 1  # (the final block is never a hole)
        if first_whole > last_whole:
            self.zero(p_off, end - p_off)
            return
        self.changes += 1
        self._mark_sparse()
        c_start = self._c_off(first_whole)
        try:
            sysio.fallocate(self.fd, sysio.FALLOC_FL_PUNCH_HOLE | sysio.FALLOC_FL_KEEP_SIZE,
                            c_start, (last_whole + 1 - first_whole) * self.c_block)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self.zero(first_whole * BS, (last_whole + 1 - first_whole) * BS)
        self.zero(p_off, first_whole * BS - p_off)
        self.zero((last_whole + 1) * BS, end - (last_whole + 1) * BS)

    def verify(self) -> list[int]:
        """Check every block; return the numbers of those that fail (fsck).

        Reads up to 256 blocks per call; in a file flagged sparse, whole
        blocks inside a hole of the backing file are skipped (SEEK_DATA).
        """
        bad: list[int] = []
        final = n_blocks(self.size) - 1
        i = 0
        while i <= final:
            if self.header.sparse and i < final:
                c_off = self._c_off(i)
                try:
                    data_off = os.lseek(self.fd, c_off, os.SEEK_DATA)
                except OSError:  # ENXIO: no data after c_off at all
                    data_off = self._c_off(final)
                skip = (data_off - c_off) // self.c_block
                if skip > 0:
                    i = min(final, i + skip)
                    continue
            last = min(final, i + 255)
            c_len = (last - i) * self.c_block + self._sealed_len(last, self.size)
            mv = memoryview(os.pread(self.fd, c_len, self._c_off(i)))
            for j in range(i, last + 1):
                pos = (j - i) * self.c_block
                chunk = mv[pos : pos + (self.c_block if j < last else c_len - (last - i) * self.c_block)]
                try:
                    if len(chunk) < self.overhead:
                        raise IntegrityError()
                    self._open(j, chunk, j == final)
                except IntegrityError:
                    bad.append(j)
            i = last + 1
        return bad
