"""Expert parallelism (k2.parallel.expert) on gloo processes against one process's MoE.

Each rank holds half (or a quarter) of the routed experts; its tokens travel to their experts'
owners and back. The reference is the unsharded MoE layer run on every rank's tokens at once:
outputs, input gradients and expert gradients must agree to 1e-5, also when all tokens go to one
rank's experts and some experts get none.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_helpers import free_port
from k2.errors import ConfigError
from k2.model import K2Config, K2ForCausalLM
from k2.parallel.expert import ExpertShard, expert_range, full_state_dict, shard_experts

TOKENS = (3, 5)  # batch, length per rank


def tiny_config(**changes) -> K2Config:
    fields = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=2, n_routed_experts=4, kv_lora_rank=32, q_lora_rank=48,
                  qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
    return dataclasses.replace(K2Config.from_preset("tiny"), **{**fields, **changes})


def moe_model(experts: int = 4) -> K2ForCausalLM:
    torch.manual_seed(0)
    return K2ForCausalLM(tiny_config(n_routed_experts=experts)).train()


def moe_of(model: K2ForCausalLM) -> torch.nn.Module:
    return model.model.layers[1].mlp


def inputs(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's tokens (rank-major) and the weights of the test loss sum(out * w)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(world * TOKENS[0], TOKENS[1], 64, generator=g)
    w = torch.randn(world * TOKENS[0], TOKENS[1], 64, generator=g)
    return x, w


def run_moe(moe: torch.nn.Module, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> dict:
    if bias is not None:
        moe.gate.e_score_correction_bias.copy_(bias)
    x = x.clone().requires_grad_(True)
    out = moe(x)
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters()}
    return {"out": out.detach(), "dx": x.grad, "grads": grads, "load": moe.pop_expert_load()}


# Routing cases: natural; every token to experts 0 and 1 (rank 0's with ep 2) so rank 1's
# experts get no tokens and rank 1 receives nothing.
BIASES = {"natural": None, "one_rank": torch.tensor([50.0, 50.0, 0.0, 0.0])}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results: dict = {}
        x, w = inputs(world)
        mine = slice(rank * TOKENS[0], (rank + 1) * TOKENS[0])
        for case, bias in BIASES.items():
            model = shard_experts(moe_model())
            results[case] = run_moe(moe_of(model), x[mine], w[mine], bias)
        results["full"] = {k: v for k, v in full_state_dict(model).items() if ".mlp.experts." in k}
        try:
            shard_experts(K2ForCausalLM(tiny_config(n_routed_experts=6 if world == 4 else 3)))
        except ConfigError as err:
            results["error"] = str(err)
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def check_against_one_process(world: int, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    x, w = inputs(world)
    per = 4 // world
    for case, bias in BIASES.items():
        single = run_moe(moe_of(moe_model()), x, w, bias)
        for r, result in enumerate(ranks):
            got = result[case]
            mine = slice(r * TOKENS[0], (r + 1) * TOKENS[0])
            torch.testing.assert_close(got["out"], single["out"][mine], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got["dx"], single["dx"][mine], rtol=1e-5, atol=1e-5)
            for name in ("gate_proj", "up_proj", "down_proj"):  # this rank's experts, all tokens
                torch.testing.assert_close(got["grads"][f"experts.{name}"],
                                           single["grads"][f"experts.{name}"][r * per:(r + 1) * per],
                                           rtol=1e-5, atol=1e-5)
        # Replicated parameters: each rank has its tokens' share; the shares sum to the whole.
        for name, grad in single["grads"].items():
            if not name.startswith("experts."):
                total = sum(result[case]["grads"][name] for result in ranks)
                torch.testing.assert_close(total, grad, rtol=1e-5, atol=1e-5, msg=name)
        # Each rank counts its own tokens over all experts; summed, they are the global load.
        torch.testing.assert_close(sum(result[case]["load"] for result in ranks), single["load"])
    one_rank = single["load"]
    assert one_rank[2:].sum() == 0 and one_rank[:2].sum() == 2 * world * TOKENS[0] * TOKENS[1]
    for r in range(world):  # rank 1's experts got no token: exactly zero gradients
        if r * per >= 2:
            assert ranks[r]["one_rank"]["grads"]["experts.gate_proj"].abs().sum() == 0
    full = moe_model().state_dict()
    for name, value in ranks[0]["full"].items():
        assert torch.equal(value, full[name]), name
        assert value.shape[0] == 4
    assert len(ranks[0]["full"]) == 3
    for result in ranks:
        experts = 6 if world == 4 else 3
        assert f"{experts} routed experts" in result["error"] and f"ep = {world}" in result["error"]


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    check_against_one_process(2, tmp_path)


@pytest.mark.slow
def test_four_ranks_one_expert_each_equal_one_process(tmp_path: Path) -> None:
    check_against_one_process(4, tmp_path)


def test_expert_range_splits_evenly_and_names_both_numbers() -> None:
    assert [list(expert_range(8, 4, r)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert list(expert_range(5, 1, 0)) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match=r"384 routed experts .* ep = 7"):
        expert_range(384, 7, 0)
    with pytest.raises(ConfigError, match="at least 1"):
        expert_range(4, 0, 0)


def test_sharding_needs_torch_distributed() -> None:
    with pytest.raises(ConfigError, match="torchrun"):
        shard_experts(moe_model())
    assert ExpertShard.__doc__


def test_k2_train_ep_settings_fail_before_any_work(tmp_path: Path, capsys) -> None:
    from k2.cli import main
    from k2.parallel.expert import check_ep

    run, data = tmp_path / "run", tmp_path / "data"
    assert main(["train", "--run-dir", str(run), "--data-dir", str(data), "--ep", "2"]) == 1
    assert "ep = 2 needs 2 ranks" in capsys.readouterr().err
    assert main(["train", "--run-dir", str(run), "--data-dir", str(data), "--ep", "0"]) == 1
    assert "ep must be positive" in capsys.readouterr().err
    assert not run.exists() and not data.exists()
    with pytest.raises(ConfigError, match=r"16 routed experts .* ep = 3"):
        check_ep(3, 3, 16)  # the tiny preset on three ranks
    check_ep(4, 4, 16)


def test_sft_and_rl_refuse_ep_from_a_config_file(tmp_path: Path) -> None:
    from k2.rl.config import RL_FLAGS, RLConfig
    from k2.train.sft import SFT_FLAGS, SFTConfig

    assert "ep" not in SFT_FLAGS and "ep" not in RL_FLAGS
    toml = tmp_path / "run.toml"
    toml.write_text("ep = 2\n")
    with pytest.raises(ConfigError, match="ep must be 1 in k2 sft"):
        SFTConfig.resolve(toml, init=str(tmp_path), data=[str(tmp_path)])
    with pytest.raises(ConfigError, match="ep must be 1 in k2 rl"):
        RLConfig.resolve(toml, init=str(tmp_path))
