"""Tasks in tau2-bench's JSON format: load, check, save (docs/agentic.md).

A task file holds a JSON list of tasks (or one task object). Each task has ``id``, optional
``description``, ``user_scenario`` (``persona``, ``instructions``: a dict with ``domain``,
``reason_for_call``, ``known_info``, ``unknown_info``, ``task_instructions`` — or a plain
string), ``ticket``, ``initial_state`` (``initialization_data``, ``initialization_actions``,
``message_history``) and ``evaluation_criteria`` (``actions``, ``env_assertions``,
``communicate_info``, ``nl_assertions``, ``reward_basis``). Fields k2 does not know are kept
as they are and written back by :func:`save_tasks`. k2 adds one optional field the programmatic
user reads: ``user_scenario.instructions.facts``, a map from keywords to the answer the user
gives when the agent's message mentions one.

tau2's dual-control tasks (``env_type: "user"`` assertions/initialization actions,
``requestor: "user"`` gold actions, ``user_data``) need a user-side device that k2's domains do
not have: loading one raises :class:`~k2.errors.TaskError` naming the task and the field.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from k2.errors import K2IOError, TaskError

REWARD_TYPES = ("DB", "ENV_ASSERTION", "COMMUNICATE", "ACTION", "NL_ASSERTION")
DEFAULT_REWARD_BASIS = ("DB", "COMMUNICATE")


@dataclass(frozen=True)
class Action:
    """A gold tool call (``evaluation_criteria.actions``)."""

    action_id: str
    name: str
    arguments: dict[str, Any]
    compare_args: list[str] | None = None
    requestor: str = "assistant"


@dataclass(frozen=True)
class EnvCall:
    """An ``initialization_actions`` or ``env_assertions`` entry."""

    func_name: str
    arguments: dict[str, Any]
    assert_value: Any = True
    message: str | None = None
    env_type: str = "assistant"


class Task:
    """One task; :attr:`raw` is the full JSON object (unknown fields included)."""

    def __init__(self, raw: Mapping[str, Any], source: str = "<task>") -> None:
        self.raw = copy.deepcopy(dict(raw))
        self.source = source
        self._check()

    # ---- validation --------------------------------------------------------------------------
    def _fail(self, field: str, problem: str) -> TaskError:
        return TaskError(f"{self.source}: task {self.raw.get('id')!r}: field {field}: {problem}")

    def _get(self, obj: Any, key: str, field: str, kinds: tuple[type, ...], default: Any = None) -> Any:
        value = obj.get(key, default) if isinstance(obj, Mapping) else default
        if value is None:
            return default
        if not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self._fail(field, f"must be {names}, not {type(value).__name__}")
        return value

    def _check(self) -> None:
        raw = self.raw
        task_id = raw.get("id")
        if not isinstance(task_id, (str, int)) or isinstance(task_id, bool) or task_id == "":
            raise TaskError(f"{self.source}: a task has no usable 'id' (got {task_id!r})")
        self.id = str(task_id)
        scenario = self._get(raw, "user_scenario", "user_scenario", (dict,), {})
        instructions = scenario.get("instructions")
        if instructions is not None and not isinstance(instructions, (str, dict)):
            raise self._fail("user_scenario.instructions", "must be an object or a string")
        if isinstance(instructions, dict):
            for key in ("domain", "reason_for_call", "known_info", "unknown_info", "task_instructions"):
                self._get(instructions, key, f"user_scenario.instructions.{key}", (str,))
            facts = self._get(instructions, "facts", "user_scenario.instructions.facts", (dict,), {})
            for key, value in facts.items():
                if not isinstance(value, str):
                    raise self._fail(f"user_scenario.instructions.facts.{key}", "must be a string")
        initial = self._get(raw, "initial_state", "initial_state", (dict,), {})
        data = self._get(initial, "initialization_data", "initial_state.initialization_data", (dict,), {})
        self._get(data, "agent_data", "initial_state.initialization_data.agent_data", (dict,))
        if data.get("user_data") not in (None, {}):
            raise self._fail("initial_state.initialization_data.user_data", "user-side data (tau2 dual control) is not supported")
        self.initialization_actions = [
            self._env_call(c, f"initial_state.initialization_actions[{i}]")
            for i, c in enumerate(self._get(initial, "initialization_actions", "initial_state.initialization_actions", (list,), []))
        ]
        history = self._get(initial, "message_history", "initial_state.message_history", (list,), [])
        for i, message in enumerate(history):
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
                raise self._fail(f"initial_state.message_history[{i}]", "must be a message with a role")
        criteria = self._get(raw, "evaluation_criteria", "evaluation_criteria", (dict,), {})
        actions = []
        for i, a in enumerate(self._get(criteria, "actions", "evaluation_criteria.actions", (list,), [])):
            field = f"evaluation_criteria.actions[{i}]"
            if not isinstance(a, dict):
                raise self._fail(field, "must be an object")
            name = self._get(a, "name", f"{field}.name", (str,))
            if not name:
                raise self._fail(f"{field}.name", "is missing")
            requestor = self._get(a, "requestor", f"{field}.requestor", (str,), "assistant")
            if requestor != "assistant":
                raise self._fail(f"{field}.requestor", f"{requestor!r} actions (tau2 dual control) are not supported")
            compare = self._get(a, "compare_args", f"{field}.compare_args", (list,))
            actions.append(Action(
                str(a.get("action_id", f"{self.id}_{i}")), name,
                dict(self._get(a, "arguments", f"{field}.arguments", (dict,), {})), compare, requestor,
            ))
        self.actions = actions
        self.env_assertions = [
            self._env_call(c, f"evaluation_criteria.env_assertions[{i}]")
            for i, c in enumerate(self._get(criteria, "env_assertions", "evaluation_criteria.env_assertions", (list,), []))
        ]
        self.communicate_info = self._strings(criteria, "communicate_info")
        self.nl_assertions = self._strings(criteria, "nl_assertions")
        basis = self._get(criteria, "reward_basis", "evaluation_criteria.reward_basis", (list,), list(DEFAULT_REWARD_BASIS))
        for i, item in enumerate(basis):
            if item not in REWARD_TYPES:
                raise self._fail(f"evaluation_criteria.reward_basis[{i}]", f"{item!r} is not one of {REWARD_TYPES}")
        self.reward_basis = list(basis)

    def _strings(self, criteria: Mapping[str, Any], key: str) -> list[str]:
        items = self._get(criteria, key, f"evaluation_criteria.{key}", (list,), [])
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise self._fail(f"evaluation_criteria.{key}[{i}]", "must be a string")
        return list(items)

    def _env_call(self, call: Any, field: str) -> EnvCall:
        if not isinstance(call, dict):
            raise self._fail(field, "must be an object")
        env_type = self._get(call, "env_type", f"{field}.env_type", (str,), "assistant")
        if env_type != "assistant":
            raise self._fail(f"{field}.env_type", f"{env_type!r} (tau2 dual control: user-side tools) is not supported")
        name = self._get(call, "func_name", f"{field}.func_name", (str,))
        if not name:
            raise self._fail(f"{field}.func_name", "is missing")
        arguments = self._get(call, "arguments", f"{field}.arguments", (dict,), {})
        return EnvCall(name, dict(arguments), call.get("assert_value", True), call.get("message"), env_type)

    # ---- accessors ---------------------------------------------------------------------------
    @property
    def instructions(self) -> dict[str, Any] | str:
        """The user's instructions: a dict, or tau2's plain-string form."""
        return (self.raw.get("user_scenario") or {}).get("instructions") or {}

    @property
    def persona(self) -> str | None:
        return (self.raw.get("user_scenario") or {}).get("persona")

    @property
    def domain_name(self) -> str | None:
        """``user_scenario.instructions.domain`` (None for string instructions)."""
        ins = self.instructions
        return ins.get("domain") if isinstance(ins, dict) else None

    @property
    def agent_data(self) -> dict[str, Any] | None:
        data = ((self.raw.get("initial_state") or {}).get("initialization_data") or {})
        return data.get("agent_data")

    @property
    def message_history(self) -> list[dict[str, Any]]:
        return list((self.raw.get("initial_state") or {}).get("message_history") or [])

    def to_json(self) -> dict[str, Any]:
        """The task as JSON (a deep copy of :attr:`raw`)."""
        return copy.deepcopy(self.raw)

    def __repr__(self) -> str:
        return f"Task(id={self.id!r})"


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise K2IOError(f"cannot read the task file {path}: {err}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise TaskError(f"{path}: not JSON: {err.msg} at line {err.lineno} column {err.colno}") from err


def parse_tasks(data: Any, source: str = "<tasks>") -> list[Task]:
    """Tasks from already-parsed JSON (a list of task objects, or one)."""
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise TaskError(f"{source}: a task file holds a JSON list of tasks, not {type(data).__name__}")
    tasks = []
    seen: set[str] = set()
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise TaskError(f"{source}: entry {i} is not a task object")
        task = Task(item, source)
        if task.id in seen:
            raise TaskError(f"{source}: task {task.id!r}: field id: appears twice")
        seen.add(task.id)
        tasks.append(task)
    return tasks


def load_tasks(path: str | Path) -> list[Task]:
    """Read a tau2-format task file; a malformed one raises TaskError naming task and field."""
    path = Path(path)
    return parse_tasks(_read_json(path), str(path))


def save_tasks(tasks: Iterable[Task | Mapping[str, Any]], path: str | Path) -> None:
    """Write tasks as a JSON list (unknown fields kept)."""
    items = [t.to_json() if isinstance(t, Task) else Task(t).to_json() for t in tasks]
    path = Path(path)
    try:
        path.write_text(json.dumps(items, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as err:
        raise K2IOError(f"cannot write the task file {path}: {err}") from err


def example_tasks(domain: str) -> list[Task]:
    """The example tasks shipped with k2 for a built-in domain (``k2/agentic/example_tasks/DOMAIN.json``)."""
    resource = resources.files("k2.agentic") / "example_tasks" / f"{domain}.json"
    if not resource.is_file():
        return []
    return parse_tasks(json.loads(resource.read_text(encoding="utf-8")), f"k2/agentic/example_tasks/{domain}.json")


def find_task(tasks: Iterable[Task], task_id: str) -> Task:
    """The task with this id, or TaskError listing the ids there are."""
    tasks = list(tasks)
    for task in tasks:
        if task.id == str(task_id):
            return task
    raise TaskError(f"no task {task_id!r}; the ids are: {', '.join(t.id for t in tasks) or '(none)'}")
