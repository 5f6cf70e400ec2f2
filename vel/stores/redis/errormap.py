"""How redis-py's (and the socket's) errors become vel's: the one mapping, used by
:meth:`Connector.call <vel.stores.redis.client.Connector.call>` exactly once per call.

Each vel error names what the operator can do about it (an ACL to widen, a database number or
certificate to correct, memory to raise); a TLS failure no retry can fix is found anywhere in
the exception's chain.
"""

from __future__ import annotations

import ssl

from redis import exceptions as rexc

from vel.errors import (
    AccessDeniedError,
    ConfigurationError,
    StoreError,
    StoreFullError,
    StoreTimeoutError,
    StoreUnavailableError,
    VelError,
)
from vel.redaction import redact


def _tls_problem(exc: BaseException) -> str | None:
    """A TLS failure that retrying cannot fix (an untrusted certificate, TLS against a plain
    port), found anywhere in ``exc``'s chain, as text; None otherwise."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"the server's certificate was not accepted ({seen.verify_message})"
        if isinstance(seen, ssl.SSLError) and "WRONG_VERSION_NUMBER" in str(seen):
            return "the server does not speak TLS there (use redis:// or its TLS port)"
        text = str(seen)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return "the server's certificate was not accepted (certificate verify failed)"
        seen = seen.__cause__ or seen.__context__
    return None


def translate(what: str, exc: Exception, *, where: str, op_timeout: float) -> VelError:
    """The vel error for a redis-py (or socket) error raised during ``what``; ``where`` names
    the server (never with credentials), ``op_timeout`` the bound a timeout exceeded."""
    detail = redact(exc)
    if isinstance(exc, (rexc.ClusterDownError, rexc.TryAgainError, rexc.SlotNotCoveredError)):
        return StoreUnavailableError(f"Redis Cluster cannot serve {what} now (failover?): {detail}")
    if isinstance(exc, rexc.NoPermissionError) or detail.startswith("NOPERM"):
        return AccessDeniedError(
            f"Redis refused {what} for lack of permission ({detail}): the ACL user of "
            f"{where} needs the commands and the key pattern listed in "
            "docs/operations.md (Redis ACL)"
        )
    if isinstance(exc, rexc.ResponseError):
        if isinstance(exc, rexc.OutOfMemoryError) or "maxmemory" in detail:
            return StoreFullError(
                f"Redis is out of memory during {what}; nothing was "
                "stored (raise maxmemory or flush faster)"
            )
        if "DB index is out of range" in detail:
            return ConfigurationError(
                f"Redis at {where} has no such database ({detail}): correct the "
                "database number in REDIS_URL"
            )
        if detail.startswith("unknown command") or "ERR unknown command" in detail:
            return ConfigurationError(
                f"Redis refused {what}: {detail} (a renamed or disabled command?)"
            )
        return StoreError(f"Redis rejected {what}: {detail}")
    if isinstance(exc, rexc.AuthenticationError):
        return ConfigurationError(f"Redis refused the credentials in {where!r}")
    certificate = _tls_problem(exc)
    if certificate is not None:
        return ConfigurationError(
            f"TLS with Redis at {where} failed: {certificate} -- give the server's "
            "CA with ?ssl_ca_certs=/path/ca.pem in REDIS_URL (rediss:// for TLS)"
        )
    if isinstance(exc, (rexc.TimeoutError, TimeoutError)):
        return StoreTimeoutError(f"Redis did not answer {what} within {op_timeout} s")
    if isinstance(exc, (rexc.ConnectionError, OSError)):
        return StoreUnavailableError(f"Redis at {where} is unreachable during {what}: {detail}")
    if isinstance(exc, (rexc.RedisError, rexc.RedisClusterException)):
        return StoreError(f"Redis failed during {what}: {detail}")
    if isinstance(exc, (AttributeError, TypeError)):
        # redis-py writing to a connection the peer has just reset (or one its cluster
        # client is tearing down) leaks the transport's internals as these instead of a
        # ConnectionError (redis/redis-py#4287): the connection broke mid-call.
        return StoreUnavailableError(
            f"Redis connection broke during {what}: {type(exc).__name__}: {detail}"
        )
    return StoreError(f"Redis failed during {what}: {type(exc).__name__}: {detail}")
