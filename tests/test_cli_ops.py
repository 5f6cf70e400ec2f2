"""``vel sessions|warm|stats|doctor`` and ``vel flusher --metrics-port`` against the real local
services (throwaway Redis servers where a setting must differ from the shared one)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import fresh_schema, schema_dsn
from servers import RedisServer
from test_cli import clean_env, vel_cmd

from vel.stores.postgres import PostgresStore
from vel.stores.postgres.migrate import latest_version
from vel.stores.redis import RedisStore
from vel.stores.tiered import TieredStore


def msgs(*texts: str) -> list[dict[str, Any]]:
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)
    ]


class Env:
    """One test's schema and prefix: the env of a ``vel`` process and an in-test store."""

    def __init__(self, pg_dsn: str, schema: str, redis_url: str, prefix: str) -> None:
        self.dsn = schema_dsn(pg_dsn, schema)
        self.pg_dsn = pg_dsn
        self.schema = schema
        self.redis_url = redis_url
        self.prefix = prefix
        self.env = clean_env(POSTGRES_DSN=self.dsn, REDIS_URL=redis_url, VEL_KEY_PREFIX=prefix)
        self.store = TieredStore(
            RedisStore(redis_url, key_prefix=prefix, write_behind=True, flush_delay=0),
            PostgresStore(pg_dsn, schema=schema),
            flusher=False,
        )

    async def vel(self, *args: str, env: dict[str, str] | None = None) -> Any:
        return await asyncio.to_thread(vel_cmd, *args, env=env or self.env)

    async def redis_len(self, session_id: str) -> int:
        client = await self.store.hot.client()
        return int(await client.redis.llen(self.store.hot.keys.session(session_id).messages))

    async def pg(self, sql: str, *args: Any) -> Any:
        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()


@pytest.fixture
async def ops(
    pg_dsn: str, migrated_schema: str, redis_url: str, key_prefix: str
) -> AsyncIterator[Env]:
    e = Env(pg_dsn, migrated_schema, redis_url, key_prefix)
    try:
        yield e
    finally:
        await e.store.aclose()


def one_error_line(result: Any) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return str(lines[0])


# -- sessions -----------------------------------------------------------------------------------


async def test_sessions_list_and_show(ops: Env) -> None:
    await ops.store.append("alpha", msgs("My name is Alice", "Hello Alice"))
    await ops.store.append("beta", msgs("hi"))
    await ops.store.flush()
    listed = await ops.vel("sessions", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["id"]: r for r in map(json.loads, listed.stdout.splitlines())}
    assert rows["alpha"]["messages"] == 2 and rows["beta"]["messages"] == 1
    idle = await ops.vel("sessions", "list", "--older-than", "3600")
    assert "alpha" not in idle.stdout
    shown = await ops.vel("sessions", "show", "alpha")
    assert shown.returncode == 0
    assert "user      My name is Alice" in shown.stdout and "Hello Alice" in shown.stdout
    missing = await ops.vel("sessions", "show", "nobody")
    assert "has no messages" in one_error_line(missing)


@pytest.fixture
async def second_schema(pg_dsn: str) -> AsyncIterator[str]:
    """Another migrated schema (the import target)."""
    from vel.stores.postgres.migrate import migrate

    async with fresh_schema(pg_dsn) as schema:
        await migrate(pg_dsn, schema=schema)
        yield schema


