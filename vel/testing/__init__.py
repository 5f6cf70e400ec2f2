"""Test helpers for vel: a deterministic OpenAI-compatible server (``FakeOpenAIServer``).

The import is lazy so that ``python -m vel.testing.fake_openai`` does not import the module
twice (once as ``vel.testing.fake_openai`` and once as ``__main__``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vel.testing.fake_openai import FakeOpenAIServer

__all__ = ["FakeOpenAIServer"]


def __getattr__(name: str) -> Any:
    if name == "FakeOpenAIServer":
        from vel.testing.fake_openai import FakeOpenAIServer

        return FakeOpenAIServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
