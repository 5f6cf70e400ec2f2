"""OpenAI Agents SDK sessions kept by vel: ``Runner.run(agent, input, session=VelSession(...))``.

:class:`VelSession` implements the SDK's ``Session`` protocol (``agents.memory.Session``:
``get_items``, ``add_items``, ``pop_item``, ``clear_session``, ``session_settings``) over any
vel store, so SDK users get vel's storage modes: ``'redis'`` (shared by every worker at Redis
speed, written behind to Postgres, warmed back on a miss), ``'database'`` (Postgres) or
``'memory'``. Items (the Responses API input items the SDK stores: messages,
``function_call``, ``function_call_output``, ``reasoning``, ...) are kept as JSON, exactly as
given, in order; ``add_items`` is one atomic append and ``pop_item`` one atomic step in every
store.

Turns: the SDK reads a session's history when a run starts and writes to it while the run goes
on, but tells a session nothing about where a run ends, so a session cannot hold a lock across a
run by itself. Wrap each run in :meth:`VelSession.turn` (vel's per-session turn lock, shared by
every process) and two runs of one conversation never interleave::

    async with VelSession(user_chat_id, session_storage="redis") as session:
        async with session.turn():
            result = await Runner.run(agent, text, session=session)

Needs the ``agents`` extra (``pip install '<vel's distribution>[agents]'``).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Self

from vel.messages import validate_session_id
from vel.stores import StorageSpec, acquire_store, release_store


def _install_hint() -> str:
    names = importlib.metadata.packages_distributions().get("vel") or ["vel"]
    return f"pip install '{names[0]}[agents]'"


try:
    from agents.memory import SessionSettings
    from agents.memory.session_settings import coerce_session_settings, resolve_session_limit
except ImportError as exc:  # pragma: no cover - exercised by a test that hides the package
    raise ImportError(
        "vel.integrations.openai_agents needs the OpenAI Agents SDK (the 'agents' extra): "
        f"{_install_hint()}"
    ) from exc

if TYPE_CHECKING:
    from agents.items import TResponseInputItem

__all__ = ["VelSession"]

DEFAULT_LOCK_TIMEOUT = 30.0


class VelSession:
    """One conversation of the OpenAI Agents SDK, stored by vel.

    Args:
        session_id: the conversation (any text up to 512 UTF-8 bytes). Derive it from the
            authenticated user on a server: whoever names a session id reads its history.
        session_storage: ``'memory'`` (default; this object only), ``'database'`` (Postgres,
            ``POSTGRES_DSN``), ``'redis'`` (Redis written behind to Postgres) or a store
            object; the named modes share one store per process with vel's Agents.
        session_settings: the SDK's ``SessionSettings`` (or a dict of them); its ``limit`` is
            the default window of :meth:`get_items`.
        lock_timeout: seconds :meth:`turn` waits for another run of this session to end.

    Raises:
        InvalidInputError: a bad session id.
        ConfigurationError: an unknown storage mode, or one missing its settings.
    """

    session_id: str
    session_settings: SessionSettings | None

    def __init__(
        self,
        session_id: str,
        session_storage: StorageSpec = "memory",
        *,
        session_settings: SessionSettings | Mapping[str, Any] | None = None,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        self.session_id = validate_session_id(session_id)
        self.session_settings = (
            SessionSettings()
            if session_settings is None
            else coerce_session_settings(
                session_settings
                if isinstance(session_settings, SessionSettings)
                else dict(session_settings)
            )
        )
        self.lock_timeout = lock_timeout
        self.store, self._store_key = acquire_store(session_storage)
        self._closed = False

    def __repr__(self) -> str:
        return f"VelSession({self.session_id!r}, store={self.store!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Let go of the store (the last user of a named mode closes it, draining what is
        not yet written behind). Idempotent."""
        if self._closed:
            return
        self._closed = True
        await release_store(self.store, self._store_key)

    # -- the SDK's Session protocol ------------------------------------------------------

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The conversation's items, oldest first: the last ``limit`` of them (default:
        ``session_settings.limit``; None or negative: all, 0: none).

        Raises:
            StoreError: the store failed.
        """
        window = resolve_session_limit(limit, self.session_settings)
        if window is not None and window < 0:
            window = None
        items: list[Any] = await self.store.load(self.session_id, window)
        return items

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append ``items`` in order, all or none, in one atomic step.

        Raises:
            InvalidInputError: an item is not a JSON object JSON can carry (nothing stored).
            StoreError: the store failed (nothing stored, or the whole batch).
        """
        if items:
            await self.store.append(self.session_id, list(items))  # type: ignore[arg-type]

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove and return the newest item (None when there is none), atomically.

        Raises:
            StoreError: the store failed.
        """
        item: Any = await self.store.pop(self.session_id)
        return item  # type: ignore[no-any-return]

    async def clear_session(self) -> None:
        """Forget every item of the conversation.

        Raises:
            StoreError: the store failed.
        """
        await self.store.clear(self.session_id)

    # -- vel's turn lock -------------------------------------------------------------------

    def turn(self, timeout: float | None = None) -> AbstractAsyncContextManager[None]:
        """Hold this conversation's turn lock for one ``Runner.run`` (across processes with
        the database and redis storage), so runs of one session never interleave.

        Args:
            timeout: seconds to wait for a running turn (default: ``lock_timeout``).

        Raises:
            SessionLockedError: another turn kept the lock for ``timeout`` seconds.
        """
        wait = self.lock_timeout if timeout is None else timeout
        return self.store.turn_lock(self.session_id, wait)
