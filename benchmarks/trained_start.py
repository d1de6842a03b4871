"""No collapse: a search that starts from a trained CNN keeps its training accuracy.

Trains a ResNet-style CNN (``benchmarks/models/resnet20.py``) densely on Fashion-MNIST, saves
its state dict, then searches it to a fraction of its parameters with ``granular search
--weights`` and no warm-up. It prints the per-epoch log of the search (training accuracy,
validation accuracy, nonzero parameters, λ, the round's commit) beside the dense model's
accuracy, and the lowest training accuracy of the epochs before the count falls within 10%
of the target: a search that destroys the trained function shows there.

    python benchmarks/trained_start.py                        # resnet8, 10,000 images, 30% target
    python benchmarks/trained_start.py --model resnet20 --subset 60000 --target 0.1

Single-stage by default: a multi-stage search trains fresh auxiliary heads on the early
stages, whose accuracy says nothing about the trained model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from granular.cli import main as granular_main
from granular.data import load_data
from granular.spec import build_model

MODELS = Path(__file__).resolve().parent / "models" / "resnet20.py"


def train_dense(spec: str, data, epochs: int, lr: float, seed: int, *, quiet: bool = False
                ) -> tuple[torch.nn.Module, float, float]:
    """Build ``spec`` with ``seed`` and :func:`train` it; returns the model, its last epoch's
    running training accuracy and its validation accuracy."""
    torch.manual_seed(seed)
    model = build_model(spec, num_classes=10, in_channels=1)
    return (model, *train(model, data, epochs, lr, quiet=quiet))


def train(model: torch.nn.Module, data, epochs: int, lr: float, *, quiet: bool = False) -> tuple[float, float]:
    """SGD with momentum and a cosine schedule; returns the last epoch's running training
    accuracy and the validation accuracy."""
    steps = epochs * len(data.train_loader(0))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    train_acc = 0.0
    for epoch in range(epochs):
        model.train()
        correct = total = 0
        for x, y in data.train_loader(epoch):
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((out.argmax(1) == y).sum())
            total += y.numel()
        train_acc = correct / total
        if not quiet:
            print(f"dense epoch {epoch + 1}: train acc {train_acc:.3f}", flush=True)
    return train_acc, evaluate(model, data)


@torch.no_grad()
def evaluate(model, data) -> float:
    model.eval()
    correct = total = 0
    for x, y in data.val_loader():
        correct += int((model(x).argmax(1) == y).sum())
        total += y.numel()
    return correct / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet8", choices=("resnet8", "resnet20"))
    ap.add_argument("--subset", type=int, default=10000, help="training images (--train-subset)")
    ap.add_argument("--dense-epochs", type=int, default=8)
    ap.add_argument("--search-epochs", type=int, default=12)
    ap.add_argument("--target", type=float, default=0.3, help="fraction of the dense model's parameters")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/trained_start")
    ap.add_argument("--search-args", default="--single-stage", help="more `granular search` arguments")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = f"{MODELS}:{args.model}"
    data = load_data("fashion-mnist", batch_size=96, seed=args.seed, subset=args.subset)
    t0 = time.time()
    model, dense_train, dense_val = train_dense(spec, data, args.dense_epochs, 0.05, args.seed)
    torch.save(model.state_dict(), out / "dense.pt")
    n_dense = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    target = int(args.target * n_dense)
    print(f"# {args.model}: {n_dense:,} parameters, dense train acc {dense_train:.3f}, val {dense_val:.3f} "
          f"({time.time() - t0:.0f} s); search to {target:,} ({args.target:.0%})", flush=True)
    cmd = ["search", spec, "--dataset", "fashion-mnist", "--train-subset", str(args.subset), "--weights",
           str(out / "dense.pt"), "--target-params", str(target), "--epochs", str(args.search_epochs),
           "--warmup-epochs", "0", "--seed", str(args.seed), "--out", str(out / "search"), "--no-progress",
           *args.search_args.split()]
    print("# granular " + " ".join(cmd), flush=True)
    code = granular_main(cmd)
    rows = [json.loads(line) for line in (out / "search" / "metrics.jsonl").read_text().splitlines()]
    meta = json.loads((out / "search" / "model" / "granular.json").read_text())
    print("\n| epoch | train acc | val acc | nonzero params | λ | round |")
    print("|---|---|---|---|---|---|")
    print(f"| dense | {dense_train:.3f} | {dense_val:.3f} | {n_dense:,} | | |")
    for r in rows:
        print(f"| {r['epoch']} | {r['train_acc']:.3f} | {r['val_acc']:.3f} | {r['params']:,} | {r['lambda']:.2e} | "
              f"{r.get('commit', '')} |")
    before = [r["train_acc"] for r in rows if r["params"] > 1.1 * target]
    low = min(before) if before else float("nan")
    print(f"\nexit {code}; final {meta['nonzero_parameters']:,} / {target:,} nonzero, compact val acc "
          f"{meta['metadata']['val_accuracy']:.3f}; lowest train acc before the count is within 10% of the "
          f"target: {low:.3f} ({low - dense_train:+.3f} against the dense model's {dense_train:.3f})")


if __name__ == "__main__":
    main()
