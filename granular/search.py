"""The search driver: Algorithm 1 of METHOD.md (adaptive pruning), single stage.

One-level SGD trains the weights, the gates (α, β) and the thresholds (t_α, t_β, t_ω) on
the training batch with ``L = CE + λ (L_res + L_thr)``. After ``warmup_epochs`` of weights-only
training the thresholds are initialised (``min`` or ``zero`` rule) and every ``prune_every``
epochs a pruning round:

1. stores the live masks (units whose masked value is zero are removed);
2. re-opens the best op of any sum that lost all of them (last-op protection);
3. counts the exported model exactly (:func:`granular.count_params`) and stops at the target;
   if the round overshoots, only the units furthest below their thresholds are committed,
   just enough to meet the target ("landing");
4. adapts λ: halve it (and reset Δ) when the round pruned too much, add ``Δ *= 4`` when too
   little, both measured against the remaining excess over the target.

The driver never edits the graph: pruning only changes stored masks (buffers).

Under ``torchrun`` the search runs data-parallel (:mod:`granular.distributed`): each process
trains on its shard of every global batch, gradients are averaged after each ``backward``,
parameters and buffers are copied from rank 0 after each epoch's training (BatchNorm running
statistics included) and after BatchNorm recalibration, validation counts are summed over the
ranks, and every rank then takes the same pruning decisions from the same numbers (checked
each epoch). Only rank 0 writes the checkpoint and the metrics log, and shows progress.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from granular import distributed
from granular.accounting import ParamCount, count_params, export
from granular.config import SearchConfig
from granular.errors import CheckpointError, GranularError, TargetError
from granular.gates import GATE_ROOT
from granular.meta import GATE, OP_UNIT, SUM
from granular.passes.fuse_kernels import fuse_kernels
from granular.passes.skip_pruned_ops import skip_pruned_ops
from granular.testing import protect_last_ops_

__all__ = ["search", "SearchResult", "Searcher", "make_searcher", "param_groups", "reachable_floor", "retention"]

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


def param_groups(gm: fx.GraphModule) -> dict[str, list[nn.Parameter]]:
    """Split parameters into METHOD.md's groups: weights, gates (α, β), t_α/t_β, t_ω."""
    groups: dict[str, list[nn.Parameter]] = {"weights": [], "gates": [], "thresholds": [], "t_omega": []}
    for name, p in gm.named_parameters():
        if not name.startswith(GATE_ROOT + "."):
            groups["weights"].append(p)
        elif name.endswith(".t_omega"):
            groups["t_omega"].append(p)
        elif name.endswith((".t_alpha", ".t_beta")):
            groups["thresholds"].append(p)
        else:
            groups["gates"].append(p)
    return groups


def _bank(gm):
    if not hasattr(gm, GATE_ROOT):
        raise GranularError("the model has no gates: pass the result of granular.prepare(model, inputs)")
    return getattr(gm, GATE_ROOT)


@dataclass
class _Structure:
    """What the loss and the rounds need to know about the gated graph, read once from meta."""

    sums: list[list[str]]                  # op-unit keys per sum (sums with unit inputs only)
    layer_scope: dict[str, str]            # weight-mask key -> scope
    filter_scope: dict[str, str]           # filter-gate key -> scope
    weight_of: dict[str, nn.Parameter]     # weight-mask key -> the masked weight
    op_paths: dict[str, str]               # op key -> module path


def _structure(gm: fx.GraphModule) -> _Structure:
    by_name = {n.name: n for n in gm.graph.nodes}
    sums, layer_scope, filter_scope, weight_of, op_paths = [], {}, {}, {}, {}
    for n in gm.graph.nodes:
        info = n.meta.get(SUM)
        if info is not None:
            keys = [by_name[i].meta[GATE].key for i in info.inputs
                    if i in by_name and GATE in by_name[i].meta and by_name[i].meta[GATE].kind == "op"]
            if keys:
                sums.append(keys)
        g = n.meta.get(GATE)
        if g is not None and g.kind == "weight":
            layer_scope[g.key] = g.scope
            weight_of[g.key] = gm.get_parameter(n.args[0].target)
        elif g is not None and g.kind == "filter":
            filter_scope[g.key] = g.scope
        if OP_UNIT in n.meta:
            op_paths[n.meta[OP_UNIT].id] = n.meta[OP_UNIT].path
    return _Structure(sums, layer_scope, filter_scope, weight_of, op_paths)


