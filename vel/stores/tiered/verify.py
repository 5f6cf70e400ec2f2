"""Both tiers checked before a tiered store serves its first call.

In 'redis' mode a turn on a session already in Redis never touches Postgres: with a bad
``POSTGRES_DSN`` (a wrong password, an unknown or unmigrated database, a DSN asyncpg cannot
parse) a worker would acknowledge turns that it can never write behind. So before its first
call a tiered store connects to Postgres once (parse, connect, authenticate, check the schema:
what :meth:`PostgresStore.open` does) and pings Redis. Until that succeeds it acknowledges
nothing:

- a configuration Postgres refuses, or a DSN it cannot use, fails the call with
  ConfigurationError (retrying cannot fix it; the result is kept for :data:`RECHECK_AFTER`
  seconds, so a burst of calls does not hammer the server with refused logins);
- a Postgres that does not answer within :data:`WAIT` seconds is an outage: the call fails
  with StoreUnavailableError and the next call tries again. (A process that has verified once
  keeps serving from Redis through later outages; only the first check needs Postgres.)

Before any of that, when the store is made, :func:`check_same_namespace` refuses tiers that
would serve two namespaces.
"""

from __future__ import annotations

import asyncio
import copy
import time
import weakref

from vel.errors import ConfigurationError, StoreError, StoreUnavailableError
from vel.namespace import place
from vel.stores.postgres import PostgresStore
from vel.stores.redis import RedisStore

# Seconds the first call waits for Postgres to answer the check.
WAIT = 2.0
# Seconds a refused configuration is reported without asking Postgres again.
RECHECK_AFTER = 1.0


def check_same_namespace(hot: RedisStore, cold: PostgresStore) -> None:
    """Refuse tiers of two namespaces: a hot prefix whose schema is not the cold store's
    (unless the cold store's schema was chosen explicitly).

    Raises:
        ConfigurationError: the tiers would serve different namespaces.
    """
    origin = cold.placement.origin
    if not (origin.startswith("key prefix") or origin.startswith("the default prefix")):
        return  # an explicit schema (schema=, DSN search_path, VEL_PG_SCHEMA) is the operator's
    expected = place(schema=None, dsn=None, env_schema=None, prefix=hot.keys.prefix)
    if expected.schema != cold.schema:
        raise ConfigurationError(
            f"the tiers serve two namespaces: Redis prefix {hot.keys.prefix!r} (Postgres "
            f"{expected.describe()}) but Postgres {cold.placement.describe()}; give both the "
            "same namespace (PostgresStore(namespace=...)) or an explicit schema"
        )


class Verification:
    """The one-time check of both tiers (see the module docstring).

    Args:
        hot: the Redis tier.
        cold: the Postgres tier.
        wait: seconds to wait for Postgres (default :data:`WAIT`).
    """

    def __init__(self, hot: RedisStore, cold: PostgresStore, wait: float = WAIT) -> None:
        self.hot = hot
        self.cold = cold
        self.wait = wait
        self.done = False
        self._refused: ConfigurationError | None = None
        self._refused_at = 0.0
        # One check at a time per event loop: a burst of first calls waits for the first.
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )

    async def ensure(self) -> None:
        """Return once both tiers have been verified (at once after the first success).

        Raises:
            ConfigurationError: Postgres refused the configuration (or it cannot be used).
            StoreUnavailableError: Postgres or Redis did not answer in time.
        """
        if self.done:
            return
        lock = self._locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
        async with lock:
            if not self.done:
                await self._check()

    async def _check(self) -> None:
        refused = self._refused
        if refused is not None and time.monotonic() - self._refused_at < RECHECK_AFTER:
            # A fresh copy (same class: AccessDeniedError stays one), not the first
            # exception again, whose traceback would grow with every call.
            raise copy.copy(refused) from refused.__cause__
        try:
            async with asyncio.timeout(self.wait):
                await self.cold.open()
        except ConfigurationError as exc:
            self._refused, self._refused_at = exc, time.monotonic()
            raise
        except TimeoutError as exc:
            raise StoreUnavailableError(
                f"Postgres at {self.cold.where} did not answer within {self.wait:g} s: this "
                "process has not yet checked POSTGRES_DSN, and acknowledges no write until it "
                "has (the next call tries again)"
            ) from exc
        except StoreError as exc:
            raise StoreUnavailableError(
                f"{exc} (this process has not yet checked POSTGRES_DSN, and acknowledges no "
                "write until it has; the next call tries again)"
            ) from exc
        await self.hot.ping()
        self._refused = None
        self.done = True
