"""Resources bound to the event loop that created them, and work done when a loop ends.

asyncpg pools and redis.asyncio connections only work on the loop that made them. Agents are
often built once and driven from several loops (``asyncio.run`` called twice, or the plain
``agent.ctxmgr.*`` calls, which run on vel's helper thread), so each loop gets its own
resource, created on first use, and closed when that loop ends (:func:`at_loop_end`), whether
or not anyone called ``aclose()``: a worker that runs each job in a fresh loop keeps a bounded
number of connections. A forked child forgets the parent's (see vel._fork).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Generic, TypeVar

from vel import _fork
from vel._asyncgens import tracked, untracked
from vel._sync import blocked_in_run_sync, helper_loop
from vel.errors import ConfigurationError
from vel.logs import get_logger

T = TypeVar("T")
OwnerT = TypeVar("OwnerT")
log = get_logger("vel")

# What runs when a loop ends, in two stages: first what still uses the loop's resources (a
# bounded drain of unflushed writes), then what closes them (pools, clients). Before both,
# the loop's end waits for the work that holds it (hold_end: a turn stream still closing).
DRAIN, CLOSE = 0, 1
# Seconds each piece of loop-end work may take (a process exits right after): a safety net
# over work that bounds itself within it. The write-behind drain takes 0.4 s, the shielded
# hand-back of the claims it held 0.25 s more, its report 0.1 s: cutting it from outside as
# well cancelled redis-py twice, which then left a pipeline unclosed ("Unclosed Pipeline
# client" on a loaded machine).
_LIMITS = (0.8, 1.0)
# Seconds the loop's end waits, in all, for the work that holds it.
_HELD_LIMIT = 1.0
# Pieces of work per stage at the most (work that registered work forever must not hang it).
_MAX_WORK = 1000
# The loop-end work of each running loop that has any; weak, so that a loop nobody shut down
# properly can still be collected.
_ends: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopEnd] = weakref.WeakKeyDictionary()


class _LoopEnd:
    """One loop's end-of-loop work: per stage, ``owner -> work(owner)``, the owners weakly
    held (work for an owner that is gone is skipped), and the async generator whose
    finalization runs it."""

    def __init__(self) -> None:
        self.stages: tuple[
            weakref.WeakKeyDictionary[Any, Callable[[Any], Awaitable[None]]], ...
        ] = (
            weakref.WeakKeyDictionary(),
            weakref.WeakKeyDictionary(),
        )
        self.holds: set[asyncio.Future[None]] = set()
        # Streams collected while suspended whose close has not run (close_collected).
        self.unclosed: set[AsyncGenerator[Any, Any]] = set()
        self.closing: set[asyncio.Task[None]] = set()
        self.hook = _run_at_end(self)
        # Started here, synchronously: the loop's first-iteration hook registers it (even
        # inside an Owned step: tracked()), and the loop's shutdown_asyncgens() (which
        # asyncio.run calls after cancelling the remaining tasks, before closing the loop)
        # finalizes it, running its ``finally``.
        with tracked(), contextlib.suppress(StopIteration):
            self.hook.asend(None).send(None)


async def _run_at_end(end: _LoopEnd) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        loop = asyncio.get_running_loop()
        # The work below uses async generators (context managers) after the loop's
        # shutdown_asyncgens() began; they run to their end here, so the loop need not track
        # them (it would only warn that they came too late).
        with untracked():
            try:
                await _end_work(end)
            finally:
                # Only now: what the work itself registers (a pool first needed by the drain)
                # joins this end's stages instead of starting an end that would never run.
                _ends.pop(loop, None)


async def _end_work(end: _LoopEnd) -> None:
    if end.unclosed:
        # Collected streams whose closing task asyncio.run cancelled before it began.
        await asyncio.wait(
            [asyncio.ensure_future(_close(end, agen)) for agen in list(end.unclosed)],
            timeout=_HELD_LIMIT,
        )
    if end.holds:
        # A turn stream the loop's shutdown (or the collector) is closing right now, in a
        # task of its own: its lock release needs the pools closed below.
        await asyncio.wait(list(end.holds), timeout=_HELD_LIMIT)
    for stage, limit in zip(end.stages, _LIMITS, strict=True):
        # Until the stage is empty: work may register more (the drain opens a pool, whose
        # close joins the next stage), each owner once.
        for _ in range(_MAX_WORK):
            try:
                owner, work = stage.popitem()
            except KeyError:
                break
            try:
                async with asyncio.timeout(limit):
                    await work(owner)
            except TimeoutError:
                log.warning(
                    "event loop end: %s's work did not finish within %g s (cut off)",
                    type(owner).__name__,
                    limit,
                )
            except Exception as exc:
                log.warning("event loop end: %s's work failed: %r", type(owner).__name__, exc)


def _running_end() -> _LoopEnd:
    loop = asyncio.get_running_loop()
    end = _ends.get(loop)
    if end is None:
        end = _ends[loop] = _LoopEnd()
    return end


def at_loop_end(
    owner: OwnerT, work: Callable[[OwnerT], Awaitable[None]], stage: int = CLOSE
) -> None:
    """Run ``await work(owner)`` on the running loop when it ends (``asyncio.run`` returning,
    or anything else that calls ``loop.shutdown_asyncgens()``), at most once per owner and
    loop, bounded in time, unless ``owner`` was garbage-collected by then.

    ``work`` must not hold ``owner`` itself (pass a plain function or an unbound method), or
    the owner lives as long as the loop.
    """
    end = _running_end()
    end.stages[stage][owner] = work


def hold_end() -> Callable[[], None]:
    """Make the running loop's end wait (at most ``_HELD_LIMIT`` seconds, before its drain
    and close work) until the returned function is called; calling it again does nothing.

    For work that must finish on this loop's resources even when the loop's shutdown is
    what ends it: a turn stream left suspended, which ``shutdown_asyncgens()`` (or the
    garbage collector) closes in a task of its own, concurrently with the loop-end work.
    """
    end = _running_end()
    held: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    end.holds.add(held)

    def release() -> None:
        end.holds.discard(held)
        if not held.done():
            held.set_result(None)

    return release


def close_collected(agen: AsyncGenerator[Any, Any]) -> None:
    """Close ``agen``, a stream collected while suspended, on the running loop (called there,
    as a callback): in a task whose cancellation before it starts (``asyncio.run`` cancels
    every task left when ``main()`` returns) leaves ``agen`` untouched, and failing that at
    the loop's end, before its drain and close work (see vel._asyncgens)."""
    end = _running_end()
    end.unclosed.add(agen)
    task = asyncio.get_running_loop().create_task(_close(end, agen), name="vel stream close")
    # The loop holds its tasks weakly.
    end.closing.add(task)
    task.add_done_callback(end.closing.discard)


