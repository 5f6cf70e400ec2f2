"""Validation and encoding of session ids and session entries.

A store keeps any JSON object, in order: OpenAI chat messages for vel's Agent, and equally the
role-less Responses API items (``function_call``, ``reasoning``, ...) an OpenAI Agents SDK
session holds. Every store encodes through :func:`encode_message`, which refuses what no
backend could keep (non-objects, unserialisable values, NUL, oversize) with
:class:`~vel.errors.InvalidInputError` before touching its backend. The chat shape (a known
``role``) is checked where chat messages come in: the Agent's input and its ContextManager
(:func:`validate_message`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from jiter import from_json as _fast_loads

from vel._ids import new_ids
from vel.errors import InvalidInputError

Message = dict[str, Any]

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_SESSION_ID_BYTES = 512
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_MESSAGES_PER_APPEND = 1000
# A replace (set_session_context, an import) writes a whole history: chunked inside every
# store and still atomic to readers, so its bound is a session's, not an append's.
MAX_MESSAGES_PER_REPLACE = 1_000_000
_MESSAGE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# JSON's escape of a real U+0000: ``\u0000`` after an even number of backslashes (an odd
# number makes it the text backslash-u-0-0-0-0, which is stored like any other).
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
REPLACEMENT = "\ufffd"


def validate_session_id(session_id: object) -> str:
    """Return ``session_id`` if it is usable as a key, else raise InvalidInputError.

    Any non-empty text up to 512 UTF-8 bytes is accepted, braces, colons and newlines
    included (stores escape nothing: ids are placed where no character is special). NUL is
    refused because Postgres text cannot hold it.
    """
    if not isinstance(session_id, str):
        raise InvalidInputError(f"session_id must be a str, got {type(session_id).__name__}")
    if not session_id:
        raise InvalidInputError("session_id must not be empty")
    if "\x00" in session_id:
        raise InvalidInputError("session_id must not contain NUL characters")
    try:
        size = len(session_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInputError("session_id must be valid Unicode (no lone surrogates)") from None
    if size > MAX_SESSION_ID_BYTES:
        raise InvalidInputError(
            f"session_id is {size} bytes; the limit is {MAX_SESSION_ID_BYTES} bytes"
        )
    return session_id


def _object(message: object) -> Message:
    if not isinstance(message, Mapping):
        raise InvalidInputError(f"a message must be a dict, got {type(message).__name__}")
    return dict(message)


def validate_message(message: object) -> Message:
    """Check one chat message's shape (a dict with a known ``role``)."""
    checked = _object(message)
    role = checked.get("role")
    if role not in ROLES:
        raise InvalidInputError(f"message role must be one of {sorted(ROLES)}, got {role!r}")
    return checked


def encode_message(message: object) -> str:
    """Return the compact JSON text a store keeps for ``message`` (any JSON object).

    Raises:
        InvalidInputError: not a dict, not JSON-serialisable, nested too deeply, holding NUL
            or lone surrogates, or over 4 MiB of JSON.
    """
    checked = _object(message)
    try:
        text = json.dumps(checked, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except RecursionError:
        raise InvalidInputError("message is nested too deeply to store as JSON") from None
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"message is not JSON-serialisable: {exc}") from None
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        # Postgres jsonb rejects the NUL escape; refuse it here so every tier accepts the same.
        raise InvalidInputError("message text must not contain NUL characters")
    if text.isascii():
        size = len(text)  # no surrogates, one byte per character: no need to encode
    else:
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidInputError("message must be valid Unicode (no lone surrogates)") from None
    if size > MAX_MESSAGE_BYTES:
        raise InvalidInputError(
            f"message is {size} bytes of JSON; the limit is {MAX_MESSAGE_BYTES} bytes"
        )
    return text


def clean_text(text: str) -> str:
    """``text`` made storable: U+0000 becomes U+FFFD, a surrogate pair split across pieces
    (``"\\ud83d" "\\ude00"`` joined) becomes its character, and a lone surrogate half
    becomes U+FFFD.

    For text a model or a tool produced, which vel stores rather than refuses; text a user
    sends is checked by :func:`encode_message` instead, and refused before any model call.
    """
    if "\x00" in text:
        text = text.replace("\x00", REPLACEMENT)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # UTF-16 round trip: pairs join into one character; lone halves fail to decode.
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def clean_value(value: Any) -> Any:
    """A JSON value made storable: :func:`clean_text` applied to every string (keys
    included), and NaN and the infinities, which JSON cannot hold, written as the strings
    ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, list):
        return [clean_value(v) for v in value]
    if isinstance(value, dict):
        return {
            clean_text(k) if isinstance(k, str) else k: clean_value(v) for k, v in value.items()
        }
    return value


class TextCleaner:
    """:func:`clean_text` for text arriving in pieces: a high surrogate ending one piece is
    held back until the next, so a pair split across two pieces joins instead of becoming
    two replacement characters."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = ""

    def feed(self, piece: str) -> str:
        """The storable text of ``piece`` (possibly '' while a half pair is held)."""
        if self._held:
            piece, self._held = self._held + piece, ""
        if piece and "\ud800" <= piece[-1] <= "\udbff":
            piece, self._held = piece[:-1], piece[-1]
        return clean_text(piece)

    def flush(self) -> str:
        """What is still held (a half pair with no partner: U+FFFD), then nothing."""
        held, self._held = self._held, ""
        return clean_text(held)


