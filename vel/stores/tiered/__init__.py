"""The two-tier store: Redis serves, Postgres keeps (``session_storage='redis'`` with
``POSTGRES_DSN``).

:mod:`.store` holds :class:`TieredStore` (its catalog calls in :mod:`.catalog`, its purge,
release and resolve in :mod:`.maintenance`), :mod:`.warm` the warm-on-miss single-flight, and
:mod:`.flusher` the write-behind :class:`Flusher` that copies Redis to Postgres.
"""

from vel.stores.tiered.flusher import Flusher
from vel.stores.tiered.store import TieredStore

__all__ = ["Flusher", "TieredStore"]
