"""``k2.sandbox``: run untrusted, model-written code for rewards, contained (docs/sandbox.md).

:func:`run` runs one program under bubblewrap as an unprivileged uid with rlimits and returns a
:class:`Result`; :func:`run_many` runs a batch in parallel; :mod:`k2.sandbox.code_tasks` turns a
problem with tests and a candidate solution into the fraction of tests passed.
"""

from k2.sandbox.isolation import BWRAP, UNSAFE_RLIMITS_ONLY, Probe, probe
from k2.sandbox.result import (
    ERROR,
    KILLED,
    MEMORY,
    OK,
    OUTPUT_LIMIT,
    STATUSES,
    TIMEOUT,
    Result,
)
from k2.sandbox.runner import Job, run, run_many

__all__ = [
    "BWRAP",
    "ERROR",
    "KILLED",
    "MEMORY",
    "OK",
    "OUTPUT_LIMIT",
    "STATUSES",
    "TIMEOUT",
    "UNSAFE_RLIMITS_ONLY",
    "Job",
    "Probe",
    "Result",
    "probe",
    "run",
    "run_many",
]
