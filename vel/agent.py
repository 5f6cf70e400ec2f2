"""Agent: one conversational turn at a time, with session memory.

A turn loads the session's window, calls the model (streaming), runs requested tools until
the model answers in text (or ``policies['max_steps']`` is reached), then commits the turn's
new messages (user, assistant tool calls, tool results, final answer) in **one** atomic
append. Two turns of the same session are serialised by the store's turn lock (across
processes for the database and redis stores), so their messages never interleave.

A turn is stored whole or not at all (:mod:`vel.outcome` states the rule for a cancellation
that arrives during the commit, and how the caller tells which happened). The turn lock is
released whatever ends the turn, before ``run()`` returns or raises.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, nullcontext
from typing import Any, Protocol, runtime_checkable

from vel import events as ev
from vel import tracing
from vel._asyncgens import Owned, stream
from vel._ids import new_ids
from vel._loops import hold_end
from vel._shield import CancelWatch
from vel.bounds import MAX_STEPS, WAIT
from vel.context import ContextManager
from vel.errors import (
    AgentClosedError,
    ConfigurationError,
    InvalidInputError,
    TurnCancelledError,
    VelError,
)
from vel.logs import get_logger
from vel.messages import Message, parse_turn_input, validate_session_id
from vel.metrics.histograms import TURN
from vel.outcome import TurnReceipt, commit, commit_limit, mark
from vel.providers import Provider, make_provider
from vel.steps import Cancelled, CancelToken, Outcome, model_step
from vel.stores import StorageSpec, acquire_store, release_store
from vel.tools import Tool, build_tools

log = get_logger("vel.agent")
# Seconds between aclose()'s looks at the turns still running.
_TURN_POLL = 0.01

DEFAULT_MAX_STEPS = 8


class _Turn(Protocol):
    window: list[Message]

    async def commit(
        self, messages: Sequence[Message], message_ids: Sequence[str] | None = None
    ) -> int: ...


@runtime_checkable
class _LockedTurns(Protocol):
    """A store that reads a turn's window with the turn lock and commits with the unlock
    (the Redis stores), saving the lock's own round trips."""

    def turn(
        self, session_id: str, limit: int | None = None, timeout: float | None = None
    ) -> AbstractAsyncContextManager[_Turn]: ...


