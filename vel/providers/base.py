"""What a model provider yields while streaming one completion."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vel.messages import Message


@dataclass(frozen=True, slots=True)
class TextChunk:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallChunk:
    """A fragment of tool call ``index``; ``call_id`` and ``name`` come on its first one."""

    index: int
    call_id: str | None
    name: str | None
    arguments: str


@dataclass(frozen=True, slots=True)
class UsageChunk:
    usage: dict[str, Any]


Chunk = TextChunk | ToolCallChunk | UsageChunk


class Provider(Protocol):
    def stream(
        self,
        messages: Sequence[Message],
        tools: Sequence[dict[str, Any]],
        generation_config: Mapping[str, Any],
    ) -> AsyncGenerator[Chunk, None]:
        """Stream one completion. Raises ProviderError (or ConfigurationError) on failure."""
        ...

    async def aclose(self) -> None: ...
