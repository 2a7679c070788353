"""cryptfs.fuse against fuse.h itself: layouts, request decoding, reply encoding, bad input.

The structure sizes and offsets, and the request bytes the decoder is fed, come from
a C program compiled with gcc against the system's <linux/fuse.h>: the Python side
never builds the bytes it then checks.  The request loop is then driven over a
SOCK_SEQPACKET socket pair (one message per read, as /dev/fuse) with malformed input.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptfs.fuse import abi, replies
from cryptfs.fuse import requests as rq
from cryptfs.fuse.errors import FuseError, MalformedRequest
from cryptfs.fuse.session import Deferred, Session

C_TYPES = {"u64": "uint64_t", "i64": "int64_t", "u32": "uint32_t", "i32": "int32_t", "u16": "uint16_t"}
SKIP = set(rq._SKIP)


def c_member(cs: abi.CStruct, field: str) -> str | None:
    if (cs.name, field) in abi.NEWER_FIELDS:
        return abi.NEWER_FIELDS[(cs.name, field)]
    return abi.INLINED.get(cs.name, {}).get(field, field)


def value_for(ctype: str, i: int) -> int:
    return {"u16": 257, "u32": 0x01010101, "i32": 0x01010101}.get(ctype, 0x0101010101010101) * (i + 1)


def compile_and_run(tmp: Path, body: str) -> str:
    src = tmp / "probe.c"
    src.write_text("#include <stddef.h>\n#include <stdio.h>\n#include <string.h>\n#include <stdint.h>\n"
                   "#include <linux/fuse.h>\n"
                   "__attribute__((unused)) static void hex(const void *p, size_t n) {"
                   " const unsigned char *c = p;"
                   " for (size_t i = 0; i < n; i++) printf(\"%02x\", c[i]); printf(\"\\n\"); }\n"
                   f"int main(void) {{\n{body}\nreturn 0; }}\n")
    exe = tmp / "probe"
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True,
                   capture_output=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    lines = []
    for cs in abi.ALL_STRUCTS:
        if cs.name in abi.NEWER_STRUCTS:
            continue
        lines.append(f'printf("{cs.name} %zu\\n", sizeof(struct {cs.name}));')
        for field in cs.fields:
            m = c_member(cs, field)
            lines.append(f'printf("{cs.name}.{field} %zu\\n", offsetof(struct {cs.name}, {m}));')
    out = compile_and_run(tmp_path_factory.mktemp("layout"), "\n".join(lines))
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_every_struct_matches_fuse_h(layout: dict[str, int]) -> None:
    checked = 0
    for cs in abi.ALL_STRUCTS:
        if cs.name in abi.NEWER_STRUCTS:
            continue
        extra = abi.ATTR.size if cs.name in abi.TRAILING_ATTR else 0
        assert layout[cs.name] == cs.size + extra, cs.name
        for field, off in zip(cs.fields, cs.offsets, strict=True):
            assert layout[f"{cs.name}.{field}"] == off, f"{cs.name}.{field}"
            checked += 1
    assert checked > 200


def test_statx_in_layout_is_the_upstream_one() -> None:
    # 7.39, not in Debian's header: u32 getattr_flags, u32 reserved, u64 fh, u32 sx_flags, u32 sx_mask
    assert abi.STATX_IN.offsets == (0, 4, 8, 16, 20) and abi.STATX_IN.size == 24


def test_opcode_table_is_complete_and_slots_match() -> None:
    assert set(rq.OPS) == set(abi.OPCODE_NAMES) - {abi.SETUPMAPPING, abi.REMOVEMAPPING}
    for op in rq.OPS.values():
        if op.tail == "init":
            continue  # decoded by hand: flags2 folds into flags
        slots = set(rq._all_slots(op.cls))
        for _, attr in op.pairs:
            assert attr in slots, (op.cls.__name__, attr)


# --- requests: C builds the bytes, Python decodes them --------------------------------------
TAILS = {"name": b"a-name\0", "newname": b"new-name\0", "name,newname": b"old\0new\0",
         "name,target": b"link\0/some/target\0", "": b"", "init": b""}


def request_cases() -> list[tuple[int, rq._Op]]:
    # STATX (7.39) is not in Debian's fuse.h: its layout is checked by hand above.
    return [(opcode, op) for opcode, op in sorted(rq.OPS.items()) if opcode != abi.STATX]


def c_struct_of(opcode: int, op: rq._Op) -> abi.CStruct | None:
    if opcode == abi.SETXATTR:
        return abi.SETXATTR_IN  # the kernel sends its first 8 bytes (no FUSE_SETXATTR_EXT)
    return next((c for c in abi.ALL_STRUCTS if op.st is not None and c.st is op.st), None)


@pytest.fixture(scope="module")
def c_requests(tmp_path_factory: pytest.TempPathFactory) -> dict[int, bytes]:
    """For each opcode: header + fixed struct, filled field by field in C."""
    body = []
    for opcode, op in request_cases():
        cs = c_struct_of(opcode, op)
        decl = f"struct fuse_in_header h; struct {cs.name} a;" if cs else "struct fuse_in_header h;"
        body.append("{ struct { " + decl + " } __attribute__((packed)) m; memset(&m, 0, sizeof m);")
        body.append(f"m.h.opcode = {opcode}; m.h.unique = 0x1122334455667788ULL; m.h.nodeid = 42;"
                    " m.h.uid = 1001; m.h.gid = 1002; m.h.pid = 1003;")
        if cs:
            for i, (field, ctype) in enumerate(zip(cs.fields, cs.types, strict=True)):
                if field in SKIP or "[" in ctype:
                    continue
                body.append(f"m.a.{c_member(cs, field)} = ({C_TYPES[ctype]}){value_for(ctype, i)}ULL;")
        body.append(f'printf("{opcode} "); hex(&m, sizeof m); }}')
    out = compile_and_run(tmp_path_factory.mktemp("requests"), "\n".join(body))
    return {int(k): bytes.fromhex(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("opcode", [o for o, _ in request_cases()],
                         ids=lambda o: abi.OPCODE_NAMES[o])
def test_request_decodes_from_c_bytes(opcode: int, c_requests: dict[int, bytes]) -> None:
    op = rq.OPS[opcode]
    fixed_bytes = bytearray(c_requests[opcode])
    cs = c_struct_of(opcode, op)
    expected = {}
    if cs is not None:
        for i, (field, ctype) in enumerate(zip(cs.fields, cs.types, strict=True)):
            if field not in SKIP and "[" not in ctype:
                expected[dict(op.pairs).get(i, field)] = value_for(ctype, i)
    if opcode == abi.SETXATTR:
        del fixed_bytes[abi.IN_HEADER.size + abi.COMPAT_SETXATTR_IN_SIZE:]
        del expected["setxattr_flags"]
    # Sizes announced in the struct must match the data that follows.
    data_len = 0
    if op.tail in ("data", "name,value"):
        size_field = "in_size" if opcode == abi.IOCTL else "size"
        data_len = 5
        idx = cs.fields.index(size_field) if cs else 0
        struct.pack_into("=I", fixed_bytes, abi.IN_HEADER.size + (cs.offsets[idx] if cs else 0), data_len)
        expected[size_field] = data_len
    if op.tail == "forgets":
        struct.pack_into("=I", fixed_bytes, abi.IN_HEADER.size, 2)
        expected["count"] = 2
    tail = {"data": b"D" * data_len, "name,value": b"user.x\0" + b"V" * data_len,
            "forgets": struct.pack("=QQQQ", 7, 1, 8, 2)}.get(op.tail, TAILS.get(op.tail, b""))
    if opcode == abi.INIT:
        # the kernel sets FUSE_INIT_EXT; flags2 carries bits 32..63
        struct.pack_into("=I", fixed_bytes, 40 + 12, abi.INIT_EXT | abi.ASYNC_READ)
        struct.pack_into("=I", fixed_bytes, 40 + 16, 1 << (36 - 32))
        expected["flags"] = abi.INIT_EXT | abi.ASYNC_READ | abi.DIRECT_IO_ALLOW_MMAP
    msg = fixed_bytes + tail
    struct.pack_into("=I", msg, 0, len(msg))
    buf = bytearray(len(msg) + 64)
    buf[:len(msg)] = msg
    req = rq.decode(buf, len(msg))
    assert (req.opcode, req.unique, req.nodeid, req.uid, req.gid, req.pid) == \
        (opcode, 0x1122334455667788, 42, 1001, 1002, 1003)
    for attr, value in expected.items():
        if attr in ("major", "minor", "max_readahead") or attr in rq._all_slots(type(req)):
            assert getattr(req, attr) == value, attr
    if op.tail == "name":
        assert req.name == b"a-name"  # type: ignore[attr-defined]
    elif op.tail == "name,newname":
        assert (req.name, req.newname) == (b"old", b"new")  # type: ignore[attr-defined]
        assert req.flags == (expected.get("flags", 0))  # type: ignore[attr-defined]
    elif op.tail == "name,target":
        assert (req.name, req.target) == (b"link", b"/some/target")  # type: ignore[attr-defined]
    elif op.tail == "newname":
        assert req.newname == b"new-name"  # type: ignore[attr-defined]
    elif op.tail == "data":
        assert bytes(req.data) == b"D" * 5  # type: ignore[attr-defined]
    elif op.tail == "name,value":
        assert (req.name, bytes(req.value)) == (b"user.x", b"VVVVV")  # type: ignore[attr-defined]
    elif op.tail == "forgets":
        assert req.forgets == [(7, 1), (8, 2)]  # type: ignore[attr-defined]


# --- replies: Python encodes, C builds the same struct, bytes must be equal ---------------------
def test_replies_match_c(tmp_path: Path) -> None:
    attr = replies.Attr(ino=5, mode=0o100644, nlink=2, uid=7, gid=8, size=12345, blocks=25,
                        atime_ns=1_700_000_000_123_456_789, mtime_ns=1_700_000_001_000_000_001,
                        ctime_ns=3, rdev=9, blksize=4096, flags=0)
    entry = replies.EntryOut(5, attr, entry_timeout=2.5, attr_timeout=1.25, generation=6)
    py = {
        "entry": entry.pack(),
        "attr": replies.AttrOut(attr, 0.75).pack(),
        "open": replies.OpenOut(99, abi.FOPEN_DIRECT_IO | abi.FOPEN_KEEP_CACHE).pack(),
        "statfs": replies.StatfsOut(1, 2, 3, 4, 5, 4096, 255, 512).pack(),
        "lk": replies.LkOut(10, 20, 1, 77).pack(),
        "inval_entry": abi.NOTIFY_INVAL_ENTRY_OUT.st.pack(1, 4, abi.EXPIRE_ONLY),
    }
    c_attr = ("{.ino=5,.size=12345,.blocks=25,.atime=1700000000,.mtime=1700000001,.ctime=0,"
              ".atimensec=123456789,.mtimensec=1,.ctimensec=3,.mode=0100644,.nlink=2,.uid=7,.gid=8,"
              ".rdev=9,.blksize=4096,.flags=0}")
    decls = [
        ("entry", "fuse_entry_out", ".nodeid=5, .generation=6, .entry_valid=2, .attr_valid=1, "
         f".entry_valid_nsec=500000000, .attr_valid_nsec=250000000, .attr={c_attr}"),
        ("attr", "fuse_attr_out", f".attr_valid=0, .attr_valid_nsec=750000000, .attr={c_attr}"),
        ("open", "fuse_open_out", ".fh=99, .open_flags=FOPEN_DIRECT_IO|FOPEN_KEEP_CACHE"),
        ("statfs", "fuse_statfs_out", ".st={.blocks=1, .bfree=2, .bavail=3, .files=4, .ffree=5, "
         ".bsize=4096, .namelen=255, .frsize=512}"),
        ("lk", "fuse_lk_out", ".lk={.start=10, .end=20, .type=1, .pid=77}"),
        ("inval_entry", "fuse_notify_inval_entry_out", ".parent=1, .namelen=4, .flags=FUSE_EXPIRE_ONLY"),
    ]
    body = "\n".join(f'{{ struct {name} v = {{{init}}}; printf("{tag} "); hex(&v, sizeof v); }}'
                     for tag, name, init in decls)
    out = compile_and_run(tmp_path, body)
    c = {k: bytes.fromhex(v) for k, v in (line.split() for line in out.splitlines())}
    assert py == c


def test_dirent_records_are_aligned_and_bounded() -> None:
    buf = replies.DirBuffer(64)
    assert buf.add(b"abc", 7, 0o040755, 1)          # 24 + 3 -> 32
    assert buf.add(b"x" * 8, 8, 0o100644, 2)        # 24 + 8 -> 32
    assert not buf.add(b"y", 9, 0o100644, 3)        # no room left
    data = buf.pack()
    assert len(data) == 64
    assert abi.DIRENT.st.unpack_from(data, 0) == (7, 1, 3, 4)   # DT_DIR
    assert data[24:27] == b"abc" and data[27:32] == b"\0" * 5
    assert abi.DIRENT.st.unpack_from(data, 32) == (8, 2, 8, 8)  # DT_REG


def test_timeouts_split_into_seconds_and_nanoseconds() -> None:
    assert replies.split_timeout(2.5) == (2, 500_000_000)
    assert replies.split_timeout(0) == (0, 0)
    assert replies.split_timeout(-1) == (0, 0)


# --- bad input never crashes: decoder and loop ---------------------------------------------
def header(opcode: int, unique: int, body: bytes, length: int | None = None) -> bytes:
    size = abi.IN_HEADER.size + len(body) if length is None else length
    return abi.IN_HEADER.st.pack(size, opcode, unique, 1, 0, 0, 0, 0, 0) + body


@pytest.mark.parametrize("msg,why", [
    (header(abi.LOOKUP, 2, b"no-nul"), "NUL"),
    (header(abi.LOOKUP, 2, b"\0"), "empty"),
    (header(abi.GETATTR, 2, b"\0" * 8), "need 16"),
    (header(abi.GETATTR, 2, b"\0" * 16, length=99), "header says 99"),
    (header(abi.WRITE, 2, abi.WRITE_IN.st.pack(1, 0, 100, 0, 0, 0, 0) + b"short"), "100 bytes"),
    (header(abi.RENAME, 2, struct.pack("=Q", 1) + b"only-one\0"), "NUL"),
    (header(abi.BATCH_FORGET, 2, struct.pack("=II", 1000, 0)), "batch_forget"),
])
def test_malformed_requests_raise_the_one_error(msg: bytes, why: str) -> None:
    buf = bytearray(msg)
    with pytest.raises(MalformedRequest, match=why) as info:
        rq.decode(buf, len(msg))
    assert info.value.errno == errno.EINVAL


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from(sorted(rq.OPS)))
def test_any_bytes_decode_or_raise_one_error(body: bytes, opcode: int) -> None:
    msg = bytearray(header(opcode, 4, body))
    try:
        rq.decode(msg, len(msg))
    except FuseError:
        pass


class Recorder:
    """A filesystem whose handlers fail in every way a handler can."""

    session: Session
    pending: list[Deferred]

    def getattr(self, req: rq.GetattrIn) -> replies.AttrOut:
        if req.nodeid == 2:
            raise KeyError("a secret path must not reach the log")
        if req.nodeid == 3:
            raise PermissionError(errno.EACCES, "denied")
        if req.nodeid == 4:
            return "not an AttrOut"  # type: ignore[return-value]
        return replies.AttrOut(replies.Attr(ino=req.nodeid, mode=0o100600), 1.0)

    def getxattr(self, req: rq.GetxattrIn) -> bytes:
        if req.name == b"user.slow":
            time.sleep(0.1)                # (a handler that takes 100 ms)
        return b"0123456789"

    def readlink(self, req: rq.EmptyIn) -> object:
        """Answered later from another thread, after the loop served other requests."""
        later = self.session.defer(req)
        if req.nodeid == 9:
            later.reply(b"early")          # before the handler even returns
            later.reply(b"twice")          # a second answer is dropped
            return later
        self.pending.append(later)
        return later


@pytest.fixture
def looped() -> tuple[socket.socket, Session, threading.Thread]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fs = Recorder()
    session = Session(fs, "/nonexistent")
    fs.session, fs.pending = session, []
    session.fd = theirs.fileno()
    t = threading.Thread(target=session.serve, daemon=True)
    t.start()
    yield ours, session, t
    ours.close()
    t.join(5)
    theirs.close()


def ask(sock: socket.socket, msg: bytes) -> tuple[int, int, bytes]:
    sock.send(msg)
    sock.settimeout(5)
    data = sock.recv(1 << 16)
    length, error, unique = abi.OUT_HEADER.st.unpack_from(data)
    assert length == len(data)
    return unique, error, data[16:]


def getattr_msg(unique: int, nodeid: int) -> bytes:
    body = abi.GETATTR_IN.st.pack(0, 0, 0)
    return abi.IN_HEADER.st.pack(40 + len(body), abi.GETATTR, unique, nodeid, 0, 0, 0, 0, 0) + body


def test_loop_survives_bad_requests_and_failing_handlers(
        looped: tuple[socket.socket, Session, threading.Thread],
        caplog: pytest.LogCaptureFixture) -> None:
    sock, _, thread = looped
    sock.send(b"\x01\x02\x03")                          # shorter than a header: no reply possible
    assert ask(sock, header(abi.LOOKUP, 10, b"x"))[:2] == (10, -errno.EINVAL)
    assert ask(sock, header(999, 12, b""))[:2] == (12, -errno.ENOSYS)
    assert ask(sock, header(abi.STATX, 14, b"\0" * 24))[:2] == (14, -errno.ENOSYS)
    sock.send(header(abi.BATCH_FORGET, 16, struct.pack("=II", 1000, 0)))  # malformed, no reply
    sock.send(header(abi.FORGET, 18, struct.pack("=Q", 1)))               # no reply, no handler
    assert ask(sock, getattr_msg(20, 2))[:2] == (20, -errno.EIO)
    assert ask(sock, getattr_msg(22, 3))[:2] == (22, -errno.EACCES)
    assert ask(sock, getattr_msg(24, 4))[:2] == (24, -errno.EIO)
    assert ask(sock, header(abi.MKDIR, 26, abi.MKDIR_IN.st.pack(0o755, 0) + b"d\0"))[:2] == \
        (26, -errno.ENOSYS)
    assert ask(sock, header(abi.LOOKUP, 28, b"x\0"))[:2] == (28, -errno.ENOENT)
    unique, error, body = ask(sock, header(abi.OPEN, 30, abi.OPEN_IN.st.pack(0, 0)))
    assert (unique, error, abi.OPEN_OUT.st.unpack(body)) == (30, 0, (0, 0, 0))
    unique, error, body = ask(sock, getattr_msg(32, 7))
    assert (unique, error) == (32, 0) and abi.ATTR.st.unpack_from(body, 16)[0] == 7
    assert thread.is_alive()
    assert "secret" not in caplog.text and "getattr failed with KeyError" in caplog.text


def test_xattr_size_probe_and_erange(looped: tuple[socket.socket, Session, threading.Thread]) -> None:
    sock = looped[0]
    probe = header(abi.GETXATTR, 40, abi.GETXATTR_IN.st.pack(0, 0) + b"user.a\0")
    unique, error, body = ask(sock, probe)
    assert error == 0 and abi.GETXATTR_OUT.st.unpack(body) == (10, 0)
    small = header(abi.GETXATTR, 42, abi.GETXATTR_IN.st.pack(4, 0) + b"user.a\0")
    assert ask(sock, small)[:2] == (42, -errno.ERANGE)
    exact = header(abi.GETXATTR, 44, abi.GETXATTR_IN.st.pack(10, 0) + b"user.a\0")
    assert ask(sock, exact) == (44, 0, b"0123456789")


def test_the_loop_times_each_kind_of_request(
        looped: tuple[socket.socket, Session, threading.Thread]) -> None:
    """The loop's time per request, by opcode (logged at unmount): a 100 ms handler
    shows as such, beside GETATTRs that take microseconds."""
    sock, session, _ = looped
    for unique in range(50, 56, 2):
        slow = header(abi.GETXATTR, unique, abi.GETXATTR_IN.st.pack(10, 0) + b"user.slow\0")
        assert ask(sock, slow) == (unique, 0, b"0123456789")
    for unique in range(60, 80, 2):
        assert ask(sock, getattr_msg(unique, 7))[:2] == (unique, 0)
    busy = session.busy()
    assert list(busy) == ["getxattr", "getattr"], busy   # the largest share first
    (slow_us, slow_share), (fast_us, fast_share) = busy["getxattr"], busy["getattr"]
    assert 100_000 <= slow_us < 10_000_000, slow_us
    assert 0 < fast_us < slow_us / 10, (fast_us, slow_us)
    assert slow_share > 0.9 and abs(slow_share + fast_share - 1) < 1e-9, busy
    assert session.served() == {"getattr": 10, "getxattr": 3}


def test_deferred_replies_come_from_another_thread_once(
        looped: tuple[socket.socket, Session, threading.Thread]) -> None:
    sock, session, _ = looped
    sock.send(header(abi.READLINK, 50, b""))                 # deferred, pending
    assert ask(sock, getattr_msg(52, 7))[:2] == (52, 0)      # the loop is free meanwhile
    fs = session.fs
    assert isinstance(fs, Recorder) and len(fs.pending) == 1
    threading.Thread(target=fs.pending[0].reply, args=(b"/target",)).start()
    sock.settimeout(5)
    data = sock.recv(4096)
    assert abi.OUT_HEADER.st.unpack_from(data) == (16 + 7, 0, 50) and data[16:] == b"/target"
    assert session._inflight == {}
    msg = abi.IN_HEADER.st.pack(40, abi.READLINK, 54, 9, 0, 0, 0, 0, 0)
    assert ask(sock, msg) == (54, 0, b"early")
    assert ask(sock, getattr_msg(56, 7))[:2] == (56, 0)      # no stray second reply before it
    # an INTERRUPT for a deferred request reaches it; one for an unknown unique is ignored
    sock.send(header(abi.READLINK, 58, b""))
    deadline = time.monotonic() + 5
    while len(fs.pending) < 2:              # the loop thread takes it in its own time
        assert time.monotonic() < deadline
        time.sleep(0.01)
    later = fs.pending[1]
    later.on_interrupt(lambda: later.fail(errno.EINTR))
    sock.send(header(abi.INTERRUPT, 58 | 1, struct.pack("=Q", 999)))
    sock.send(header(abi.INTERRUPT, 58 | 1, struct.pack("=Q", 58)))
    assert ask(sock, getattr_msg(60, 7))[:2] == (58, -errno.EINTR)
    assert later.interrupted
    assert abi.OUT_HEADER.st.unpack_from(sock.recv(4096))[1:] == (0, 60)


def test_init_negotiates_only_what_the_kernel_offers(
        looped: tuple[socket.socket, Session, threading.Thread]) -> None:
    sock, session, _ = looped
    offered = (abi.ASYNC_READ | abi.BIG_WRITES | abi.MAX_PAGES | abi.PARALLEL_DIROPS
               | abi.HANDLE_KILLPRIV_V2 | abi.INIT_EXT | abi.NO_OPEN_SUPPORT | abi.SPLICE_READ)
    body = abi.INIT_IN.st.pack(7, 44, 1 << 17, offered & 0xFFFFFFFF,
                               (abi.DIRECT_IO_ALLOW_MMAP | abi.PASSTHROUGH) >> 32, *([0] * 11))
    unique, error, out = ask(sock, header(abi.INIT, 2, body))
    assert error == 0
    major, minor, readahead, flags, _, _, max_write, _, max_pages, _, flags2, *_ = \
        abi.INIT_OUT.st.unpack(out)
    got = flags | flags2 << 32
    assert (major, minor, readahead) == (7, abi.KERNEL_MINOR_VERSION, 1 << 17)
    assert got & abi.DIRECT_IO_ALLOW_MMAP and got & abi.INIT_EXT and got & abi.HANDLE_KILLPRIV_V2
    assert not got & (abi.NO_OPEN_SUPPORT | abi.SPLICE_READ | abi.PASSTHROUGH | abi.WRITEBACK_CACHE)
    assert not got & abi.DO_READDIRPLUS          # Recorder has no readdirplus
    assert max_write == 1 << 20 and max_pages == (1 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert session.conn is not None and session.conn.flags == got


def test_init_refuses_an_old_protocol(looped: tuple[socket.socket, Session, threading.Thread]) -> None:
    sock, _, thread = looped
    body = abi.INIT_IN.st.pack(7, 20, 0, 0, 0, *([0] * 11))
    assert ask(sock, header(abi.INIT, 2, body))[:2] == (2, -errno.EPROTO)
    thread.join(5)
    assert not thread.is_alive()


# --- the trio loop: polling for the next request before sleeping ---------------------------
def trio_looped(poll_ns: int) -> tuple[socket.socket, Session, threading.Thread, list[bool]]:
    """``serve_trio`` in its own thread, beside a trio task that notes each time it ran."""
    import trio

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fs = Recorder()
    session = Session(fs, "/nonexistent", poll_ns=poll_ns)
    fs.session, fs.pending = session, []
    session.fd = theirs.fileno()
    session.peer = theirs  # type: ignore[attr-defined]  # (kept open as long as the session)
    ticks: list[bool] = []

    async def main() -> None:
        async def other_task() -> None:
            while True:
                ticks.append(True)
                await trio.sleep(0.001)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)
            await session.serve_trio(batch=8)
            nursery.cancel_scope.cancel()

    t = threading.Thread(target=trio.run, args=(main,), daemon=True)
    t.start()
    return ours, session, t, ticks


CLIENT = r"""
import socket, struct, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
first, count, pause = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
body = struct.pack("=IIQ", 0, 0, 0)
for unique in range(first, first + 2 * count, 2):
    sock.send(struct.pack("=IIQQIIIHH", 40 + len(body), 3, unique, 7, 0, 0, 0, 0, 0) + body)
    length, error, got = struct.unpack_from("=IiQ", sock.recv(4096))
    if (error, got) != (0, unique):
        sys.exit(f"request {unique}: answer {got} with error {error}")
    time.sleep(pause)
