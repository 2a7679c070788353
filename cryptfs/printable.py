"""Text from outside (file names, paths, user names) as one line a terminal shows
as it is.

A name may hold any byte but ``/`` and NUL: a line break, ESC and a cursor
sequence, or a right-to-left override (U+202E) in a directory's name would,
printed raw, split a message, recolour or erase what a terminal shows, or make
a path read backwards.  :func:`shown` writes every such character as a
backslash escape and undecodable bytes as ``\\xNN``; printable text, any
script's letters included, is left alone.
"""

from __future__ import annotations


def shown(text: str) -> str:
    """``text`` with every character a terminal would act on, rather than show,
    written as Python writes it in a string literal (``\\n``, ``\\x1b``,
    ``\\u202e``); an undecodable byte (a lone surrogate from ``os.fsdecode``)
    as ``\\xNN``."""
    if text.isprintable():
        return text
    return "".join(_one(c) for c in text)


def _one(c: str) -> str:
    if c.isprintable():
        return c
    if "\udc80" <= c <= "\udcff":  # the byte os.fsdecode could not decode
        return f"\\x{ord(c) - 0xdc00:02x}"
    return repr(c)[1:-1]
