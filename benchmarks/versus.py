"""Head to head: granular against what a user would do instead, on a trained CNN.

For each seed a ResNet-style CNN (``benchmarks/models/resnet20.py``) is trained densely on
Fashion-MNIST; then each method brings it to the same nonzero-parameter target (a fraction of
the dense model's parameters) on the same budget of extra epochs:

* ``granular``: ``granular search --weights`` (no warm-up, single-stage, at most
  ``--search-epochs``), then ``granular export --finetune`` for the epochs the search left;
* ``granular-op-filter``, ``granular-op-weight``, ``granular-filter`` and ``granular-op``:
  the same with fewer granularities (``--granularities``), the ablation;
* ``torch-pruning``: Torch-Pruning's ``MagnitudePruner`` (L2 channel magnitude, one ratio for
  every layer, the classifier kept) stepped until the count is at or under the target, then
  fine-tuned for the whole budget;
* ``magnitude``: global unstructured magnitude pruning of the conv and linear weights to the
  target, fine-tuned with the mask held;
* ``scaled``: the same network with every width scaled down to fit the target, trained from
  scratch for the dense epochs plus the budget (the compute the others had).

Every count is the nonzero parameters of the final plain module, by one counter for all
(:func:`nonzero`), and every method must end at or under its target. The peers fine-tune with
one recipe (SGD, momentum 0.9, cosine from ``--lr``); granular with its own ``export
--finetune`` defaults (the same SGD from the same lr 0.01, its BatchNorms back for the
fine-tune). It prints one line per run and a
table: mean ± std of test accuracy (the official 10,000 test images) and the nonzero count,
per method and target.

    pip install torch-pruning==1.6.0            # optional, for the torch-pruning rows
    python benchmarks/versus.py                 # resnet8, 10,000 images, targets 30% and 10%, seeds 0-2
    python benchmarks/versus.py --model resnet20 --subset 60000 --budget 12

Results are appended to ``OUT/results.jsonl``; ``--resume`` skips the runs already there.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from granular.cli import main as granular_main
from granular.data import load_data
from granular.io import load as load_saved
from granular.spec import build_model

from trained_start import MODELS, evaluate, train, train_dense
from _common import ResultLog

GRANULARITIES = {"granular": "op,filter,weight", "granular-op-filter": "op,filter", "granular-op-weight": "op,weight",
                 "granular-filter": "filter", "granular-op": "op"}
METHODS = (*GRANULARITIES, "torch-pruning", "magnitude", "scaled")


def nonzero(model: nn.Module) -> int:
    """The count every method is held to: nonzero entries of the module's parameters."""
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def finetune(model: nn.Module, data, epochs: int, lr: float, seed: int, hold_zeros: bool = False) -> nn.Module:
    """SGD with momentum and a cosine schedule; ``hold_zeros`` keeps the weights that are
    zero at the start at zero (unstructured pruning's mask)."""
    if epochs <= 0:
        return model
    torch.manual_seed(seed)
    zeros = {n: p == 0 for n, p in model.named_parameters() if p.dim() > 1} if hold_zeros else {}
    steps = epochs * len(data.train_loader(0))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for epoch in range(epochs):
        model.train()
        for x, y in data.train_loader(epoch):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if zeros:
                with torch.no_grad():
                    for n, z in zeros.items():
                        model.get_parameter(n).masked_fill_(z, 0.0)
    return model


