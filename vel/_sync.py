"""Run vel coroutines from plain (synchronous) code.

The spec calls ``agent.ctxmgr.get_session_context(...)`` without ``await``, possibly from
inside a running event loop. Blocking that loop on its own work would deadlock, so plain calls
run on one helper thread with its own loop (an anyio blocking portal), started on first use.
A forked child starts its own (the parent's thread did not survive the fork, see vel._fork).
"""

from __future__ import annotations

import asyncio
import atexit
import threading
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from vel import _fork

T = TypeVar("T")

_lock = threading.Lock()
_portal: BlockingPortal | None = None
_portal_cm: AbstractContextManager[BlockingPortal] | None = None
_portal_thread: int | None = None
_portal_loop: asyncio.AbstractEventLoop | None = None
# Threads blocked in run_sync right now: work sent to a loop running in one of them would
# never run (see vel._loops.CallerOwned).
_blocked: set[int] = set()


def _get_portal() -> BlockingPortal:
    global _portal, _portal_cm
    with _lock:
        if _portal is None:
            _portal_cm = start_blocking_portal()
            _portal = _portal_cm.__enter__()
            _portal.call(_remember_thread)
            atexit.register(_stop_portal)
        return _portal


async def _remember_thread() -> None:
    global _portal_thread, _portal_loop
    _portal_thread = threading.get_ident()
    _portal_loop = asyncio.get_running_loop()


def _stop_portal() -> None:
    global _portal, _portal_cm, _portal_loop
    with _lock:
        if _portal_cm is not None:
            _portal_cm.__exit__(None, None, None)
        _portal = _portal_cm = None
        _portal_loop = None


def _forget_after_fork() -> None:
    """In a forked child: the helper thread is gone, its loop will never run again."""
    global _lock, _portal, _portal_cm, _portal_thread, _portal_loop
    _fork.keep(_portal, _portal_cm, _portal_loop)
    _lock = threading.Lock()
    _portal = _portal_cm = None
    _portal_thread = None
    _portal_loop = None
    _blocked.clear()


_fork.at_fork_in_child(_forget_after_fork)


def in_helper_thread() -> bool:
    """True on vel's own helper loop (where plain calls run)."""
    return threading.get_ident() == _portal_thread


def helper_loop() -> asyncio.AbstractEventLoop | None:
    """The helper thread's event loop while it runs (None before the first plain call)."""
    loop = _portal_loop
    return loop if loop is not None and loop.is_running() else None


def blocked_in_run_sync(thread: int) -> bool:
    """Whether ``thread`` is waiting in :func:`run_sync` (its event loop, if any, is stuck)."""
    return thread in _blocked


def run_sync(func: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run ``await func(*args)`` to completion on the helper loop and return its result."""
    if in_helper_thread():
        raise RuntimeError(
            "a plain vel call was made from vel's own helper loop; await the a* twin"
        )
    me = threading.get_ident()
    nested = me in _blocked
    _blocked.add(me)
    try:
        return _get_portal().call(func, *args)
    finally:
        if not nested:
            _blocked.discard(me)
