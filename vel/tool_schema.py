"""JSON schemas and argument validation for function tools, from Python signatures.

:func:`signature_of` turns a function's parameters into one pydantic validator and the JSON
schema the model sees. Every type pydantic knows is described in full and converted on the
way in: dataclasses, Enums, dates and times, pydantic models, TypedDicts, ``Optional``,
unions, ``Literal``, lists, sets, tuples and dicts, ``Annotated[..., Field(...)]``.
Descriptions come from the function's Google-style docstring (``Args:``) and from the
docstrings of the classes it takes (``Attributes:``/``Args:`` sections, or attribute
docstrings). References are inlined, so OpenAI-compatible servers that ignore ``$defs``
still see the whole schema; only recursive types keep one.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, NotRequired, Required, cast, get_args, get_origin

import pydantic
import pydantic_core
from pydantic.fields import FieldInfo
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

# typing.TypedDict before 3.12 lacks what pydantic needs.
from typing_extensions import TypedDict

from vel.errors import ToolError

__all__ = ["ToolSignature", "docstring_parts", "signature_of"]


def docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into (summary, {name: description}).

    Names come from ``Args:``, ``Arguments:``, ``Parameters:`` and ``Attributes:`` sections;
    other sections (``Returns:``, ``Raises:``...) are left out of both.
    """
    summary_lines: list[str] = []
    params: dict[str, str] = {}
    section = "summary"
    arg_indent: int | None = None  # indentation of "name: ..." lines; deeper lines continue
    last_arg: str | None = None
    for raw in doc.splitlines():
        line = raw.strip()
        if re.fullmatch(r"(Args|Arguments|Parameters|Attributes|Fields):", line):
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


def _own_doc(cls: Any) -> str:
    """``cls``'s docstring, unless it is one Python wrote (a dataclass's signature line)."""
    doc = cls.__dict__.get("__doc__")
    if not isinstance(doc, str) or doc.startswith(f"{cls.__name__}("):
        return ""
    return inspect.cleandoc(doc)


class _Generator(GenerateJsonSchema):
    """pydantic's schema generator, with class docstrings split into a summary and
    per-field descriptions."""

    def _documented(self, json_schema: JsonSchemaValue, cls: Any) -> JsonSchemaValue:
        summary, fields = docstring_parts(_own_doc(cls))
        if summary:
            json_schema["description"] = summary
        else:
            json_schema.pop("description", None)
        for name, prop in json_schema.get("properties", {}).items():
            if name in fields and "description" not in prop:
                prop["description"] = fields[name]
        return json_schema

    def dataclass_schema(self, schema: core_schema.DataclassSchema) -> JsonSchemaValue:
        return self._documented(super().dataclass_schema(schema), schema["cls"])

    def model_schema(self, schema: core_schema.ModelSchema) -> JsonSchemaValue:
        return self._documented(super().model_schema(schema), schema["cls"])

    def typed_dict_schema(self, schema: core_schema.TypedDictSchema) -> JsonSchemaValue:
        cls = schema.get("cls")
        json_schema = super().typed_dict_schema(schema)
        return self._documented(json_schema, cls) if cls is not None else json_schema

    def enum_schema(self, schema: core_schema.EnumSchema) -> JsonSchemaValue:
        json_schema = super().enum_schema(schema)
        summary, _ = docstring_parts(_own_doc(schema["cls"]))
        if summary:
            json_schema["description"] = summary
        else:
            json_schema.pop("description", None)
        return json_schema


# JSON Schema keywords whose values are schemas (the rest hold data: default, enum, const...).
_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else")
_MANY = ("anyOf", "oneOf", "allOf", "prefixItems")
_NAMED = ("properties", "patternProperties", "$defs", "dependentSchemas")