def retention(gm: fx.GraphModule) -> dict[str, float]:
    """Fraction of units kept (stored mask 1) per granularity."""
    bank = _bank(gm)

    def frac(masks):
        masks = list(masks)
        tot = sum(m.numel() for m in masks)
        return float(sum(float(m.sum()) for m in masks) / tot) if tot else 1.0

    return {"op": frac(m.mask for m in bank.op.values()),
            "filter": frac(m.mask for m in bank.filter.values()),
            "weight": frac(m.mask for m in bank.weight.values())}


def _threshold_means(gm) -> dict[str, float]:
    bank = _bank(gm)
    out = {}
    for t in ("t_alpha", "t_beta", "t_omega"):
        vals = [getattr(s, t).item() for s in bank.scopes.values() if hasattr(s, t)]
        out[t] = sum(vals) / len(vals) if vals else float("nan")
    return out


@torch.no_grad()
def reachable_floor(gm: fx.GraphModule) -> ParamCount:
    """The smallest count pruning can reach: every prunable unit removed, one op kept per
    sum (the cheapest), one channel kept per tensor."""
    bank = _bank(gm)
    saved = {k: v.clone() for k, v in bank.state_dict().items() if k.endswith("mask")}
    try:
        for m in bank.op.values():
            m.mask.zero_()
        for m in bank.filter.values():
            m.mask.zero_()
        for m in bank.weight.values():
            m.mask.zero_()
        protect_last_ops_(gm)
        return count_params(gm)
    finally:
        bank.load_state_dict({**bank.state_dict(), **saved})


@dataclass
class SearchResult:
    """What :func:`search` returns.

    Attributes:
        gm: the gated graph, with the final stored masks.
        compact: the exported compact model (plain PyTorch, eval mode).
        params: its parameter count.
        reached: whether the target was met.
        epochs: epochs run.
        val_accuracy: validation accuracy of the compact model (None without validation data).
        history: the per-epoch metrics.
    """

    gm: fx.GraphModule
    compact: fx.GraphModule
    params: ParamCount
    reached: bool
    epochs: int
    val_accuracy: Optional[float]
    history: list[dict] = field(default_factory=list)


def check_kernels(cfg: SearchConfig, device) -> None:
    """Stop early, in one line, when ``kernels="on"`` cannot run on ``device``."""
    if cfg.kernels != "on":
        return
    from granular.kernels import has_triton, kernels_available
    if not kernels_available(device):
        why = "triton is not installed" if not has_triton() else f"the device is {device}, not CUDA"
        raise GranularError(f"--kernels on: the fused Triton kernels cannot run ({why}); use a CUDA "
                            f"--device, set TRITON_INTERPRET=1 to run them on CPU (slow), or use --kernels auto")


