"""Retraining the discovered architecture, as the paper evaluates it.

The search ends with a gated graph whose export is exact: BatchNorms and gates folded into
the layers, pruned weights stored as zeros. Retraining needs the *architecture*, not that
function:

1. **Architecture.** ``exact`` is the exported model. ``aligned`` (``docs/method.md``, "Filter
   alignment") first sets every cell (DARTS) or layer (MobileNet) to one width per role,
   chosen as the mean kept width if at least half the full width, else the max if at least
   half, else half; then exports.
2. **From scratch** (the default): every layer is re-initialised, fresh BatchNorms go back
   where the search graph had them (:mod:`granular.passes.restore_norms`), and the weights the
   search pruned stay zero (a fixed mask re-applied after each step), so the dense and nonzero
   counts are the searched ones. ``finetune`` instead starts from the searched weights and
   keeps the exported function: the norms go back as the identity, are calibrated on a few
   training batches (:func:`calibrate_norms`) so the model still computes what the search
   exported, train as norms, and are folded back at the end
   (:mod:`granular.passes.fold_norms`), so the saved model has the searched count.
3. **Recipe.** SGD with momentum and a cosine schedule, weight decay, label smoothing, the
   data set's augmentation, and optionally an auxiliary head and drop-path on op branches
   (:mod:`granular.passes.retrain_graph`).

The command, its run directory and its console output are in :mod:`granular.cli.retrain`.
"""

from __future__ import annotations

import copy
import math
import time
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import nn

from granular.api import export
from granular.config import RetrainConfig
from granular.errors import CheckpointError, GranularError
from granular.files import CHECKPOINT, METRICS, append_jsonl, save_torch, write_jsonl
from granular.masks import gate_bank
from granular.meta import LAYER, OP_UNIT
from granular.metrics import accuracy_density, count_correct, topk_correct
from granular.passes.find_units import sanitize
from granular.passes.fold_norms import fold_norms
from granular.passes.restore_norms import NORM_ROOT, restore_norms
from granular.passes.retrain_graph import retrain_graph
from granular.search_spaces import describe_op

CALIBRATION_BATCHES = 8
"""Training batches that :func:`calibrate_norms` averages a fine-tune's restored norms over."""

__all__ = ["aligned_", "build_retrain_model", "calibrate_norms", "train_compact", "evaluate"]


# ------------------------------------------------------------------ architecture

def _alignment_width(widths: list[int], full: int) -> int:
    """The alignment rule: the mean width if >= full/2, else the max if >= full/2, else full/2."""
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
    bank = gate_bank(gm)
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
    out = []
    for n in gm.graph.nodes:
        info = n.meta.get(LAYER)
        if info is not None and info.scope == unit_id and info.filter_gate:
            out.append(sanitize(info.module))
    return out


def build_retrain_model(gm: fx.GraphModule, cfg: RetrainConfig) -> tuple[fx.GraphModule, dict]:
    """The compact model to train: exported from ``gm`` (aligned first if asked), then, unless
    fine-tuning, re-initialised with fresh BatchNorms and the searched weight zeros kept."""
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
    else:
        info["norms_restored"] = restore_norms(compact, gm, keep_function=True)
    return compact, info


