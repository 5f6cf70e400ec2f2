"""The Redis tier: :class:`RedisStore`, its locked turns, and what the flusher reads from it.

The store is a facade (:mod:`.store`, its lease calls in :mod:`.leases`, the calls only the
two-tier store makes in :mod:`.tier`) over parts that each hold one responsibility:
:mod:`.url` (REDIS_URL parsed and checked), :mod:`.client` (per-loop client, the one
error mapping), :mod:`.sessions` (session data),
:mod:`.locks` (leases and turns), :mod:`.writebehind` (claims, pending reads, acks),
:mod:`.listing` (the scan). :mod:`.keys` is the one key layout, :mod:`.scripts` the Lua
(with :mod:`.lockscripts`, :mod:`.editscripts` and :mod:`.wbscripts`).
"""

from vel.stores.redis.client import cluster_seeds
from vel.stores.redis.items import Window
from vel.stores.redis.locks import RedisTurn
from vel.stores.redis.scripts import BACKPRESSURE, DAMAGED, LOCKED, MISS, REPLAY, UNSTAGED
from vel.stores.redis.store import RedisStore
from vel.stores.redis.url import CLUSTER_SCHEMES, RedisURL, parse_redis_url
from vel.stores.redis.writebehind import Claim, Conflict, Pending

__all__ = [
    "BACKPRESSURE",
    "CLUSTER_SCHEMES",
    "DAMAGED",
    "LOCKED",
    "MISS",
    "REPLAY",
    "UNSTAGED",
    "Claim",
    "Conflict",
    "Pending",
    "RedisStore",
    "RedisTurn",
    "RedisURL",
    "Window",
    "cluster_seeds",
    "parse_redis_url",
]
