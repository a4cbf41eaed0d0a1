"""The Hub checkpoint layout: k2's state dict <-> DeepSeek-V3 / Kimi-K2 tensor names.

k2's own names are its module paths; they equal the Hub's except for the routed experts, which
k2 stacks ``[E, out, in]`` and the Hub stores one tensor per expert::

    model.layers.3.mlp.experts.gate_proj          [E, I, H]   (k2)
    model.layers.3.mlp.experts.17.gate_proj.weight   [I, H]   (Hub, expert 17)

Loading also accepts transformers 5's fused in-memory layout (``experts.gate_up_proj``
[E, 2I, H] and ``experts.down_proj`` [E, H, I]) and the official FP8 releases (e4m3 weights with
a ``weight_scale_inv`` per 128x128 block, dequantized on load). Multi-token-prediction layers
(layer indices >= ``num_hidden_layers``) are skipped with a warning.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from k2.errors import CheckpointError

if TYPE_CHECKING:
    from k2.model.model import K2ForCausalLM

EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_FUSED_GATE_UP = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.gate_up_proj$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
FP8_BLOCK = 128


def to_hf_state_dict(model: K2ForCausalLM) -> dict[str, torch.Tensor]:
    """Hub names -> tensors (per-expert views into k2's stacks; nothing is copied).

    With tied embeddings ``lm_head.weight`` is left out, as transformers saves it.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        stacked = _STACKED.match(name)
        if stacked:
            prefix, projection = stacked.groups()
            for expert in range(tensor.shape[0]):
                out[f"{prefix}.{expert}.{projection}.weight"] = tensor[expert]
        else:
            out[name] = tensor
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """Dequantize a block-quantized FP8 weight: ``w[i, j] * scale_inv[i // block, j // block]``.

    Args:
        weight: [m, n] float8 (e4m3) weight.
        scale_inv: [ceil(m / block), ceil(n / block)] per-block scales.

    Returns:
        [m, n] fp32.
    """
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return weight.float() * scale


def load_hf_state_dict(
    model: K2ForCausalLM, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> tuple[list[str], list[str]]:
    """Copy a Hub-layout state dict into ``model`` in place.

    Args:
        model: the model to fill.
        state_dict: Hub names (per-expert tensors), or k2's stacked names, or transformers' fused
            ``gate_up_proj``; FP8 weights come with their ``weight_scale_inv``.
        strict: raise on missing or unexpected names (otherwise return them).

    Returns:
        (missing, unexpected) names.

    Raises:
        CheckpointError: naming the tensor whose shape does not fit, or (strict) the missing and
            unexpected names.
    """
    targets = to_hf_state_dict(model)
    if model.config.tie_word_embeddings:
        targets.pop("lm_head.weight", None)
    stacks = {
        name: tensor for name, tensor in model.state_dict().items() if _STACKED.match(name)
    }
    num_layers = model.config.num_hidden_layers
    filled: set[str] = set()
    unexpected: list[str] = []
    skipped_layers: set[int] = set()

    def copy(name: str, target: torch.Tensor, source: torch.Tensor) -> None:
        if tuple(source.shape) != tuple(target.shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(source.shape)}; the model expects "
                f"{tuple(target.shape)}"
            )
        with torch.no_grad():
            target.copy_(source.to(target.dtype))

    for name, source in state_dict.items():
        if name.endswith(".weight_scale_inv"):
            continue  # consumed with its weight below
        layer = _LAYER.match(name)
        if layer and int(layer.group(1)) >= num_layers:
            skipped_layers.add(int(layer.group(1)))
            continue
        scale_name = name.removesuffix(".weight") + ".weight_scale_inv"
        if name.endswith(".weight") and scale_name in state_dict:
            source = dequantize_fp8(source, state_dict[scale_name])
        if name in targets:
            copy(name, targets[name], source)
            filled.add(name)
        elif name in stacks:
            copy(name, stacks[name], source)
            prefix, projection = _STACKED.match(name).groups()
            filled.update(f"{prefix}.{e}.{projection}.weight" for e in range(source.shape[0]))
        elif _FUSED_GATE_UP.match(name):
            prefix = _FUSED_GATE_UP.match(name).group(1)
            gate, up = stacks.get(f"{prefix}.gate_proj"), stacks.get(f"{prefix}.up_proj")
            if gate is None:
                unexpected.append(name)
                continue
            fused_shape = (gate.shape[0], 2 * gate.shape[1], gate.shape[2])
            if tuple(source.shape) != fused_shape:
                raise CheckpointError(
                    f"tensor {name!r} has shape {tuple(source.shape)}; the model expects {fused_shape}"
                )
            copy(name, gate, source[:, : gate.shape[1]])
            copy(name, up, source[:, gate.shape[1] :])
            for projection in ("gate_proj", "up_proj"):
                filled.update(f"{prefix}.{e}.{projection}.weight" for e in range(gate.shape[0]))
        else:
            unexpected.append(name)

    for name in state_dict:
        if name.endswith(".weight_scale_inv") and name.removesuffix("_scale_inv") not in state_dict:
            unexpected.append(name)
    if skipped_layers:
        warnings.warn(
            f"skipped multi-token-prediction layer(s) {sorted(skipped_layers)}: k2 does not "
            "implement MTP",
            stacklevel=3,
        )
    missing = sorted(set(targets) - filled)
    unexpected.sort()
    if strict and (missing or unexpected):
        raise CheckpointError(
            "state dict does not match the model: "
            f"missing {_preview(missing)}; unexpected {_preview(unexpected)}"
        )
    return missing, unexpected


def _preview(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return f"{len(names)} ({shown}{', ...' if len(names) > limit else ''})"
