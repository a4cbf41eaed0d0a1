"""Multi-turn episodes for the RL loop (``k2 rl --task agentic:DOMAIN``; docs/rl.md, "Multi-turn
tasks").

Every sample is one episode of a :class:`k2.rl.tasks.agentic.AgenticTask` prompt, played in the
task's environment with the environment's token ids (``make_env(..., tokenizer=...)``): the
context of a turn is the prompt's ids, then each earlier turn's sampled ids and the observation
ids the environment returned for it, never re-encoded. The episodes advance in waves: each wave
samples the next assistant turn of every unfinished episode in one engine call (so the engine's
continuous batching and, with ``--rollout-workers``, the workers serve them), then steps each
environment with its turn.

An episode is over when its environment says so, or — unfinished, scoring 0 — when fewer than
:data:`MIN_TURN_TOKENS` context positions remain for the next turn (a turn writes up to the
task's per-turn budget or to the end of the context). Its reward is the task's verdict on the transcript of
its turns (:meth:`AgenticTask.verify` replays them in a fresh environment with the same seed,
which reproduces the episode). A sample is a list of *segments* (context ids, the turn's
completion): the training loss takes log π of the episode as the sum over its turns, so only
the agent's tokens are trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from k2.errors import RLError
from k2.rl.rollout import Completion, Request
from k2.rl.sampling import request_seed
from k2.rl.tasks.base import IM_END, Prompt, Reward


@dataclass
class PlayedEpisode:
    """One sample of a multi-turn task: its turns as ``(context ids, completion)`` segments, the
    transcript (each turn's text ending with ``<|im_end|>``), whether the environment ended it,
    and the task's reward."""

    prompt: Prompt
    segments: list[tuple[list[int], Completion]] = field(default_factory=list)
    transcript: str = ""
    done: bool = False
    reward: Reward | None = None


MIN_TURN_TOKENS = 8
"""A turn starts only when this many context positions remain (as in ``k2 eval agentic``); it may
write up to the task's per-turn budget or to the end of the context, whichever comes first."""


def play_episodes(task: Any, prompts: Sequence[Prompt], engine: Any, tokenizer: Any, *,  # noqa: ANN401
                  budget: int, temperature: float, top_p: float, stop_id: int, seed: int,
                  max_context: int, constrainer: Any = None) -> list[PlayedEpisode]:  # noqa: ANN401
    """Play one episode per prompt with ``engine`` (``generate(requests, seed=...)``).

    With ``constrainer`` (a :class:`k2.agentic.constrain.ToolCallConstrainer`) every turn's tool
    calls are held to the environment's declared tools and their schemas; the completions' log-
    probabilities stay the model's own (docs/rl.md, "Constrained requests").

    Turn ``t`` of episode ``i`` samples with the seed ``request_seed(seed, t · len(prompts) + i)``,
    so an episode's samples depend on the seed and the weights only.
    """
    episodes = [PlayedEpisode(p) for p in prompts]
    envs, contexts = [], []
    for p in prompts:
        env = task.make_env(p, tokenizer=tokenizer)
        obs = env.reset()
        if len(obs.ids) + MIN_TURN_TOKENS > max_context:
            raise RLError(f"task {task.name!r}: prompt {p.id!r} is {len(obs.ids)} tokens; with a turn "
                          f"of at least {MIN_TURN_TOKENS} it exceeds the model's context of {max_context}")
        envs.append(env)
        contexts.append(list(obs.ids))
    active = list(range(len(prompts)))
    turn = 0
    while active:
        fits = [i for i in active if len(contexts[i]) + MIN_TURN_TOKENS <= max_context]
        if not fits:
            break  # the rest cannot take another turn: unfinished
        requests = [Request(contexts[i], min(budget, max_context - len(contexts[i])), temperature=temperature,
                            top_p=top_p, stop_ids=[stop_id],
                            seed=request_seed(seed, turn * len(prompts) + i),
                            constraint=None if constrainer is None or not envs[i].tools
                            else constrainer.row(envs[i].tools, contexts[i]))
                    for i in fits]
        completions = engine.generate(requests, seed=seed)
        still = []
        for i, completion in zip(fits, completions):
            completion.index = i
            episode = episodes[i]
            episode.segments.append((contexts[i], completion))
            text = tokenizer.decode(completion.token_ids, skip_special_tokens=False)
            episode.transcript += text if text.endswith(IM_END) else text + IM_END
            obs, _, done, _ = envs[i].step(list(completion.token_ids))
            if done:
                episode.done = True
            else:
                contexts[i] = contexts[i] + list(completion.token_ids) + list(obs.ids or [])
                still.append(i)
        active = still
        turn += 1
    for episode in episodes:
        if episode.done:
            episode.reward = task.verify(episode.prompt, episode.transcript)
        else:
            turns = len(episode.segments)
            episode.reward = Reward(0.0, False, f"the episode did not end ({turns} turns fit the context)")
    return episodes
