"""Function tools: schemas and argument conversion from Python signatures, safe invocation,
and tool results turned into JSON.

A tool's arguments arrive as the model's JSON; :meth:`Tool.call` validates and converts them
(``"3"`` to ``3``, ``"celsius"`` to ``Unit.C``, an object to a dataclass) before the handler
runs, and :func:`tool_result` turns whatever the handler returns into JSON for the history.
Both report what they cannot do as :class:`~vel.errors.ToolError`, which the Agent hands to
the model as the tool's error rather than raising it.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import pydantic_core

from vel.errors import ToolError
from vel.messages import clean_text, clean_value
from vel.tool_schema import ToolSignature, signature_of

__all__ = ["Tool", "build_tools", "error_text", "tool_result"]


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool the model may call.

    Attributes:
        name: function name shown to the model.
        description: what it does.
        parameters: JSON schema of its arguments (an object schema).
        handler: the callable (sync or async) receiving the arguments as keywords.
        signature: validates and converts the arguments before ``handler`` runs (tools made
            by :meth:`from_function`); None passes the JSON values through unchanged.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    handler: Callable[..., Any]
    signature: ToolSignature | None = None

    @classmethod
    def from_function(cls, func: Callable[..., Any]) -> Tool:
        """Describe ``func`` from its signature, type hints and docstring.

        Raises:
            ToolError: the name is unusable, or a parameter's type cannot be resolved or
                described as JSON.
        """
        name = getattr(func, "__name__", None)
        if not name or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise ToolError(f"tool {func!r} needs a name of 1-64 letters, digits, _ or -")
        signature = signature_of(func, name)
        return cls(
            name=name,
            description=signature.description or name,
            parameters=signature.parameters,
            handler=func,
            signature=signature,
        )

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Tool:
        """Accept ``{'name', 'description', 'parameters', 'handler'}`` or the OpenAI shape
        ``{'type': 'function', 'function': {...}, 'handler': ...}``."""
        body = spec.get("function", spec)
        handler = spec.get("handler") or body.get("handler")
        if not callable(handler):
            raise ToolError(f"tool spec {body.get('name')!r} needs a callable 'handler'")
        name = body.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise ToolError(f"tool spec needs a valid 'name', got {name!r}")
        return cls(
            name=name,
            description=str(body.get("description", name)),
            parameters=dict(body.get("parameters") or {"type": "object", "properties": {}}),
            handler=handler,
        )

    def openai_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }

    async def call(self, arguments: Mapping[str, Any]) -> Any:
        """Validate ``arguments`` and run the handler (a sync one in a worker thread, so the
        loop stays free).

        Raises:
            ToolError: the arguments do not fit the handler's parameters (nothing ran).
        """
        if self.signature is not None:
            args, kwargs = self.signature.bind(arguments)
        else:
            args, kwargs = [], dict(arguments)
        if inspect.iscoroutinefunction(self.handler):
            return await self.handler(*args, **kwargs)
        result = await anyio.to_thread.run_sync(lambda: self.handler(*args, **kwargs))
        if inspect.isawaitable(result):
            return await result
        return result


def build_tools(tools: Sequence[Any] | None) -> dict[str, Tool]:
    """Normalise the Agent's ``tools`` argument to ``{name: Tool}``."""
    result: dict[str, Tool] = {}
    for item in tools or ():
        if isinstance(item, Tool):
            tool = item
        elif isinstance(item, Mapping):
            tool = Tool.from_spec(item)
        elif callable(item):
            tool = Tool.from_function(item)
        else:
            raise ToolError(f"cannot use {item!r} as a tool")
        if tool.name in result:
            raise ToolError(f"two tools are named {tool.name!r}")
        result[tool.name] = tool
    return result


def tool_result(value: Any) -> tuple[Any, str]:
    """Return ``(output, text)`` for a handler's return value: the JSON value of the
    ``tool-output-available`` event and the tool message's content.

    Text stays text; anything pydantic can serialise becomes JSON (models, dataclasses,
    enums, dates, UUIDs, sets, tuples, bytes as UTF-8 text or else base64, NaN and infinities
    as strings). NUL characters and lone surrogate halves become U+FFFD, so the turn can be
    stored.

    Raises:
        ToolError: the value cannot be represented as JSON (an arbitrary object, a cycle).
    """
    if isinstance(value, str):
        text = clean_text(value)
        return text, text
    try:
        try:
            data = pydantic_core.to_jsonable_python(value)
        except UnicodeDecodeError:  # bytes that are not UTF-8 text
            data = pydantic_core.to_jsonable_python(value, bytes_mode="base64")
    except (pydantic_core.PydanticSerializationError, ValueError, RecursionError) as exc:
        raise ToolError(
            f"the tool returned a value of type {type(value).__name__} that cannot be sent "
            f"as JSON: {clean_text(str(exc))}"
        ) from None
    data = clean_value(data)
    if isinstance(data, str):
        return data, data
    return data, json.dumps(data, ensure_ascii=False)


def error_text(exc: BaseException) -> str:
    """``exc`` as storable text: ``"Type: message"`` (only the message for a ToolError,
    which is written for the model; only the type when there is no usable message)."""
    try:
        message = clean_text(str(exc))
    except Exception:  # a broken __str__ must not break the turn
        message = ""
    if isinstance(exc, ToolError) and message:
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
