"""``agentic:DOMAIN`` on a ``k2 synth`` output (``k2 rl --task-data DIR``): the domain's
synthesized tasks, split as the synthesizer split them, each played in its own agent's tool
variants and system prompt; the gold agent earns 1 on held-out tasks too; bad directories are
named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from k2.agentic.synth.output import load_variants
from k2.errors import ConfigError, RLTaskError
from k2.rl.tasks import get_task
from k2.rl.tasks.agentic import AgenticTask


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    from k2.agentic.synth import SynthOptions, synthesize

    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(SynthOptions(n=60, seed=0, validation=0.3), out)
    return out


def tasks_of(path: Path, domain: str) -> list[dict]:
    return [t for t in json.loads(path.read_text())
            if t["user_scenario"]["instructions"]["domain"] == domain]


def test_the_domain_s_synthesized_tasks_split_as_synthesized(synth_dir: Path) -> None:
    task = get_task("agentic:shop", synth=synth_dir)
    train = tasks_of(synth_dir / "train.tasks.json", "shop")
    held = tasks_of(synth_dir / "validation.tasks.json", "shop")
    assert train and held
    assert task.splits == {"train": sorted(t["id"] for t in train), "test": sorted(t["id"] for t in held)}
    variants = load_variants(synth_dir / "variants.jsonl")
    by_id = {t["id"]: t for t in train + held}
    for split in ("train", "test"):
        for prompt in task.prompts(split, 6, seed=1):
            raw = by_id[prompt.hidden["task_id"]]
            # the agent's own variants are the declared tools, its system prompt opens the episode
            declared = sorted(t["function"]["name"] for t in prompt.tools)
            assert declared == sorted(variants[v].spec["function"]["name"] for v in raw["k2_synth"]["variants"])
            assert prompt.messages[0]["role"] == "system"
            assert prompt.messages[0]["content"].startswith(raw["k2_synth"]["system_prompt"])
            # the gold agent solves it in those variants, by play and by transcript replay
            assert task.verify(prompt, task.gold_response(prompt)).correct
            assert not task.verify(prompt, "I cannot help.<|im_end|>").correct


def test_bad_synth_directories_are_named(synth_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RLTaskError, match="train.tasks.json does not exist: is .* a k2 synth output"):
        AgenticTask("shop", synth=tmp_path)
    with pytest.raises(RLTaskError, match="tasks or synth, not both"):
        AgenticTask("shop", synth=synth_dir, tasks=[])
    broken = tmp_path / "broken"
    shutil.copytree(synth_dir, broken)
    (broken / "variants.jsonl").write_text("")
    with pytest.raises(RLTaskError, match="uses variants .* that .*variants.jsonl lacks"):
        AgenticTask("shop", synth=broken)
    empty = tmp_path / "empty"
    shutil.copytree(synth_dir, empty)
    (empty / "validation.tasks.json").write_text("[]")
    with pytest.raises(RLTaskError, match="validation.tasks.json holds no task of domain 'shop'"):
        AgenticTask("shop", synth=empty)


def test_k2_rl_takes_task_data(synth_dir: Path) -> None:
    from k2.cli import build_parser
    from k2.rl.config import RL_FLAGS, RLConfig
    from k2.rl.loop import build_task
    from k2.train.resume import command_config

    def parse(*flags: str) -> RLConfig:
        args = build_parser().parse_args(["rl", "--init", "x", *flags])
        config, _ = command_config(args, {name: getattr(args, name) for name in RL_FLAGS}, RLConfig)
        assert isinstance(config, RLConfig)
        return config

    config = parse("--task", "agentic:shop", "--task-data", str(synth_dir))
    assert config.agent_constraints is True
    task = build_task(config)
    assert task.splits["test"] == sorted(t["id"] for t in tasks_of(synth_dir / "validation.tasks.json", "shop"))
    assert parse("--no-agent-constraints").agent_constraints is False
    with pytest.raises(ConfigError, match="task_data .* task 'arithmetic' does not take it"):
        build_task(parse("--task-data", str(synth_dir)))


def test_constrained_episodes_of_an_untrained_model_call_only_declared_tools_validly(synth_dir: Path) -> None:
    """``play_episodes`` with a constrainer: every call an untrained model writes in any turn names
    a declared tool of the episode's variants with schema-valid arguments, and each turn's
    reported log-probabilities are the model's own (a full forward of the same tokens)."""
    import jsonschema
    import torch
    from model_helpers import small_config

    from k2.agentic.calls import parse_assistant
    from k2.agentic.constrain import ToolCallConstrainer
    from k2.data.tokenizer import train_tokenizer
    from k2.model import K2ForCausalLM
    from k2.rl.episodes import play_episodes
    from k2.rl.logprobs import sequence_logprobs
    from k2.rl.rollout import RolloutEngine

    tokenizer = train_tokenizer((synth_dir / "train.jsonl").read_text().splitlines(), 2000)
    torch.manual_seed(0)
    model = K2ForCausalLM(small_config(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=2048,
                                       rope_scaling=None)).eval()
    # An untrained model seldom opens a tool-calls section; a fixed logit bonus (in rollouts and
    # full forwards alike) makes it open one in most turns, so the constraint has calls to hold.
    section = tokenizer.token_to_id("<|tool_calls_section_begin|>")

    def bonus(module, inputs, logits):  # noqa: ANN001, ANN202
        logits = logits.clone()
        logits[..., section] += 12.0
        return logits

    model.lm_head.register_forward_hook(bonus)
    task = AgenticTask("shop", synth=synth_dir, max_turns=3)
    prompts = task.prompts("test", 4, seed=0)
    end = tokenizer.token_to_id("<|im_end|>")
    episodes = play_episodes(task, prompts, RolloutEngine(model, max_batch=4), tokenizer, budget=48,
                             temperature=1.0, top_p=1.0, stop_id=end, seed=3, max_context=2048,
                             constrainer=ToolCallConstrainer(tokenizer))
    calls = 0
    for prompt, episode in zip(prompts, episodes):
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in prompt.tools}
        for ids, completion in episode.segments:
            text = tokenizer.decode(completion.token_ids, skip_special_tokens=False)
            for call in parse_assistant(text).calls:
                if call.error and "cut off" in call.error and completion.finish_reason == "length":
                    continue
                assert call.error is None and call.name in schemas, call
                jsonschema.validate(call.arguments, schemas[call.name])
                calls += 1
            full = sequence_logprobs(model, ids, completion.token_ids, 1.0)
            assert completion.logprobs == pytest.approx(full.tolist(), abs=1e-4)
    assert calls >= 4
