"""What a forked child must not share with its parent.

gunicorn ``--preload``, multiprocessing's 'fork' start method and Celery's prefork pool fork
a process that may already have used vel. The child gets a copy of every object but only the
thread that forked: vel's helper thread (where plain calls run) is gone while its event loop
still looks like it is running, a lock another thread held stays held forever, and every pool
and client holds sockets that the parent keeps using (two processes reading replies from one
connection get each other's answers).

So every object holding such per-process state registers here, and in the child
(``os.register_at_fork(after_in_child=...)``) forgets it: the next use makes new ones in the
child. What the parent made is neither used nor closed in the child. Closing would not be
harmless: an asyncpg connection says goodbye to the server on the parent's socket, and a
transport removing its socket from the inherited selector removes it from the parent's epoll
set as well (both processes share it). So it is kept, unreachable and never finalised, until
the child exits.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Protocol


class ForkAware(Protocol):
    def _forget_after_fork(self) -> None:
        """Called in a forked child: drop (without closing) what belongs to the parent."""


_objects: weakref.WeakSet[ForkAware] = weakref.WeakSet()
_functions: list[Callable[[], None]] = []
_register_lock = threading.Lock()
# The parent's resources, held so that no finaliser runs in the child (see above).
_kept: list[object] = []


def forget_in_child(obj: ForkAware) -> None:
    """Have ``obj._forget_after_fork()`` called in every forked child while ``obj`` lives."""
    with _register_lock:
        _objects.add(obj)


def at_fork_in_child(func: Callable[[], None]) -> None:
    """Have ``func()`` called in every forked child (for module-level state)."""
    with _register_lock:
        _functions.append(func)


def keep(*resources: object) -> None:
    """Hold the parent's ``resources`` for the child's lifetime, unused and unclosed."""
    _kept.extend(resources)


def _after_fork_in_child() -> None:
    global _register_lock
    # Another thread of the parent may have held it at the fork.
    _register_lock = threading.Lock()
    for func in list(_functions):
        func()
    for obj in list(_objects):
        obj._forget_after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
