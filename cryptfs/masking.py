"""Masked views of structured files: what an agent sees of a customer file.

A mask names, per column (CSV, TSV with a header row) a function:

- ``keep``: the value as it is;
- ``mask``: every character masked (the default for a column the mask does
  not name);
- ``first:N``, ``last:M``, ``first:N,last:M``: keep the first N and/or last
  M characters (a phone 138****1234 is ``first:3,last:4``; a card number
  ``first:6,last:4``);
- ``surname``: keep the surname only: the last word of a name written with
  spaces (Western order), else the first character (Chinese order);
- ``token``: a keyed hash (HMAC-SHA-256) of the value, in hex, cut to the
  value's length: within one file the same value always gives the same
  token, which does not reveal it.  The caller gives the key, one per file
  (cryptfs.keys: ``mask_token_key(file_id, file_key)``), so that tokens an agent
  sees of values it chose (rows of a file of its own) are no dictionary
  for any other file; or no key, and token columns are masked as ``mask``.

**Every field keeps its length in bytes**, so the view has the file's size
and every row its offsets: a masked character becomes ``*`` (one byte), or
U+FF0A ``＊`` for a character of three bytes in UTF-8 (most CJK
characters), or as many ``*`` as its bytes.  Quotes, separators and line
ends are never masked.  A file that does not parse as its format (a quote
not closed, a row with more or fewer fields than the header, bytes that are
not UTF-8) raises :class:`NotStructured`: no view, rather than one that
might show plaintext.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

FULL = "\uff0a"  # FULLWIDTH ASTERISK: 3 bytes in UTF-8
FORMATS = {"csv": ",", "tsv": "\t", "jsonl": ""}


class NotStructured(ValueError):
    """The file is not what its mask says it is."""


def _mask_char(c: str) -> str:
    n = len(c.encode("utf-8", "surrogatepass"))
    return FULL if n == 3 else "*" * n


def _masked(text: str, keep: Callable[[int, int], bool]) -> str:
    """``text`` with each character whose position ``keep(i, len)`` refuses masked."""
    n = len(text)
    return "".join(c if keep(i, n) else _mask_char(c) for i, c in enumerate(text))


@dataclass(frozen=True)
class Function:
    name: str
    first: int = 0
    last: int = 0

    @classmethod
    def parse(cls, text: str) -> Function:
        """``keep``, ``mask``, ``surname``, ``token``, ``first:N``, ``last:M``,
        ``first:N,last:M`` (ValueError otherwise)."""
        if text in ("keep", "mask", "surname", "token"):
            return cls(text)
        first = last = 0
        for part in text.split(","):
            key, _, num = part.partition(":")
            if key not in ("first", "last") or not num.isdigit() or int(num) > 10_000:
                raise ValueError(f"unknown mask function {text!r}")
            if key == "first":
                first = int(num)
            else:
                last = int(num)
        return cls("keep-ends", first, last)

    def __str__(self) -> str:
        if self.name != "keep-ends":
            return self.name
        return ",".join(p for p in (f"first:{self.first}" if self.first else "",
                                    f"last:{self.last}" if self.last else "") if p)

    def apply(self, value: str, token_key: bytes | None) -> str:
        """``value`` as this function shows it (``token`` with no key: masked)."""
        if self.name == "keep" or not value:
            return value
        if self.name == "mask" or (self.name == "token" and token_key is None):
            return _masked(value, lambda i, n: False)
        if self.name == "keep-ends":
            return _masked(value, lambda i, n: i < self.first or i >= n - self.last)
        if self.name == "surname":
            words = value.strip().split()
            if len(words) > 1:  # Given Surname: keep the last word
                start = value.rstrip().rfind(words[-1])
                return _masked(value, lambda i, n: i >= start or value[i].isspace())
            return _masked(value, lambda i, n: i == 0 or value[i].isspace())
        # token: hex of an HMAC, cut to the value's length in bytes
        assert token_key is not None
        raw = value.encode("utf-8", "surrogatepass")
        size = len(raw)
        digest = hmac.new(token_key, raw, hashlib.sha256).hexdigest()
        return (digest * (size // 64 + 1))[:size]


@dataclass(frozen=True)
class Mask:
    """What each column of a file shows (unnamed columns: masked)."""

    fmt: str  # csv | tsv
    columns: dict[str, Function]

    @property
    def tokenised(self) -> bool:
        """Whether a column shows tokens (then rows an agent wrote into the
        file would show it the token of a value it chose)."""
        return any(f.name == "token" for f in self.columns.values())

    def view(self, data: bytes, token_key: bytes | None) -> bytes:
        """The masked view of ``data``: the same length, every field masked as
        its column says (NotStructured if it does not parse); ``token_key``
        is the file's own (None: token columns masked)."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise NotStructured("not UTF-8 text") from None
        if self.fmt == "jsonl":
            return _jsonl_view(text, self.columns, token_key).encode("utf-8")
        sep = FORMATS[self.fmt]
        rows = _split(text, sep)
        if not rows:
            return data
        header = [_unquote(text[a:b]).strip("\ufeff \t") for a, b, _ in rows[0]]
        if self.columns and not set(self.columns) & set(header):
            # (a file without a header row: its first row would be shown in clear)
            raise NotStructured("its first row names none of the mask's columns")
        funcs = [self.columns.get(name, Function("mask")) for name in header]
        out: list[str | None] = list(text)
        for row in rows[1:]:
            if len(row) != len(header):
                raise NotStructured(f"a row with {len(row)} fields under a header of "
                                    f"{len(header)}")
            for (a, b, quoted), func in zip(row, funcs, strict=True):
                if func.name == "keep" or a == b:
                    continue
                raw = text[a:b]
                value = _unquote(raw) if quoted else raw
                shown = func.apply(value, token_key)
                out[a:b] = _requote(raw, shown) if quoted else _chars_of(shown, raw)
        result = "".join(s for s in out if s is not None).encode("utf-8")
        if len(result) != len(data):  # (never: each step keeps the length; checked anyway)
            raise NotStructured("the masked view would not keep the file's length")
        return result


