"""Tool specs from typed methods, checked against the jsonschema package."""

from __future__ import annotations

import json
import random
from typing import Literal

import jsonschema
import pytest

from k2.agentic import Domain, function_spec, tool
from k2.agentic.tools import schema_errors
from k2.errors import AgenticError

from agentic_helpers import CounterDomain


def sample(a: str, b: int, c: float = 1.5, d: bool = False, e: list[str] | None = None,
           f: dict[str, int] | None = None, g: Literal["x", "y"] = "x") -> None:
    """Do a thing.

    More words.

    Args:
        a: the a.
        b: the b,
            continued.
        c: the c.

    Returns:
        nothing.
    """


def test_spec_from_a_typed_docstringd_function() -> None:
    spec = function_spec(sample)
    assert spec == {
        "type": "function",
        "function": {
            "name": "sample",
            "description": "Do a thing.\n\nMore words.",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "string", "description": "the a."},
                    "b": {"type": "integer", "description": "the b, continued."},
                    "c": {"type": "number", "description": "the c.", "default": 1.5},
                    "d": {"type": "boolean", "default": False},
                    "e": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}], "default": None},
                    "f": {"anyOf": [{"type": "object", "additionalProperties": {"type": "integer"}}, {"type": "null"}], "default": None},
                    "g": {"enum": ["x", "y"], "type": "string", "default": "x"},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    }
    jsonschema.Draft202012Validator.check_schema(spec["function"]["parameters"])


def test_every_builtin_spec_is_valid_json_schema() -> None:
    from k2.agentic import domains, make_domain

    for name in domains():
        for spec in make_domain(name).tool_specs():
            jsonschema.Draft202012Validator.check_schema(spec["function"]["parameters"])
            assert spec["function"]["description"]


def _random_value(rng: random.Random):
    return rng.choice([0, 3, -2, 1.5, "s", "", True, None, [], ["a"], [1], {}, {"k": 1}, "x", "y"])


def test_validation_agrees_with_jsonschema_on_random_arguments() -> None:
    schema = function_spec(sample)["function"]["parameters"]
    rng = random.Random(0)
    keys = ["a", "b", "c", "d", "e", "f", "g", "zzz"]
    agreed = {True: 0, False: 0}
    for _ in range(600):
        args = {k: _random_value(rng) for k in rng.sample(keys, rng.randint(0, 3))}
        if rng.random() < 0.8:
            args.update(a=rng.choice(["s", "s", 1]), b=rng.choice([3, 3, "x", 1.5]))
        try:
            jsonschema.validate(args, schema, cls=jsonschema.Draft202012Validator)
            expected = True
        except jsonschema.ValidationError:
            expected = False
        assert (schema_errors(schema, args) == []) is expected, args
        agreed[expected] += 1
    assert agreed[True] > 30 and agreed[False] > 100


def test_bad_tool_definitions_fail_clearly() -> None:
    def untyped(self, x) -> None:
        """No hint."""

    with pytest.raises(AgenticError, match="needs a type hint"):
        function_spec(untyped)

    def weird(self, x: complex) -> None:
        """Unsupported."""

    with pytest.raises(AgenticError, match="complex"):
        function_spec(weird)
    with pytest.raises(AgenticError, match="kind"):
        tool(kind="delete")


def test_bad_calls_become_structured_errors_never_exceptions() -> None:
    d = CounterDomain()
    before = d.state_hash()
    cases = {
        ("nope", "{}"): "unknown_tool",
        ("add", '{"key": 5}'): "invalid_arguments",
        ("add", '{"key": "a", "extra": 1}'): "invalid_arguments",
        ("add", '{"key": "a", "mode": "multiply"}'): "invalid_arguments",
        ("add", "{}"): "invalid_arguments",
        ("get", '{"key": "zz"}'): "not_found",
        ("crash", '{"why": "boom"}'): "internal_error",
    }
    from k2.agentic import ToolCall
    from k2.agentic.calls import _parse_arguments

    for (name, raw), code in cases.items():
        args, err = _parse_arguments(name, raw)
        result = d.execute(ToolCall(name, args, "", raw, err))
        assert not result.ok and result.code == code, (name, raw, result)
        body = json.loads(result.content)["error"]
        assert body["code"] == code and body["message"]
    huge = '{"key": "' + "k" * 70_000 + '"}'
    args, err = _parse_arguments("functions.add:0", huge)
    result = d.execute(ToolCall("add", args, "functions.add:0", huge, err))
    assert result.code == "invalid_call" and "over the limit" in result.content
    assert d.state_hash() == before
    assert d.call("add", {"key": "a", "amount": 4}).content == "5"


def test_a_user_domain_lists_its_tools() -> None:
    d = CounterDomain()
    assert d.tool_names() == ["add", "crash", "get"]
    assert [d.tool_kind(n) for n in d.tool_names()] == ["write", "generic", "read"]
    assert isinstance(d, Domain)
