"""The NCCL paths of FSDP2 + DistributedMuonClip on one GPU (a one-rank NCCL group): the owner
exchange through NCCL's all_to_all_single, bf16 mixed precision and CPU offload. The gloo tests
cover the arithmetic against one process; these check that the GPU layouts run and agree."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_helpers import free_port
from test_fsdp import OPT, global_batch, small_model

pytestmark = pytest.mark.gpu


@pytest.fixture
def nccl_group():
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    yield
    dist.destroy_process_group()


def one_step(model, opt) -> float:  # noqa: ANN001
    ids = global_batch(0).cuda()
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss)


@pytest.mark.parametrize("mixed_precision, cpu_offload", [(False, False), (True, False), (False, True)])
def test_fsdp2_on_nccl_matches_the_plain_model(nccl_group, mixed_precision: bool, cpu_offload: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from k2.optim import MuonClip
    from k2.optim.distributed import DistributedMuonClip
    from k2.parallel.fsdp import bytes_per_rank, full_model_state, shard_model

    options = {**OPT, "ns_dtype": "float32"}
    plain = small_model().cuda()
    plain_opt = MuonClip(plain, **options)
    plain_loss = one_step(plain, plain_opt)

    mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("dp_shard",))
    model = shard_model(small_model().cuda(), mesh, mixed_precision=mixed_precision, cpu_offload=cpu_offload)
    opt = DistributedMuonClip(model, **options)
    loss = one_step(model, opt)
    held = bytes_per_rank(model, opt)
    assert held["parameters"] == sum(p.numel() * 4 for p in plain.parameters())
    if cpu_offload:
        assert all(p.to_local().device.type == "cpu" for p in model.parameters())

    tol = 5e-2 if mixed_precision else 1e-4  # bf16 forward/backward against fp32 (AdamW's first step ~ lr·sign)
    assert loss == pytest.approx(plain_loss, rel=tol)
    state = full_model_state(model)
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(state[name], value.cpu(), rtol=tol, atol=tol, msg=name)
