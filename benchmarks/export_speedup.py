"""Export speedup: CPU inference time of the compact model against the gated model it was
exported from, at the end of a search, side by side in one run. It should track the
parameter reduction.

    granular search darts:tiny --target-params 50K --out runs/demo
    python benchmarks/export_speedup.py runs/demo [--batch 256]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import granular
from granular.accounting import count_module
from granular.cli.rundir import CHECKPOINT, build_run, load_run_config
from granular.driver import Searcher

from _common import header, interleaved_times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    run_dir = Path(args.run_dir)
    run = load_run_config(run_dir)
    data, gm, cfg = build_run(run)
    Searcher(gm, data, cfg, progress=False).resume(run_dir / CHECKPOINT)
    gm.eval()
    compact = granular.load(run_dir / "model")
    header(f"export speedup, {run['spec']} searched to {cfg.target_params:,} on {run['dataset']}")
    x = torch.randn((args.batch,) + tuple(data.example_input().shape[1:]))
    with torch.no_grad():
        torch.testing.assert_close(compact(x), gm(x), rtol=1e-4, atol=1e-5)
        t = interleaved_times({"gated": lambda: gm(x), "compact": lambda: compact(x)}, repeats=args.repeats)
    dense = sum(p.numel() for n, p in gm.named_parameters() if not n.startswith("granular_gates"))
    pc = count_module(compact)
    print(f"gated {t['gated'] * 1e3:.1f} ms, compact {t['compact'] * 1e3:.1f} ms per batch of {args.batch}")
    print(f"parameters: super-net {dense:,}, compact {pc.total:,} dense / {pc.nonzero:,} nonzero "
          f"({dense / pc.nonzero:.1f}x fewer nonzero)")
    print(f"export speedup: {t['gated'] / t['compact']:.2f}x")


if __name__ == "__main__":
    main()