def scaled_model(spec: str, width: float) -> nn.Module:
    """``spec``'s network (``benchmarks/models/resnet20.py``) with every width times ``width``."""
    import importlib.util
    path, _, name = spec.rpartition(":")
    loaded = importlib.util.spec_from_file_location("versus_models", path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return getattr(module, name)(num_classes=10, in_channels=1, width=width)


# ---------------------------------------------------------------------------- the methods
class Unreachable(Exception):
    """A method that cannot bring the model to the target (its row says so instead of a score)."""


def run_granular(method, ctx) -> tuple[nn.Module, dict]:
    out = ctx["dir"] / method
    shutil.rmtree(out, ignore_errors=True)
    code = granular_main(["search", ctx["spec"], "--dataset", "fashion-mnist", "--train-subset", str(ctx["subset"]),
                          "--weights", str(ctx["dense_path"]), "--target-params", str(ctx["target"]),
                          "--epochs", str(ctx["search_epochs"]), "--warmup-epochs", "0", "--seed", str(ctx["seed"]),
                          "--granularities", GRANULARITIES[method], "--single-stage", "--out", str(out),
                          "--no-progress", *ctx["granular_args"]])
    if not (out / "model").is_dir():   # refused (a target below what these granularities reach) or failed
        raise Unreachable(f"granular search exited {code} without a model")
    used = len((out / "metrics.jsonl").read_text().splitlines())
    left = ctx["budget"] - used
    model_dir = out / "model"
    if left > 0:
        granular_main(["export", str(out), "--finetune", "--epochs", str(left), "--seed", str(ctx["seed"]),
                       "--no-progress", *ctx["export_args"]])
        model_dir = out / "finetune" / "model"
    return load_saved(model_dir), {"search_exit": code, "search_epochs": used, "finetune_epochs": max(left, 0)}


def run_torch_pruning(method, ctx) -> tuple[nn.Module, dict]:
    import torch_pruning as tp
    model = ctx["dense"]()
    example = ctx["data"].example_input()
    steps = 200
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=0.99, iterative_steps=steps, ignored_layers=[model.fc])
    for i in range(steps):
        if nonzero(model) <= ctx["target"]:
            break
        pruner.step()
    finetune(model, ctx["data"], ctx["budget"], ctx["lr"], ctx["seed"])
    return model, {"pruner_steps": i}


