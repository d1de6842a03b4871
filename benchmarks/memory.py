"""Peak training-step memory of single-stage against multi-stage search, side by side.

    python benchmarks/memory.py --preset small --preset large

For one search space and batch, it measures the peak memory of one training step (forward,
backward, optimiser step) of each graph a search trains:

* single-stage: the whole super-net, every op alive (the search's first and largest step);
* multi-stage: each phase's graph as the phase starts (stages ``0..s`` and their auxiliary
  head, the later stages absent; the final phase is the whole network), built by the
  multi-stage driver itself. Before each next phase, the stage just searched is brought down
  to ``stage_keep`` of its parameters by removing ops at random (seeded), which is the state
  the driver leaves it in: a stage's pruning round stops at that goal. The real search also
  prunes filters and weights, which leave activations unchanged, so the real op count may be
  higher; the ``ops kept`` column shows what this run assumed.

The multi-stage peak is the largest phase. On CPU the figure is the peak of live tensor
memory during the step (parameters, gradients, optimiser state and activations of what
that step holds; ``PeakTensorMemory`` in ``_common.py``); with ``--device cuda`` it is
``torch.cuda.max_memory_allocated``. The ratio multi / single is printed per preset, with the
step time ratio of the largest phase.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PeakTensorMemory, header  # noqa: E402

import granular  # noqa: E402
from granular.config import SearchConfig  # noqa: E402
from granular.driver import MultiStageSearcher, Searcher  # noqa: E402
from granular.search_spaces import build_search_space  # noqa: E402


class _NoData:
    """The drivers only need data to train; this benchmark runs its own steps."""

    train_set = None


def step_peak(net, params_module, opt_w, opt_a, x, y, device) -> tuple[int, float]:
    """Peak bytes and seconds of one training step of ``net``."""
    def step():
        out = net(x)
        F.cross_entropy(out, y).backward()
        opt_w.step()
        opt_a.step()
        opt_w.zero_grad(set_to_none=False)
        opt_a.zero_grad(set_to_none=False)

    step()  # optimiser state and gradients exist from the second step of a search on
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(), time.perf_counter() - t
    t = time.perf_counter()
    step()  # timed without the tracker, whose per-op bookkeeping would dominate
    seconds = time.perf_counter() - t
    held = [p for p in params_module.parameters()] + [p.grad for p in params_module.parameters() if p.grad is not None]
    held += [v for opt in (opt_w, opt_a) for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    held += [x, y]
    with PeakTensorMemory(held) as mem:
        step()
    return mem.peak, seconds


@torch.no_grad()
def prune_stage_ops(s: MultiStageSearcher, stage: int, keep: float, seed: int) -> float:
    """Remove random ops of ``stage`` (never a sum's last) until its nonzero parameters are at
    most ``keep`` of what they are now; returns the fraction of the stage's ops kept."""
    start = s.stage_counts()[stage].nonzero
    ops = sorted(k for k in s.bank.op if s.unit_stage[("op", k)] == stage)
    random.Random(seed).shuffle(ops)
    saved = s._masks()

    def prune(m: int) -> int:
        s._restore(saved)
        for k in ops[:m]:
            s.bank.op[k].mask.zero_()
        s._protect()
        return s.stage_counts()[stage].nonzero

    lo, hi = 0, len(ops)  # the shortest prefix of the shuffled ops that meets the goal
    while lo < hi:
        mid = (lo + hi) // 2
        if prune(mid) <= keep * start:
            hi = mid
        else:
            lo = mid + 1
    prune(hi)
    return sum(float(s.bank.op[k].mask) for k in ops) / max(len(ops), 1)


def measure(preset: str, batch: int, size: int, device: torch.device, seed: int, stage_keep: float = 0.5) -> dict:
    torch.manual_seed(seed)
    model = build_search_space(f"darts:{preset}", num_classes=10, in_channels=3)
    x = torch.randn(batch, 3, size, size)
    gm = granular.prepare(model, x[:2])
    cfg = SearchConfig(target_params=1, multi_stage="on", seed=seed, stage_keep=stage_keep)
    x, y = x.to(device), torch.randint(0, 10, (batch,), device=device)

    single = Searcher(gm, _NoData(), cfg, progress=False, device=device)
    single.net.train()
    s_peak, s_time = step_peak(single.net, single.gm, single.opt_w, single.opt_a, x, y, device)
    rows = [("single-stage", s_peak, s_time, 1.0)]
    del single
    gm.cpu()
    for p in gm.parameters():
        p.grad = None

    multi = MultiStageSearcher(gm, _NoData(), cfg, progress=False, device=device)
    kept = 1.0
    for phase in range(multi.n_stages + 1):
        if phase:
            kept = prune_stage_ops(multi, phase - 1, cfg.stage_keep, seed + phase)
            multi.enter_phase(phase, fresh=True)
        multi.net.train()
        module = multi._train_module()
        peak, secs = step_peak(multi.net, module, multi.opt_w, multi.opt_a, x, y, device)
        rows.append((multi.phase_name(False), peak, secs, kept))
    return {"preset": preset, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", help="darts preset (repeatable; default small and large)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32, help="input side (CIFAR: 32)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage-keep", type=float, default=0.5,
                    help="share of a stage's parameters it keeps before the next phase (the search's default 0.5; "
                         "the released code used 0.3)")
    args = ap.parse_args(argv)
    header("peak training-step memory: single-stage vs multi-stage search")
    device = torch.device(args.device)
    print(f"batch {args.batch}, input {args.size}x{args.size}, device {device}, stage_keep {args.stage_keep}")
    for preset in args.preset or ["small", "large"]:
        r = measure(preset, args.batch, args.size, device, args.seed, args.stage_keep)
        single = r["rows"][0][1]
        print(f"\n## darts:{preset}")
        print("| graph | peak MiB | vs single | step s | ops kept (stage before) |")
        print("|---|---|---|---|---|")
        for name, peak, secs, kept in r["rows"]:
            print(f"| {name} | {peak / 2**20:.1f} | {peak / single:.3f} | {secs:.2f} | {kept:.2f} |")
        multi = max(r["rows"][1:], key=lambda row: row[1])
        print(f"darts:{preset}: multi-stage peak / single-stage peak = {multi[1] / single:.3f} "
              f"(largest phase: {multi[0]}; its step takes {multi[2] / r['rows'][0][2]:.2f}x the single step)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
