"""The rollout engine: batched sampling on the MLA KV cache with continuous batching (docs/rl.md).

:class:`RolloutEngine` runs up to ``max_batch`` sequences at once. Each :class:`Request` is
prefilled, then decoded one token per step together with the other running sequences; a
sequence stops at one of its stop tokens or at its token budget, and its row is at once given to
the next waiting request (prefilled and joined to the batch), so a long tail does not idle the
batch. Every request samples with its own random numbers (:mod:`k2.rl.sampling`), so the
result does not depend on ``max_batch`` or on the order requests run in.

Each :class:`Completion` carries its tokens, their log-probabilities under the sampling policy
(``log_softmax(logits / T)`` at the request's temperature, without top-p truncation or a
constraint's mask; see
:func:`k2.rl.logprobs.sequence_logprobs` for the same numbers from a full forward) and the
weight version the engine held when each token was sampled. A call can stop after a number of
decode steps and hand back paused completions, which a later call resumes on the same random
stream (``Request.prefix``): the engine side of partial rollouts.
"""

from __future__ import annotations

import math
import numbers
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from k2.errors import RLError
from k2.model.generate import TokenConstraint, apply_constraints, left_pad
from k2.model.mla import KVCache
from k2.rl.sampling import request_seed, request_uniforms, sample_tokens, scaled_logprobs
from k2.rl.slots import SlotCache

if TYPE_CHECKING:
    from k2.model.model import K2ForCausalLM

FINISH_REASONS = ("stop", "length")
CACHE_ROOM = 64  # columns allocated past the first prompts; the cache doubles when it fills


