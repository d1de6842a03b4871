"""Gating overhead: one training step of what a search trains (the training graph of the
gated model) against the same model without gates, measured side by side in one run, on a
DARTS super-net and on a timm ResNet. Goal: at most 1.3x on CPU.

    python benchmarks/gating_overhead.py                  # darts:tiny and timm:resnet18
    python benchmarks/gating_overhead.py --specs darts:tiny --repeats 31

The steps of the plain model, the training graph and the training graph without
``fold_gates`` (the gates after BatchNorms left as their own multiplies, for reference) run
in alternation, with a warm-up step of the training graph (weights only: no gate or
threshold gradients); each round's ratios pair steps taken back to back. It prints the median ratio
with its interquartile spread over the rounds. Every gate is live (thresholds just below
the gates, as after the ``min`` rule) and nothing is pruned yet, so the three nets compute
the same layers.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import granular
from granular.passes.pipelines import training_graph
from granular.passes.skip_pruned_ops import skip_pruned_ops
from granular.search_spaces import build_search_space
from granular.spec import build_model

from _common import header, interleaved_samples

INPUTS = {"darts": (96, 1, 8), "timm": (96, 3, 32)}  # batch, channels, size (the search default batch)


def build(spec: str, channels: int):
    torch.manual_seed(0)
    if spec.startswith("darts"):
        return build_search_space(spec, 10, channels)
    return build_model(spec, num_classes=10, in_channels=channels)


def quartiles(v: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(v, n=4)
    return q[0], statistics.median(v), q[2]


def measure(spec: str, repeats: int) -> dict[str, tuple[float, float, float]]:
    batch, channels, size = INPUTS["darts" if spec.startswith("darts") else "timm"]
    x = torch.randn(batch, channels, size, size)
    y = torch.randint(0, 10, (batch,))
    plain = build(spec, channels).train()
    gm = granular.prepare(build(spec, channels), x[:2])
    with torch.no_grad():  # thresholds just below the gates, as after the min rule: every gate live
        for scope in gm.granular_gates.scopes.values():
            for name, p in scope.named_parameters():
                p.fill_(1e-4 if name == "t_omega" else 0.45)
    gated = training_graph(gm).train()
    nets = {"plain": (plain, True), "gated": (gated, True), "warm-up": (gated, False),
            "unfolded": (skip_pruned_ops(gm).train(), True)}
    arch = [p for p in gm.granular_gates.parameters()]

    def step(model, arch_grads):
        def run():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        def warmup():  # weights only: gates and thresholds need no gradient (the toggle is timed too)
            for p in arch:
                p.requires_grad_(False)
            run()
            for p in arch:
                p.requires_grad_(True)
        return run if arch_grads else warmup

    t = interleaved_samples({k: step(*m) for k, m in nets.items()}, repeats=repeats)
    out = {k: quartiles(v) for k, v in t.items()}
    for k in ("gated", "warm-up", "unfolded"):
        out[k + "/plain"] = quartiles([a / b for a, b in zip(t[k], t["plain"])])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", nargs="+", default=["darts:tiny", "timm:resnet18"])
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    header("gating overhead: training graph step / plain step")
    print("| model | input | plain ms | gated ms | gated / plain (IQR) | warm-up step / plain (IQR) "
          "| without fold_gates / plain (IQR) |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for spec in args.specs:
        r = measure(spec, args.repeats)
        b, c, s = INPUTS["darts" if spec.startswith("darts") else "timm"]
        g, w, u = r["gated/plain"], r["warm-up/plain"], r["unfolded/plain"]
        worst = max(worst, g[1])
        print(f"| {spec} | {b}x{c}x{s}x{s} | {r['plain'][1] * 1e3:.1f} | {r['gated'][1] * 1e3:.1f} | "
              f"{g[1]:.2f}x ({g[0]:.2f}-{g[2]:.2f}) | {w[1]:.2f}x ({w[0]:.2f}-{w[2]:.2f}) | "
              f"{u[1]:.2f}x ({u[0]:.2f}-{u[2]:.2f}) |", flush=True)
    print(f"\ngating overhead: worst median {worst:.2f}x (goal <= 1.30x on every model)")


if __name__ == "__main__":
    main()
