"""The agent's wire protocol, pure: framing, encoding, decoding, typed fields.

The one documented failure of every parser here is ``ProtocolError`` (with the
reply code the server sends before closing); hypothesis checks that nothing
else ever escapes, whatever bytes a client sends.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cryptfs.keyagent import protocol as p

# -- strategies -----------------------------------------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
            | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40))
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=5),
    max_leaves=30,
)
# What a client might put in a request, minus "v" (encode() owns that key).
requests = st.dictionaries(st.text(max_size=12).filter(lambda k: k != "v"), json_values,
                           max_size=8)


def _json_equal(a: Any, b: Any) -> bool:
    """Equality that also tells 1 from 1.0 and from True (floats round-trip exactly)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, float) and isinstance(b, float) and a == b
    if isinstance(a, dict):
        return (isinstance(b, dict) and a.keys() == b.keys()
                and all(_json_equal(a[k], b[k]) for k in a))
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_json_equal, a, b))
    return type(a) is type(b) and a == b


def split(data: bytes) -> tuple[int, int, bytes]:
    """A frame taken apart the way the server reads it: length, type, body."""
    n = p.frame_length(data[:p.LEN_BYTES])
    assert len(data) == p.LEN_BYTES + n, "frame length does not match the bytes that follow"
    return n, data[p.LEN_BYTES], data[p.LEN_BYTES + 1:]


# -- frames ---------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from([p.FRAME_MESSAGE, p.FRAME_SECRET]),
       body=st.binary(max_size=3000))
def test_frame_round_trip(kind: int, body: bytes) -> None:
    data = p.frame(kind, body)
    n, got_kind, got_body = split(data)
    assert n == len(body) + 1
    assert data[:4] == struct.pack(">I", len(body) + 1)
    assert (got_kind, got_body) == (kind, body)


def test_frame_accepts_bytearray_and_copies_it() -> None:
    buf = bytearray(b"secret bytes")
    data = p.frame(p.FRAME_SECRET, buf)
    buf[:] = bytes(len(buf))  # the caller wipes its buffer afterwards
    assert data == struct.pack(">IB", 13, 2) + b"secret bytes"


def test_frame_size_limit_counts_the_type_byte() -> None:
    largest = p.frame(p.FRAME_MESSAGE, b"x" * (p.MAX_FRAME - 1))
    assert p.frame_length(largest[:4]) == p.MAX_FRAME == 64 * 1024
    with pytest.raises(p.ProtocolError) as e:
        p.frame(p.FRAME_MESSAGE, b"x" * p.MAX_FRAME)
    assert e.value.code == p.TOO_LARGE


@pytest.mark.parametrize(("n", "code"), [
    (0, p.BAD_REQUEST),
    (p.MAX_FRAME + 1, p.TOO_LARGE),
    (2**31, p.TOO_LARGE),
    (2**32 - 1, p.TOO_LARGE),
])
def test_frame_length_rejects(n: int, code: str) -> None:
    with pytest.raises(p.ProtocolError) as e:
        p.frame_length(struct.pack(">I", n))
    assert e.value.code == code
    if code == p.TOO_LARGE:
        assert str(n) in str(e.value) and str(p.MAX_FRAME) in str(e.value)


@pytest.mark.parametrize("n", [1, 2, 4096, p.MAX_FRAME])
def test_frame_length_accepts(n: int) -> None:
    assert p.frame_length(struct.pack(">I", n)) == n


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=4, max_size=4))
def test_frame_length_fuzz(head: bytes) -> None:
    """Any 4-byte prefix is either a length in 1..MAX_FRAME or a ProtocolError."""
    (declared,) = struct.unpack(">I", head)
    try:
        n = p.frame_length(head)
    except p.ProtocolError as e:
        assert e.code in (p.BAD_REQUEST, p.TOO_LARGE)
        assert declared == 0 or declared > p.MAX_FRAME
    else:
        assert n == declared and 1 <= n <= p.MAX_FRAME


# -- messages -------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(requests)
def test_encode_decode_round_trip(msg: dict[str, Any]) -> None:
    data = p.encode(msg)
    _, kind, body = split(data)
    assert kind == p.FRAME_MESSAGE
    out = p.decode(kind, body)
    assert out["v"] == p.VERSION
    del out["v"]
    assert _json_equal(out, msg)


def test_encode_is_compact_utf8_json_with_the_version_first() -> None:
    data = p.encode({"op": "ping"})
    assert data == struct.pack(">IB", 20, 1) + b'{"v":1,"op":"ping"}'


