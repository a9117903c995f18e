"""PolyKV's exceptions: one base class, one subclass per kind of problem.

Every message is a single line that names the problem and says how to fix it, so that the CLI can print it as is
(`polykv` prints a `PolyKVError` in red on stderr and exits with code 2). Add new kinds by appending a subclass.
"""

from __future__ import annotations


class PolyKVError(Exception):
    """Base class: a user-facing problem with a one-line message naming the problem and the fix.

    Line breaks that user data brings into a message (a key, a name, a path) are escaped, so it stays one line.
    """

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"), *args)


class PlanError(PolyKVError):
    """A plan file or object is malformed: not JSON, fails the schema, unknown policy, over its budget..."""


class PlanMismatchError(PlanError):
    """A plan was solved for another model (its fingerprint differs from the model's)."""


class CalibrationError(PolyKVError):
    """A calibration directory is unusable: missing files, missing options, NaN losses, another model's data."""


class SolveError(PolyKVError):
    """The solver was asked something it cannot do (bad constraint, solvers disagree, solver failure)."""


class InfeasibleError(SolveError):
    """No plan satisfies the budget and the constraints."""


class ModelError(PolyKVError):
    """A model alias, path, package or hub id that cannot be loaded."""


class InputError(PolyKVError):
    """A prompt, plan setting or option that cannot be served (empty, too long for the model, unknown policy)."""


class DataError(PolyKVError):
    """A calibration data file or data set that cannot be loaded: missing, empty, malformed line, unreachable hub."""


class TaskError(PolyKVError):
    """An evaluation task file that cannot be used: missing, no valid instance, unknown metric."""


class OutputError(PolyKVError):
    """An output that cannot be written: its directory is not writable or not a directory, or the write failed."""