@dataclass(frozen=True)
class Request:
    """One sequence to generate.

    Attributes:
        prompt_ids: the prompt's token ids (at least one).
        max_new_tokens: the token budget: most tokens to generate (at least 1).
        temperature: sampling temperature; 0 decodes greedily.
        top_p: nucleus mass in (0, 1]; 1 samples from the whole distribution.
        stop_ids: token ids that end the sequence (the stop token is kept in the completion).
        seed: this request's random seed; None takes ``prefix.seed`` when resuming, else derives
            one from the call's seed and the request's index (:func:`k2.rl.sampling.request_seed`).
        prefix: a paused :class:`Completion` of this same request (from a call stopped by
            ``max_steps``): generation resumes after its tokens, which are kept with their
            log-probabilities and versions, on the same random stream (a partial rollout).
        constraint: restricts which tokens may be sampled (e.g. schema-constrained tool calls,
            :class:`k2.agentic.constrain.ToolCallConstraint`; docs/constrained-decoding.md):
            before each token its ``allowed_mask(vocab)`` removes the others from the logits,
            after it ``advance(token)`` is told the token. The reported log-probabilities stay
            the policy's, before the mask (as they are before top-p): those a full forward of the
            same tokens gives, which the RL trainer compares with. A resumed request needs a constraint
            that has seen the prefix's tokens (the same object, or one made from the prompt and
            the prefix's tokens).
    """

    prompt_ids: Sequence[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop_ids: Sequence[int] = ()
    seed: int | None = None
    prefix: Completion | None = None
    constraint: TokenConstraint | None = None


@dataclass
class Completion:
    """What one request produced.

    Attributes:
        index: the request's position in the list given to :meth:`RolloutEngine.generate`.
        prompt_ids: the prompt.
        token_ids: the generated tokens (ending with the stop token when ``finish_reason`` is
            ``"stop"``).
        logprobs: per generated token, ``log_softmax(logits / T)`` at it, where T is the
            request's temperature (1 for greedy requests), without top-p truncation or a
            constraint's mask.
        versions: per generated token, the engine's ``weight_version`` when it was sampled.
        finish_reason: ``"stop"`` (a stop token), ``"length"`` (the token budget), or None: paused
            by ``max_steps`` (resume it with ``Request(..., prefix=completion)``).
        seed: the random seed the request sampled with.
    """

    index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    seed: int = 0

    @property
    def logprob(self) -> float:
        """The sequence log-probability: the sum of ``logprobs``."""
        return math.fsum(self.logprobs)


@dataclass
class RolloutStats:
    """Counters of the last :meth:`RolloutEngine.generate` call.

    Attributes:
        requests: requests generated.
        tokens: tokens generated.
        prefills: prefill forwards (one per group of requests admitted together).
        decode_steps: decode forwards (one token for every running row).
        row_steps: sum over decode steps of the rows they ran (tokens decoded).
        seconds: wall time of the call.
    """

    requests: int = 0
    tokens: int = 0
    prefills: int = 0
    decode_steps: int = 0
    row_steps: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class _Running:
    """A request being generated: its completion, random numbers and stop set."""

    def __init__(self, index: int, request: Request, seed: int) -> None:
        self.index = index
        self.request = request
        self.completion = Completion(index, [int(t) for t in request.prompt_ids], seed=int(seed))
        if request.prefix is not None:
            self.completion.token_ids = list(request.prefix.token_ids)
            self.completion.logprobs = list(request.prefix.logprobs)
            self.completion.versions = list(request.prefix.versions)
        self.budget = int(request.max_new_tokens)
        self.uniforms = request_uniforms(int(seed), self.budget)
        self.stops = frozenset(int(t) for t in request.stop_ids)

    @property
    def position(self) -> int:
        """Position of the newest token (the one the next decode step feeds)."""
        return len(self.completion.prompt_ids) + len(self.completion.token_ids) - 1

    def add(self, token: int, logprob: float, version: int) -> bool:
        """Record a sampled token; True when the sequence is finished."""
        c = self.completion
        c.token_ids.append(token)
        c.logprobs.append(logprob)
        c.versions.append(version)
        if self.request.constraint is not None:
            self.request.constraint.advance(token)
        if token in self.stops:
            c.finish_reason = "stop"
        elif len(c.token_ids) >= self.budget:
            c.finish_reason = "length"
        return c.finish_reason is not None


class RolloutEngine:
    """Generates completions for many requests, ``max_batch`` at a time, with continuous batching.

    Args:
        model: the policy (run in eval and inference mode during :meth:`generate`).
        max_batch: slots: the most sequences decoded together.
        pad_token_id: the id fed for left padding in prefills (never attended to).
        weight_version: the version of the weights the model holds; every sampled token is
            tagged with the value this attribute has at the step that samples it. The caller
            sets it after loading new weights.
    """

    def __init__(
        self, model: K2ForCausalLM, *, max_batch: int = 8, pad_token_id: int = 0, weight_version: int = 0
    ) -> None:
        if max_batch < 1:
            raise RLError(f"max_batch must be at least 1, got {max_batch}")
        vocab = model.config.vocab_size
        if not 0 <= pad_token_id < vocab:
            raise RLError(f"pad_token_id={pad_token_id} is outside the vocabulary [0, {vocab})")
        self.model = model
        self.max_batch = max_batch
        self.pad_token_id = pad_token_id
        self.weight_version = weight_version
        self.last_stats = RolloutStats()

    # ------------------------------------------------------------------ validation
    def check_request(self, index: int, request: Request) -> None:
        """Raise :class:`RLError` naming ``index`` and the field if ``request`` is invalid."""
        config = self.model.config
        vocab = config.vocab_size

        def bad(name: str, why: str) -> RLError:
            return RLError(f"request {index}: {name} {why}")

        prompt = request.prompt_ids
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or len(prompt) == 0:
            raise bad("prompt_ids", "must be a non-empty sequence of token ids")
        for token in prompt:
            if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < vocab:
                raise bad("prompt_ids", f"holds {token!r}, not a token id in [0, {vocab})")
        budget = request.max_new_tokens
        if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
            raise bad("max_new_tokens", f"must be an integer >= 1, got {budget!r}")
        if len(prompt) + budget > config.max_position_embeddings:
            raise bad(
                "max_new_tokens",
                f"={budget} plus a prompt of {len(prompt)} tokens exceeds max_position_embeddings="
                f"{config.max_position_embeddings}",
            )
        temperature = request.temperature
        if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature < 0:
            raise bad("temperature", f"must be a finite number >= 0, got {temperature!r}")
        top_p = request.top_p
        if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {top_p!r}")
        for token in request.stop_ids:
            if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < vocab:
                raise bad("stop_ids", f"holds {token!r}, not a token id in [0, {vocab})")
        if request.seed is not None and (isinstance(request.seed, bool) or not isinstance(request.seed, numbers.Integral)):
            raise bad("seed", f"must be an integer or None, got {request.seed!r}")
        prefix = request.prefix
        if prefix is not None:
            if not isinstance(prefix, Completion):
                raise bad("prefix", f"must be a paused Completion or None, got {type(prefix).__name__}")
            if prefix.finish_reason is not None:
                raise bad("prefix", f"is finished ({prefix.finish_reason!r}); only paused completions resume")
            if prefix.prompt_ids != [int(t) for t in prompt]:
                raise bad("prefix", "has another prompt than prompt_ids")
            tokens = len(prefix.token_ids)
            if len(prefix.logprobs) != tokens or len(prefix.versions) != tokens:
                raise bad("prefix", "needs one log-probability and one version per token")
            if tokens >= budget:
                raise bad("prefix", f"holds {tokens} tokens, not fewer than max_new_tokens={budget}")
            if any(int(t) in set(request.stop_ids) for t in prefix.token_ids):
                raise bad("prefix", "holds a stop token")
        constraint = request.constraint
        if constraint is not None and not (callable(getattr(constraint, "allowed_mask", None))
                                           and callable(getattr(constraint, "advance", None))):
            raise bad("constraint", f"must have allowed_mask(vocab) and advance(token), got {type(constraint).__name__}")

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(
        self,
        requests: Sequence[Request],
        *,
        seed: int = 0,
        progress: Callable[[int, int], None] | None = None,
        max_steps: int | None = None,
        on_token: Callable[[int, int], bool | None] | None = None,
        between_steps: Callable[[], None] | None = None,
        admit: Callable[[int], Sequence[Request]] | None = None,
        on_finish: Callable[[Completion], None] | None = None,
    ) -> list[Completion]:
        """Generate every request; returns their completions in request order.

        Args:
            requests: what to generate.
            seed: seeds the requests without a seed of their own (with their index).
            progress: called as ``progress(finished, total)`` after each finished request.
            max_steps: stop after this many decode steps; the unfinished completions come back
                paused (``finish_reason`` None), to be resumed as a ``Request.prefix``.
            on_token: called as ``on_token(index, token)`` right after each token of request
                ``index`` is recorded (streaming, stop strings, cancellation: docs/serve.md). A
                true return ends that request there with ``finish_reason`` ``"stop"`` (when the
                token did not already finish it) and frees its row.
            between_steps: called before every prefill and decode forward, where no forward is
                running: a caller may load new weights there (and set ``weight_version``), which
                the next step samples with (live weight updates, docs/serve.md).
            admit: called as ``admit(room)`` before each step, where ``room`` is how many rows
                are free and not promised to a waiting request; the requests it returns join the
                running batch (prefilled into free rows, the batch growing up to ``max_batch``),
                with indices continuing after ``requests``. The call then runs until nothing
                runs or waits (a server's continuous batching across requests, docs/serve.md).
                Requests admitted this way come back only through ``on_finish``, and the
                engine keeps no reference to them once finished. Not with ``max_steps``.
            on_finish: called as ``on_finish(completion)`` when a request finishes.

        Raises:
            RLError: for an invalid request (the message names its index and field).
        """
        for index, request in enumerate(requests):
            self.check_request(index, request)
        started = time.perf_counter()
        stats = RolloutStats(requests=len(requests))
        self.last_stats = stats
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0):
            raise RLError(f"max_steps must be None or an integer >= 0, got {max_steps!r}")
        if admit is not None and max_steps is not None:
            raise RLError("admit and max_steps cannot be combined (admitted requests are never paused)")
        running = [_Running(i, r, self._seed_of(r, seed, i)) for i, r in enumerate(requests)]
        waiting = deque(running)
        finished = 0
        total = len(running)  # requests given or admitted so far
        model = self.model
        parameter = next(model.parameters())
        device, dtype = parameter.device, parameter.dtype
        was_training = model.training
        model.eval()
        try:
            cache: SlotCache | None = None
            rows: list[_Running | None] = []
            while True:
                if admit is not None:  # requests that arrived meanwhile join the batch
                    room = self.max_batch - sum(r is not None for r in rows) - len(waiting)
                    for request in admit(max(room, 0)):
                        self.check_request(total, request)
                        waiting.append(_Running(total, request, self._seed_of(request, seed, total)))
                        total += 1
                        stats.requests += 1
                if not (waiting or rows):
                    break
                if max_steps is not None and stats.decode_steps >= max_steps:
                    break  # pause: whatever is running or waiting comes back unfinished
                # Admit waiting requests into free rows (a prefill may finish some at once).
                while waiting and (None in rows or len(rows) < self.max_batch):
                    if cache is None:
                        rows = [None] * min(self.max_batch, len(waiting))
                        width = max(len(r.request.prompt_ids) for r in list(waiting)[: len(rows)])
                        cache = SlotCache(model.config, len(rows), width + CACHE_ROOM, dtype, device)
                    elif None not in rows:  # only with admit: the batch grows for late arrivals
                        grow = min(self.max_batch - len(rows), len(waiting))
                        cache.add_rows(grow)
                        rows.extend([None] * grow)
                    free = [i for i, r in enumerate(rows) if r is None]
                    group = [waiting.popleft() for _ in range(min(len(free), len(waiting)))]
                    if between_steps is not None:
                        between_steps()
                    prefill, first = self._prefill(group, device, dtype)
                    stats.prefills += 1
                    version = self.weight_version  # one version for all tokens of a step
                    for row_in_group, seq in enumerate(group):
                        token, logprob = first[row_in_group]
                        stats.tokens += 1
                        if self._record(seq, token, logprob, version, on_token):
                            finished += 1
                            if on_finish is not None:
                                on_finish(seq.completion)
                            if progress is not None:
                                progress(finished, total)
                            continue
                        cached = seq.position  # the prompt and all tokens but the newest
                        cache.reserve(cached)
                        row = free.pop(0)
                        cache.place(row, prefill, row_in_group, cached)
                        rows[row] = seq
                if cache is None:
                    break
                if not waiting and None in rows:
                    keep = [i for i, r in enumerate(rows) if r is not None]
                    if not keep:
                        if admit is None:
                            break
                        cache, rows = None, []  # idle: admit may still bring requests
                        continue
                    cache.keep_rows(keep)
                    rows = [rows[i] for i in keep]
                # One decode step for every row.
                active = [seq for seq in rows if seq is not None]  # all rows: none is free here
                assert len(active) == len(rows), "a free row reached a decode step"
                if between_steps is not None:
                    between_steps()
                ids = torch.tensor([[s.completion.token_ids[-1]] for s in active], device=device)
                positions = torch.tensor([[s.position] for s in active], device=device)
                mask = cache.step_mask().long()
                logits = model(ids, mask, positions, cache=cache.kv, logits_to_keep=1).logits[:, -1]
                tokens, logprobs = self._sample(logits, active)
                stats.decode_steps += 1
                stats.row_steps += len(active)
                stats.tokens += len(active)
                version = self.weight_version
                for row, (seq, token, logprob) in enumerate(zip(active, tokens.tolist(), logprobs.tolist())):
                    if self._record(seq, token, logprob, version, on_token):
                        finished += 1
                        rows[row] = None
                        cache.free(row)
                        if on_finish is not None:
                            on_finish(seq.completion)
                        if progress is not None:
                            progress(finished, total)
        finally:
            model.train(was_training)
        stats.seconds = time.perf_counter() - started
        return [seq.completion for seq in running]

    def _prefill(
        self, group: list[_Running], device: torch.device, dtype: torch.dtype
    ) -> tuple[KVCache, list[tuple[int, float]]]:
        """Run the prompts of ``group`` (left-padded) into a fresh cache and sample each one's
        first token. Returns the cache and (token, logprob) per request."""
        prompts = [seq.completion.prompt_ids + seq.completion.token_ids for seq in group]
        ids, mask = left_pad(prompts, self.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        cache = KVCache(self.model.config, len(group), ids.shape[1], dtype, device)
        logits = self.model(ids, mask, positions, cache=cache, logits_to_keep=1).logits[:, -1]
        tokens, logprobs = self._sample(logits, group)
        return cache, list(zip(tokens.tolist(), logprobs.tolist()))

    @staticmethod
    def _record(
        seq: _Running, token: int, logprob: float, version: int,
        on_token: Callable[[int, int], bool | None] | None,
    ) -> bool:
        """Add a sampled token to ``seq`` and tell ``on_token``; True when ``seq`` is finished."""
        done = seq.add(token, logprob, version)
        if on_token is not None and on_token(seq.index, token) and not done:
            seq.completion.finish_reason = "stop"
            done = True
        return done

    @staticmethod
    def _seed_of(request: Request, seed: int, index: int) -> int:
        if request.seed is not None:
            return int(request.seed)
        if request.prefix is not None:
            return request.prefix.seed
        return request_seed(seed, index)

    def _sample(self, logits: torch.Tensor, sequences: list[_Running]) -> tuple[torch.Tensor, torch.Tensor]:
        temperature = torch.tensor([float(s.request.temperature) for s in sequences], dtype=torch.float32)
        top_p = torch.tensor([float(s.request.top_p) for s in sequences], dtype=torch.float64)
        uniforms = torch.stack([s.uniforms[len(s.completion.token_ids)] for s in sequences])
        device = logits.device
        temperature, top_p, uniforms = temperature.to(device), top_p.to(device), uniforms.to(device)
        if not any(s.request.constraint is not None for s in sequences):
            return sample_tokens(logits, temperature, top_p, uniforms)
        masked = apply_constraints(logits, [s.request.constraint for s in sequences])
        tokens, _ = sample_tokens(masked, temperature, top_p, uniforms)
        # The log-probability is the policy's, before the mask (as it is before top-p): what a full
        # forward of the same tokens gives, so the trainer's log-ratio is 0 at θ = θ_old.
        return tokens, scaled_logprobs(logits, temperature).gather(1, tokens[:, None]).squeeze(1)
