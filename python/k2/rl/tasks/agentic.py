"""Agentic domains as multi-turn tasks (``--task agentic:DOMAIN``; docs/rl-tasks.md,
"Agentic"), played in :mod:`k2.agentic`'s environment and scored by its grader.

A prompt is one of the domain's tau2-format tasks with an environment seed: its messages are
the environment's first observation (the domain's policy as the system message and the user's
opening) and its ``tools`` the domain's tool specs. :meth:`AgenticTask.episode` plays a whole
episode with a policy ``policy(messages, tools) -> assistant turn text`` and returns the
grader's reward; :meth:`AgenticTask.make_env` gives the environment itself, for a rollout loop
that steps it with sampled token ids. :meth:`AgenticTask.verify` replays a transcript — the
agent's turns, each ending with ``<|im_end|>``, concatenated — in a fresh environment with the
same seed: the environment and the programmatic user are deterministic given the seed, so the
replay reproduces the episode and its reward exactly.

Reward: the grade's reward (tau2: the product of the task's reward-basis components, each 0 or
1); an episode that ends by a turn or step limit, does not end at all, or cannot be graded
(``None``: an NL assertion no judge decided) scores 0.

With ``synth=DIR`` (a ``k2 synth`` output; ``k2 rl --task-data DIR``) the tasks are the
synthesized ones of the domain: training prompts from ``train.tasks.json``, held-out ones from
``validation.tasks.json`` (held-out tool variants and templates), each played with its own agent's
tool variants and system prompt, as ``k2 eval agentic`` plays them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k2.agentic import AgentEnv, Grade, domains, example_tasks, get_domain, load_tasks, make_env
from k2.agentic.scripted import GoldAgent
from k2.agentic.tasks import Task as AgentTask
from k2.errors import AgenticError, RLTaskError
from k2.rl.tasks.base import (
    DEFAULT_TEST_FRACTION,
    IM_END,
    Prompt,
    Reward,
    Task,
    check_fraction,
    sample_pool,
    split_ids,
    split_rng,
)

Policy = Callable[[list[dict[str, Any]], list[dict[str, Any]]], str]
"""``policy(messages, tools) -> the next assistant turn's text`` (K2 format, tool calls in
K2's tool-call section; a trailing ``<|im_end|>`` is optional)."""


@dataclass
class Episode:
    """One played episode: its ``reward``, the agent's ``turns`` as played, the trajectory's
    OpenAI-format ``messages``, how it ended (``termination``) and the ``grade`` (None when it
    did not end)."""

    reward: Reward
    turns: list[str]
    messages: list[dict[str, Any]]
    termination: str | None
    grade: Grade | None


def split_turns(transcript: str) -> list[str]:
    """The agent turns of a transcript: the text up to and including each ``<|im_end|>``, and
    the rest (a turn cut off without one) when it is not blank."""
    pieces = transcript.split(IM_END)
    turns = [p + IM_END for p in pieces[:-1]]
    if pieces[-1].strip():
        turns.append(pieces[-1])
    return turns


