"""An RL step of ``k2 rl`` against TRL's ``GRPOTrainer``, on the CPU (issue 20).

Both sides train the same policy on the same task with the same settings, one after the other in
one process at the same torch thread count:

* **k2**: :class:`k2.rl.job.RLJob` — what one ``k2 rl`` optimizer step runs: draw P prompts,
  sample K responses each with the :class:`k2.rl.RolloutEngine` (all P·K in one continuous batch),
  score them with the task's verifier, one forward + backward of the loss, MuonClip.
* **TRL**: ``trl.GRPOTrainer`` on the same weights, saved as a k2 checkpoint, exported by the path
  of ``k2 ckpt export-hf`` and loaded by transformers' ``DeepseekV3ForCausalLM``
  (``bench/rollout.py``'s :func:`export_for_transformers`). Its reward function decodes each
  completion with the same tokenizer and calls the same verifier, with the same shaping (a
  response that runs out of its budget without ``<|im_end|>`` loses ``--truncation-penalty``).
  One generation per optimizer step of P prompts × K (``num_generations``), transformers'
  ``generate`` (no vLLM), AdamW (TRL's optimizer), no gradient checkpointing, fp32, no logging.

Same for both: the built-in arithmetic task (``--task-level``), P (``--prompts``), K
(``--samples``), the token budget (``--budget``, TRL's ``max_completion_length``), the
temperature (constant; top-p 1, no top-k), the prompts' rendering (K2's chat template, assistant
turn open: the benchmark checks that TRL tokenizes them to k2's ids), the loss (``--objective
grpo``, the default: TRL's clipped token-level loss with its ``dapo`` reduction, ε 0.2, no KL;
``--objective k2`` gives k2 its own K2 loss), constant learning rates, gradient clipping and
weight decay. What differs is each system's own: k2's MuonClip (Muon ``--lr``, AdamW
``--adamw-lr``) against TRL's AdamW (``--trl-lr``), and the prompts each draws from the task.

The policy: ``--init`` (a k2 run or checkpoint with its tokenizer, e.g. a ``k2 rl
--warm-start-steps N --steps 0`` run), or else the ``--preset`` model with random weights, a
byte-level BPE tokenizer trained on the task's texts and ``--warm-start-steps`` supervised steps
on the task's gold answers (k2 rl's warm start), so that rewards vary from the first step.

Each side trains for ``--seconds`` (or ``--steps`` steps, whichever ends first; setting up is
not counted) on ``--clock``: the wall clock, or ``cpu`` — this process's CPU seconds
(``time.process_time``), the work done, which other jobs on a busy machine disturb far less than
the wall clock (with ``--threads 1`` the two agree on an idle machine). Reported: seconds per
step on that clock (median over the steps after the first) and on both clocks, the ratio TRL / k2
(goal: k2 at least 2x faster), and the mean shaped reward, verifier score and accuracy of the
training samples of the steps that ended in the last ``--tail`` of the time budget (reward at
equal time), plus k2's rollout/update split (wall seconds).

Run:  python bench/rl_trl.py --threads 1 --seconds 300     (tiny preset, P 8, K 8, budget 32)
      python bench/rl_trl.py --init runs/ws --seconds 600  (from a warm-started k2 run)
      python bench/rl_trl.py --threads 1 --clock cpu --seconds 60   (a busy machine)
      python bench/rl_trl.py --quick                       (a few seconds: one step each)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rollout import export_for_transformers  # noqa: E402  (bench/rollout.py)

from k2 import checkpoint  # noqa: E402
from k2.data.chat import render_chat  # noqa: E402
from k2.model import K2Config, K2ForCausalLM  # noqa: E402
from k2.parallel.setup import Dist  # noqa: E402
from k2.rl.config import RLConfig  # noqa: E402
from k2.rl.job import IM_END, RLJob, render_prompt  # noqa: E402
from k2.rl.tasks import get_task  # noqa: E402


@dataclass
class Trace:
    """One side's run: per optimizer step, when it ended (seconds since training began), how
    long it took, and its samples' mean shaped reward, verifier score, accuracy, truncation rate
    and response length; rollout and update seconds where the side reports them."""

    name: str
    threads: int = 0
    ends: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    truncation: list[float] = field(default_factory=list)
    response_len: list[float] = field(default_factory=list)
    rollout_s: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    wall_seconds: list[float] = field(default_factory=list)
    clock: str = "wall"
    origin: tuple[float, float] = (0.0, 0.0)

    def start(self) -> None:
        """Mark the start of training (both clocks)."""
        self.origin = (time.perf_counter(), time.process_time())

    def add_step(self) -> None:
        """Mark the end of a step: ``ends``/``seconds`` on the trace's clock (``wall``, or
        ``cpu``: this process's CPU seconds), both clocks' step times kept."""
        wall = time.perf_counter() - self.origin[0]
        cpu = time.process_time() - self.origin[1]
        self.wall_seconds.append(wall - sum(self.wall_seconds))
        self.cpu_seconds.append(cpu - sum(self.cpu_seconds))
        elapsed = cpu if self.clock == "cpu" else wall
        self.seconds.append(elapsed - (self.ends[-1] if self.ends else 0.0))
        self.ends.append(elapsed)

    @property
    def elapsed(self) -> float:
        """Seconds on the trace's clock at the end of the last step."""
        return self.ends[-1] if self.ends else 0.0

    def summary(self, budget: float, tail: float) -> dict[str, Any]:
        """Seconds per step (median after the first step) and the sample statistics of the
        steps that ended in the last ``tail`` of ``budget`` seconds (all steps when none did)."""
        steady = self.seconds[1:] or self.seconds
        start = budget * (1 - tail)
        last = [i for i, end in enumerate(self.ends) if end >= start] or list(range(len(self.ends)))

        def mean(values: list[float]) -> float:
            picked = [values[i] for i in last if i < len(values)]
            return statistics.fmean(picked) if picked else float("nan")

        out: dict[str, Any] = {
            "steps": len(self.ends), "clock": self.clock, "elapsed_s": round(self.elapsed, 3),
            "wall_s": round(sum(self.wall_seconds), 3), "threads": self.threads,
            "s_per_step": round(statistics.median(steady), 4) if steady else float("nan"),
            "wall_s_per_step": round(statistics.median(self.wall_seconds[1:] or self.wall_seconds), 4)
            if self.wall_seconds else float("nan"),
            "first_step_s": round(self.seconds[0], 4) if self.seconds else float("nan"),
            # CPU seconds of this process per step: the work, less exposed to a busy machine's load
            "cpu_s_per_step": round(statistics.median(self.cpu_seconds[1:] or self.cpu_seconds), 4)
            if self.cpu_seconds else float("nan"),
            "tail_steps": len(last),
            "tail_reward": round(mean(self.reward), 4), "tail_score": round(mean(self.score), 4),
            "tail_accuracy": round(mean(self.accuracy), 4),
            "tail_truncation": round(mean(self.truncation), 4),
            "tail_response_len": round(mean(self.response_len), 2),
            "first_reward": round(self.reward[0], 4) if self.reward else float("nan"),
        }
        if self.rollout_s:
            out["rollout_s_per_step"] = round(statistics.median(self.rollout_s[1:] or self.rollout_s), 4)
            out["update_s_per_step"] = round(statistics.median(self.train_s[1:] or self.train_s), 4)
        return out