class Agent:
    """An LLM agent with session memory.

    Args:
        id: the agent's name (used in logs).
        model: ``{'provider': 'openai', 'model': 'gpt-4o', 'api_key'?: ..., 'base_url'?: ...}``.
        session_storage: ``'memory'`` (default), ``'database'`` (Postgres, ``POSTGRES_DSN``),
            ``'redis'`` (Redis hot tier written behind to Postgres), or a store object.
        context_manager: a :class:`ContextManager` (default: full history).
        system_prompt: sent first at every model call; never stored in the session.
        tools: Python callables, :class:`~vel.tools.Tool` objects or tool spec dicts.
        generation_config: extra chat-completions parameters (``temperature``, ...).
        policies: ``max_steps`` (default 8), ``turn_lock`` (default True),
            ``lock_timeout`` seconds (default 30).

    Cancelling a turn (``asyncio.timeout``, ``wait_for``, ``task.cancel()``, an anyio cancel
    scope, a closed stream): a cancellation before the commit is sent stores nothing; once
    the commit (one atomic append) is sent it completes, the lock is released, then the
    cancellation propagates unchanged and the turn is stored. ``vel.turn_committed(exc)``
    or a ``receipt`` says which (:mod:`vel.outcome`). vel checks for a cancellation before
    each model call, before running tools and before the commit, so no tool runs and nothing
    is committed after a deadline, even when a driver dropped the cancellation (Python 3.11).

    Raises:
        ConfigurationError: unknown provider or storage mode, or missing ``POSTGRES_DSN``.
    """

    def __init__(
        self,
        id: str,
        model: Mapping[str, Any],
        session_storage: StorageSpec = "memory",
        context_manager: ContextManager | None = None,
        system_prompt: str | None = None,
        tools: Sequence[Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        policies: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(id, str) or not id:
            raise ConfigurationError("Agent id must be a non-empty str")
        self.id = id
        self.model = dict(model)
        self.system_prompt = system_prompt
        self.generation_config = dict(generation_config or {})
        self.policies = dict(policies or {})
        self.max_steps = MAX_STEPS.check_int(
            "policies['max_steps']", self.policies.get("max_steps", DEFAULT_MAX_STEPS)
        )
        turn_lock = self.policies.get("turn_lock", True)
        if not isinstance(turn_lock, bool):
            raise ConfigurationError(
                f"policies['turn_lock'] must be True or False, got {turn_lock!r}"
            )
        self.turn_lock = turn_lock
        self.lock_timeout = WAIT.check(
            "policies['lock_timeout']", self.policies.get("lock_timeout", 30.0)
        )
        self.tools: dict[str, Tool] = build_tools(tools)
        self.provider: Provider = make_provider(self.model)
        self.store, self._store_key = acquire_store(session_storage)
        self.ctxmgr = context_manager if context_manager is not None else ContextManager()
        self.ctxmgr.bind(self.store, self.provider)
        # The one-step turn serves the stock window policy; a subclass that loads its own
        # way keeps the separate lock, read and append.
        self._turns = (
            self.store
            if isinstance(self.store, _LockedTurns)
            and type(self.ctxmgr).aprepare_run is ContextManager.aprepare_run
            else None
        )
        # A safety net only: each store call has its own deadline, which ends a commit first.
        self._commit_limit = commit_limit()
        self._closed = False
        # Set once aclose() has stopped waiting for turns and closes what they use.
        self._shut = False
        # Turns running now, by run id: the task driving each (aclose() waits for them).
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._running_guard = threading.Lock()

    def __repr__(self) -> str:
        return f"Agent(id={self.id!r}, model={self.model.get('model')!r}, store={self.store!r})"

    async def __aenter__(self) -> Agent:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self, timeout: float = 30.0) -> None:
        """Close the Agent: wait for its turns still running in other tasks (at most
        ``timeout`` seconds), then drain pending writes and release the model client and
        store. Idempotent.

        Turns started afterwards raise :class:`~vel.errors.AgentClosedError`; so does a turn
        that fails after ``aclose()`` stopped waiting for it (the failure as its cause). A
        turn stream suspended in the task that calls ``aclose()`` is not waited for (only
        that task could resume it).

        Raises:
            InvalidInputError: a timeout out of range.
        """
        limit = WAIT.check("timeout", timeout, InvalidInputError)
        if self._closed:
            return
        self._closed = True
        await self._turns_ended(limit)
        self._shut = True
        await self.ctxmgr.aclose()  # its summariser uses the provider
        await self.provider.aclose()
        await release_store(self.store, self._store_key)

    async def _turns_ended(self, limit: float) -> None:
        # Polled: the turns may run on other threads' loops, which cannot wake this one.
        me = asyncio.current_task()
        deadline = time.monotonic() + limit
        while True:
            with self._running_guard:
                waiting = [t for t in self._running.values() if t is not me and not t.done()]
            if not waiting:
                return
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(_TURN_POLL)
        log.warning(
            "Agent %r closed with %d turn(s) still running after %.1f s; they will fail with "
            "AgentClosedError",
            self.id,
            len(waiting),
            limit,
        )

    # -- public API ----------------------------------------------------------------------

    async def run(
        self,
        input: Mapping[str, Any],
        session_id: str | None = None,
        *,
        cancel_token: CancelToken | None = None,
        receipt: TurnReceipt | None = None,
    ) -> str:
        """Run one turn and return the final answer text (the turn is stored by then).

        Args:
            input: ``{'message': str}`` (the session's history is used and extended) or
                ``{'messages': [...]}`` (the caller owns the history: nothing is loaded or
                stored).
            session_id: the conversation to continue; None for a one-off call.
            cancel_token: setting it before the commit cancels the turn (raises
                TurnCancelledError; nothing is stored).
            receipt: filled in as the turn goes: whether it is stored, whatever ended it.

        Raises:
            InvalidInputError, ProviderError, StoreError, TurnCancelledError; a cancellation
            of the calling task propagates unchanged (``vel.turn_committed(exc)`` tells
            whether the turn was stored first).
        """
        outcome = Outcome(receipt=receipt if receipt is not None else TurnReceipt())
        async for _ in self._turn(input, session_id, cancel_token, outcome):
            pass
        if outcome.error is not None:
            raise outcome.error
        if outcome.cancelled:
            raise TurnCancelledError("the turn was cancelled; the session is unchanged")
        return outcome.text

    @stream
    async def run_stream(
        self,
        input: Mapping[str, Any],
        session_id: str | None = None,
        *,
        cancel_token: CancelToken | None = None,
        receipt: TurnReceipt | None = None,
    ) -> AsyncGenerator[ev.Event, None]:
        """Run one turn, yielding Vercel AI SDK UI stream events (see :mod:`vel.events`).

        Failures are reported as a final ``error`` event rather than raised; a set
        ``cancel_token`` ends the stream with ``abort`` then ``finish``. Closing the
        generator early cancels the turn the same way (no event can follow the close); the
        turn is stored once ``finish`` is yielded, and ``receipt`` says so in every case.
        """
        outcome = Outcome(receipt=receipt if receipt is not None else TurnReceipt())
        # A stream left suspended is closed by the loop's shutdown or the collector, in a
        # task of its own: the loop's end waits for it to release the lock.
        done = hold_end()
        try:
            # aclosing: a consumer's aclose() must end the turn (release its session lock,
            # close the model stream) before it returns, not whenever it is collected. Owned:
            # the loop leaves the turn's own generators to it (vel._asyncgens).
            turn = Owned(self._turn(input, session_id, cancel_token, outcome))
            async with aclosing(turn):
                async for event in turn:
                    yield event
        finally:
            done()

    # -- the turn --------------------------------------------------------------------------

    def _lock(self, session_id: str | None) -> AbstractAsyncContextManager[_Turn | None]:
        if session_id is None or not self.turn_lock or not self.ctxmgr.stores_history:
            return nullcontext()
        if self._turns is not None:
            return self._turns.turn(session_id, self.ctxmgr.max_history, self.lock_timeout)
        return self.store.turn_lock(session_id, self.lock_timeout)

    async def _turn(
        self,
        input: Mapping[str, Any],
        session_id: str | None,
        cancel_token: CancelToken | None,
        outcome: Outcome,
    ) -> AsyncGenerator[ev.Event, None]:
        run_id = uuid.uuid4().hex
        started = time.perf_counter()
        # Not the current span while events are yielded (the consumer runs then): only
        # around the store calls, which nest their load/append spans in it.
        span = tracing.start("turn", session_id if isinstance(session_id, str) else None)
        watch = CancelWatch()
        yield ev.start(run_id)
        open_blocks: list[ev.Event] = []  # closing events for what is open, innermost last
        try:
            if self._closed:
                raise AgentClosedError(f"Agent {self.id!r} is closed (aclose()); make a new one")
            task = asyncio.current_task()
            if task is not None:
                with self._running_guard:
                    self._running[run_id] = task
            new_messages, client_owned = parse_turn_input(input)
            if session_id is not None:
                validate_session_id(session_id)
            keep = session_id is not None and not client_owned and self.ctxmgr.stores_history
            if keep:
                self.ctxmgr.prefetch(run_id, session_id)
            async with tracing.within(self._lock(session_id if keep else None), span) as turn:
                with tracing.current(span):
                    await self.ctxmgr.aprepare_run(
                        run_id,
                        None if client_owned else session_id,
                        new_messages,
                        *([turn.window] if turn is not None else []),
                    )
                for _ in range(self.max_steps):
                    await watch.checkpoint()
                    has_calls = False
                    steps = model_step(
                        self, run_id, session_id, cancel_token, open_blocks, outcome, watch
                    )
                    async with aclosing(steps):
                        async for event in steps:
                            if event["type"] == "tool-input-available":
                                has_calls = True
                            yield event
                    if not has_calls:
                        break
                if keep:
                    assert session_id is not None
                    # The last moment the turn can still be cancelled: nothing is sent yet.
                    await watch.checkpoint()
                    if cancel_token is not None and cancel_token.is_set():
                        raise Cancelled
                    with tracing.current(span):
                        await self._commit(session_id, turn, run_id, outcome.receipt)
                    self.ctxmgr.committed(run_id, outcome.receipt.seq)
            yield ev.finish(outcome.metadata())
        except Cancelled:
            outcome.cancelled = True
            for closing in reversed(open_blocks):
                yield closing
            yield ev.abort()
            yield ev.finish(outcome.metadata())
        except Exception as exc:
            mark(exc, outcome.receipt, session_id)
            if self._shut and not isinstance(exc, AgentClosedError):
                # What failed is the Agent's own closing (its pools, its model client), not
                # the backend the message would name: say so, with the failure as the cause.
                closed = AgentClosedError(f"Agent {self.id!r} closed while this turn ran: {exc}")
                closed.__cause__ = exc
                exc = closed
            # Whatever failed (vel, a backend, a bug), a stream consumer still gets its one
            # terminal event; run() raises the exception.
            outcome.error = exc
            for closing in reversed(open_blocks):
                yield closing
            text = str(exc) if isinstance(exc, VelError) else f"{type(exc).__name__}: {exc}"
            if (metadata := outcome.metadata()) is not None:
                yield ev.message_metadata(metadata)  # tokens were spent all the same
            yield ev.error(text)
        except BaseException as exc:  # a cancellation, or the stream closed: propagates as is
            mark(exc, outcome.receipt, session_id)
            raise
        finally:
            with self._running_guard:
                self._running.pop(run_id, None)
            self.ctxmgr.end_run(run_id)
            TURN.observe(time.perf_counter() - started)
            tracing.end(span, outcome.error)

    async def _commit(
        self, session_id: str, turn: _Turn | None, run_id: str, receipt: TurnReceipt
    ) -> None:
        """Store the turn's messages: once sent, the append completes whatever cancels the
        caller meanwhile; that cancellation is raised after it (the turn is stored)."""
        messages = self.ctxmgr.turn_messages(run_id)
        # Ids made once: a commit interrupted mid-flight is sent again, and stored once.
        ids = new_ids(len(messages))

        async def work() -> int:
            if turn is not None:
                return await turn.commit(messages, ids)
            return await self.store.append(session_id, messages, ids)

        await commit(work, receipt, self._commit_limit, f"commit of session {session_id!r}")