def test_encode_refuses_a_message_larger_than_a_frame() -> None:
    with pytest.raises(p.ProtocolError) as e:
        p.encode({"op": "status", "pad": "x" * p.MAX_FRAME})
    assert e.value.code == p.TOO_LARGE


@settings(max_examples=1000, deadline=None)
@given(kind=st.integers(min_value=0, max_value=255), body=st.binary(max_size=2000))
def test_decode_fuzz_bytes(kind: int, body: bytes) -> None:
    """Random bytes: a JSON object of version 1, or ProtocolError; nothing else."""
    try:
        msg = p.decode(kind, body)
    except p.ProtocolError as e:
        assert e.code in (p.BAD_REQUEST, p.UNSUPPORTED_VERSION)
    else:
        assert kind == p.FRAME_MESSAGE and isinstance(msg, dict) and msg["v"] == 1


_json_texts = st.one_of(
    json_values.map(json.dumps),
    st.dictionaries(st.text(max_size=5), json_values, max_size=4).map(
        lambda d: json.dumps({"v": 1, **d})),
    st.text(alphabet='{}[]":,01v tfnruel\\.-eE', max_size=200),
)


@settings(max_examples=400, deadline=None)
@given(text=_json_texts, cut=st.integers(min_value=0, max_value=400),
       junk=st.binary(max_size=3))
def test_decode_fuzz_json_like(text: str, cut: int, junk: bytes) -> None:
    """Valid, truncated and corrupted JSON of every shape: decodes or raises ProtocolError."""
    for body in (text.encode(), text.encode()[:cut], text.encode()[:cut] + junk):
        try:
            msg = p.decode(p.FRAME_MESSAGE, body)
        except p.ProtocolError as e:
            assert e.code in (p.BAD_REQUEST, p.UNSUPPORTED_VERSION)
        else:
            assert isinstance(msg, dict) and msg["v"] == 1


def test_decode_needs_a_message_frame() -> None:
    with pytest.raises(p.ProtocolError) as e:
        p.decode(p.FRAME_SECRET, b'{"v":1,"op":"ping"}')
    assert e.value.code == p.BAD_REQUEST and "message frame" in str(e.value)


@pytest.mark.parametrize(("body", "why"), [
    (b"", "not UTF-8 JSON"),
    (b"\xff\xfe{}", "not UTF-8 JSON"),
    (b'{"v":1,"op":"ping"', "not UTF-8 JSON"),
    (b"{'v': 1}", "not UTF-8 JSON"),
    (b'{"v":1}{"v":1}', "not UTF-8 JSON"),
    (b"1" * 5000, "not UTF-8 JSON"),  # beyond Python's int-from-string limit
    (b'[{"v":1,"op":"ping"}]', "not a JSON object"),
    (b'"ping"', "not a JSON object"),
    (b"null", "not a JSON object"),
    (b"42", "not a JSON object"),
])
def test_decode_rejects_what_is_not_a_json_object(body: bytes, why: str) -> None:
    with pytest.raises(p.ProtocolError) as e:
        p.decode(p.FRAME_MESSAGE, body)
    assert e.value.code == p.BAD_REQUEST and why in str(e.value)


@pytest.mark.parametrize("body", [b"[" * 5000, b'{"v":1,"a":' * 3000, b'{"v":1,"op":' + b"[" * 2000])
def test_decode_deeply_nested_json_is_a_protocol_error(body: bytes) -> None:
    """A 5 KB request of nested brackets fits easily in one frame; json.loads raises
    RecursionError for it, which must become the documented ProtocolError."""
    with pytest.raises(p.ProtocolError) as e:
        p.decode(p.FRAME_MESSAGE, body)
    assert e.value.code == p.BAD_REQUEST and "nests too deep" in str(e.value)


def test_decode_accepts_moderate_nesting() -> None:
    body = b'{"v":1,"op":"ping","x":' + b"[" * 200 + b"]" * 200 + b"}"
    assert p.decode(p.FRAME_MESSAGE, body)["op"] == "ping"


@pytest.mark.parametrize("v", [2, 0, -1, "1", None, [1], {"major": 1}, 1.5])
def test_decode_version_mismatch(v: Any) -> None:
    body = json.dumps({"v": v, "op": "ping"}).encode()
    with pytest.raises(p.ProtocolError) as e:
        p.decode(p.FRAME_MESSAGE, body)
    assert e.value.code == p.UNSUPPORTED_VERSION
    assert "speaks 1" in str(e.value) and repr(v) in str(e.value)