# ---------------------------------------------------------------------------- the policy
def train_task_tokenizer(task, vocab_size: int, out: Path):  # noqa: ANN001, ANN201
    """A byte-level BPE tokenizer (K2's special tokens) trained on the task's chat texts."""
    from k2.data.tokenizer import save_tokenizer, train_tokenizer

    texts = [render_chat([*m, {"role": "assistant", "content": g}]) for m, g in task.warm_start_examples(2000)]
    tokenizer = train_tokenizer(texts, vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, out)
    return tokenizer


def rl_config(args: argparse.Namespace, **overrides: Any) -> RLConfig:
    """The ``k2 rl`` settings of the k2 side (and of the warm start)."""
    settings = dict(
        init="bench", preset="custom", device="cpu", seed=args.seed, task="arithmetic",
        task_level=args.task_level, prompts_per_step=args.prompts, samples_per_prompt=args.samples,
        token_budget=args.budget, temperature_start=args.temperature, temperature_end=args.temperature,
        top_p=1.0, objective=args.objective, optimizer=args.optimizer, lr=args.lr, adamw_lr=args.adamw_lr,
        truncation_penalty=args.truncation_penalty, rollout_batch=args.prompts * args.samples,
        steps=max(args.steps, 1), warm_start_steps=0, seq_len=128, batch_size=8,
    )
    config = RLConfig(**{**settings, **overrides})
    config.validate()
    return config


