"""A container for secrets that does not print itself and can be wiped.

Python cannot promise that no copy of a secret survives (immutable ``bytes``
objects handed to C libraries are copied and freed without wiping); what this
does is keep the long-lived copy in one mutable buffer that is overwritten
when released, and keep secrets out of ``repr`` and tracebacks.
"""

from __future__ import annotations


class Secret:
    __slots__ = ("_buf",)

    def __init__(self, value: bytes | bytearray) -> None:
        self._buf = bytearray(value)

    def __repr__(self) -> str:
        return f"<Secret: {len(self._buf)} bytes, redacted>"

    __str__ = __repr__

    def __len__(self) -> int:
        return len(self._buf)

    def reveal(self) -> bytes:
        """A short-lived ``bytes`` copy, for handing to a crypto library."""
        return bytes(self._buf)

    def wipe(self) -> None:
        for i in range(len(self._buf)):
            self._buf[i] = 0
        self._buf = bytearray()

    def __enter__(self) -> Secret:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