def test_decode_missing_version() -> None:
    with pytest.raises(p.ProtocolError) as e:
        p.decode(p.FRAME_MESSAGE, b'{"op":"ping"}')
    assert e.value.code == p.UNSUPPORTED_VERSION and "None" in str(e.value)


@pytest.mark.parametrize("v", [True, False, 1.0, 0.0])
def test_decode_version_must_be_the_integer_1(v: Any) -> None:
    """``true == 1`` and ``1.0 == 1`` in Python; the version check must not accept them
    (field() already refuses bool for int: the protocol should be as strict on "v")."""
    with pytest.raises(p.ProtocolError) as e:
        p.decode(p.FRAME_MESSAGE, json.dumps({"v": v, "op": "ping"}).encode())
    assert e.value.code == p.UNSUPPORTED_VERSION


# -- operations and fields ------------------------------------------------------------------

@pytest.mark.parametrize("op", sorted(p.OPS))
def test_request_op_known(op: str) -> None:
    assert p.request_op({"v": 1, "op": op}) == op


@pytest.mark.parametrize("op", [None, "", "PING", "shutdown", 1, True, ["ping"], {"op": "ping"}])
def test_request_op_unknown(op: Any) -> None:
    msg = {"v": 1} if op is None else {"v": 1, "op": op}
    with pytest.raises(p.ProtocolError) as e:
        p.request_op(msg)
    assert e.value.code == p.BAD_REQUEST and "unknown operation" in str(e.value)


def test_field_int_refuses_bool() -> None:
    for b in (True, False):
        with pytest.raises(p.ProtocolError) as e:
            p.field({"uid": b}, "uid", int)
        assert e.value.code == p.BAD_REQUEST and "'uid' must be int" in str(e.value)
    assert p.field({"uid": 0}, "uid", int) == 0
    assert p.field({"uid": 1003}, "uid", int) == 1003


def test_field_bool_refuses_int_and_string() -> None:
    assert p.field({"all": True}, "all", bool, False) is True
    assert p.field({"all": False}, "all", bool, True) is False
    for v in (1, 0, "true", "yes", [True]):
        with pytest.raises(p.ProtocolError) as e:
            p.field({"all": v}, "all", bool, False)
        assert e.value.code == p.BAD_REQUEST and "'all' must be bool" in str(e.value)


@pytest.mark.parametrize("v", [1, 1.0, ["/x"], {"p": "/x"}, True, 2**70])
def test_field_str_refuses_other_types(v: Any) -> None:
    with pytest.raises(p.ProtocolError) as e:
        p.field({"backing": v}, "backing", str, required=True)
    assert e.value.code == p.BAD_REQUEST and "must be str" in str(e.value)


def test_field_int_refuses_float_and_string() -> None:
    for v in (1003.0, "1003", [1003]):
        with pytest.raises(p.ProtocolError):
            p.field({"uid": v}, "uid", int)


def test_field_missing_null_and_default() -> None:
    assert p.field({}, "uid", int, 7) == 7
    assert p.field({"uid": None}, "uid", int, 7) == 7  # null counts as absent
    assert p.field({}, "uid", int) is None
    for msg in ({}, {"backing": None}):
        with pytest.raises(p.ProtocolError) as e:
            p.field(msg, "backing", str, required=True)
        assert e.value.code == p.BAD_REQUEST and "missing field 'backing'" in str(e.value)


# -- replies ----------------------------------------------------------------------------------

def test_every_reply_has_the_same_shape() -> None:
    ok = p.reply(message="pong", version=1)
    assert ok == {"ok": True, "code": "ok", "message": "pong", "version": 1}
    err = p.error(p.BACKOFF, "try again in 2 s", retry_after=2.0)
    assert err == {"ok": False, "code": "backoff", "message": "try again in 2 s",
                   "retry_after": 2.0}
    event = p.reply(event="wipe")
    assert {"ok", "code", "message"} <= event.keys()
    for r in (ok, err, event):
        _, kind, body = split(p.encode(r))
        assert p.decode(kind, body) == {"v": 1, **r}


def test_protocol_error_carries_its_code() -> None:
    e = p.ProtocolError(p.TOO_LARGE, "frame too large")
    assert e.code == "too-large" and str(e) == "frame too large"
    assert isinstance(e, Exception)
