"""Gating overhead: one training step of the gated super-net against the same super-net
without gates, measured side by side in one run. Goal: at most 1.3x on CPU.

    python benchmarks/gating_overhead.py [--spec darts:tiny] [--batch 96] [--size 8]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import granular
from granular.search_spaces import build_search_space

from _common import header, interleaved_times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="darts:tiny")
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    header(f"gating overhead, {args.spec}, batch {args.batch} at {args.channels}x{args.size}x{args.size}")
    torch.manual_seed(0)
    plain = build_search_space(args.spec, 10, args.channels).train()
    torch.manual_seed(0)
    gated = granular.prepare(build_search_space(args.spec, 10, args.channels),
                             torch.zeros(2, args.channels, args.size, args.size)).train()
    with torch.no_grad():  # thresholds just below the gates, as after the min rule: every gate live
        for scope in gated.granular_gates.scopes.values():
            for name, p in scope.named_parameters():
                p.fill_(1e-4 if name == "t_omega" else 0.45)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        return run

    t = interleaved_times({"plain": step(plain), "gated": step(gated)}, repeats=args.repeats)
    ratio = t["gated"] / t["plain"]
    print(f"plain step {t['plain'] * 1e3:.1f} ms, gated step {t['gated'] * 1e3:.1f} ms")
    print(f"gating overhead: {ratio:.2f}x (goal <= 1.30x)")


if __name__ == "__main__":
    main()
