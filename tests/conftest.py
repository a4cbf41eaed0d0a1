"""Shared pytest configuration: the `gpu` marker skips itself without CUDA."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A small prepared data directory (five standard-library modules, vocabulary 512), shared
    by the training and study tests."""
    from k2.data import PrepareOptions, prepare

    corpus = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "textwrap.py", "shlex.py", "fractions.py", "heapq.py"):
        shutil.copy(stdlib / name, corpus / name)
    out = tmp_path_factory.mktemp("data")
    prepare(PrepareOptions(corpus=(corpus,), out_dir=out, vocab_size=512, val_fraction=0.1))
    return out