def _map_schema(node: Any, fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Any:
    """Apply ``fn`` to every sub-schema of ``node`` (children first), never to data."""
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in _ONE:
        if isinstance(out.get(key), dict):
            out[key] = _map_schema(out[key], fn)
    for key in _MANY:
        if isinstance(out.get(key), list):
            out[key] = [_map_schema(item, fn) for item in out[key]]
    for key in _NAMED:
        if isinstance(out.get(key), dict):
            out[key] = {name: _map_schema(sub, fn) for name, sub in out[key].items()}
    return fn(out)


def _without_title(schema: dict[str, Any]) -> dict[str, Any]:
    schema.pop("title", None)
    return schema


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """Replace ``$ref``s by the definitions they name; a recursive type keeps its ``$defs``."""
    defs: dict[str, Any] = schema.pop("$defs", {})
    kept: dict[str, Any] = {}
    prefix = "#/$defs/"

    def resolve(node: Any, stack: tuple[str, ...]) -> Any:
        def visit(sub: dict[str, Any]) -> dict[str, Any]:
            ref = sub.get("$ref")
            if not isinstance(ref, str) or not ref.startswith(prefix):
                return sub
            name = ref[len(prefix) :]
            if name not in defs:
                return sub
            if name in stack:  # recursion: keep the reference and its definition
                if name not in kept:
                    kept[name] = None  # placeholder: resolved below, once
                    kept[name] = resolve(defs[name], (name,))
                return sub
            siblings = {k: v for k, v in sub.items() if k != "$ref"}
            return {**resolve(defs[name], (*stack, name)), **siblings}

        return _map_schema(node, visit)

    result: dict[str, Any] = resolve(schema, ())
    if kept:
        result["$defs"] = kept
    return result


@dataclass(frozen=True, slots=True)
class ToolSignature:
    """A function's parameters as one validator and one JSON schema.

    Attributes:
        description: the docstring's summary ('' without one).
        parameters: the JSON schema of the arguments object.
    """

    description: str
    parameters: dict[str, Any]
    _adapter: pydantic.TypeAdapter[Any]
    _positional: tuple[inspect.Parameter, ...]

    def bind(self, arguments: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
        """Validate and convert ``arguments`` (a JSON object's values) into the handler's
        ``(args, kwargs)``; an argument left out is not passed, so its default applies.

        Raises:
            ToolError: an argument is missing, unknown or of the wrong type (the message
                names each, for the model to correct).
        """
        try:
            values: dict[str, Any] = self._adapter.validate_python(dict(arguments))
        except pydantic.ValidationError as exc:
            raise ToolError(f"invalid arguments: {validation_text(exc)}") from None
        args: list[Any] = []
        present = [p.name in values for p in self._positional]
        if any(present):
            last = max(i for i, here in enumerate(present) if here)
            for param in self._positional[: last + 1]:
                args.append(values.pop(param.name, param.default))
        return args, values


def validation_text(exc: pydantic.ValidationError, limit: int = 10) -> str:
    """One line naming each failing field and why (at most ``limit`` of them)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:limit]:
        where = ".".join(str(p) for p in error["loc"]) or "arguments"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def _has_description(annotation: Any) -> bool:
    if get_origin(annotation) is not Annotated:
        return False
    return any(isinstance(m, FieldInfo) and m.description for m in get_args(annotation)[1:])


def signature_of(func: Callable[..., Any], name: str) -> ToolSignature:
    """Describe ``func``'s parameters (``*args``/``**kwargs`` are not parameters; with
    ``**kwargs`` unknown arguments are passed through instead of refused).

    Raises:
        ToolError: a type hint cannot be resolved (a class defined inside a function while
            annotations are strings) or cannot be described as JSON (an arbitrary class).
    """
    try:
        signature = inspect.signature(func, eval_str=True)
    except (NameError, SyntaxError, TypeError, AttributeError) as exc:
        raise ToolError(
            f"tool {name!r}: cannot resolve a type hint ({exc}); define the types a tool "
            "takes at module level"
        ) from exc
    summary, docs = docstring_parts(inspect.getdoc(func) or "")
    fields: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    positional: list[inspect.Parameter] = []
    extra = "forbid"
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            extra = "allow"
            continue
        if param.kind is param.VAR_POSITIONAL:
            continue
        if param.kind is param.POSITIONAL_ONLY:
            positional.append(param)
        annotation = Any if param.annotation is param.empty else param.annotation
        if param.name in docs and not _has_description(annotation):
            annotation = Annotated[annotation, pydantic.Field(description=docs[param.name])]
        if param.default is param.empty:
            fields[param.name] = Required[annotation]
        else:
            fields[param.name] = NotRequired[annotation]
            defaults[param.name] = param.default
    arguments: Any = TypedDict(f"{name}_arguments", fields)  # type: ignore[misc]
    arguments.__pydantic_config__ = pydantic.ConfigDict(  # type: ignore[attr-defined]
        extra=cast(Any, extra), use_attribute_docstrings=True
    )
    try:
        adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(arguments)
        schema = adapter.json_schema(schema_generator=_Generator)
    except (pydantic.PydanticUserError, pydantic.PydanticSchemaGenerationError) as exc:
        # (PydanticInvalidForJsonSchema is a PydanticUserError.)
        raise ToolError(f"tool {name!r}: a parameter cannot be described as JSON: {exc}") from exc
    # Titles only repeat the names (and cost tokens on every request).
    schema = _map_schema(_inline_refs(schema), _without_title)
    schema.pop("description", None)
    schema.setdefault("properties", {})
    schema.setdefault("required", [])
    for key, default in defaults.items():
        # A default that is not JSON is left out: the model just sees the argument optional.
        with contextlib.suppress(pydantic_core.PydanticSerializationError, ValueError):
            schema["properties"][key]["default"] = pydantic_core.to_jsonable_python(default)
    return ToolSignature(summary, schema, adapter, tuple(positional))
