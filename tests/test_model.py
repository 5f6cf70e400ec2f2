"""Model-based test of the two-tier store: a Hypothesis state machine drives appends,
retried appends, pops, flush steps, flusher crashes and stalls, expiry, eviction, clear,
replace and Postgres outages against a real Redis and a real Postgres (through a fault
proxy), and checks after every step that the store agrees with a plain dict of lists.

Mixed modes and retention (DESIGN.md 3.8, 3.9) add: a 'database'-mode writer on the same
schema (refused while the tier lease is live), the tier lease running out while no flush
happens, a flush conflict and its resolution by an operator, and a session's retention
running out in both tiers.

The default run keeps the example count small (seconds); ``scripts/faults`` raises it
(``VEL_FAULTS_FULL=1``).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from checker import postgres_rows, redis_meta, redis_rows
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from servers import sized
from workers import with_port

from vel.errors import InvalidInputError, StoreUnavailableError, TierLeaseError
from vel.stores.postgres import FlushBatch, PostgresStore
from vel.stores.postgres.migrate import migrate
from vel.stores.redis import RedisStore
from vel.stores.redis.client import now_ms
from vel.stores.tiered import TieredStore
from vel.testing.proxy import FaultProxy

pytestmark = pytest.mark.slow

texts = st.text(alphabet="abcdefgh{}:*\n é", min_size=0, max_size=8)
batches = st.lists(texts, min_size=1, max_size=3)


class TwoTierMachine(RuleBasedStateMachine):
    """One example = one fresh set of session ids on the test's schema and prefix."""

    pg_dsn: str
    schema: str
    redis_url: str
    prefix: str
    proxy: FaultProxy
    loop: asyncio.AbstractEventLoop

    def __init__(self) -> None:
        super().__init__()
        tag = uuid.uuid4().hex[:8]
        self.sids = [f"m-{tag}-{i}" for i in range(3)]
        self.model: dict[str, list[str]] = {sid: [] for sid in self.sids}
        # The last append of each session, retryable while its replay record can exist.
        self.last: dict[str, tuple[list[str], list[str], int] | None] = {}
        # What a stalled flusher read, to be written (and acknowledged) later.
        self.stalled: dict[str, Any] = {}
        self.pg_up = True
        # Sessions a 'database'-mode write changed behind the tier while Redis held unflushed
        # writes of them, until resolved: what Postgres holds.
        self.diverged: dict[str, list[str]] = {}
        self.proxy.set_mode("pass")
        hot = RedisStore(self.redis_url, key_prefix=self.prefix, write_behind=True, flush_delay=0)
        cold = PostgresStore(
            with_port(self.pg_dsn, self.proxy.port), schema=self.schema, op_timeout=2.0
        )
        self.store = TieredStore(hot, cold, flusher=False, warm_lease=2.0)
        # A 'database'-mode writer on the same schema (through the same proxy).
        self.db = PostgresStore(
            with_port(self.pg_dsn, self.proxy.port), schema=self.schema, op_timeout=2.0
        )

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.proxy.set_mode("pass")
            self.pg_up = True
            for sid in list(self.diverged):
                self.resolve(self.sids.index(sid), "both")
            assert self.run(self.store.flush(20)), "the backlog did not drain"
            for sid in self.sids:
                rows = self.run(postgres_rows(self.pg_dsn, self.schema, sid))
                assert [r.message["content"] for r in rows] == self.model[sid], sid
                assert [r.seq for r in rows] == list(range(1, len(rows) + 1)), sid
        finally:
            self.run(self.store.aclose())
            self.run(self.db.aclose())

    @initialize()
    def start(self) -> None:
        self.run(self.store.hot.ping())

    def _messages(self, contents: list[str]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": c} for c in contents]

    @rule(i=st.integers(0, 2), contents=batches)
    def append(self, i: int, contents: list[str]) -> None:
        sid = self.sids[i]
        ids = [uuid.uuid4().hex for _ in contents]
        try:
            seq = self.run(self.store.append(sid, self._messages(contents), message_ids=ids))
        except StoreUnavailableError:
            # Only a session that must be warmed from an unreachable Postgres may fail.
            assert not self.pg_up
            assert not self._intact(sid)
            return
        self.model[sid].extend(contents)
        assert seq == len(self.model[sid])
        self.last[sid] = (contents, ids, seq)

    @precondition(lambda self: any(self.last.get(s) for s in self.sids))
    @rule(i=st.integers(0, 2))
    def retry_append(self, i: int) -> None:
        sid = self.sids[i]
        last = self.last.get(sid)
        if last is None:
            return
        contents, ids, seq = last
        again = self.run(self.store.append(sid, self._messages(contents), message_ids=ids))
        assert again == seq, "a retried append was applied twice"

    @rule()
    def flush_step(self) -> None:
        try:
            self.run(self.store.flusher.flush_once())
        except StoreUnavailableError:
            assert not self.pg_up

    @precondition(lambda self: self.pg_up)
    @rule(i=st.integers(0, 2))
    def flusher_crashes_after_commit(self, i: int) -> None:
        """Copy a session to Postgres, then die before the ack (the claim just lapses)."""
        sid = self.sids[i]
        hot = self.store.hot
        (pending,) = self.run(hot.pending([sid], 1000))
        if pending is None or not pending.rows:
            return
        self.run(self._apply(pending))

    def _apply(self, pending: Any) -> Any:
        """apply_flushes of one pending read, as the flusher calls it."""
        batch = FlushBatch(
            pending.session_id,
            pending.gen,
            pending.rows,
            revision=pending.rev,
            written_ms=pending.updated_ms,
            had_postgres_rows=pending.had_postgres_rows,
            truncate=pending.truncate,
        )
        return self.store.cold.apply_flushes([batch], lease=self.store.hot.tier_lease)

    @rule(i=st.integers(0, 2))
    def flusher_stalls(self, i: int) -> None:
        """A flusher reads what a session has to copy, then freezes (see stalled_flush)."""
        sid = self.sids[i]
        (pending,) = self.run(self.store.hot.pending([sid], 1000))
        if pending is not None:
            self.stalled[sid] = pending

    @precondition(lambda self: self.pg_up and self.stalled)
    @rule(i=st.integers(0, 2))
    def stalled_flush_lands(self, i: int) -> None:
        """The frozen flusher wakes up: writes what it read long ago, then acknowledges."""
        pending = self.stalled.pop(self.sids[i], None)
        if pending is None:
            return
        (result,) = self.run(self._apply(pending))
        if result.stale:
            return  # as the flusher: a batch Postgres refused is never acknowledged
        upto = pending.rows[-1][0] if pending.rows else pending.flushed
        self.run(self.store.hot.ack([(pending.session_id, pending.gen, upto)]))

    def _clean(self, sid: str) -> bool:
        meta = self.run(redis_meta(self.redis_url, self.prefix, sid))
        return (
            bool(meta)
            and "seq" in meta
            and meta["flushed"] == meta["seq"]
            and (meta["gen"] == meta["fgen"])
        )

    @rule(i=st.integers(0, 2))
    def expire(self, i: int) -> None:
        """TTL ran out: only a clean session carries one."""
        sid = self.sids[i]
        if not self._clean(sid):
            return
        keys = self.store.hot.keys.session(sid)
        self.run(self.store.hot.call("del", lambda c: c.redis.delete(*keys.data)))
        self.last[sid] = None

    @rule(i=st.integers(0, 2), which=st.integers(0, 2), then=st.none() | batches)
    def evict_one_key(self, i: int, which: int, then: list[str] | None) -> None:
        """volatile-* eviction picks any key with a TTL: one key of a clean session; maybe
        an append follows at once (before any read could notice the damage)."""
        sid = self.sids[i]
        if not self._clean(sid):
            return
        key = self.store.hot.keys.session(sid).data[which]
        self.run(self.store.hot.call("del", lambda c: c.redis.delete(key)))
        self.last[sid] = None
        if then is not None:
            self.append(i, then)

    def _intact(self, sid: str) -> bool:
        """The session is wholly in Redis (a read needs no warm from Postgres)."""
        keys = self.store.hot.keys.session(sid)

        async def check() -> bool:
            client = (await self.store.hot.client()).redis
            seq = await client.hget(keys.meta, "seq")
            return seq is not None and int(seq) == await client.llen(keys.messages)

        return bool(self.run(check()))

    @rule(i=st.integers(0, 2))
    def pop(self, i: int) -> None:
        sid = self.sids[i]
        try:
            item = self.run(self.store.pop(sid))
        except StoreUnavailableError:
            assert not self.pg_up
            assert not self._intact(sid)
            return
        expected = self.model[sid].pop() if self.model[sid] else None
        assert (None if item is None else item["content"]) == expected
        self.last[sid] = None

    @precondition(lambda self: self.pg_up)
    @rule(i=st.integers(0, 2))
    def clear(self, i: int) -> None:
        sid = self.sids[i]
        self.run(self.store.clear(sid))
        self.model[sid] = []
        self.last[sid] = None

    @precondition(lambda self: self.pg_up)
    @rule(i=st.integers(0, 2), contents=st.lists(texts, max_size=3))
    def replace(self, i: int, contents: list[str]) -> None:
        sid = self.sids[i]
        self.run(self.store.replace(sid, self._messages(contents)))
        self.model[sid] = list(contents)
        self.last[sid] = None

    @precondition(lambda self: self.pg_up)
    @rule()
    def postgres_down(self) -> None:
        self.proxy.set_mode("refuse")
        self.pg_up = False

    @precondition(lambda self: not self.pg_up)
    @rule()
    def postgres_up(self) -> None:
        self.proxy.set_mode("pass")
        self.pg_up = True

    # -- mixed modes and retention ----------------------------------------------------------

    def _postgres(self, sql: str, *args: Any) -> Any:
        async def run() -> Any:
            conn = await asyncpg.connect(self.pg_dsn, server_settings={"search_path": self.schema})
            try:
                return await conn.fetch(sql, *args)
            finally:
                await conn.close()

        return self.run(run())

    def _leased(self, sid: str) -> bool:
        rows = self._postgres(
            "SELECT hot_until > now() AND coalesce(expires_at > now(), true) AS leased"
            " FROM vel_session_rows WHERE id = $1",
            sid,
        )
        return bool(rows and rows[0]["leased"])

    @precondition(lambda self: self.pg_up)
    @rule(i=st.integers(0, 2))
    def tier_lease_runs_out(self, i: int) -> None:
        """No flush or warm of the session for a whole tier lease: Postgres stops recording
        that Redis holds it, and a clean copy (its TTL capped by the lease) is gone."""
        sid = self.sids[i]
        self._postgres(
            "UPDATE vel_session_rows SET hot_until = now() - interval '1 second' WHERE id = $1", sid
        )
        keys = self.store.hot.keys.session(sid)
        past = now_ms() - 1000
        if self._clean(sid):
            self.run(self.store.hot.call("del", lambda c: c.redis.delete(*keys.data)))
            self.last[sid] = None
        else:

            async def lapse(c: Any) -> None:
                if await c.redis.exists(keys.meta):
                    await c.redis.hset(keys.meta, "lease", past)

            self.run(self.store.hot.call("lease", lapse))

    @precondition(lambda self: self.pg_up)
    @rule(i=st.integers(0, 2), op=st.sampled_from(["append", "replace", "clear"]), contents=batches)
    def database_mode_write(self, i: int, op: str, contents: list[str]) -> None:
        """A 'database'-mode writer beside the tier: refused while the tier lease is live."""
        sid = self.sids[i]
        leased = self._leased(sid)
        before = [m["content"] for m in self.run(self.db.load(sid))]
        meta = self.run(redis_meta(self.redis_url, self.prefix, sid))
        try:
            if op == "append":
                self.run(self.db.append(sid, self._messages(contents)))
                after = before + contents
            elif op == "replace":
                self.run(self.db.replace(sid, self._messages(contents)))
                after = list(contents)
            else:
                self.run(self.db.clear(sid))
                after = []
        except TierLeaseError:
            assert leased, sid
            return
        assert not leased, f"{sid}: a 'database' write went through a live tier lease"
        alive = "seq" in meta and meta.get("expires", now_ms() + 1) > now_ms()
        held = alive and (meta["flushed"] != meta["seq"] or meta["gen"] != meta["fgen"])
        if sid in self.diverged or held:
            # Redis holds writes Postgres lacks: they must survive as a conflict.
            self.diverged[sid] = after
        else:
            self.model[sid] = after
            self.last[sid] = None

    @precondition(lambda self: self.pg_up and bool(self.diverged))
    @rule(i=st.integers(0, 2), keep=st.sampled_from(["postgres", "both", "redis"]))
    def resolve(self, i: int, keep: str) -> None:
        """An operator resolves a conflict (flushing first, so the conflict is recorded)."""
        sid = self.sids[i]
        if sid not in self.diverged:
            return
        self.run(self.store.flush(10))
        meta = self.run(redis_meta(self.redis_url, self.prefix, sid))
        assert meta.get("conflicted") is not None, (sid, meta)
        # What each tier holds, read raw: Postgres as the 'database' writes left it, and
        # the Redis copy's writes Postgres lacks (after `flushed`, or all after a replace).
        cold = self.run(postgres_rows(self.pg_dsn, self.schema, sid))
        assert [r.content for r in cold] == self.diverged[sid], sid
        hot = self.run(redis_rows(self.redis_url, self.prefix, sid))
        only = hot if meta["gen"] != meta["fgen"] else [r for r in hot if r.seq > meta["flushed"]]
        known = {r.message_id for r in cold}
        try:
            self.run(self.store.resolve(sid, keep))
        except InvalidInputError:
            assert keep == "redis" and meta.get("base", 0) > 0, (sid, meta)
            return
        if keep == "postgres":
            self.model[sid] = [r.content for r in cold]
        elif keep == "both":
            extra = [r.content for r in only if r.message_id not in known]
            self.model[sid] = [r.content for r in cold] + extra
        del self.diverged[sid]
        self.last[sid] = None

    @precondition(lambda self: self.pg_up)
    @rule(i=st.integers(0, 2))
    def retention_ends(self, i: int) -> None:
        """The session's retention runs out: it reads empty in both tiers at once, whatever
        either held (dirty, clean or in conflict), and starts afresh at its next write."""
        sid = self.sids[i]
        self._postgres(
            "UPDATE vel_session_rows SET expires_at = now() - interval '1 second' WHERE id = $1",
            sid,
        )
        keys = self.store.hot.keys.session(sid)
        past = now_ms() - 1000

        async def expire(c: Any) -> None:
            if await c.redis.exists(keys.meta):
                await c.redis.hset(keys.meta, "expires", past)

        self.run(self.store.hot.call("expire", expire))
        self.model[sid] = []
        self.diverged.pop(sid, None)
        self.last[sid] = None

    @invariant()
    def histories_match_the_model(self) -> None:
        for sid in self.sids:
            if not self.pg_up and not self._intact(sid):
                continue  # a read would have to warm from the unreachable Postgres
            got = [m["content"] for m in self.run(self.store.load(sid))]
            assert got == self.model[sid], (sid, got, self.model[sid])

    @invariant()
    def dirty_sessions_carry_no_ttl(self) -> None:
        for sid in self.sids:
            meta = self.run(redis_meta(self.redis_url, self.prefix, sid))
            if "seq" not in meta or "conflict" in meta:
                continue  # a conflict has its own invariant below
            if meta["flushed"] != meta["seq"] or meta["gen"] != meta["fgen"]:
                assert meta["pttl"] == -1, (sid, meta)
                assert meta["due"] is not None, (sid, meta)

    @invariant()
    def conflicts_are_visible_and_keep_no_ttl(self) -> None:
        for sid in self.sids:
            meta = self.run(redis_meta(self.redis_url, self.prefix, sid))
            if "conflict" in meta:
                assert sid in self.diverged, (sid, meta)
                assert meta["pttl"] == -1, (sid, meta)
                assert meta["conflicted"] is not None and meta["due"] is None, (sid, meta)


def test_two_tier_store_against_a_model(pg_dsn: str, redis_url: str, key_prefix: str) -> None:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    loop = asyncio.new_event_loop()
    target = urlsplit(pg_dsn)
    proxy = FaultProxy(target.hostname or "127.0.0.1", target.port or 5432).start()
    loop.run_until_complete(migrate(pg_dsn, schema=schema))
    TwoTierMachine.pg_dsn = pg_dsn
    TwoTierMachine.schema = schema
    TwoTierMachine.redis_url = redis_url
    TwoTierMachine.prefix = key_prefix
    TwoTierMachine.proxy = proxy
    TwoTierMachine.loop = loop
    try:
        run_state_machine_as_test(
            TwoTierMachine,
            settings=settings(
                max_examples=int(sized(12, 150)),
                stateful_step_count=int(sized(25, 60)),
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            ),
        )
    finally:
        proxy.stop()

        async def drop() -> None:
            conn = await asyncpg.connect(pg_dsn)
            try:
                await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            finally:
                await conn.close()

        loop.run_until_complete(drop())
        loop.close()
