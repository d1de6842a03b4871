"""User-facing errors.

A :class:`GranularError` is a problem with the user's input (a spec, a target, a data set,
a checkpoint). Its message is one line that names the problem and the fix; the command line
prints it without a traceback and exits non-zero. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

__all__ = ["GranularError", "TraceError", "TargetError", "DataError", "CheckpointError", "ExportError"]


class GranularError(Exception):
    """Bad input, reported to the user as one line."""


class TraceError(GranularError):
    """The model cannot be traced by torch.fx.

    Attributes:
        module_path: the innermost module being traced when it failed ("" for the root).
        module_type: that module's class.
        construct: what broke, in words.
    """

    def __init__(self, message: str, *, module_path: str = "", module_type: type | None = None,
                 construct: str = ""):
        super().__init__(message)
        self.module_path = module_path
        self.module_type = module_type
        self.construct = construct


class TargetError(GranularError):
    """The parameter target cannot be met (already met, or unreachable)."""


class DataError(GranularError):
    """A data set is missing or malformed."""


class CheckpointError(GranularError):
    """A checkpoint cannot be read or does not match the run."""


class ExportError(GranularError):
    """An exported model does not compute what the pruned model computes (a bug in granular,
    refused in one line rather than saved)."""
