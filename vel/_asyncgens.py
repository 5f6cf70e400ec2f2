"""Async generators that vel drives and closes itself, kept out of the loop's shutdown.

asyncio tracks every async generator from its first iteration (``sys.set_asyncgen_hooks``)
and, when the loop shuts down (``asyncio.run`` returning), closes every one it still tracks
*at once*, each in its own task (``loop.shutdown_asyncgens``). A turn stream left suspended
(``break`` out of ``run_stream`` with no ``aclose()``) is a chain of them: ``run_stream``,
the turn, its model step, the lock's context manager, the SDK's response stream. Closed all
at once, the inner ones fail with "aclose(): asynchronous generator is already running" (or
run their cleanup before the outer one's) while the outer one's cleanup walks through them,
and the turn lock's release is cut off by the loop closing: the next turn on that session
waits for the lease to run out.

- :class:`Owned` drives an inner generator so that every async generator first iterated
  during its steps, in the driving task, is left untracked: its owner closes it, in order,
  and only the outermost generator (the one the user holds) is closed by the loop.
- :func:`stream` marks the outermost one (``run_stream``, ``sse_stream``). When one is
  collected while suspended, asyncio's own finalizer would close it in a task that
  ``asyncio.run`` may cancel before its first step (a stream dropped as ``main()`` returns);
  on Python 3.11 and 3.12 that cancellation is thrown into an ``aclose()`` that never
  started, which abandons the generators inside mid-cleanup (3.13 fixed it). vel closes such
  a stream itself (:func:`vel._loops.close_collected`): in a task whose cancellation before
  its start leaves the stream untouched, and failing that at the loop's end.
- :func:`vel._loops.hold_end` lets the loop's end wait for a turn still closing before it
  closes the pools its lock release needs.
- :func:`untracked` covers vel's own loop-end work, which runs after the loop's shutdown
  began: what it iterates is not tracked (the loop would only warn that it came too late).

Both hooks are wrapped on the running loop's thread when a stream starts (the loop installs
its own hooks each time it starts running and restores the previous ones when it stops);
other generators, and loops other than asyncio's own, keep the loop's hooks unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import CodeType
from typing import Any, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")

Hook = Callable[[AsyncGenerator[Any, Any]], object]

# The task whose Owned step is running in this context (None: none). A task started during
# the step copies the context, so the hook compares it with the current task.
_DRIVER: ContextVar[asyncio.Task[Any] | None] = ContextVar("vel_asyncgen_driver", default=None)
# True in vel's loop-end work and the tasks it starts: generators first iterated there run to
# their end within it, after the loop's shutdown_asyncgens() began.
_ENDING: ContextVar[bool] = ContextVar("vel_loop_ending", default=False)
# The code of the stream generator functions (a generator's weak references are already
# cleared when its finalizer runs, so it is told by its code).
_STREAM_CODES: set[CodeType] = set()


class _FirstIter:
    """The thread's first-iteration hook, wrapped: passes on every generator but those first
    iterated inside an :class:`Owned` step of the current task or in vel's loop-end work
    (:func:`untracked`)."""

    __slots__ = ("inner",)

    def __init__(self, inner: Hook | None) -> None:
        self.inner = inner

    def __call__(self, agen: AsyncGenerator[Any, Any]) -> None:
        driver = _DRIVER.get()
        if (driver is not None and driver is asyncio.current_task()) or _ENDING.get():
            return
        if self.inner is not None:
            self.inner(agen)


class _Finalizer:
    """The thread's finalizer hook, wrapped: a vel stream collected while suspended, on an
    asyncio loop, is closed by :func:`vel._loops.close_collected` instead."""

    __slots__ = ("inner",)

    def __init__(self, inner: Hook | None) -> None:
        self.inner = inner

    def __call__(self, agen: AsyncGenerator[Any, Any]) -> None:
        loop = getattr(self.inner, "__self__", None)
        if (
            getattr(agen, "ag_code", None) in _STREAM_CODES
            and isinstance(loop, asyncio.BaseEventLoop)
            and not loop.is_closed()
        ):
            # What the loop's own hook does first: its shutdown must not close it as well.
            from vel._loops import close_collected  # vel._loops imports this module

            loop._asyncgens.discard(agen)  # type: ignore[attr-defined]
            loop.call_soon_threadsafe(close_collected, agen)
        elif self.inner is not None:
            self.inner(agen)


@contextmanager
def tracked() -> Iterator[None]:
    """Generators first iterated inside are tracked by the loop even in an :class:`Owned`
    step or :func:`untracked` work (vel's own loop-end generator must be finalized by the
    loop's shutdown)."""
    driver, ending = _DRIVER.set(None), _ENDING.set(False)
    try:
        yield
    finally:
        _ENDING.reset(ending)
        _DRIVER.reset(driver)


@contextmanager
def untracked() -> Iterator[None]:
    """Generators first iterated inside, in this task or the tasks it starts, are not
    tracked by the loop: for vel's loop-end work, which runs them to their end after the
    loop's shutdown began (the loop would only warn that they came too late)."""
    _wrap_hooks()
    token = _ENDING.set(True)
    try:
        yield
    finally:
        _ENDING.reset(token)


def _wrap_hooks() -> None:
    firstiter, finalizer = sys.get_asyncgen_hooks()
    if not isinstance(firstiter, _FirstIter):
        sys.set_asyncgen_hooks(firstiter=_FirstIter(firstiter))
    if not isinstance(finalizer, _Finalizer):
        sys.set_asyncgen_hooks(finalizer=_Finalizer(finalizer))


def stream(
    func: Callable[P, AsyncGenerator[T, None]],
) -> Callable[P, AsyncGenerator[T, None]]:
    """Mark ``func`` (an async generator function) as one whose generators users hold: a
    call wraps the running loop's hooks first, so that the generator, once iterated, is
    closed by vel if it is collected while suspended (see the module's docstring)."""
    _STREAM_CODES.add(func.__code__)

    @functools.wraps(func)
    def start(*args: P.args, **kwargs: P.kwargs) -> AsyncGenerator[T, None]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass  # made outside a loop: the hooks of the loop that iterates it apply
        else:
            _wrap_hooks()
        return func(*args, **kwargs)

    return start


class Owned(AsyncIterator[T]):
    """An async generator driven (``__anext__``) and closed (``aclose``) by its owner only.

    The owner must close it (``async with contextlib.aclosing(Owned(gen))``): neither it
    nor the generators first iterated inside its steps are closed by the loop's shutdown.
    """

    __slots__ = ("_agen",)

    def __init__(self, agen: AsyncGenerator[T, None]) -> None:
        self._agen = agen

    def __aiter__(self) -> Owned[T]:
        return self

    async def __anext__(self) -> T:
        _wrap_hooks()
        token = _DRIVER.set(asyncio.current_task())
        try:
            return await self._agen.__anext__()
        finally:
            _DRIVER.reset(token)

    async def aclose(self) -> None:
        _wrap_hooks()
        token = _DRIVER.set(asyncio.current_task())
        try:
            await self._agen.aclose()
        finally:
            _DRIVER.reset(token)
