"""TieredStore: Redis serves every read and write; Postgres is the durable record.

A session missing from Redis (never loaded, expired, evicted, or lost by Redis) is warmed
from Postgres once across all processes, window first (see :mod:`vel.stores.tiered.warm`);
a read reaching below what Redis holds takes the older messages from Postgres, from the
history the copy was loaded from (DESIGN.md 3.10). Appends are one Lua script; the flusher
copies them to Postgres behind the caller's back (see :mod:`vel.stores.tiered.flusher`).
Clear and replace bump the session's generation, which Postgres also records, so a flush that
began before a clear can never write the old messages back (3.5). Every warm and flush renews
the session's tier lease in Postgres, which keeps 'database'-mode writers off it while Redis
may hold it; a flush that finds Postgres changed anyway becomes a conflict, resolved by an
operator (:mod:`vel.stores.tiered.conflicts`, 3.8). Retention counts from the last write in
both tiers (3.9).

The store's listing and catalog calls are the mixin
:class:`~vel.stores.tiered.catalog.TieredCatalog`, its purge, release and resolve the mixin
:class:`~vel.stores.tiered.maintenance.TierMaintenance`.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from vel import metrics
from vel._sync import in_helper_thread
from vel.bounds import LEASE, WAIT, limit_arg, wait_arg
from vel.errors import ConfigurationError, StoreError, StoreTimeoutError, VelError
from vel.instrument import observed
from vel.logs import get_logger
from vel.messages import Message, decode_texts, validate_session_id
from vel.metrics.histograms import APPEND, LOAD
from vel.settings import Settings, load_settings
from vel.stores.postgres import PostgresStore
from vel.stores.redis import MISS, UNSTAGED, RedisStore, RedisTurn, Window
from vel.stores.redis.client import now_ms
from vel.stores.redis.scripts import OLDER
from vel.stores.tiered.catalog import TieredCatalog
from vel.stores.tiered.embedded import EmbeddedFlusher
from vel.stores.tiered.flusher import Flusher
from vel.stores.tiered.maintenance import TierMaintenance
from vel.stores.tiered.verify import Verification, check_same_namespace
from vel.stores.tiered.warm import FULL_WARM_MAX, SEED_CHUNK, WARM_MIN, Warmer
from vel.totals import Totals

log = get_logger("vel.tiered")


class TieredStore(TieredCatalog, TierMaintenance):
    """Redis hot tier written behind to Postgres (``session_storage='redis'``).

    Args:
        hot: a RedisStore with ``write_behind=True``.
        cold: a PostgresStore.
        flusher: run an embedded flusher task in this process (default: ``VEL_FLUSHER``,
            which defaults to ``embedded``); False when a standalone ``vel flusher`` runs.
        warm_lease: seconds a process that died while loading a session from Postgres
            keeps others from loading it (renewed while it loads); default ``VEL_WARM_LEASE``.
        flush_lease: seconds a dead flusher's claim keeps others from flushing its sessions
            (renewed while it flushes); default ``VEL_FLUSH_LEASE``.
        drain_timeout: seconds :meth:`aclose` spends flushing what is still dirty.
    """

    def __init__(
        self,
        hot: RedisStore,
        cold: PostgresStore,
        *,
        flusher: bool | None = None,
        warm_lease: float | None = None,
        flush_lease: float | None = None,
        drain_timeout: float = 10.0,
        settings: Settings | None = None,
    ) -> None:
        if not isinstance(hot, RedisStore) or not hot.write_behind:
            raise ConfigurationError("TieredStore needs a RedisStore(write_behind=True) as hot")
        if not isinstance(cold, PostgresStore):
            raise ConfigurationError("TieredStore needs a PostgresStore as cold")
        check_same_namespace(hot, cold)
        if flusher is not None and not isinstance(flusher, bool):
            raise ConfigurationError(f"flusher must be True, False or None, got {flusher!r}")
        if hot.retention_ttl != cold.retention_ttl:
            raise ConfigurationError(
                f"the Redis tier's retention ({hot.retention_ttl} s) differs from the "
                f"Postgres tier's ({cold.retention_ttl} s): give both the same retention_ttl"
            )
        s = settings or load_settings()
        self.hot = hot
        self.cold = cold
        self.embedded_flusher = (s.flusher == "embedded") if flusher is None else flusher
        self.flusher = Flusher(
            hot,
            cold,
            lease=s.flush_lease if flush_lease is None else LEASE.check("flush_lease", flush_lease),
            sweep_interval=s.flush_interval,
        )
        self.warm_lease = (
            s.warm_lease if warm_lease is None else LEASE.check("warm_lease", warm_lease)
        )
        self.drain_timeout = WAIT.check("drain_timeout", drain_timeout)
        self.counters: dict[str, float] = {
            "warm_loads_ok": 0,
            "warm_loads_exists": 0,
            "warm_loads_stale": 0,
            "warm_waits": 0,
            "postgres_loads": 0,
            # Reads below what a partial Redis copy holds, served from Postgres.
            "older_reads": 0,
            "older_reads_stale": 0,
            "redis_misses": 0,
            "redis_hits": 0,
            # Sessions Postgres had but Redis no longer did: expired, evicted or lost.
            "evictions_seen": 0,
        }
        metrics.track(self, self.counters, None)
        self._warmer = Warmer(hot, cold, lease=self.warm_lease, counters=self.counters)
        # Both tiers checked before the first call is served (a bad POSTGRES_DSN fails it).
        self._verification = Verification(hot, cold)
        # Reported to Redis at most once a second, so `vel stats` sees every worker's.
        self.totals = Totals(hot, [self.counters, hot.counters])
        self._embedded = EmbeddedFlusher(
            hot,
            self.flusher,
            enabled=self.embedded_flusher,
            reports=[self.totals, self.flusher.totals],
        )

    def __repr__(self) -> str:
        return f"TieredStore(hot={self.hot!r}, cold={self.cold!r})"

    async def __aenter__(self) -> TieredStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- warm ------------------------------------------------------------------------------

    async def warm(self, session_id: str, window: int | None = None) -> None:
        """Make sure ``session_id`` is in Redis (single-flight per process and across them),
        with at least its last ``window`` messages (None: up to FULL_WARM_MAX)."""
        await self._verification.ensure()
        await self._warmer.warm(session_id, window)

    # -- SessionStore ----------------------------------------------------------------------

    async def load(self, session_id: str, limit: int | None = None) -> list[Message]:
        with observed(LOAD, "load", session_id):
            return await self._load(session_id, limit)

    async def _load(self, session_id: str, limit: int | None) -> list[Message]:
        validate_session_id(session_id)
        limit = limit_arg(limit)
        await self._verification.ensure()
        window = await self._read(session_id, limit)
        self._count_hit()
        return await self._complete(session_id, window, limit)

    async def _read(self, session_id: str, limit: int | None) -> Window:
        """The window from Redis, warming the session first when it is missing."""
        for _ in range(5):
            window = await self.hot.read(session_id, limit)
            if window is not None:
                return window
            await self._miss(session_id, limit)
        raise StoreTimeoutError(f"session {session_id!r} kept vanishing from Redis while read")

    async def _complete(self, session_id: str, window: Window, limit: int | None) -> list[Message]:
        """The window with the older messages a partial copy lacks (see :meth:`_older`)."""
        for _ in range(5):
            messages = await self._older(session_id, window, limit)
            if messages is not None:
                return messages
            window = await self._read(session_id, limit)
        raise StoreError(
            f"session {session_id!r}: the older part of its history kept changing in Postgres "
            "behind the Redis tier (see `vel sessions conflicts`)"
        )

    async def _older(
        self, session_id: str, window: Window, limit: int | None
    ) -> list[Message] | None:
        """The window completed with the older messages a partial copy lacks, read from the
        history the copy was loaded from (None: that history is gone, read Redis again).

        A window of at most FULL_WARM_MAX messages is then prepended to the copy, so the
        next read of it is served from Redis alone.
        """
        want = window.seq if limit is None else min(limit, window.seq)
        have = len(window.messages)
        if have >= want:
            return window.messages
        first, last = window.seq - want + 1, window.seq - have
        rows = await self.cold.load_range(session_id, first, last, window.gen, window.rev, now_ms())
        if rows is None:
            self.counters["older_reads_stale"] += 1
            return None
        self.counters["older_reads"] += 1
        if want <= FULL_WARM_MAX:
            base = last
            for end in range(len(rows), 0, -SEED_CHUNK):
                base = await self.hot.extend(
                    session_id, window.gen, window.rev, base, rows[max(0, end - SEED_CHUNK) : end]
                )
                if base < 0:
                    break
        return decode_texts(text for _, _, text in rows) + window.messages

    async def append(
        self,
        session_id: str,
        messages: Sequence[Message],
        message_ids: Sequence[str] | None = None,
    ) -> int:
        validate_session_id(session_id)
        items = self.hot.encode(messages, message_ids)
        if not items:
            await self.load(session_id, 0)
            return await self.hot.last_seq(session_id)
        await self._verification.ensure()
        self._embedded.ensure()
        first_id = items[0].partition("\n")[0]
        on_miss = functools.partial(self._miss, session_id, 0)
        self._embedded.note_write(session_id)
        with observed(APPEND, "append", session_id):
            return await self.hot.append_items(session_id, items, first_id, on_miss)

    def _count_hit(self) -> None:
        self.counters["redis_hits"] += 1
        if not in_helper_thread():
            self.totals.maybe_publish()

    async def _miss(self, session_id: str, window: int | None) -> None:
        """Redis did not have the session: count it and warm it from Postgres."""
        self.counters["redis_misses"] += 1
        await self.warm(session_id, window)

    async def _replace(
        self,
        session_id: str,
        messages: Sequence[Message],
        message_ids: Sequence[str] | None = None,
    ) -> int:
        validate_session_id(session_id)
        items = self.hot.encode(messages, message_ids, whole=True)
        await self._verification.ensure()
        self._embedded.ensure()
        self._embedded.note_write(session_id)
        for _ in range(5):
            gen = await self.hot.try_replace(session_id, items)
            if gen == MISS:
                await self.warm(session_id, 0)
            elif gen != UNSTAGED:
                return gen
        raise StoreTimeoutError(f"session {session_id!r} kept vanishing from Redis")

    async def replace(
        self,
        session_id: str,
        messages: Sequence[Message],
        message_ids: Sequence[str] | None = None,
    ) -> None:
        """Replace the whole history (any length up to ``MAX_MESSAGES_PER_REPLACE``: a long
        one is staged in Redis in chunks and swapped in by one script, so readers see the old
        history or the new one whole); ``message_ids`` kept when given (an import)."""
        await self._replace(session_id, messages, message_ids)

    async def pop(self, session_id: str) -> Message | None:
        """Remove and return the newest message in one Redis script (warming the session
        first if Redis lacks it); Postgres drops it with the next flush, and no flush that
        read it before can write it back (see :mod:`vel.stores.redis.scripts`)."""
        validate_session_id(session_id)
        await self._verification.ensure()
        self._embedded.ensure()
        for _ in range(5):
            code, message = await self.hot.try_pop(session_id)
            if code == MISS:
                await self._miss(session_id, 1)
            elif code == OLDER:
                # The copy holds none of its messages (all popped down to its base): read the
                # newest older ones into it first.
                window = await self._read(session_id, 0)
                await self._older(session_id, window, WARM_MIN)
            else:
                return message
        raise StoreTimeoutError(f"session {session_id!r} kept vanishing from Redis")

    async def clear(self, session_id: str) -> None:
        await self._replace(session_id, [])

    def turn_lock(
        self, session_id: str, timeout: float | None = None
    ) -> AbstractAsyncContextManager[None]:
        return self.hot.turn_lock(session_id, timeout)

    @asynccontextmanager
    async def turn(
        self, session_id: str, limit: int | None = None, timeout: float | None = None
    ) -> AsyncIterator[RedisTurn]:
        """A locked turn: window read with the lock, commit with the unlock (see
        :meth:`RedisStore.turn`); a session missing from Redis is warmed first."""
        validate_session_id(session_id)
        await self._verification.ensure()
        self._embedded.ensure()
        on_miss = functools.partial(self._miss, session_id, limit)
        async with self.hot.turn(session_id, limit, timeout, on_miss) as turn:
            self._count_hit()  # the window came from Redis (after any warm)
            self._embedded.note_write(session_id)  # the turn may commit
            if turn.view is not None:
                turn.window = await self._complete(session_id, turn.view, limit)
            yield turn

    async def stats(self) -> dict[str, float]:
        result: dict[str, float] = {}
        result.update(await self.hot.stats())
        result.update(self.flusher.counters)
        result.update(self.counters)
        for name, value in (await self.cold.stats()).items():
            result[f"postgres_{name}"] = value
        return result

    # -- lifecycle -------------------------------------------------------------------------

    async def flush(self, timeout: float | None = None) -> bool:
        """Write everything unflushed to Postgres now; True when nothing is left.

        Args:
            timeout: seconds to keep trying (default ``drain_timeout``).

        Raises:
            InvalidInputError: a timeout out of range.
        """
        checked = wait_arg(timeout)
        return await self.flusher.drain(self.drain_timeout if checked is None else checked)

    async def aclose(self) -> None:
        """Stop the embedded flusher, drain what is dirty (bounded), close both tiers.

        Never raises for a backend or configuration failure (it is logged): both tiers are
        closed whatever happened before, the helper loop's connections included.
        """
        try:
            await self._wind_down()
        except VelError as exc:
            log.warning("closing: %s", exc)
        except Exception:
            log.exception("closing: winding down failed")
        finally:
            await self._close_tiers()

    async def _close_tiers(self) -> None:
        for tier in (self.hot, self.cold):
            try:
                await tier.aclose()
            except VelError as exc:
                log.warning("closing %r: %s", tier, exc)
            except Exception:
                log.exception("closing %r failed", tier)

    async def _wind_down(self) -> None:
        """Stop the embedded flusher, drain this process's writes, send the last counters."""
        drained = await self._embedded.stop(self.drain_timeout)
        if not in_helper_thread():
            # A last report only when Redis just answered the drain: with Redis gone it
            # would cost a timeout.
            await self.totals.finish(final=drained)
            await self.flusher.totals.finish(final=drained)
