"""k2.parallel: the agreement helpers against hand-computed reductions over 2 gloo processes, the
no-op single-process path, parallelize, device parsing, and the optimizer contract through a
wrapper and with a user's own MoE module."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dist_helpers import free_port
from k2.errors import ConfigError
from k2.optim.contract import BalancesExperts, find_moe_layers, pop_expert_loads, update_router_biases
from k2.parallel import any_rank, max_over_ranks, mean_over_ranks, parallelize, sum_over_ranks
from k2.parallel.setup import parse_device
from k2.train.optimizers import AdamWWithRouterBias


def test_alone_every_helper_returns_its_input() -> None:
    a, b = torch.tensor([1.0, -2.0]), torch.tensor([[3.0]])
    assert not dist.is_initialized()
    assert any_rank(True) and not any_rank(False)
    for got, want in zip(max_over_ranks([a, b]), [a, b]):
        torch.testing.assert_close(got, want)
    for got, want in zip(sum_over_ranks([a, b]), [a, b]):
        torch.testing.assert_close(got, want)
    assert mean_over_ranks(torch.tensor(2.5)) == 2.5
    assert max_over_ranks([]) == []
    model = nn.Linear(2, 2)
    assert parallelize(model) is model


def _worker(rank: int, world: int, port: int, results) -> None:  # noqa: ANN001
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mine = torch.tensor([float(rank), 10.0 - rank, -rank])
        other = torch.full((2, 2), float(rank + 1))
        mx = max_over_ranks([mine, other])
        sm = sum_over_ranks([mine, other])
        flag = any_rank(rank == 1)
        none = any_rank(False)
        mean = mean_over_ranks(torch.tensor(float(rank) * 4))
        wrapped = parallelize(nn.Linear(3, 3))
        results[rank] = (mx[0].tolist(), mx[1].tolist(), sm[0].tolist(), sm[1].tolist(), flag, none, mean,
                         type(wrapped).__name__)
    finally:
        dist.destroy_process_group()



def test_two_ranks_agree_on_hand_computed_values() -> None:
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, free_port(), results), nprocs=2)
    want = ([1.0, 10.0, 0.0], [[2.0, 2.0], [2.0, 2.0]], [1.0, 19.0, -1.0], [[3.0, 3.0], [3.0, 3.0]],
            True, False, 2.0, "DistributedDataParallel")
    assert results[0] == want and results[1] == want


def test_parse_device_names_the_bad_value() -> None:
    assert parse_device("cpu") == torch.device("cpu")
    for bad in ("cuda:abc", "gpu", "mps"):
        with pytest.raises(ConfigError, match="device"):
            parse_device(bad)


class CountingMoE(nn.Module):
    """A user's MoE module that speaks the contract without being k2's."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.proj = nn.Linear(4, 4)
        self.bias = torch.zeros(num_experts)
        self.load: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        load = torch.zeros(self.num_experts)
        load[0] += x.shape[0]  # every token to expert 0
        self.load = load if self.load is None else self.load + load
        return self.proj(x)

    def pop_expert_load(self) -> torch.Tensor | None:
        load, self.load = self.load, None
        return load

    def update_router_bias(self, load: torch.Tensor, rate: float) -> None:
        self.bias += rate * torch.sign(load.mean() - load)


def test_contract_finds_a_users_moe_through_a_wrapper_and_balances_it() -> None:
    inner = nn.Sequential(CountingMoE(3), CountingMoE(2))
    wrapper = nn.Module()
    wrapper.module = inner
    layers = find_moe_layers(wrapper)
    assert [name for name, _ in layers] == ["0", "1"]
    assert all(isinstance(m, BalancesExperts) for _, m in layers)
    inner(torch.randn(5, 4))
    loads = pop_expert_loads(layers)
    assert [load.tolist() for load in loads] == [[5.0, 0.0, 0.0], [5.0, 0.0]]
    assert pop_expert_loads(layers)[0].tolist() == [0.0, 0.0, 0.0]  # popped: reset
    update_router_biases(layers, loads, rate=0.5)
    # mean 5/3 - load: expert 0 overloaded (down), the others up
    assert inner[0].bias.tolist() == [-0.5, 0.5, 0.5]
    assert inner[1].bias.tolist() == [-0.5, 0.5]


def test_adamw_baseline_drives_the_same_update() -> None:
    model = nn.Sequential(CountingMoE(2))
    opt = AdamWWithRouterBias(model, lr=0.1, weight_decay=0.0, router_bias_rate=0.25)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert model[0].bias.tolist() == [-0.25, 0.25]
    assert opt.last_report.expert_loads[0].tolist() == [3.0, 0.0]
