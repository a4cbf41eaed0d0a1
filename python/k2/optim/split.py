"""Which parameters Muon updates and which AdamW updates (docs/optim.md).

Muon is for hidden matrices: 2-D weights [m, n], and stacked routed experts [E, m, n], which
Muon treats as E matrices. AdamW takes everything else: embeddings and the output head (their rows
are looked up or read out one token at a time, so orthogonalizing them makes no sense), norms,
biases and other 1-D tensors, and anything with more than 3 dimensions.

The split goes by name and shape, on canonical names: wrapper prefixes added by DDP (``module.``),
``torch.compile`` (``_orig_mod.``) and activation checkpointing or FSDP wrappers are dropped, so a
wrapped model splits exactly like the bare one. Any rule can be overridden with shell-style
patterns over canonical names, e.g. ``{"*.mlp.gate.weight": "adamw"}``. ``print(split)`` shows a
table of every parameter, its optimizer and the reason.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from k2.errors import ConfigError

MUON = "muon"
ADAMW = "adamw"

# Names whose 2-D weights are embeddings or output heads rather than hidden matrices.
DEFAULT_ADAMW_PATTERNS: tuple[str, ...] = ("*embed*", "*lm_head*", "*wte*", "*wpe*")

_LEADING_WRAPPERS = ("module.", "_orig_mod.")
_INNER_WRAPPERS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """``name`` without the prefixes that DDP, torch.compile, FSDP and checkpointing add.

    Args:
        name: a name from ``named_parameters()`` or ``named_modules()``.

    Returns:
        The name the unwrapped model would give, e.g. ``module._orig_mod.lm_head.weight`` ->
        ``lm_head.weight``.
    """
    changed = True
    while changed:
        changed = False
        for prefix in _LEADING_WRAPPERS:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    for wrapper in _INNER_WRAPPERS:
        name = name.replace(wrapper, "")
    return name


@dataclass(frozen=True)
class Assignment:
    """One parameter's place in the split.

    Attributes:
        name: canonical parameter name.
        shape: its shape.
        optimizer: ``"muon"`` or ``"adamw"``.
        reason: why, in a few words.
    """

    name: str
    shape: tuple[int, ...]
    optimizer: str
    reason: str


@dataclass(frozen=True)
class ParamSplit:
    """The parameters of a model, divided between Muon and AdamW.

    Attributes:
        muon: (canonical name, parameter) pairs for Muon, in model order.
        adamw: (canonical name, parameter) pairs for AdamW, in model order.
        assignments: one row per trainable parameter, in model order.
    """

    muon: list[tuple[str, nn.Parameter]]
    adamw: list[tuple[str, nn.Parameter]]
    assignments: list[Assignment]

    def __str__(self) -> str:
        rows = [(a.name, "x".join(map(str, a.shape)) or "scalar", a.optimizer, a.reason)
                for a in self.assignments]
        header = ("parameter", "shape", "optimizer", "reason")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
        lines = ["  ".join(f"{c:<{w}}" for c, w in zip(r[:3], widths)) + "  " + r[3]
                 for r in [header, *rows]]
        n_muon = sum(p.numel() for _, p in self.muon)
        n_adamw = sum(p.numel() for _, p in self.adamw)
        lines.append(f"muon: {len(self.muon)} tensors, {n_muon:,} numbers; "
                     f"adamw: {len(self.adamw)} tensors, {n_adamw:,} numbers")
        return "\n".join(lines)


def split_parameters(model: nn.Module, *, overrides: Mapping[str, str] | None = None,
                     adamw_patterns: tuple[str, ...] = DEFAULT_ADAMW_PATTERNS) -> ParamSplit:
    """Divide a model's trainable parameters between Muon and AdamW.

    Rules, first match wins: an override pattern; an ``nn.Embedding`` weight -> AdamW; a name
    matching ``adamw_patterns`` -> AdamW; fewer than 2 dimensions -> AdamW; 2-D -> Muon; 3-D
    (stacked experts [E, m, n]) -> Muon; more -> AdamW. Frozen parameters are left out; a tied
    weight appears once.

    Args:
        model: the model, bare or wrapped by DDP / torch.compile.
        overrides: shell-style pattern over canonical names -> ``"muon"`` or ``"adamw"``.
        adamw_patterns: name patterns of embeddings and output heads.

    Returns:
        The split.

    Raises:
        ConfigError: an override names an unknown optimizer, sends a parameter with other than
            2 or 3 dimensions to Muon, or matches no parameter.
    """
    overrides = dict(overrides or {})
    for pattern, choice in overrides.items():
        if choice not in (MUON, ADAMW):
            raise ConfigError(f"split override {pattern!r}: optimizer must be 'muon' or 'adamw', got {choice!r}")
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    used_patterns: set[str] = set()
    muon, adamw, assignments = [], [], []
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = canonical_name(raw_name)
        choice, reason = _rule(name, param, overrides, used_patterns, embeddings, adamw_patterns)
        if choice == MUON and param.ndim not in (2, 3):
            raise ConfigError(f"split override sends {name} (shape {tuple(param.shape)}) to Muon, "
                              "which takes only matrices [m, n] and expert stacks [E, m, n]")
        (muon if choice == MUON else adamw).append((name, param))
        assignments.append(Assignment(name, tuple(param.shape), choice, reason))
    unused = sorted(set(overrides) - used_patterns)
    if unused:
        raise ConfigError(f"split overrides match no parameter: {unused}")
    return ParamSplit(muon, adamw, assignments)


def _rule(name: str, param: nn.Parameter, overrides: dict[str, str], used: set[str],
          embeddings: set[int], adamw_patterns: tuple[str, ...]) -> tuple[str, str]:
    for pattern, choice in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            used.add(pattern)
            return choice, f"override {pattern!r}"
    if id(param) in embeddings:
        return ADAMW, "embedding"
    for pattern in adamw_patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return ADAMW, f"embedding or output head ({pattern!r})"
    if param.ndim < 2:
        return ADAMW, "norm, bias or other 1-D"
    if param.ndim == 2:
        return MUON, "hidden matrix"
    if param.ndim == 3:
        return MUON, "expert stack [E, m, n]"
    return ADAMW, f"{param.ndim}-D tensor"
