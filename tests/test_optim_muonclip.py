"""MuonClip's Muon and AdamW parts against torch.optim, its split, state and non-finite skip."""

from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
import torch.optim._muon as torch_muon
from torch import nn

from k2.errors import ConfigError
from k2.optim import MuonClip, MuonConventions, split_parameters


class Matrices(nn.Module):
    """Hidden matrices only: tall, wide and square."""

    def __init__(self) -> None:
        super().__init__()
        self.tall = nn.Parameter(torch.randn(40, 16) * 0.1)
        self.wide = nn.Parameter(torch.randn(16, 48) * 0.1)
        self.square = nn.Parameter(torch.randn(24, 24) * 0.1)


class Mixed(nn.Module):
    """A miniature language model: embedding, norm, hidden matrix with bias, expert stack, head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.proj = nn.Linear(16, 16)
        self.experts = nn.Parameter(torch.randn(3, 8, 16) * 0.1)
        self.lm_head = nn.Linear(16, 50, bias=False)


def _set_grads(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)


def _fp32_newton_schulz(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's iteration, line for line, but in fp32 instead of bf16."""
    a, b, c = ns_coefficients
    X = grad.to(dtype=torch.float32, copy=True)
    if grad.size(0) > grad.size(1):
        X = X.T
    X.div_(X.norm().clamp(min=eps))
    for _ in range(ns_steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.addmm(X, B, X, beta=a)
    return X.T if grad.size(0) > grad.size(1) else X


def _run_both(theirs_kwargs: dict, ours_kwargs: dict, steps: int = 3) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ours = Matrices()
    theirs = copy.deepcopy(ours)
    opt_theirs = torch.optim.Muon(theirs.parameters(), lr=0.02, weight_decay=0.1, **theirs_kwargs)
    opt_ours = MuonClip(ours, lr=0.02, weight_decay=0.1, qk_clip_tau=0, **ours_kwargs)
    for step in range(steps):
        _set_grads(ours, step)
        _set_grads(theirs, step)
        opt_theirs.step()
        opt_ours.step()
    return ours, theirs


@pytest.mark.parametrize(("adjust_lr_fn", "nesterov"),
                         [(None, True), ("match_rms_adamw", True), ("spectral_unclamped", False)])
def test_matches_torch_muon_with_fp32_newton_schulz(monkeypatch: pytest.MonkeyPatch, adjust_lr_fn: str | None,
                                                    nesterov: bool) -> None:
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", _fp32_newton_schulz)
    conventions = MuonConventions(momentum="ema", lr_adjust=adjust_lr_fn or "original")
    ours, theirs = _run_both({"adjust_lr_fn": adjust_lr_fn, "nesterov": nesterov},
                             {"conventions": conventions, "ns_dtype": "float32", "nesterov": nesterov})
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_agrees_with_stock_torch_muon_within_bf16() -> None:
    torch.manual_seed(0)
    start = {n: p.detach().clone() for n, p in Matrices().named_parameters()}
    ours, theirs = _run_both({}, {"conventions": "torch"})
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        ours_delta, theirs_delta = p - start[name], q - start[name]
        assert (ours_delta - theirs_delta).norm() / theirs_delta.norm() < 2e-2, name


def test_default_conventions_are_moonlight() -> None:
    # Sum momentum, Nesterov, lr·0.2·sqrt(max(m, n)), decay with the plain lr; checked by hand
    # for two steps on one matrix with the fp32 reference iteration.
    torch.manual_seed(0)
    W0 = torch.randn(12, 20)
    model = nn.Module()
    model.w = nn.Parameter(W0.clone())
    opt = MuonClip(model, lr=0.01, weight_decay=0.1, momentum=0.9, qk_clip_tau=0, ns_dtype="float32")
    W, M = W0.clone(), torch.zeros_like(W0)
    for step in range(2):
        G = torch.randn(12, 20, generator=torch.Generator().manual_seed(step))
        model.w.grad = G.clone()
        opt.step()
        M = 0.9 * M + G
        O = _fp32_newton_schulz(G + 0.9 * M, (3.4445, -4.7750, 2.0315), 5, 1e-7)
        W = W * (1 - 0.01 * 0.1) - 0.01 * 0.2 * 20**0.5 * O
    torch.testing.assert_close(model.w.detach(), W, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_same_shape", [True, False])
def test_expert_stack_equals_separate_matrices(batch_same_shape: bool) -> None:
    torch.manual_seed(0)
    stacked = nn.Module()
    stacked.experts = nn.Parameter(torch.randn(4, 8, 20) * 0.1)
    stacked.other = nn.Parameter(torch.randn(8, 20) * 0.1)  # same shape: batched with the stack
    separate = nn.Module()
    separate.experts = nn.ParameterList([nn.Parameter(stacked.experts[e].detach().clone()) for e in range(4)])
    separate.other = nn.Parameter(stacked.other.detach().clone())
    kwargs = {"lr": 0.02, "qk_clip_tau": 0, "batch_same_shape": batch_same_shape}
    opt_stacked, opt_separate = MuonClip(stacked, **kwargs), MuonClip(separate, **kwargs)
    assert [a.optimizer for a in opt_stacked.split.assignments] == ["muon", "muon"]
    for step in range(3):
        grads = torch.randn(5, 8, 20, generator=torch.Generator().manual_seed(step))
        stacked.experts.grad, stacked.other.grad = grads[:4].clone(), grads[4].clone()
        for e in range(4):
            separate.experts[e].grad = grads[e].clone()
        separate.other.grad = grads[4].clone()
        opt_stacked.step()
        opt_separate.step()
    for e in range(4):
        torch.testing.assert_close(stacked.experts[e], separate.experts[e], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stacked.other, separate.other, rtol=1e-5, atol=1e-6)


def test_adamw_part_equals_torch_adamw() -> None:
    torch.manual_seed(0)
    ours = Mixed()
    theirs = copy.deepcopy(ours)
    opt = MuonClip(ours, lr=0.02, adamw_lr=3e-3, adamw_betas=(0.9, 0.95), adamw_eps=1e-8,
                   weight_decay=0.1, qk_clip_tau=0)
    adamw_names = {a.name for a in opt.split.assignments if a.optimizer == "adamw"}
    assert adamw_names == {"embed_tokens.weight", "norm.weight", "norm.bias", "proj.bias", "lm_head.weight"}
    reference = torch.optim.AdamW([p for n, p in theirs.named_parameters() if n in adamw_names],
                                  lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step in range(4):
        _set_grads(ours, step)
        _set_grads(theirs, step)
        opt.step()
        reference.step()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        if name in adamw_names:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
        else:  # Muon's parameters moved, torch.optim.AdamW's copies did not
            assert not torch.equal(p, q), name


@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (64, 64), (4, 48, 24)])
def test_update_rms_matches_adamw_scale(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(shape))
    model.w.grad = torch.randn(shape)  # full rank with probability 1
    lr = 1e-2
    MuonClip(model, lr=lr, weight_decay=0.0, qk_clip_tau=0).step()
    rms = model.w.detach().pow(2).mean().sqrt().item()
    assert 0.15 * lr <= rms <= 0.21 * lr


def test_state_dict_round_trip_is_exact() -> None:
    torch.manual_seed(0)
    model = Mixed()
    kwargs = {"lr": 0.02, "qk_clip_tau": 0, "ns_coefficients": "polar_express"}
    opt = MuonClip(model, **kwargs)
    for step in range(2):
        _set_grads(model, step)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clone = copy.deepcopy(model)
    opt_clone = MuonClip(clone, **kwargs)
    opt_clone.load_state_dict(torch.load(buffer, weights_only=True))
    assert (opt_clone.steps, opt_clone.skipped_steps) == (2, 0)
    for step in range(2, 4):
        _set_grads(model, step)
        _set_grads(clone, step)
        opt.step()
        opt_clone.step()
    for (name, p), q in zip(model.named_parameters(), clone.parameters()):
        assert torch.equal(p, q), name


def test_nonfinite_gradient_skips_the_whole_step(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = Mixed()
    before = copy.deepcopy(model.state_dict())
    opt = MuonClip(model, lr=0.02, qk_clip_tau=0)
    _set_grads(model, 0)
    model.proj.weight.grad[3, 4] = float("nan")
    model.norm.bias.grad[0] = float("inf")
    with caplog.at_level(logging.WARNING, logger="k2.optim.muonclip"):
        opt.step()
    report = opt.last_report
    assert report.skipped and report.skipped_steps == 1 and report.step == 1
    assert set(report.nonfinite) == {"proj.weight", "norm.bias"}
    assert "skipped" in caplog.text and "proj.weight" in caplog.text
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not opt.state  # no moments or momentum buffers were touched
    _set_grads(model, 1)
    opt.step()
    assert not opt.last_report.skipped and opt.skipped_steps == 1 and opt.steps == 2
    assert not torch.equal(model.proj.weight, before["proj.weight"])


class Wrapper(nn.Module):
    """Holds the model as ``.module``, as DistributedDataParallel does."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


def test_split_rules_wrappers_and_overrides() -> None:
    model = Mixed()
    split = split_parameters(model)
    assert [n for n, _ in split.muon] == ["experts", "proj.weight"]  # model order: own parameters first
    assert [n for n, _ in split.adamw] == ["embed_tokens.weight", "norm.weight", "norm.bias", "proj.bias",
                                           "lm_head.weight"]
    for wrapped in (Wrapper(model), torch.compile(model), Wrapper(torch.compile(model)),
                    torch.compile(Wrapper(model))):
        assert split_parameters(wrapped).assignments == split.assignments
    overridden = split_parameters(model, overrides={"experts": "adamw", "lm_head.*": "muon"})
    assert [n for n, _ in overridden.muon] == ["proj.weight", "lm_head.weight"]
    table = str(overridden)
    assert "experts" in table and "override 'experts'" in table and "muon: 2 tensors" in table
    with pytest.raises(ConfigError, match="match no parameter"):
        split_parameters(model, overrides={"nothing.*": "adamw"})
    with pytest.raises(ConfigError, match="Muon"):
        split_parameters(model, overrides={"norm.bias": "muon"})


def test_qk_clip_needs_attention_or_opt_out() -> None:
    with pytest.raises(ConfigError, match="qk_clip_tau=0"):
        MuonClip(Mixed())


def test_huge_but_finite_gradient_is_not_skipped() -> None:
    model = Mixed()
    opt = MuonClip(model, lr=0.02, qk_clip_tau=0)
    _set_grads(model, 0)
    model.norm.bias.grad.fill_(3e38)  # its L2 norm overflows fp32; the values do not
    opt.step()
    assert not opt.last_report.skipped