def build_policy(args: argparse.Namespace, task, directory: Path,  # noqa: ANN001
                 log) -> tuple[K2ForCausalLM, Any, Path]:  # noqa: ANN001
    """The starting policy (in eval mode), its ``tokenizers.Tokenizer`` and tokenizer directory."""
    from k2.data import load_tokenizer

    if args.init:
        from k2.train.sft import resolve_init

        init = resolve_init(args.init)
        model = K2ForCausalLM(K2Config.from_hf_dict(init.hf_config))
        checkpoint.load(init.checkpoint, model, restore_rng=False)
        log(f"# policy: {init.checkpoint} ({sum(p.numel() for p in model.parameters()):,} parameters)")
        return model.eval(), load_tokenizer(init.tokenizer_dir), Path(init.tokenizer_dir)
    config = K2Config.from_preset(args.preset)
    if args.quick:
        config = dataclasses.replace(config, num_hidden_layers=2, vocab_size=1024)
    tokenizer_dir = directory / "tokenizer"
    tokenizer = train_task_tokenizer(task, config.vocab_size, tokenizer_dir)
    torch.manual_seed(args.seed)
    model = K2ForCausalLM(config)
    if args.warm_start_steps:
        started = time.perf_counter()
        cfg = rl_config(args, warm_start_steps=args.warm_start_steps, optimizer="muonclip")
        job = RLJob(cfg, Dist(0, 1, torch.device("cpu")), model, tokenizer, task, log=lambda _line: None)
        for step in range(args.warm_start_steps):
            loss = job.train_step(step, log=True)["loss"]
        log(f"# warm start: {args.warm_start_steps} supervised steps on gold answers in "
            f"{time.perf_counter() - started:.0f} s (last loss {loss:.3f})")
    log(f"# policy: preset {args.preset}{' (quick: 2 layers, vocab 1024)' if args.quick else ''}, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, tokenizer of "
        f"{tokenizer.get_vocab_size()} tokens trained on the task's texts")
    return model.eval(), tokenizer, tokenizer_dir


# ---------------------------------------------------------------------------- k2
def run_k2(model: K2ForCausalLM, tokenizer, task, args: argparse.Namespace) -> Trace:  # noqa: ANN001
    """``k2 rl``'s step (:meth:`RLJob.train_step`) until the time or step budget runs out."""
    job = RLJob(rl_config(args), Dist(0, 1, torch.device("cpu")), model, tokenizer, task,
                log=lambda _line: None)
    trace = Trace("k2", threads=torch.get_num_threads(), clock=args.clock)
    trace.start()
    step = 0
    while step < args.steps and trace.elapsed < args.seconds:
        fields = job.train_step(step, log=True)
        trace.add_step()
        for name in ("reward", "score", "accuracy", "response_len", "rollout_s", "train_s"):
            getattr(trace, name).append(float(fields[name]))
        trace.truncation.append(float(fields["truncation_rate"]))
        step += 1
    return trace