def _chars_of(shown: str, raw: str) -> list[str | None]:
    """``shown`` laid over the positions of ``raw`` (one item per character of
    raw; a masked 3-byte character stays one item, so positions keep)."""
    if len(shown) == len(raw):
        return list(shown)
    # A masked character of 2 or 4 bytes became 2 or 4 '*': group them per
    # character of raw so that the list keeps raw's positions.
    items: list[str | None] = []
    j = 0
    for c in raw:
        n = len(c.encode("utf-8", "surrogatepass"))
        piece = shown[j:j + 1]
        if piece == c or piece == FULL:
            items.append(piece)
            j += 1
        else:
            items.append(shown[j:j + n])
            j += n
    return items


def _requote(raw: str, shown: str) -> list[str | None]:
    """The quoted field ``raw`` ("..." with "" for a quote) with its content
    shown as ``shown`` (of the unquoted value), positions kept."""
    inner = raw[1:-1]
    value_chars: list[str] = []  # raw spellings of each value character
    i = 0
    while i < len(inner):
        if inner[i] == '"' and inner[i + 1:i + 2] == '"':
            value_chars.append('""')
            i += 2
        else:
            value_chars.append(inner[i])
            i += 1
    value = "".join('"' if s == '""' else s for s in value_chars)
    laid = _chars_of(shown, value)
    items: list[str | None] = ['"']
    for spelling, now in zip(value_chars, laid, strict=True):
        if spelling == '""':
            # A quote: kept as "" (2 characters of raw), or masked as "**".
            items += ['""', None] if now == '"' else ["**", None]
        else:
            items.append(now)
    items.append('"')
    return items


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"':
        return raw[1:-1].replace('""', '"')
    return raw


def _split(text: str, sep: str) -> list[list[tuple[int, int, bool]]]:
    """Rows of (start, end, quoted) character spans of each field (RFC 4180:
    quoted fields may hold separators, quotes as "", and line ends)."""
    rows: list[list[tuple[int, int, bool]]] = []
    row: list[tuple[int, int, bool]] = []
    i, n = 0, len(text)
    if n == 0:
        return rows
    while True:
        start = i
        quoted = i < n and text[i] == '"'
        if quoted:
            i += 1
            while True:
                j = text.find('"', i)
                if j < 0:
                    raise NotStructured("a quoted field is not closed")
                if text[j + 1:j + 2] == '"':
                    i = j + 2
                    continue
                i = j + 1
                break
            if i < n and text[i] not in (sep, "\n", "\r"):
                raise NotStructured("text after a quoted field")
        else:
            while i < n and text[i] not in (sep, "\n", "\r"):
                if text[i] == '"':
                    raise NotStructured("a quote inside an unquoted field")
                i += 1
        row.append((start, i, quoted))
        if i >= n:
            rows.append(row)
            break
        if text[i] == sep:
            i += 1
            continue
        # a line end: \n, \r\n or \r
        i += 2 if text[i] == "\r" and text[i + 1:i + 2] == "\n" else 1
        rows.append(row)
        row = []
        if i >= n:
            break
    return rows


def parse_columns(specs: Sequence[str]) -> dict[str, Function]:
    """``NAME=FUNCTION`` items (ValueError on a bad one)."""
    out: dict[str, Function] = {}
    for spec in specs:
        name, sep, func = spec.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{spec!r}: give NAME=FUNCTION")
        out[name.strip()] = Function.parse(func.strip())
    return out


# -- JSON Lines -----------------------------------------------------------------------------------
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
            "t": "\t"}


