"""Landing across seeds: does every search end within 3% below its target, inside its epochs?

Each case is a ``granular search`` command line, run once per seed in this process (one at a
time: two torch processes on 2 cores slow each other 10-100x). For each run the script reads
the run directory back and records the final nonzero count, the epochs used, the exit
status, the validation accuracy of the compact model and the minimum training accuracy of
the epochs after warm-up (a collapse shows there). It prints one row per run and a summary
per case: runs landed / runs, epochs, accuracy mean ± std.

    python benchmarks/landing.py                          # every case, seeds 0-4
    python benchmarks/landing.py --cases readme-single --seeds 0 1 2
    python benchmarks/landing.py --out runs/landing       # keep the run directories there

Per-run results are appended to ``OUT/results.jsonl``; with ``--resume`` the runs already
there are not run again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from granular.cli import main as granular_main
from granular.config import parse_size

from _common import ResultLog

CASES = {
    "readme-single": ["darts:tiny", "--target-params", "50K", "--epochs", "30", "--single-stage"],
    "readme-multi": ["darts:tiny", "--target-params", "50K", "--epochs", "30", "--multi-stage"],
    "mobilenet-tiny": ["mobilenet:tiny", "--target-params", "40%", "--epochs", "30", "--single-stage"],
    "timm-resnet10t": ["timm:resnet10t", "--target-params", "10%", "--epochs", "20", "--single-stage"],
}
LAND = 0.03


def _dense(spec: str) -> int:
    """Parameters of the model ``spec`` on digits, all of them (for targets given in %).

    Not the nonzero count at initialisation: timm's ResNets zero-initialise the last
    BatchNorm of each block, so their folded convs count as zero until training moves
    them (resnet10t: 1.79M nonzero of 4.92M at init)."""
    import granular
    from granular.cli.rundir import build_run
    from granular.config import SearchConfig
    run = {"spec": spec, "dataset": "digits", "data_root": None, "augment": False, "leaf": [],
           "auto_leaf": False, "search": SearchConfig(target_params=1).to_dict()}
    _, gm, _ = build_run(run)
    return granular.count_params(gm).total


def _args(case: str, seed: int, out: Path) -> tuple[list[str], int]:
    args = list(CASES[case])
    i = args.index("--target-params") + 1
    if args[i].endswith("%"):
        args[i] = str(int(_dense(args[0]) * float(args[i][:-1]) / 100))
    return args + ["--seed", str(seed), "--out", str(out), "--no-progress"], parse_size(args[i])


def run_one(case: str, seed: int, root: Path) -> dict:
    out = root / f"{case}-seed{seed}"
    args, target = _args(case, seed, out)
    t0 = time.time()
    code = granular_main(["search", *args])
    seconds = time.time() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    meta = json.loads((out / "model" / "granular.json").read_text())
    n = meta["nonzero_parameters"]
    searched = [r["train_acc"] for r in rows if "warmup" not in r["phase"]]
    warm = [r["train_acc"] for r in rows if "warmup" in r["phase"]]
    return {"case": case, "seed": seed, "exit": code, "target": target, "params": n,
            "landed": code == 0 and (1 - LAND) * target <= n <= target, "epochs": len(rows),
            "budget": int(args[args.index("--epochs") + 1]), "val_acc": meta["metadata"]["val_accuracy"],
            "warmup_train_acc": warm[-1] if warm else None,
            "min_search_train_acc": min(searched) if searched else None, "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default="runs/landing")
    ap.add_argument("--resume", action="store_true", help="skip the runs already in OUT/results.jsonl")
    args = ap.parse_args()
    root = Path(args.out)
    log = ResultLog(root, ("case", "seed"), args.resume)
    print(f"# landing: within {LAND:.0%} below the target, inside the epoch budget; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = []
    for case in args.cases:
        for seed in args.seeds:
            r = log.get(case, seed)
            if r is None:
                shutil.rmtree(root / f"{case}-seed{seed}", ignore_errors=True)
                r = log.add(run_one(case, seed, root))
            results.append(r)
            print(f"{case:15s} seed {seed}: exit {r['exit']}, {r['params']:,} / {r['target']:,} "
                  f"({'landed' if r['landed'] else 'MISSED'}), {r['epochs']}/{r['budget']} epochs, "
                  f"val {r['val_acc']:.3f}, train acc after warm-up {r['warmup_train_acc']:.3f} -> min "
                  f"{r['min_search_train_acc']:.3f}, {r['seconds']:.0f} s", flush=True)
    print("\n| case | landed | epochs used | val accuracy | min train acc in search | s per run |")
    print("|---|---|---|---|---|---|")
    for case in args.cases:
        rs = [r for r in results if r["case"] == case]
        acc = [r["val_acc"] for r in rs]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        print(f"| {case} ({' '.join(CASES[case])}) | {sum(r['landed'] for r in rs)}/{len(rs)} | "
              f"{min(r['epochs'] for r in rs)}-{max(r['epochs'] for r in rs)} of {rs[0]['budget']} | "
              f"{100 * statistics.mean(acc):.1f} ± {100 * sd:.1f}% | "
              f"{100 * min(r['min_search_train_acc'] for r in rs):.1f}% | "
              f"{statistics.mean(r['seconds'] for r in rs):.0f} |")


if __name__ == "__main__":
    main()
