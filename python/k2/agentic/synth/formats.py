"""Argument formats a tool variant may declare instead of its base tool's (docs/synthesis.md).

A format rewrites one parameter's JSON Schema and converts values both ways: ``to_base`` turns
what a caller wrote against the variant into the base tool's value (raising
:class:`~k2.agentic.tools.ToolError` ``invalid_argument`` for a value the schema let through but
that means nothing, such as 31/02/2025), ``from_base`` writes a base value the variant's way (the
expert agent and the gold actions use it). ``from_base`` then ``to_base`` is the identity on every
base value the format applies to; the tests check that.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from k2.agentic.tools import ToolError

# Ids whose base form is a fixed prefix and a number: (domain, parameter) -> prefix.
ID_PREFIXES: dict[tuple[str, str], str] = {
    ("bank", "customer_id"): "c",
    ("bank", "account_id"): "acc-",
    ("bank", "from_account"): "acc-",
    ("bank", "to_account"): "acc-",
    ("shop", "customer_id"): "u",
    ("shop", "order_id"): "o-",
    ("calendar", "event_id"): "ev",
    ("contacts", "contact_id"): "k",
}
DATETIME_PARAMS = {("calendar", "start"), ("calendar", "end")}
DATE_PARAMS = {("calendar", "date")}
CLOCK_PARAMS = {("calendar", "earliest"), ("calendar", "latest")}


def _bad(param: str, value: Any, form: str) -> ToolError:
    return ToolError(f"{param}: {value!r} is not {form}", "invalid_argument")


@dataclass(frozen=True)
class ArgFormat:
    """One way of writing a parameter: its schema, a description hint and both conversions."""

    name: str
    applies: Callable[[str, str, dict[str, Any]], bool]
    """(domain, base parameter name, base schema without null) -> whether this format fits."""
    schema: Callable[[dict[str, Any]], dict[str, Any]]
    hint: str
    to_base: Callable[[Any, str], Any]
    from_base: Callable[[Any, str], Any]
    names: tuple[str, ...] = ()
    """Parameter names that suit this format (empty: the parameter's usual synonyms)."""


def _same_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k not in ("description", "default")}


def _identity(value: Any, _param: str) -> Any:
    return value


# ---- money ---------------------------------------------------------------------------------
def _is_cents(domain: str, param: str, schema: dict[str, Any]) -> bool:
    return param.endswith("_cents") and schema.get("type") == "integer"


def _dollars_number_to_base(value: Any, param: str) -> int:
    cents = round(value * 100)
    if abs(cents - value * 100) > 1e-6:
        raise _bad(param, value, "an amount with at most two decimals")
    return int(cents)


def _dollars_string_to_base(value: Any, param: str) -> int:
    whole, _, frac = value.partition(".")
    return int(whole) * 100 + int(frac)


def _dollars_string_from_base(value: Any, _param: str) -> str:
    return f"{value // 100}.{value % 100:02d}"


# ---- date and time -------------------------------------------------------------------------
_BASE_DT = "%Y-%m-%d %H:%M"
_DT_FORMS = {"iso_t": "%Y-%m-%dT%H:%M", "dmy_time": "%d/%m/%Y %H:%M"}
_DT_PATTERNS = {"iso_t": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}$", "dmy_time": r"^\d{2}/\d{2}/\d{4} \d{2}:\d{2}$"}
_DATE_FORMS = {"dmy": "%d/%m/%Y", "compact": "%Y%m%d"}
_DATE_PATTERNS = {"dmy": r"^\d{2}/\d{2}/\d{4}$", "compact": r"^\d{8}$"}


def _reformat(value: str, param: str, source: str, target: str, form: str) -> str:
    try:
        return datetime.strptime(value, source).strftime(target)
    except ValueError:
        raise _bad(param, value, form) from None


