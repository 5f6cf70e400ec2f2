"""``vel doctor``: checks the deployment and spells out the fix for each problem.

A FAIL is something that can lose or corrupt data, or stop vel working (exit 1); a WARN is a
setting with a known, bounded risk, explained in the line (exit 0 unless ``--strict``).

This module runs the checks and prints the report: Redis (reachability, the permissions a worker
needs, the clock, flush conflicts and the flusher's backlog) and Postgres (schema, grants,
clock). The verdicts on the Redis server's own settings are in
:mod:`vel.cli.doctor_redis_server`.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from vel.bounds import WAIT, cli
from vel.cli._common import add_command, add_connection_flags, settings_from
from vel.cli.doctor_redis_server import check_server
from vel.errors import AccessDeniedError, ConfigurationError, VelError
from vel.redaction import redact
from vel.totals import read_totals


@dataclass
class Report:
    lines: list[tuple[str, str, str]] = field(default_factory=list)

    def ok(self, what: str, text: str) -> None:
        self.lines.append(("ok", what, text))

    def warn(self, what: str, text: str) -> None:
        self.lines.append(("WARN", what, text))

    def fail(self, what: str, text: str) -> None:
        self.lines.append(("FAIL", what, text))

    def count(self, level: str) -> int:
        return sum(1 for lvl, _, _ in self.lines if lvl == level)


def _clock() -> float:
    """This machine's clock (a function, so a test can move it)."""
    return time.time()


def _skew(local_before: float, local_after: float, remote: float) -> float:
    """Remote clock minus local clock, using the midpoint of the round trip."""
    return remote - (local_before + local_after) / 2


PROBE_SESSION = "vel-doctor-probe"


async def _check_redis_permissions(report: Report, hot: Any) -> bool:
    """Run what a worker runs on its namespace, touching no session: a read, a lock taken and
    released, the backlog, the shared counters, loading the scripts. False on a refusal."""
    keys = hot.keys.session(PROBE_SESSION)
    token = f"doctor-{time.time_ns()}"

    async def load_scripts(c: Any) -> None:
        await c.load_scripts()

    try:
        await hot.call("SCRIPT LOAD", load_scripts)
        await hot.read(PROBE_SESSION, 1)
        if await hot.try_lock(keys.turn_lock, token, 1.0):
            await hot.release_lock(keys.turn_lock, token)
        await hot.backlog()
        await read_totals(hot)
    except AccessDeniedError as exc:
        report.fail(
            "redis permissions",
            f"{exc} -- fix: give the ACL user the commands of docs/operations.md and the "
            f"key pattern ~{hot.keys.prefix}:{{*",
        )
        return False
    report.ok("redis permissions", f"reads, locks and scripts work under {hot.keys.prefix}:{{*")
    return True


async def check_redis(report: Report, settings: Any, max_skew: float, max_age: float) -> None:
    from vel.stores.redis import RedisStore

    try:
        hot = RedisStore.from_settings(settings, write_behind=True)
    except ConfigurationError as exc:
        report.fail("redis", f"{exc} -- fix: correct REDIS_URL")
        return
    try:
        try:
            await hot.ping()
        except AccessDeniedError as exc:
            report.fail("redis", f"{exc} -- fix: the ACL user needs +ping")
            return
        except ConfigurationError as exc:
            report.fail("redis", f"{exc} -- fix: correct the credentials or TLS in REDIS_URL")
            return
        except VelError as exc:
            report.fail("redis", f"{exc} -- fix: start Redis or correct REDIS_URL")
            return
        if not await _check_redis_permissions(report, hot):
            return
        try:
            info = await hot.call("INFO", lambda c: c.redis.info("server"))
        except AccessDeniedError as exc:
            report.warn(
                "redis server",
                f"this ACL user may not read the server's settings ({exc}) -- vel does not "
                "need them; to check the version, maxmemory-policy and appendonly, run vel "
                "doctor as a user with +info and +config|get",
            )
            info = None
        if info is not None:
            await check_server(report, hot, info)
        await _check_clock_and_backlog(report, hot, max_skew, max_age)
    finally:
        await hot.aclose()