async def test_export_import_round_trip_is_idempotent(
    ops: Env, pg_dsn: str, second_schema: str, key_prefix: str, redis_url: str, tmp_path: Path
) -> None:
    await ops.store.append("a", msgs("one", "two", "three"))
    await ops.store.append("b", [{"role": "user", "content": [{"type": "text", "text": "x"}]}])
    await ops.store.flush()
    await ops.pg("UPDATE vel_sessions SET metadata = '{\"team\": \"x\"}' WHERE id = 'a'")
    await ops.store.append("a", msgs("four (unflushed)"))  # export flushes it first
    out = tmp_path / "export.jsonl"
    exported = await ops.vel("sessions", "export", "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["id"] for e in lines] == ["a", "b"]
    assert [m["content"] for m in lines[0]["messages"]] == [
        "one",
        "two",
        "three",
        "four (unflushed)",
    ]
    assert lines[0]["metadata"] == {"team": "x"} and len(lines[0]["message_ids"]) == 4

    # Into another schema and prefix (database mode there), twice.
    target = Env(pg_dsn, second_schema, redis_url, key_prefix + "-t")
    try:
        first = await target.vel("sessions", "import", str(out), "--storage", "database")
        assert first.returncode == 0, first.stderr
        assert "imported 2 sessions, replaced 0, skipped 0" in first.stdout
        again = await target.vel("sessions", "import", str(out), "--storage", "database")
        assert "imported 0 sessions, replaced 0, skipped 2" in again.stdout
        rows = await target.pg("SELECT session_id, seq, message_id FROM vel_messages ORDER BY 1, 2")
        assert len(rows) == 5
        assert [r["message_id"] for r in rows if r["session_id"] == "a"] == lines[0]["message_ids"]
        meta = await target.pg("SELECT metadata::text, created_at FROM vel_sessions WHERE id='a'")
        assert json.loads(meta[0]["metadata"]) == {"team": "x"}
        assert meta[0]["created_at"].isoformat() == lines[0]["created_at"]
        # --replace: the file's history wins, in redis mode too (through Redis, then flushed).
        await target.store.append("a", msgs("local only"))
        replaced = await target.vel("sessions", "import", str(out), "--replace")
        assert "replaced 2" in replaced.stdout, replaced.stderr
        back = await target.store.load("a")
        assert [m["content"] for m in back] == ["one", "two", "three", "four (unflushed)"]
    finally:
        await target.store.aclose()


async def test_import_checks_every_line_before_writing(ops: Env, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    good = {"id": "fine", "messages": msgs("x")}
    bad.write_text(json.dumps(good) + "\n" + '{"id": "", "messages": []}\n')
    result = await ops.vel("sessions", "import", str(bad))
    assert "line 2" in one_error_line(result)
    assert await ops.store.load("fine") == []


async def test_delete_removes_both_tiers(ops: Env) -> None:
    await ops.store.append("gone", msgs("a", "b"))
    await ops.store.flush()
    result = await ops.vel("sessions", "delete", "gone", "never-was")
    assert result.returncode == 1 and "deleted 1 sessions" in result.stdout
    assert "not found: never-was" in result.stderr
    assert await ops.redis_len("gone") == 0
    assert (await ops.store.cold.last_seq("gone"))[1] == 0
    assert await ops.store.load("gone") == []


async def test_purge_deletes_expired_sessions_from_postgres_and_redis(ops: Env) -> None:
    await ops.store.append("old", msgs("a"))
    await ops.store.append("live", msgs("b"))
    await ops.store.flush()
    await ops.pg("UPDATE vel_sessions SET expires_at = now() - interval '1 s' WHERE id = 'old'")
    assert await ops.redis_len("old") == 1
    result = await ops.vel("sessions", "purge")
    assert result.returncode == 0, result.stderr
    assert "purged 1 expired sessions from Postgres, 1 Redis copies" in result.stdout
    assert await ops.redis_len("old") == 0 and await ops.redis_len("live") == 1
    assert [r["id"] for r in await ops.pg("SELECT id FROM vel_sessions")] == ["live"]


# -- warm ---------------------------------------------------------------------------------------


async def test_warm_by_ids_recent_and_all_loads_exactly_what_postgres_has(ops: Env) -> None:
    cold = ops.store.cold
    for i in range(6):
        await cold.append(f"w{i}", msgs(*[f"m{j}" for j in range(i + 1)]))
    by_id = await ops.vel("warm", "--ids", "w1", "w2")
    assert by_id.returncode == 0, by_id.stderr
    assert "warmed 2 sessions: 2 loaded from Postgres, 0 already in Redis" in by_id.stdout
    assert [await ops.redis_len(f"w{i}") for i in range(6)] == [0, 2, 3, 0, 0, 0]
    recent = await ops.vel("warm", "--recent", "2")
    assert "2 loaded" in recent.stdout
    assert await ops.redis_len("w5") == 6 and await ops.redis_len("w4") == 5
    everything = await ops.vel("warm", "--all")
    assert "warmed 6 sessions: 2 loaded from Postgres, 4 already in Redis" in everything.stdout
    assert [await ops.redis_len(f"w{i}") for i in range(6)] == [1, 2, 3, 4, 5, 6]
    assert (await ops.store.hot.backlog())[0] == 0  # warming writes nothing back


# -- stats --------------------------------------------------------------------------------------


async def test_stats_counts_flushes_and_warm_hits_across_processes(ops: Env) -> None:
    await ops.store.cold.append("cold", msgs("x", "y"))
    warmed = await ops.vel("warm", "--ids", "cold")  # another process: one warm load
    assert warmed.returncode == 0, warmed.stderr
    await ops.store.append("hot", msgs("a", "b", "c"))
    await ops.store.load("hot")
    await ops.store.flush()
    await ops.store.totals.publish()
    await ops.store.flusher.totals.publish()
    result = await ops.vel("stats", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["flushed_messages"] == 3 and figures["flush_batches_ok"] >= 1
    # Two loads from Postgres: the warm command's, and the new session's first append.
    assert figures["warm_loads"] == 2 and figures["warm_misses"] == 1
    assert figures["warm_hits"] == 1  # the in-test load of "hot"
    assert figures["flush_rate"] == pytest.approx(3 / 60, abs=1e-3)
    assert figures["unflushed_messages"] == 0


async def test_stats_watch_redraws_in_place(ops: Env) -> None:
    await ops.store.append("s", msgs("x"))
    result = await ops.vel("stats", "--watch", "--interval", "0.1", "--count", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("vel stats") == 3
    assert result.stdout.count("\x1b[J") == 2  # the 2nd and 3rd tables overwrite the 1st
    assert "unflushed messages               1" in result.stdout


async def test_stats_with_redis_down_is_one_line(ops: Env) -> None:
    env = dict(ops.env, REDIS_URL="redis://127.0.0.1:1/0", VEL_OP_TIMEOUT="1")
    result = await ops.vel("stats", env=env)
    assert "unreachable" in one_error_line(result)


# -- doctor -------------------------------------------------------------------------------------


def doctor(redis: RedisServer, ops: Env, *flags: str) -> Any:
    env = dict(ops.env, REDIS_URL=redis.url)
    return vel_cmd("doctor", *flags, env=env)


async def test_doctor_refuses_allkeys_eviction_and_spells_out_the_fix(ops: Env) -> None:
    with RedisServer("--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru") as redis:
        result = await asyncio.to_thread(doctor, redis, ops)
    assert result.returncode == 1
    assert "FAIL  maxmemory-policy  allkeys-lru" in result.stdout
    assert "CONFIG SET maxmemory-policy volatile-lru" in result.stdout
    assert result.stderr.strip() == "vel doctor: 1 problem(s), 1 warning(s)"


async def test_doctor_passes_aof_everysec_and_volatile_lru(ops: Env) -> None:
    config = (
        "--maxmemory",
        "64mb",
        "--maxmemory-policy",
        "volatile-lru",
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
    )
    with RedisServer(*config) as redis:
        result = await asyncio.to_thread(doctor, redis, ops, "--strict")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok    appendonly        yes, appendfsync everysec" in result.stdout
    assert f"ok    schema            version {latest_version()} in schema " in result.stdout
    assert "ok    redis permissions" in result.stdout
    assert "ok    postgres permissions" in result.stdout
    assert "all good (0 warning(s))" in result.stdout


async def test_doctor_warns_without_aof_and_strict_fails(ops: Env) -> None:
    with RedisServer("--maxmemory-policy", "volatile-lru", "--appendonly", "no") as redis:
        relaxed = await asyncio.to_thread(doctor, redis, ops)
        strict = await asyncio.to_thread(doctor, redis, ops, "--strict")
    assert relaxed.returncode == 0 and "WARN  appendonly" in relaxed.stdout
    assert "not yet flushed" in relaxed.stdout
    assert strict.returncode == 1


async def test_doctor_fails_on_missing_schema_and_unreachable_redis(
    pg_dsn: str, pg_schema: str
) -> None:
    env = clean_env(
        POSTGRES_DSN=schema_dsn(pg_dsn, pg_schema),
        REDIS_URL="redis://127.0.0.1:1/0",
        VEL_OP_TIMEOUT="1",
    )
    result = await asyncio.to_thread(vel_cmd, "doctor", env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "FAIL  redis" in result.stdout and "fix: start Redis" in result.stdout
    assert "FAIL  schema            version 0 in the search_path" in result.stdout
    assert f"this vel needs {latest_version()} -- fix: vel migrate" in result.stdout


# -- flusher: metrics and structured logs -------------------------------------------------------


async def start_flusher(ops: Env, *flags: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "vel",
        *flags,
        env=ops.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def stop(proc: asyncio.subprocess.Process) -> tuple[str, str]:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    return out.decode(), err.decode()


async def test_flusher_serves_prometheus_metrics(ops: Env) -> None:
    # No --metrics-host: it listens on loopback only.
    proc = await start_flusher(ops, "flusher", "--metrics-port", "0", "--health-interval", "0")
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(20):
            banner = (await proc.stdout.readline()).decode()
        assert "metrics on 127.0.0.1:" in banner, banner
        port = int(banner.rsplit(":", 1)[1].split("/")[0])
        await ops.store.append("m", msgs("a", "b"))
        async with asyncio.timeout(20):
            while (await ops.store.hot.backlog())[0]:
                await asyncio.sleep(0.05)
        url = f"http://127.0.0.1:{port}/metrics"
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=5).read().decode()
        )
    finally:
        _, err = await stop(proc)
    assert proc.returncode == 0, err
    assert "# TYPE vel_flushed_messages_total counter" in body
    assert "vel_flushed_messages_total 2" in body
    assert "# TYPE vel_unflushed_messages gauge" in body and "vel_unflushed_messages 0" in body
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f.type for f in text_string_to_metric_families(body)}
    assert {n: t for n, t in families.items() if t not in ("counter", "gauge", "histogram")} == {}
    assert families["vel_flush_duration_seconds"] == "histogram"
    assert families["vel_flush_batches"] == "counter"
    assert 'vel_flush_batches_total{outcome="ok"}' in body


async def test_json_logs_carry_the_session_id(ops: Env) -> None:
    # Redis and Postgres disagree about seq 1 (a 'database' write after the tier lease ran
    # out with no flush): the flusher sets the session aside and says so.
    await ops.store.append("split-brain", msgs("in redis"))
    await ops.pg("UPDATE vel_session_rows SET hot_until = now() - interval '1 s'")
    await ops.store.cold.append("split-brain", msgs("in postgres"))
    proc = await start_flusher(
        ops, "--log-format", "json", "flusher", "--health-interval", "0", "--drain-timeout", "0.5"
    )
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(20):
            line = (await proc.stderr.readline()).decode()
    finally:
        await stop(proc)
    entry = json.loads(line)
    assert entry["level"] == "ERROR" and entry["logger"] == "vel.flusher"
    assert entry["session_id"] == "split-brain" and "not flushed" in entry["message"]


async def test_unknown_prefix_characters_are_one_line(ops: Env) -> None:
    result = await ops.vel("stats", "--prefix", "bad prefix!")
    assert "prefix" in one_error_line(result)


# -- the rest of the failure exits, demo across processes, settings ------------------------------


async def test_warm_and_flusher_with_postgres_down_are_one_line(ops: Env) -> None:
    env = dict(ops.env, POSTGRES_DSN="postgresql://postgres:pw@127.0.0.1:1/test")
    warm = await ops.vel("warm", "--all", env=env)
    assert "Postgres" in one_error_line(warm) and "pw" not in warm.stderr
    flusher = await ops.vel("flusher", env=env)
    assert "Postgres" in one_error_line(flusher)


async def test_sessions_without_dsn_is_one_line(ops: Env) -> None:
    env = {k: v for k, v in ops.env.items() if k != "POSTGRES_DSN"}
    result = await ops.vel("sessions", "list", env=env)
    assert "POSTGRES_DSN" in one_error_line(result)


async def test_demo_workers_started_together_take_turns_in_one_session(ops: Env) -> None:
    runs = await asyncio.gather(
        *(
            ops.vel("demo", "--storage", "redis", "--session-id", "together", "--worker", f"w{i}")
            for i in range(3)
        )
    )
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    out = "".join(r.stdout for r in runs)
    assert out.count("user: My name is Alice") == 1
    assert out.count("assistant: Your name is Alice.") == 2
    assert sorted(re.findall(r"had (\d+) messages", out)) == ["0", "2", "4"]


async def test_demo_workers_in_separate_processes_share_a_session(ops: Env) -> None:
    first = await ops.vel("demo", "--storage", "redis", "--session-id", "d1", "--worker", "w1")
    second = await ops.vel("demo", "--storage", "redis", "--session-id", "d1", "--worker", "w2")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "[w1] user: My name is Alice" in first.stdout
    assert "[w2] session d1: had 2 messages" in second.stdout
    assert "[w2] assistant: Your name is Alice." in second.stdout


def test_log_format_setting() -> None:
    from vel.errors import ConfigurationError
    from vel.settings import load_settings

    assert load_settings({}).log_format == "text"
    assert load_settings({"VEL_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ConfigurationError, match="VEL_LOG_FORMAT"):
        load_settings({"VEL_LOG_FORMAT": "xml"})


def test_prometheus_rendering() -> None:
    from vel.metrics import render

    text = render({"flushed_messages": 3, "oldest_dirty_age": 0.25, "custom-thing": 1})
    assert "# TYPE vel_flushed_messages_total counter\nvel_flushed_messages_total 3\n" in text
    assert "# TYPE vel_oldest_dirty_age_seconds gauge\nvel_oldest_dirty_age_seconds 0.25\n" in text
    # A figure nobody declared is still typed: a gauge, a value read now.
    assert "# TYPE vel_custom_thing gauge\nvel_custom_thing 1\n" in text


def test_progress_bar_draws_only_on_a_terminal() -> None:
    import io

    from vel.cli._common import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    for stream in (tty, pipe):
        bar = Progress(4, "warming", stream)
        bar.advance()
        bar.advance(3)
        bar.close()
    assert "\rwarming [#######-----------------------] 1/4" in tty.getvalue()
    assert "4/4" in tty.getvalue() and tty.getvalue().endswith("\r\x1b[K")
    assert pipe.getvalue() == ""


async def test_doctor_reports_clock_skew_and_a_stalled_backlog(
    ops: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vel.cli import doctor as doc
    from vel.settings import load_settings

    await ops.store.append("stalled", msgs("nobody flushes me"))  # no flusher runs
    await asyncio.sleep(0.05)
    # This machine's clock 10 s ahead of both servers.
    real_clock = doc._clock
    monkeypatch.setattr(doc, "_clock", lambda: real_clock() + 10)
    report = doc.Report()
    settings = load_settings(ops.env)
    await doc.check_redis(report, settings, max_skew=2.0, max_age=0.01)
    await doc.check_postgres(report, settings, max_skew=2.0)
    failed = {what: text for level, what, text in report.lines if level == "FAIL"}
    assert set(failed) == {"redis clock", "postgres clock", "flusher"}, report.lines
    assert failed["redis clock"].startswith("-10.0") and "NTP" in failed["redis clock"]
    assert failed["postgres clock"].startswith("-10.0")
    assert "1 messages in 1 sessions wait for Postgres" in failed["flusher"]
    assert "vel flusher" in failed["flusher"]


def test_console_script_is_the_same_command() -> None:
    import subprocess

    script = Path(sys.executable).parent / "vel"
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0
    for command in ("migrate", "flusher", "sessions", "warm", "stats", "doctor", "demo"):
        assert command in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["list"],
        ["show", "x"],
        ["export"],
        ["import", "/dev/null"],
        ["delete", "x"],
        ["purge"],
    ],
    ids=lambda a: a[0],
)
async def test_every_sessions_command_with_redis_down_is_one_line(
    ops: Env, args: list[str]
) -> None:
    env = dict(ops.env, REDIS_URL="redis://127.0.0.1:1/0", VEL_OP_TIMEOUT="1")
    result = await ops.vel("sessions", *args, env=env)
    assert "Redis" in one_error_line(result) and "unreachable" in result.stderr


async def test_export_to_an_unwritable_file_is_one_line(ops: Env) -> None:
    result = await ops.vel("sessions", "export", "--out", "/nonexistent/dir/x.jsonl")
    assert "cannot write /nonexistent/dir/x.jsonl" in one_error_line(result)
