"""QK-Clip: keep attention logits at or below τ by rescaling query/key weights (K2, docs/optim.md).

After each optimizer step, for every attention layer and head h with recorded max logit
``S_max[h] > τ``, let ``γ = τ / S_max[h]`` and shrink that head's weights so its logits shrink by
γ. In MLA (k2's attention), per head h:

- the rows of ``q_b_proj`` (or ``q_proj``) that make ``q_nope`` are scaled by sqrt(γ),
- the rows of ``kv_b_proj`` that make ``k_nope`` by sqrt(γ),
- the rows of ``q_b_proj`` that make ``q_pe`` by γ,
- the shared rotary key ``k_pe`` (in ``kv_a_proj_with_mqa``) never: it serves every head.

Then ``q_nope·k_nope`` and ``q_pe·k_pe`` both shrink by γ, so does the logit, and the largest
logit of the step would have been exactly τ. Heads at or below τ are not touched.

Plain multi-head attention works too, once registered with :func:`register_qk_clip`: W_q and W_k
rows of the head (and their biases) each by sqrt(γ). With grouped keys (fewer key heads than query
heads) a key head serves several query heads, so, like ``k_pe``, it is left alone and the query
rows take all of γ.

Where the max logits come from: each attention module exposes ``pop_max_logits()`` returning an
fp32 tensor [num_heads] (the running max of the pre-softmax logit, scale included, over every
training forward since the last call) or None, and resets it. k2's ``MLA`` does this when its
``record_max_logits`` is True (the default).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from k2.errors import ConfigError
from k2.model.precision import reduce_dtype, upcast
from k2.optim.split import canonical_name

_REGISTRATION_ATTR = "k2_qk_clip"


@dataclass(frozen=True)
class LayerClip:
    """What QK-Clip saw and did in one attention layer during one step.

    Attributes:
        name: canonical module name, e.g. ``model.layers.0.self_attn``.
        max_logit: the largest logit over the layer's heads (after the all-reduce under DDP).
        clipped_heads: how many heads were above τ and rescaled.
        num_heads: heads in the layer.
    """

    name: str
    max_logit: float
    clipped_heads: int
    num_heads: int


@dataclass(frozen=True)
class MHAHeads:
    """How to find the query and key heads of a plain multi-head attention module.

    Attributes:
        q_proj: attribute path of the query projection (an ``nn.Linear``), rows [num_heads·head_dim].
        k_proj: attribute path of the key projection, rows [num_kv_heads·head_dim].
        num_heads: query heads.
        head_dim: size of one head.
        num_kv_heads: key heads (equal to num_heads for plain MHA).
    """

    q_proj: str
    k_proj: str
    num_heads: int
    head_dim: int
    num_kv_heads: int


def register_qk_clip(module: nn.Module, *, num_heads: int, head_dim: int, q_proj: str = "q_proj",
                     k_proj: str = "k_proj", num_kv_heads: int | None = None) -> None:
    """Make a plain multi-head attention module visible to QK-Clip.

    The module must also have ``pop_max_logits()`` returning fp32 [num_heads] (the largest
    pre-softmax logit per query head, scale included, since the last call) or None, and resetting.

    Args:
        module: the attention module.
        num_heads: query heads.
        head_dim: size of one query/key head.
        q_proj: attribute path of its query ``nn.Linear`` (weight [num_heads·head_dim, in]).
        k_proj: attribute path of its key ``nn.Linear`` (weight [num_kv_heads·head_dim, in]).
        num_kv_heads: key heads, if fewer than num_heads (grouped-query attention).

    Raises:
        ConfigError: the module lacks ``pop_max_logits`` or the projections do not have the rows
            the head counts imply.
    """
    spec = MHAHeads(q_proj, k_proj, num_heads, head_dim, num_kv_heads or num_heads)
    if not callable(getattr(module, "pop_max_logits", None)):
        raise ConfigError(f"register_qk_clip: {type(module).__name__} has no pop_max_logits() method; "
                          "QK-Clip needs each head's max logit from the forward")
    for path, heads in ((q_proj, spec.num_heads), (k_proj, spec.num_kv_heads)):
        rows = module.get_submodule(path).weight.shape[0]
        if rows != heads * head_dim:
            raise ConfigError(f"register_qk_clip: {path}.weight has {rows} rows, expected "
                              f"{heads} heads x {head_dim} = {heads * head_dim}")
    if spec.num_heads % spec.num_kv_heads:
        raise ConfigError(f"register_qk_clip: {num_heads} query heads do not divide into {spec.num_kv_heads} key heads")
    setattr(module, _REGISTRATION_ATTR, spec)


class ClipTarget:
    """One attention module QK-Clip watches: where its max logits come from and how to clip it.

    Args:
        name: canonical module name, for reports and errors.
        module: the attention module.
    """

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name = name
        self.module = module

    @property
    def num_heads(self) -> int:
        raise NotImplementedError

    def pop_max_logits(self) -> Tensor:
        """The module's recorded max logits, fp32 [num_heads], and reset them.

        Raises:
            ConfigError: nothing was recorded, saying how to turn recording on.
        """
        S_max_H = self.module.pop_max_logits()
        if S_max_H is None:
            flag = getattr(self.module, "record_max_logits", None)
            how = (f"set {self.name}.record_max_logits = True (it is {flag}) and run the forward "
                   "in training mode" if flag is not None else
                   "make its forward record them (pop_max_logits() must return [num_heads])")
            raise ConfigError(f"QK-Clip: attention module {self.name} recorded no max logits this step; "
                              f"{how}, or disable QK-Clip with MuonClip(..., qk_clip_tau=0)")
        if S_max_H.shape != (self.num_heads,):
            raise ConfigError(f"QK-Clip: {self.name}.pop_max_logits() returned shape {tuple(S_max_H.shape)}, "
                              f"expected [{self.num_heads}]")
        return upcast(S_max_H)

    def clip(self, heads: Tensor, gamma: Tensor) -> None:
        """Rescale the chosen heads so that their logits shrink by ``gamma``.

        Args:
            heads: indices of the heads to clip, int64 [k].
            gamma: τ / S_max of those heads, fp32 [k], each < 1.
        """
        raise NotImplementedError

    def row_scales(self, heads: Tensor, gamma: Tensor) -> list[tuple[Tensor, Tensor]]:
        """What :meth:`clip` does, as a factor per row of each weight it touches: for weights
        whose rows are spread over ranks (FSDP2 shards dim 0), where each rank scales the rows it
        holds (``k2.optim.distributed``).

        Args:
            heads: indices of the heads to clip, int64 [k].
            gamma: τ / S_max of those heads, fp32 [k], each < 1.

        Returns:
            (weight or bias, fp32 factor per row [rows]) pairs; rows not clipped have factor 1.
        """
        raise NotImplementedError


def _head_rows(num_heads: int, per_head: int, heads: Tensor, rows: slice, factor: Tensor) -> Tensor:
    """fp32 (fp64 for an fp64 ``factor``) [num_heads·per_head] of ones, with ``factor[i]`` on the
    ``rows`` of head ``heads[i]``."""
    out_HR = torch.ones(num_heads, per_head, dtype=reduce_dtype(factor.dtype))
    out_HR[heads.cpu(), rows] = upcast(factor).cpu().view(-1, 1)
    return out_HR.view(-1)


class MLATarget(ClipTarget):
    """An MLA module laid out as the model contract describes (Hub names and row order)."""

    @property
    def num_heads(self) -> int:
        return self.module.num_heads

    def clip(self, heads: Tensor, gamma: Tensor) -> None:
        mla = self.module
        nope, rope, v = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        q_proj = mla.q_b_proj if getattr(mla, "q_b_proj", None) is not None else mla.q_proj
        W_q = q_proj.weight.view(mla.num_heads, nope + rope, -1)  # rows: [q_nope | q_pe] per head
        W_kv = mla.kv_b_proj.weight.view(mla.num_heads, nope + v, -1)  # rows: [k_nope | v] per head
        _scale_rows(W_q, heads, slice(0, nope), gamma.sqrt())
        _scale_rows(W_q, heads, slice(nope, nope + rope), gamma)
        _scale_rows(W_kv, heads, slice(0, nope), gamma.sqrt())

    def row_scales(self, heads: Tensor, gamma: Tensor) -> list[tuple[Tensor, Tensor]]:
        mla = self.module
        nope, rope, v, H = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim, mla.num_heads
        q_proj = mla.q_b_proj if getattr(mla, "q_b_proj", None) is not None else mla.q_proj
        q_rows = _head_rows(H, nope + rope, heads, slice(0, nope), gamma.sqrt())
        q_rows *= _head_rows(H, nope + rope, heads, slice(nope, nope + rope), gamma)
        return [(q_proj.weight, q_rows),
                (mla.kv_b_proj.weight, _head_rows(H, nope + v, heads, slice(0, nope), gamma.sqrt()))]


class MHATarget(ClipTarget):
    """A multi-head attention module registered with :func:`register_qk_clip`."""

    def __init__(self, name: str, module: nn.Module, spec: MHAHeads) -> None:
        super().__init__(name, module)
        self.spec = spec

    @property
    def num_heads(self) -> int:
        return self.spec.num_heads

    def clip(self, heads: Tensor, gamma: Tensor) -> None:
        spec = self.spec
        q = self.module.get_submodule(spec.q_proj)
        k = self.module.get_submodule(spec.k_proj)
        grouped = spec.num_kv_heads != spec.num_heads
        q_gamma = gamma if grouped else gamma.sqrt()
        for tensor in (q.weight, q.bias):
            if tensor is not None:
                _scale_rows(tensor.view(spec.num_heads, spec.head_dim, -1), heads, slice(None), q_gamma)
        if grouped:
            return
        for tensor in (k.weight, k.bias):
            if tensor is not None:
                _scale_rows(tensor.view(spec.num_heads, spec.head_dim, -1), heads, slice(None), gamma.sqrt())

    def row_scales(self, heads: Tensor, gamma: Tensor) -> list[tuple[Tensor, Tensor]]:
        spec = self.spec
        q = self.module.get_submodule(spec.q_proj)
        k = self.module.get_submodule(spec.k_proj)
        grouped = spec.num_kv_heads != spec.num_heads
        q_rows = _head_rows(spec.num_heads, spec.head_dim, heads, slice(None), gamma if grouped else gamma.sqrt())
        out = [(t, q_rows) for t in (q.weight, q.bias) if t is not None]
        if not grouped:
            k_rows = _head_rows(spec.num_heads, spec.head_dim, heads, slice(None), gamma.sqrt())
            out += [(t, k_rows) for t in (k.weight, k.bias) if t is not None]
        return out


def _scale_rows(W_HRC: Tensor, heads: Tensor, rows: slice, factor: Tensor) -> None:
    """W[heads[i], rows, :] *= factor[i], in place, touching nothing else.

    Args:
        W_HRC: a weight viewed as [heads, rows per head, columns].
        heads: int64 [k].
        rows: which rows of each head.
        factor: fp32 [k]; the product is taken in fp32 (fp64 for an fp64 W) and rounded once
            to W's dtype.
    """
    heads = heads.to(W_HRC.device)
    with torch.no_grad():
        block_KRC = upcast(W_HRC[heads, rows])  # a copy: advanced indexing
        block_KRC *= factor.to(W_HRC.device, block_KRC.dtype).view(-1, 1, 1)
        W_HRC[heads, rows] = block_KRC.to(W_HRC.dtype)


def find_clip_targets(model: nn.Module) -> list[ClipTarget]:
    """Every attention module of ``model`` that QK-Clip can handle, in module order.

    An MLA module (one with ``kv_b_proj`` and ``pop_max_logits``) is found by itself; other
    attention modules need :func:`register_qk_clip`. A module wrapped by ``torch.compile``
    counts once.

    Args:
        model: the model, bare or wrapped by DDP / torch.compile.

    Returns:
        The targets.
    """
    targets: list[ClipTarget] = []
    seen: set[int] = set()
    for raw_name, module in model.named_modules():
        module = getattr(module, "_orig_mod", module)
        if id(module) in seen:
            continue
        spec = module.__dict__.get(_REGISTRATION_ATTR)
        if spec is not None:
            targets.append(MHATarget(canonical_name(raw_name), module, spec))
        elif callable(getattr(module, "pop_max_logits", None)) and hasattr(module, "kv_b_proj"):
            targets.append(MLATarget(canonical_name(raw_name), module))
        else:
            continue
        seen.add(id(module))
    return targets


def qk_clip(targets: list[ClipTarget], S_max: list[Tensor], tau: float) -> list[LayerClip]:
    """Clip every head whose max logit exceeds τ, and say what was done.

    Args:
        targets: the attention modules.
        S_max: their max logits, fp32 [num_heads] each (already agreed across ranks).
        tau: the threshold τ.

    Returns:
        One :class:`LayerClip` per target.
    """
    report = []
    for target, S_max_H in zip(targets, S_max):
        heads = torch.nonzero(S_max_H > tau).flatten()
        if heads.numel():
            target.clip(heads, tau / S_max_H[heads])
        report.append(LayerClip(target.name, float(S_max_H.max()), int(heads.numel()), target.num_heads))
    return report
