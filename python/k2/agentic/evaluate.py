"""``k2 eval agentic``: a model's tool use on the held-out split of a ``k2 synth`` output
(docs/constrained-decoding.md, "Evaluation").

Three measurements, each with and without schema-constrained decoding (k2.agentic.constrain):

* **next call**: the gold conversation up to a tool call (ending with ``<|tool_call_begin|>``,
  earlier calls of the same turn included) is the prompt; the model's call is compared with the
  gold one: the name (tool-name accuracy) and the arguments as JSON values (exact match). Gold
  calls that are not schema-valid (the expert's planted mistakes) are no targets;
* **episodes**: the model plays each held-out task against the programmatic user and the
  task's domain (its held-out tool variants, no simulated failures) within a token budget, and
  the grader decides success;
* **schema validity**: of every call the model finished in both (a call cut off by a token
  budget is counted apart), the share that parses, names a declared tool and whose arguments
  validate against that tool's JSON Schema; also that share of all calls, cut-off ones counted
  as invalid.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from k2.agentic.calls import CALL_BEGIN, CALL_END, IM_END, SECTION_BEGIN, ToolCall, parse_assistant
from k2.data.chat import render_chat
from k2.errors import AgenticError, K2IOError
from k2.optional import require

EOD = "<|endoftext|>"


# ---------------------------------------------------------------------------- comparing calls
def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: objects ignore key order, arrays keep theirs, numbers compare by
    value (1 == 1.0) but booleans are not numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def calls_match(gold: ToolCall, predicted: ToolCall | None) -> bool:
    """The predicted call has the gold call's name and equal arguments (as JSON values)."""
    return (predicted is not None and predicted.error is None and predicted.name == gold.name
            and json_equal(predicted.arguments, gold.arguments))


class SchemaChecker:
    """Is a call valid against a tool set: parsed, a declared name, schema-valid arguments."""

    def __init__(self) -> None:
        self._jsonschema = require("jsonschema", extra="agentic", purpose="k2 eval agentic's schema checks")
        self._validators: dict[str, Any] = {}

    def valid(self, call: ToolCall, tools: Sequence[Mapping[str, Any]]) -> bool:
        if call.error is not None or call.arguments is None:
            return False
        for spec in tools:
            fn = spec.get("function", spec)
            if fn.get("name") == call.name:
                schema = fn.get("parameters") or {"type": "object"}
                key = json.dumps(schema, sort_keys=True)
                validator = self._validators.get(key)
                if validator is None:
                    cls = self._jsonschema.validators.validator_for(schema)
                    validator = self._validators[key] = cls(schema)
                return validator.is_valid(call.arguments)
        return False


# ---------------------------------------------------------------------------- the data
@dataclass
class EvalSet:
    """The held-out records of a synthesis output, their tasks and the tool variants."""

    records: list[dict[str, Any]]
    tasks: dict[str, Any]
    variants: dict[str, Any]


def load_eval_set(data_dir: str | Path, split: str = "validation", limit: int | None = None) -> EvalSet:
    """Read ``SPLIT.jsonl``, ``SPLIT.tasks.json`` and ``variants.jsonl`` of a ``k2 synth`` output.

    Raises:
        K2IOError: a file is missing; AgenticError: a line is not a record.
    """
    from k2.agentic.synth.output import load_variants
    from k2.agentic.tasks import load_tasks

    data_dir = Path(data_dir)
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise K2IOError(f"{path} does not exist: is {data_dir} a k2 synth output directory?")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if limit is not None and len(records) >= limit:
            break
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise AgenticError(f"{path}: line {number} is not JSON: {err.msg}") from None
        missing = {"messages", "tools", "domain", "task_id", "variants"} - set(record)
        if missing:
            raise AgenticError(f"{path}: line {number} lacks {', '.join(sorted(missing))}")
        records.append(record)
    if not records:
        raise AgenticError(f"{path} holds no records to evaluate")
    tasks = {t.id: t for t in load_tasks(data_dir / f"{split}.tasks.json")}
    return EvalSet(records, tasks, load_variants(data_dir / "variants.jsonl"))


