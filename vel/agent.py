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
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, aclosing, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from vel import events as ev
from vel import tracing
from vel._ids import new_ids
from vel._shield import CancelWatch
from vel.bounds import MAX_STEPS, WAIT
from vel.context import ContextManager
from vel.errors import ConfigurationError, InvalidInputError, TurnCancelledError, VelError
from vel.messages import (
    Message,
    TextCleaner,
    clean_text,
    encode_message,
    encode_messages,
    validate_message,
    validate_session_id,
)
from vel.metrics.histograms import TURN
from vel.outcome import TurnReceipt, commit, commit_limit, mark
from vel.providers import Provider, TextChunk, ToolCallChunk, UsageChunk, make_provider
from vel.stores import StorageSpec, acquire_store, release_store
from vel.tools import Tool, build_tools, error_text, tool_result

DEFAULT_MAX_STEPS = 8


class CancelToken(Protocol):
    """Anything with ``is_set()`` and ``wait()``, such as ``asyncio.Event``."""

    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


class _Cancelled(Exception):
    pass


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


@dataclass
class _Outcome:
    text: str = ""
    error: BaseException | None = None
    cancelled: bool = False
    receipt: TurnReceipt = field(default_factory=TurnReceipt)
    usage: ev.Usage | None = None  # summed over the turn's model calls

    def metadata(self) -> dict[str, Any] | None:
        """What the stream's client gets as ``message.metadata``."""
        return None if self.usage is None else {"usage": self.usage}


@dataclass
class _PendingCall:
    call_id: str
    name: str
    arguments: str = ""


