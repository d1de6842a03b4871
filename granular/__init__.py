"""granular: multi-granularity pruning as torch.fx passes.

Pipeline (``docs/design.md``)::

    prepare (trace -> find_units -> insert_gates) -> search -> export -> save

Public API: :func:`prepare`, :func:`search`, :func:`export`, :func:`count_params`,
:func:`save`, :func:`load`, and :mod:`granular.testing`. Importing granular imports torch,
never triton and never CUDA.
"""

from __future__ import annotations

__version__ = "0.1.0"

from granular.api import export, prepare  # noqa: E402
from granular.accounting import ParamCount, count_params  # noqa: E402
from granular.io import load, save  # noqa: E402
from granular.driver import search  # noqa: E402
from granular import testing  # noqa: E402

__all__ = [
    "prepare", "search", "export", "count_params", "ParamCount", "save", "load", "testing",
    "__version__",
]