# ---------------------------------------------------------------------------- TRL
def hf_tokenizer(tokenizer_dir: Path):  # noqa: ANN201
    """The policy's tokenizer as transformers sees it, with ``<|im_end|>`` as the stop token
    (the end of the assistant turn, where ``k2 rl`` stops sampling)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.eos_token = IM_END
    return tok


def make_reward(task, tokenizer, prompts: list, penalty: float, trace: Trace):  # noqa: ANN001, ANN201
    """TRL's reward function: the task's verifier on each completion decoded as k2 decodes it,
    minus ``penalty`` for a completion cut at the budget (no ``<|im_end|>``); records each
    call's statistics in ``trace`` (one call per optimizer step)."""
    im_end = tokenizer.token_to_id(IM_END)

    def k2_verifier_reward(completion_ids: list[list[int]], index: list[int], **_: Any) -> list[float]:
        chosen = [prompts[i] for i in index]
        texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in completion_ids]
        verdicts = task.verify_many(chosen, texts)
        cut = [im_end not in ids for ids in completion_ids]
        rewards = [v.score - (penalty if c else 0.0) for v, c in zip(verdicts, cut)]
        n = len(rewards)
        trace.reward.append(sum(rewards) / n)
        trace.score.append(sum(v.score for v in verdicts) / n)
        trace.accuracy.append(sum(v.correct for v in verdicts) / n)
        trace.truncation.append(sum(cut) / n)
        trace.response_len.append(sum(len(ids) for ids in completion_ids) / n)
        return rewards

    return k2_verifier_reward


