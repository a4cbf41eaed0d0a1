"""Tool evolution: seeded variants of every built-in tool (docs/synthesis.md).

A :class:`ToolVariant` declares a base tool under another name, with other parameter names, a
reworded description, extra optional parameters that change nothing, and other argument formats
(:mod:`k2.agentic.synth.formats`). It keeps the mapping back to the base tool, so a call written
against the variant runs on the base domain (:class:`~k2.agentic.synth.variant_domain.VariantDomain`)
and every synthesized call can be checked and graded. :func:`evolve_tools` makes them: a pure
function of the seed, the domain and the tool, so the same seed gives the same variants on any
machine; :func:`held_out` splits them by id.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from k2.agentic.domain import Domain, get_domain
from k2.agentic.synth.formats import get_format, formats_for, non_null, nullable
from k2.errors import AgenticError

# Synonyms of the words tool names are made of (the word itself always counts).
WORDS: dict[str, tuple[str, ...]] = {
    "get": ("fetch", "lookup", "retrieve", "show", "read", "describe"),
    "list": ("enumerate", "browse", "show", "all", "query"),
    "find": ("lookup", "locate", "search", "resolve"),
    "search": ("find", "query", "lookup", "match"),
    "create": ("add", "new", "schedule", "book"),
    "move": ("reschedule", "shift", "relocate", "rename"),
    "cancel": ("delete", "remove", "drop", "void"),
    "add": ("insert", "invite", "include", "new"),
    "update": ("change", "edit", "modify", "set"),
    "delete": ("remove", "erase", "drop", "trash"),
    "set": ("change", "adjust", "configure", "update"),
    "scan": ("discover", "list", "survey"),
    "connect": ("join", "attach", "link"),
    "forget": ("remove", "unsave", "drop"),
    "revoke": ("remove", "withdraw", "deny", "strip"),
    "transfer": ("move_funds", "send_funds", "wire", "transfer_money"),
    "pay": ("settle", "remit", "pay_out"),
    "freeze": ("lock", "block", "suspend"),
    "unfreeze": ("unlock", "unblock", "reactivate"),
    "place": ("submit", "create", "make"),
    "return": ("refund", "send_back", "return"),
    "write": ("save", "put", "store"),
    "append": ("extend", "add_line", "append_text"),
    "tag": ("label", "mark", "categorize"),
    "block": ("mute", "ban", "blacklist"),
    "send": ("text", "deliver", "compose"),
    "account": ("acct", "bank_account", "ledger"),
    "customer": ("client", "user", "holder"),
    "transactions": ("history", "activity", "statement", "ledger_entries"),
    "bill": ("invoice", "payee_bill", "utility"),
    "orders": ("purchases", "order_history", "sales"),
    "order": ("purchase", "sale", "basket"),
    "product": ("item", "article", "catalog_item"),
    "address": ("shipping_address", "delivery_address", "location"),
    "items": ("products", "goods", "lines"),
    "events": ("meetings", "appointments", "agenda", "schedule"),
    "event": ("meeting", "appointment", "booking", "entry"),
    "free": ("open", "available", "empty"),
    "slot": ("window", "time", "gap"),
    "attendee": ("guest", "participant", "invitee"),
    "files": ("notes", "documents", "docs", "paths"),
    "file": ("note", "document", "doc", "page"),
    "contacts": ("people", "address_book", "directory"),
    "contact": ("person", "entry", "friend", "buddy"),
    "message": ("sms", "text", "note"),
    "messages": ("sms_thread", "texts", "conversation", "chat"),
    "settings": ("config", "preferences", "status", "state"),
    "toggle": ("switch", "flag", "option"),
    "level": ("value", "slider", "amount"),
    "wifi": ("wlan", "network", "wireless"),
    "app": ("application", "program"),
    "permissions": ("grants", "access", "rights"),
    "permission": ("grant", "access", "right"),
}
DROP_WORDS = {"to"}
PREFIXES: dict[str, tuple[str, ...]] = {
    "bank": ("bank", "banking", "fin"), "shop": ("shop", "store", "ecom"), "calendar": ("cal", "calendar", "sched"),
    "notes": ("notes", "fs", "docs"), "contacts": ("contacts", "phone", "msg"), "device": ("device", "phone", "sys"),
}
# Synonyms of parameter names (the name itself always counts).
PARAMS: dict[str, tuple[str, ...]] = {
    "customer_id": ("client_id", "customer", "cust_id", "customer_ref"),
    "account_id": ("account", "acct_id", "account_ref", "account_no"),
    "limit": ("max_results", "count", "top", "n"),
    "from_account": ("source_account", "from_acct", "debit_account", "payer_account"),
    "to_account": ("target_account", "to_acct", "destination_account", "credit_account"),
    "amount_cents": ("amount_in_cents", "cents", "value_cents"),
    "memo": ("note", "description", "reference", "remark"),
    "payee": ("biller", "recipient", "pay_to", "company"),
    "reason": ("why", "cause", "explanation", "note"),
    "email": ("email_address", "mail", "customer_email", "e_mail"),
    "order_id": ("order", "order_ref", "order_number", "purchase_id"),
    "sku": ("product_code", "product_id", "item_code", "article"),
    "items": ("products", "quantities", "basket", "cart"),
    "skus": ("product_codes", "item_codes", "products", "articles"),
    "address": ("new_address", "shipping_address", "street_address", "destination"),
    "date": ("day", "on_date", "for_date", "calendar_day"),
    "event_id": ("event", "meeting_id", "appointment_id", "entry_id"),
    "duration_minutes": ("minutes", "length_minutes", "duration", "length"),
    "earliest": ("not_before", "from_time", "earliest_start", "after"),
    "latest": ("not_after", "until", "latest_end", "before"),
    "title": ("name", "subject", "summary", "label"),
    "start": ("starts_at", "start_time", "begin", "from"),
    "end": ("ends_at", "end_time", "finish", "to"),
    "attendees": ("guests", "invitees", "participants", "people"),
    "location": ("place", "room", "venue", "where"),
    "folder": ("directory", "dir", "prefix", "under"),
    "path": ("file_path", "file", "location", "filename"),
    "query": ("text", "term", "search", "needle"),
    "content": ("body", "text", "data", "contents"),
    "overwrite": ("replace", "force", "allow_overwrite", "clobber"),
    "text": ("body", "message", "content", "words"),
    "source": ("from_path", "src", "old_path", "current_path"),
    "destination": ("to_path", "dst", "new_path", "target"),
    "tag": ("label", "category", "keyword", "tag_name"),
    "name": ("full_name", "display_name", "contact_name", "person"),
    "phone": ("phone_number", "number", "mobile", "tel"),
    "contact_id": ("contact", "person_id", "entry_id", "recipient_id"),
    "setting": ("option", "switch", "name", "key"),
    "enabled": ("on", "state", "enable", "active"),
    "value": ("level", "percent", "amount", "to"),
    "ssid": ("network", "network_name", "wifi_name", "name"),
    "password": ("passphrase", "key", "secret", "wifi_password"),
    "app": ("app_name", "application", "package", "program"),
    "permission": ("permission_name", "scope", "grant", "right"),
}
# Optional parameters a variant may add; the mapping drops them, so they change nothing.
EXTRAS: dict[str, dict[str, Any]] = {
    "request_id": {"type": "string", "description": "An optional id to trace this request in logs."},
    "locale": {"type": "string", "enum": ["en-US", "en-GB", "fr-FR", "de-DE"], "description": "Language of any text returned."},
    "client_version": {"type": "string", "description": "Version of the calling client, for support."},
    "trace": {"type": "boolean", "default": False, "description": "Log this call for debugging."},
}
OPENINGS = ("", "Use this to {x}", "{X}", "Tool: {x}", "This endpoint will {x}", "Call to {x}")
CLOSINGS = ("", "", " Returns JSON.", " Errors come back as JSON.", " Safe to retry.")


_FORMAT_WORDS = re.compile(r"(,|;)?\s*(e\.g\.[^;]*|YYYY-MM-DD( HH:MM)?|HH:MM|in cents|0-100)\.?")


@dataclass(frozen=True)
class ParamMap:
    """One base parameter as the variant declares it."""

    name: str
    base: str
    format: str


@dataclass
class ToolVariant:
    """A tool declared another way, with the mapping back to its base tool.

    ``id`` is ``DOMAIN.BASE_TOOL.vN``; ``spec`` the OpenAI function spec; ``params`` map the
    variant's parameter names to the base ones with their formats; ``extras`` are the added
    optional parameters the mapping drops.
    """

    id: str
    domain: str
    base: str
    spec: dict[str, Any]
    params: tuple[ParamMap, ...]
    extras: tuple[str, ...] = ()
    _by_name: dict[str, ParamMap] = field(default_factory=dict, repr=False, compare=False)
    _by_base: dict[str, ParamMap] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name = {p.name: p for p in self.params}
        self._by_base = {p.base: p for p in self.params}

    @property
    def name(self) -> str:
        return self.spec["function"]["name"]

    @property
    def parameters(self) -> dict[str, Any]:
        return self.spec["function"]["parameters"]

    def to_base(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The base tool's arguments for a call written against this variant (validated first).
        Raises ToolError ``invalid_argument`` for a value that fits the schema but means nothing."""
        out: dict[str, Any] = {}
        for key, value in arguments.items():
            if key in self.extras:
                continue
            p = self._by_name[key]
            out[p.base] = None if value is None else get_format(p.format, self.domain, p.base).to_base(value, key)
        return out

    def from_base(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments of a base call written the variant's way (raises AgenticError when the
        variant cannot express a value, e.g. an id without the numeric form)."""
        out: dict[str, Any] = {}
        for key, value in arguments.items():
            p = self._by_base.get(key)
            if p is None:
                raise AgenticError(f"variant {self.id}: the base tool {self.base} has no parameter {key!r}")
            try:
                out[p.name] = None if value is None else get_format(p.format, self.domain, key).from_base(value, key)
            except Exception as err:  # noqa: BLE001 - ToolError or a type error: cannot express it
                raise AgenticError(f"variant {self.id}: cannot write {key}={value!r} as {p.format}: {err}") from err
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "domain": self.domain, "base": self.base, "spec": self.spec,
            "params": [{"name": p.name, "base": p.base, "format": p.format} for p in self.params],
            "extras": list(self.extras),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ToolVariant:
        return cls(
            data["id"], data["domain"], data["base"], copy.deepcopy(data["spec"]),
            tuple(ParamMap(p["name"], p["base"], p["format"]) for p in data["params"]), tuple(data["extras"]),
        )


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from the parts' text: the same on every machine and Python (no ``hash()``)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


def _case(words: Sequence[str], style: str) -> str:
    flat = [w for part in words for w in part.split("_") if w]
    if style == "camel":
        return flat[0] + "".join(w.capitalize() for w in flat[1:])
    if style == "pascal":
        return "".join(w.capitalize() for w in flat)
    return "_".join(flat)


def _tool_name(rng: random.Random, domain: str, base: str, style: str) -> str:
    words = [w for w in base.split("_") if w not in DROP_WORDS]
    words = [rng.choice((w, *WORDS.get(w, ()))) for w in words]
    if len(words) > 1 and rng.random() < 0.25:
        words = [*words[1:], words[0]]  # noun first: account_get
    if rng.random() < 0.35:
        words = [rng.choice(PREFIXES.get(domain, (domain,))), *words]
    return _case(words, style)[:64]


def _reword(rng: random.Random, text: str) -> str:
    first = re.split(r"(?<=[.;])\s", text, maxsplit=1)[0].rstrip(".;")
    body = first if rng.random() < 0.5 else text.rstrip(".")
    opening = rng.choice(OPENINGS)
    if opening:
        lowered = body[:1].lower() + body[1:]
        body = opening.replace("{x}", lowered).replace("{X}", body[:1].upper() + body[1:])
    return body.rstrip(".") + "." + rng.choice(CLOSINGS)


def _variant(domain: type[Domain], base: str, spec: dict[str, Any], index: int, seed: int) -> ToolVariant:
    rng = random.Random(stable_seed("variant", seed, domain.name, base, index))
    style = rng.choice(("snake", "snake", "camel", "pascal"))
    name = _tool_name(rng, domain.name, base, style)
    fn = spec["function"]
    base_params = fn["parameters"]["properties"]
    required = set(fn["parameters"].get("required", ()))
    properties: dict[str, Any] = {}
    maps = []
    used: set[str] = set()
    chosen: dict[tuple[str, ...], str] = {}
    for pname, pschema in base_params.items():
        options = formats_for(domain.name, pname, pschema)
        key = tuple(options)  # parameters of one kind (start and end, two accounts) share a format
        if key not in chosen:
            chosen[key] = rng.choice(options) if rng.random() < 0.6 else "same"
        fmt_name = chosen[key]
        fmt = get_format(fmt_name, domain.name, pname)
        candidates = [c for c in (fmt.names or (pname, *PARAMS.get(pname, ()))) if _case([c], style) not in used]
        vname = _case([rng.choice(candidates or [pname + "_value"])], style)
        used.add(vname)
        inner = non_null(pschema)
        schema = fmt.schema(inner) if fmt_name != "same" else {k: v for k, v in inner.items() if k not in ("description", "default")}
        if nullable(pschema):
            schema = {"anyOf": [schema, {"type": "null"}]}
        described = pschema.get("description", "")
        if fmt_name != "same":  # the base text may state the base format: keep only what still holds
            described = _FORMAT_WORDS.sub("", described).strip(" ,;.")
        if described and rng.random() < 0.3:
            described = described[:1].upper() + described[1:]
        if fmt.hint:
            described = (described.rstrip(".") + "; " if described else "") + fmt.hint + "."
        if described:
            schema["description"] = described
        if "default" in pschema:
            default = pschema["default"]
            schema["default"] = default if default is None else fmt.from_base(default, pname)
        properties[vname] = schema
        maps.append(ParamMap(vname, pname, fmt_name))
    extras = []
    for extra in rng.sample(sorted(EXTRAS), rng.choice((0, 0, 1, 1, 2))):
        ename = _case([extra], style)
        if ename not in used:
            properties[ename] = copy.deepcopy(EXTRAS[extra])
            extras.append(ename)
            used.add(ename)
    variant_required = [m.name for m in maps if m.base in required]
    parameters = {"type": "object", "properties": properties, "required": variant_required, "additionalProperties": False}
    new_spec = {"type": "function", "function": {"name": name, "description": _reword(rng, fn["description"]), "parameters": parameters}}
    return ToolVariant(f"{domain.name}.{base}.v{index}", domain.name, base, new_spec, tuple(maps), tuple(extras))


def evolve_tools(
    domain: str | type[Domain], per_tool: int = 60, seed: int = 0, tools: Sequence[str] | None = None
) -> list[ToolVariant]:
    """``per_tool`` distinct variants of each tool of ``domain`` (of ``tools`` if given).

    Variant ``v0`` of each tool is the base tool itself (same name, parameters and formats), so
    the original declarations are part of the data too. Variants whose spec repeats an earlier
    one are drawn again (a spec is distinct by its canonical JSON).
    """
    if per_tool < 1:
        raise AgenticError(f"per_tool must be at least 1, not {per_tool}")
    cls = get_domain(domain)
    specs = {s["function"]["name"]: s for s in cls(None).tool_specs()}
    out: list[ToolVariant] = []
    for base in tools or sorted(specs):
        if base not in specs:
            raise AgenticError(f"domain {cls.name} has no tool {base!r}; its tools are: {', '.join(sorted(specs))}")
        spec = specs[base]
        params = tuple(ParamMap(p, p, "same") for p in spec["function"]["parameters"]["properties"])
        seen = {json.dumps(spec, sort_keys=True)}
        found = [ToolVariant(f"{cls.name}.{base}.v0", cls.name, base, copy.deepcopy(spec), params)]
        attempt = 0
        while len(found) < per_tool:
            attempt += 1
            if attempt > per_tool * 20:
                raise AgenticError(f"could not make {per_tool} distinct variants of {cls.name}.{base}")
            candidate = _variant(cls, base, spec, attempt, seed)
            key = json.dumps(candidate.spec, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            candidate.id = f"{cls.name}.{base}.v{len(found)}"
            found.append(candidate)
        out.extend(found)
    return out


def held_out(variant_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether a variant (or a task template) is held out of training: a stable hash of its id,
    so the split is the same whatever else changes. ``v0`` (the base tool) is never held out."""
    if variant_id.endswith(".v0"):
        return False
    return stable_seed("held-out", seed, variant_id) % 10_000 < fraction * 10_000


