"""No script or test module may shadow a module that k2 or its dependencies import.

``python bench/NAME.py`` puts ``bench/`` first on ``sys.path`` and pytest puts each test folder
there too, so a file named like an installed top-level module (``bench/kernels.py`` against Hugging
Face's ``kernels``, which ``transformers`` imports when it is installed) replaces it for every
import in that process. This test fails as soon as such a name appears, whatever is installed.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_DIRS = ("bench", "tests")


def script_module_names() -> dict[str, Path]:
    """Every importable top-level name that a file under bench/ or tests/ provides."""
    names: dict[str, Path] = {}
    for folder in SCRIPT_DIRS:
        for path in sorted((ROOT / folder).rglob("*")):
            if "__pycache__" in path.parts:
                continue
            if path.suffix == ".py" and path.stem != "conftest":
                names[path.stem] = path
            elif path.is_dir() and (path / "__init__.py").exists():
                names[path.name] = path
    return names


def installed_top_level_names() -> set[str]:
    """Top-level modules of every installed distribution, plus the standard library."""
    return set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)


def test_the_scan_sees_the_scripts_and_the_installed_modules() -> None:
    names = script_module_names()
    assert "model_throughput" in names and "test_module_names" in names
    installed = installed_top_level_names()
    assert {"torch", "numpy", "json"} <= installed


def test_no_bench_or_test_module_shadows_an_installed_module() -> None:
    installed = installed_top_level_names()
    clashes = {
        name: str(path.relative_to(ROOT))
        for name, path in script_module_names().items()
        if name in installed
    }
    assert not clashes, (
        f"these files shadow installed modules of the same name when their folder is on "
        f"sys.path; rename them: {clashes}"
    )
