"""Task names to tasks: ``get_task("arithmetic" | "countdown" | "rg:NAME" | "code:humaneval" |
"agentic:DOMAIN", **options)`` (docs/rl-tasks.md, "Registry")."""

from __future__ import annotations

from typing import Any

from k2.errors import RLTaskError
from k2.rl.tasks.base import Task

FORMS = ("arithmetic", "countdown", "rg:NAME", "code:humaneval", "agentic:DOMAIN")
"""The task names :func:`get_task` accepts (NAME: a reasoning-gym dataset; DOMAIN: a
:mod:`k2.agentic` domain)."""


def task_names() -> list[str]:
    """Every concrete task name available here: the built-ins, each agentic domain, the code
    sources, and ``rg:NAME`` for each reasoning-gym dataset when that package is installed."""
    from k2.agentic import domains
    from k2.rl.tasks.code import SOURCES

    names = ["arithmetic", "countdown"]
    names += [f"code:{s}" for s in SOURCES]
    names += [f"agentic:{d}" for d in domains()]
    try:
        from k2.rl.tasks.reasoning_gym import dataset_names

        names += [f"rg:{d}" for d in dataset_names()]
    except ImportError:  # the rl extra is not installed: rg:NAME is listed as a form only
        pass
    return names


def get_task(name: str, **options: Any) -> Task:
    """The task called ``name``, built with ``options`` (its constructor's keyword arguments,
    e.g. ``level=3``, ``test_fraction=0.2``, ``token_budget=64``)."""
    if not isinstance(name, str):
        raise RLTaskError(f"a task name must be a string, not {type(name).__name__}")
    prefix, colon, rest = name.partition(":")
    try:
        if name == "arithmetic":
            from k2.rl.tasks.arithmetic import ArithmeticTask

            return ArithmeticTask(**options)
        if name == "countdown":
            from k2.rl.tasks.countdown import CountdownTask

            return CountdownTask(**options)
        if colon and rest and prefix == "rg":
            from k2.rl.tasks.reasoning_gym import ReasoningGymTask

            return ReasoningGymTask(rest, **options)
        if colon and rest and prefix == "code":
            from k2.rl.tasks.code import CodeRLTask

            return CodeRLTask(rest, **options)
        if colon and rest and prefix == "agentic":
            from k2.rl.tasks.agentic import AgenticTask

            return AgenticTask(rest, **options)
    except TypeError as err:
        if "argument" not in str(err):  # not an option the task does not take: a real failure
            raise
        raise RLTaskError(f"task {name!r}: bad option: {err}") from None
    raise RLTaskError(f"unknown task {name!r}; the forms are {', '.join(FORMS)}; available: {', '.join(task_names())}")
