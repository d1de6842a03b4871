"""``granular retrain RUN_DIR``: train the discovered architecture, as the paper evaluates it.

The search ends with a gated graph whose export is exact: BatchNorms and gates folded into
the layers, pruned weights stored as zeros. Retraining needs the *architecture*, not that
function:

1. **Architecture.** ``exact`` is the exported model. ``aligned`` (METHOD.md, "Filter
   alignment") first sets every cell (DARTS) or layer (MobileNet) to one width per role,
   chosen as the mean kept width if at least half the full width, else the max if at least
   half, else half; then exports.
2. **From scratch** (the default): every layer is re-initialised, fresh BatchNorms go back
   where the search graph had them (export folded them away), and the weights the search
   pruned stay zero (a fixed mask re-applied after each step), so the dense and nonzero
   counts are the searched ones. ``--finetune`` instead starts from the searched weights and
   keeps the exported function as it is (no new norms).
3. **Recipe.** SGD with momentum and a cosine schedule, weight decay, label smoothing, the
   data set's augmentation (Cutout and AutoAugment for CIFAR, from torchvision), and
   optionally an auxiliary head (at the last resolution change) and drop-path on op branches.

It reports top-1 and top-5 accuracy, dense and nonzero parameters and accuracy density
(top-1 % per million parameters, the paper's metric), and writes ``RUN_DIR/retrain[-aligned]``:
``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` (atomic, every epoch; ``--resume``),
``result.json`` and ``model/`` (plain PyTorch, as ``granular.load`` reads it).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import operator
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.fx as fx
from rich.console import Console
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from granular.config import GranularConfig
from granular.errors import CheckpointError, GranularError
from granular.gates import GATE_ROOT
from granular.meta import LAYER, OP_UNIT
from granular.passes.skip_pruned_ops import share_graph
from granular.search import _atomic_torch_save
from granular.search_spaces import describe_op

__all__ = ["RetrainConfig", "aligned_", "restore_norms", "train_compact", "run_retrain", "accuracy_density"]

CHECKPOINT = "checkpoint.pt"


@dataclass
class RetrainConfig(GranularConfig):
    """How to retrain a discovered architecture.

    Args:
        arch: ``"exact"`` (the exported model) or ``"aligned"`` (METHOD.md's cell widths).
        finetune: start from the searched weights instead of re-initialising.
        epochs: training epochs.
        batch_size: samples per batch.
        lr: initial learning rate (cosine to 0).
        momentum, weight_decay: SGD settings.
        label_smoothing: cross-entropy label smoothing.
        grad_clip: gradient-norm clip (0: none).
        aux_weight: weight of the auxiliary head's loss (0: no head).
        drop_path: drop-path probability on op branches, ramped linearly over the epochs (0: none).
        augment: the data set's training augmentation (Cutout + AutoAugment for CIFAR).
        seed: random seed.
    """

    arch: str = "exact"
    finetune: bool = False
    epochs: int = 50
    batch_size: int = 96
    lr: float = 0.025
    momentum: float = 0.9
    weight_decay: float = 3e-4
    label_smoothing: float = 0.0
    grad_clip: float = 5.0
    aux_weight: float = 0.0
    drop_path: float = 0.0
    augment: bool = False
    seed: int = 0

    def __post_init__(self):
        self._check(self.arch in ("exact", "aligned"), "arch must be 'exact' or 'aligned'")
        self._check(self.epochs >= 1, "epochs must be at least 1")
        self._check(self.batch_size >= 1, "batch_size must be at least 1")
        self._check(self.lr > 0, "lr must be positive")
        self._check(0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)")
        self._check(self.aux_weight >= 0, "aux_weight must be non-negative")
        self._check(0 <= self.drop_path < 1, "drop_path must be in [0, 1)")


def accuracy_density(top1: float, nonzero: int) -> float:
    """The paper's accuracy density: top-1 accuracy in % per million (nonzero) parameters."""
    return 100.0 * top1 / max(nonzero / 1e6, 1e-12)


# ------------------------------------------------------------------ architecture

def _alignment_width(widths: list[int], full: int) -> int:
    """METHOD.md's rule: the mean width if >= full/2, else the max if >= full/2, else full/2."""
    half = max(1, math.ceil(full / 2))
    mean = round(sum(widths) / len(widths))
    if mean >= half:
        return mean
    return max(widths) if max(widths) >= half else half


def aligned_(gm: fx.GraphModule) -> dict[str, Any]:
    """Align ``gm``'s filter masks in place: per cell and role, one width and one channel set.

    A cell is a DARTS cell or a MobileNet layer (``search_spaces.describe_op``). Within it,
    the kept ops' layers are grouped by role: the op's last gated layer (its channels join
    the node's sum) and its inner layers (by position). Each group gets one width from
    :func:`_alignment_width`; the channels kept are those with the largest summed gate value
    σ(β) over the group, the same set for every layer of the group, so the node's width is
    that width. Returns ``{cell: {role: width}}``.

    Raises:
        GranularError: the model is not a cell-structured search space.
    """
    bank = getattr(gm, GATE_ROOT)
    cells: dict[int, dict[str, list[str]]] = {}
    for n in gm.graph.nodes:
        unit = n.meta.get(OP_UNIT)
        if unit is None or float(bank.op[unit.id].mask) == 0:
            continue
        desc = describe_op(unit.path)
        if desc is None:
            continue
        gates = [k for k in _op_filter_gates(gm, unit.id) if k in bank.filter]
        for pos, key in enumerate(reversed(gates)):
            role = "out" if pos == 0 else f"inner{pos}"
            cells.setdefault(desc["cell"], {}).setdefault(role, []).append(key)
    if not cells:
        raise GranularError("--arch aligned needs a cell-structured search space (darts, mobilenet); "
                            "use --arch exact for this model")
    widths: dict[str, dict[str, int]] = {}
    for cell, roles in sorted(cells.items()):
        for role, keys in roles.items():
            by_size: dict[int, list[str]] = {}
            for k in keys:   # roles of different full widths (e.g. MobileNet hidden sizes) align apart
                by_size.setdefault(bank.filter[k].mask.numel(), []).append(k)
            for full, group in by_size.items():
                kept = [int(bank.filter[k].mask.sum()) for k in group]
                w = _alignment_width(kept, full)
                score = sum(torch.sigmoid(bank.filter[k].beta.detach()) * bank.filter[k].mask for k in group)
                keep = torch.zeros(full)
                keep[torch.argsort(score, descending=True, stable=True)[:w]] = 1
                for k in group:
                    bank.filter[k].mask.copy_(keep)
                widths.setdefault(str(cell), {})[role if len(by_size) == 1 else f"{role}@{full}"] = w
    return widths


def _op_filter_gates(gm: fx.GraphModule, unit_id: str) -> list[str]:
    """The filter-gate keys of one op unit's layers, in graph order."""
    from granular.passes.find_units import sanitize

    out = []
    for n in gm.graph.nodes:
        info = n.meta.get(LAYER)
        if info is not None and info.scope == unit_id and info.filter_gate:
            out.append(sanitize(info.module))
    return out


def restore_norms(compact: fx.GraphModule, gm: fx.GraphModule) -> int:
    """Put a fresh BatchNorm after each layer of ``compact`` whose layer in ``gm`` (the gated
    graph it was exported from) fed a BatchNorm, which export folded away. In place; returns
    how many. For training from scratch: a folded norm is a fixed affine map, not a norm."""
    norms: dict[str, tuple[str, nn.Module]] = {}   # layer path -> (norm path, norm)
    for n in gm.graph.nodes:
        info = n.meta.get(LAYER)
        if info is None or len(n.users) != 1:
            continue
        user = next(iter(n.users))
        if user.op == "call_module" and isinstance(gm.get_submodule(str(user.target)), nn.modules.batchnorm._BatchNorm):
            norms[info.module] = (str(user.target), gm.get_submodule(str(user.target)))
    count = 0
    graph = compact.graph
    for n in list(graph.nodes):
        if n.op != "call_module" or str(n.target) not in norms:
            continue
        path, old = norms[str(n.target)]
        layer = compact.get_submodule(str(n.target))
        width = layer.out_channels if hasattr(layer, "out_channels") else layer.out_features
        if getattr(layer, "bias", None) is not None:   # export's folded shift; redundant before a norm
            layer.register_parameter("bias", None)
        bn = type(old)(width, eps=old.eps, momentum=old.momentum, affine=old.affine,
                       track_running_stats=old.track_running_stats)
        name = f"retrain_norms.{path.replace('.', '_')}"
        if not hasattr(compact, "retrain_norms"):
            compact.add_module("retrain_norms", nn.Module())
        compact.get_submodule("retrain_norms").add_module(path.replace(".", "_"), bn)
        with graph.inserting_after(n):
            new = graph.call_module(name, (n,))
        n.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        count += 1
    graph.lint()
    compact.recompile()
    return count


# ------------------------------------------------------------------ training graph

class DropPath(nn.Module):
    """Zero a whole sample's branch with probability ``p`` in training (scaled by 1/(1-p))."""

    def __init__(self):
        super().__init__()
        self.p = 0.0

    def forward(self, x):
        if not self.training or self.p <= 0:
            return x
        keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= self.p
        return x * keep.to(x.dtype) / (1 - self.p)


def _branches(graph: fx.Graph) -> list[tuple[fx.Node, int]]:
    """Op branches joining sums: an input of an ``add`` that nothing else reads and that is not
    itself a sum (identity and residual inputs are read elsewhere too)."""
    out = []
    for n in graph.nodes:
        if n.op != "call_function" or n.target not in (operator.add, torch.add) or len(n.args) != 2:
            continue
        for i, a in enumerate(n.args):
            if isinstance(a, fx.Node) and len(a.users) == 1 and a.op != "placeholder" and not (
                    a.op == "call_function" and a.target in (operator.add, torch.add)):
                out.append((n, i))
    return out


def training_graph(compact: fx.GraphModule, example: torch.Tensor, num_classes: int,
                   cfg: RetrainConfig) -> tuple[fx.GraphModule, list[DropPath]]:
    """A GraphModule sharing ``compact``'s modules that adds drop-path on op branches and, with
    ``aux_weight``, an auxiliary head at the last resolution change; it returns
    ``(logits, aux_logits or None)``. ``compact`` itself stays plain (what is saved)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(compact.graph, env)
    extra: dict[str, nn.Module] = {}
    drops: list[DropPath] = []
    if cfg.drop_path > 0:
        root = nn.Module()
        for add, i in _branches(graph):
            name = f"b{len(drops)}"
            drops.append(DropPath())
            root.add_module(name, drops[-1])
            with graph.inserting_before(add):
                d = graph.call_module(f"drop_path.{name}", (add.args[i],))
            add.update_arg(i, d)
        extra["drop_path"] = root
    aux = None
    if cfg.aux_weight > 0:
        boundary = _aux_boundary(compact, example)
        if boundary is not None:
            from granular.heads import aux_head_for

            c, h, w = boundary.meta["tensor_meta"].shape[1:]
            dense = sum(p.numel() for p in compact.parameters())
            extra["aux_head"] = aux_head_for(c, (h, w), num_classes, 1, dense, 0.1)
            aux = graph.call_module("aux_head", (env[boundary],))
    graph.output((out, aux))
    return share_graph(compact, graph, extra, class_name="RetrainGraph"), drops


def _aux_boundary(compact: fx.GraphModule, example: torch.Tensor) -> Optional[fx.Node]:
    """The last 4-d feature map before the last resolution change (DARTS: 2/3 depth)."""
    was = compact.training
    compact.eval()   # shape propagation must not move BatchNorm statistics
    with torch.no_grad():
        ShapeProp(compact).propagate(example)
    compact.train(was)
    maps = [n for n in compact.graph.nodes if n.op != "get_attr" and hasattr(n.meta.get("tensor_meta"), "shape")
            and len(n.meta["tensor_meta"].shape) == 4]
    sizes = [tuple(n.meta["tensor_meta"].shape[2:]) for n in maps]
    changes = [i for i in range(1, len(maps)) if sizes[i][0] < sizes[i - 1][0]]
    return maps[changes[-1] - 1] if changes else None


# ------------------------------------------------------------------ training

def _topk(logits: torch.Tensor, y: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == y[:, None]).any(1).sum())


def evaluate(model: nn.Module, loader, device) -> dict[str, float]:
    """Top-1 and top-5 accuracy of ``model`` (logits, or ``(logits, aux)``) over ``loader``."""
    was = model.training
    model.eval()
    top1 = top5 = total = 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)
            logits = out[0] if isinstance(out, tuple) else out
            top1 += _topk(logits, y, 1)
            top5 += _topk(logits, y, 5)
            total += len(y)
    model.train(was)
    return {"top1": top1 / max(total, 1), "top5": top5 / max(total, 1)}


def train_compact(compact: fx.GraphModule, data, cfg: RetrainConfig, *, out_dir: Optional[Path] = None,
                  device: str = "cpu", progress: bool = True, resume: bool = False,
                  console: Optional[Console] = None) -> dict[str, Any]:
    """Train ``compact`` (in place) with the retrain recipe; returns the final metrics.

    Weights that are exactly zero at the start stay zero (the searched weight sparsity). With
    ``out_dir``, writes ``metrics.jsonl`` and an atomic ``checkpoint.pt`` every epoch, and
    ``resume`` continues from that checkpoint.
    """
    console = console or Console(stderr=True)
    torch.manual_seed(cfg.seed)
    compact.to(device)
    fixed = [(p, p != 0) for p in compact.parameters() if p.dim() > 1 and bool((p == 0).any())]
    net, drops = training_graph(compact, data.example_input().to(device), data.num_classes, cfg)
    net.to(device)
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs)
    history: list[dict] = []
    start = 0
    ckpt_path = out_dir / CHECKPOINT if out_dir else None
    if resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise CheckpointError(f"nothing to resume: no {CHECKPOINT} in {out_dir}; run without --resume")
        try:
            state = torch.load(ckpt_path, map_location=device, weights_only=False)
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"{ckpt_path} cannot be loaded ({type(err).__name__}): delete it and "
                                  f"retrain without --resume") from err
        start, history = state["epoch"], state["history"]
        torch.set_rng_state(state["rng"])
        # the log holds exactly the checkpointed epochs (a kill between the two writes loses nothing)
        (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        for d in drops:
            d.p = cfg.drop_path * epoch / cfg.epochs
        net.train()
        seen = correct = 0
        loss_sum = 0.0
        for x, y in data.train_loader(epoch):
            x, y = x.to(device), y.to(device)
            logits, aux = net(x)
            loss = loss_fn(logits, y)
            if aux is not None:
                loss = loss + cfg.aux_weight * loss_fn(aux, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p, m in fixed:   # pruned weights get no gradient: it would only feed the clip's norm
                if p.grad is not None:
                    p.grad.mul_(m)
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            with torch.no_grad():   # and stay exactly zero (weight decay and momentum would move them)
                for p, m in fixed:
                    p.mul_(m)
            seen += len(y)
            correct += _topk(logits.detach(), y, 1)
            loss_sum += float(loss.detach()) * len(y)
        sched.step()
        val = evaluate(compact, data.val_loader(), device)
        row = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
               "val_top1": val["top1"], "val_top5": val["top5"], "lr": sched.get_last_lr()[0],
               "drop_path": drops[0].p if drops else 0.0, "seconds": round(time.time() - t0, 2)}
        history.append(row)
        if out_dir is not None:
            with open(out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            _atomic_torch_save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "epoch": epoch + 1, "history": history, "rng": torch.get_rng_state()}, ckpt_path)
        if progress:
            console.print(f"retrain epoch {epoch + 1:>3}/{cfg.epochs} loss {row['loss']:.3f} "
                          f"train {row['train_acc']:.1%} val top-1 {row['val_top1']:.2%} top-5 {row['val_top5']:.2%}",
                          highlight=False)
    final = evaluate(compact, data.val_loader(), device)
    dense = sum(p.numel() for p in compact.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in compact.parameters())
    return {"top1": final["top1"], "top5": final["top5"], "params": dense, "nonzero": nonzero,
            "accuracy_density": accuracy_density(final["top1"], nonzero), "epochs": cfg.epochs,
            "history": history}


def build_retrain_model(gm: fx.GraphModule, cfg: RetrainConfig) -> tuple[fx.GraphModule, dict]:
    """The compact model to train: exported from ``gm`` (aligned first if asked), then, unless
    fine-tuning, re-initialised with fresh BatchNorms and the searched weight zeros kept."""
    from granular.accounting import export

    info: dict[str, Any] = {"arch": cfg.arch}
    if cfg.arch == "aligned":
        gm = copy.deepcopy(gm)
        info["aligned_widths"] = aligned_(gm)
    gm.eval()
    compact = export(gm)
    info["searched_params"] = sum(p.numel() for p in compact.parameters())
    info["searched_nonzero"] = sum(int(torch.count_nonzero(p)) for p in compact.parameters())
    if not cfg.finetune:
        torch.manual_seed(cfg.seed)
        zeros = {name: (p == 0) for name, p in compact.named_parameters() if p.dim() > 1}
        for m in compact.modules():
            if m is not compact and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        with torch.no_grad():
            for name, z in zeros.items():
                compact.get_parameter(name).masked_fill_(z, 0.0)
        info["norms_restored"] = restore_norms(compact, gm)
    return compact, info


def run_retrain(args: argparse.Namespace, *, finetune_only: bool = False) -> int:
    """CLI: ``granular retrain RUN_DIR`` (and ``granular export RUN_DIR --finetune``)."""
    from granular.io import save
    from granular.run import load_searched, write_json_atomic

    run_dir = Path(args.run_dir)
    overrides = {k: getattr(args, k) for k in ("arch", "epochs", "batch_size", "lr", "weight_decay", "label_smoothing",
                                               "aux_weight", "drop_path", "seed")
                 if getattr(args, k, None) is not None}
    if finetune_only:   # a short, gentle run from the searched weights unless told otherwise
        overrides = {"epochs": 10, "lr": 0.005} | overrides
    cfg = RetrainConfig(finetune=bool(args.finetune) or finetune_only, augment=bool(args.augment), **overrides)
    default = ("finetune" if cfg.finetune and finetune_only else "retrain") + ("-aligned" if cfg.arch == "aligned" else "")
    out = Path(args.out) if args.out else run_dir / default
    if args.resume:   # the retrain's own settings, as it started
        if not (out / "config.json").is_file():
            raise CheckpointError(f"nothing to resume in {out}: no config.json; run without --resume")
        cfg = RetrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    elif (out / CHECKPOINT).exists():
        raise GranularError(f"{out} already holds a retrain: continue it with --resume, or pass --out NEW_DIR")
    run, data, gm = load_searched(run_dir, batch_size=cfg.batch_size, augment=cfg.augment)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "config.json", cfg.to_dict())
    console = Console(stderr=True)
    compact, info = build_retrain_model(gm, cfg)
    console.print(f"[bold]{'fine-tuning' if cfg.finetune else 'retraining'}[/] the {cfg.arch} architecture of "
                  f"{run_dir}: {sum(p.numel() for p in compact.parameters()):,} parameters, {cfg.epochs} epochs "
                  f"on {run['dataset']}; writing {out}", highlight=False)
    result = train_compact(compact, data, cfg, out_dir=out, device=args.device, progress=not args.no_progress,
                           resume=args.resume, console=console)
    compact.eval().cpu()
    save(compact, out / "model", metadata={"spec": run["spec"], "dataset": run["dataset"], "arch": cfg.arch,
                                            "finetune": cfg.finetune})
    summary = {k: v for k, v in result.items() if k != "history"} | info
    write_json_atomic(out / "result.json", summary)
    console.print(f"top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%}, {result['params']:,} parameters "
                  f"({result['nonzero']:,} nonzero), accuracy density {result['accuracy_density']:.1f} %/M; "
                  f"model in {out / 'model'}", highlight=False)
    return 0
