"""Fused masked conv against the eager gated conv and cuDNN (``docs/kernels.md``, "Benchmark protocol").

For each layer shape and kept fraction f of input and output channels (the same f for both;
the rest are hard-pruned: stored masks 0), it times forward, backward and forward+backward of

  (a) eager:   the eager gated conv, op_gate(filter_gate(conv2d(x, weight_mask(w)))), as the
               gated graph runs it;
  (b) compile: torch.compile of (a);
  (c) dense:   cuDNN conv2d(x, w) on the full layer;
  (d) sliced:  cuDNN conv2d on physically sliced x and w, the ideal for the kept work;
  (e) fused:   granular's GatedConv2d (the module fuse_kernels inserts) on the Triton op,

with ``triton.testing.do_bench`` (median), the peak memory of forward+backward, and the max
error of (e) against (a). It prints the goal ratios side by side: (e)/(a) at f = 1 (goal
<= 1), (a)/(e) at f = 0.5 (goal >= 2), (e)/(d) (goal <= 1.3 where not launch-bound). Then one
training step of a DARTS super-net, eager against fused (goal: fused faster).

    python benchmarks/kernels.py                       # on a CUDA device
    TRITON_INTERPRET=1 python benchmarks/kernels.py --tiny   # CPU: tiny shapes, checks it runs

Under the interpreter the times measure triton's CPU simulator, not a GPU: ``--tiny`` is a
readiness check of every path (and prints errors), not a performance figure.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import granular
from granular.gates import FilterGate, OpGate, WeightMask
from granular.kernels import interpreting, kernels_available
from granular.kernels.module import GatedConv2d

# name: (N, C_in, C_out, H, kernel, stride, depthwise)
SHAPES = {
    "darts-pw16@32": (64, 16, 16, 32, 1, 1, False),
    "darts-dw16@32": (64, 16, 16, 32, 3, 1, True),
    "darts-pw64@8": (64, 64, 64, 8, 1, 1, False),
    "mobile-dw96@56": (128, 96, 96, 56, 3, 1, True),
    "mobile-pw96-24@56": (128, 96, 24, 56, 1, 1, False),
    "resnet-3x3-64@56": (128, 64, 64, 56, 3, 1, False),
    "resnet-3x3-256@14": (128, 256, 256, 14, 3, 1, False),
}
TINY = {
    "tiny-pw": (2, 8, 8, 6, 1, 1, False),
    "tiny-dw": (2, 8, 8, 6, 3, 1, True),
    "tiny-3x3-s2": (2, 8, 8, 6, 3, 2, False),
}
KEEP = (1.0, 0.75, 0.5, 0.25, 0.1)


class Layer:
    """One gated conv with hard-pruned channels, in the eager and the fused form."""

    def __init__(self, shape, keep: float, device, dtype, seed=0):
        n, cin, cout, h, k, stride, dw = shape
        g = torch.Generator().manual_seed(seed)
        self.conv = dict(stride=(stride,) * 2, padding=(k // 2,) * 2, dilation=(1, 1), groups=cin if dw else 1)
        self.x = torch.randn(n, cin, h, h, generator=g).to(device, dtype)
        self.w = (torch.randn(cout, 1 if dw else cin, k, k, generator=g) * 0.3).to(device, dtype).requires_grad_()
        kept_out = torch.randperm(cout, generator=g)[:max(1, round(keep * cout))]
        kept_in = kept_out if dw else torch.randperm(cin, generator=g)[:max(1, round(keep * cin))]
        self.up = torch.zeros(cin, device=device)          # the mask of the gate that produced x
        self.up[kept_in] = 1
        self.x = (self.x * self.up.view(1, -1, 1, 1).to(dtype)).requires_grad_()
        self.wm = WeightMask(self.w.shape).to(device).train()
        self.wm.mask.copy_((torch.rand(self.w.shape, generator=g) > 0.3).float())
        self.fg, self.og = FilterGate(cout).to(device).train(), OpGate().to(device).train()
        self.fg.mask.zero_()
        self.fg.mask[kept_out.to(device)] = 1
        with torch.no_grad():
            self.fg.beta.normal_(2.0, 0.5)
            self.og.alpha.fill_(1.5)
        self.t = {k: torch.tensor(v, device=device, requires_grad=True)
                  for k, v in (("omega", 0.01), ("beta", 0.2), ("alpha", 0.2))}
        self.fused = GatedConv2d(self.conv["stride"], self.conv["padding"], self.conv["dilation"], self.conv["groups"],
                                 ("filter", "op"), use_kernel=True).train()
        self.xs = self.x.detach()[:, kept_in.to(device)].contiguous().requires_grad_()
        ws = self.w.detach()[kept_out.to(device)]
        self.ws = (ws if dw else ws[:, kept_in.to(device)]).contiguous().requires_grad_()
        self.sliced_groups = len(kept_out) if dw else 1
        self.inputs = [self.x, self.w, self.fg.beta, self.og.alpha, *self.t.values()]

    def eager(self):
        z = F.conv2d(self.x, self.wm(self.w, self.t["omega"]), None, **self.conv)
        return self.og(self.fg(z, self.t["beta"]), self.t["alpha"])

    def fused_call(self):
        gates = [(self.fg.beta, self.t["beta"], self.fg.mask), (self.og.alpha, self.t["alpha"], self.og.mask)]
        return self.fused(self.x, self.w, None, self.t["omega"], self.wm.mask, gates, [], [[self.up]])

    def dense(self):
        return F.conv2d(self.x, self.w, None, **self.conv)

    def sliced(self):
        return F.conv2d(self.xs, self.ws, None, self.conv["stride"], self.conv["padding"], self.conv["dilation"],
                        self.sliced_groups)

    def grads_of(self, name):
        return [self.xs, self.ws] if name == "sliced" else [self.x, self.w] if name == "dense" else self.inputs


def _timer(device):
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]

    def cpu(fn, reps=1):
        fn()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3
    return cpu


def _peak(device, fn) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_layer(name, shape, keep, device, dtype, timer, compile_):
    layer = Layer(shape, keep, device, dtype)
    variants = {"eager": layer.eager, "dense": layer.dense, "sliced": layer.sliced, "fused": layer.fused_call}
    compile_s = float("nan")
    if compile_:
        fn = torch.compile(layer.eager, mode="max-autotune-no-cudagraphs")
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        variants["compile"] = fn
    ref = layer.eager().detach()
    err = ((layer.fused_call().detach().float() - ref.float()).abs().max() / (ref.float().abs().max() + 1e-12)).item()
    dy = torch.randn_like(ref)
    row = {"shape": name, "keep": keep, "err": err, "compile_s": compile_s}
    for vname, fn in variants.items():
        ins = layer.grads_of(vname)
        out = fn()
        d = dy if out.shape == dy.shape else torch.randn_like(out)
        row[f"{vname}_fwd"] = timer(fn)
        row[f"{vname}_bwd"] = timer(lambda: torch.autograd.grad(out, ins, d, retain_graph=True, allow_unused=True))
        row[f"{vname}_fb"] = timer(lambda: torch.autograd.grad(fn(), ins, d, allow_unused=True))
        row[f"{vname}_mib"] = _peak(device, lambda: torch.autograd.grad(fn(), ins, d, allow_unused=True))
    return row


def bench_step(device, dtype, timer, tiny: bool, prune: float):
    """One super-net training step (forward + backward), eager live graph against fused."""
    from granular.passes.fuse_kernels import fuse_kernels
    from granular.passes.skip_pruned_ops import skip_pruned_ops
    from granular.search_spaces.darts import DartsSearchNet

    torch.manual_seed(0)
    if tiny:
        net, x = DartsSearchNet(10, 3, C=4, cells=1, nodes=2), torch.randn(2, 3, 8, 8)
    else:
        net, x = DartsSearchNet(10, 3, C=16, cells=5, nodes=4), torch.randn(64, 3, 32, 32)
    gm = granular.prepare(net, x)
    if prune:
        granular.testing.random_masks_(gm, op=prune / 2, filter=prune, weight=prune, seed=1)
    gm.to(device)
    x, y = x.to(device), torch.randint(0, 10, (x.shape[0],), device=device)
    eager = skip_pruned_ops(gm).train()
    fused = fuse_kernels(skip_pruned_ops(gm), enabled=True, use_kernel=True).train()

    def step(net):
        return lambda: F.cross_entropy(net(x), y).backward()
    times = {"eager": timer(step(eager)), "fused": timer(step(fused))}
    return {"prune": prune, **times, "speedup": times["eager"] / times["fused"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU interpreter readiness check)")
    ap.add_argument("--shape", action="append", help="only these shapes (repeatable)")
    ap.add_argument("--keep", type=float, action="append", help="kept fractions (default 1 .75 .5 .25 .1)")
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    ap.add_argument("--no-compile", action="store_true", help="skip (b), torch.compile of the eager conv")
    ap.add_argument("--no-step", action="store_true", help="skip the super-net training step")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not kernels_available(device):
        raise SystemExit("error: no CUDA device and TRITON_INTERPRET is not 1: the Triton kernels cannot run here; "
                         "run on a GPU, or with TRITON_INTERPRET=1 and --tiny")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    shapes = TINY if args.tiny else SHAPES
    shapes = {k: v for k, v in shapes.items() if not args.shape or k in args.shape}
    keeps = args.keep or ((1.0, 0.5) if args.tiny else KEEP)
    timer = _timer(device)
    compile_ = device.type == "cuda" and not args.no_compile
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name()
        print(f"# kernels on {name}, torch {torch.__version__}, {args.dtype}, cudnn.benchmark, do_bench median ms")
    else:
        print(f"# kernels under TRITON_INTERPRET=1 on CPU, torch {torch.__version__}: a readiness check; "
              "times are the interpreter's, not a GPU's")
    rows = []
    cols = ["eager", "compile", "dense", "sliced", "fused"] if compile_ else ["eager", "dense", "sliced", "fused"]
    print("| shape | keep | " + " | ".join(f"{c} f/b/fb ms" for c in cols)
          + " | fused/eager fb | fused/sliced fb | peak MiB eager/fused | max rel err |")
    print("|" + "---|" * (len(cols) + 6))
    for name, shape in shapes.items():
        for keep in keeps:
            r = bench_layer(name, shape, keep, device, dtype, timer, compile_)
            rows.append(r)
            cells = " | ".join(f"{r[c + '_fwd']:.3f}/{r[c + '_bwd']:.3f}/{r[c + '_fb']:.3f}" for c in cols)
            print(f"| {name} | {keep} | {cells} | {r['fused_fb'] / r['eager_fb']:.2f} | "
                  f"{r['fused_fb'] / r['sliced_fb']:.2f} | {r['eager_mib']:.1f}/{r['fused_mib']:.1f} | "
                  f"{r['err']:.1e} |", flush=True)
    print("\n## goals")
    for name in shapes:
        by = {r["keep"]: r for r in rows if r["shape"] == name}
        parts = []
        if 1.0 in by:
            parts.append(f"fused/eager at full width {by[1.0]['fused_fb'] / by[1.0]['eager_fb']:.2f} (goal <= 1)")
        if 0.5 in by:
            parts.append(f"eager/fused at half {by[0.5]['eager_fb'] / by[0.5]['fused_fb']:.2f}x (goal >= 2)")
            parts.append(f"fused/sliced at half {by[0.5]['fused_fb'] / by[0.5]['sliced_fb']:.2f} (goal <= 1.3)")
        print(f"- {name}: " + "; ".join(parts))
    steps = []
    if not args.no_step:
        print("\n## super-net training step (DARTS " + ("C=4, 1 cell, batch 2 at 8x8" if args.tiny else
              "C=16, 5 cells, batch 64 at 32x32") + ")")
        for prune in (0.0, 0.5):
            s = bench_step(device, torch.float32, timer, args.tiny, prune)
            steps.append(s)
            print(f"- pruned {prune:.0%}: eager {s['eager']:.2f} ms, fused {s['fused']:.2f} ms, "
                  f"eager/fused {s['speedup']:.2f}x (goal > 1)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "interpreter": interpreting(), "layers": rows, "steps": steps}, f, indent=1)


if __name__ == "__main__":
    main()
