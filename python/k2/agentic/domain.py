"""Domains: a JSON database, typed tools over it and a policy for the agent (docs/agentic.md).

Subclass :class:`Domain`, give it ``name``, ``policy`` and ``initial_state()``, and mark methods
with :func:`~k2.agentic.tools.tool`; the subclass then works everywhere a built-in domain does
(environments, grading, the MCP server, ``k2 env``). A tool raises
:class:`~k2.agentic.tools.ToolError` for an expected failure; :meth:`Domain.execute` turns that,
an unknown tool, bad JSON, a schema violation or even an unexpected exception into a structured
error result, so a bad call never ends an episode.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from k2.agentic.calls import ToolCall
from k2.agentic.tools import ToolError, function_spec, schema_errors, tool_info, validator_for
from k2.errors import AgenticError

_ASSERTION = "__k2_assertion__"


def assertion(fn: Callable) -> Callable:
    """Mark a Domain method as an assertion that task ``env_assertions`` may call by name."""
    setattr(fn, _ASSERTION, True)
    return fn


@dataclass
class ToolResult:
    """A tool's outcome: ``content`` (what the agent sees: JSON text), ``ok``, and for an error
    its ``code``; ``transient`` marks a simulated failure that changed nothing (retry it)."""

    content: str
    ok: bool
    code: str | None = None
    transient: bool = False


def error_content(code: str, message: str, retryable: bool = False) -> str:
    """The JSON text of a structured tool error."""
    return json.dumps({"error": {"code": code, "message": message, "retryable": retryable}}, ensure_ascii=False)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: the text the state hash is taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class Domain:
    """A stateful tool environment.

    Args:
        state: the database to start from (default: :meth:`initial_state`); deep-copied.
        stochastic: simulate transient failures (timeouts, unavailable service) that change nothing.
        failure_rate: chance that a call fails that way in stochastic mode.
        seed: seeds the stochastic failures.
    """

    name: ClassVar[str] = ""
    policy: ClassVar[str] = ""
    stateful: ClassVar[bool] = True
    """False for a domain whose state k2 cannot see (an MCP server): DB grading is then ungraded."""
    _method_cache: ClassVar[dict[type, dict[str, tuple[Callable, dict, str]]]] = {}

    def __init__(
        self,
        state: Mapping[str, Any] | None = None,
        *,
        stochastic: bool = False,
        failure_rate: float = 0.1,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= failure_rate <= 1.0:
            raise AgenticError(f"failure_rate must be in [0, 1], not {failure_rate}")
        self.stochastic = stochastic
        self.failure_rate = failure_rate
        self.seed = seed
        self._rng = random.Random(seed)
        self._start = self.set_state(self.initial_state() if state is None else state)

    # ---- state -------------------------------------------------------------------------------
    @classmethod
    def initial_state(cls) -> dict[str, Any]:
        """The database a fresh domain starts with."""
        return {}

    def default_state(self) -> dict[str, Any]:
        """The state this domain was made with: fresh copies for a task start from it."""
        return json.loads(self._start)

    def get_state(self) -> dict[str, Any]:
        """A deep copy of the database."""
        return json.loads(json.dumps(self.state))

    def set_state(self, state: Mapping[str, Any]) -> str:
        """Replace the database with a deep copy of ``state``, which must be JSON-serializable
        (copying through JSON checks that too); returns the JSON text."""
        try:
            text = json.dumps(state)
            self.state = json.loads(text)
        except (TypeError, ValueError) as err:
            raise AgenticError(f"domain {self.name}: the state is not JSON-serializable: {err}") from err
        if not isinstance(self.state, dict):
            raise AgenticError(f"domain {self.name}: the state must be a JSON object")
        return text

    def state_hash(self) -> str:
        """SHA-256 of the state's canonical JSON: equal states hash equal across runs and machines."""
        return hashlib.sha256(canonical_json(self.state).encode()).hexdigest()

    def fresh(self, state: Mapping[str, Any] | None = None, **options: Any) -> Domain:
        """A new domain of the same class, from ``state`` or the initial state (deterministic
        unless ``options`` say otherwise)."""
        return type(self)(state, **options)

    @contextlib.contextmanager
    def deterministic(self) -> Iterator[Domain]:
        """Within the block, calls never fail at random (setting a task up must not)."""
        saved, self.stochastic = self.stochastic, False
        try:
            yield self
        finally:
            self.stochastic = saved

    # ---- tools -------------------------------------------------------------------------------
    @classmethod
    def _methods(cls) -> dict[str, tuple[Callable, dict, str]]:
        found = Domain._method_cache.get(cls)
        if found is None:
            found = {}
            for attr in dir(cls):
                method = getattr(cls, attr, None)
                info = tool_info(method)
                if info is not None and callable(method):
                    found[info.name] = (method, function_spec(method, info.name), info.kind)
            Domain._method_cache[cls] = found
        return found

    def tool_specs(self) -> list[dict[str, Any]]:
        """The OpenAI function specs of this domain's tools, sorted by name."""
        return [spec for _, (_, spec, _) in sorted(self._methods().items())]

    def tool_names(self) -> list[str]:
        return [spec["function"]["name"] for spec in self.tool_specs()]

    def tool_kind(self, name: str) -> str:
        """``read``, ``write`` or ``generic``."""
        return self._methods()[name][2]

    def _invoke(self, name: str, arguments: dict[str, Any]) -> Any:
        """Run the tool (arguments already validated); subclasses with dynamic tools override."""
        method = self._methods()[name][0]
        return method(self, **arguments)

    def _schema(self, name: str) -> dict[str, Any] | None:
        """The parameter schema of tool ``name``, None if there is no such tool."""
        entry = self._methods().get(name)
        return entry[1]["function"]["parameters"] if entry else None

    def _validator(self, name: str, schema: dict[str, Any]) -> Any:
        cache = self.__dict__.setdefault("_validators", {})
        found = cache.get(name)
        if found is None:
            found = cache[name] = validator_for(schema)
        return found

    def call(self, name: str, arguments: Mapping[str, Any] | None = None) -> ToolResult:
        """Call a tool by name; every failure comes back as a structured error result."""
        return self.execute(ToolCall(name, dict(arguments or {})))

    def execute(self, call: ToolCall) -> ToolResult:
        """Validate and run one parsed call against the state."""
        if call.error is not None:
            return ToolResult(error_content("invalid_call", call.error), False, "invalid_call")
        schema = self._schema(call.name)
        if schema is None:
            known = ", ".join(self.tool_names())
            message = f"unknown tool {call.name!r} in domain {self.name}; its tools are: {known}"
            return ToolResult(error_content("unknown_tool", message), False, "unknown_tool")
        arguments = call.arguments or {}
        if not self._validator(call.name, schema).is_valid(arguments):
            problems = "; ".join(schema_errors(schema, arguments))
            message = f"arguments of {call.name} do not match its schema: {problems}"
            return ToolResult(error_content("invalid_arguments", message), False, "invalid_arguments")
        if self.stochastic and self._rng.random() < self.failure_rate:
            kind = self._rng.choice(("timeout", "unavailable"))
            message = (
                f"{call.name} timed out; nothing was changed, try again"
                if kind == "timeout"
                else f"the {self.name} service is temporarily unavailable; nothing was changed, try again"
            )
            return ToolResult(error_content(kind, message, True), False, kind, transient=True)
        try:
            value = self._invoke(call.name, arguments)
        except ToolError as err:
            return ToolResult(error_content(err.code, err.message, err.retryable), False, err.code)
        except AgenticError:
            raise
        except Exception as err:  # a bug in a user's tool must not end the episode
            message = f"{call.name} failed: {type(err).__name__}: {err}"
            return ToolResult(error_content("internal_error", message), False, "internal_error")
        content = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        return ToolResult(content, True)

    # ---- assertions --------------------------------------------------------------------------
    def run_assertion(self, func_name: str, arguments: Mapping[str, Any]) -> Any:
        """Call an ``@assertion`` or ``read`` tool method by name (task ``env_assertions``)."""
        method = getattr(type(self), func_name, None)
        info = tool_info(method)
        if method is None or not (getattr(method, _ASSERTION, False) or (info and info.kind == "read")):
            raise AgenticError(f"domain {self.name} has no assertion or read tool {func_name!r}")
        return method(self, **dict(arguments))


