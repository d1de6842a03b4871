"""Granularity ablation at one parameter target (the journal paper's Table VIII, at CPU scale).

Four searches of the same super-net on the bundled real data set (scikit-learn's 8×8
digits), each down to the same nonzero-parameter target, differing only in which units get
gates: operations only; operations + filters; operations + weights; all three. Each result
is then retrained from scratch the same way with 3 seeds (``granular.retrain``), and the
script prints the mean ± std top-1 at the parameter count each search reached. The paper's
ordering (CIFAR-10, ~0.7M): op 93.11 < op+filter 93.21 < op+weight 93.37 < all 93.52.

    python benchmarks/quality.py [--spec darts:tiny] [--target 40K] [--search-epochs 16] [--warmup 3]
                                 [--prune-every 1] [--retrain-epochs 10] [--seeds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import granular
from granular.config import GateConfig, SearchConfig, parse_size
from granular.data import load_data
from granular.config import RetrainConfig
from granular.driver import Searcher
from granular.retrain import build_retrain_model, train_compact
from granular.search_spaces import build_search_space

VARIANTS = {
    "operation only": GateConfig(filter_gates=False, weight_masks=False),
    "operation + filter": GateConfig(weight_masks=False),
    "operation + weight": GateConfig(filter_gates=False),
    "all three": GateConfig(),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default="darts:tiny")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--target", default="40K")
    ap.add_argument("--search-epochs", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3, help="search warm-up epochs")
    ap.add_argument("--prune-every", type=int, default=1, help="epochs between pruning rounds")
    ap.add_argument("--retrain-epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    target = parse_size(args.target)
    print(f"# granularity ablation: {args.spec} on {args.dataset}, target {target:,} nonzero parameters, "
          f"search {args.search_epochs} epochs, retrain {args.retrain_epochs} epochs x {args.seeds} seeds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    data = load_data(args.dataset, batch_size=96, seed=0)
    rows = []
    for name, gates in VARIANTS.items():
        t0 = time.time()
        torch.manual_seed(0)
        model = build_search_space(args.spec, data.num_classes, data.in_channels)
        gm = granular.prepare(model, data.example_input(), gates)
        cfg = SearchConfig(target_params=target, epochs=args.search_epochs, warmup_epochs=args.warmup,
                           prune_every=args.prune_every, seed=0, gates=gates, multi_stage="off")
        result = Searcher(gm, data, cfg, progress=False).run()
        count = granular.count_params(gm)
        accs, nonzeros = [], []
        for seed in range(args.seeds):
            compact, _ = build_retrain_model(gm, RetrainConfig(epochs=args.retrain_epochs, seed=seed))
            out = train_compact(compact, data, RetrainConfig(epochs=args.retrain_epochs, seed=seed))
            accs.append(100 * out["top1"])
            nonzeros.append(out["nonzero"])
        row = {"variant": name, "reached": result.reached, "search_val": result.val_accuracy,
               "nonzero": count.nonzero, "total": count.total, "retrained_nonzero": nonzeros,
               "top1": accs, "mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "minutes": round((time.time() - t0) / 60, 1)}
        rows.append(row)
        print(f"| {name} | {count.nonzero:,} / {count.total:,} | {row['mean']:.2f} ± {row['std']:.2f} | "
              f"{', '.join(f'{a:.2f}' for a in accs)} | {row['minutes']} min |", flush=True)
    order = [r["variant"] for r in sorted(rows, key=lambda r: r["mean"])]
    print(f"\nordering by mean top-1 (low to high): {' < '.join(order)}")
    print(f"paper's ordering reproduced: {order == list(VARIANTS)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