@dataclass
class NextCallItem:
    """A next-call prompt: the record's conversation up to ``<|tool_call_begin|>`` and the gold call."""

    prompt: str
    gold: ToolCall
    tools: list[dict[str, Any]]


def next_call_items(record: Mapping[str, Any]) -> list[NextCallItem]:
    """One item per gold call of the record (calls of a parallel turn: earlier ones in the prompt)."""
    messages, tools = record["messages"], record["tools"]
    items = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant" or not message.get("tool_calls"):
            continue
        head = render_chat(messages[:i], tools, add_generation_prompt=True) + str(message.get("content") or "")
        calls = [ToolCall.from_openai(c) for c in message["tool_calls"]]
        counter = sum(len(m.get("tool_calls") or ()) for m in messages[:i] if m.get("role") == "assistant")
        done = ""
        for k, gold in enumerate(calls):
            if gold.error is None:  # a recorded mistake with broken JSON is no target
                items.append(NextCallItem(head + SECTION_BEGIN + done + CALL_BEGIN, gold, tools))
            raw = gold.raw_arguments or json.dumps(gold.arguments)
            done += f"{CALL_BEGIN}functions.{gold.name}:{counter + k}<|tool_call_argument_begin|>{raw}{CALL_END}"
    return items


# ---------------------------------------------------------------------------- the evaluation
@dataclass
class EvalOptions:
    limit: int | None = None           # held-out records used (None: all)
    split: str = "validation"
    batch_size: int = 8
    call_tokens: int = 128             # budget of one next-call prediction
    turn_tokens: int = 256             # budget of one assistant turn in an episode
    episode_tokens: int = 1024         # budget of a whole episode (prompt included)
    episodes: bool = True
    modes: tuple[bool, ...] = (False, True)  # unconstrained, constrained
    temperature: float = 0.0
    seed: int = 0


@dataclass
class Tally:
    """The counts behind the figures of one mode."""

    next_calls: int = 0
    name_correct: int = 0
    exact: int = 0
    skipped_long: int = 0
    skipped_mistakes: int = 0
    calls_finished: int = 0
    calls_valid: int = 0
    calls_cut_off: int = 0
    episodes: int = 0
    successes: int = 0
    ungraded: int = 0
    out_of_tokens: int = 0
    episodes_by_kind: dict[str, list[int]] = field(default_factory=dict)  # kind -> [n, successes]

    def figures(self) -> dict[str, Any]:
        def share(a: int, b: int) -> float | None:
            return a / b if b else None

        by_kind = {k: share(s, n) for k, (n, s) in sorted(self.episodes_by_kind.items())}
        single_multi = [self.episodes_by_kind.get(k, [0, 0]) for k in ("single-call", "multi-call")]
        return {
            "tool_name_accuracy": share(self.name_correct, self.next_calls),
            "next_call_exact_match": share(self.exact, self.next_calls),
            "schema_valid_calls": share(self.calls_valid, self.calls_finished),
            "schema_valid_of_all_calls": share(self.calls_valid, self.calls_finished + self.calls_cut_off),
            "episode_success": share(self.successes, self.episodes),
            "episode_success_single_multi": share(sum(s for _, s in single_multi), sum(n for n, _ in single_multi)),
            "episode_success_by_kind": by_kind,
            "next_calls": self.next_calls, "next_calls_skipped_long": self.skipped_long,
            "next_calls_skipped_mistakes": self.skipped_mistakes,
            "calls_finished": self.calls_finished, "calls_cut_off": self.calls_cut_off,
            "episodes": self.episodes, "episodes_ungraded": self.ungraded,
            "episodes_out_of_tokens": self.out_of_tokens,
        }


