"""The K2 model: Multi-head Latent Attention + ultra-sparse Mixture-of-Experts (docs/model.md).

Read in this order: :mod:`~k2.model.config` (hyperparameters, presets, ``config.json``),
:mod:`~k2.model.rope` (interleaved RoPE, YaRN), :mod:`~k2.model.mla` (attention, naive and
absorbed), :mod:`~k2.model.moe` (router, experts, dispatch, balancing), :mod:`~k2.model.model`
(the decoder and the causal LM), :mod:`~k2.model.hub_names` (Hub tensor names),
:mod:`~k2.model.generate` (KV-cache decoding).

Example::

    from k2.model import K2Config, K2ForCausalLM
    model = K2ForCausalLM(K2Config.from_preset("tiny"))
    out = model(input_ids, labels=input_ids)   # out.logits [B, T, V], out.loss
"""

from k2.model.config import K2Config
from k2.model.mla import MLA, KVCache, LatentCache
from k2.model.model import CausalLMOutput, DecoderLayer, K2ForCausalLM, K2Model
from k2.model.moe import MLP, MoE

__all__ = [
    "K2Config",
    "K2ForCausalLM",
    "K2Model",
    "DecoderLayer",
    "CausalLMOutput",
    "MLA",
    "MLP",
    "MoE",
    "KVCache",
    "LatentCache",
]