class AgenticTask(Task):
    """A :mod:`k2.agentic` domain's tasks as RL prompts.

    Args:
        domain: a registered domain name (:func:`k2.agentic.domains`).
        tasks: tau2-format tasks (a JSON file's path or a list); default the domain's shipped
            example tasks.
        synth: a ``k2 synth`` output directory instead of ``tasks``: its tasks of ``domain``,
            split as it split them, each in its own tool variants.
        max_turns, max_steps: the environment's limits per episode (ended episodes score 0).
        user, judge, stochastic, failure_rate: as for :func:`k2.agentic.make_env`.

    Hidden data: ``task_id`` and ``env_seed``. Split: by task id (:func:`split_ids`; with two
    or more tasks neither split is empty), so no task is in both.
    """

    kind = "agentic"
    multi_turn = True

    def __init__(
        self,
        domain: str,
        *,
        tasks: str | Path | Sequence[AgentTask] | None = None,
        synth: str | Path | None = None,
        test_fraction: float = DEFAULT_TEST_FRACTION,
        token_budget: int | None = None,
        max_turns: int = 10,
        max_steps: int = 30,
        **env_options: Any,
    ) -> None:
        self.name = f"agentic:{domain}"
        if domain not in domains():
            raise RLTaskError(f"task {self.name!r}: no agentic domain {domain!r}; there are: {', '.join(domains())}")
        self.domain = domain
        get_domain(domain)
        self.variants: dict[str, Any] = {}
        synth_splits: dict[str, list[str]] | None = None
        if synth is not None:
            if tasks is not None:
                raise RLTaskError(f"task {self.name!r}: give tasks or synth, not both")
            loaded, synth_splits = self._load_synth(Path(synth))
        elif tasks is None:
            loaded = example_tasks(domain)
        elif isinstance(tasks, (str, Path)):
            loaded = load_tasks(tasks)
        else:
            loaded = list(tasks)
        if not loaded:
            raise RLTaskError(f"task {self.name!r}: no tasks (domain {domain!r} ships none: pass tasks=FILE)")
        self.tasks = {t.id: t for t in loaded}
        if len(self.tasks) != len(loaded):
            raise RLTaskError(f"task {self.name!r}: task ids are not unique")
        self.test_fraction = check_fraction(self.name, test_fraction)
        self._init_budget(token_budget)
        self.env_options = dict(env_options, max_turns=max_turns, max_steps=max_steps)
        self.splits = synth_splits or split_ids(self.name, sorted(self.tasks), self.test_fraction)

    def _load_synth(self, out: Path) -> tuple[list[AgentTask], dict[str, list[str]]]:
        """The domain's tasks of a ``k2 synth`` output and its split of them."""
        from k2.agentic.synth.output import load_variants

        for name in ("train.tasks.json", "validation.tasks.json", "variants.jsonl"):
            if not (out / name).is_file():
                raise RLTaskError(f"task {self.name!r}: {out / name} does not exist: is {out} a k2 synth output "
                                  "directory?")
        self.variants = load_variants(out / "variants.jsonl")
        loaded: list[AgentTask] = []
        splits: dict[str, list[str]] = {}
        for split, name in (("train", "train.tasks.json"), ("test", "validation.tasks.json")):
            mine = []
            for task in load_tasks(out / name):
                synth = task.raw.get("k2_synth")
                if not isinstance(synth, dict) or not isinstance(synth.get("variants"), list):
                    raise RLTaskError(f"task {self.name!r}: {out / name}: task {task.id!r} has no k2_synth "
                                      "variants (not written by k2 synth)")
                if _task_domain(task) != self.domain:
                    continue
                missing = [v for v in synth["variants"] if v not in self.variants]
                if missing:
                    raise RLTaskError(f"task {self.name!r}: {out / name}: task {task.id!r} uses variants "
                                      f"{missing} that {out / 'variants.jsonl'} lacks")
                mine.append(task)
            if not mine:
                raise RLTaskError(f"task {self.name!r}: {out / name} holds no task of domain {self.domain!r}")
            loaded += mine
            splits[split] = sorted(t.id for t in mine)
        return loaded, splits

    def _env(self, task: AgentTask, seed: int, **options: Any) -> AgentEnv:
        """A fresh environment of ``task``: in its synthesized agent's tool variants and system
        prompt when it has them, else in the domain itself."""
        synth = task.raw.get("k2_synth") if self.variants else None
        if not synth:
            return make_env(self.domain, task, seed=seed, **{**self.env_options, **options})
        from k2.agentic.synth.output import episode_domain

        domain = episode_domain({"domain": self.domain, "variants": synth["variants"], "task_id": task.id},
                                self.variants)
        return make_env(domain, task, seed=seed, system_prompt=str(synth.get("system_prompt", "")),
                        **{**self.env_options, **options})

    # ---- prompts and environments ------------------------------------------------------------
    def make_env(self, prompt: Prompt, **options: Any) -> AgentEnv:
        """The environment of ``prompt``'s episode (``reset()`` gives the prompt's messages);
        ``options`` (e.g. ``tokenizer``) go to :func:`k2.agentic.make_env`."""
        task = self.tasks.get(str(prompt.hidden.get("task_id")))
        if task is None:
            raise RLTaskError(f"task {self.name!r}: prompt {prompt.id!r} names no task of this domain")
        return self._env(task, prompt.hidden["env_seed"], **options)

    def prompts(self, split: str, n: int, seed: int = 0) -> list[Prompt]:
        ids = sample_pool(self.name, split, n, seed, self.splits.get(split, []))
        seeds = split_rng(self.name, split + "/env", seed)
        out = []
        for task_id in ids:
            env_seed = seeds.randrange(2**31)
            env = self._env(self.tasks[task_id], env_seed)
            obs = env.reset()
            out.append(Prompt(
                id=f"{task_id}@{env_seed}",
                messages=obs.messages,
                hidden={"task_id": task_id, "env_seed": env_seed},
                tools=env.tools,
            ))
        return out

    # ---- playing -----------------------------------------------------------------------------
    def episode(self, prompt: Prompt, policy: Policy) -> Episode:
        """Play ``prompt``'s episode: ``policy(messages, tools)`` writes each assistant turn
        (``messages`` is the trajectory so far, OpenAI format) until the episode ends."""
        env = self.make_env(prompt)
        env.reset()
        turns: list[str] = []
        done, info = False, {"messages": env.messages, "termination": None}
        while not done:
            text = policy([dict(m) for m in env.messages], env.tools)
            if not isinstance(text, str):
                raise RLTaskError(f"task {self.name!r}: the policy returned {type(text).__name__}, not the turn's text")
            turns.append(text)
            _, _, done, info = env.step(text)
        return self._finish(env, turns, info, done)

    def _finish(self, env: AgentEnv, turns: list[str], info: dict[str, Any], done: bool) -> Episode:
        termination = info.get("termination")
        g = info.get("grade")
        if not done:
            reward = Reward(0.0, False, f"the episode did not end ({len(turns)} turns played)")
        elif g is None or g.reward is None:
            reward = Reward(0.0, False, f"ungraded ({termination})")
        else:
            score = min(1.0, max(0.0, float(g.reward)))
            failed = [k for k, c in g.components.items() if k in g.basis and c.reward != 1.0]
            why = "correct" if score == 1.0 else f"{termination}; failed {', '.join(failed) or 'nothing'}"
            reward = Reward(score, score == 1.0, why)
        return Episode(reward, turns, list(info.get("messages", env.messages)), termination, g)

    def replay(self, prompt: Prompt, transcript: str) -> Episode:
        """Play the agent turns of ``transcript`` (:func:`split_turns`) in order; turns left
        over when the episode ends are ignored."""
        env = self.make_env(prompt)
        env.reset()
        turns: list[str] = []
        done, info = False, {"messages": env.messages, "termination": None}
        for text in split_turns(transcript):
            if done:
                break
            turns.append(text)
            _, _, done, info = env.step(text)
        return self._finish(env, turns, info, done)

    def verify(self, prompt: Prompt, response_text: str) -> Reward:
        """The reward of the episode whose agent turns ``response_text`` holds (:meth:`replay`)."""
        if prompt.hidden.get("task_id") not in self.tasks:  # a caller's mistake, not the model's
            raise RLTaskError(f"task {self.name!r}: prompt {prompt.id!r} names no task of this domain")
        if not isinstance(response_text, str):
            return Reward(0.0, False, "response is not text")
        try:
            return self.replay(prompt, response_text).reward
        except AgenticError:
            raise
        except (RecursionError, MemoryError, ValueError, TypeError) as err:
            return Reward(0.0, False, f"unplayable transcript ({type(err).__name__})")

    # ---- gold ----------------------------------------------------------------------------------
    def gold_turns(self, prompt: Prompt) -> list[tuple[list[dict[str, Any]], str]]:
        """The scripted gold agent's episode (:class:`k2.agentic.scripted.GoldAgent`): for each
        of its turns, the messages before it and the turn's text (without ``<|im_end|>``)."""
        env = self.make_env(prompt)
        env.reset()
        agent = GoldAgent(self.tasks[prompt.hidden["task_id"]])
        pairs = []
        done = False
        while not done:
            text = agent.act()
            pairs.append(([dict(m) for m in env.messages], text.removesuffix(IM_END)))
            _, _, done, _ = env.step(text)
        return pairs

    def gold_response(self, prompt: Prompt) -> str:
        """The gold agent's turns as one transcript (each ending with ``<|im_end|>``)."""
        return "".join(text + IM_END for _, text in self.gold_turns(prompt))

    def warm_start_examples(self, n: int, seed: int = 0) -> list[tuple[list[dict[str, Any]], str]]:
        """``n`` (messages, gold turn) pairs: every turn of the gold agent's episodes on train
        prompts, in order; the turn is K2-format text (a tool-call section for tool calls), to be
        tokenized with the reserved tokens recognized."""
        out: list[tuple[list[dict[str, Any]], str]] = []
        batch = 0
        while len(out) < n:
            for prompt in self.prompts("train", max(1, n), seed + batch):
                out.extend(self.gold_turns(prompt))
                if len(out) >= n:
                    break
            batch += 1
        return out[:n]


def _task_domain(task: AgentTask) -> str:
    """The domain a synthesized task names (``user_scenario.instructions.domain``)."""
    instructions = (task.raw.get("user_scenario") or {}).get("instructions")
    return str(instructions.get("domain", "")) if isinstance(instructions, dict) else ""