def run_trl(model: K2ForCausalLM, tokenizer, tokenizer_dir: Path, task, args: argparse.Namespace,  # noqa: ANN001
            directory: Path, log) -> Trace:  # noqa: ANN001
    """TRL's GRPOTrainer on the exported policy until the time or step budget runs out."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    hf_model = export_for_transformers(model, directory / "export")
    hf_tok = hf_tokenizer(tokenizer_dir)
    hf_model.generation_config.eos_token_id = hf_tok.eos_token_id
    hf_model.generation_config.pad_token_id = hf_tok.pad_token_id
    # The prompts: rendered with K2's chat template as k2 rl renders them; TRL must see the same ids.
    count = args.prompts * min(args.steps, 200)
    prompts = task.prompts("train", count, seed=args.seed)
    texts = [render_chat(p.messages, p.tools, add_generation_prompt=True) for p in prompts]
    for prompt, text in zip(prompts[:16], texts):
        if hf_tok(text)["input_ids"] != render_prompt(tokenizer, prompt):
            raise RuntimeError(f"TRL would tokenize prompt {prompt.id} differently from k2 rl")
    dataset = Dataset.from_dict({"prompt": texts, "index": list(range(len(prompts)))})
    trace = Trace("trl", clock=args.clock)
    reward = make_reward(task, tokenizer, prompts, args.truncation_penalty, trace)
    base = rl_config(args)
    settings = GRPOConfig(
        output_dir=str(directory / "trl"), report_to="none", logging_strategy="no", save_strategy="no",
        disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        use_vllm=False, seed=args.seed, data_seed=args.seed, dataloader_num_workers=0,
        per_device_train_batch_size=args.prompts * args.samples, num_generations=args.samples,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        max_completion_length=args.budget, temperature=args.temperature, top_p=1.0, top_k=0,
        beta=0.0, epsilon=base.grpo_epsilon, loss_type="dapo", scale_rewards="group",
        learning_rate=args.trl_lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=base.weight_decay, max_grad_norm=base.grad_clip, max_steps=args.steps,
        log_completions=False,
    )

    class Clock(TrainerCallback):
        """Step boundaries, and the stop when the time budget is spent."""

        def on_train_begin(self, _args, state, control, **kwargs):  # noqa: ANN001, ANN201
            trace.threads = torch.get_num_threads()
            trace.start()

        def on_step_end(self, _args, state, control, **kwargs):  # noqa: ANN001, ANN201
            trace.add_step()
            if trace.elapsed >= args.seconds:
                control.should_training_stop = True
            return control

    trainer = GRPOTrainer(model=hf_model, reward_funcs=[reward], args=settings, train_dataset=dataset,
                          processing_class=hf_tok, callbacks=[Clock()])
    trainer.train()
    if len(trace.reward) != len(trace.ends):
        raise RuntimeError(f"TRL called the reward {len(trace.reward)} times in {len(trace.ends)} steps "
                           "(expected one generation per step)")
    log(f"# trl: {type(trainer.optimizer).__name__ if trainer.optimizer else 'AdamW'} lr {args.trl_lr}")
    return trace


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="", help="start from this k2 run or checkpoint (with its tokenizer)")
    parser.add_argument("--preset", default="tiny", help="model preset without --init (default: tiny)")
    parser.add_argument("--warm-start-steps", type=int, default=40,
                        help="supervised steps on gold answers before both sides start (without --init)")
    parser.add_argument("--task-level", type=int, default=1, help="arithmetic level (default 1)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step, P (default 8)")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt, K (default 8)")
    parser.add_argument("--budget", type=int, default=32, help="most response tokens (default 32)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--truncation-penalty", type=float, default=0.5)
    parser.add_argument("--objective", default="grpo", choices=["grpo", "k2"], help="k2's loss (default grpo)")
    parser.add_argument("--optimizer", choices=["muonclip", "adamw"], default="muonclip",
                        help="k2's optimizer: MuonClip (K2's; default) or AdamW on every parameter at "
                             "--adamw-lr, TRL's optimizer, so that only the systems' speed differs")
    parser.add_argument("--lr", type=float, default=1e-3, help="k2's Muon learning rate")
    parser.add_argument("--adamw-lr", type=float, default=5e-4, help="k2's AdamW learning rate")
    parser.add_argument("--trl-lr", type=float, default=5e-4, help="TRL's AdamW learning rate")
    parser.add_argument("--seconds", type=float, default=300.0, help="time budget of each side (on --clock)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="what --seconds and s/step count: wall-clock, or this process's CPU seconds "
                             "(for a machine busy with other jobs; use with --threads 1)")
    parser.add_argument("--steps", type=int, default=100_000, help="most steps of each side")
    parser.add_argument("--tail", type=float, default=1 / 3, help="share of the budget the reward is read over")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["k2", "trl"], default=None, help="run one side only")
    parser.add_argument("--plot", default="", help="write the reward and accuracy curves of both sides "
                        "against time on --clock to this PNG")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2-layer tiny model, no warm start, P 2, K 2, budget 8, one step each")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.prompts, args.samples, args.budget, args.steps, args.warm_start_steps = 2, 2, 8, 1, 0
    if not 0 < args.tail <= 1:
        parser.error("--tail must lie in (0, 1]")

    def log(line: str) -> None:
        print(line, flush=True)

    task = get_task("arithmetic", level=args.task_level)
    load = [os.getloadavg()[0]]
    result: dict[str, Any] = {"bench": "rl_trl", "quick": args.quick}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        model, tokenizer, tokenizer_dir = build_policy(args, task, directory, log)
        import transformers
        import trl

        log(f"# rl_trl: k2 rl step (RLJob, objective {args.objective}) vs trl {trl.__version__} GRPOTrainer "
            f"(transformers {transformers.__version__}); arithmetic level {args.task_level}, P {args.prompts} x "
            f"K {args.samples}, budget {args.budget}, temperature {args.temperature}, fp32, CPU; "
            f"{args.seconds:g} s or {args.steps} steps each")
        log(f"# machine: {platform.machine()} cpus={os.cpu_count()} torch_threads={torch.get_num_threads()} "
            f"torch {torch.__version__}; load average {load[0]:.1f}")
        traces: dict[str, Trace] = {}
        if args.only in (None, "k2"):
            traces["k2"] = run_k2(copy.deepcopy(model).train(), tokenizer, task, args)
            load.append(os.getloadavg()[0])
        if args.only in (None, "trl"):
            traces["trl"] = run_trl(model, tokenizer, tokenizer_dir, task, args, directory, log)
            load.append(os.getloadavg()[0])
    budget = min(args.seconds, min(t.elapsed for t in traces.values()))
    summaries = {name: t.summary(budget, args.tail) for name, t in traces.items()}
    result.update({
        "task": f"arithmetic:{args.task_level}", "prompts": args.prompts, "samples": args.samples,
        "budget": args.budget, "temperature": args.temperature, "objective": args.objective,
        "init": args.init or f"{args.preset} + {args.warm_start_steps} warm-start steps",
        "seconds": args.seconds, "clock": args.clock, "optimizer": args.optimizer, "tail": round(args.tail, 3), "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in load], **summaries,
    })
    print(f"{'side':<5} {'steps':>6} {args.clock + ' s/step':>12} {'wall s':>8} {'cpu s':>7} {'rollout':>8} "
          f"{'update':>8} {'reward (tail)':>14} {'score':>7} {'accuracy':>9} {'trunc':>6} {'len':>6}")
    nan = float("nan")
    for name, s in summaries.items():
        print(f"{name:<5} {s['steps']:>6} {s['s_per_step']:>12.3f} {s['wall_s_per_step']:>8.3f} "
              f"{s['cpu_s_per_step']:>7.3f} {s.get('rollout_s_per_step', nan):>8.3f} "
              f"{s.get('update_s_per_step', nan):>8.3f} "
              f"{s['tail_reward']:>14.3f} {s['tail_score']:>7.3f} {s['tail_accuracy']:>9.3f} "
              f"{s['tail_truncation']:>6.2f} {s['tail_response_len']:>6.1f}")
    if len(summaries) == 2:
        k2, peer = summaries["k2"], summaries["trl"]
        result["speedup_vs_trl"] = round(peer["s_per_step"] / k2["s_per_step"], 2)
        result["wall_speedup_vs_trl"] = round(peer["wall_s_per_step"] / k2["wall_s_per_step"], 2)
        result["cpu_speedup_vs_trl"] = round(peer["cpu_s_per_step"] / k2["cpu_s_per_step"], 2)
        print(f"k2 is {result['speedup_vs_trl']:.2f}x TRL's steps per {args.clock} second (goal >= 2x; wall "
              f"{result['wall_speedup_vs_trl']:.2f}x, CPU {result['cpu_speedup_vs_trl']:.2f}x); reward over the "
              f"last {100 * args.tail:.0f} % of {budget:.0f} {args.clock} s: k2 {k2['tail_reward']:.3f}, "
              f"TRL {peer['tail_reward']:.3f}")
    if args.plot:
        plot_curves(traces, args, Path(args.plot))
        print(f"curves: {args.plot}")
    print(json.dumps(result))
    return result


def plot_curves(traces: dict[str, Trace], args: argparse.Namespace, path: Path) -> None:
    """Each side's mean shaped reward and sample accuracy per step against the time its step
    ended (a 5-step running mean over the raw points), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name, label in ((axes[0], "reward", "mean shaped reward of the step's samples"),
                            (axes[1], "accuracy", "accuracy of the step's samples")):
        for side, trace in traces.items():
            values = getattr(trace, name)
            ends = trace.ends[:len(values)]
            smooth = [statistics.fmean(values[max(0, i - 4):i + 1]) for i in range(len(values))]
            line, = ax.plot(ends, smooth, label=f"{side} ({len(ends)} steps)")
            ax.plot(ends, values, ".", color=line.get_color(), alpha=0.25, markersize=3)
        ax.set_xlabel(f"{args.clock} seconds of training")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    optimizer = "MuonClip" if args.optimizer == "muonclip" else "AdamW"
    fig.suptitle(f"k2 rl ({optimizer}) vs TRL GRPOTrainer (AdamW): arithmetic level {args.task_level}, "
                 f"P {args.prompts} x K {args.samples}, T {args.temperature}, {args.objective}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
