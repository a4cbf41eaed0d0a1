"""How a model is spread over ranks, applied from outside the model (``torch.distributed``).

* :mod:`k2.parallel.agree`  — the values every rank must agree on (skips, max logits, expert
  loads, metrics), one collective each;
* :mod:`k2.parallel.setup`  — joining the ``torchrun`` process group and choosing the device;
* :mod:`k2.parallel.data_parallel` — :func:`parallelize`: wrap a model for its ranks (data
  parallelism with DDP today; each further dimension is one more step here).
* :mod:`k2.parallel.mesh`   — the run's ``DeviceMesh`` (named dimensions, e.g. ``dp_shard``),
  built once from the settings;
* :mod:`k2.parallel.fsdp`   — FSDP2 (``fully_shard``) over each decoder layer, the embeddings and
  the head; whole-tensor checkpoints and copies of a sharded model; :func:`bytes_per_rank`.
* :mod:`k2.parallel.failure` — a collective that fails because a rank is gone names that rank.
* :mod:`k2.parallel.fsdp_ep` — FSDP2 × expert parallelism on the 2-D ``dp_shard`` × ``ep`` mesh.

The model is plain single-device PyTorch and the optimizers reach other ranks only through
:mod:`k2.parallel.agree`, so a new dimension changes neither. Design: ``docs/parallel.md``.
"""

from k2.parallel.agree import any_rank, max_over_ranks, mean_over_ranks, sum_over_ranks
from k2.parallel.data_parallel import parallelize
from k2.parallel.fsdp import bytes_per_rank, shard_model
from k2.parallel.mesh import build_mesh
from k2.parallel.setup import Dist, init_distributed

__all__ = ["Dist", "any_rank", "build_mesh", "bytes_per_rank", "init_distributed", "max_over_ranks",
           "mean_over_ranks", "parallelize", "shard_model", "sum_over_ranks"]
