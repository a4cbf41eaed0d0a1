"""The synthesis pipeline: one episode per index, kept or rejected (docs/synthesis.md).

The stated kind proportions hold for the *kept* trajectories: each kind gets a quota
(:func:`kind_quotas`) and its own stream of episodes. Episode ``j`` of kind ``k`` is a pure function
of ``(options, k, j)``: its random source is seeded from the run's seed, ``k`` and ``j``
(:func:`~k2.agentic.synth.evolve.stable_seed`), and so are the user, the domain's transient
failures and the expert's mistakes. Each stream is consumed in order until its quota is kept, so
the output does not depend on how many worker processes made the episodes.
"""

from __future__ import annotations

import random
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from k2.agentic.domain import domains as registered_domains
from k2.agentic.domain import get_domain
from k2.agentic.env import AgentEnv
from k2.agentic.synth.agents import Agent, draw_agent
from k2.agentic.synth.evolve import VariantPool, stable_seed
from k2.agentic.synth.expert import ExpertAgent
from k2.agentic.synth.judge import rubric
from k2.agentic.synth.plan import KIND_NAMES, KINDS, Ctx, Draft, DrawError, Step, ask
from k2.agentic.synth.templates import Template, templates
from k2.agentic.synth.variant_domain import VariantDomain
from k2.agentic.tasks import Task
from k2.data.chat import render_chat
from k2.data.tokenizer import load_tokenizer
from k2.errors import ConfigError

BUILTIN_DOMAINS = ("bank", "calendar", "contacts", "device", "notes", "shop")
GREETINGS = ("", "", "Hi. ", "Hello! ", "Hey there. ", "Good morning. ", "Hi, quick one: ")
SIGN_OFFS = ("", "", " Thanks.", " Thank you!", " Thanks in advance.")
"""Around the user's opening, for variety (the user simulator says it as written)."""
DEFAULT_MIX = {"single": 0.25, "multi": 0.25, "parallel": 0.15, "info": 0.15, "error": 0.10, "impossible": 0.10}


