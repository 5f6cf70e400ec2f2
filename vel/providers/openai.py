"""OpenAI chat completions (streaming) through ``openai.AsyncOpenAI``."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import openai

from vel._loops import PerLoop
from vel.errors import ConfigurationError, ProviderError
from vel.messages import Message
from vel.providers.base import Chunk, TextChunk, ToolCallChunk, UsageChunk

_CLIENT_OPTIONS = ("api_key", "base_url", "organization", "timeout", "max_retries")


class OpenAIProvider:
    """Streams completions from an OpenAI-compatible endpoint.

    One ``AsyncOpenAI`` client per event loop is created on first use and reused for every
    run (its connection pool belongs to that loop). The SDK reads ``OPENAI_API_KEY`` and
    ``OPENAI_BASE_URL`` itself when the model dict gives no ``api_key`` / ``base_url``.
    Extra client options can be passed as ``model['client']`` (e.g. ``{'http_client': ...}``).
    """

    def __init__(self, model: Mapping[str, Any]) -> None:
        name = model.get("model")
        if not isinstance(name, str) or not name:
            raise ConfigurationError("model['model'] must name the model, e.g. 'gpt-4o'")
        self.model = name
        self._options: dict[str, Any] = {k: model[k] for k in _CLIENT_OPTIONS if k in model}
        self._options.update(model.get("client") or {})
        self._clients: PerLoop[openai.AsyncOpenAI] = PerLoop(self._make_client, _close_client)

    def __repr__(self) -> str:
        return f"OpenAIProvider(model={self.model!r})"

    async def _make_client(self) -> openai.AsyncOpenAI:
        options = dict(self._options)
        if "http_client" not in options:
            # The SDK's own default client closes itself from __del__ on whatever loop runs
            # then: a client left by a finished loop (asyncio.run twice) would break another.
            options["http_client"] = openai.DefaultAsyncHttpxClient()
        try:
            return openai.AsyncOpenAI(**options)
        except openai.OpenAIError as exc:
            if options["http_client"] is not self._options.get("http_client"):
                await options["http_client"].aclose()
            raise ConfigurationError(
                "no OpenAI API key: set OPENAI_API_KEY or pass model={'api_key': ...}"
            ) from exc

    async def stream(
        self,
        messages: Sequence[Message],
        tools: Sequence[dict[str, Any]],
        generation_config: Mapping[str, Any],
    ) -> AsyncGenerator[Chunk, None]:
        client = await self._clients.get()
        request: dict[str, Any] = dict(generation_config)
        if tools:
            request["tools"] = list(tools)
        # The SDK's overloads want TypedDicts; session messages are plain dicts by design.
        create: Any = client.chat.completions.create
        try:
            response = await create(
                model=self.model,
                messages=list(messages),
                stream=True,
                stream_options={"include_usage": True},
                **request,
            )
        except openai.APIStatusError as exc:
            raise ProviderError(
                f"model provider returned HTTP {exc.status_code}: {_error_text(exc)}"
            ) from exc
        except openai.OpenAIError as exc:
            raise ProviderError(f"model provider request failed: {exc}") from exc
        try:
            async for chunk in response:
                if chunk.usage is not None:
                    yield UsageChunk(chunk.usage.model_dump(exclude_none=True))
                for choice in chunk.choices:
                    delta = choice.delta
                    if delta.content:
                        yield TextChunk(delta.content)
                    for call in delta.tool_calls or ():
                        function = call.function
                        yield ToolCallChunk(
                            index=call.index,
                            call_id=call.id,
                            name=function.name if function else None,
                            arguments=(function.arguments or "") if function else "",
                        )
        except openai.OpenAIError as exc:
            raise ProviderError(f"model stream broke: {exc}") from exc
        finally:
            await response.close()

    async def complete(self, messages: Sequence[Message]) -> str:
        """One completion's text, not streamed (background work such as summaries: one
        response to parse rather than a chunk per token)."""
        client = await self._clients.get()
        create: Any = client.chat.completions.create
        try:
            response = await create(model=self.model, messages=list(messages))
        except openai.APIStatusError as exc:
            raise ProviderError(
                f"model provider returned HTTP {exc.status_code}: {_error_text(exc)}"
            ) from exc
        except openai.OpenAIError as exc:
            raise ProviderError(f"model provider request failed: {exc}") from exc
        if not response.choices:
            raise ProviderError("model provider returned no choices")
        return str(response.choices[0].message.content or "")

    async def aclose(self) -> None:
        await self._clients.aclose()


async def _close_client(client: openai.AsyncOpenAI) -> None:
    await client.close()


def _error_text(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
    return exc.message
