"""Optional OpenTelemetry spans: ``vel.turn``, ``vel.load``, ``vel.append``, ``vel.warm`` and
``vel.flush``, each with the session id as ``vel.session_id`` (a flush spans many sessions:
it carries ``vel.sessions``, their number).

vel depends only on ``opentelemetry-api`` (the ``otel`` extra) and creates spans only once the
application has installed an SDK's tracer provider. Until then, and without the package, an
instrumentation point costs one function call and a check of a module global: nothing
measurable beside a turn's ~0.3 ms of client CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    contextmanager,
    nullcontext,
)
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
except ImportError:  # the otel extra is not installed
    trace = None  # type: ignore[assignment]
    otel_context = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

__all__ = ["SESSION_ID", "current", "enabled", "end", "span", "start", "within"]

T = TypeVar("T")

SESSION_ID = "vel.session_id"

_NOTHING: AbstractContextManager[None] = nullcontext()
_tracer: Tracer | None = None
_first = True
_UNKNOWN = object()  # a future API without the global: ask the public getter every time


def _active() -> Tracer | None:
    """vel's tracer once an SDK provider is installed (then for good: OpenTelemetry allows
    the global provider to be set once), else None."""
    global _tracer, _first
    if _tracer is not None:
        return _tracer
    if trace is None:
        return None
    if _first:
        # The public getter, once: it loads a provider named by OpenTelemetry's own
        # environment variable. It reads os.environ at every call (microseconds), so
        # later calls check the module's global instead, which it sets.
        _first = False
        provider = trace.get_tracer_provider()
    elif getattr(trace, "_TRACER_PROVIDER", _UNKNOWN) is None:
        return None
    else:
        provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    from vel import __version__

    _tracer = provider.get_tracer("vel", __version__)
    return _tracer


def enabled() -> bool:
    """True when spans are recorded (an SDK tracer provider is installed)."""
    return _active() is not None


def _attributes(session_id: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    attributes = {f"vel.{k}": v for k, v in extra.items()}
    if isinstance(session_id, str):  # not yet validated: a bad id is refused inside
        attributes[SESSION_ID] = session_id
    return attributes


def span(
    name: str, session_id: str | None = None, **attributes: Any
) -> AbstractContextManager[Any]:
    """A span ``vel.<name>``, current while the ``with`` block runs (its exception is
    recorded and sets the error status). For coroutines and plain code, not generators."""
    tracer = _active()
    if tracer is None:
        return _NOTHING
    return tracer.start_as_current_span(
        f"vel.{name}", attributes=_attributes(session_id, attributes)
    )


def start(name: str, session_id: str | None = None, **attributes: Any) -> Span | None:
    """A span ``vel.<name>`` that is not made current (for an async generator, which may be
    resumed from other contexts); None while tracing is off. End it with :func:`end`, and
    make it the parent of work with :func:`current`."""
    tracer = _active()
    if tracer is None:
        return None
    return tracer.start_span(f"vel.{name}", attributes=_attributes(session_id, attributes))


def current(parent: Span | None) -> AbstractContextManager[Any]:
    """Make ``parent`` the current span for a block that does not yield to other code."""
    if parent is None:
        return _NOTHING
    return _attached(parent)


@contextmanager
def _attached(parent: Span) -> Iterator[None]:
    assert trace is not None and otel_context is not None
    token = otel_context.attach(trace.set_span_in_context(parent))
    try:
        yield
    finally:
        otel_context.detach(token)


def within(
    manager: AbstractAsyncContextManager[T], parent: Span | None
) -> AbstractAsyncContextManager[T]:
    """``manager`` entered and exited with ``parent`` current (the body is not: a generator
    may yield there)."""
    if parent is None:
        return manager
    return _Within(manager, parent)


class _Within(AbstractAsyncContextManager[T]):
    def __init__(self, manager: AbstractAsyncContextManager[T], parent: Span) -> None:
        self.manager = manager
        self.parent = parent

    async def __aenter__(self) -> T:
        with _attached(self.parent):
            return await self.manager.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        with _attached(self.parent):
            return await self.manager.__aexit__(exc_type, exc, tb)


def end(finished: Span | None, error: BaseException | None = None) -> None:
    """End ``finished``, recording ``error`` (if any) as its exception and error status."""
    if finished is None:
        return
    assert trace is not None
    if error is not None:
        finished.record_exception(error)
        finished.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
    finished.end()
