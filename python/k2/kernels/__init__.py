"""Hand-written CUDA kernels, each beside the PyTorch reference that is its CPU path and oracle.

* ``newton_schulz`` — Muon's batched Newton–Schulz iteration (``cuda/newton_schulz.cu``);
* ``moe_dispatch`` — MoE routing: expert histogram/offsets, permute and combine with their
  backward passes (``cuda/moe_dispatch.cu``);
* ``mla_decode`` — MLA's absorbed decode over the latent cache, split over the context with a
  combine step (``cuda/mla_decode.cu``);
* ``mla_attention`` — MLA's causal document-masked training forward that also returns each
  head's max logit for QK-Clip (``cuda/mla_attention.cu``; backward in PyTorch);
* ``mla_emulation`` — NumPy replays of the two MLA kernels' block algorithms, for CPU tests;
* ``nvrtc`` — the one compile path: NVRTC through cuda-python, cached on disk;
* ``launch`` — loading the compiled code with CuPy and launching on torch's current stream.

Kernels run only for CUDA tensors, when CuPy and cuda-python are importable and ``K2_KERNELS``
is not ``0``; everywhere else the PyTorch reference runs. Environment knobs (all ``K2_``):

==================  ==========================================================================
``K2_KERNELS``      ``0`` turns every kernel off (the references run instead)
``K2_KERNEL_CACHE`` directory of compiled kernels (default ``~/.cache/k2/kernels``)
``K2_CUDA_INCLUDE`` extra include directory holding ``cuda_bf16.h`` (found in the NVIDIA
                    wheels or ``CUDA_HOME`` otherwise)
``K2_CUDA_DIR``     directory of the ``.cu`` sources (default: ``k2/kernels/cuda``)
==================  ==========================================================================
"""

from k2.kernels.nvrtc import KERNEL_SOURCES, compile_source, kernels_enabled

__all__ = ["KERNEL_SOURCES", "compile_source", "kernels_enabled"]
