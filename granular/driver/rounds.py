"""The pruning round (``docs/method.md``, "Pruning rounds"), in two steps.

1. **Decide** (:meth:`RoundMixin.decide_round`): which units to commit this round. The
   candidates are the units whose live mask is 0 but stored mask 1; when committing all of
   them would overshoot the round's goal, only those furthest below their thresholds are
   taken, just enough to meet it ("landing"). Deciding leaves the stored masks as it found
   them.
2. **Apply** (:meth:`RoundMixin.apply_round`): commit the chosen units, protect the last op
   of every sum and the last filter of every layer, adapt λ, and update the search state.

The round's goal comes from :meth:`RoundMixin.round_goal`, the one place that says how far a
round may go: a budget controller that sets each round's quota replaces that method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from granular.accounting import ParamCount, count_params
from granular.masks import mask_buffers, protect_last_ops_, unit_counts

__all__ = ["RoundDecision", "RoundMixin"]

Unit = tuple  # (normalised margin, kind, key, index or None)


@dataclass
class RoundDecision:
    """What :meth:`RoundMixin.decide_round` chose.

    Attributes:
        units: the units to commit: (normalised margin, kind, key, index or None).
        below: how many units were below their thresholds (the candidates).
        goal: the count the round works towards.
        before: the measured count before the round.
        after: the measured count once ``units`` are committed and protected.
        landed: whether only part of the candidates was taken to land on ``goal``.
        saved: the stored masks before the round (by gate-bank state key).
    """

    units: list[Unit]
    below: int
    goal: int
    before: int
    after: ParamCount
    landed: bool
    saved: dict[str, torch.Tensor]


class RoundMixin:
    """The pruning round of :class:`~granular.driver.searcher.Searcher`."""

    # ----------------------------------------------------------------- masks
    def _masks(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in mask_buffers(self.bank).items()}

    @torch.no_grad()
    def _restore(self, masks) -> None:
        bufs = mask_buffers(self.bank)
        for k, v in masks.items():
            bufs[k].copy_(v)

    def unit_counts(self) -> dict[str, int]:
        """Units kept (stored mask 1) per granularity."""
        return unit_counts(self.bank)

    # ----------------------------------------------------------------- units
    @torch.no_grad()
    def _candidates(self, allowed=None) -> list[Unit]:
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
    def _commit(self, units) -> None:
        b = self.bank
        per_weight: dict[str, list[int]] = {}
        for _, kind, key, idx in units:
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

        A sum keeps its best op (a node with no input would break the graph), and a layer
        keeps its best filter (a layer with no filter turns the network's output into a
        constant, which no later round can undo).
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

    @torch.no_grad()
    def _try(self, saved, units, count) -> ParamCount:
        """The count with ``units`` committed (and protected) on top of ``saved``; leaves them so."""
        self._restore(saved)
        self._commit(units)
        self._protect()
        return count()

    @torch.no_grad()
    def _land(self, saved, cands, goal, count) -> tuple[list[Unit], ParamCount]:
        """Just enough of this round's units to meet ``goal``, and the count they give.

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
        units = best_units if best_units is not None else order
        return units, self._try(saved, units, count)

    # ----------------------------------------------------------------- the round
    def round_goal(self, goal: Optional[int]) -> int:
        """The count this round works towards: ``goal`` if the caller set one (a stage's goal),
        else the search's target."""
        return self.cfg.target_params if goal is None else goal

    @torch.no_grad()
    def decide_round(self, goal: int, count: Callable[[], ParamCount], allowed=None) -> RoundDecision:
        """Choose this round's units (module docstring); the stored masks are left unchanged.

        Trial commits may lower the thresholds of units that protection re-opens, as the
        committed round would."""
        before = count().nonzero
        saved = self._masks()
        cands = self._candidates(allowed)
        now = self._try(saved, cands, count)
        units, landed = cands, False
        if now.nonzero <= goal and self.cfg.land and before > goal and cands:
            units, now = self._land(saved, cands, goal, count)
            landed = True
        self._restore(saved)
        return RoundDecision(units=units, below=len(cands), goal=goal, before=before, after=now,
                             landed=landed, saved=saved)

    @torch.no_grad()
    def apply_round(self, d: RoundDecision, count_whole: Optional[Callable[[], ParamCount]] = None) -> dict[str, Any]:
        """Commit ``d``'s units, adapt λ and update the state. ``count_whole`` counts the whole
        model when the round measured something else (a stage). Returns the round's metrics row."""
        cfg = self.cfg
        before_units = self.unit_counts()
        self._restore(d.saved)
        self._commit(d.units)
        self._protect()
        now = d.after
        pruned = d.before - now.nonzero
        scale = max(d.before - d.goal, cfg.excess_floor * d.goal, 1)
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
        whole = now if count_whole is None else count_whole()
        self.state["params"] = whole.nonzero
        self.state["params_total"] = whole.total
        self.state["rounds"] += 1
        self._active_cache = None
        if cfg.mu:
            self._update_op_cost()
        if whole.nonzero <= cfg.target_params:
            self.state["done"] = self.state["reached"] = True
        after_units = self.unit_counts()
        removed = {k: before_units[k] - after_units[k] for k in before_units}
        if removed["op"]:
            self.net = self.build_net()
        return {"round": self.state["rounds"], "pruned_params": pruned, "units_below": d.below,
                "landed": d.landed, "lambda_update": adapt, "goal_met": now.nonzero <= d.goal,
                "pruned_units": removed}

    @torch.no_grad()
    def pruning_round(self, *, goal: Optional[int] = None, count=None, allowed=None) -> dict[str, Any]:
        """One round: decide the units to commit, then apply them.

        Args:
            goal: the nonzero count this round works towards (default: :meth:`round_goal`).
            count: what is measured against ``goal`` (default: :func:`count_params` of the model).
            allowed: restricts the candidates (see :meth:`_candidates`).

        Returns:
            The round's row for the metrics (``goal_met`` says whether ``count <= goal``).
        """
        measured_whole = count is None
        count = count or (lambda: count_params(self.gm))
        decision = self.decide_round(self.round_goal(goal), count, allowed)
        return self.apply_round(decision, None if measured_whole else (lambda: count_params(self.gm)))
