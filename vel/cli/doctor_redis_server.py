"""``vel doctor``'s verdicts on the Redis server's own settings: its version, ``maxmemory``,
the eviction policy and persistence.

- ``maxmemory-policy`` ``allkeys-*`` FAILs: Redis could evict a session whose messages
  are not yet in Postgres. vel gives a TTL only to clean sessions, so ``volatile-*`` policies
  evict only what Postgres already has; ``noeviction`` is safe too (appends then fail with
  ``StoreFullError`` instead).
- ``appendonly no`` WARNs: a Redis crash or restart loses the turns not yet flushed (normally
  the last fraction of a second, more while Postgres is down). With ``appendonly yes`` and
  ``appendfsync everysec`` at most about one second of them is at risk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vel.errors import AccessDeniedError, VelError

if TYPE_CHECKING:
    from vel.cli.doctor import Report

MIN_REDIS = (6, 2)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def check_server(report: Report, hot: Any, info: dict[str, Any]) -> None:
    """Judge the server of ``hot`` (a RedisStore; ``info``: its INFO server section) and its
    settings; a user who may not read them gets a WARN naming what to check by hand."""
    version = str(info.get("redis_version", "0"))
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < MIN_REDIS:
        report.fail(
            "redis version",
            f"{version}; vel needs >= {'.'.join(map(str, MIN_REDIS))} -- fix: upgrade Redis",
        )
    else:
        report.ok("redis version", version)

    async def read_config(c: Any) -> dict[str, str]:
        found: dict[str, str] = {}
        for name in ("maxmemory", "maxmemory-policy", "appendonly", "appendfsync"):
            reply = await c.redis.config_get(name)
            found.update({_text(k): _text(v) for k, v in reply.items()})
        return found

    try:
        config = await hot.call("CONFIG GET", read_config)
    except VelError as exc:
        permission = (
            " (this ACL user lacks +config|get)" if isinstance(exc, AccessDeniedError) else ""
        )
        report.warn(
            "redis config",
            f"cannot read it{permission}: {exc}; check by hand that maxmemory is set, "
            "maxmemory-policy is volatile-lru (or another volatile-* or noeviction) and "
            "appendonly is yes",
        )
        config = {}
    if config.get("maxmemory") == "0":
        report.warn(
            "maxmemory",
            "0 (no limit): Redis grows until the machine runs out of memory, and nothing is "
            "evicted -- fix: CONFIG SET maxmemory <size> (and in redis.conf), sized as in "
            "docs/operations.md",
        )
    policy = config.get("maxmemory-policy")
    if policy is not None:
        if policy.startswith("allkeys-"):
            report.fail(
                "maxmemory-policy",
                f"{policy} lets Redis evict sessions whose messages are not yet in "
                "Postgres -- fix: redis-cli CONFIG SET maxmemory-policy volatile-lru "
                "(and `maxmemory-policy volatile-lru` in redis.conf)",
            )
        elif policy == "noeviction":
            report.ok("maxmemory-policy", "noeviction (appends fail when Redis is full)")
        else:
            report.ok("maxmemory-policy", f"{policy} (only flushed sessions have a TTL)")
    appendonly = config.get("appendonly")
    if appendonly == "no":
        report.warn(
            "appendonly",
            "no: a Redis crash or restart loses turns not yet flushed to Postgres "
            "(normally under a second's worth, more while Postgres is down) -- fix: "
            "redis-cli CONFIG SET appendonly yes; CONFIG SET appendfsync everysec "
            "(and the same two lines in redis.conf)",
        )
    elif appendonly == "yes":
        fsync = config.get("appendfsync", "?")
        if fsync == "no":
            report.warn(
                "appendfsync",
                "no: the OS decides when the AOF reaches disk (up to ~30 s of turns at "
                "risk on a machine crash) -- fix: CONFIG SET appendfsync everysec",
            )
        else:
            report.ok("appendonly", f"yes, appendfsync {fsync}")
