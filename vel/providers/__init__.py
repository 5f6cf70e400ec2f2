"""Model providers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vel.errors import ConfigurationError
from vel.providers.base import Chunk, Provider, TextChunk, ToolCallChunk, UsageChunk

__all__ = ["Chunk", "Provider", "TextChunk", "ToolCallChunk", "UsageChunk", "make_provider"]


def make_provider(model: Mapping[str, Any]) -> Provider:
    """Build the provider named by the Agent's ``model`` dict."""
    if not isinstance(model, Mapping):
        raise ConfigurationError("model must be a dict like {'provider': 'openai', 'model': ...}")
    name = model.get("provider", "openai")
    if name == "openai":
        from vel.providers.openai import OpenAIProvider

        return OpenAIProvider(model)
    raise ConfigurationError(f"unknown model provider {name!r}; supported: 'openai'")
