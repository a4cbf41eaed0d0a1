"""``k2 plan`` (k2.parallel.plan): its arithmetic against what the CPU can measure.

* parameter counts against the real model's ``sum(p.numel())`` and the Muon/AdamW split
  MuonClip actually makes;
* parameter, gradient and optimizer-state bytes against a real optimizer step in one process
  (MuonClip and torch's AdamW), and per rank in a 2-process gloo FSDP2 run;
* activation bytes against the tensors autograd really saves (a saved-tensors hook);
* hand-computed cases for the sharding and communication formulas, the pipeline split, the bad
  inputs, the command line and the comparison with the K2 report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_helpers import free_port
from k2.cli import main
from k2.errors import ConfigError
from k2.model import K2Config, K2ForCausalLM
from k2.optim import MuonClip
from k2.optim.split import split_parameters
from k2.parallel.plan import (REPORT, Layout, Settings, activation_bytes, compare_with_report,
                              count_parameters, make_plan, predicted_bytes_per_rank, stages)

FP32 = dict(param_dtype="fp32", grad_dtype="fp32", optimizer_dtype="fp32")


def tiny_model(dtype: torch.dtype = torch.float32) -> K2ForCausalLM:
    torch.manual_seed(0)
    return K2ForCausalLM(K2Config.from_preset("tiny")).train().to(dtype)


def within(measured: float, predicted: float, tolerance: float = 0.10) -> bool:
    return abs(measured - predicted) <= tolerance * measured


# ---------------------------------------------------------------------------- parameters
def test_counts_equal_the_tiny_model_built_on_the_cpu() -> None:
    model = tiny_model()
    counts = count_parameters(model.config)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert (counts.total, counts.active) == model.parameter_counts()
    split = split_parameters(model)  # the split MuonClip makes, by name and shape
    assert counts.muon == sum(p.numel() for _, p in split.muon)
    assert counts.adamw == sum(p.numel() for _, p in split.adamw)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert counts.experts == experts


@pytest.mark.parametrize("preset", ["small", "kimi-k2"])
def test_counts_equal_the_larger_models(preset: str) -> None:
    # Built on the meta device: the same module code and shapes without the storage (building
    # `small` for real takes ~40 s on the 2-core CI machine; `kimi-k2` does not fit at all).
    config = K2Config.from_preset(preset)
    with torch.device("meta"):
        model = K2ForCausalLM(config)
    counts = count_parameters(config)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert (counts.total, counts.active) == model.parameter_counts()
    split = split_parameters(model)
    assert counts.muon == sum(p.numel() for _, p in split.muon)


def test_kimi_k2_counts_match_the_report() -> None:
    counts = count_parameters(K2Config.from_preset("kimi-k2"))
    assert counts.total == 1_026_408_209_408 and counts.active == 32_861_477_888  # docs/model.md
    # the report rounds to 1.04T total and 32.6B active (it also counts a multi-token-prediction
    # layer k2 does not build; its active count leaves part of the embedding out)
    assert abs(counts.total / REPORT.total_params - 1) < 0.02
    assert abs(counts.active / REPORT.active_params - 1) < 0.02


# ---------------------------------------------------------------------------- one process
def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(_local(v).numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if torch.is_tensor(v))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _one_step(model: K2ForCausalLM, optimizer: torch.optim.Optimizer) -> None:
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("optimizer", ["muonclip", "adamw"])
def test_state_bytes_after_a_real_step_match_the_plan(optimizer: str) -> None:
    model = tiny_model()
    opt = (MuonClip(model, lr=1e-3) if optimizer == "muonclip"
           else torch.optim.AdamW(model.parameters(), lr=1e-3))
    _one_step(model, opt)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    states = _state_bytes(opt)

    plan = make_plan("tiny", Layout.resolve(1), Settings(seq_len=16, optimizer=optimizer, **FP32))
    m = plan.memory
    assert within(params, m.parameters) and within(grads, m.gradients)
    assert within(states, m.optimizer_states)
    assert within(params + states, m.parameters + m.optimizer_states)
    assert m.master_weights == 0  # fp32 compute keeps no second copy
    # and the prediction is not loose: MuonClip's state is a fraction of AdamW's two moments
    if optimizer == "muonclip":
        assert states < 0.75 * 2 * params


@pytest.mark.parametrize("device, dtype", [
    ("cpu", torch.float32), ("cpu", torch.bfloat16),
    pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu),  # fused attention, CUDA dispatch
])
def test_activation_bytes_match_what_autograd_saves(device: str, dtype: torch.dtype) -> None:
    model = tiny_model(dtype).to(device)
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    seq_len = 128
    ids = torch.randint(0, 8192, (1, seq_len), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    measured = sum(saved.values())
    param_dtype = "fp32" if dtype == torch.float32 else "bf16"
    plan = make_plan("tiny", Layout.resolve(1), Settings(seq_len=seq_len, param_dtype=param_dtype))
    assert within(measured, plan.memory.activations_no_recompute, 0.05), (measured, plan.memory)
    assert plan.memory.activations == plan.memory.activations_no_recompute  # recompute none


# ---------------------------------------------------------------------------- FSDP2, 2 ranks
def _fsdp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = tiny_model()
        mesh = init_device_mesh("cpu", (2,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        _one_step(model, opt)
        local = [_local(p) for p in model.parameters()]
        result = {
            "parameters": sum(t.numel() * t.element_size() for t in local),
            "gradients": sum(_local(p.grad).numel() * p.grad.element_size() for p in model.parameters()),
            "optimizer_states": _state_bytes(opt),
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_bytes_per_rank_match_the_plan(tmp_path: Path) -> None:
    mp.spawn(_fsdp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    predicted = predicted_bytes_per_rank("tiny", 2, optimizer="adamw")
    single = predicted_bytes_per_rank("tiny", 1, optimizer="adamw")
    for measured in ranks:
        for key in ("parameters", "gradients", "optimizer_states"):
            assert within(measured[key], predicted[key]), (key, measured, predicted)
            # half of the one-process bytes on each rank
            assert within(measured[key] * 2, single[key], 0.01), (key, measured, single)


# ---------------------------------------------------------------------------- hand-computed
def test_sharding_formulas_on_hand_computed_cases() -> None:
    counts = count_parameters(K2Config.from_preset("tiny"))
    n, n_muon, n_adamw = counts.total, counts.muon, counts.adamw
    bf16 = Settings(seq_len=16)  # bf16 compute, fp32 gradients and optimizer states
    ddp = make_plan("tiny", Layout.resolve(4, sharding="ddp"), bf16).memory
    assert (ddp.parameters, ddp.gradients, ddp.master_weights) == (2 * n, 4 * n, 4 * n)
    assert ddp.optimizer_states == 4 * n_muon + 8 * n_adamw
    zero1 = make_plan("tiny", Layout.resolve(4, sharding="zero1"), bf16).memory
    assert (zero1.parameters, zero1.gradients) == (2 * n, 4 * n)
    assert zero1.master_weights == pytest.approx(n, abs=2)  # 4 bytes / 4 ranks
    assert zero1.optimizer_states == pytest.approx((4 * n_muon + 8 * n_adamw) / 4, abs=2)
    fsdp = make_plan("tiny", Layout.resolve(4, sharding="fsdp"), bf16).memory
    assert fsdp.parameters == pytest.approx(n, abs=2)  # the fp32 shards, which are the master
    assert fsdp.gradients == pytest.approx(n, abs=2) and fsdp.master_weights == 0
    # the communication of data parallelism: a ring all-reduce sends 2 (N-1)/N of the gradients
    two = make_plan("tiny", Layout.resolve(2, sharding="ddp"), Settings(seq_len=16, **FP32))
    assert {(t.dim, t.collective, t.group) for t in two.traffic} == {("dp", "all-reduce", 2)}
    assert sum(t.bytes for t in two.traffic) == pytest.approx(2 * 0.5 * n * 4, abs=8)


def test_replicated_shards_are_all_reduced() -> None:
    counts = count_parameters(K2Config.from_preset("tiny"))
    fp32 = Settings(seq_len=16, optimizer="adamw", **FP32)
    hsdp = make_plan("tiny", Layout.resolve(4, dp_replicate=2, sharding="fsdp"), fp32)
    assert hsdp.memory.parameters == pytest.approx(counts.total * 4 / 2, abs=4)
    reduce: dict[tuple[str, int], int] = {}
    for t in hsdp.traffic:  # dense and expert rows
        reduce[t.collective, t.group] = reduce.get((t.collective, t.group), 0) + t.bytes
    # the gradient shard (half of the model) all-reduced between the 2 replicas: 2 · 1/2 · N/2
    assert reduce[("all-reduce", 2)] == pytest.approx(counts.total * 4 / 2, rel=1e-6)
    assert reduce[("reduce-scatter", 2)] == pytest.approx(counts.total * 4 / 2, rel=1e-6)
    # dense layers replicated on the ep ranks instead of sharded over them
    plain = make_plan("tiny", Layout.resolve(4, ep=4, sharding="fsdp"), fp32)
    copies = make_plan("tiny", Layout.resolve(4, ep=4, sharding="fsdp", dense_shard_over_ep=False), fp32)
    assert copies.memory.parameters - plain.memory.parameters == pytest.approx(counts.dense * 4 * 3 / 4, abs=8)
    assert any(t.collective == "all-reduce" and t.group == 4 for t in copies.traffic)
    assert not any(t.collective == "all-reduce" for t in plain.traffic)


def test_expert_parallelism_splits_experts_and_moves_tokens() -> None:
    config = K2Config.from_preset("tiny")
    counts = count_parameters(config)
    settings = Settings(seq_len=64, **FP32)
    plan = make_plan("tiny", Layout.resolve(4, ep=4, sharding="ddp"), settings)
    # dense layers replicated, routed experts split 4 ways
    assert plan.memory.parameters == pytest.approx(4 * (counts.dense + counts.experts / 4), abs=4)
    (a2a,) = [t for t in plan.traffic if t.dim == "ep"]
    k, h = config.num_experts_per_tok, config.hidden_size
    # dispatch + combine, forward + backward, per MoE layer: (ep-1)/ep of the k copies of each token
    assert a2a.bytes == pytest.approx(4 * 0.75 * k * 64 * h * 4 * config.num_moe_layers, abs=8)
    assert a2a.count == 4 * config.num_moe_layers and a2a.per_call == int(0.75 * k * 64 * h * 4)


def test_pipeline_stages_cover_every_layer_once() -> None:
    config = K2Config.from_preset("kimi-k2")
    layout = Layout.resolve(2048, pp=16, vpp=2, ep=16)
    ranks = stages(config, layout)
    layers = sorted(i for stage in ranks for i in stage.layers)
    assert layers == list(range(61))
    assert ranks[0].embedding and ranks[-1].head and not ranks[0].head
    assert max(len(s.layers) for s in ranks) - min(len(s.layers) for s in ranks) <= 2
    # rank 0 holds chunks 0 and 16 (interleaved), not layers 0..3
    assert ranks[0].layers[:2] == (0, 1) and ranks[0].layers[2] > 16


def test_recomputation_keeps_less_and_fp8_less_still() -> None:
    config = K2Config.from_preset("kimi-k2")
    none, selective, full = (activation_bytes(config, 2, mode) for mode in ("none", "selective", "full"))
    fp8 = activation_bytes(config, 2, "selective", fp8_moe_inputs=True)
    assert none.layer(True) > selective.layer(True) > fp8.layer(True) > full.layer(True)
    assert full.layer(True) == 2 * config.hidden_size  # only the layer input, in bf16


def test_more_shards_hold_less_state() -> None:
    settings = Settings(seq_len=4096, recompute="full")
    plans = [make_plan("kimi-k2", Layout.resolve(gpus, ep=16), settings) for gpus in (256, 512, 1024)]
    states = [p.memory.states for p in plans]
    assert states[0] == pytest.approx(2 * states[1], rel=0.01)
    assert states[1] == pytest.approx(2 * states[2], rel=0.01)


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("build, option", [
    (lambda: Layout.resolve(2048, pp=16, ep=3), "--gpus"),
    (lambda: Layout.resolve(2048, pp=16, ep=16, dp_shard=4), "--dp-shard"),
    (lambda: make_plan("kimi-k2", Layout.resolve(1280, ep=5)), "--ep"),
    (lambda: make_plan("kimi-k2", Layout.resolve(48, tp=3)), "--tp"),
    (lambda: make_plan("kimi-k2", Layout.resolve(64, pp=64)), "--pp"),
    (lambda: make_plan("kimi-k3", Layout.resolve(1)), "--preset"),
    (lambda: make_plan("tiny", Layout.resolve(2), Settings(seq_len=16, global_batch_tokens=40)),
     "--global-batch-tokens"),
    (lambda: make_plan("tiny", Layout.resolve(1), Settings(recompute="some")), "--recompute"),
    (lambda: Layout.resolve(8, vpp=2), "--vpp"),
    (lambda: Layout(2048, pp=16, ep=16), "--gpus"),
    (lambda: Layout.resolve(8, sharding="zero3"), "--sharding"),
])
def test_bad_input_is_a_config_error_naming_the_option(build, option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        build()


def test_the_command_names_the_option_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--preset", "kimi-k2", "--gpus", "1280", "--ep", "5"]) == 1
    assert "--ep 5 does not divide the 384 routed experts" in capsys.readouterr().err
    assert main(["plan", "--preset", "nope"]) == 1
    assert "--preset" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the command
def test_the_command_prints_a_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--preset", "kimi-k2", "--gpus", "2048", "--gpu-memory", "80", "--ep", "16",
            "--pp", "16", "--vpp", "2", "--recompute", "selective", "--global-batch-tokens", str(1 << 26)]
    assert main(args) == 0
    text = capsys.readouterr().out
    for needle in ("parameters", "gradients", "optimizer states", "activations (recompute selective)",
                   "fits:", "all-to-all", "send/recv", "k2 has no pipeline-parallel implementation"):
        assert needle in text
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    memory = plan["memory_per_gpu"]
    assert memory["on_gpu"] == memory["states"] + max(memory["activations"] + memory["transient"],
                                                      memory["optimizer_transient"])
    assert memory["fits"] == (memory["on_gpu"] <= memory["budget"])
    assert plan["micro_batches_per_step"] == (1 << 26) // (4096 * 128)
    assert {t["dim"] for t in plan["communication_per_gpu_per_step"]} == {"dp", "ep", "pp"}


def test_the_k2_report_comparison(capsys: pytest.CaptureFixture[str]) -> None:
    plan, rows = compare_with_report(2048)
    assert (plan.layout.pp, plan.layout.ep, plan.layout.sharding) == (16, 16, "zero1")
    # bf16 parameters + fp32 gradients of the whole model: the report's "about 6 TB"
    counts = plan.counts
    assert abs(counts.total * 6 / REPORT.params_bf16_grads_fp32_bytes - 1) < 0.05
    # the report: about 30 GB of states per GPU; ours for its layout is within a fifth of that
    assert abs(plan.memory.states / REPORT.states_per_gpu_bytes - 1) < 0.2
    assert plan.fits
    assert main(["plan", "--k2-report"]) == 0
    text = capsys.readouterr().out
    assert "the K2 report" in text and "no pipeline-parallel implementation" in text
    assert main(["plan", "--k2-report", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["layout"]["sharding"] == "zero1" and len(data["report"]) == len(rows)
    assert any("FSDP2" in d for d in data["differences"])
    assert main(["plan", "--k2-report", "--preset", "tiny"]) == 1
    assert "--k2-report plans the kimi-k2 preset" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--gpus"):
        compare_with_report(1000)
