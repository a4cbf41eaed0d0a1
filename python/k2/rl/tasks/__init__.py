"""Verifiable-reward tasks for RL (docs/rl-tasks.md): the :class:`Task` interface (prompts, a
verifier, warm-start examples, a token budget) and its providers — arithmetic and countdown
generators, reasoning-gym datasets, sandboxed code tasks and the agentic domains — by name
through :func:`get_task`.

The providers are imported on first use, so ``import k2.rl.tasks`` needs no optional package.
"""

from k2.rl.tasks.base import (
    DEFAULT_TEST_FRACTION,
    DEFAULT_TOKEN_BUDGETS,
    SPLITS,
    Prompt,
    Reward,
    Task,
    answer_line,
    split_of,
)
from k2.rl.tasks.registry import FORMS, get_task, task_names

__all__ = [
    "DEFAULT_TEST_FRACTION", "DEFAULT_TOKEN_BUDGETS", "SPLITS", "Prompt", "Reward", "Task",
    "answer_line", "split_of", "FORMS", "get_task", "task_names",
]