def _dt_format(key: str) -> ArgFormat:
    fmt, pattern = _DT_FORMS[key], _DT_PATTERNS[key]
    shown = fmt.replace("%Y", "YYYY").replace("%m", "MM").replace("%d", "DD").replace("%H", "HH").replace("%M", "MM")
    return ArgFormat(
        key,
        lambda d, p, s: (d, p) in DATETIME_PARAMS,
        lambda s: {"type": "string", "pattern": pattern},
        f"written {shown}",
        lambda v, p: _reformat(v, p, fmt, _BASE_DT, f"a time written {shown}"),
        lambda v, p: _reformat(v, p, _BASE_DT, fmt, "a base time"),
    )


def _split_to_base(value: Any, param: str) -> str:
    return _reformat(f"{value['date']} {value['time']}", param, _BASE_DT, _BASE_DT, "a date and a time")


def _split_from_base(value: Any, _param: str) -> dict[str, str]:
    date, _, time = value.partition(" ")
    return {"date": date, "time": time}


def _date_format(key: str) -> ArgFormat:
    fmt, pattern = _DATE_FORMS[key], _DATE_PATTERNS[key]
    shown = fmt.replace("%Y", "YYYY").replace("%m", "MM").replace("%d", "DD")
    return ArgFormat(
        key,
        lambda d, p, s: (d, p) in DATE_PARAMS,
        lambda s: {"type": "string", "pattern": pattern},
        f"written {shown}",
        lambda v, p: _reformat(v, p, fmt, "%Y-%m-%d", f"a date written {shown}"),
        lambda v, p: _reformat(v, p, "%Y-%m-%d", fmt, "a base date"),
    )


def _minutes_to_base(value: Any, _param: str) -> str:
    return f"{value // 60:02d}:{value % 60:02d}"


def _minutes_from_base(value: Any, param: str) -> int:
    hours, _, minutes = value.partition(":")
    return int(hours) * 60 + int(minutes)


# ---- ids -----------------------------------------------------------------------------------
def _id_number_to_base(prefix: str) -> Callable[[Any, str], str]:
    return lambda value, _param: f"{prefix}{value}"


def _id_number_from_base(prefix: str) -> Callable[[Any, str], int]:
    def convert(value: Any, param: str) -> int:
        rest = value[len(prefix):] if isinstance(value, str) and value.startswith(prefix) else ""
        if not re.fullmatch(r"[1-9]\d*", rest):
            raise _bad(param, value, f"an id of the form {prefix}NUMBER")
        return int(rest)

    return convert


def _id_format(domain: str, param: str) -> ArgFormat:
    prefix = ID_PREFIXES[(domain, param)]
    return ArgFormat(
        "id_number",
        lambda d, p, s: (d, p) in ID_PREFIXES,
        lambda s: {"type": "integer", "minimum": 1},
        f"the number only (the id {prefix}123 is written 123)",
        _id_number_to_base(prefix),
        _id_number_from_base(prefix),
    )


# ---- booleans, enums, lists, maps ----------------------------------------------------------
def _switch(on: str, off: str) -> ArgFormat:
    return ArgFormat(
        f"{on}_{off}",
        lambda d, p, s: s.get("type") == "boolean",
        lambda s: {"type": "string", "enum": [on, off]},
        f'"{on}" or "{off}"',
        lambda v, p: v == on,
        lambda v, p: on if v else off,
    )


def _is_str_enum(domain: str, param: str, schema: dict[str, Any]) -> bool:
    return schema.get("type") == "string" and isinstance(schema.get("enum"), list)


def _is_str_list(domain: str, param: str, schema: dict[str, Any]) -> bool:
    return schema.get("type") == "array" and (schema.get("items") or {}).get("type") == "string"


def _csv_to_base(value: Any, param: str) -> list[str]:
    items = [part.strip() for part in value.split(",")]
    if any(not item for item in items):
        raise _bad(param, value, "a comma-separated list without empty entries")
    return items


def _is_count_map(domain: str, param: str, schema: dict[str, Any]) -> bool:
    return schema.get("type") == "object" and (schema.get("additionalProperties") or {}).get("type") == "integer"