def run_magnitude(method, ctx) -> tuple[nn.Module, dict]:
    from torch.nn.utils import prune
    model = ctx["dense"]()
    layers = [(m, "weight") for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    excess = nonzero(model) - ctx["target"]
    prune.global_unstructured(layers, pruning_method=prune.L1Unstructured, amount=int(excess))
    for m, name in layers:
        prune.remove(m, name)  # zeros in the weight; the fine-tune holds them
    finetune(model, ctx["data"], ctx["budget"], ctx["lr"], ctx["seed"], hold_zeros=True)
    return model, {}


def run_scaled(method, ctx) -> tuple[nn.Module, dict]:
    def size(w):
        return sum(p.numel() for p in scaled_model(ctx["spec"], w).parameters())
    lo, hi = 0.02, 1.0  # the widest net whose every parameter fits the target
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if size(mid) <= ctx["target"] else (lo, mid)
    epochs = ctx["dense_epochs"] + ctx["budget"]
    torch.manual_seed(ctx["seed"])
    model = scaled_model(ctx["spec"], lo)
    train(model, ctx["data"], epochs, 0.05, quiet=True)
    return model, {"width": round(lo, 4), "epochs": epochs}


RUNNERS = {**{m: run_granular for m in GRANULARITIES},
           "torch-pruning": run_torch_pruning, "magnitude": run_magnitude, "scaled": run_scaled}


# ---------------------------------------------------------------------------- the driver
def dense_model(args, seed: int, data, root: Path) -> tuple[Path, dict]:
    """The seed's trained dense model (trained once, kept in ``root``)."""
    path, info_path = root / f"dense-seed{seed}.pt", root / f"dense-seed{seed}.json"
    if path.is_file() and info_path.is_file():
        return path, json.loads(info_path.read_text())
    model, train_acc, val = train_dense(f"{MODELS}:{args.model}", data, args.dense_epochs, 0.05, seed, quiet=True)
    torch.save(model.state_dict(), path)
    info = {"train_acc": train_acc, "val_acc": val, "params": nonzero(model)}
    info_path.write_text(json.dumps(info))
    return path, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet8", choices=("resnet8", "resnet20"))
    ap.add_argument("--subset", type=int, default=10000, help="training images")
    ap.add_argument("--dense-epochs", type=int, default=8)
    ap.add_argument("--budget", type=int, default=12, help="extra epochs every method gets after dense training")
    ap.add_argument("--search-epochs", type=int, default=8, help="the most of the budget granular's search may use")
    ap.add_argument("--lr", type=float, default=0.01, help="fine-tuning learning rate (cosine to 0)")
    ap.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.1])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--out", default="runs/versus")
    ap.add_argument("--granular-args", default="", help="extra `granular search` options, one string "
                    "(an ablation: --granular-args='--live-cap 0.5')")
    ap.add_argument("--export-args", default="", help="extra `granular export --finetune` options, one string "
                    "(e.g. --export-args='--lr 0.002')")
    ap.add_argument("--resume", action="store_true", help="skip the runs already in OUT/results.jsonl")
    args = ap.parse_args()
    if args.search_epochs > args.budget:
        ap.error("--search-epochs must be at most --budget")
    if "torch-pruning" in args.methods:
        try:
            import torch_pruning  # noqa: F401
        except ImportError:
            ap.error("the torch-pruning rows need Torch-Pruning: pip install torch-pruning==1.6.0 "
                     "(or leave it out of --methods)")
    root = Path(args.out)
    log = ResultLog(root, ("method", "target_fraction", "seed"), args.resume)
    spec = f"{MODELS}:{args.model}"
    print(f"# versus: {args.model} on {args.subset:,} Fashion-MNIST images, dense {args.dense_epochs} epochs, "
          f"budget {args.budget} extra epochs (granular: search at most {args.search_epochs}, then export "
          f"--finetune {args.export_args or 'at its default lr'}"
          f"{', search options ' + args.granular_args if args.granular_args else ''}; "
          f"peers fine-tune at lr {args.lr}); torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    results, dense_acc = [], []
    for seed in args.seeds:
        data = load_data("fashion-mnist", batch_size=96, seed=seed, subset=args.subset)
        path, info = dense_model(args, seed, data, root)
        dense_acc.append(info["val_acc"])
        print(f"seed {seed}: dense {info['params']:,} parameters, val {info['val_acc']:.3f}", flush=True)

        def dense(path=path):
            m = build_model(spec, num_classes=10, in_channels=1)
            m.load_state_dict(torch.load(path, map_location="cpu"))
            return m
        for frac in args.targets:
            target = int(frac * info["params"])
            for method in args.methods:
                r = log.get(method, frac, seed)
                if r is None:
                    ctx = {"spec": spec, "data": data, "dense": dense, "dense_path": path, "target": target,
                           "seed": seed, "subset": args.subset, "budget": args.budget, "lr": args.lr,
                           "search_epochs": args.search_epochs, "granular_args": shlex.split(args.granular_args),
                           "export_args": shlex.split(args.export_args),
                           "dense_epochs": args.dense_epochs,
                           "dir": root / f"seed{seed}-{frac:g}"}
                    t0 = time.time()
                    try:
                        model, extra = RUNNERS[method](method, ctx)
                    except Unreachable as err:
                        r = log.add({"method": method, "target_fraction": frac, "seed": seed, "target": target,
                                     "unreachable": str(err)})
                    else:
                        r = {"method": method, "target_fraction": frac, "seed": seed, "target": target,
                             "params": nonzero(model), "val_acc": evaluate(model, data),
                             "seconds": round(time.time() - t0, 1), **extra}
                        r["within"] = r["params"] <= target
                        log.add(r)
                results.append(r)
                if "unreachable" in r:
                    print(f"{method:18s} {frac:>4.0%} seed {seed}: cannot reach {target:,} ({r['unreachable']})")
                    continue
                print(f"{method:18s} {frac:>4.0%} seed {seed}: {r['params']:,} / {r['target']:,} nonzero"
                      f"{'' if r['within'] else ' (OVER THE TARGET)'}, val {r['val_acc']:.3f}, {r['seconds']:.0f} s",
                      flush=True)
    sd = statistics.stdev(dense_acc) if len(dense_acc) > 1 else 0.0
    print(f"\ndense: {100 * statistics.mean(dense_acc):.1f} ± {100 * sd:.1f}% ({len(dense_acc)} seeds)\n")
    print("| method | " + " | ".join(f"{f:.0%} target: accuracy | nonzero" for f in args.targets) + " |")
    print("|---|" + "---|---|" * len(args.targets))
    for method in args.methods:
        cells = []
        for frac in args.targets:
            rs = [r for r in results if r["method"] == method and r["target_fraction"] == frac]
            if any("unreachable" in r for r in rs):
                cells.append(f"cannot reach the target | {rs[0]['target']:,}")
                continue
            acc = [r["val_acc"] for r in rs]
            s = statistics.stdev(acc) if len(acc) > 1 else 0.0
            over = sum(not r["within"] for r in rs)
            cells.append(f"{100 * statistics.mean(acc):.1f} ± {100 * s:.1f}% | "
                         f"{statistics.mean(r['params'] for r in rs):,.0f} / {rs[0]['target']:,}"
                         + (f" ({over} over)" if over else ""))
        print(f"| {method} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