async def _close(end: _LoopEnd, agen: AsyncGenerator[Any, Any]) -> None:
    if agen not in end.unclosed:
        return  # closed (or being closed) by the other path
    end.unclosed.discard(agen)
    try:
        await agen.aclose()
    except Exception as exc:
        log.warning("closing a collected stream: %r", exc)


class PerLoop(Generic[T]):
    def __init__(
        self,
        factory: Callable[[], Awaitable[T]],
        closer: Callable[[T], Awaitable[None]],
    ) -> None:
        self._factory = factory
        self._closer = closer
        self._items: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        self._creating: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        _fork.forget_in_child(self)

    def _forget_after_fork(self) -> None:
        # Even the loop that forked (still usable in the child) must not reuse them: their
        # connections are the parent's.
        _fork.keep(*self._items.items())
        self._items = weakref.WeakKeyDictionary()
        self._creating = weakref.WeakKeyDictionary()

    def current(self) -> T | None:
        return self._items.get(asyncio.get_running_loop())

    async def get(self) -> T:
        loop = asyncio.get_running_loop()
        item = self._items.get(loop)
        if item is not None:
            return item
        lock = self._creating.setdefault(loop, asyncio.Lock())
        async with lock:
            item = self._items.get(loop)
            if item is None:
                item = await self._factory()
                self._items[loop] = item
                # The item holds its loop (so the weak key alone would never let go of it):
                # closed and forgotten when the loop ends.
                at_loop_end(self, PerLoop._loop_ended)
            return item

    async def _loop_ended(self) -> None:
        loop = asyncio.get_running_loop()
        self._creating.pop(loop, None)
        item = self._items.pop(loop, None)
        if item is not None:
            await self._closer(item)

    async def aclose(self) -> None:
        """Close this loop's resource and the helper loop's (the plain calls' one); forget
        those of loops that are gone or closed."""
        loop = asyncio.get_running_loop()
        item = self._items.pop(loop, None)
        for other in list(self._items):
            if other.is_closed():
                self._items.pop(other, None)
        try:
            if item is not None:
                await self._closer(item)
        finally:
            await self._close_on_helper(loop)

    async def _close_on_helper(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the helper loop's resource there: the plain calls opened it, and closing
        the Agent closes it too (it would stay open until the process exits otherwise)."""
        helper = helper_loop()
        if helper is None or helper is loop:
            return
        item = self._items.pop(helper, None)
        if item is None:
            return
        closing = asyncio.run_coroutine_threadsafe(_closed(self._closer, item), helper)
        # Bounded: the closers bound their own work, but a helper loop stuck in a plain
        # call must not hang this close.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(closing), _HELPER_CLOSE_WAIT)


# Seconds a close waits for the helper loop to close its resources.
_HELPER_CLOSE_WAIT = 10.0


async def _closed(closer: Callable[[T], Awaitable[None]], item: T) -> None:
    await closer(item)


class CallerOwned:
    """Runs work on the event loop that owns a caller's resource (an injected Redis client or
    asyncpg pool), from whichever loop asks.

    The resource belongs to ``loop`` (default: the loop running when this object is made, or
    the first loop that uses it). Work asked for on another loop (the plain ``ctxmgr`` calls
    run on vel's helper loop; a second ``asyncio.run``) is sent to the owner loop when it is
    running in another thread, and refused with ConfigurationError naming the fix when it
    cannot run there: the owner loop has stopped, or its thread is blocked waiting for this
    very call.

    Args:
        what: the resource, for messages (``"RedisStore(client=...)"``).
        fix: what to do instead, for messages.
        loop: the owner loop, when known.
    """

    def __init__(self, what: str, fix: str, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._what = what
        self._fix = fix
        self._loop = loop
        self._thread: int | None = None
        self._forked = False
        _fork.forget_in_child(self)
        if loop is None:
            with contextlib.suppress(RuntimeError):
                self._loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop.is_running():
            try:
                if asyncio.get_running_loop() is self._loop:
                    self._thread = threading.get_ident()
            except RuntimeError:
                pass

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    def _forget_after_fork(self) -> None:
        self._forked = True

    def check_process(self) -> None:
        """Refuse the resource in a process forked after it was made: its connections are
        the parent's (redis-py and asyncpg cannot hand them over), and vel cannot make the
        caller's resource anew.

        Raises:
            ConfigurationError: this is a forked child.
        """
        if self._forked:
            raise ConfigurationError(
                f"{self._what} was made in the parent of this forked process: its "
                "connections are the parent's, and a child must not use them. Make the "
                "client or pool in the child (for example in gunicorn's post_fork hook, or "
                f"with multiprocessing's 'spawn' start method), or {self._fix}"
            )

    def is_home(self) -> bool:
        """Whether the running loop owns the resource (binding it on first use).

        Raises:
            ConfigurationError: a forked child (see :meth:`check_process`).
        """
        self.check_process()
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        if self._loop is loop:
            if self._thread is None:
                self._thread = threading.get_ident()
            return True
        return False

    async def run(self, make: Callable[[], Awaitable[T]]) -> T:
        """``await make()`` on the owner loop; called from a loop that is not the owner's.

        Raises:
            ConfigurationError: the owner loop cannot run it (stopped, or blocked by this
                very call).
        """
        owner = self._loop
        assert owner is not None
        if owner.is_closed() or not owner.is_running():
            raise ConfigurationError(
                f"{self._what} belongs to an event loop that is not running; {self._fix}"
            )
        if self._thread is not None and blocked_in_run_sync(self._thread):
            raise ConfigurationError(
                f"{self._what} belongs to the event loop this plain call blocks; await the "
                f"async twin (aget_session_context, ...) there, or {self._fix}"
            )

        async def on_owner() -> T:
            if self._thread is None:
                self._thread = threading.get_ident()
            return await make()

        future = asyncio.run_coroutine_threadsafe(on_owner(), owner)
        return await asyncio.wrap_future(future)
