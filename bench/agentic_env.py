"""What the agent environment costs (k2.agentic, docs/agentic.md).

Part 1 — environment overhead. Every shipped example task is played by the scripted gold agent
through ``make_env`` (parsing K2-format turns, validating arguments, running tools, the
programmatic user, rendering observations, grading at the end). The baseline makes the same
episodes' tool calls directly on a fresh domain (``domain.call``) with nothing else. Both rates
are reported: environment steps/s and episodes/s, and direct tool calls/s.

Part 2 — the environment's share of a rollout. The tiny K2 model (random weights, k2.model's
``generate`` with its KV cache) plays ``--batch`` episodes at once from token ids: each round
generates up to ``--new-tokens`` tokens per row (stopping at ``<|im_end|>``), then each row's
sampled ids go to ``env.step`` and its observation ids are appended (no re-encoding); a finished
episode is reset in place. The environment's CPU time (``time.thread_time`` around reset/step) is
reported as a fraction of the rollout's wall time. Goal: at most 2 %.

Run:  python bench/agentic_env.py             (CPU; batch 32)
      python bench/agentic_env.py --quick     (a few seconds: smoke test)
      python bench/agentic_env.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import sysconfig
import time
from pathlib import Path

from k2.agentic import domains, example_tasks, make_env
from k2.agentic.grading import initial_domain, trajectory_calls
from k2.agentic.scripted import GoldAgent


def all_tasks() -> list[tuple[str, object]]:
    return [(d, t) for d in domains() for t in example_tasks(d)]


def env_overhead(repeats: int) -> dict[str, float]:
    tasks = all_tasks()
    recorded = []  # the tool calls each episode made, for the baseline
    steps = episodes = 0
    start = time.perf_counter()
    for _ in range(repeats):
        for domain, task in tasks:
            env = make_env(domain, task)
            env.reset()
            agent = GoldAgent(task)
            done = False
            while not done:
                _, reward, done, info = env.step(agent.act())
                steps += 1
            assert reward == 1.0, task.id
            episodes += 1
            if len(recorded) < len(tasks):
                recorded.append((domain, task, [(c.name, c.arguments) for c in trajectory_calls(info["messages"])]))
    env_seconds = time.perf_counter() - start

    calls = direct_episodes = 0
    start = time.perf_counter()
    for _ in range(repeats):
        for domain, task, made in recorded:
            d = initial_domain(domain, task)
            for name, arguments in made:
                assert d.call(name, arguments).ok
                calls += 1
            direct_episodes += 1
    direct_seconds = time.perf_counter() - start
    return {
        "episodes": episodes,
        "env_steps": steps,
        "env_seconds": env_seconds,
        "env_steps_per_s": steps / env_seconds,
        "env_episodes_per_s": episodes / env_seconds,
        "env_us_per_step": 1e6 * env_seconds / steps,
        "direct_calls": calls,
        "direct_seconds": direct_seconds,
        "direct_calls_per_s": calls / direct_seconds,
        "direct_episodes_per_s": direct_episodes / direct_seconds,
    }


def train_bench_tokenizer(vocab_size: int):
    """A BPE tokenizer trained on the domains' prompts plus some standard-library text."""
    from k2.data.tokenizer import train_tokenizer

    texts = []
    for domain, task in all_tasks():
        texts.append(make_env(domain, task).reset().text)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts += [(stdlib / n).read_text() for n in ("textwrap.py", "shlex.py", "json/encoder.py")]
    return train_tokenizer(texts, vocab_size)


def rollout_share(batch: int, rounds: int, new_tokens: int, device: str, seed: int = 0) -> dict[str, float]:
    import torch

    from k2.model import K2Config, K2ForCausalLM
    from k2.model.generate import generate

    tokenizer = train_bench_tokenizer(4096)
    config = K2Config.from_preset("tiny")
    config.vocab_size = tokenizer.get_vocab_size()
    config.max_position_embeddings = 8192
    torch.manual_seed(seed)
    model = K2ForCausalLM(config).to(device)
    if device == "cuda":
        model = model.to(torch.bfloat16)
    im_end = tokenizer.token_to_id("<|im_end|>")
    pad = tokenizer.token_to_id("<|pad|>")
    tasks = all_tasks()
    generator = torch.Generator(device=device).manual_seed(seed)

    env_cpu = 0.0
    envs, sequences = [], []
    t0 = time.thread_time()
    for row in range(batch):
        domain, task = tasks[row % len(tasks)]
        env = make_env(domain, task, tokenizer=tokenizer, seed=row)
        envs.append(env)
        sequences.append(list(env.reset().ids))
    env_cpu += time.thread_time() - t0

    steps = finished = 0
    generated = 0
    wall = time.perf_counter()
    for _ in range(rounds):
        new = generate(
            model, sequences, max_new_tokens=new_tokens, temperature=1.0, stop_tokens=[im_end],
            pad_token_id=pad, generator=generator,
        )
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.thread_time()
        for row, env in enumerate(envs):
            sampled = new[row]
            generated += len(sampled)
            obs, _, done, _ = env.step(sampled)
            steps += 1
            if done:
                finished += 1
                sequences[row] = list(env.reset().ids)
            else:
                sequences[row] = sequences[row] + list(sampled) + list(obs.ids)
        env_cpu += time.thread_time() - t0
    wall = time.perf_counter() - wall
    return {
        "batch": batch,
        "rounds": rounds,
        "env_steps": steps,
        "episodes_finished": finished,
        "tokens_generated": generated,
        "mean_prompt_tokens": sum(len(s) for s in sequences) / len(sequences),
        "rollout_wall_s": wall,
        "env_cpu_s": env_cpu,
        "env_share": env_cpu / wall,
        "env_cpu_per_round_s": env_cpu / rounds,
        "rollout_wall_per_round_s": wall / rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="passes over the example tasks (part 1)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="agent turns per row (part 2)")
    parser.add_argument("--new-tokens", type=int, default=32, help="most tokens sampled per turn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--skip-rollout", action="store_true", help="part 1 only")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.batch, args.rounds, args.new_tokens = 2, 4, 2, 8

    part1 = env_overhead(args.repeats)
    print(f"environment overhead ({platform.processor() or platform.machine()}, {part1['episodes']} episodes):")
    print(f"  env.step with the programmatic user  {part1['env_steps_per_s']:10.0f} steps/s  "
          f"{part1['env_episodes_per_s']:8.0f} episodes/s  ({part1['env_us_per_step']:.0f} us/step)")
    print(f"  the same tool calls on the domain    {part1['direct_calls_per_s']:10.0f} calls/s  "
          f"{part1['direct_episodes_per_s']:8.0f} episodes/s")
    result = {"bench": "agentic_env", "overhead": part1}
    if not args.skip_rollout:
        part2 = rollout_share(args.batch, args.rounds, args.new_tokens, args.device)
        print(f"rollout share (tiny model on {args.device}, batch {part2['batch']}, {part2['rounds']} rounds, "
              f"{part2['tokens_generated']} tokens, mean sequence {part2['mean_prompt_tokens']:.0f} tokens):")
        print(f"  rollout wall {part2['rollout_wall_s']:.2f} s, environment CPU {part2['env_cpu_s']:.3f} s "
              f"= {100 * part2['env_share']:.2f} % (goal <= 2 %); per round of {part2['batch']} steps: "
              f"environment {1e3 * part2['env_cpu_per_round_s']:.1f} ms, rollout {part2['rollout_wall_per_round_s']:.2f} s")
        result["rollout"] = part2
        result["device"] = args.device
    print(json.dumps(result))


if __name__ == "__main__":
    main()
