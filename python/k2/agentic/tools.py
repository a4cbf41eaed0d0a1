"""Tool specs from typed, docstring'd methods, and argument validation (docs/agentic.md).

A tool is an OpenAI-style function spec::

    {"type": "function", "function": {"name", "description", "parameters": JSON Schema}}

:func:`tool` marks a :class:`~k2.agentic.Domain` method as a tool of kind ``read``, ``write`` or
``generic``; :func:`function_spec` builds its spec from the signature's type hints (``str``,
``int``, ``float``, ``bool``, ``list[T]``, ``dict[str, T]``, ``Literal[...]``, ``T | None``)
and the Google-style docstring (summary, then ``Args:`` lines). Arguments are validated with the
``jsonschema`` package; compiled validators are cached per schema.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from k2.errors import AgenticError
from k2.optional import require

ToolKind = Literal["read", "write", "generic"]
TOOL_KINDS = ("read", "write", "generic")
_MARK = "__k2_tool__"


@dataclass(frozen=True)
class ToolInfo:
    """What :func:`tool` records on a method."""

    name: str
    kind: str


def tool(fn: Callable | None = None, *, kind: str = "generic", name: str | None = None):
    """Mark a Domain method as a tool (``@tool`` or ``@tool(kind="write")``).

    ``read`` tools never change the state, ``write`` tools may; ``generic`` ones (a calculator,
    a transfer to a human) touch no state. ``k2 env`` shows the kind, and a task's
    ``env_assertions`` may call ``read`` tools (besides ``@assertion`` methods).
    """
    if kind not in TOOL_KINDS:
        raise AgenticError(f"tool kind must be one of {TOOL_KINDS}, not {kind!r}")

    def mark(method: Callable) -> Callable:
        setattr(method, _MARK, ToolInfo(name or method.__name__, kind))
        return method

    return mark(fn) if fn is not None else mark


def tool_info(method: Any) -> ToolInfo | None:
    """The :class:`ToolInfo` of a method marked with :func:`tool`, else None."""
    return getattr(method, _MARK, None)


class ToolError(Exception):
    """Raised by a tool for an expected failure (not found, insufficient funds...).

    The environment turns it into a structured error message the agent sees; it never ends the
    episode. ``code`` is a short machine-readable reason.
    """

    def __init__(self, message: str, code: str = "tool_error", retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable


def _schema_for(annotation: Any, where: str) -> dict[str, Any]:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is str:
        return {"type": "string"}
    if annotation is bool:
        return {"type": "boolean"}
    if annotation is int:
        return {"type": "integer"}
    if annotation is float:
        return {"type": "number"}
    if annotation is Any:
        return {}
    if origin is Literal:
        kinds = {type(a) for a in args}
        schema: dict[str, Any] = {"enum": list(args)}
        if kinds == {str}:
            schema["type"] = "string"
        elif kinds == {int}:
            schema["type"] = "integer"
        return schema
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            inner = _schema_for(rest[0], where)
            return {"anyOf": [inner, {"type": "null"}]}
        return {"anyOf": [_schema_for(a, where) for a in args]}
    if origin in (list, tuple, set, frozenset) or annotation in (list, tuple):
        item = args[0] if args else Any
        return {"type": "array", "items": _schema_for(item, where)}
    if origin is dict or annotation is dict:
        value = args[1] if len(args) == 2 else Any
        return {"type": "object", "additionalProperties": _schema_for(value, where)}
    raise AgenticError(f"{where}: cannot describe the type {annotation!r} in JSON Schema")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {arg: description}) from a Google-style docstring."""
    doc = inspect.cleandoc(doc or "")
    sections = re.split(r"\n\s*\n", doc)
    summary_parts = []
    params: dict[str, str] = {}
    lines = doc.splitlines()
    in_args = False
    current = None
    for line in lines:
        stripped = line.strip()
        if re.fullmatch(r"(Args|Arguments|Parameters):", stripped):
            in_args = True
            continue
        if in_args:
            if re.fullmatch(r"[A-Z][A-Za-z ]*:", stripped):  # next section (Returns:, Raises:)
                in_args = False
                continue
            m = re.match(r"^\s{0,8}(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", line)
            if m and (line.startswith("    ") and not line.startswith("        ")):
                current = m.group(1)
                params[current] = m.group(2).strip()
            elif current and stripped:
                params[current] = (params[current] + " " + stripped).strip()
    for section in sections:
        if re.match(r"\s*(Args|Arguments|Parameters|Returns|Raises|Yields|Example|Examples):", section):
            break
        summary_parts.append(" ".join(s.strip() for s in section.splitlines()))
    return "\n\n".join(summary_parts).strip(), params


def function_spec(method: Callable, name: str | None = None) -> dict[str, Any]:
    """The OpenAI function spec of a typed, docstring'd method (``self`` left out).

    Every parameter needs a type hint; one without a default is required. The object schema
    sets ``additionalProperties: false``, so an unknown argument is a schema violation.
    """
    info = tool_info(method)
    name = name or (info.name if info else method.__name__)
    hints = typing.get_type_hints(method)
    description, arg_docs = _parse_docstring(method.__doc__ or "")
    properties: dict[str, Any] = {}
    required: list[str] = []
    for param in inspect.signature(method).parameters.values():
        if param.name == "self":
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise AgenticError(f"tool {name}: *args/**kwargs cannot be described as a tool")
        if param.name not in hints:
            raise AgenticError(f"tool {name}: parameter {param.name!r} needs a type hint")
        schema = _schema_for(hints[param.name], f"tool {name}, parameter {param.name!r}")
        if param.name in arg_docs:
            schema["description"] = arg_docs[param.name]
        if param.default is inspect.Parameter.empty:
            required.append(param.name)
        elif param.default is None or isinstance(param.default, (str, int, float, bool)):
            schema["default"] = param.default
        properties[param.name] = schema
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }
    return {
        "type": "function",
        "function": {"name": name, "description": description or name, "parameters": parameters},
    }


_VALIDATORS: dict[str, Any] = {}


def validator_for(schema: Mapping[str, Any]) -> Any:
    """A compiled ``jsonschema`` validator for ``schema``, cached by the schema's JSON text."""
    key = json.dumps(schema, sort_keys=True)
    found = _VALIDATORS.get(key)
    if found is None:
        jsonschema = require("jsonschema", extra="agentic", purpose="k2.agentic's argument checks")
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as err:
            raise AgenticError(f"invalid tool parameter schema: {err.message}") from err
        found = _VALIDATORS[key] = cls(schema)
    return found


def schema_errors(schema: Mapping[str, Any], arguments: Any) -> list[str]:
    """Every way ``arguments`` violates ``schema``, as ``path: message`` strings (empty if valid)."""
    errors = sorted(validator_for(schema).iter_errors(arguments), key=lambda e: list(e.path))
    out = []
    for err in errors:
        path = "/".join(str(p) for p in err.path) or "(arguments)"
        out.append(f"{path}: {err.message}")
    return out
