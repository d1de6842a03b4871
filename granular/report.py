"""``granular report RUN_DIR``: what a search kept, where, and how it got there.

Reads a run directory written by ``granular search`` (:mod:`granular.run`) and writes, to
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

import argparse
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from granular._format import fmt_count, fmt_pct
from granular.errors import GranularError

__all__ = ["Group", "report", "run_report", "load_metrics", "load_arch", "block_of", "group_arch",
           "retention_matrix", "plot_thresholds", "plot_params", "plot_retention", "REPORT_DIR"]

REPORT_DIR = "report"
METRICS = "metrics.jsonl"
ARCH = "arch.json"
THRESHOLDS_PNG = "thresholds.png"
PARAMS_PNG = "params.png"
RETENTION_PNG = "retention_by_cell.png"
REPORT_JSON = "report.json"

GRANULARITIES = (("op", "alpha", "op (α)"), ("filter", "beta", "filter (β)"), ("weight", "omega", "weight (ω)"))
"""(retention key, threshold key, label) of each granularity, as ``metrics.jsonl`` names them."""

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
        if (run_dir / "config.json").is_file():
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


def _reduction_cells(run_dir: Path, n_cells: int) -> set[int]:
    """Indices of the reduction cells, when the run searched a registered DARTS space."""
    try:
        spec = json.loads((run_dir / "config.json").read_text()).get("spec", "")
    except (OSError, json.JSONDecodeError):
        return set()
    if not (spec == "darts" or spec.startswith("darts:")):
        return set()
    from granular.search_spaces.darts import reduction_indices
    return set(reduction_indices(n_cells))


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


# ----------------------------------------------------------------------------- the plots
def _series(rows: list[dict], key: str) -> list[float]:
    """``key`` of each row as floats; NaN where a row lacks it (a gap in the line)."""
    return [float(r[key]) if isinstance(r.get(key), (int, float)) else math.nan for r in rows]


def _epochs(rows: list[dict]) -> list[int]:
    return [int(r.get("epoch", i + 1)) for i, r in enumerate(rows)]


def _warmup_spans(rows: list[dict]) -> list[tuple[int, int]]:
    """(first, last) epoch of each run of warm-up epochs (one per stage in multi-stage runs)."""
    spans: list[tuple[int, int]] = []
    for epoch, r in zip(_epochs(rows), rows):
        if not str(r.get("phase", "")).endswith("warmup"):
            continue
        if spans and spans[-1][1] == epoch - 1:
            spans[-1] = (spans[-1][0], epoch)
        else:
            spans.append((epoch, epoch))
    return spans


def _mark_phases(ax, rows: list[dict]) -> None:
    """Shade the warm-up epochs, draw a line at each stage end of a multi-stage run, and
    keep the epoch ticks whole."""
    for i, (first, last) in enumerate(_warmup_spans(rows)):
        ax.axvspan(first - 0.5, last + 0.5, color="0.92", zorder=0, lw=0, label="warm-up" if i == 0 else None)
    for epoch, r in zip(_epochs(rows), rows):
        if isinstance(r.get("stage_end"), dict):
            ax.axvline(epoch + 0.5, color="0.5", ls=":", lw=1)
            ax.annotate(f"stage {r['stage_end'].get('stage', '?')} ends", (epoch + 0.5, 1),
                        xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                        fontsize=7, color="0.4")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_thresholds(rows: list[dict]) -> Figure:
    """Fig. 8: per granularity, the mean threshold (left) and retention ratio (right) by epoch.

    α and β thresholds compare with gate values in (0, 1), ω thresholds with weight
    magnitudes, orders of magnitude smaller: ω has its own axis, on the right of the left
    panel. Lines are labelled as in :data:`GRANULARITIES`; a threshold that no row
    records (a model without ops has no α) is left out.
    """
    fig = Figure(figsize=(10, 4.3), layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_r = fig.subplots(1, 2, sharex=True)
    x = _epochs(rows)
    for i, (keep, thr, label) in enumerate(GRANULARITIES):
        t = _series(rows, f"threshold_{thr}")
        if not all(math.isnan(v) for v in t):
            if thr == "omega":
                ax_w = ax_t.twinx()
                ax_w.plot(x, t, marker=".", ls="--", color=f"C{i}", label=label)
                ax_w.set_ylabel("ω threshold (|weight|, dashed)")
            else:
                ax_t.plot(x, t, marker=".", color=f"C{i}", label=label)
        ax_r.plot(x, _series(rows, f"keep_{keep}"), marker=".", color=f"C{i}", label=label)
    ax_t.set(title="thresholds (mean over scopes)", xlabel="epoch", ylabel="α, β threshold (gate value)")
    ax_r.set(title="retention ratio", xlabel="epoch", ylabel="fraction of units kept", ylim=(0, 1.05))
    for ax in (ax_t, ax_r):
        _mark_phases(ax, rows)
        ax.grid(alpha=0.3)
    fig.legend(*ax_r.get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=8)
    return fig


def plot_params(rows: list[dict]) -> Figure:
    """Nonzero parameters against the target by epoch; pruning rounds are dots (filled where
    the round landed on its goal), and multi-stage runs add each stage's count and goal, and
    the ops regrown after a stage."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = _epochs(rows)
    params = _series(rows, "params")
    ax.plot(x, params, marker=".", label="nonzero parameters")
    target = next((r["target"] for r in reversed(rows) if r.get("target") is not None), None)
    if target is not None:
        ax.axhline(target, color="C3", ls="--", label=f"target {fmt_count(target)}")
    rounds = [(xe, p, bool(r.get("landed"))) for xe, p, r in zip(x, params, rows) if "round" in r]
    if rounds:
        ax.scatter([e for e, _, _ in rounds], [p for _, p, _ in rounds], s=40, zorder=3,
                   facecolors=["C1" if landed else "none" for _, _, landed in rounds], edgecolors="C1",
                   label="pruning round (filled: landed)")
    if any(r.get("stage_params") is not None for r in rows):
        ax.plot(x, _series(rows, "stage_params"), ls="-", marker=".", color="C2", alpha=0.7,
                label="stage parameters")
        ax.step(x, _series(rows, "stage_goal"), where="mid", color="C2", ls="--", alpha=0.7, label="stage goal")
    for epoch, p, r in zip(x, params, rows):
        regrown = (r.get("regrowth") or {}).get("regrown_ops") or []
        if regrown:
            ax.annotate(f"+{len(regrown)} ops regrown", (epoch, p), xytext=(4, 8), textcoords="offset points",
                        fontsize=7, color="C2")
    _mark_phases(ax, rows)
    ax.set(title="parameters", xlabel="epoch", ylabel="nonzero parameters")
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_count(v)))
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8)
    return fig


