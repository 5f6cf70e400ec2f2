"""REDIS_URL, parsed once by vel: every part checked, credentials split the way
:mod:`vel.redaction` finds them, connection arguments built for redis-py.

Accepted forms (user and password percent-encoded or not: the userinfo ends at the last
``@``)::

    redis://[user[:password]@]host[:port][/db][?options]      plain TCP
    rediss://...                                             TLS
    unix://[user[:password]@]/path/to/redis.sock[?db=N&...]   unix socket
    redis+cluster://[user[:password]@]host:port[,host:port...][/0][?options]
    rediss+cluster://...                                     a cluster over TLS

Options: ``db``, ``username``, ``password``, ``client_name``, and with TLS ``ssl_ca_certs``
(a CA file), ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (``none``, ``optional``,
``required``), ``ssl_check_hostname`` (``true``/``false``), plus ``ssl_ca_path`` and
``ssl_password`` on a single server. Timeouts and pool sizes come from vel's settings
(``VEL_OP_TIMEOUT``, ``VEL_REDIS_POOL_MAX``), never from the URL. Anything else, a database
that is not a number (``redis://host/notadb``), a port outside 1-65535, or a database other
than 0 on a cluster is refused with ConfigurationError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from vel.bounds import DB_INDEX
from vel.errors import ConfigurationError
from vel.redaction import redact, remember, split_userinfo

__all__ = ["CLUSTER_SCHEMES", "SCHEMES", "RedisURL", "parse_redis_url"]

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SCHEMES = ("redis://", "rediss://", "unix://", *CLUSTER_SCHEMES)
_TLS_OPTIONS = {
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
}
_SINGLE_TLS_OPTIONS = {"ssl_ca_path", "ssl_password"}
_OPTIONS = {"db", "username", "password", "client_name"}
_CERT_REQS = ("none", "optional", "required")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True, slots=True)
class RedisURL:
    """A checked REDIS_URL.

    Attributes:
        cluster: a Redis Cluster (the hosts are seeds).
        tls: TLS (``rediss``).
        unix_path: the socket path of a ``unix://`` URL, else None.
        hosts: (host, port) pairs (one for a single server).
        db: the database index (0 on a cluster).
        username, password: decoded credentials (None when absent).
        tls_options: the ``ssl_*`` options, as redis-py takes them.
        client_name: CLIENT SETNAME value, if given.
    """

    cluster: bool
    tls: bool
    unix_path: str | None
    hosts: list[tuple[str, int]]
    db: int
    username: str | None
    password: str | None
    tls_options: dict[str, Any] = field(default_factory=dict)
    client_name: str | None = None

    def connection_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a redis-py connection (pool) for a single server."""
        from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

        kwargs: dict[str, Any] = {
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "client_name": self.client_name,
        }
        if self.unix_path is not None:
            kwargs.update(connection_class=UnixDomainSocketConnection, path=self.unix_path)
            return kwargs
        host, port = self.hosts[0]
        kwargs.update(host=host, port=port)
        if self.tls:
            kwargs.update(connection_class=SSLConnection, **self.tls_options)
        else:
            kwargs["connection_class"] = Connection
        return kwargs

    def cluster_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of a ``RedisCluster`` (startup nodes excluded)."""
        kwargs: dict[str, Any] = {
            "username": self.username,
            "password": self.password,
            "client_name": self.client_name,
            "ssl": self.tls,
        }
        if self.tls:
            kwargs.update(self.tls_options)
        return kwargs


def _fail(url: str, problem: str) -> ConfigurationError:
    return ConfigurationError(f"REDIS_URL {redact(url)!r}: {problem}")


def _host_port(url: str, item: str, default_port: int | None) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [IPv6]:port
        host, bracket, tail = item[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise _fail(url, f"bad host {item!r}")
        port_text = tail[1:]
    else:
        host, colon, port_text = item.rpartition(":")
        if not colon:
            host, port_text = item, ""
    if not port_text:
        if default_port is None:
            raise _fail(url, f"a cluster seed needs host:port, got {item!r}")
        return host or "localhost", default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _fail(url, f"the port must be a number from 1 to 65535, got {port_text!r}")
    if not host:
        raise _fail(url, f"a host is missing before :{port_text}")
    return host, int(port_text)


def _options(url: str, query: str, tls: bool, cluster: bool) -> dict[str, str]:
    allowed = _OPTIONS | (_TLS_OPTIONS if tls else set())
    if tls and not cluster:
        allowed |= _SINGLE_TLS_OPTIONS
    options: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key in options:
            raise _fail(url, f"option {key!r} is given twice")
        if key not in allowed:
            if key.startswith("ssl_") and not tls:
                raise _fail(url, f"{key} needs TLS: use rediss:// (or rediss+cluster://)")
            raise _fail(
                url,
                f"unknown option {key!r}; REDIS_URL takes {', '.join(sorted(allowed))} "
                "(timeouts and pool sizes: VEL_OP_TIMEOUT, VEL_REDIS_POOL_MAX)",
            )
        options[key] = value
    return options


def _tls_options(url: str, options: dict[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in options.items():
        if key == "ssl_cert_reqs":
            if value.lower() not in _CERT_REQS:
                raise _fail(url, f"ssl_cert_reqs must be one of {_CERT_REQS}, got {value!r}")
            result[key] = value.lower()
        elif key == "ssl_check_hostname":
            if value.lower() not in _TRUE + _FALSE:
                raise _fail(url, f"ssl_check_hostname must be true or false, got {value!r}")
            result[key] = value.lower() in _TRUE
        elif key.startswith("ssl_"):
            if not value:
                raise _fail(url, f"{key} must not be empty")
            result[key] = value
    return result


def parse_redis_url(url: object) -> RedisURL:
    """Parse and check a REDIS_URL (see the module docstring); remembers its secrets for
    redaction.

    Raises:
        ConfigurationError: an unknown scheme, a bad host, port, database or option.
    """
    if not isinstance(url, str) or not url:
        raise ConfigurationError(f"REDIS_URL must be a non-empty str, got {url!r}")
    remember(url)
    if not url.startswith(SCHEMES):
        raise _fail(url, f"the scheme must be one of {', '.join(SCHEMES)}")
    scheme, user, password, rest = split_userinfo(url)
    cluster = scheme in CLUSTER_SCHEMES
    tls = scheme.startswith("rediss")
    if "#" in rest:
        raise _fail(url, "a '#' outside the password (encode it as %23)")
    rest, _, query = rest.partition("?")
    options = _options(url, query, tls, cluster)
    username = unquote(user) if user else None
    secret = unquote(password) if password is not None else None
    username = options.pop("username", None) or username
    secret = options.pop("password", None) or secret
    client_name = options.pop("client_name", None) or None
    db_option = options.pop("db", None)
    unix_path = None
    if scheme == "unix://":
        if not rest.startswith("/"):
            raise _fail(url, "a unix:// URL needs an absolute socket path (unix:///path)")
        unix_path, db_path, hosts = unquote(rest), "", [("localhost", 0)]
    else:
        hostpart, _, db_path = rest.partition("/")
        if cluster:
            if not hostpart:
                raise _fail(url, "a cluster URL needs host:port seeds separated by commas")
            hosts = [_host_port(url, item, None) for item in hostpart.split(",")]
        else:
            if "," in hostpart:
                raise _fail(url, "several hosts need redis+cluster:// (or rediss+cluster://)")
            hosts = [_host_port(url, hostpart, 6379)]
    db = 0
    for text in (db_path, db_option):
        if text is None or text == "":
            continue
        if not text.isdigit():
            raise _fail(url, f"the database must be a number, got {text!r}")
        value = DB_INDEX.check_int("the database index", int(text))
        if db_path and db_option is not None and int(db_path) != value:
            raise _fail(url, "the database is given twice, differently")
        db = value
    if cluster and db != 0:
        raise _fail(url, "a cluster has only database 0")
    return RedisURL(
        cluster=cluster,
        tls=tls,
        unix_path=unix_path,
        hosts=hosts,
        db=db,
        username=username,
        password=secret,
        tls_options=_tls_options(url, options) if tls else {},
        client_name=client_name,
    )