@dataclass
class _Step:
    text: list[str] = field(default_factory=list)
    calls: dict[int, _PendingCall] = field(default_factory=dict)
    text_block: str | None = None
    # Model text is stored, never refused: NUL and split or lone surrogates are cleaned as
    # they stream, so the deltas a client sees are the text that is stored.
    cleaner: TextCleaner = field(default_factory=TextCleaner)


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

    def __repr__(self) -> str:
        return f"Agent(id={self.id!r}, model={self.model.get('model')!r}, store={self.store!r})"

    async def __aenter__(self) -> Agent:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Drain pending writes and release the model client and store. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await self.ctxmgr.aclose()  # its summariser uses the provider
        await self.provider.aclose()
        await release_store(self.store, self._store_key)

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
        outcome = _Outcome(receipt=receipt if receipt is not None else TurnReceipt())
        async for _ in self._turn(input, session_id, cancel_token, outcome):
            pass
        if outcome.error is not None:
            raise outcome.error
        if outcome.cancelled:
            raise TurnCancelledError("the turn was cancelled; the session is unchanged")
        return outcome.text

    async def run_stream(
        self,
        input: Mapping[str, Any],
        session_id: str | None = None,
        *,
        cancel_token: CancelToken | None = None,
        receipt: TurnReceipt | None = None,
    ) -> AsyncIterator[ev.Event]:
        """Run one turn, yielding Vercel AI SDK UI stream events (see :mod:`vel.events`).

        Failures are reported as a final ``error`` event rather than raised; a set
        ``cancel_token`` ends the stream with ``abort`` then ``finish``. Closing the
        generator early cancels the turn the same way (no event can follow the close); the
        turn is stored once ``finish`` is yielded, and ``receipt`` says so in every case.
        """
        outcome = _Outcome(receipt=receipt if receipt is not None else TurnReceipt())
        # aclosing: a consumer's aclose() must end the turn (release its session lock, close
        # the model stream) before it returns, not whenever the generator is collected.
        async with aclosing(self._turn(input, session_id, cancel_token, outcome)) as turn:
            async for event in turn:
                yield event

    # -- the turn --------------------------------------------------------------------------

    def _parse_input(self, input: Mapping[str, Any]) -> tuple[list[Message], bool]:
        if not isinstance(input, Mapping):
            raise InvalidInputError("input must be {'message': ...} or {'messages': [...]}")
        if "messages" in input:
            messages = input["messages"]
            if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
                raise InvalidInputError("input['messages'] must be a list of message dicts")
            checked = [validate_message(m) for m in messages]
            # Refuse what cannot be sent as JSON here, with a typed error, not mid-request.
            encode_messages(checked)
            return checked, True
        if "message" in input:
            content = input["message"]
            if not isinstance(content, (str, list)):
                raise InvalidInputError("input['message'] must be a str (or content parts)")
            message: Message = {"role": "user", "content": content}
            encode_message(message)  # stored at the end of the turn: refuse it before the model
            return [message], False
        raise InvalidInputError("input must be {'message': ...} or {'messages': [...]}")

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
        outcome: _Outcome,
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
            new_messages, client_owned = self._parse_input(input)
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
                    steps = self._step(
                        run_id, session_id, cancel_token, open_blocks, outcome, watch
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
                        raise _Cancelled
                    with tracing.current(span):
                        await self._commit(session_id, turn, run_id, outcome.receipt)
                    self.ctxmgr.committed(run_id, outcome.receipt.seq)
            yield ev.finish(outcome.metadata())
        except _Cancelled:
            outcome.cancelled = True
            for closing in reversed(open_blocks):
                yield closing
            yield ev.abort()
            yield ev.finish(outcome.metadata())
        except Exception as exc:
            mark(exc, outcome.receipt, session_id)
            # Whatever failed (vel, a backend, a bug), a stream consumer still gets its one
            # terminal event; run() re-raises the original exception.
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

    async def _step(
        self,
        run_id: str,
        session_id: str | None,
        cancel_token: CancelToken | None,
        open_blocks: list[ev.Event],
        outcome: _Outcome,
        watch: CancelWatch,
    ) -> AsyncGenerator[ev.Event, None]:
        yield ev.start_step()
        open_blocks.append(ev.finish_step())
        messages = self.ctxmgr.messages_for_llm(run_id, session_id)
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        step = _Step()
        tools = [t.openai_schema() for t in self.tools.values()]
        chunks = self.provider.stream(messages, tools, self.generation_config)
        try:
            while True:
                chunk = await _until_cancelled(anext(chunks, None), cancel_token)
                if chunk is None:
                    break
                if isinstance(chunk, TextChunk):
                    if step.text_block is None:
                        step.text_block = uuid.uuid4().hex
                        yield ev.text_start(step.text_block)
                        open_blocks.append(ev.text_end(step.text_block))
                    piece = step.cleaner.feed(chunk.text)
                    if piece:
                        step.text.append(piece)
                        yield ev.text_delta(step.text_block, piece)
                elif isinstance(chunk, ToolCallChunk):
                    call = step.calls.get(chunk.index)
                    if call is None:
                        call = _PendingCall(
                            clean_text(chunk.call_id or f"call_{uuid.uuid4().hex[:24]}"),
                            clean_text(chunk.name or ""),
                        )
                        step.calls[chunk.index] = call
                        yield ev.tool_input_start(call.call_id, call.name)
                        open_blocks.append(ev.tool_output_error(call.call_id, "turn ended"))
                    if chunk.arguments:
                        call.arguments += chunk.arguments
                        yield ev.tool_input_delta(call.call_id, chunk.arguments)
                elif isinstance(chunk, UsageChunk):
                    outcome.usage = ev.add_usage(outcome.usage, ev.usage(chunk.usage))
        finally:
            await chunks.aclose()
        if step.text_block is not None:
            piece = step.cleaner.flush()
            if piece:
                step.text.append(piece)
                yield ev.text_delta(step.text_block, piece)
            open_blocks.remove(ev.text_end(step.text_block))
            yield ev.text_end(step.text_block)
        text = "".join(step.text)
        ordered = [step.calls[i] for i in sorted(step.calls)]
        for c in ordered:  # model output: stored, so made storable (ids and names already are)
            c.arguments = clean_text(c.arguments)
        assistant: Message = {"role": "assistant", "content": text or None}
        if ordered:
            assistant["tool_calls"] = [
                {
                    "id": c.call_id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in ordered
            ]
        else:
            assistant["content"] = text
        self.ctxmgr.record(run_id, [assistant])
        if ordered:
            parsed: list[Any] = []
            for call in ordered:
                try:
                    value = json.loads(call.arguments) if call.arguments.strip() else {}
                except json.JSONDecodeError:
                    value = call.arguments
                parsed.append(value)
                yield ev.tool_input_available(call.call_id, call.name, value)
            await watch.checkpoint()  # no tool runs after a deadline, even one a driver dropped
            results = await _until_cancelled(
                asyncio.gather(
                    *(self._call_tool(c, a) for c, a in zip(ordered, parsed, strict=True))
                ),
                cancel_token,
            )
            tool_messages: list[Message] = []
            for call, (ok, value, content) in zip(ordered, results, strict=True):
                open_blocks.remove(ev.tool_output_error(call.call_id, "turn ended"))
                if ok:
                    yield ev.tool_output_available(call.call_id, value)
                else:
                    yield ev.tool_output_error(call.call_id, content)
                    content = f"Error: {content}"
                tool_messages.append(
                    {"role": "tool", "tool_call_id": call.call_id, "content": content}
                )
            self.ctxmgr.record(run_id, tool_messages)
        open_blocks.remove(ev.finish_step())
        yield ev.finish_step()
        outcome.text = text

    async def _call_tool(self, call: _PendingCall, arguments: Any) -> tuple[bool, Any, str]:
        """``(ok, output, text)``: the event's output and the tool message's text, or
        ``(False, None, error)``. A tool's failure (bad arguments, an exception, a result
        that is not JSON) is reported to the model, never raised out of the turn."""
        tool = self.tools.get(call.name)
        if tool is None:
            return False, None, f"unknown tool {call.name!r}"
        if not isinstance(arguments, dict):
            return False, None, f"tool arguments are not a JSON object: {call.arguments[:200]!r}"
        try:
            output, text = tool_result(await tool.call(arguments))
        except Exception as exc:
            return False, None, error_text(exc)
        return True, output, text


async def _until_cancelled(awaitable: Any, cancel_token: CancelToken | None) -> Any:
    """Await ``awaitable`` unless ``cancel_token`` is set first (then raise _Cancelled)."""
    if cancel_token is None:
        return await awaitable
    if cancel_token.is_set():
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        raise _Cancelled
    work = asyncio.ensure_future(awaitable)
    waiter = asyncio.ensure_future(cancel_token.wait())
    try:
        await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        # Our task was cancelled: the work must end first, since the caller goes on to close
        # the generator it may still be iterating.
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise
    finally:
        waiter.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with suppress(asyncio.CancelledError, Exception):
        await work
    raise _Cancelled
