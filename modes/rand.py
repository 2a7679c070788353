"""The one source of randomness for keys and nonces.

Everything in cryptfs that needs random bytes calls :func:`random_bytes`, so a
test can pin the source with :func:`set_source` and get reproducible output.
"""

import os
from collections.abc import Callable

_source: Callable[[int], bytes] = os.urandom


def random_bytes(n: int) -> bytes:
    return _source(n)


def set_source(source: Callable[[int], bytes] | None) -> None:
    """Replace the randomness source (tests only); ``None`` restores os.urandom."""
    global _source
    _source = source if source is not None else os.urandom