_REGISTRY: dict[str, type[Domain]] = {}


def register_domain(cls: type[Domain]) -> type[Domain]:
    """Class decorator: make a Domain subclass known to :func:`domains` by its ``name``."""
    if not cls.name:
        raise AgenticError(f"{cls.__qualname__} needs a non-empty `name` to be registered")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    importlib.import_module("k2.agentic.builtin")


def domains() -> list[str]:
    """The names of the registered domains (the built-in ones and any registered since)."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_domain(spec: str | type[Domain] | Domain) -> type[Domain]:
    """A Domain class from a registered name, ``module:Class``, a class or an instance."""
    if isinstance(spec, Domain):
        return type(spec)
    if isinstance(spec, type) and issubclass(spec, Domain):
        return spec
    if not isinstance(spec, str):
        raise AgenticError(f"not a domain: {spec!r}")
    _load_builtins()
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise AgenticError(f"cannot import the domain {spec!r}: {err}") from err
        if isinstance(cls, type) and issubclass(cls, Domain):
            return cls
        raise AgenticError(f"{spec!r} is not a k2.agentic.Domain subclass")
    raise AgenticError(f"unknown domain {spec!r}; known: {', '.join(sorted(_REGISTRY))} (or module:Class)")


def make_domain(spec: str | type[Domain] | Domain, **options: Any) -> Domain:
    """An instance from a name, ``module:Class``, class, or an instance (returned as is)."""
    if isinstance(spec, Domain):
        return spec
    return get_domain(spec)(**options)