async def _check_clock_and_backlog(
    report: Report, hot: Any, max_skew: float, max_age: float
) -> None:
    before = _clock()
    seconds, micros = await hot.call("TIME", lambda c: c.redis.time())
    skew = _skew(before, _clock(), seconds + micros / 1e6)
    if abs(skew) > max_skew:
        report.fail(
            "redis clock",
            f"{skew:+.2f} s from this machine's clock (leases, due times and TTL "
            "ages are computed from both) -- fix: run NTP (chrony/timesyncd) on both",
        )
    else:
        report.ok("redis clock", f"{skew:+.3f} s from this machine")

    conflicts = await hot.conflicts(limit=5)
    if conflicts:
        names = ", ".join(repr(c.session_id) for c in conflicts[:3])
        report.fail(
            "flush conflicts",
            f"{len(conflicts)}{'+' if len(conflicts) == 5 else ''} session(s) ({names}) "
            "hold writes Postgres could not take because it changed outside the Redis "
            "tier; they stay in Redis without TTL -- fix: `vel sessions conflicts`, then "
            "`vel sessions resolve ID --keep postgres|both|redis` for each",
        )
    else:
        report.ok("flush conflicts", "none")

    unflushed, oldest, dirty = await hot.backlog()
    if oldest > max_age:
        report.fail(
            "flusher",
            f"{unflushed} messages in {dirty} sessions wait for Postgres, the oldest "
            f"for {oldest:.0f} s -- fix: start `vel flusher` (or leave VEL_FLUSHER "
            "unset so workers flush), and check Postgres is reachable from it",
        )
    else:
        report.ok("flusher", f"backlog {unflushed} messages, oldest {oldest:.1f} s")


_TABLES = {
    "vel_session_rows": "SELECT, INSERT, UPDATE, DELETE",
    "vel_messages": "SELECT, INSERT, UPDATE, DELETE",
    "vel_locks": "SELECT, INSERT, UPDATE, DELETE",
    "vel_schema_version": "SELECT",
}
_WHERE_TABLES = """
SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = to_regclass('vel_schema_version')
"""


async def _check_grants(report: Report, conn: Any) -> bool:
    """Whether the role holds what vel needs on its tables (FAIL naming what is missing)."""
    missing = []
    for table, privileges in _TABLES.items():
        for privilege in privileges.split(", "):
            if not await conn.fetchval("SELECT has_table_privilege($1, $2)", table, privilege):
                missing.append(f"{privilege} on {table}")
    if missing:
        role = await conn.fetchval("SELECT current_user")
        report.fail(
            "postgres permissions",
            f"role {role!r} lacks {', '.join(missing)} (insufficient_privilege) -- fix: "
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA <schema> TO "
            f"{role} (docs/operations.md, Postgres grants)",
        )
        return False
    return True