def encode_messages(messages: Iterable[object], *, whole_history: bool = False) -> list[str]:
    """Validate and encode a batch for one append (``whole_history``: for one replace).

    Raises:
        InvalidInputError: a bad message, or more than :data:`MAX_MESSAGES_PER_APPEND`
            (:data:`MAX_MESSAGES_PER_REPLACE` for a whole history).
    """
    if isinstance(messages, (str, bytes, Mapping)):
        raise InvalidInputError("messages must be a list of message dicts")
    encoded = [encode_message(m) for m in messages]
    if whole_history:
        if len(encoded) > MAX_MESSAGES_PER_REPLACE:
            raise InvalidInputError(
                f"{len(encoded)} messages in one history; the limit is {MAX_MESSAGES_PER_REPLACE}"
            )
    elif len(encoded) > MAX_MESSAGES_PER_APPEND:
        raise InvalidInputError(
            f"{len(encoded)} messages in one append; the limit is {MAX_MESSAGES_PER_APPEND}"
        )
    return encoded


def new_message_ids(count: int) -> list[str]:
    """Fresh ids, generated once per append and kept across its retries."""
    return new_ids(count)


def check_message_ids(message_ids: Sequence[str] | None, count: int) -> list[str]:
    if message_ids is None:
        return new_message_ids(count)
    ids = list(message_ids)
    if len(ids) != count or len(set(ids)) != count:
        raise InvalidInputError("message_ids must be unique and one per message")
    for mid in ids:
        if not isinstance(mid, str) or not _MESSAGE_ID.fullmatch(mid):
            raise InvalidInputError(
                "each message id must be 1-64 characters of letters, digits, '_', '-', '.' or ':'"
            )
    return ids


def decode_message(text: str | bytes) -> Message:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise InvalidInputError("stored message is not a JSON object")
    return value


def decode_items(items: Sequence[bytes]) -> list[Message]:
    """The messages of stored ``b"<message id>\\n<json>"`` items (as the Redis tier keeps
    them). jiter (which openai brings) decodes a window about four times faster than the
    stdlib; text vel never writes, which jiter refuses (a lone surrogate's escape), is
    decoded, or refused, exactly as :func:`decode_message` does it.

    Raises:
        InvalidInputError: an item is not a JSON object.
        ValueError: an item is not JSON.
    """
    messages: list[Message] = []
    try:
        for item in items:
            value = _fast_loads(item[item.index(b"\n") + 1 :])
            if type(value) is not dict:
                raise InvalidInputError("stored message is not a JSON object")
            messages.append(value)
    except ValueError:
        return [decode_message(item[item.index(b"\n") + 1 :]) for item in items]
    return messages


def decode_texts(texts: Iterable[str]) -> list[Message]:
    """The messages of stored JSON texts (a Postgres window), decoded as
    :func:`decode_items` does (jiter, the stdlib for what jiter refuses)."""
    texts = list(texts)
    messages: list[Message] = []
    try:
        for text in texts:
            value = _fast_loads(text.encode())
            if type(value) is not dict:
                raise InvalidInputError("stored message is not a JSON object")
            messages.append(value)
    except ValueError:  # UnicodeEncodeError included
        return [decode_message(text) for text in texts]
    return messages


def parse_turn_input(input: Mapping[str, Any]) -> tuple[list[Message], bool]:
    """A turn's input (``Agent.run``'s ``input``) as its new messages, and whether the caller
    owns the history (``{'messages': [...]}``: nothing is loaded or stored).

    Raises:
        InvalidInputError: neither ``{'message': ...}`` nor ``{'messages': [...]}``, or a
            message that cannot be stored (checked before the model is called).
    """
    if not isinstance(input, Mapping):
        raise InvalidInputError("input must be {'message': ...} or {'messages': [...]}")
    if "messages" in input:
        messages = input["messages"]
        if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
            raise InvalidInputError("input['messages'] must be a list of message dicts")
        checked = [validate_message(m) for m in messages]
        # Refuse what cannot be sent as JSON here, with a typed error, not mid-request.
        encode_messages(checked)
        return checked, True
    if "message" in input:
        content = input["message"]
        if not isinstance(content, (str, list)):
            raise InvalidInputError("input['message'] must be a str (or content parts)")
        message: Message = {"role": "user", "content": content}
        encode_message(message)  # stored at the end of the turn: refuse it before the model
        return [message], False
    raise InvalidInputError("input must be {'message': ...} or {'messages': [...]}")