@torch.no_grad()
def calibrate_norms(compact: nn.Module, batches) -> int:
    """Give each norm that ``restore_norms(keep_function=True)`` put back the statistics of its
    input over ``batches`` and the γ, β that undo them, so the model's eval output is what it
    was (the norms start as the identity, so every norm sees the exported activations).
    Returns how many norms were calibrated."""
    root = getattr(compact, NORM_ROOT, None)
    norms = [m for m in root.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if root else []
    if not norms:
        return 0
    sums: dict[nn.Module, list] = {}

    def hook(module, args):
        x = args[0].detach().double()
        dims = [d for d in range(x.dim()) if d != 1]
        s = sums.setdefault(module, [0, 0.0, 0.0])
        s[0] += x.numel() // x.shape[1]
        s[1] = s[1] + x.sum(dims)
        s[2] = s[2] + (x * x).sum(dims)

    handles = [m.register_forward_pre_hook(hook) for m in norms]
    was = compact.training
    compact.eval()
    try:
        for x in batches:
            compact(x)
    finally:
        for h in handles:
            h.remove()
        compact.train(was)
    for m, (n, s1, s2) in sums.items():
        mean = s1 / max(n, 1)
        var = (s2 / max(n, 1) - mean * mean).clamp_min(0)
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.weight.copy_((var + m.eps).sqrt())
        m.bias.copy_(mean)
    return len(sums)


# ------------------------------------------------------------------ training

def evaluate(model: nn.Module, loader, device) -> dict[str, float]:
    """Top-1 and top-5 accuracy of ``model`` (logits, or ``(logits, aux)``) over ``loader``."""
    (top1, top5), total = count_correct(model, loader, device, ks=(1, 5))
    return {"top1": top1 / max(total, 1), "top5": top5 / max(total, 1)}


def train_compact(compact: fx.GraphModule, data, cfg: RetrainConfig, *, out_dir: Optional[Path] = None,
                  device: str = "cpu", resume: bool = False,
                  on_epoch: Optional[Callable[[dict], None]] = None) -> dict[str, Any]:
    """Train ``compact`` (in place) with the retrain recipe; returns the final metrics.

    Weights that are exactly zero at the start stay zero (the searched weight sparsity); when
    fine-tuning, every exact zero does, biases included (an exported bias of 0 is counted as
    pruned, so letting it move would take the model past the count the search landed on). With
    ``out_dir``, writes ``metrics.jsonl`` and an atomic ``checkpoint.pt`` every epoch, and
    ``resume`` continues from that checkpoint. ``on_epoch(row)`` is called after each epoch.
    A fine-tune calibrates the norms :func:`build_retrain_model` restored before its first
    epoch and folds them back after its last.
    """
    torch.manual_seed(cfg.seed)
    compact.to(device)
    if cfg.finetune and not resume:
        calibrate_norms(compact, (x.to(device) for x, _ in islice(data.train_loader(0), CALIBRATION_BATCHES)))
    # fresh norms start at bias 0, and restored ones are not searched parameters: neither is held
    fixed = [(p, p != 0) for name, p in compact.named_parameters()
             if not name.startswith(NORM_ROOT + ".") and (p.dim() > 1 or cfg.finetune) and bool((p == 0).any())]
    net, drops = retrain_graph(compact, data.example_input().to(device), data.num_classes,
                               drop_path=cfg.drop_path > 0, aux_head=cfg.aux_weight > 0)
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
        write_jsonl(out_dir / METRICS, history)
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
            correct += topk_correct(logits.detach(), y, 1)
            loss_sum += float(loss.detach()) * len(y)
        sched.step()
        val = evaluate(compact, data.val_loader(), device)
        row = {"epoch": epoch + 1, "loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
               "val_top1": val["top1"], "val_top5": val["top5"], "lr": sched.get_last_lr()[0],
               "drop_path": drops[0].p if drops else 0.0, "seconds": round(time.time() - t0, 2)}
        history.append(row)
        if out_dir is not None:
            append_jsonl(out_dir / METRICS, row)
            save_torch({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "epoch": epoch + 1, "history": history, "rng": torch.get_rng_state()}, ckpt_path)
        if on_epoch is not None:
            on_epoch(row)
    if cfg.finetune:
        fold_norms(compact)   # the shipped model: norms folded back, the searched count
    final = evaluate(compact, data.val_loader(), device)
    dense = sum(p.numel() for p in compact.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in compact.parameters())
    return {"top1": final["top1"], "top5": final["top5"], "params": dense, "nonzero": nonzero,
            "accuracy_density": accuracy_density(final["top1"], nonzero), "epochs": cfg.epochs,
            "history": history}