"""


def client(sock: socket.socket, first: int, count: int, pause: float) -> None:
    """``count`` GETATTRs from another process (no GIL shared with the loop), each
    sent ``pause`` seconds after the last reply came."""
    res = subprocess.run([os.sys.executable, "-c", CLIENT, str(sock.fileno()), str(first),
                          str(count), str(pause)], pass_fds=[sock.fileno()],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_the_loop_polls_while_requests_follow_each_other_closely() -> None:
    sock, session, thread, ticks = trio_looped(poll_ns=2_000_000_000)
    try:
        time.sleep(2.5)                      # the first poll (from the start) runs out
        client(sock, 2, 200, 0)              # each sent as soon as the last reply is in
        # The loop slept before the first request and, that gap having been long, once
        # more before the second (fewer if its thread started late); it found the
        # others by polling (or already there).
        assert session.sleeps <= 2 and session.polled >= 150, (session.sleeps, session.polled)
        assert ticks                         # the other trio task still ran (every 8 requests)
    finally:
        sock.close()
        thread.join(5)
    assert not thread.is_alive()             # the peer's end ends the loop even mid-poll


def test_the_loop_stops_polling_for_a_client_that_pauses_longer() -> None:
    sock, session, thread, _ = trio_looped(poll_ns=20_000_000)   # 20 ms
    try:
        time.sleep(0.1)
        client(sock, 2, 5, 0.15)             # five requests, 150 ms apart
        # The loop polled (in vain) only once, at the start; then each gap was known to
        # be long and it slept at once: before each request and after the last (5 if
        # its thread started so late that the first request was already there).
        assert (session.polled, session.missed) == (0, 1) and session.sleeps in (5, 6), \
            (session.polled, session.missed, session.sleeps)
        client(sock, 12, 200, 0)             # back to back again: two sleeps, then polling
        assert session.sleeps <= 9 and session.polled >= 150, (session.sleeps, session.polled)
    finally:
        sock.close()
        thread.join(5)


def test_no_polling_when_it_is_off() -> None:
    sock, session, thread, _ = trio_looped(poll_ns=0)
    try:
        client(sock, 2, 100, 0)
        assert session.polled == session.missed == 0 and session.sleeps >= 50, session.sleeps
    finally:
        sock.close()
        thread.join(5)
