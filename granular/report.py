"""``granular report RUN_DIR``: what a search kept, where, and how it got there.

Reads a run directory written by ``granular search`` (:mod:`granular.cli.rundir`) and writes, to
``RUN_DIR/report/`` (or ``--out``), each file atomically:

- ``thresholds.png``: the mean threshold and the retention ratio of each granularity
  (op α, filter β, weight ω) over the epochs, as in Fig. 8 of MG-DARTS; from ``metrics.jsonl``.
- ``params.png``: the nonzero parameter count against the target over the epochs, with the
  pruning rounds (and, for multi-stage runs, the stage goals and ends) marked.
- ``retention_by_cell.png``: a heat map of what each DARTS cell kept per op type, with its
  filter and weight retention, as in Fig. 9 of MG-DARTS; for other models one row per block
  (``layer1.0``, ``features.3``) and a column per granularity. Needs ``arch.json``.
- ``report.json``: the table data and the summary.

The tables group ``arch.json`` by block: the module path up to its first index
(``cells.2``, ``layer1.0``). Per group, *filters* is the fraction of output channels kept
in the layers that survive, and *weights* the fraction of nonzero weights in those layers
as exported (the model in ``model/``), so that the three ratios measure each
granularity apart: ops removed, then channels of the ops left, then weights of the
channels left. Without ``arch.json`` (a search that has not finished) the plots of the log
are still written.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from matplotlib.figure import Figure

from granular.errors import GranularError
from granular.files import ARCH, CONFIG, METRICS, MODEL_DIR, REPORT_DIR, atomic_write, write_json
from granular.plots import GRANULARITIES, plot_params, plot_retention, plot_thresholds, retention_matrix

__all__ = ["Group", "report", "load_metrics", "load_arch", "block_of", "group_arch",
           "retention_matrix", "plot_thresholds", "plot_params", "plot_retention", "REPORT_DIR", "GRANULARITIES"]

THRESHOLDS_PNG = "thresholds.png"
PARAMS_PNG = "params.png"
RETENTION_PNG = "retention_by_cell.png"
REPORT_JSON = "report.json"

_CELL = re.compile(r"^cells\.(\d+)$")


# ----------------------------------------------------------------------------- reading the run
def load_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl``, one per epoch.

    A last line cut short (a search killed while writing it) is dropped; any other line that
    is not JSON is an error.

    Raises:
        GranularError: the directory or its log is missing, empty or damaged.
    """
    if not run_dir.exists():
        raise GranularError(f"{run_dir} does not exist: pass the run directory that granular search "
                            f"wrote (its --out, by default runs/<spec>)")
    if not run_dir.is_dir():
        raise GranularError(f"{run_dir} is a file, not a run directory: pass the directory that "
                            f"granular search wrote (its --out)")
    path = run_dir / METRICS
    if not path.is_file():
        if (run_dir / CONFIG).is_file():
            raise GranularError(f"no {METRICS} in {run_dir}: the search has not finished an epoch yet; "
                                f"run granular report again when it has")
        raise GranularError(f"no {METRICS} in {run_dir}: not a search run directory; run granular search "
                            f"SPEC --target-params N --out {run_dir} first")
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines):  # no newline after it: a write cut short
                continue
            row = err
        if not isinstance(row, dict):
            why = row.msg if isinstance(row, json.JSONDecodeError) else "not a JSON object"
            raise GranularError(f"{path} line {i} is not a metrics row ({why}): the log is damaged; delete that "
                                f"line, or rewrite the log from the checkpoint with granular search --resume "
                                f"--out {run_dir}")
        rows.append(row)
    if not rows:
        raise GranularError(f"{path} is empty: the search has not finished an epoch yet; run granular "
                            f"report again when it has")
    return rows


def load_arch(run_dir: Path) -> Optional[dict[str, Any]]:
    """``run_dir/arch.json``, or None where the search has not written it yet."""
    path = run_dir / ARCH
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise GranularError(f"{path} is corrupt ({err.msg}): delete it to report from the metrics log "
                            f"alone") from None


def _tensor_counts(model_dir: Path) -> dict[str, tuple[int, int]]:
    """(nonzero, size) of every parameter of the exported model in ``model_dir``, by name;
    {} without one. The model is loaded as ``granular.load`` does, so that buffers (BatchNorm
    statistics) are not counted and the counts are those of ``granular.json``."""
    if not (model_dir / "model.safetensors").is_file():
        return {}
    import torch

    from granular.io import load

    try:
        model = load(model_dir)
    except GranularError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable model is the user's to fix
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise GranularError(f"cannot load the model in {model_dir} ({first}): granular export "
                            f"{model_dir.parent} writes it again") from None
    return {name: (int(torch.count_nonzero(p.detach())), p.numel()) for name, p in model.named_parameters()}