class VariantPool:
    """The variants of every tool of some domains, by base tool, split into train and held out.

    Args:
        domains: the domain names.
        per_tool: variants per tool.
        seed: the evolution seed.
        held_out_fraction: the share of variants (by id) never used in training.
        describe: an optional rewording backend (``text -> text``) for descriptions, e.g.
            :class:`~k2.agentic.synth.backends.OpenAIRewriter`.
    """

    def __init__(
        self,
        domains: Sequence[str],
        per_tool: int = 60,
        seed: int = 0,
        held_out_fraction: float = 0.1,
        describe: Callable[[str], str] | None = None,
    ) -> None:
        if not 0.0 <= held_out_fraction < 1.0:
            raise AgenticError(f"held_out_fraction must be in [0, 1), not {held_out_fraction}")
        self.seed = seed
        self.fraction = held_out_fraction
        self.variants: dict[str, ToolVariant] = {}
        self.by_tool: dict[tuple[str, str], dict[str, list[ToolVariant]]] = {}
        self.held: set[str] = set()
        for d in domains:
            variants = evolve_tools(d, per_tool, seed)
            for base in dict.fromkeys(v.base for v in variants):
                mine = [v for v in variants if v.base == base]
                held = {v.id for v in mine if held_out(v.id, held_out_fraction, seed)}
                if not held and held_out_fraction > 0 and len(mine) > 2:  # every tool has one held out
                    held = {min((v.id for v in mine[1:]), key=lambda i: stable_seed("held-out", seed, i))}
                self.held |= held
                for v in mine:
                    if describe is not None and not v.id.endswith(".v0"):
                        v.spec["function"]["description"] = describe(v.spec["function"]["description"])
                    self.variants[v.id] = v
                    split = "validation" if v.id in held else "train"
                    self.by_tool.setdefault((v.domain, v.base), {"train": [], "validation": []})[split].append(v)

    def is_held_out(self, variant_id: str) -> bool:
        """Whether a variant is held out: :func:`held_out`, plus, for a tool that rule left without
        any (and that has at least two variants besides ``v0``), its variant of smallest hash."""
        return variant_id in self.held

    def choose(self, rng: random.Random, domain: str, base: str, split: str) -> ToolVariant:
        """A variant of ``domain.base`` for an episode of ``split`` (held-out ones for validation,
        train ones when the pool holds none out)."""
        pools = self.by_tool[(domain, base)]
        pool = pools[split] or pools["train"]
        return rng.choice(pool)
