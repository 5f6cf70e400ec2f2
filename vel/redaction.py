"""Credentials never leave vel: the one path every repr, error, log line and command output
takes before it is shown.

:func:`redact` removes credentials from any text: the password of every URL or DSN in it
(``scheme://user:password@host...``, several hosts included, even when the password holds
unencoded ``@ : / # ? %``), ``password=...`` parameters (URL query or libpq ``key=value``
DSNs, quoted or not), and every secret of a URL vel was given (:func:`remember`), so a
driver's message quoting a piece of a malformed URL does not leak it either. vel's loggers
carry :class:`RedactingFilter` (:func:`vel.logs.get_logger`), which passes every record,
traceback included, through :func:`redact`.

:func:`split_userinfo` and :func:`normalize_userinfo` parse a URL's credentials the same way
redaction finds them, so what vel connects with and what it hides never disagree.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from urllib.parse import parse_qsl, quote, unquote

from vel import _fork

__all__ = [
    "MASK",
    "RedactingFilter",
    "normalize_userinfo",
    "redact",
    "remember",
    "secrets_of",
    "split_userinfo",
]

MASK = "***"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# In free text a URL runs to the next whitespace; its userinfo to the last "@" before that
# (a password may hold "@", ":", "/", "#", "?" unencoded). The user part may hold "@" too.
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)([^\s:/]*?):(\S*)@")
# password=..., sslpassword=..., ssl_password=... in a URL query or a libpq key=value DSN.
_PASSWORD_PARAM = re.compile(
    r"(?i)(\b(?:ssl_?)?password\s*=\s*)('(?:[^'\\]|\\.)*'?|\"[^\"]*\"?|[^\s&;,'\")]*)"
)
# Secrets shorter than this are only hidden where they appear as URL or DSN credentials:
# hiding every "ab" in a message would garble it and protect nothing.
_MIN_SECRET = 3
# Pieces of a secret between its punctuation, which a URL parser's message may quote (a
# password cut at an unencoded "/" or "#").
_MIN_PIECE = 5
_PIECE_SPLIT = re.compile(r"[^A-Za-z0-9]+")
_MAX_REMEMBERED = 256

_lock = threading.Lock()


def _renew_lock() -> None:
    global _lock
    _lock = threading.Lock()  # another thread of the parent may have held it at the fork


_fork.at_fork_in_child(_renew_lock)
_remembered: OrderedDict[str, None] = OrderedDict()


def split_userinfo(url: str) -> tuple[str, str | None, str | None, str]:
    """Split ``scheme://[user[:password]@]rest`` at the *last* ``@``.

    Returns:
        (``scheme://``, user, password, rest): user and password raw (not percent-decoded),
        None when absent; ``scheme://`` is empty for text that is not a URL.
    """
    match = _SCHEME.match(url)
    if match is None:
        return "", None, None, url
    scheme, rest = match.group(0), url[match.end() :]
    userinfo, at, tail = rest.rpartition("@")
    if not at:
        return scheme, None, None, rest
    user, colon, password = userinfo.partition(":")
    return scheme, user, password if colon else None, tail


def normalize_userinfo(url: str) -> str:
    """``url`` with its user and password percent-encoded, as URL parsers expect.

    A password with unencoded ``@ / # ? : %`` is then read whole by redis-py and asyncpg,
    instead of being cut at the first special character (and quoted in their errors).
    Already encoded credentials are unchanged (decoded, then encoded again).
    """
    scheme, user, password, rest = split_userinfo(url)
    if user is None:
        return url
    userinfo = quote(unquote(user), safe="")
    if password is not None:
        userinfo += ":" + quote(unquote(password), safe="")
    return f"{scheme}{userinfo}@{rest}"


def secrets_of(url: str | None) -> list[str]:
    """The secrets a URL or DSN carries: its password (raw and percent-decoded) and every
    ``password=`` value (URL query or libpq ``key=value``)."""
    if not url:
        return []
    found: list[str] = []
    _, _, password, rest = split_userinfo(url)
    if password:
        found += [password, unquote(password), quote(unquote(password), safe="")]
    query = rest.partition("?")[2] if _SCHEME.match(url) else ""
    for key, value in parse_qsl(query.partition("#")[0], keep_blank_values=False):
        if key.lower().replace("_", "") in ("password", "sslpassword") and value:
            found.append(value)
    for match in _PASSWORD_PARAM.finditer(url if not query else url.partition("?")[0]):
        value = match.group(2)
        if value.startswith("'"):  # libpq quoting: backslash escapes ' and \
            value = re.sub(r"\\(.)", r"\1", value[1:].removesuffix("'"))
        value = value.strip('"')
        if value:
            found.append(value)
    return [s for s in dict.fromkeys(found) if s]


def remember(url: str | None) -> None:
    """Register the secrets of ``url`` (a URL or DSN vel was given) so that :func:`redact`
    hides them wherever they turn up, whole or in pieces. Bounded: the oldest are forgotten
    past 256."""
    secrets = secrets_of(url)
    if not secrets:
        return
    with _lock:
        for secret in secrets:
            _remembered[secret] = None
            _remembered.move_to_end(secret)
        while len(_remembered) > _MAX_REMEMBERED:
            _remembered.popitem(last=False)


def _hidden_strings(extra: list[str]) -> list[str]:
    with _lock:
        secrets = [*_remembered, *extra]
    hidden: set[str] = set()
    for secret in secrets:
        if len(secret) >= _MIN_SECRET:
            hidden.add(secret)
        hidden.update(p for p in _PIECE_SPLIT.split(secret) if len(p) >= _MIN_PIECE)
    return sorted(hidden, key=len, reverse=True)


def _mask_userinfo(match: re.Match[str]) -> str:
    return f"{match.group(1)}{match.group(2)}:{MASK}@"


def redact(text: object) -> str:
    """``str(text)`` without credentials (see the module docstring); safe on any text."""
    out = str(text)
    # A text that is one URL is split the way vel parses URLs, which also finds passwords
    # holding whitespace.
    extra = secrets_of(out) if _SCHEME.match(out) else []
    for secret in _hidden_strings(extra):
        if secret in out:
            out = out.replace(secret, MASK)
    out = _URL_USERINFO.sub(_mask_userinfo, out)
    return _PASSWORD_PARAM.sub(lambda m: m.group(1) + MASK, out)


class RedactingFilter(logging.Filter):
    """Passes a record's message and traceback through :func:`redact` (always keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging report it as usual
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
