"""Cheap unique ids: message ids and lock tokens.

An id is a random per-process prefix (64 bits) and a counter, in hex: as unique as a
``uuid4`` across processes for any practical number of them, and about ten times cheaper to
make (no ``os.urandom`` per id). A forked child would repeat its parent's ids, so it draws a
prefix of its own (``os.register_at_fork``).
"""

from __future__ import annotations

import itertools
import os


class _Source:
    __slots__ = ("counter", "prefix")

    def __init__(self) -> None:
        self.prefix = ""
        self.counter = itertools.count()
        self.reseed()

    def reseed(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()


_SOURCE = _Source()
os.register_at_fork(after_in_child=_SOURCE.reseed)


def new_id() -> str:
    """A fresh id: 17 to 32 characters of ``[0-9a-f]`` (a valid message id and lock token)."""
    source = _SOURCE
    return f"{source.prefix}{next(source.counter):x}"


def new_ids(count: int) -> list[str]:
    """``count`` fresh ids."""
    source = _SOURCE
    prefix, counter = source.prefix, source.counter
    return [f"{prefix}{next(counter):x}" for _ in range(count)]