def _model_val_accuracy(model_dir: Path) -> Optional[float]:
    """The compact model's validation accuracy, as ``granular search`` saved it."""
    try:
        meta = json.loads((model_dir / "granular.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta.get("metadata", {}).get("val_accuracy")


def _run_space(run_dir: Path):
    """The registry entry (:class:`~granular.search_spaces.SpaceInfo`) of the search space the run
    searched, or None (a ``model.py``, a zoo model, no config)."""
    try:
        spec = json.loads((run_dir / CONFIG).read_text()).get("spec", "")
    except (OSError, json.JSONDecodeError):
        return None
    from granular.search_spaces import space_info
    return space_info(spec)


def _reduction_cells(run_dir: Path, n_cells: int) -> set[int]:
    """Indices of the reduction cells, when the run searched a registered space that has them."""
    space = _run_space(run_dir)
    if space is None or space.reduction_cells is None:
        return set()
    return set(space.reduction_cells(n_cells))


# ----------------------------------------------------------------------------- the tables
@dataclass
class Group:
    """What one block of the model kept: a DARTS cell, a ResNet block, a stem.

    Attributes:
        name: the module path of the block (``cells.2``, ``layer1.0``, ``fc``).
        label: how tables show it (``cell 2 (reduction)``).
        ops_kept, ops_total: operation units kept, and in the search.
        op_types: DARTS op type -> [kept, total] (empty for other models).
        filters_kept, filters_total: output channels of the surviving layers, kept and original.
        weights_nonzero, weights_dense: weights of the surviving layers as exported.
        params: nonzero parameters of the block as exported (None without ``model/``).
    """

    name: str
    label: str
    ops_kept: int = 0
    ops_total: int = 0
    op_types: dict[str, list[int]] = field(default_factory=dict)
    filters_kept: int = 0
    filters_total: int = 0
    weights_nonzero: int = 0
    weights_dense: int = 0
    params: Optional[int] = None

    @property
    def op_retention(self) -> Optional[float]:
        return self.ops_kept / self.ops_total if self.ops_total else None

    @property
    def filter_retention(self) -> Optional[float]:
        return self.filters_kept / self.filters_total if self.filters_total else None

    @property
    def weight_retention(self) -> Optional[float]:
        return self.weights_nonzero / self.weights_dense if self.weights_dense else None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Group":
        """The inverse of :meth:`to_dict` (the ratios are recomputed)."""
        return cls(**{k: v for k, v in d.items() if not k.endswith("_retention")})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "ops_kept": self.ops_kept, "ops_total": self.ops_total,
                "op_types": self.op_types, "filters_kept": self.filters_kept, "filters_total": self.filters_total,
                "weights_nonzero": self.weights_nonzero, "weights_dense": self.weights_dense,
                "params": self.params, "op_retention": self.op_retention,
                "filter_retention": self.filter_retention, "weight_retention": self.weight_retention}


def block_of(path: str, *, container: bool = False) -> str:
    """The block a module path lies in: its first name, and the index after it when the
    path goes inside that indexed child (``layer1.0.conv1`` -> ``layer1.0``, ``cells.2.edges...``
    -> ``cells.2``, but ``features.0`` -> ``features``, a conv of a plain Sequential).

    Args:
        path: a module path.
        container: ``path`` names a container (an op unit's branch), not a layer: then an
            index at its end still names a block (``layer1.0``).
    """
    parts = path.split(".") if path else []
    if not parts:
        return "(top)"
    if len(parts) >= 2 and parts[1].isdigit() and (len(parts) > 2 or container):
        return ".".join(parts[:2])
    return parts[0]


def group_arch(arch: dict[str, Any], tensors: dict[str, tuple[int, int]],
               reduction: Iterable[int] = ()) -> tuple[list[Group], Group]:
    """Tally ``arch.json`` per block (see :class:`Group`), in graph order, and for the whole model.

    Args:
        arch: the contents of ``arch.json``.
        tensors: (nonzero, size) per saved tensor of the exported model; {} leaves the
            weight and parameter columns empty.
        reduction: indices of DARTS reduction cells (for the labels).
    """
    groups: dict[str, Group] = {}
    reduction = set(reduction)

    def get(name: str) -> Group:
        if name not in groups:
            cell = _CELL.match(name)
            label = name if cell is None else f"cell {cell.group(1)}" + (
                " (reduction)" if int(cell.group(1)) in reduction else "")
            groups[name] = Group(name=name, label=label)
        return groups[name]

    for module, layer in arch.get("layers", {}).items():
        g = get(block_of(module))
        if layer.get("kept"):
            g.filters_kept += int(layer.get("width") or 0)
            g.filters_total += int(layer["out_channels"])
            nonzero, size = tensors.get(f"{module}.weight", (0, 0))
            g.weights_nonzero += nonzero
            g.weights_dense += size
    for op in arch.get("ops", []):
        g = get(block_of(op.get("path", ""), container=True))
        g.ops_total += 1
        g.ops_kept += bool(op["kept"])
        if "op" in op:
            kept_total = g.op_types.setdefault(op["op"], [0, 0])
            kept_total[0] += bool(op["kept"])
            kept_total[1] += 1
    if tensors:
        for g in groups.values():
            g.params = 0
        for key, (nonzero, _) in tensors.items():
            get(block_of(key.rsplit(".", 1)[0])).params += nonzero
    return list(groups.values()), _total(groups.values(), bool(tensors))


def _total(groups, with_params: bool) -> Group:
    t = Group(name="total", label="total", params=0 if with_params else None)
    for g in groups:
        t.ops_kept += g.ops_kept
        t.ops_total += g.ops_total
        t.filters_kept += g.filters_kept
        t.filters_total += g.filters_total
        t.weights_nonzero += g.weights_nonzero
        t.weights_dense += g.weights_dense
        if with_params:
            t.params += g.params or 0
        for op, (kept, total) in g.op_types.items():
            kt = t.op_types.setdefault(op, [0, 0])
            kt[0] += kept
            kt[1] += total
    return t


def _summary(rows: list[dict], arch: Optional[dict], val_accuracy: Optional[float]) -> dict[str, Any]:
    """Final parameters against the target, accuracy, epochs and pruning rounds."""
    last = rows[-1]
    params = arch["params"]["nonzero"] if arch else last.get("params")
    target = last.get("target")
    return {"params": params, "params_dense": arch["params"]["total"] if arch else last.get("params_total"),
            "target": target, "target_met": None if params is None or target is None else params <= target,
            "val_accuracy": val_accuracy if val_accuracy is not None else last.get("val_acc"),
            "val_accuracy_of": "compact model" if val_accuracy is not None else f"epoch {last.get('epoch')}",
            "epochs": last.get("epoch", len(rows)), "rounds": sum(1 for r in rows if "round" in r),
            "finished": arch is not None}


# ----------------------------------------------------------------------------- writing
def _save_figure(fig: Figure, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Write the plots and ``report.json`` of a run directory (module docstring).

    Args:
        run_dir: a directory written by ``granular search``.
        out_dir: where to write (default ``run_dir/report``).

    Returns:
        What ``report.json`` holds: ``files`` (name -> path written), ``summary``,
        ``grouped_by`` (``cell``, ``block`` or None without ``arch.json``), ``groups`` and
        ``total`` (:meth:`Group.to_dict`), and ``missing`` (the run files it went without).

    Raises:
        GranularError: no run directory, no metrics log, or one that cannot be read or written.
    """
    run_dir = Path(run_dir)
    rows = load_metrics(run_dir)
    arch = load_arch(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GranularError(f"cannot create {out} ({err.strerror}): pass --out DIR somewhere writable") from None
    figures = {"thresholds": (plot_thresholds(rows), THRESHOLDS_PNG), "params": (plot_params(rows), PARAMS_PNG)}
    groups, total, missing = [], None, []
    if arch is None:
        missing.append(ARCH)
    else:
        tensors = _tensor_counts(run_dir / MODEL_DIR)
        if not tensors:
            missing.append("model/model.safetensors")
        n_cells = len({op["cell"] for op in arch.get("ops", []) if "cell" in op})
        groups, total = group_arch(arch, tensors, _reduction_cells(run_dir, n_cells) if n_cells else set())
        space = _run_space(run_dir)
        figures["retention_by_cell"] = (plot_retention(groups, space.op_order if space else None), RETENTION_PNG)
    files = {key: str(out / name) for key, (_, name) in figures.items()}
    files["report"] = str(out / REPORT_JSON)
    result = {"run_dir": str(run_dir), "files": files,
              "summary": _summary(rows, arch, _model_val_accuracy(run_dir / MODEL_DIR)),
              "grouped_by": None if arch is None else ("cell" if any(g.op_types for g in groups) else "block"),
              "groups": [g.to_dict() for g in groups], "total": total.to_dict() if total else None,
              "missing": missing}
    try:
        for fig, name in figures.values():
            _save_figure(fig, out / name)
        write_json(out / REPORT_JSON, result)
    except OSError as err:
        raise GranularError(f"cannot write the report to {out} ({err.strerror}): pass --out DIR somewhere "
                            f"writable") from None
    return result