def retention_matrix(groups: list[Group]) -> tuple[list[str], list[str], list[list[float]]]:
    """The heat map's (rows, columns, values): for DARTS cells, the fraction of each op type
    kept, then filter and weight retention; for other models, one column per granularity.
    NaN where a group has nothing of a column."""
    nan = math.nan
    darts = [g for g in groups if g.op_types]
    if darts:
        from granular.search_spaces.darts import PRIMITIVES
        seen = {op for g in darts for op in g.op_types}
        types = [op for op in PRIMITIVES if op in seen] + sorted(seen - set(PRIMITIVES))
        values = [[(g.op_types[t][0] / g.op_types[t][1]) if t in g.op_types else nan for t in types]
                  + [_nan(g.filter_retention), _nan(g.weight_retention)] for g in darts]
        return [g.label for g in darts], types + ["filters", "weights"], values
    values = [[_nan(g.op_retention), _nan(g.filter_retention), _nan(g.weight_retention)] for g in groups]
    return [g.label for g in groups], ["ops", "filters", "weights"], values


def _nan(v: Optional[float]) -> float:
    return math.nan if v is None else v


def plot_retention(groups: list[Group]) -> Figure:
    """Fig. 9: a heat map of :func:`retention_matrix`, each square annotated with its value."""
    rows, cols, values = retention_matrix(groups)
    fig = Figure(figsize=(1.6 + 0.95 * len(cols), 1.4 + 0.42 * len(rows)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if v > 0.6 else "white")
    if cols[-2:] == ["filters", "weights"] and len(cols) > 3:
        ax.axvline(len(cols) - 2.5, color="white", lw=3)
    ax.set_title("fraction kept per cell and op type" if len(cols) > 3 else "fraction kept per block")
    fig.colorbar(im, ax=ax, label="retention")
    return fig


# ----------------------------------------------------------------------------- writing
def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then move it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for reading
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _save_figure(fig: Figure, path: Path) -> None:
    _write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _save_json(obj: Any, path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    _write_atomic(path, write)


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
        tensors = _tensor_counts(run_dir / "model")
        if not tensors:
            missing.append("model/model.safetensors")
        n_cells = len({op["cell"] for op in arch.get("ops", []) if "cell" in op})
        groups, total = group_arch(arch, tensors, _reduction_cells(run_dir, n_cells) if n_cells else set())
        figures["retention_by_cell"] = (plot_retention(groups), RETENTION_PNG)
    files = {key: str(out / name) for key, (_, name) in figures.items()}
    files["report"] = str(out / REPORT_JSON)
    result = {"run_dir": str(run_dir), "files": files,
              "summary": _summary(rows, arch, _model_val_accuracy(run_dir / "model")),
              "grouped_by": None if arch is None else ("cell" if any(g.op_types for g in groups) else "block"),
              "groups": [g.to_dict() for g in groups], "total": total.to_dict() if total else None,
              "missing": missing}
    try:
        for fig, name in figures.values():
            _save_figure(fig, out / name)
        _save_json(result, out / REPORT_JSON)
    except OSError as err:
        raise GranularError(f"cannot write the report to {out} ({err.strerror}): pass --out DIR somewhere "
                            f"writable") from None
    return result


# ----------------------------------------------------------------------------- the command
def _ratio(part: int, whole: int) -> str:
    return f"{part}/{whole}" if whole else "-"


def _op_types(g: Group) -> str:
    return "\n".join(f"{op} ×{kept}" for op, (kept, _) in sorted(g.op_types.items()) if kept) or "-"


def _print_tables(console, result: dict[str, Any]) -> None:
    """One row per cell (or block) and a total: ops kept of all, the op types kept (DARTS),
    filter and weight retention, nonzero parameters."""
    from rich.table import Table

    darts = result["grouped_by"] == "cell"
    t = Table(title=f"kept per {result['grouped_by']}")
    for col in ("cell" if darts else "block", "ops", *(["op types kept"] if darts else []),
                "filters", "weights", "params"):
        t.add_column(col, justify="left" if col in ("cell", "block", "op types kept") else "right", no_wrap=True)
    for g in [*result["groups"], result["total"]]:
        group = Group.from_dict(g)
        if group.name == "total":
            t.add_section()
        t.add_row(group.label, _ratio(group.ops_kept, group.ops_total), *([_op_types(group)] if darts else []),
                  fmt_pct(group.filter_retention), fmt_pct(group.weight_retention),
                  "-" if group.params is None else fmt_count(group.params))
    console.print(t)


def _summary_line(s: dict[str, Any]) -> str:
    params = "-" if s["params"] is None else f"{fmt_count(s['params'])} ({s['params']:,})"
    target = "" if s["target"] is None else (
        f" vs target {fmt_count(s['target'])}: " + ("[green]met[/]" if s["target_met"] else "[yellow]not met[/]"))
    what = "final" if s["finished"] else f"so far (epoch {s['epochs']}, search not finished)"
    return (f"[bold]{what}[/]: {params} nonzero parameters{target}; val accuracy {fmt_pct(s['val_accuracy'])} "
            f"({s['val_accuracy_of']}); {s['epochs']} epochs, {s['rounds']} pruning rounds")


def run_report(args: argparse.Namespace) -> int:
    """The ``granular report`` command: print the tables and summary, write the plots."""
    from rich.console import Console

    console = Console()
    result = report(args.run_dir, args.out)
    run_dir = Path(args.run_dir)
    if result["grouped_by"] is not None:
        _print_tables(console, result)
    else:
        out = Path(result["files"]["report"]).parent.resolve()
        held = ", ".join(sorted(p.name + "/" * p.is_dir() for p in run_dir.iterdir() if p.resolve() != out))
        Console(stderr=True).print(f"[yellow]no {ARCH} in {run_dir} (it holds {held or 'nothing else'}): the "
                                   f"search has not finished; the plots of the log are written, the tables "
                                   f"come with {ARCH}[/]", highlight=False, soft_wrap=True)
    if "model/model.safetensors" in result["missing"]:
        Console(stderr=True).print(f"[yellow]no model/model.safetensors in {run_dir}: weights and parameters "
                                   f"per block are left out; granular export {run_dir} writes it[/]",
                                   highlight=False, soft_wrap=True)
    console.print(_summary_line(result["summary"]), highlight=False, soft_wrap=True)
    console.print("wrote " + ", ".join(result["files"].values()), highlight=False, soft_wrap=True)
    return 0