class AgenticEvaluator:
    """Runs the measurements for one model and tokenizer.

    Args:
        model: a ``K2ForCausalLM`` (its ``max_position_embeddings`` bounds every prompt).
        tokenizer: its ``tokenizers.Tokenizer``.
        options: :class:`EvalOptions`.
        progress: called with a line of text now and then.
    """

    def __init__(self, model: Any, tokenizer: Any, options: EvalOptions | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        import torch

        self.torch = torch
        self.model, self.tokenizer = model, tokenizer
        self.options = options or EvalOptions()
        self.progress = progress or (lambda line: None)
        self.checker = SchemaChecker()
        self._constrainer: Any = None
        self.max_positions = model.config.max_position_embeddings
        self.ids = {t: tokenizer.token_to_id(t) for t in (CALL_END, IM_END, EOD)}
        from k2.rl.rollout import RolloutEngine

        pad = tokenizer.token_to_id("<|pad|>")
        self.engine = RolloutEngine(model, max_batch=self.options.batch_size, pad_token_id=pad if pad is not None else 0)

    @property
    def constrainer(self) -> Any:
        if self._constrainer is None:
            from k2.agentic.constrain import ToolCallConstrainer

            self._constrainer = ToolCallConstrainer(self.tokenizer)
        return self._constrainer

    def _generate(self, prompts: list[list[int]], tools: list[list[dict[str, Any]]], constrained: bool,
                  budgets: list[int], stops: list[int], what: str = "") -> list[list[int]]:
        """Each prompt's new tokens (up to its stop token or budget), sampled by the rollout
        engine (continuous batching: a finished row takes the next prompt at once)."""
        from k2.rl.rollout import Request

        requests = [
            Request(p, b, self.options.temperature, stop_ids=stops,
                    constraint=self.constrainer.row(t, p) if constrained else None)
            for p, t, b in zip(prompts, tools, budgets)
        ]
        every = max(1, len(requests) // 10)

        def progress(done: int, total: int) -> None:
            if done % every == 0 or done == total:
                self.progress(f"{what} ({'constrained' if constrained else 'free'}): {done}/{total}")

        return [c.token_ids for c in self.engine.generate(requests, seed=self.options.seed, progress=progress)]

    def _count_calls(self, tally: Tally, calls: Sequence[ToolCall], tools: Sequence[Mapping[str, Any]]) -> None:
        for call in calls:
            if call.error is not None and "cut off" in call.error:
                tally.calls_cut_off += 1
                continue
            tally.calls_finished += 1
            tally.calls_valid += self.checker.valid(call, tools)

    # ---- next call ------------------------------------------------------------------------
    def next_calls(self, records: Sequence[Mapping[str, Any]], constrained: bool, tally: Tally) -> None:
        items = [item for r in records for item in next_call_items(r)]
        encoded = []
        for item in items:
            if not self.checker.valid(item.gold, item.tools):
                tally.skipped_mistakes += 1  # a recorded mistake (corrected next turn) is no target
                continue
            ids = self.tokenizer.encode(item.prompt).ids
            budget = min(self.options.call_tokens, self.max_positions - len(ids))
            if budget < 8:
                tally.skipped_long += 1
            else:
                encoded.append((ids, item, budget))
        outputs = self._generate([ids for ids, _, _ in encoded], [item.tools for _, item, _ in encoded], constrained,
                                 [budget for _, _, budget in encoded], [self.ids[CALL_END], self.ids[EOD]],
                                 "next call")
        for (_, item, _), out in zip(encoded, outputs):
            text = CALL_BEGIN + self.tokenizer.decode(out, skip_special_tokens=False)
            calls = parse_assistant(SECTION_BEGIN + text).calls
            predicted = calls[0] if calls else None
            tally.next_calls += 1
            tally.name_correct += predicted is not None and predicted.name == item.gold.name
            tally.exact += calls_match(item.gold, predicted)
            self._count_calls(tally, calls[:1], item.tools)

    # ---- episodes -------------------------------------------------------------------------
    def episodes(self, data: EvalSet, records: Sequence[Mapping[str, Any]], constrained: bool, tally: Tally) -> None:
        from k2.agentic.env import AgentEnv
        from k2.agentic.synth.output import episode_domain

        live = []
        for record in records:
            task = data.tasks.get(record["task_id"])
            if task is None:
                raise AgenticError(f"task {record['task_id']} is not in {self.options.split}.tasks.json")
            system_prompt = (task.raw.get("k2_synth") or {}).get("system_prompt", "")
            env = AgentEnv(episode_domain(record, data.variants), task, user="programmatic",
                           seed=int(record.get("index", 0)), tokenizer=self.tokenizer, system_prompt=system_prompt)
            obs = env.reset()
            live.append((record, env, list(obs.ids)))
        budget = min(self.options.episode_tokens, self.max_positions)
        stops = [self.ids[IM_END], self.ids[EOD]]
        finished = 0
        while live:
            ready = []
            for record, env, ids in live:
                if budget - len(ids) >= 8:
                    ready.append((record, env, ids))
                else:  # out of tokens: the episode fails
                    self._end_episode(tally, record, env, None)
            live = ready
            survivors = []
            outputs = self._generate([ids for _, _, ids in live], [env.tools for _, env, _ in live], constrained,
                                     [min(self.options.turn_tokens, budget - len(ids)) for _, _, ids in live], stops,
                                     "episode turns")
            for (record, env, ids), out in zip(live, outputs):
                text = self.tokenizer.decode(out, skip_special_tokens=False)
                self._count_calls(tally, parse_assistant(text).calls, env.tools)
                obs, reward, done, _ = env.step(out)
                if done:
                    self._end_episode(tally, record, env, reward)
                    finished += 1
                else:
                    survivors.append((record, env, ids + list(out) + list(obs.ids)))
            live = survivors
            self.progress(f"episodes ({'constrained' if constrained else 'free'}): {finished} done, {len(live)} playing")

    @staticmethod
    def _end_episode(tally: Tally, record: Mapping[str, Any], env: Any, reward: float | None) -> None:
        """Count an episode: ``reward`` None with the env still running means the token budget ran out."""
        kind = str(record.get("kind", "?"))
        counts = tally.episodes_by_kind.setdefault(kind, [0, 0])
        tally.episodes += 1
        counts[0] += 1
        if env.done and reward is None:
            tally.ungraded += 1
        if not env.done:
            tally.out_of_tokens += 1
        success = bool(env.done and reward is not None and math.isclose(reward, 1.0))
        tally.successes += success
        counts[1] += success

    # ---- all ------------------------------------------------------------------------------
    def run(self, data: EvalSet) -> dict[str, Any]:
        """Every measurement in every mode: ``{"unconstrained": figures, "constrained": figures}``."""
        out: dict[str, Any] = {}
        for constrained in self.options.modes:
            tally = Tally()
            self.next_calls(data.records, constrained, tally)
            if self.options.episodes:
                self.episodes(data, data.records, constrained, tally)
            out["constrained" if constrained else "unconstrained"] = tally.figures()
        return out


# ---------------------------------------------------------------------------- the report
ROWS = (
    ("tool-name accuracy", "tool_name_accuracy"),
    ("next-call exact match", "next_call_exact_match"),
    ("schema-valid calls", "schema_valid_calls"),
    ("  of all, cut off too", "schema_valid_of_all_calls"),
    ("episode success", "episode_success"),
    ("  single/multi-call", "episode_success_single_multi"),
    ("next-call prompts", "next_calls"),
    ("  mistakes skipped", "next_calls_skipped_mistakes"),
    ("calls finished", "calls_finished"),
    ("calls cut off", "calls_cut_off"),
    ("episodes", "episodes"),
    ("  out of tokens", "episodes_out_of_tokens"),
)


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The figures as a text table, one column per mode."""
    modes = [m for m in ("unconstrained", "constrained") if m in results]
    lines = [f"{'':<24}" + "".join(f"{m:>15}" for m in modes)]
    for label, key in ROWS:
        cells = []
        for m in modes:
            value = results[m].get(key)
            if value is None:
                cells.append("n/a")
            elif isinstance(value, float):
                cells.append(f"{value:.3f}")
            else:
                cells.append(str(value))
        lines.append(f"{label:<24}" + "".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)


def load_model(path: str | Path) -> tuple[Any, Any, Path]:
    """A model and its tokenizer from a k2 run directory, a checkpoint root or a checkpoint
    directory (as ``k2 sft --init`` resolves them). Returns (model, tokenizer, checkpoint)."""
    from k2 import checkpoint
    from k2.data import load_tokenizer
    from k2.model import K2Config, K2ForCausalLM
    from k2.train.sft import resolve_init

    init = resolve_init(path, what="model")
    model = K2ForCausalLM(K2Config.from_hf_dict(init.hf_config))
    checkpoint.load(init.checkpoint, model, restore_rng=False)
    model.eval()
    return model, load_tokenizer(init.tokenizer_dir), init.checkpoint
