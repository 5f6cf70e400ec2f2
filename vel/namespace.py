"""One namespace per deployment, the same in both tiers.

A namespace is what the Redis key prefix (``VEL_KEY_PREFIX``, default ``vel``) names. In Redis
every key of a namespace starts with ``<prefix>:{`` (see :mod:`vel.stores.redis.keys`); in
Postgres a namespace is a schema, so two prefixes sharing one database never see, list, warm,
delete or purge each other's sessions, and Postgres grants per schema enforce it between
tenants (docs/operations.md, "Several applications on one Redis and one Postgres").

The schema of a namespace, first match wins:

1. an explicit schema: the ``schema=`` argument, a ``search_path`` in the DSN
   (``?search_path=...`` or ``?options=-csearch_path=...``), or ``VEL_PG_SCHEMA``;
2. the default prefix ``vel``: no schema of its own, the DSN's search_path (where
   deployments made before namespaces keep their tables);
3. any other prefix: :func:`schema_for_prefix`, a deterministic schema name that no other
   prefix maps to (``tenantA`` -> ``vel_tenant_ua``, ``app:eu-1`` -> ``vel_app_ceu_d1``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote

from vel.errors import ConfigurationError

__all__ = [
    "DEFAULT_PREFIX",
    "Placement",
    "check_prefix",
    "check_schema_name",
    "dsn_search_path",
    "place",
    "schema_for_prefix",
]

DEFAULT_PREFIX = "vel"
_PREFIX_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_SCHEMA_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
# Every character a key prefix may hold (vel.stores.redis.keys) that is not a lowercase
# letter or digit, and its escape: the mapping stays one-to-one.
_ESCAPES = {"_": "__", "-": "_d", ".": "_p", ":": "_c"}
_MAX_IDENTIFIER = 63


def check_prefix(prefix: object, what: str = "key prefix") -> str:
    """Return ``prefix`` if it is a usable key prefix: 1-64 of letters, digits, ``_ . : -``.

    Raises:
        ConfigurationError: anything else.
    """
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise ConfigurationError(
            f"{what} must be 1-64 of letters, digits, '_', '.', ':', '-'; got {prefix!r}"
        )
    return prefix


def check_schema_name(schema: object, what: str = "schema") -> str:
    """Return ``schema`` if it is a plain identifier (letters, digits, ``_``; <= 63 chars).

    Raises:
        ConfigurationError: anything else (the name is placed in ``search_path``).
    """
    if not isinstance(schema, str) or not _SCHEMA_RE.fullmatch(schema):
        raise ConfigurationError(
            f"{what} must be a plain identifier (a letter or _, then letters, digits, _; at "
            f"most 63), got {schema!r}"
        )
    return schema


def schema_for_prefix(prefix: str) -> str | None:
    """The schema of key prefix ``prefix`` (None for the default prefix: the DSN's own).

    Lowercase letters and digits are kept; ``_ - . :`` become ``__ _d _p _c`` and an uppercase
    letter ``X`` becomes ``_ux``, so two prefixes never share a schema and the name needs no
    quoting in SQL. A name that would pass Postgres' 63-byte limit becomes
    ``vel__x<sha256 of the prefix, 20 hex digits>_<readable part>``: ``_x`` is no escape, so
    it can never equal the name of a short prefix.
    """
    if prefix == DEFAULT_PREFIX:
        return None
    out = []
    for ch in prefix:
        if ch.isascii() and (ch.islower() or ch.isdigit()):
            out.append(ch)
        elif ch.isascii() and ch.isupper():
            out.append("_u" + ch.lower())
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        else:
            raise ConfigurationError(f"key prefix {prefix!r} holds {ch!r}, which no schema can")
    name = "vel_" + "".join(out)
    if len(name) <= _MAX_IDENTIFIER:
        return name
    digest = hashlib.sha256(prefix.encode()).hexdigest()[:20]
    readable = re.sub(r"[^a-z0-9]+", "_", prefix.lower()).strip("_")
    return f"vel__x{digest}_{readable}"[:_MAX_IDENTIFIER]


def dsn_search_path(dsn: str | None) -> str | None:
    """The ``search_path`` a DSN sets (query ``search_path=`` or ``options=-c...``), if any."""
    if not dsn or "?" not in dsn:
        return None
    query = dsn.partition("?")[2].partition("#")[0]
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "search_path" and value:
            return value
        if key == "options":
            found = re.search(r"search_path\s*=\s*([^\s]+)", unquote(value))
            if found:
                return found.group(1)
    return None


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a namespace's tables live.

    Attributes:
        schema: the schema vel puts first in ``search_path``; None keeps the connection's
            own search_path (the DSN's, or the role's default).
        origin: why (``"schema="``, ``"the DSN's search_path"``, ``"VEL_PG_SCHEMA"``,
            ``"the default prefix"``, ``"key prefix 'x'"``), for messages.
    """

    schema: str | None
    origin: str

    def describe(self) -> str:
        if self.schema is None:
            return f"the search_path ({self.origin})"
        return f"schema {self.schema!r} ({self.origin})"


def place(
    *,
    schema: str | None,
    dsn: str | None,
    env_schema: str | None,
    prefix: str | None,
) -> Placement:
    """Resolve the schema of a store, in the order given in the module docstring.

    Args:
        schema: the ``schema=`` argument.
        dsn: the DSN (its search_path, if any, is kept as it is: the schema is then None).
        env_schema: ``VEL_PG_SCHEMA``.
        prefix: the namespace's key prefix (None: the default).

    Raises:
        ConfigurationError: a schema name that is not a plain identifier.
    """
    if schema is not None:
        return Placement(check_schema_name(schema), "schema=")
    if dsn_search_path(dsn) is not None:
        return Placement(None, "the DSN's search_path")
    if env_schema is not None:
        return Placement(check_schema_name(env_schema, "VEL_PG_SCHEMA"), "VEL_PG_SCHEMA")
    prefix = DEFAULT_PREFIX if prefix is None else prefix
    derived = schema_for_prefix(prefix)
    if derived is None:
        return Placement(None, "the default prefix 'vel'")
    return Placement(derived, f"key prefix {prefix!r}")