def _pairs_to_base(value: Any, param: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for entry in value:
        if entry["sku"] in out:
            raise _bad(param, value, "a list naming each sku once")
        out[entry["sku"]] = entry["quantity"]
    return out


_PAIRS_SCHEMA = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}},
        "required": ["sku", "quantity"],
        "additionalProperties": False,
    },
}

SAME = ArgFormat("same", lambda d, p, s: True, _same_schema, "", _identity, _identity)

_STATIC: list[ArgFormat] = [
    ArgFormat("dollars_number", _is_cents, lambda s: {"type": "number", "minimum": 0}, "in dollars, e.g. 15.5 for $15.50",
              _dollars_number_to_base, lambda v, p: v / 100, names=("amount", "amount_usd", "sum", "value")),
    ArgFormat("dollars_string", _is_cents, lambda s: {"type": "string", "pattern": r"^\d+\.\d{2}$"},
              'in dollars as a string with two decimals, e.g. "15.50"', _dollars_string_to_base, _dollars_string_from_base,
              names=("amount", "amount_str", "amount_text", "total")),
    _dt_format("iso_t"),
    _dt_format("dmy_time"),
    ArgFormat("date_time_object", lambda d, p, s: (d, p) in DATETIME_PARAMS,
              lambda s: {"type": "object", "properties": {"date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}$"},
                                                          "time": {"type": "string", "pattern": r"^\d{2}:\d{2}$"}},
                         "required": ["date", "time"], "additionalProperties": False},
              'an object {"date": "YYYY-MM-DD", "time": "HH:MM"}', _split_to_base, _split_from_base),
    _date_format("dmy"),
    _date_format("compact"),
    ArgFormat("minutes", lambda d, p, s: (d, p) in CLOCK_PARAMS, lambda s: {"type": "integer", "minimum": 0, "maximum": 1439},
              "as minutes after midnight, e.g. 540 for 09:00", _minutes_to_base, _minutes_from_base),
    _switch("on", "off"),
    _switch("yes", "no"),
    ArgFormat("upper", _is_str_enum, lambda s: {"type": "string", "enum": [str(e).upper() for e in s["enum"]]},
              "upper case", lambda v, p: v.lower(), lambda v, p: v.upper()),
    ArgFormat("csv", _is_str_list, lambda s: {"type": "string", "minLength": 1}, "a comma-separated list",
              _csv_to_base, lambda v, p: ",".join(v)),
    ArgFormat("sku_pairs", _is_count_map, lambda s: _PAIRS_SCHEMA, 'a list of {"sku", "quantity"} objects',
              _pairs_to_base, lambda v, p: [{"sku": k, "quantity": q} for k, q in v.items()],
              names=("items", "lines", "order_lines", "products")),
]
FORMATS: dict[str, ArgFormat] = {f.name: f for f in [SAME, *_STATIC]}
FORMATS["id_number"] = ArgFormat("id_number", lambda d, p, s: (d, p) in ID_PREFIXES, lambda s: {}, "", _identity, _identity)


def get_format(name: str, domain: str, param: str) -> ArgFormat:
    """The format called ``name`` for this parameter (id formats depend on the domain's prefix)."""
    if name == "id_number":
        return _id_format(domain, param)
    return FORMATS[name]


def formats_for(domain: str, param: str, schema: dict[str, Any]) -> list[str]:
    """The names of the formats that fit a base parameter (always ``same`` first)."""
    inner = non_null(schema)
    return [name for name, f in FORMATS.items() if f.applies(domain, param, inner)]


def non_null(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema of a ``T | None`` parameter without its null branch (else the schema itself)."""
    branches = schema.get("anyOf")
    if isinstance(branches, list) and len(branches) == 2 and {"type": "null"} in branches:
        return next(b for b in branches if b != {"type": "null"})
    return schema


def nullable(schema: dict[str, Any]) -> bool:
    return non_null(schema) is not schema
