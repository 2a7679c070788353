"""Content modes and key wrapping: vectors, round trips, every tampering an error."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl import bindings as sodium

from cryptfs.modes import (
    BLOCK_SIZE,
    CONTENT_MODES,
    IntegrityError,
    NotForMe,
    content_mode_by_name,
    rand,
)
from cryptfs.modes.wrap import STANZA_SYMMETRIC, Stanza, SymmetricWrapper, decode_stanzas

KEY = bytes(range(32))
FILE_ID = bytes(range(100, 116))
MODES = list(CONTENT_MODES.values())


@pytest.fixture
def pinned_random():
    """Deterministic 'randomness' so outputs can be compared with frozen vectors."""
    counter = iter(range(1 << 30))
    rand.set_source(lambda n: bytes(next(counter) & 0xFF for _ in range(n)))
    yield
    rand.set_source(None)


# -- the primitives we build on, against published vectors ----------------------------------

def test_aes_256_gcm_nist_vector() -> None:
    # NIST GCM spec (McGrew & Viega), test case 16: AES-256, 60-byte plaintext, 20-byte AAD.
    key = bytes.fromhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
    iv = bytes.fromhex("cafebabefacedbaddecaf888")
    pt = bytes.fromhex(
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
        "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39")
    aad = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
    ct = AESGCM(key).encrypt(iv, pt, aad)
    assert ct[:-16].hex() == (
        "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
        "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662")
    assert ct[-16:].hex() == "76fc6ece0f4e1768cddf8853bb2d551b"


def test_xchacha20_poly1305_draft_vector() -> None:
    # draft-irtf-cfrg-xchacha-03, appendix A.3.1.
    key = bytes(range(0x80, 0xA0))
    nonce = bytes(range(0x40, 0x58))
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    pt = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
          b"for the future, sunscreen would be it.")
    out = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(pt, aad, nonce, key)
    assert out[-16:].hex() == "c0875924c1c7987947deafd8780acf49"
    assert out[:16].hex() == "bd6d179d3e83d43b9576579493c0e939"


# -- our framing ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_sealed_block_is_nonce_then_aead_with_position_ad(mode, pinned_random) -> None:
    """The layout FORMAT.md documents, rebuilt here with the raw primitives."""
    cipher = mode.cipher(KEY, FILE_ID)
    pt = b"block seven" * 100
    sealed = cipher.seal(7, pt, True)
    nonce = sealed[: mode.nonce_len]
    assert nonce == bytes(range(mode.nonce_len))  # first bytes of the pinned source
    ad = FILE_ID + struct.pack(">Q", 7) + b"\x01"
    if mode.name == "aes-256-gcm":
        expect = AESGCM(KEY).encrypt(nonce, pt, ad)
    else:
        expect = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(pt, ad, nonce, KEY)
    assert sealed == nonce + expect
    assert len(sealed) == len(pt) + mode.overhead


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_frozen_vector(mode, pinned_random) -> None:
    """Same inputs, same bytes, in every release (format version 1)."""
    sealed = mode.cipher(KEY, FILE_ID).seal(0, b"cryptfs", False)
    frozen = {
        "aes-256-gcm": "000102030405060708090a0b"
                       "2470af6bb183b1b75ecd45907fd8fddc69774cb3e7b22e",
        "xchacha20-poly1305": "000102030405060708090a0b0c0d0e0f1011121314151617"
                              "fdb0760fe4b4feef526341a62b531538ab2b06df690727",
    }[mode.name]
    assert sealed.hex() == frozen
    assert mode.cipher(KEY, FILE_ID).open(0, sealed, False) == b"cryptfs"


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_nonces_are_fresh_on_every_seal(mode) -> None:
    cipher = mode.cipher(KEY, FILE_ID)
    seen = {cipher.seal(0, b"same", True)[: mode.nonce_len] for _ in range(200)}
    assert len(seen) == 200


@settings(max_examples=200, deadline=None)
@given(mode=st.sampled_from(MODES), block_no=st.integers(0, 2**40),
       pt=st.binary(max_size=BLOCK_SIZE), last=st.booleans())
def test_round_trip(mode, block_no, pt, last) -> None:
    cipher = mode.cipher(KEY, FILE_ID)
    assert cipher.open(block_no, cipher.seal(block_no, pt, last), last) == pt


@settings(max_examples=200, deadline=None)
@given(mode=st.sampled_from(MODES), pt=st.binary(min_size=1, max_size=BLOCK_SIZE),
       data=st.data())
def test_any_bit_flip_is_an_integrity_error(mode, pt, data) -> None:
    cipher = mode.cipher(KEY, FILE_ID)
    sealed = bytearray(cipher.seal(3, pt, False))
    bit = data.draw(st.integers(0, len(sealed) * 8 - 1))
    sealed[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(IntegrityError):
        cipher.open(3, bytes(sealed), False)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_position_file_and_last_flag_are_bound(mode) -> None:
    cipher = mode.cipher(KEY, FILE_ID)
    sealed = cipher.seal(5, b"x" * 100, False)
    with pytest.raises(IntegrityError):
        cipher.open(6, sealed, False)  # moved within the file
    with pytest.raises(IntegrityError):
        cipher.open(5, sealed, True)  # a middle block posing as the final one
    with pytest.raises(IntegrityError):
        mode.cipher(KEY, bytes(16)).open(5, sealed, False)  # moved to another file
    with pytest.raises(IntegrityError):
        mode.cipher(bytes(32), FILE_ID).open(5, sealed, False)  # wrong key
    for cut in (0, 1, mode.overhead - 1, len(sealed) - 1):
        with pytest.raises(IntegrityError):
            cipher.open(5, sealed[:cut], False)


def test_mode_lookup() -> None:
    assert content_mode_by_name("aes-256-gcm").mode_id == 1
    assert content_mode_by_name("xchacha20-poly1305").mode_id == 2
    assert content_mode_by_name("aes-256-gcm").overhead == 28
    assert content_mode_by_name("xchacha20-poly1305").overhead == 40
    with pytest.raises(ValueError, match="unknown mode"):
        content_mode_by_name("rot13")


# -- key wrapping ------------------------------------------------------------------------

def test_symmetric_wrap_round_trip_and_binding() -> None:
    w = SymmetricWrapper(KEY, key_id=1)
    file_key = bytes(range(32, 64))
    stanzas = w.wrap(file_key, b"ad-1")
    assert [s.type for s in stanzas] == [STANZA_SYMMETRIC]
    assert len(stanzas[0].body) == 64
    assert w.unwrap(stanzas, b"ad-1") == file_key
    with pytest.raises(IntegrityError):
        w.unwrap(stanzas, b"ad-2")  # moved to another header
    with pytest.raises(IntegrityError):
        SymmetricWrapper(bytes(32), key_id=1).unwrap(stanzas, b"ad-1")
    with pytest.raises(NotForMe):
        SymmetricWrapper(KEY, key_id=2).unwrap(stanzas, b"ad-1")  # another key generation
    with pytest.raises(IntegrityError):  # an unknown stanza type is damage (FORMAT.md)
        w.unwrap([Stanza(9, b"unknown type")], b"ad-1")


def test_every_stanza_is_checked_not_only_up_to_the_one_that_opens() -> None:
    """FORMAT.md: every stanza is parsed and checked, before and after the one that
    opens, and every stanza the reader has a key for must open to the same file key."""
    from cryptfs.modes import x25519
    from cryptfs.modes.errors import NotARecipient
    from cryptfs.modes.wrap import Keyring, padding, x25519_stanza

    file_key, other_key, ad = bytes(range(32, 64)), bytes(32), b"ad-1"
    g1, g2 = SymmetricWrapper(KEY, key_id=1), SymmetricWrapper(bytes(range(1, 33)), key_id=2)
    ring = Keyring({1: g1, 2: g2})
    good = g1.wrap(file_key, ad)
    assert ring.unwrap(good + [padding(10)], ad) == file_key
    raw = b"".join(s.encode() for s in good) + Stanza(7, b"x" * 5).encode()
    for bad in ([*good, Stanza(7, b"x" * 5)],                     # unknown type after the opener
                [*good, Stanza(STANZA_SYMMETRIC, bytes(63))],     # a symmetric stanza of 63 bytes
                [*good, Stanza(2, bytes(87))],                    # an X25519 stanza of 87 bytes
                [*good, *g1.wrap(other_key, ad)],                 # a second one: another key
                [*good, *g2.wrap(other_key, ad)],                 # another generation, another key
                [*good, Stanza(STANZA_SYMMETRIC, struct.pack(">I", 1) + bytes(60))]):  # unopenable
        with pytest.raises(IntegrityError):
            ring.unwrap(bad, ad)
    with pytest.raises(IntegrityError):  # a wrapper of one generation checks every stanza too
        g1.unwrap([*good, Stanza(7, b"x" * 5)], ad)
    with pytest.raises(IntegrityError):
        decode_stanzas(raw, 2)
    # A generation the reader does not hold is skipped (a stanza of a newer one, say) ...
    assert ring.unwrap([*SymmetricWrapper(bytes(32), key_id=9).wrap(other_key, ad), *good], ad) \
        == file_key
    # ... and both generations it holds must agree when both are there.
    assert ring.unwrap([*good, *g2.wrap(file_key, ad)], ad) == file_key
    # An X25519 stanza the reader holds the key of is opened too, and must agree.
    priv = x25519.new_private_key()
    pub = x25519.public_key(priv)
    ring_x = Keyring({1: g1}, [priv])
    assert ring_x.unwrap([*good, x25519_stanza(file_key, pub, ad)], ad) == file_key
    with pytest.raises(IntegrityError):
        ring_x.unwrap([*good, x25519_stanza(other_key, pub, ad)], ad)
    with pytest.raises(IntegrityError):
        ring_x.unwrap([x25519_stanza(file_key, pub, ad), x25519_stanza(other_key, pub, ad)], ad)
    # Nothing to open: a hybrid file is not for this reader, a symmetric one not this volume's.
    with pytest.raises(NotARecipient):
        Keyring({1: g1}).unwrap([x25519_stanza(file_key, pub, ad), padding(10)], ad)
    with pytest.raises(NotForMe):
        Keyring({3: SymmetricWrapper(KEY, key_id=3)}).unwrap(good, ad)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300), count=st.integers(0, 5))
def test_stanza_parser_decodes_or_raises_integrity_error(raw, count) -> None:
    try:
        stanzas, used = decode_stanzas(raw, count)
    except IntegrityError:
        return
    assert len(stanzas) == count
    assert b"".join(s.encode() for s in stanzas) == raw[:used]


def test_the_seal_is_nonce_then_aes_gcm_with_a_fresh_nonce(pinned_random) -> None:
    """cryptfs.modes.seal: the one AEAD seal of config slots, names, the policy
    and symmetric wraps.  Its bytes are what docs/FORMAT.md says, built here
    from AESGCM directly."""
    from cryptfs.modes.seal import OVERHEAD, Seal

    s = Seal(KEY)
    a, b = s.seal(b"secret", b"ad"), s.seal(b"secret", b"ad")
    assert a != b and len(a) == len(b"secret") + OVERHEAD
    assert a[:12] == bytes(range(12))  # (the nonce comes from the one randomness source)
    assert a[12:] == AESGCM(KEY).encrypt(a[:12], b"secret", b"ad")
    assert s.open(a, b"ad") == b"secret" and s.open(b, b"ad") == b"secret"
    with pytest.raises(IntegrityError):
        s.open(a, b"other ad")
    with pytest.raises(IntegrityError):
        Seal(bytes(32)).open(a, b"ad")
    assert "redacted" in repr(s) and KEY.hex() not in repr(s)


@settings(max_examples=300, deadline=None)
@given(sealed=st.binary(max_size=80), flip=st.integers(0, 8 * 40 - 1))
def test_the_seal_opens_or_raises_integrity_error(sealed, flip) -> None:
    from cryptfs.modes.seal import Seal, open_single_use, seal_single_use

    s = Seal(KEY)
    with pytest.raises(IntegrityError):
        s.open(sealed, b"ad")  # (arbitrary bytes never open)
    with pytest.raises(IntegrityError):
        open_single_use(KEY, sealed, b"ad")
    good = bytearray(s.seal(bytes(12), b"ad"))
    good[flip // 8] ^= 1 << (flip % 8)
    with pytest.raises(IntegrityError):
        s.open(bytes(good), b"ad")
    one = seal_single_use(KEY, b"k" * 32, b"ad")
    assert open_single_use(KEY, one, b"ad") == b"k" * 32
