"""Function tools: JSON schemas from Python signatures, and safe invocation."""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio.to_thread

from vel.errors import ToolError

_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _schema_for(annotation: Any) -> dict[str, Any]:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    if annotation in _SCALARS:
        return {"type": _SCALARS[annotation]}
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _schema_for(options[0])
        return {"anyOf": [_schema_for(a) for a in options]}
    if annotation in (list, tuple, set) or origin in (list, tuple, set, Sequence):
        return {"type": "array", "items": _schema_for(args[0])} if args else {"type": "array"}
    if annotation is dict or origin in (dict, Mapping):
        return {"type": "object"}
    return {}


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into (summary, {arg: description})."""
    summary_lines: list[str] = []
    params: dict[str, str] = {}
    section = "summary"
    arg_indent: int | None = None  # indentation of "name: ..." lines; deeper lines continue
    last_arg: str | None = None
    for raw in doc.splitlines():
        line = raw.strip()
        if re.fullmatch(r"(Args|Arguments|Parameters):", line):
            section = "args"
            arg_indent = last_arg = None
            continue
        if re.fullmatch(r"[A-Z][a-z]+:", line):
            section = "other"
            continue
        if section == "summary":
            summary_lines.append(line)
        elif section == "args" and line:
            indent = len(raw) - len(raw.lstrip())
            if arg_indent is None:
                arg_indent = indent
            match = re.match(r"(\w+)\s*(\([^)]*\))?:\s*(.*)", line)
            if match and indent <= arg_indent:
                last_arg = match.group(1)
                params[last_arg] = match.group(3)
            elif last_arg is not None and indent > arg_indent:
                params[last_arg] = f"{params[last_arg]} {line}".strip()
    return " ".join(" ".join(summary_lines).split()), params


@dataclass(frozen=True, slots=True)
class Tool:
    """A tool the model may call.

    Attributes:
        name: function name shown to the model.
        description: what it does.
        parameters: JSON schema of its arguments (an object schema).
        handler: the callable (sync or async) receiving the arguments as keywords.
    """

    name: str
    description: str
    parameters: dict[str, Any]
    handler: Callable[..., Any]

    @classmethod
    def from_function(cls, func: Callable[..., Any]) -> Tool:
        """Describe ``func`` from its signature, type hints and docstring."""
        name = getattr(func, "__name__", None)
        if not name or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise ToolError(f"tool {func!r} needs a name of 1-64 letters, digits, _ or -")
        summary, arg_docs = _docstring_parts(inspect.getdoc(func) or "")
        try:
            hints = typing.get_type_hints(func)
        except Exception:
            hints = {}
        properties: dict[str, Any] = {}
        required: list[str] = []
        for param in inspect.signature(func).parameters.values():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            schema = _schema_for(hints.get(param.name, param.annotation))
            if param.name in arg_docs:
                schema["description"] = arg_docs[param.name]
            properties[param.name] = schema
            if param.default is inspect.Parameter.empty:
                required.append(param.name)
        parameters = {"type": "object", "properties": properties, "required": required}
        return cls(name=name, description=summary or name, parameters=parameters, handler=func)

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

    async def call(self, arguments: dict[str, Any]) -> Any:
        """Run the handler; a sync handler runs in a worker thread so the loop stays free."""
        if inspect.iscoroutinefunction(self.handler):
            return await self.handler(**arguments)
        result = await anyio.to_thread.run_sync(lambda: self.handler(**arguments))
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


def render_output(value: Any) -> str:
    """The text a tool result carries in the chat history."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)