@dataclass
class SynthOptions:
    """Everything that decides a run's output (the same options give the same bytes).

    ``mix`` is the share of each task kind (normalized); ``validation`` the share of episodes in
    the validation split, which use held-out tool variants and may use held-out templates;
    ``held_out`` and ``held_out_templates`` the shares of variants and templates that training
    never sees.
    """

    n: int = 1000
    seed: int = 0
    domains: tuple[str, ...] = BUILTIN_DOMAINS
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    per_tool: int = 60
    held_out: float = 0.1
    held_out_templates: float = 0.1
    validation: float = 0.1
    mistake_rate: float = 0.1
    stochastic: bool = True
    failure_rate: float = 0.05
    max_tools: int = 4
    max_chars: int = 3600
    tool_chars: int = 1500
    tokenizer: str | None = None
    """A tokenizer (a prepared data folder or its tokenizer.json): then ``max_tokens`` also limits
    each rendered conversation and records carry ``tokens``."""
    max_tokens: int = 1024
    max_retries: int = 3

    def check(self) -> None:
        """Raise ConfigError naming the first bad option."""
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"synth: --n must be a positive integer, not {self.n!r}")
        known = registered_domains()
        for d in self.domains:
            if d not in known:
                raise ConfigError(f"synth: unknown domain {d!r} in --domains; known: {', '.join(known)}")
            if d not in BUILTIN_DOMAINS:
                raise ConfigError(f"synth: domain {d!r} has no task templates; synthesis covers {', '.join(BUILTIN_DOMAINS)}")
        if not self.domains:
            raise ConfigError("synth: --domains is empty")
        for kind, share in self.mix.items():
            if kind not in KINDS:
                raise ConfigError(f"synth: unknown task kind {kind!r} in --mix; kinds: {', '.join(KINDS)}")
            if not isinstance(share, (int, float)) or share < 0:
                raise ConfigError(f"synth: --mix share of {kind} must be a number >= 0, not {share!r}")
        if sum(self.mix.values()) <= 0:
            raise ConfigError("synth: --mix gives every kind a share of 0")
        for name in ("held_out", "held_out_templates", "validation", "mistake_rate", "failure_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"synth: --{name.replace('_', '-')} must be in [0, 1), not {value}")
        if self.per_tool < 2:
            raise ConfigError(f"synth: --per-tool must be at least 2 (v0 is the base tool), not {self.per_tool}")
        if self.max_chars < 1 or self.max_tokens < 1:
            raise ConfigError(f"synth: --max-chars and --max-tokens must be positive, not {self.max_chars}, {self.max_tokens}")
        if self.tokenizer is not None and not Path(self.tokenizer).exists():
            raise ConfigError(f"synth: --tokenizer {self.tokenizer} does not exist (a prepared data folder or its tokenizer.json)")
        if not 1 <= self.max_tools <= 8:
            raise ConfigError(f"synth: --max-tools must be between 1 and 8, not {self.max_tools}")


@dataclass
class Episode:
    """One synthesized episode: its ``record`` (the JSONL line's object) and ``task`` (tau2 JSON),
    or only ``reasons`` when it could not be drawn."""

    kind: str
    index: int
    kept: bool
    reasons: list[str]
    record: dict[str, Any] | None = None
    task: dict[str, Any] | None = None


class Synthesizer:
    """Makes episodes for ``options``; ``user`` and ``expert`` may replace the programmatic ones
    (see :mod:`k2.agentic.synth.backends`)."""

    def __init__(self, options: SynthOptions, *, describe: Callable[[str], str] | None = None,
                 user: Any = "programmatic", expert: Any = None, rubric_judge: Any = None, judge: Any = None) -> None:
        options.check()
        self.options = options
        self.pool = VariantPool(options.domains, options.per_tool, options.seed, options.held_out, describe)
        self.user = user
        self.expert = expert
        """None (the scripted :class:`ExpertAgent`) or an object with ``play(env) -> Played``."""
        self.rubric_judge = rubric_judge
        """None or ``(messages, tools) -> reasons`` added to the programmatic rubric's."""
        self.judge = judge
        """Decides NL assertions when grading (k2.agentic's Judge protocol)."""
        self.templates = [t for t in templates().values() if t.domain in options.domains]
        self.held_templates = held_out_templates(self.templates, options.held_out_templates, options.seed)
        self.tokenizer = load_tokenizer(options.tokenizer) if options.tokenizer else None
        self.kinds = [k for k in KINDS if options.mix.get(k, 0) > 0]
        self.by_split: dict[tuple[str, str], list[Template]] = {}
        for kind in KINDS:
            fits = [t for t in self.templates if kind in t.kinds()]
            train = [t for t in fits if not self.template_held_out(t.id)] or fits
            self.by_split[("train", kind)] = train
            self.by_split[("validation", kind)] = fits
        for kind in self.kinds:
            if not self.by_split[("train", kind)]:
                raise ConfigError(f"synth: no template of kind {kind!r} in the domains {', '.join(options.domains)}")

    def template_held_out(self, template_id: str) -> bool:
        return template_id in self.held_templates

    def episode(self, kind: str, index: int) -> Episode:
        """Episode ``index`` of the stream of ``kind``."""
        o = self.options
        episode_seed = stable_seed("episode", o.seed, kind, index)
        rng = random.Random(episode_seed)
        split = "validation" if rng.random() < o.validation else "train"
        fits = self.by_split[(split, kind)]
        domain_name = rng.choice(sorted({t.domain for t in fits}))  # domains first: equal shares
        tmpl = rng.choice([t for t in fits if t.domain == domain_name])
        try:
            ctx = Ctx(get_domain(tmpl.domain), rng)
            draft = tmpl.draw(ctx)
        except DrawError:
            return Episode(kind, index, False, ["draw_failed"])
        draft.agent_data = ctx.agent_data
        steps, opening, facts = list(draft.steps), draft.opening, dict(draft.facts)
        if kind == "info":
            opening = draft.vague or opening
            facts.update({s.keyword: s.answer for s in draft.secrets})
            wanted = " and the ".join(s.keyword for s in draft.secrets)
            values = [v for s in draft.secrets for v in s.values]
            opener = rng.choice(("Sure, I can help with that.", "Happy to help.", "Of course.", "I can do that."))
            steps = [ask(f"{opener} Could you tell me the {wanted}?", *values), *steps]
        greeting = rng.choice(GREETINGS)
        opening = f"{'' if opening.startswith(('Hi', 'Hello', 'Hey')) else greeting}{opening}{rng.choice(SIGN_OFFS)}"
        agent = draw_agent(rng, self.pool, tmpl.domain, draft.tools(), split, o.max_tools, o.tool_chars)
        task_id = f"synth-{o.seed}-{kind}-{index:06d}"
        task_json = build_task(task_id, draft, steps, agent, kind, tmpl, opening, facts, split)
        task = Task(task_json, f"synthesis episode {index}")
        domain = VariantDomain(tmpl.domain, agent.tools, policy=agent.policy)
        user = self.user if isinstance(self.user, str) else (lambda t, s: self.user(t, s))
        env = AgentEnv(domain, task, user=user, seed=episode_seed % 2**32, stochastic=o.stochastic,
                       failure_rate=o.failure_rate, system_prompt=agent.role, judge=self.judge, max_steps=40)
        player = self.expert if self.expert is not None else ExpertAgent(steps, agent.tools, rng, o.mistake_rate, o.max_retries)
        played = player.play(env)
        tools = domain.tool_specs()
        text = render_chat(played.messages, tools)
        chars = len(text)
        tokens = len(self.tokenizer.encode(text, add_special_tokens=False).ids) if self.tokenizer is not None else None
        reasons = rubric(played.messages, tools, grade=played.grade, termination=played.termination,
                         gave_up=played.bail is not None, max_chars=o.max_chars, rendered_chars=chars,
                         max_tokens=o.max_tokens, tokens=tokens)
        if self.rubric_judge is not None and not reasons:
            reasons = list(self.rubric_judge(played.messages, tools))
        record = {
            "messages": played.messages,
            "tools": tools,
            "domain": tmpl.domain,
            "task_id": task_id,
            "seed": o.seed,
            "index": index,
            "split": split,
            "kind": KIND_NAMES[kind],
            "template": tmpl.id,
            "variants": [v.id for v in agent.tools],
            "grade": played.grade.to_json() if played.grade is not None else None,
            "termination": played.termination,
            "turns": sum(1 for m in played.messages if m.get("role") == "assistant"),
            "calls": sum(len(m.get("tool_calls") or ()) for m in played.messages if m.get("role") == "assistant"),
            "mistakes": played.mistakes,
            "retries": played.retries,
            "chars": chars,
        }
        if tokens is not None:
            record["tokens"] = tokens
        if played.bail:
            record["bail"] = played.bail
        return Episode(kind, index, not reasons, reasons, record, task_json)

    def run(self, kind: str, start: int = 0) -> Iterator[Episode]:
        """Episodes ``start, start+1, ...`` of ``kind``, forever (the caller stops)."""
        index = start
        while True:
            yield self.episode(kind, index)
            index += 1


def held_out_templates(chosen: Sequence[Template], fraction: float, seed: int) -> set[str]:
    """The templates never used in training: of each kind's templates, the ``round(fraction * count)``
    with the smallest stable hash of ``(seed, id)`` — a fixed share per kind, never all of a kind."""
    out: set[str] = set()
    for kind in KINDS:
        mine = sorted((t for t in chosen if t.kind == kind), key=lambda t: stable_seed("held-out", seed, "template:" + t.id))
        count = min(round(fraction * len(mine)), len(mine) - 1)
        out.update(t.id for t in mine[:max(count, 0)])
    return out


def kind_quotas(n: int, mix: dict[str, float]) -> dict[str, int]:
    """How many kept trajectories each kind gets: ``n`` split by the shares, the rounding
    remainder going to the largest fractions (ties: the order of KINDS)."""
    total = sum(mix.values())
    exact = {k: n * mix.get(k, 0) / total for k in KINDS}
    quotas = {k: int(v) for k, v in exact.items()}
    for k in sorted(KINDS, key=lambda k: (-(exact[k] - quotas[k]), KINDS.index(k)))[: n - sum(quotas.values())]:
        quotas[k] += 1
    return {k: q for k, q in quotas.items() if q > 0}


def build_task(task_id: str, draft: Draft, steps: Sequence[Step], agent: Agent, kind: str, tmpl: Template,
               opening: str, facts: dict[str, str], split: str) -> dict[str, Any]:
    """The episode's task in tau2's JSON format, its gold actions written against the agent's variants."""
    by_base = {v.base: v for v in agent.tools}
    actions: list[dict[str, Any]] = []
    for step in steps:
        for call in step.calls:
            if call.expect_error is None:
                v = by_base[call.name]
                actions.append({"action_id": f"{task_id}_{len(actions)}", "requestor": "assistant", "name": v.name,
                                "arguments": v.from_base(call.args), "info": None, "compare_args": None})
    initial = {"initialization_data": {"agent_data": draft.agent_data}} if draft.agent_data else None
    return {
        "id": task_id,
        "description": {"purpose": f"{KIND_NAMES[kind]} task drawn by template {tmpl.id}", "relevant_policies": None, "notes": None},
        "user_scenario": {
            "persona": None,
            "instructions": {
                "domain": tmpl.domain, "reason_for_call": opening, "known_info": draft.known_info or None,
                "unknown_info": None, "task_instructions": draft.instructions or draft.opening, "facts": facts,
            },
        },
        "ticket": None,
        "initial_state": initial,
        "evaluation_criteria": {
            "actions": actions, "env_assertions": [], "nl_assertions": [],
            "communicate_info": [c.replace(",", "") for c in draft.communicate],
            "reward_basis": ["DB", "COMMUNICATE"],
        },
        "k2_synth": {"kind": KIND_NAMES[kind], "template": tmpl.id, "split": split,
                     "variants": [v.id for v in agent.tools], "system_prompt": agent.role},
    }
