"""The plots of ``granular report``: Fig. 8 (thresholds and retention by epoch), the parameter
count against the target, and Fig. 9 (what each cell kept), as matplotlib figures (Agg: no
display needed). :mod:`granular.report` writes them.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from granular._format import fmt_count

__all__ = ["GRANULARITIES", "plot_thresholds", "plot_params", "retention_matrix", "plot_retention"]

GRANULARITIES = (("op", "alpha", "op (α)"), ("filter", "beta", "filter (β)"), ("weight", "omega", "weight (ω)"))
"""(retention key, threshold key, label) of each granularity, as ``metrics.jsonl`` names them."""


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


def retention_matrix(groups: list, op_order: Optional[Sequence[str]] = None
                     ) -> tuple[list[str], list[str], list[list[float]]]:
    """The heat map's (rows, columns, values): for the cells of a search space, the fraction of
    each op type kept, then filter and weight retention; for other models, one column per
    granularity. NaN where a group has nothing of a column.

    Args:
        groups: :class:`granular.report.Group` rows.
        op_order: the op types' column order (default: every registered space's order,
            :func:`granular.search_spaces.op_order`); other types follow, sorted.
    """
    nan = math.nan
    darts = [g for g in groups if g.op_types]
    if darts:
        if op_order is None:
            from granular.search_spaces import op_order as registered_order
            op_order = registered_order()
        seen = {op for g in darts for op in g.op_types}
        types = [op for op in op_order if op in seen] + sorted(seen - set(op_order))
        values = [[(g.op_types[t][0] / g.op_types[t][1]) if t in g.op_types else nan for t in types]
                  + [_nan(g.filter_retention), _nan(g.weight_retention)] for g in darts]
        return [g.label for g in darts], types + ["filters", "weights"], values
    values = [[_nan(g.op_retention), _nan(g.filter_retention), _nan(g.weight_retention)] for g in groups]
    return [g.label for g in groups], ["ops", "filters", "weights"], values


def _nan(v: Optional[float]) -> float:
    return math.nan if v is None else v


def plot_retention(groups: list, op_order: Optional[Sequence[str]] = None) -> Figure:
    """Fig. 9: a heat map of :func:`retention_matrix`, each square annotated with its value."""
    rows, cols, values = retention_matrix(groups, op_order)
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