async def check_postgres(report: Report, settings: Any, max_skew: float) -> None:
    from vel.cli._common import placement_of
    from vel.cli._pg import connection
    from vel.stores.postgres.migrate import latest_version, schema_version

    dsn = settings.postgres_dsn
    try:
        placement = placement_of(settings)
    except ConfigurationError as exc:
        report.fail("postgres", f"{exc} -- fix: correct VEL_PG_SCHEMA or --schema")
        return
    try:
        async with connection(dsn, placement) as conn:
            server = await conn.fetchval("SHOW server_version")
            report.ok("postgres", f"reachable, version {server}")
            if placement.schema is not None and not await conn.fetchval(
                "SELECT has_schema_privilege(oid, 'USAGE') FROM pg_namespace WHERE nspname = $1",
                placement.schema,
            ):
                exists = await conn.fetchval(
                    "SELECT 1 FROM pg_namespace WHERE nspname = $1", placement.schema
                )
                if exists:
                    role = await conn.fetchval("SELECT current_user")
                    report.fail(
                        "postgres permissions",
                        f"role {role!r} lacks USAGE on schema {placement.schema!r} "
                        f"(insufficient_privilege) -- fix: GRANT USAGE ON SCHEMA "
                        f"{placement.schema} TO {role} (docs/operations.md, Postgres grants)",
                    )
                    return
            version = await schema_version(conn)
            latest = latest_version()
            if version < latest:
                hint = ""
                if placement.schema is not None and version == 0:
                    async with connection(dsn) as plain:
                        if await schema_version(plain) > 0:
                            hint = (
                                " (vel tables exist in the DSN's search_path: a deployment "
                                "made before namespaces? set VEL_PG_SCHEMA to that schema to "
                                "keep using them)"
                            )
                report.fail(
                    "schema",
                    f"version {version} in {placement.describe()}, this vel needs {latest}"
                    f"{hint} -- fix: vel migrate",
                )
            elif version > latest:
                report.fail(
                    "schema",
                    f"version {version} is newer than this vel knows ({latest}) -- fix: "
                    "upgrade vel on this machine",
                )
            else:
                where = await conn.fetchval(_WHERE_TABLES)
                report.ok("schema", f"version {version} in schema {where!r}")
                if await _check_grants(report, conn):
                    report.ok("postgres permissions", "the role may read and write vel's tables")
            before = _clock()
            remote = float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())"))
            skew = _skew(before, _clock(), remote)
            if abs(skew) > max_skew:
                report.fail(
                    "postgres clock",
                    f"{skew:+.2f} s from this machine's clock (session expiry and "
                    "inactivity use it) -- fix: run NTP (chrony/timesyncd) on both",
                )
            else:
                report.ok("postgres clock", f"{skew:+.3f} s from this machine")
    except AccessDeniedError as exc:
        report.fail(
            "postgres permissions",
            f"{exc} -- fix: grant the role what docs/operations.md lists (Postgres grants)",
        )
    except ConfigurationError as exc:
        report.fail("postgres", f"{exc} -- fix: correct POSTGRES_DSN (credentials, TLS)")
    except VelError as exc:
        report.fail("postgres", f"{exc} -- fix: start Postgres or correct POSTGRES_DSN")


def _namespace(report: Report, settings: Any) -> None:
    from vel.cli._common import placement_of

    try:
        where = placement_of(settings).describe() if settings.postgres_dsn else "no Postgres"
    except ConfigurationError:
        return  # reported by the Postgres checks
    report.ok(
        "namespace",
        f"prefix {settings.key_prefix!r}: Redis keys {settings.key_prefix}:{{*, Postgres {where}",
    )


async def cmd_doctor(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    report = Report()
    _namespace(report, settings)
    if args.storage in ("auto", "redis"):
        await check_redis(report, settings, args.max_skew, args.max_backlog_age)
    if settings.postgres_dsn:
        await check_postgres(report, settings, args.max_skew)
    elif args.storage == "database":
        report.fail("postgres", "POSTGRES_DSN is not set -- fix: export POSTGRES_DSN=...")
    else:
        report.warn(
            "postgres",
            "POSTGRES_DSN is not set: session_storage='redis' keeps sessions in Redis only, "
            "and they end with their TTL -- fix: export POSTGRES_DSN=postgresql://...",
        )
    for level, what, text in report.lines:
        print(redact(f"{level:4}  {what:17} {text}"))
    fails, warns = report.count("FAIL"), report.count("WARN")
    if fails or (args.strict and warns):
        print(f"vel doctor: {fails} problem(s), {warns} warning(s)", file=sys.stderr)
        return 1
    print(f"all good ({warns} warning(s))")
    return 0


def register(sub: Any) -> None:
    p = add_command(sub, "doctor", "check Redis and Postgres settings; exit 1 on a problem")
    add_connection_flags(p)
    p.add_argument(
        "--storage",
        choices=("auto", "database", "redis"),
        default="auto",
        help="database: skip the Redis checks",
    )
    p.add_argument("--strict", action="store_true", help="warnings fail too")
    p.add_argument(
        "--max-skew", type=cli(WAIT, "--max-skew"), default=2.0, help="allowed clock skew, seconds"
    )
    p.add_argument(
        "--max-backlog-age",
        type=cli(WAIT, "--max-backlog-age"),
        default=60.0,
        help="oldest unflushed session age that means no flusher keeps up, seconds",
    )
    p.set_defaults(run=cmd_doctor)
