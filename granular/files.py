"""Files a run writes: atomic writes (text, JSON, ``torch.save``) and the run-file names.

Every file is written to a temporary file next to its target and moved into place, so a
killed process leaves the previous version or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

__all__ = ["CHECKPOINT", "METRICS", "CONFIG", "ARCH", "MODEL_DIR", "REPORT_DIR", "atomic_write", "write_text", "write_json", "write_jsonl",
           "save_torch", "append_jsonl"]

CHECKPOINT = "checkpoint.pt"
"""The training state of a search or a retrain, written every epoch."""
METRICS = "metrics.jsonl"
"""One JSON row per epoch."""
CONFIG = "config.json"
"""The resolved configuration of a run."""
ARCH = "arch.json"
"""The discovered architecture of a search (:func:`granular.arch.architecture`)."""
MODEL_DIR = "model"
"""The compact model a run saves (:func:`granular.save`)."""
REPORT_DIR = "report"
"""Where ``granular report`` writes by default."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; run files are for reading
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
    atomic_write(path, write)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """``obj`` as indented JSON with a final newline."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """One JSON object per line (a metrics log rewritten as a whole)."""
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one row to a JSON-lines log."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path``, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
