"""Optimisers and losses of the search (``docs/method.md``, "Losses" and "Optimisers").

One-level SGD trains the weights, the gates (α, β) and the thresholds (t_α, t_β, t_ω) on the
training batch with ``L = CE + λ (L_res + L_thr)``. The parameter groups and their learning
rates are those of the paper; :class:`OptimMixin` builds them and computes the two losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from granular.driver.livecap import LiveCap
from granular.gates import GATE_ROOT
from granular.config import weights_lr
from granular.meta import GATE, GATE_START, OP_UNIT, SUM

__all__ = ["param_groups", "Structure", "structure", "OptimMixin"]


def param_groups(gm: fx.GraphModule) -> dict[str, list[nn.Parameter]]:
    """Split parameters into the method's groups: weights, gates (α, β), t_α/t_β, t_ω."""
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


@dataclass
class Structure:
    """What the loss and the rounds need to know about the gated graph, read once from meta."""

    sums: list[list[str]]                  # op-unit keys per sum (sums with unit inputs only)
    layer_scope: dict[str, str]            # weight-mask key -> scope
    filter_scope: dict[str, str]           # filter-gate key -> scope
    weight_of: dict[str, nn.Parameter]     # weight-mask key -> the masked weight
    op_paths: dict[str, str]               # op key -> module path


def structure(gm: fx.GraphModule) -> Structure:
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
    return Structure(sums, layer_scope, filter_scope, weight_of, op_paths)


class OptimMixin:
    """The optimisers and losses of :class:`~granular.driver.searcher.Searcher`."""

    def build_optimizers(self, module: nn.Module) -> None:
        """SGD over ``module``'s parameters in the method's groups. Momentum buffers of
        parameters the previous optimisers also held carry over (remapped by identity), so
        changing what trains never drops or misassigns optimiser state."""
        c = self.cfg
        old = {}
        for opt in (self.opt_w, self.opt_a):
            if opt is not None:
                old.update({id(p): st for p, st in opt.state.items()})
        groups = param_groups(module)
        lr = self.lr_w = weights_lr(c, self.gm.meta.get(GATE_START, "identity"))
        self.lr_ramp = c.lr_ramp_epochs
        self.opt_w = torch.optim.SGD(groups["weights"], lr=lr, momentum=c.momentum,
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
        self._gate_thresholds, self._weight_thresholds = groups["thresholds"], groups["t_omega"]
        self._arch = groups["gates"] + groups["thresholds"] + groups["t_omega"]
        self._trained = groups["weights"] + self._arch

    def set_weights_lr(self, epoch: int, step: int, steps: int) -> None:
        """The weights' learning rate at ``step`` of ``steps`` in ``epoch``: a linear ramp from 0
        over the first :attr:`lr_ramp` epochs of the run, then constant. A function of the
        position alone, so a resumed run continues the same schedule."""
        pos = epoch + (step + 1) / steps
        lr = self.lr_w * min(1.0, pos / self.lr_ramp) if self.lr_ramp > 0 else self.lr_w
        for g in self.opt_w.param_groups:
            g["lr"] = lr

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

    def _live_cap(self) -> LiveCap:
        """The live-masking cap for the current stored masks, rebuilt with :meth:`_active`."""
        active = self._active()
        cached = getattr(self, "_cap_cache", None)
        if cached is None or cached[0] is not active:
            self._cap_cache = (active, LiveCap(self.bank, self.struct.filter_scope, self.struct.sums))
        return self._cap_cache[1]

    def _resource_loss(self) -> torch.Tensor:
        terms = []
        mu = self.cfg.mu
        for active in self._active()[0]:
            s = torch.sigmoid(torch.stack([self.bank.op[k].alpha for k in active]))
            term = torch.log1p(len(active) * s / s.sum())
            if mu:
                cost = torch.tensor([self.state["op_cost"].get(k, 0.0) for k in active], device=s.device)
                term = term * (1 + mu * cost)
            terms.append(term.sum())
        return torch.stack(terms).sum() if terms else torch.zeros((), device=self.device)

    def _threshold_loss(self) -> torch.Tensor:
        ts = self._active()[1]
        return torch.exp(-torch.stack(ts)).sum() if ts else torch.zeros((), device=self.device)

    @torch.no_grad()
    def _clamp_thresholds(self) -> None:
        """Keep thresholds at or above 0, and t_α, t_β at or below 1 (σ never reaches it), and
        hold the live masking to the epoch's cap (:mod:`granular.driver.livecap`).
        Magnitudes are never negative, so a negative threshold masks nothing more than 0
        does, but it makes ``exp(-t)`` in L_thr explode (we saw L jump to ~1e3 and the next
        step throw every threshold far past its gates)."""
        if self._gate_thresholds:
            torch._foreach_clamp_min_(self._gate_thresholds, 0.0)
            torch._foreach_clamp_max_(self._gate_thresholds, 1.0)
        if self._weight_thresholds:
            torch._foreach_clamp_min_(self._weight_thresholds, 0.0)
        fraction = self.state.get("live_fraction")
        if fraction is not None:
            self._live_cap().apply(fraction)

    def _update_op_cost(self) -> None:
        """cost(op) for the μ term: the op's live weights, normalised by the largest op's. Set
        when the search starts and after every round, and kept in ``state`` (checkpointed)."""
        costs = {key: 0.0 for key in self.struct.op_paths}
        for k, scope in self.struct.layer_scope.items():
            if scope in costs:
                costs[scope] += float(self.bank.weight[k].mask.sum())
        top = max(costs.values(), default=0.0) or 1.0
        self.state["op_cost"] = {k: v / top for k, v in costs.items()}
