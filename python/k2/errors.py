"""The exceptions k2 raises.

Every error k2 raises on purpose is a :class:`K2Error`; the subclass says which part of k2 it
comes from, and the message names the file, tensor, field or worker at fault. Native (Rust) code
raises these same classes.
"""

from __future__ import annotations


class K2Error(Exception):
    """Base class of every error k2 raises on purpose."""


class K2IOError(K2Error, OSError):
    """A file or directory could not be read or written; the message names it."""


class ConfigError(K2Error, ValueError):
    """A configuration value or command-line option is invalid; the message names the field."""


class DataError(K2Error):
    """A corpus, tokenizer or token shard is missing, malformed or corrupt."""


class CheckpointError(K2Error):
    """A checkpoint cannot be saved or loaded, or fails verification."""


class BroadcastError(K2Error):
    """The weight-broadcast pipeline failed; the message names the worker or tensor."""


class KernelError(K2Error):
    """A CUDA kernel failed to compile or launch."""


class MissingDependencyError(K2Error, ImportError):
    """An optional package is not installed; the message names it and the extra that brings it."""


class SandboxError(K2Error):
    """Untrusted code could not be run in the sandbox (bad request, or the sandbox itself failed)."""


class IsolationUnavailableError(SandboxError):
    """The sandbox's isolation (bubblewrap) cannot run on this machine; the message says why."""
class AgenticError(K2Error):
    """An agent environment, domain or tool was misused; the message names the domain or tool."""


class TaskError(AgenticError, ValueError):
    """A task file or task is malformed or unsupported; the message names the task id and field."""


class SynthError(AgenticError):
    """Agentic data synthesis (``k2 synth``) could not make what was asked; the message says why."""


class RLError(K2Error, ValueError):
    """A rollout request or an RL objective's input is invalid; the message names the request
    index (or tensor) and the field at fault."""


__all__ = [
    "K2Error",
    "K2IOError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "BroadcastError",
    "KernelError",
    "MissingDependencyError",
    "SandboxError",
    "IsolationUnavailableError",
    "AgenticError",
    "TaskError",
    "SynthError",
    "RLError",
]


class RLTaskError(K2Error, ValueError):
    """An RL task name, option or split is invalid; the message names the task and the field."""


__all__ += ["RLTaskError"]


class ServeError(K2Error, ValueError):
    """A chat request to ``k2 serve`` is invalid; ``field`` names the part at fault, ``status``
    is the HTTP status it is answered with (docs/serve.md)."""

    def __init__(self, message: str, field: str | None = None, status: int = 400, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.field = field
        self.status = status
        self.code = code


__all__ += ["ServeError"]


class RankLostError(K2Error):
    """A rank of a distributed run stopped (crashed, killed or hung) during a collective; the
    message names it (``k2.parallel.failure``, docs/parallel.md)."""


__all__ += ["RankLostError"]


class CriticError(RLError):
    """The self-critique reward (``k2.rl.critic``) got bad input: a rubric file or field, a critic
    checkpoint, a prompt too long for the critic; the message names the file, field or prompt."""


__all__ += ["CriticError"]


class RecipeError(K2Error):
    """``k2 recipe``: a stage failed or its recorded state is unusable; names the stage
    (docs/recipe.md)."""


__all__ += ["RecipeError"]
