"""Pass cost against graph size: trace, find_units + insert_gates, count_params and export,
timed on models from a few hundred to tens of thousands of graph nodes, with the growth
exponent of each fitted over node counts (log-log least squares). "recount" is what a pruning
round pays per count: one :class:`~granular.accounting.ParamCounter`, a few filter masks
changed since its last count. Goals (issue "Performance"):
prepare + export of darts:large under 10 s, ``count_params`` under 0.5 s, every exponent at
most 1.1.

    python benchmarks/pass_cost.py                       # darts tiny/small/large + timm models
    python benchmarks/pass_cost.py --models darts:tiny darts:small --repeats 1

Each model is traced, gated and exported once per repeat (median of the repeats); the masks
are random (30% of ops, filters and weights) so that export slices something. One process,
one model after another, nothing else running beside it.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import granular
from granular.accounting import ParamCounter
from granular.masks import gate_bank
from granular.passes import gate_pipeline, trace
from granular.spec import build_model

from _common import header

DEFAULT = ["timm:resnet50", "timm:efficientnet_b0", "timm:convnext_tiny", "timm:resnet152", "darts:tiny",
           "darts:small", "darts:large"]
STEPS = ("trace", "gate", "count_params", "recount", "export")


def _input(spec: str) -> torch.Tensor:
    if spec.startswith("darts") or spec.startswith("mobilenet"):
        return torch.randn(2, 3, 32, 32)
    return torch.randn(2, 3, 224, 224)


def measure(spec: str) -> tuple[int, dict[str, float]]:
    """Seconds of each step on ``spec``, and its gated graph's node count (what count_params
    and export walk)."""
    x = _input(spec)
    model = build_model(spec, num_classes=10, in_channels=3).eval()
    t = {}
    t0 = time.perf_counter()
    gm = trace(model, x)
    t["trace"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    gm = gate_pipeline(gm)
    t["gate"] = time.perf_counter() - t0
    nodes = len(gm.graph.nodes)
    granular.testing.random_masks_(gm, op=0.3, filter=0.3, weight=0.3, seed=0)
    gm.eval()
    t0 = time.perf_counter()
    granular.count_params(gm)
    t["count_params"] = time.perf_counter() - t0
    # a round's recount: one ParamCounter, a few filter masks changed between counts
    counter = ParamCounter(gm)
    counter()
    filters = list(gate_bank(gm).filter.values())
    saved = [f.mask.clone() for f in filters]
    for j in torch.randint(len(filters), (5,), generator=torch.Generator().manual_seed(1)).tolist():
        filters[j].mask.zero_()
    t0 = time.perf_counter()
    counter()
    t["recount"] = time.perf_counter() - t0
    for f, m in zip(filters, saved):  # export times the same model as before
        f.mask.copy_(m)
    t0 = time.perf_counter()
    granular.export(gm)
    t["export"] = time.perf_counter() - t0
    return nodes, t


def exponent(xs: list[float], ys: list[float]) -> float:
    """The slope of log y against log x (least squares)."""
    lx, ly = [math.log(v) for v in xs], [math.log(max(v, 1e-6)) for v in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den if den else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    header("pass cost against graph nodes")
    rows = []
    for spec in args.models:
        runs = [measure(spec) for _ in range(args.repeats)]
        nodes = runs[0][0]
        med = {k: statistics.median(r[1][k] for r in runs) for k in STEPS}
        rows.append((spec, nodes, med))
        print(f"{spec:28s} {nodes:6d} nodes  " + "  ".join(f"{k} {med[k]:7.3f} s" for k in STEPS), flush=True)
    print("\n| model | gated graph nodes | trace | find_units + insert_gates | count_params | recount in a round "
          "| export | prepare + export |")
    print("|---|---|---|---|---|---|---|---|")
    for spec, nodes, m in rows:
        print(f"| {spec} | {nodes:,} | {m['trace']:.2f} s | {m['gate']:.2f} s | {m['count_params']:.2f} s | "
              f"{m['recount']:.2f} s | {m['export']:.2f} s | {m['trace'] + m['gate'] + m['export']:.2f} s |")
    if len(rows) >= 2:
        xs = [r[1] for r in rows]
        print("\ngrowth exponent over node counts (goal <= 1.1): " + ", ".join(
            f"{k} {exponent(xs, [r[2][k] for r in rows]):.2f}" for k in STEPS))
    large = [r for r in rows if r[0] == "darts:large"]
    if large:
        m = large[0][2]
        print(f"darts:large: prepare + export {m['trace'] + m['gate'] + m['export']:.2f} s (goal < 10 s), "
              f"count_params {m['count_params']:.2f} s, recount in a round {m['recount']:.2f} s (goal < 0.5 s)")


if __name__ == "__main__":
    main()