def _atomic_torch_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Searcher:
    """Runs Algorithm 1 on a gated graph. Use :func:`search` unless you need the pieces."""

    def __init__(self, gm: fx.GraphModule, data, config: SearchConfig, *, run_dir: Path | None = None,
                 progress: bool = True, device: str | torch.device = "cpu", val_loader_fn=None):
        self.gm = gm
        self.device = torch.device(device)
        self.data = data
        self.cfg = config
        self.run_dir = Path(run_dir) if run_dir else None
        self.progress = progress and distributed.is_main()  # rank 0 alone shows progress
        self.bank = _bank(gm)
        self.struct = _structure(gm)
        c = config
        self.opt_w = self.opt_a = None
        self.state: dict[str, Any] = {"epoch": 0, "lambda": 0.0, "delta": c.lambda_step, "rounds": 0,
                                      "params": None, "done": False, "reached": False,
                                      "thresholds_initialised": False}
        self.history: list[dict] = []
        self._op_cost: dict[str, float] = {}
        self._active_cache = None
        if distributed.is_distributed():  # batch_size is the global batch: stop now if it cannot be split
            distributed.per_rank_batch(getattr(data, "batch_size", c.batch_size))
        self.setup()
        self.sync_state(full=True)  # every rank starts from rank 0's initialisation

    def setup(self) -> None:
        """Place the model on the device, build the optimisers and the training graph."""
        check_kernels(self.cfg, self.device)
        self.gm.to(self.device)
        self.build_optimizers(self.gm)
        self.net = self.build_net()

    def build_optimizers(self, module: nn.Module) -> None:
        """SGD over ``module``'s parameters in METHOD.md's groups. Momentum buffers of
        parameters the previous optimisers also held carry over (remapped by identity), so
        changing what trains never drops or misassigns optimiser state."""
        c = self.cfg
        old = {}
        for opt in (self.opt_w, self.opt_a):
            if opt is not None:
                old.update({id(p): st for p, st in opt.state.items()})
        groups = param_groups(module)
        self.opt_w = torch.optim.SGD(groups["weights"], lr=c.lr_weights, momentum=c.momentum,
                                     weight_decay=c.weight_decay)
        arch = [{"params": groups["gates"], "lr": c.lr_gates},
                {"params": groups["thresholds"], "lr": c.lr_thresholds},
                {"params": groups["t_omega"], "lr": c.lr_t_omega}]
        self.opt_a = torch.optim.SGD([g for g in arch if g["params"]] or [{"params": [], "lr": c.lr_gates}],
                                     lr=c.lr_gates, momentum=c.momentum, weight_decay=0.0)
        for opt in (self.opt_w, self.opt_a):
            for g in opt.param_groups:
                for p in g["params"]:
                    if id(p) in old:
                        opt.state[p] = old[id(p)]
        self.weights = groups["weights"]
        self._thresholds = groups["thresholds"] + groups["t_omega"]
        self._trained = groups["weights"] + groups["gates"] + groups["thresholds"] + groups["t_omega"]

    def build_net(self) -> fx.GraphModule:
        """The graph that training runs: the gated graph without its pruned ops
        (:func:`~granular.passes.skip_pruned_ops.skip_pruned_ops`), rebuilt whenever op masks change."""
        return self.fuse(skip_pruned_ops(self.gm))

    def fuse(self, net: fx.GraphModule) -> fx.GraphModule:
        """``net`` with its gated convs on the fused Triton op when ``cfg.kernels`` asks for it
        (:func:`~granular.passes.fuse_kernels.fuse_kernels`; a no-op off CUDA under ``auto``)."""
        return fuse_kernels(net, enabled={"auto": None, "on": True, "off": False}[self.cfg.kernels])

    # ----------------------------------------------------------------- losses
    def _active(self):
        """Per-sum active op keys and the thresholds of active scopes. Masks change only at
        pruning rounds and on resume, so this is built once per round, not per step."""
        if self._active_cache is None:
            b = self.bank
            sums = [[k for k in keys if float(b.op[k].mask) > 0] for keys in self.struct.sums]
            ts = [getattr(scope, name) for sid, scope in b.scopes.items()
                  if not (sid in b.op and float(b.op[sid].mask) == 0)
                  for name in ("t_alpha", "t_beta", "t_omega") if hasattr(scope, name)]
            self._active_cache = ([a for a in sums if a], ts)
        return self._active_cache

    def _resource_loss(self) -> torch.Tensor:
        terms = []
        mu = self.cfg.mu
        for active in self._active()[0]:
            s = torch.sigmoid(torch.stack([self.bank.op[k].alpha for k in active]))
            term = torch.log1p(len(active) * s / s.sum())
            if mu:
                cost = torch.tensor([self._op_cost.get(k, 0.0) for k in active], device=s.device)
                term = term * (1 + mu * cost)
            terms.append(term.sum())
        return torch.stack(terms).sum() if terms else torch.zeros((), device=self.device)

    def _threshold_loss(self) -> torch.Tensor:
        ts = self._active()[1]
        return torch.exp(-torch.stack(ts)).sum() if ts else torch.zeros((), device=self.device)

    # ----------------------------------------------------------------- thresholds
    @torch.no_grad()
    def init_thresholds(self) -> None:
        """Set every threshold by the configured rule (METHOD.md 'Threshold initialisation')."""
        zero = self.cfg.threshold_init == "zero"
        for sid, scope in self.bank.scopes.items():
            if hasattr(scope, "t_alpha"):
                scope.t_alpha.fill_(0.0 if zero else float(torch.sigmoid(self.bank.op[sid].alpha)))
            if hasattr(scope, "t_beta"):
                vals = [torch.sigmoid(self.bank.filter[k].beta)[self.bank.filter[k].mask > 0]
                        for k, s in self.struct.filter_scope.items() if s == sid]
                vals = torch.cat(vals) if vals else torch.zeros(0)
                scope.t_beta.fill_(0.0 if zero or not vals.numel() else float(vals.min()))
            if hasattr(scope, "t_omega"):
                vals = [self.struct.weight_of[k].abs()[self.bank.weight[k].mask > 0]
                        for k, s in self.struct.layer_scope.items() if s == sid]
                vals = torch.cat(vals) if vals else torch.zeros(0)
                scope.t_omega.fill_(0.0 if zero or not vals.numel() else float(vals.min()))
        self.state["thresholds_initialised"] = True

    # ----------------------------------------------------------------- training
    def train_epoch(self, epoch: int, warmup: bool, bar=None) -> dict[str, float]:
        cfg = self.cfg
        self.net.train()
        loader = self.data.train_loader(epoch)
        lam = 0.0 if warmup else self.state["lambda"]
        tot = correct = 0
        sum_loss = sum_ce = 0.0
        for i, (x, y) in enumerate(loader):
            x, y = x.to(self.device), y.to(self.device)
            out = self.net(x)
            ce = F.cross_entropy(out, y)
            loss = ce
            if lam > 0:
                loss = ce + lam * (self._resource_loss() + self._threshold_loss())
            self.opt_w.zero_grad(set_to_none=True)
            self.opt_a.zero_grad(set_to_none=True)
            loss.backward()
            if distributed.is_distributed():  # average over the global batch (see all_reduce_grads)
                distributed.all_reduce_grads(self.weights if warmup else self._trained)
            nn.utils.clip_grad_norm_(self.weights, cfg.grad_clip)
            self.opt_w.step()
            if not warmup:
                self.opt_a.step()
                self._clamp_thresholds()
            n = y.numel()
            tot += n
            correct += int((out.argmax(1) == y).sum())
            sum_loss += float(loss.detach()) * n
            sum_ce += float(ce.detach()) * n
            if bar is not None:
                bar(i + 1, sum_loss / tot, correct / tot)
        if distributed.is_distributed():  # the metrics of the global batches, on every rank
            sum_loss, sum_ce, correct, tot = distributed.all_reduce_sum([sum_loss, sum_ce, correct, tot])
            correct, tot = int(correct), int(tot)
        return {"loss": sum_loss / max(tot, 1), "ce": sum_ce / max(tot, 1), "train_acc": correct / max(tot, 1)}

    @torch.no_grad()
    def _clamp_thresholds(self) -> None:
        """Keep thresholds at or above 0. Magnitudes are never negative, so a negative
        threshold masks nothing more than 0 does, but it makes ``exp(-t)`` in L_thr explode
        (we saw L jump to ~1e3 and the next step throw every threshold far past its gates)."""
        for p in self._thresholds:
            p.clamp_(min=0.0)

    @torch.no_grad()
    def recalibrate_norms(self, epoch: int) -> None:
        """Re-estimate BatchNorm statistics for the committed architecture.

        Training mode runs the live thresholds, so running statistics describe a network
        with more units masked than the committed one (eval mode, export). A few forward
        passes with committed gates and BN in training mode (cumulative averages) fix that,
        so that validation and the exported model see statistics of what they compute.

        Under torchrun every rank runs the same batches (``n × world size`` batches of the
        per-rank size, as many samples as one process sees, in the batch size BatchNorm sees in
        training); rank 0's statistics are then copied to the others.
        """
        n = self.cfg.bn_recalibration_batches
        norms = [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not n or not norms:
            return
        was = self.net.training
        self.net.eval()
        saved = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        batch_size, world = self.cfg.batch_size, distributed.world_size()
        if world > 1:
            batch_size, n = distributed.per_rank_batch(batch_size, world), n * world
        try:
            gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch)
            loader = torch.utils.data.DataLoader(self.data.train_set, batch_size=batch_size,
                                                 shuffle=True, generator=gen)
            for i, (x, _) in enumerate(loader):
                if i >= n:
                    break
                self.net(x.to(self.device))
        finally:
            for m, mom in zip(norms, saved):
                m.momentum = mom
            self.net.train(was)
        distributed.broadcast_module(self.net, params=False)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> Optional[float]:
        if not hasattr(self.data, "val_loader"):
            return None
        was = model.training
        model.eval()
        tot = correct = 0
        for x, y in self.data.val_loader():
            out = model(x.to(self.device))
            correct += int((out.argmax(1) == y.to(self.device)).sum())
            tot += y.numel()
        model.train(was)
        if distributed.is_distributed():  # each rank saw its shard of the validation set
            correct, tot = (int(v) for v in distributed.all_reduce_sum([correct, tot]))
        return correct / tot if tot else None

    # ----------------------------------------------------------------- pruning
    @torch.no_grad()
    def _candidates(self, allowed=None) -> list[tuple[float, str, str, Optional[torch.Tensor]]]:
        """Units whose live mask is 0 but stored mask 1: (normalised margin, kind, key, index).

        ``allowed(kind, key)`` restricts the round to some units (a multi-stage search prunes
        only the stages it trains)."""
        out = []
        b = self.bank
        ok = allowed or (lambda kind, key: True)
        for k, m in b.op.items():
            if not ok("op", k):
                continue
            t = b.scopes[k].t_alpha
            g = torch.sigmoid(m.alpha)
            if float(m.mask) > 0 and float(g) < float(t):
                out.append((float((g - t) / t.abs().clamp_min(1e-12)), "op", k, None))
        for k, m in b.filter.items():
            if not ok("filter", k):
                continue
            t = b.scopes[self.struct.filter_scope[k]].t_beta
            g = torch.sigmoid(m.beta)
            idx = torch.nonzero((m.mask > 0) & (g < t)).flatten()
            for i in idx.tolist():
                out.append((float((g[i] - t) / t.abs().clamp_min(1e-12)), "filter", k, i))
        for k, m in b.weight.items():
            if not ok("weight", k):
                continue
            t = b.scopes[self.struct.layer_scope[k]].t_omega
            w = self.struct.weight_of[k].abs()
            sel = (m.mask > 0) & (w < t)
            if sel.any():
                idx = torch.nonzero(sel.flatten()).flatten()
                margins = ((w.flatten()[idx] - t) / t.abs().clamp_min(1e-12)).tolist()
                out.extend((mg, "weight", k, i) for mg, i in zip(margins, idx.tolist()))
        return out

    @torch.no_grad()
    def _commit(self, cands) -> None:
        b = self.bank
        per_weight: dict[str, list[int]] = {}
        for _, kind, key, idx in cands:
            if kind == "op":
                b.op[key].mask.zero_()
            elif kind == "filter":
                b.filter[key].mask[idx] = 0
            else:
                per_weight.setdefault(key, []).append(idx)
        for key, idxs in per_weight.items():
            b.weight[key].mask.view(-1)[torch.tensor(idxs, dtype=torch.long)] = 0

    @torch.no_grad()
    def _protect(self) -> None:
        """Last-unit protection, and the protected units stay live in training.

        A sum keeps its best op (METHOD.md: a node with no input would break the graph), and
        a layer keeps its best filter (a layer with no filter turns the network's output
        into a constant, which no later round can undo).
        """
        b = self.bank
        prefer = {k: float(torch.sigmoid(m.alpha) - b.scopes[k].t_alpha) for k, m in b.op.items()}
        for k in protect_last_ops_(self.gm, prefer):
            t = b.scopes[k].t_alpha
            t.fill_(min(float(t), float(torch.sigmoid(b.op[k].alpha))))
        for k, m in b.filter.items():
            if float(m.mask.sum()) == 0:
                g = torch.sigmoid(m.beta)
                best = int(torch.argmax(g))
                m.mask[best] = 1.0
                t = b.scopes[self.struct.filter_scope[k]].t_beta
                t.fill_(min(float(t), float(g[best])))

    def _mask_buffers(self) -> dict[str, torch.Tensor]:
        """Every stored mask of the gate bank, by state-dict key (the buffers themselves)."""
        return {k: v for k, v in self.bank.named_buffers() if k.endswith("mask")}

    def _masks(self):
        return {k: v.clone() for k, v in self._mask_buffers().items()}

    @torch.no_grad()
    def _restore(self, masks):
        bufs = self._mask_buffers()
        for k, v in masks.items():
            bufs[k].copy_(v)

    @torch.no_grad()
    def pruning_round(self, *, goal: Optional[int] = None, count=None, allowed=None) -> dict[str, Any]:
        """One round of Algorithm 1: commit the units below threshold, protect, count, land, adapt λ.

        Args:
            goal: the nonzero count this round works towards (default: the target).
            count: what is measured against ``goal`` (default: :func:`count_params` of the model).
            allowed: restricts the candidates (see :meth:`_candidates`).

        Returns:
            The round's row for the metrics (``goal_met`` says whether ``count <= goal``).
        """
        cfg = self.cfg
        goal = cfg.target_params if goal is None else goal
        whole_is_count = count is None
        count = count or (lambda: count_params(self.gm))
        before_units = self.unit_counts()
        before = count().nonzero
        saved = self._masks()
        cands = self._candidates(allowed)
        self._commit(cands)
        self._protect()
        now = count()
        landed = False
        if now.nonzero <= goal and cfg.land and before > goal and cands:
            now = self._land(saved, cands, goal, count)
            landed = True
        pruned = before - now.nonzero
        scale = max(before - goal, cfg.excess_floor * goal, 1)
        frac = pruned / scale
        if frac > cfg.prune_high:
            self.state["lambda"] /= 2
            self.state["delta"] = cfg.lambda_step
            adapt = "halve"
        elif frac < cfg.prune_low:
            self.state["delta"] *= 4
            self.state["lambda"] += self.state["delta"]
            adapt = "raise"
        else:
            adapt = "keep"
        whole = now if whole_is_count else count_params(self.gm)
        self.state["params"] = whole.nonzero
        self.state["params_total"] = whole.total
        self.state["rounds"] += 1
        self._active_cache = None
        if self.cfg.mu:
            self._update_op_cost()
        if whole.nonzero <= cfg.target_params:
            self.state["done"] = self.state["reached"] = True
        after_units = self.unit_counts()
        removed = {k: before_units[k] - after_units[k] for k in before_units}
        if removed["op"]:
            self.net = self.build_net()
        return {"round": self.state["rounds"], "pruned_params": pruned, "units_below": len(cands),
                "landed": landed, "lambda_update": adapt, "goal_met": now.nonzero <= goal,
                "pruned_units": removed}

    def unit_counts(self) -> dict[str, int]:
        """Units kept (stored mask 1) per granularity."""
        b = self.bank
        return {"op": int(sum(float(m.mask) for m in b.op.values())),
                "filter": int(sum(float(m.mask.sum()) for m in b.filter.values())),
                "weight": int(sum(float(m.mask.sum()) for m in b.weight.values()))}

    @torch.no_grad()
    def _try(self, saved, units, count) -> ParamCount:
        self._restore(saved)
        self._commit(units)
        self._protect()
        return count()

    @torch.no_grad()
    def _land(self, saved, cands, goal, count) -> ParamCount:
        """Commit just enough of this round's units to meet ``goal``.

        Units are taken furthest-below-threshold first; a bisection finds the shortest such
        prefix that meets the goal. When its last unit overshoots by more than
        ``land_within`` of the goal (an op of thousands of parameters, say), that unit is
        set aside and the bisection repeats over the others, a few times at most, keeping
        the closest landing found.
        """
        cfg, target = self.cfg, goal
        order = sorted(cands, key=lambda c: c[0])
        best_units, best = None, None
        for _ in range(cfg.land_attempts):
            if not order or self._try(saved, order, count).nonzero > target:
                break  # without the units set aside the goal is out of reach
            lo, hi = 1, len(order)
            while lo < hi:
                mid = (lo + hi) // 2
                if self._try(saved, order[:mid], count).nonzero <= target:
                    hi = mid
                else:
                    lo = mid + 1
            now = self._try(saved, order[:hi], count)
            if best is None or now.nonzero > best.nonzero:
                best_units, best = order[:hi], now
            if now.nonzero >= (1 - cfg.land_within) * target:
                break
            order = order[:hi - 1] + order[hi:]  # set the overshooting unit aside
        return self._try(saved, best_units if best_units is not None else order, count)

    def _update_op_cost(self) -> None:
        """cost(op) for the μ term: the op's live weights, normalised by the largest op's."""
        costs = {key: 0.0 for key in self.struct.op_paths}
        for k, scope in self.struct.layer_scope.items():
            if scope in costs:
                costs[scope] += float(self.bank.weight[k].mask.sum())
        top = max(costs.values(), default=0.0) or 1.0
        self._op_cost = {k: v / top for k, v in costs.items()}

    # ----------------------------------------------------------------- checkpoints
    def checkpoint(self) -> None:
        if self.run_dir is None or not distributed.is_main():  # rank 0 writes; every rank can read it
            return
        state = {"format": 1, "config": self.cfg.to_dict(), "state": self.state, "history": self.history,
                 "model": self.gm.state_dict(), "opt_w": self.opt_w.state_dict(), "opt_a": self.opt_a.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}, **self.checkpoint_extra()}
        _atomic_torch_save(state, self.run_dir / CHECKPOINT)

    def checkpoint_extra(self) -> dict[str, Any]:
        """More to save (a subclass's own state); restored by :meth:`resume_extra`."""
        return {}

    def resume_extra(self, ck: dict[str, Any]) -> None:
        """Rebuild what training needs for the checkpoint's state, then load the optimisers."""
        self.net = self.build_net()
        self.opt_w.load_state_dict(ck["opt_w"])
        self.opt_a.load_state_dict(ck["opt_a"])

    def resume(self, path: Path) -> None:
        try:
            ck = torch.load(path, map_location=self.device, weights_only=False)
            if not isinstance(ck, dict) or ck.get("format") != 1:
                raise ValueError("not a granular checkpoint")
            self.gm.load_state_dict(ck["model"])
            self.state.update(ck["state"])
            self._active_cache = None
            self.resume_extra(ck)
        except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is the user's to fix
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise CheckpointError(f"cannot resume from {path}: the checkpoint is corrupt or from another "
                                  f"run ({first}); delete it to start over") from None
        self.history = list(ck["history"])
        if self.run_dir is not None and distributed.is_main():
            # the log may hold an epoch the checkpoint does not: rewrite it
            fd, tmp = tempfile.mkstemp(dir=self.run_dir, prefix=METRICS + ".", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in self.history)
            os.replace(tmp, self.run_dir / METRICS)
        torch.set_rng_state(ck["rng"]["torch"])
        random.setstate(ck["rng"]["python"])
        self.sync_state(full=True)

    # ----------------------------------------------------------------- data parallel
    def synced_modules(self) -> list[nn.Module]:
        """Everything the ranks must hold alike (a subclass adds its own modules)."""
        return [self.gm]

    def sync_state(self, full: bool = False) -> None:
        """Copy rank 0's parameters and buffers to every rank (no-op in a single process).

        ``full`` copies :meth:`synced_modules` (at the start and after a resume); otherwise only
        the training graph, which is all that an epoch changes: its parameters (equal on every
        rank already, the gradients being averaged; copying them makes sure) and its BatchNorm
        running statistics (which each rank updates from its own shard), so that the pruning
        round, λ, landing, regrowth and export that follow read the same numbers everywhere.
        """
        if distributed.is_distributed():
            distributed.broadcast_module(*(self.synced_modules() if full else [self.net]))

    def decision_state(self) -> tuple:
        """What every rank must agree on after an epoch: a digest of the stored masks, and ``state``."""
        h = hashlib.sha1()
        for k, v in sorted(self._mask_buffers().items()):
            h.update(k.encode())
            h.update(v.detach().to("cpu", torch.uint8).numpy().tobytes())
        return h.hexdigest(), json.dumps(self.state, sort_keys=True, default=str)

    def _log(self, row: dict) -> None:
        self.history.append(row)
        if self.run_dir is not None and distributed.is_main():
            with open(self.run_dir / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")

    # ----------------------------------------------------------------- main loop
    def before_epoch(self) -> None:
        """Called before each epoch (a multi-stage search moves between phases here)."""

    def in_warmup(self) -> bool:
        """Whether this epoch trains the weights only."""
        return self.state["epoch"] < self.cfg.warmup_epochs

    def round_due(self) -> Optional[dict[str, Any]]:
        """Keyword arguments of :meth:`pruning_round` if this epoch ends with one, else None."""
        cfg = self.cfg
        return {} if (self.state["epoch"] + 1 - cfg.warmup_epochs) % cfg.prune_every == 0 else None

    def phase_name(self, warmup: bool) -> str:
        return "warmup" if warmup else "search"

    def after_epoch(self, round_info: dict[str, Any]) -> dict[str, Any]:
        """Called after each epoch's round; returns more fields for the epoch's metrics row."""
        return {}

    def run(self) -> SearchResult:
        cfg = self.cfg
        from granular._progress import SearchProgress
        if self.state["params"] is None:
            self.state["params"] = count_params(self.gm).nonzero
        with SearchProgress(enabled=self.progress, target=cfg.target_params, epochs=cfg.epochs) as prog:
            while not self.state["done"] and self.state["epoch"] < cfg.epochs:
                epoch = self.state["epoch"]
                self.before_epoch()
                warmup = self.in_warmup()
                if not warmup and not self.state["thresholds_initialised"]:
                    self.init_thresholds()
                t0 = time.time()
                stats = self.train_epoch(epoch, warmup, prog.batch_callback(epoch, len(self.data.train_loader(epoch))))
                self.sync_state()
                round_info = {}
                due = None if warmup else self.round_due()
                if due is not None:
                    round_info = self.pruning_round(**due)
                self.recalibrate_norms(epoch)
                val = self.evaluate(self.net)
                self.state["epoch"] = epoch + 1
                row = {"epoch": epoch + 1, "phase": self.phase_name(warmup), **stats, "val_acc": val,
                       "lambda": self.state["lambda"], "params": self.state["params"],
                       "params_total": self.state.get("params_total"), "target": cfg.target_params,
                       **{f"threshold_{k[2:]}": v for k, v in _threshold_means(self.gm).items()},
                       **{f"keep_{k}": v for k, v in retention(self.gm).items()},
                       **round_info}
                row.update(self.after_epoch(round_info))
                if distributed.is_distributed():
                    distributed.assert_same(self.decision_state(), f"the masks and state after epoch {epoch + 1}")
                row["seconds"] = round(time.time() - t0, 3)
                self._log(row)
                prog.epoch_done(row)
                self.checkpoint()
        compact = export(self.gm)
        params = count_params(self.gm)
        val = self.evaluate(compact)
        return SearchResult(gm=self.gm, compact=compact, params=params, reached=bool(self.state["reached"]),
                            epochs=self.state["epoch"], val_accuracy=val, history=self.history)


def check_target(gm: fx.GraphModule, target: int) -> tuple[ParamCount, ParamCount]:
    """Fail early, in one line, when the target is already met or cannot be reached.

    Returns:
        (the current count, the reachable floor).
    """
    from granular._format import fmt_count
    now = count_params(gm)
    if target >= now.nonzero:
        raise TargetError(f"the model already has {fmt_count(now.nonzero)} nonzero parameters, at or below the "
                          f"target {fmt_count(target)}: nothing to prune; choose a target below {fmt_count(now.nonzero)}")
    floor = reachable_floor(gm)
    if target < floor.nonzero:
        raise TargetError(f"target {fmt_count(target)} is below the smallest model this graph can reach "
                          f"({fmt_count(floor.nonzero)} nonzero parameters with every prunable unit removed); "
                          f"choose a target of at least {fmt_count(floor.nonzero)}")
    return now, floor


def make_searcher(gm: fx.GraphModule, data, config: SearchConfig, **kwargs) -> Searcher:
    """The single-stage (:class:`Searcher`) or multi-stage
    (:class:`~granular.multistage.MultiStageSearcher`) driver, as ``config.multi_stage`` asks.

    Raises:
        GranularError: multi-stage search was asked for a model of one resolution, without fallback.
    """
    from granular.multistage import MultiStageSearcher, use_multi_stage
    cls = MultiStageSearcher if use_multi_stage(gm, config) else Searcher
    return cls(gm, data, config, **kwargs)


def search(gm: fx.GraphModule, train_data, target_params: float | int | None = None,
           config: SearchConfig | None = None, *, run_dir: str | os.PathLike | None = None,
           resume: bool = False, progress: bool = True, device: str | torch.device = "cpu") -> SearchResult:
    """Prune a gated graph to ``target_params`` nonzero parameters (Algorithm 1).

    Args:
        gm: a gated graph from :func:`granular.prepare`; it is trained in place.
        train_data: a :class:`granular.data.DataBundle` (or anything with
            ``train_loader(epoch)`` and optionally ``val_loader()``).
        target_params: the nonzero-parameter target (overrides ``config.target_params``).
        config: a :class:`~granular.config.SearchConfig`.
        run_dir: if given, checkpoints and the metrics log are written there.
        resume: continue from ``run_dir``'s checkpoint.
        progress: show rich progress (rank 0 only under torchrun).
        device: where to train. Under ``torchrun`` the search joins the process group (or uses
            the caller's) and runs data-parallel; ``cuda`` means ``cuda:LOCAL_RANK``.

    Returns:
        A :class:`SearchResult` with the exported compact model.

    Raises:
        TargetError: the target is already met, or below what the graph can reach.
        CheckpointError: ``resume`` and the checkpoint is unreadable.
    """
    cfg = config or SearchConfig()
    if target_params is not None:
        cfg = SearchConfig.from_dict({**cfg.to_dict(), "target_params": int(target_params)})
    if cfg.target_params <= 0:
        raise TargetError("no target: pass target_params (e.g. 2.2M)")
    device = distributed.init(device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    searcher = make_searcher(gm, train_data, cfg, run_dir=run_dir, progress=progress, device=device)
    ck = Path(run_dir) / CHECKPOINT if run_dir else None
    if resume:
        if ck is None or not ck.exists():
            raise CheckpointError(f"nothing to resume: no {CHECKPOINT} in {run_dir}; run without --resume")
        searcher.resume(ck)
    else:
        check_target(gm, cfg.target_params)
    return searcher.run()
