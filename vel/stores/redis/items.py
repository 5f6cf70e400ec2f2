"""A session's messages as its Redis copy stores them, and the shapes its reads return.

Each message is one list item, ``"<message id>\\n<json>"`` (:func:`encode`, :func:`split`).
A read returns a :class:`Window` (the newest messages, decoded, with what a read of the older
part from Postgres must match) or, for conflict resolution, the whole :class:`Copy` as stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vel.messages import Message, check_message_ids, encode_messages


def encode(
    messages: Sequence[Message], message_ids: Sequence[str] | None, *, whole: bool = False
) -> list[str]:
    """Messages as stored items, ``"<message id>\\n<json>"`` (ids generated if None);
    ``whole``: a whole history (the replace limit, not the append limit)."""
    texts = encode_messages(messages, whole_history=whole)
    ids = check_message_ids(message_ids, len(texts))
    return [f"{mid}\n{text}" for mid, text in zip(ids, texts, strict=True)]


def split(item: bytes | str) -> tuple[str, str]:
    """A stored item as (message id, JSON text)."""
    if isinstance(item, bytes):
        item = item.decode()
    mid, _, text = item.partition("\n")
    return mid, text


@dataclass(frozen=True, slots=True)
class Window:
    """A window read from a session's Redis copy.

    Attributes:
        seq: the session's last seq.
        base: the copy holds seqs ``base + 1 .. seq`` (0: the whole history).
        gen, rev: the generation, and the Postgres revision the copy was loaded at (None:
            unknown), which an older part read from Postgres must match.
        messages: the last ``min(limit, seq - base)`` messages, oldest first.
    """

    seq: int
    base: int
    gen: int
    rev: int | None
    messages: list[Message]


@dataclass(frozen=True, slots=True)
class Copy:
    """A session's whole Redis copy, read in one step (for conflict resolution)."""

    seq: int
    flushed: int
    base: int
    gen: int
    fgen: int
    conflict: str | None
    items: list[tuple[str, str]]  # (message id, JSON text) of seqs base+1 .. seq

    def unflushed(self) -> list[tuple[str, str]]:
        """What Postgres lacks of it: the messages after ``flushed``, or the whole copy
        after a replace not yet flushed."""
        if self.gen != self.fgen:
            return list(self.items)
        return self.items[self.flushed - self.base :]
