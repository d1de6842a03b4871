"""Threshold initialisation: the journal's ``min`` rule against the released code's ``zero``
rule, on the bundled data set, same space, target, seed and epoch budget, in one run.

    python benchmarks/threshold_init.py [--spec darts:tiny] [--target 50K] [--epochs 30] [--seeds 0]

Prints, per rule: whether the target was met, after how many epochs, the exported model's
nonzero parameters and its validation accuracy at the end of the search.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import granular
from granular.config import SearchConfig, parse_size
from granular.data import load_data
from granular.spec import build_model


def run(spec: str, target: int, epochs: int, rule: str, seed: int):
    data = load_data("digits", batch_size=96, seed=seed)
    torch.manual_seed(seed)
    gm = granular.prepare(build_model(spec, num_classes=10, in_channels=1), data.example_input())
    cfg = SearchConfig(target_params=target, epochs=epochs, threshold_init=rule, seed=seed)
    return granular.search(gm, data, config=cfg, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="darts:tiny")
    ap.add_argument("--target", default="50K")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    target = parse_size(args.target)
    print(f"# threshold init, {args.spec} on digits, target {target:,}, {args.epochs} epochs, seeds {args.seeds}")
    print("| rule | reached | epochs | nonzero params | val acc |")
    print("|---|---|---|---|---|")
    summary = {}
    for rule in ("min", "zero"):
        results = [run(args.spec, target, args.epochs, rule, s) for s in args.seeds]
        accs = [r.val_accuracy for r in results]
        summary[rule] = statistics.mean(accs)
        print(f"| {rule} | {sum(r.reached for r in results)}/{len(results)} | "
              f"{statistics.mean(r.epochs for r in results):.1f} | "
              f"{statistics.mean(r.params.nonzero for r in results):,.0f} | "
              f"{100 * statistics.mean(accs):.1f}% |", flush=True)
    best = max(summary, key=summary.get)
    print(f"better rule on this run: {best}")


if __name__ == "__main__":
    main()
