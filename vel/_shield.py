"""Work that must finish whatever cancels its caller (a turn's commit, lock releases), and
noticing a cancellation that a driver swallowed.

A commit (:func:`finish`) holds its caller until it is done: the caller must learn whether
the turn was stored. A lock's release after a turn that stored nothing (:func:`release`)
holds it for :data:`RELEASE_WAIT` at most, then goes on in the background: the caller learns
nothing from it, and the lock's lease bounds a release that never lands.

A cancellation reaches a task two ways. An anyio cancel scope (Starlette, FastAPI, anyio
code) cancels the task again at every await until the scope is left, so a ``finally`` that
awaits a release never completes. asyncio's ``task.cancel()`` (``asyncio.timeout``,
``wait_for``) interrupts the awaited call once, which anyio's shielding cannot stop.

:func:`settle` takes *idempotent* work (a commit carrying its message ids, a release by
token): it runs it inline in a shielded anyio scope, which anyio cancellations wait for. An
asyncio cancellation interrupts it, and then it runs again, to its end, as a task of its own
that nothing reaches (bounded by ``limit``); the cancellation is handed back to be raised,
unchanged, afterwards. The common case costs no task.

On Python 3.11, ``asyncio.wait_for`` (inside redis-py and asyncpg) can drop a cancellation
that arrives as the awaited call completes; the task's ``cancelling()`` count still shows it.
:class:`CancelWatch` compares that count with its value when the work began.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import anyio
import anyio.lowlevel

from vel.errors import StoreTimeoutError

T = TypeVar("T")
log = logging.getLogger("vel")

Work = Callable[[], Coroutine[Any, Any, T]]

# How long a work cut off by its limit is given to end after its cancellation.
_WIND_DOWN = 1.0
# Seconds a caller waits for its lock's release (see release()).
RELEASE_WAIT = 0.5
# Releases going on in tasks of their own.
_released: set[asyncio.Task[None]] = set()


class CancelWatch:
    """Notices a cancellation of the current task, even one a driver swallowed.

    Created when a piece of work begins; :meth:`check` raises CancelledError if the task's
    ``cancelling()`` count has grown since (asyncio.timeout, wait_for and anyio scopes all
    count their requests there).
    """

    def __init__(self) -> None:
        self._task = asyncio.current_task()
        self._base = self._task.cancelling() if self._task is not None else 0

    def requested(self) -> bool:
        return self._task is not None and self._task.cancelling() > self._base

    def check(self) -> None:
        """Raise CancelledError if a cancellation was requested since this watch began."""
        if self.requested():
            raise asyncio.CancelledError("cancelled (vel noticed a request a driver dropped)")

    async def checkpoint(self) -> None:
        """:meth:`check`, then let an enclosing anyio scope that was cancelled (a deadline
        passed) deliver its cancellation now: anyio delivers at the next await, and the
        work that follows may not start with one (a tool's first statements, a commit)."""
        self.check()
        await anyio.lowlevel.checkpoint_if_cancelled()


@dataclass
class Settled(Generic[T]):
    """How a :func:`settle`d work ended.

    Attributes:
        result: the work's result (None if it failed).
        error: the work's own exception, or StoreTimeoutError when it outlived ``limit``.
        cancel: a cancellation of the caller that arrived meanwhile (to be raised).
    """

    result: T | None = None
    error: BaseException | None = None
    cancel: BaseException | None = None


async def settle(work: Work[T], limit: float, what: str) -> Settled[T]:
    """Run the idempotent ``work()`` to its end whatever cancels the caller meanwhile (see
    the module's docstring); a re-run after an interruption gets ``limit`` seconds."""
    watch = CancelWatch()
    done = Settled[T]()
    try:
        with anyio.CancelScope(shield=True):
            done.result = await work()
    except asyncio.CancelledError as exc:
        done.cancel = exc
    except Exception as exc:
        if not watch.requested():
            done.error = exc
            return done
        # A driver turned the cancellation into an error: the outcome is unknown, so the
        # work runs again, and the cancellation is raised after it.
        done.cancel = asyncio.CancelledError(f"{what} was cancelled")
        done.cancel.__context__ = exc
    else:
        if watch.requested():
            # Delivered while the work completed and dropped by a driver (Python 3.11).
            done.cancel = asyncio.CancelledError(f"{what} was cancelled")
        return done
    again = await _in_own_task(work(), limit, what)
    done.result, done.error = again.result, again.error
    return done


async def finish(work: Work[T], limit: float, what: str) -> T:
    """:func:`settle` ``work``, then raise what ended it: the caller's cancellation first
    (it arrived while the work ran, and propagates unchanged), else the work's error."""
    done = await settle(work, limit, what)
    if done.cancel is not None:
        raise done.cancel
    if done.error is not None:
        raise done.error
    return done.result  # type: ignore[return-value]


async def release(work: Work[None], limit: float, what: str) -> None:
    """Run ``work()``, the idempotent release of a lock by a turn that stored nothing, but
    keep the caller at most :data:`RELEASE_WAIT` seconds, whatever cancels it meanwhile (a
    cancellation is raised afterwards, unchanged). A release still running then goes on in
    a task of its own, bounded by ``limit``: against a frozen backend the caller gets control
    back near its own deadline rather than a whole operation timeout later, and the lock's
    lease covers a release that never lands (the task ends with its loop, as every task)."""
    loop = asyncio.get_running_loop()
    task = loop.create_task(_bounded(work, limit, what), name=f"vel {what}")
    _released.add(task)  # the loop holds its tasks weakly
    task.add_done_callback(_released.discard)
    cancel: BaseException | None = None
    with anyio.CancelScope(shield=True):
        deadline = loop.time() + RELEASE_WAIT
        while not task.done() and (remaining := deadline - loop.time()) > 0:
            try:
                await asyncio.wait({task}, timeout=remaining)
            except asyncio.CancelledError as exc:
                cancel = cancel or exc
    if cancel is not None:
        raise cancel


async def _bounded(work: Work[None], limit: float, what: str) -> None:
    try:
        async with asyncio.timeout(limit):
            await work()
    except TimeoutError:
        log.warning("%s did not finish within %g s; the lock's lease will run out", what, limit)
    except Exception:
        log.exception("%s failed; the lock's lease will run out", what)


async def _in_own_task(coro: Coroutine[Any, Any, T], limit: float, what: str) -> Settled[T]:
    """Run ``coro`` as a task that no cancellation of the caller reaches, for at most
    ``limit`` seconds; cancellations of the caller meanwhile are recorded, not raised."""
    loop = asyncio.get_running_loop()
    task = loop.create_task(coro, name=f"vel {what}")
    done = Settled[T]()
    with anyio.CancelScope(shield=True):
        deadline = loop.time() + limit
        cut = False
        while not task.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                if cut:
                    break  # cancelled and still running after its wind-down: left behind
                task.cancel()
                cut = True
                deadline = loop.time() + _WIND_DOWN
                continue
            try:
                await asyncio.wait({task}, timeout=remaining)
            except asyncio.CancelledError as exc:
                if done.cancel is None:
                    done.cancel = exc
    if not task.done():
        log.warning("%s did not end within %g s of its cancellation", what, _WIND_DOWN)
        task.add_done_callback(_retrieve)
        done.error = StoreTimeoutError(f"{what} did not finish within {limit:g} s")
    elif task.cancelled():
        done.error = StoreTimeoutError(f"{what} did not finish within {limit:g} s")
    elif task.exception() is not None:
        done.error = task.exception()
    else:
        done.result = task.result()
    return done


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
