"""The closed-loop study: does critic–verifier agreement on held-out pairs rise as the critic is
updated on on-policy pairs of verifiable prompts? (docs/critic.md, "The study")

For each seed, one ``k2 rl`` run on arithmetic with a share of critic-rewarded prompts (the
opening-praise bait by default), the critic a copy of the init policy bootstrapped on synthesized
pairs (``--critic-bootstrap-steps``) and then updated every RL step on the closed-loop pairs. The
runs log ``critic_agreement`` — the share of held-out pairs (on-policy samples of
``--critic-eval-prompts`` test prompts with different verifier scores; the critic never trains on
them) on which the critic prefers the better-verified reply — every ``--agreement-every`` RL
steps, plus ``opening_praise_rate`` and the critic-rewarded replies' length every step.

Writes ``OUT/summary.json`` (per seed: the agreement curve, the first measured value after the
bootstrap, the last, the maximum, wall time; the bait's opening-praise rate at the start and
end) and ``OUT/critic_study.png``; each run's own directory holds its metrics and checkpoints.
A finished run (its ``summary`` entry present) is not rerun.

The policy: ``--init RUN`` (a ``k2 train``/``k2 sft`` run). Without it, ``--make-init`` builds a
random tiny-preset policy with a tokenizer trained on the arithmetic and critic prompts, which the
warm-start steps then teach the answer format — enough to exercise the loop, not to judge it.

Full study (about 15 minutes per seed on a quiet 2-core machine; not run here):

    python bench/critic_study.py --init runs/tiny --seeds 0 1 2 --steps 200 --out runs/critic-study

Smoke run (about 2 minutes):

    python bench/critic_study.py --make-init --seeds 0 --warm-start-steps 10 --steps 6 \\
        --prompts-per-step 4 --samples-per-prompt 4 --critic-eval-prompts 8 --out runs/critic-smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import time
from pathlib import Path

import torch


def make_init(out: Path, vocab: int, preset: str) -> Path:
    """A random ``preset`` policy with a tokenizer trained on arithmetic chats and critic prompts,
    saved as a run directory ``k2 rl --init`` accepts."""
    from k2 import checkpoint
    from k2.data.chat import render_chat
    from k2.data.tokenizer import save_tokenizer, train_tokenizer
    from k2.model import K2Config, K2ForCausalLM
    from k2.rl.critic.bait import BaitPrompts
    from k2.rl.critic.bootstrap import critic_conversations, synthesize_pairs
    from k2.rl.tasks import get_task

    run = out / "init"
    if (run / "config.json").is_file():
        return run
    task = get_task("arithmetic")
    texts = [render_chat([*m, {"role": "assistant", "content": g}]) for m, g in task.warm_start_examples(400)]
    texts += [render_chat(r["messages"]) for r in critic_conversations(synthesize_pairs(400, seed=0))]
    texts += [render_chat(p.messages) for p in BaitPrompts().prompts("train", 40)]
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab)
    save_tokenizer(tokenizer, tok_dir)
    torch.manual_seed(0)  # the model's vocabulary is the tokenizer's: every sampled id decodes
    model = K2ForCausalLM(dataclasses.replace(K2Config.from_preset(preset), vocab_size=tokenizer.get_vocab_size()))
    checkpoint.save(run / "checkpoints", model, None, {"step": 0}, tokenizer_dir=tok_dir)
    (run / "config.json").write_text(json.dumps({"preset": "custom", "data_dir": str(tok_dir)}))
    return run


def run_seed(args: argparse.Namespace, init: Path, seed: int, out: Path) -> dict:
    from k2.cli import main as k2
    from k2.train.metrics import read_metrics

    run = out / f"seed-{seed}"
    argv = ["rl", "--init", str(init), "--run-dir", str(run), "--task", "arithmetic",
            "--task-level", str(args.task_level), "--seed", str(seed), "--steps", str(args.steps),
            "--warm-start-steps", str(args.warm_start_steps), "--prompts-per-step", str(args.prompts_per_step),
            "--samples-per-prompt", str(args.samples_per_prompt), "--lr", str(args.lr),
            "--eval-every", str(args.warm_start_steps + args.steps), "--eval-prompts", str(args.eval_prompts),
            "--save-every", str(args.warm_start_steps + args.steps), "--no-progress", "--device", "cpu",
            "--critic-share", str(args.critic_share), "--critic-prompts", args.critic_prompts,
            "--critic-update-every", "1", "--critic-update-steps", str(args.critic_update_steps),
            "--critic-lr", str(args.critic_lr), "--critic-batch", str(args.critic_batch),
            "--critic-eval-prompts", str(args.critic_eval_prompts), "--critic-eval-every", str(args.agreement_every),
            "--critic-bootstrap-steps", str(args.critic_bootstrap_steps),
            "--critic-aggregation", args.aggregation, "--critic-pairs", args.pairs, *shlex.split(args.rl_args)]
    started = time.perf_counter()
    code = k2(argv)
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"k2 rl exited with {code} for seed {seed}")
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train" and r.get("phase") == "rl"]
    curve = [(r["step"], r["critic_agreement"], r["critic_agreement_pairs"]) for r in train if "critic_agreement" in r]
    evals = [r for r in records if r["kind"] == "eval" and "critic_agreement" in r]
    praise = [r["opening_praise_rate"] for r in train if "opening_praise_rate" in r]
    return {
        "seed": seed, "wall_s": wall, "run_dir": str(run),
        "agreement_curve": curve,
        "agreement_first": curve[0][1] if curve else None,
        "agreement_last": curve[-1][1] if curve else None,
        "agreement_max": max((c[1] for c in curve), default=None),
        "final_eval_agreement": evals[-1]["critic_agreement"] if evals else None,
        "critic_updates": train[-1]["critic_updates"] if train else 0,
        "closed_loop_pairs_seen": sum(r.get("critic_new_pairs", 0) for r in train),
        "opening_praise_first": praise[0] if praise else None,
        "opening_praise_last": praise[-1] if praise else None,
        "critic_response_len_first": train[0].get("critic_response_len") if train else None,
        "critic_response_len_last": train[-1].get("critic_response_len") if train else None,
        "position_bias_last": train[-1].get("position_bias_rate") if train else None,
    }


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for entry in summary["runs"]:
        if entry["agreement_curve"]:
            steps, values, _ = zip(*entry["agreement_curve"])
            ax.plot(steps, values, marker="o", label=f"seed {entry['seed']}")
    ax.axhline(0.7, color="grey", linestyle="--", linewidth=1, label="target 0.7")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("critic-verifier agreement (held-out pairs)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", help="the policy: a k2 run directory or checkpoint")
    parser.add_argument("--make-init", action="store_true", help="build a random tiny policy (smoke runs)")
    parser.add_argument("--preset", default="tiny", help="with --make-init")
    parser.add_argument("--vocab", type=int, default=2048, help="with --make-init: tokenizer vocabulary")
    parser.add_argument("--out", default="runs/critic-study")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warm-start-steps", type=int, default=0)
    parser.add_argument("--task-level", type=int, default=1)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--critic-share", type=float, default=0.25)
    parser.add_argument("--critic-prompts", default="bait", choices=("bait", "task"))
    parser.add_argument("--critic-update-steps", type=int, default=2)
    parser.add_argument("--critic-lr", type=float, default=3e-4)
    parser.add_argument("--critic-batch", type=int, default=8)
    parser.add_argument("--critic-eval-prompts", type=int, default=32)
    parser.add_argument("--critic-bootstrap-steps", type=int, default=50)
    parser.add_argument("--agreement-every", type=int, default=5)
    parser.add_argument("--aggregation", default="win_rate", choices=("win_rate", "bradley_terry"))
    parser.add_argument("--pairs", default="all", choices=("all", "ring"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rl-args", default="", help="more `k2 rl` flags for every run, one string "
                        "(e.g. \"--task-working steps --task-digits 3\")")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.init and not args.make_init:
        raise SystemExit("give --init RUN (a trained policy) or --make-init (a random one, for a smoke run)")
    init = Path(args.init) if args.init else make_init(out, args.vocab, args.preset)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"runs": []}
    done = {entry["seed"] for entry in summary["runs"]}
    summary["settings"] = {k: v for k, v in vars(args).items()}
    for seed in args.seeds:
        if seed in done:
            continue
        summary["runs"].append(run_seed(args, init, seed, out))
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "critic_study.png")
    print(f"{'seed':>4} {'agree first':>12} {'agree last':>11} {'agree max':>10} {'praise first':>13} "
          f"{'praise last':>12} {'wall s':>8}")

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    for e in summary["runs"]:
        print(f"{e['seed']:>4} {f(e['agreement_first']):>12} {f(e['agreement_last']):>11} "
              f"{f(e['agreement_max']):>10} {f(e['opening_praise_first']):>13} {f(e['opening_praise_last']):>12} "
              f"{e['wall_s']:>8.1f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