def _jsonl_view(text: str, columns: dict[str, Function], token_key: bytes | None) -> str:
    """Each line an object: the value of each key shown as its function says
    (unnamed keys: masked); strings masked character by character in place
    (an escape by as many ``*``), numbers with their digits as 0 (a leading
    1 where JSON needs one: 123 -> 100); true, false and null kept.  A value
    that is an object or an array is kept whole for ``keep``, else every
    string and number in it is masked."""
    out: list[str] = []
    for line in text.split("\n"):
        if not line.strip():
            out.append(line)
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise NotStructured("a line that is not JSON") from None
        if not isinstance(obj, dict):
            raise NotStructured("a line that is not a JSON object")
        out.append(_JsonLine(line, columns, token_key).view())
    return "\n".join(out)


class _JsonLine:
    def __init__(self, line: str, columns: dict[str, Function], token_key: bytes | None
                 ) -> None:
        self.s, self.columns, self.key = line, columns, token_key
        self.out: list[str] = list(line)
        self.i = 0

    def view(self) -> str:
        self._ws()
        self._object(top=True)
        return "".join(self.out)

    def _ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t\r\n":
            self.i += 1

    def _object(self, top: bool = False, func: Function | None = None) -> None:
        self.i += 1  # {
        self._ws()
        if self.s[self.i] == "}":
            self.i += 1
            return
        while True:
            self._ws()
            start = self.i
            spellings = self._string_span()  # a key: kept at the top, masked below it
            key = json.loads(self.s[start:self.i])
            if not top and func is not None and func.name != "keep":
                self._lay(start + 1, spellings, key, Function("mask").apply(key, self.key))
            self._ws()
            self.i += 1  # :
            self._ws()
            f = self.columns.get(key, Function("mask")) if top else func
            self._value(f)
            self._ws()
            if self.s[self.i] == ",":
                self.i += 1
                continue
            self.i += 1  # }
            return

    def _array(self, func: Function | None) -> None:
        self.i += 1  # [
        self._ws()
        if self.s[self.i] == "]":
            self.i += 1
            return
        while True:
            self._ws()
            self._value(func)
            self._ws()
            if self.s[self.i] == ",":
                self.i += 1
                continue
            self.i += 1  # ]
            return

    def _value(self, func: Function | None) -> None:
        c = self.s[self.i]
        nested = Function("mask") if func is not None and func.name != "keep" else func
        if c == "{":
            self._object(func=nested)
        elif c == "[":
            self._array(nested)
        elif c == '"':
            start = self.i
            spellings = self._string_span()
            if func is not None and func.name != "keep":
                value = "".join(json.loads('"' + sp + '"') for sp in spellings)
                shown = func.apply(value, self.key)
                self._lay(start + 1, spellings, value, shown)
        else:
            start = self.i
            while self.i < len(self.s) and self.s[self.i] not in ",}] \t\r\n":
                self.i += 1
            if func is not None and func.name != "keep" and c not in "tfn":
                self._mask_number(start, self.i)

    def _mask_number(self, start: int, end: int) -> None:
        """Digits as 0, still a JSON number: 123 -> 100, 5 -> 0, 0.25 -> 0.00."""
        j = start + (self.s[start] == "-")
        k = j
        while k < end and self.s[k].isdigit():
            k += 1
        for m in range(j, end):
            if self.s[m].isdigit():
                self.out[m] = "1" if m == j and k - j > 1 else "0"

    def _string_span(self) -> list[str]:
        """Move past a string; the raw spelling of each of its characters."""
        self.i += 1  # opening quote
        spellings = []
        while self.s[self.i] != '"':
            if self.s[self.i] == "\\":
                n = 6 if self.s[self.i + 1] == "u" else 2
                spellings.append(self.s[self.i:self.i + n])
                self.i += n
            else:
                spellings.append(self.s[self.i])
                self.i += 1
        self.i += 1
        return spellings

    def _lay(self, at: int, spellings: list[str], value: str, shown: str) -> None:
        """Write ``shown`` (the function's result for ``value``) over the raw
        characters from ``at``, each spelling keeping its length in bytes."""
        if len(spellings) != len(value):  # (a surrogate pair spelled as two \\u escapes)
            laid: list[str | None] = ["*" * len(sp.encode()) for sp in spellings]
        else:
            laid = _chars_of(shown, value)
        pos = at
        for sp, now in zip(spellings, laid, strict=True):
            c = json.loads('"' + sp + '"') if len(sp) > 1 else sp
            if now == c:
                pass  # kept as spelt
            elif len(sp) > 1:
                self.out[pos] = "*" * len(sp.encode())
                for k in range(1, len(sp)):
                    self.out[pos + k] = ""
            else:
                self.out[pos] = now or ""
            pos += len(sp)
