"""Multi-stage search: Algorithm 2 of the paper, on top of the single-stage driver.

The gated graph is split by resolution (:func:`~granular.passes.split_stages.assign_stages`)
into n stages (3 by default). The search then runs n + 1 phases:

* **stage s** (s < n): trains stages ``0..s`` only. For s < n - 1 the graph ends in an
  auxiliary head (:mod:`granular.heads`) on the stage's last feature map; stage n - 1 ends in
  the real classifier. Later stages are not in the training graph, so they are neither
  computed nor moved to the device. The phase starts with ``warmup_epochs`` of weights-only
  training, then sets the current stage's thresholds (earlier stages keep theirs, and λ
  carries over) and prunes: the current stage every ``prune_every`` (e2) epochs, earlier
  stages every ``reprune_every`` (e1) epochs. The phase's goal is on the stages built so far:
  the earlier stages' count at the phase start plus ``stage_keep`` of the current stage's, so
  what re-pruning removes from earlier stages counts toward it. The budget controller plans
  the phase's rounds against the phase's share of the epochs, as the final phase's against
  the search's, and the phase ends when its goal is met or its epochs are spent.
* **regrowth** after each stage from the second on: ``round(regrow × ops pruned in the
  phase)`` ops come back, shared across (cell, op type) in proportion to the potential
  ½ (mean σ(α) + mean |momentum of σ(α)|) of the active ops of that (cell, type), picked at
  random within it, each with the weights, α and inner masks it had when it was pruned.
* **final**: the whole network, every stage pruned every e2 epochs, to the parameter target.

The pruned ops of every phase are skipped by the training graph
(:func:`~granular.passes.pipelines.training_graph`): that, with the later stages
left out, is where the memory goes down. Each phase has at most its share of the epochs
left, ``remaining // phases left`` (but never less than one warm-up plus one round).

Everything a phase needs is in ``state`` (JSON) and the checkpoint, so ``--resume`` continues
a killed search in the phase, epoch and stage it was in.

Under ``torchrun`` (:mod:`granular.distributed`) the stage graphs train data-parallel like the
single-stage graph: gradients are averaged, a new head is copied from rank 0 when a phase
starts, and the phase changes, per-stage goals and regrowth's picks (a generator seeded from
the search seed and the phase, over potentials read from averaged momenta) come out the same
on every rank, which the driver checks after each epoch.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any, Optional

import torch
import torch.fx as fx

from granular import distributed
from granular.accounting import ParamCount, count_params, count_params_by_stage
from granular.errors import GranularError
from granular.driver.searcher import Searcher
from granular.gates import GATE_ROOT
from granular.heads import aux_head_for
from granular.meta import GATE, MEMBER, tensor_shape
from granular.passes.split_stages import assign_stages, count_resolutions, stage_boundary, stage_graph

__all__ = ["MultiStageSearcher", "use_multi_stage", "single_resolution_message"]

log = logging.getLogger(__name__)


def single_resolution_message(gm: fx.GraphModule) -> str:
    """Why a model cannot be searched in stages, in one line, with the fixes."""
    n = count_resolutions(gm)
    what = "a single resolution" if n <= 1 else f"{n} resolutions"
    return (f"multi-stage search needs a model whose conv layers produce 2 or more resolutions, and this one has "
            f"{what}: drop --multi-stage (or pass --single-stage), or add --stage-fallback to search it in one stage")


def use_multi_stage(gm: fx.GraphModule, config) -> bool:
    """Whether ``config`` asks for a multi-stage search of ``gm``.

    Raises:
        GranularError: ``multi_stage="on"``, one resolution and ``single_resolution="stop"``.
    """
    n = count_resolutions(gm)
    if config.multi_stage == "off":
        return False
    if config.multi_stage == "auto":
        return n >= 3
    if n >= 2:
        return True
    if config.single_resolution == "fallback":
        log.info("%s; searching in one stage", single_resolution_message(gm).split(":")[0])
        return False
    raise GranularError(single_resolution_message(gm))


def _cell_and_type(path: str) -> tuple[str, str]:
    """(cell, op type) of an op unit's module path: the cell is the path up to its first
    numeric component (``cells.3``, ``layer1.0``), the type its last named component
    (``sep_conv_3x3``)."""
    parts = path.split(".")
    cut = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
    named = [p for p in parts if not p.isdigit()]
    return ".".join(parts[:cut + 1]), (named[-1] if named else path)


class MultiStageSearcher(Searcher):
    """Algorithm 2 (see the module docstring). Use :func:`granular.search` with a
    :class:`~granular.config.MultiStageConfig` (or ``multi_stage``) unless you need the pieces."""

    def setup(self) -> None:
        if count_resolutions(self.gm) < 2:
            raise GranularError(single_resolution_message(self.gm))
        stage_of = assign_stages(self.gm, self.cfg.stages)
        self.n_stages = max(stage_of.values()) + 1
        self.unit_stage: dict[tuple[str, str], int] = {}
        for n in self.gm.graph.nodes:
            g = n.meta.get(GATE)
            if g is not None:
                self.unit_stage[(g.kind, g.key)] = stage_of[n]
        out = [n for n in self.gm.graph.nodes if n.op == "output"][0]
        shape = tensor_shape(out.args[0]) if isinstance(out.args[0], fx.Node) else None
        if shape is None or len(shape) != 2:
            raise GranularError("multi-stage search needs a classifier whose output is (batch, classes): "
                                "pass --single-stage for this model")
        self.num_classes = shape[1]
        self.head = None
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.scope_stage: dict[str, int] = {}
        for (kind, key), st in self.unit_stage.items():
            sid = key if kind == "op" else (self.struct.filter_scope if kind == "filter" else self.struct.layer_scope)[key]
            self.scope_stage[sid] = min(st, self.scope_stage.get(sid, st))
        self.state.update({"phase": 0, "phase_epoch": 0, "phase_first_epoch": 0, "phase_start": None,
                           "phase_goal": None, "phase_pruned_ops": [], "phase_allot": None,
                           "stages_initialised": []})
        self.enter_phase(0, fresh=True)

    # ----------------------------------------------------------------- phases
    @property
    def phase(self) -> int:
        return self.state["phase"]

    @property
    def final(self) -> bool:
        return self.phase >= self.n_stages

    def stage_counts(self) -> dict[int, ParamCount]:
        return self.counter.by_stage() if self.counter is not None else count_params_by_stage(self.gm)

    def built_count(self) -> ParamCount:
        """The count of the stages built so far (``0..phase``): what a stage phase's goal is on."""
        counts = self.stage_counts()
        parts = [c for s, c in counts.items() if s <= self.phase]
        return ParamCount(nonzero=sum(c.nonzero for c in parts), total=sum(c.total for c in parts))

    def init_thresholds(self, scopes=None) -> None:
        """Set the thresholds of the stages built so far that have none yet; earlier stages
        keep theirs (and λ its value) when a phase starts."""
        done = set(self.state["stages_initialised"])
        new = {st for st in range(min(self.phase, self.n_stages - 1) + 1)} - done
        if scopes is None:
            scopes = {sid for sid, st in self.scope_stage.items() if st in new}
        super().init_thresholds(scopes)
        self.state["stages_initialised"] = sorted(done | new)

    def budget_end(self) -> int:
        if self.final:
            return self.cfg.epochs
        return min(self.state["phase_first_epoch"] + self.state["phase_allot"], self.cfg.epochs)

    def _train_module(self) -> fx.GraphModule:
        """What the optimisers hold in this phase: the stages built so far (every op, pruned
        or not, so regrowth needs no new parameters), and the phase's head."""
        if self.phase >= self.n_stages - 1:
            return self.gm
        return stage_graph(self.gm, self.phase, self.head)

    def build_net(self) -> fx.GraphModule:
        if self.phase >= self.n_stages - 1:
            return super().build_net()
        return super().build_net(stage=self.phase, head=self.head)

    def enter_phase(self, phase: int, fresh: bool) -> None:
        """Build phase ``phase``'s head, optimisers and training graph; ``fresh`` also resets
        λ, thresholds and the phase's goal (not on resume, where they come from the checkpoint)."""
        self.state["phase"] = phase
        self.head = None
        if phase < self.n_stages - 1:
            end = stage_boundary(self.gm, phase)
            c, h, w = tensor_shape(end)[1:]
            dense = self.stage_counts()[phase].total
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed * 1009 + phase)
                self.head = aux_head_for(c, (h, w), self.num_classes, phase, dense, self.cfg.aux_fraction)
        module = self._train_module()
        module.to(self.device)
        self.build_optimizers(module)
        self.net = self.build_net()
        self._active_cache = None
        if self.head is not None:
            distributed.broadcast_module(self.head)  # built from the same seed everywhere; now surely
        if not fresh:
            return
        cfg = self.cfg
        counts = self.stage_counts()
        start = counts[phase].nonzero if not self.final else sum(c.nonzero for c in counts.values())
        earlier = sum(c.nonzero for s, c in counts.items() if s < phase)
        remaining = cfg.epochs - self.state["epoch"]
        phases_left = self.n_stages + 1 - phase
        warm = 0 if self.final else cfg.warmup_epochs
        allot = remaining if self.final else max(remaining // phases_left, warm + cfg.prune_every)
        goal = cfg.target_params if self.final else earlier + math.floor(cfg.stage_keep * start)
        self.state.update({"phase_epoch": 0, "phase_first_epoch": self.state["epoch"], "phase_start": start,
                           "phase_goal": goal, "phase_pruned_ops": [], "phase_allot": allot,
                           "thresholds_initialised": False})
        head = sum(p.numel() for p in self.head.parameters()) if self.head is not None else 0
        log.info("phase %s: %d params at start, goal %d, head %d params, %d epochs at most",
                 self.phase_name(False), start, self.state["phase_goal"], head, allot)

    def phase_name(self, warmup: bool) -> str:
        name = "final" if self.final else f"stage{self.phase + 1}"
        return name + ("-warmup" if warmup else "")

    def in_warmup(self) -> bool:
        return not self.final and self.state["phase_epoch"] < self.cfg.warmup_epochs

    def _allowed(self, stages: set[int]):
        return lambda kind, key: self.unit_stage.get((kind, key), 0) in stages

    def round_due(self, epoch: Optional[int] = None) -> Optional[dict[str, Any]]:
        cfg = self.cfg
        e = self.state["epoch"] if epoch is None else epoch
        k = e - self.state["phase_first_epoch"] + 1 - (0 if self.final else cfg.warmup_epochs)
        if k <= 0:
            return None
        if self.final:
            stages = set(range(self.n_stages)) if k % cfg.prune_every == 0 else set()
        else:
            stages = {self.phase} if k % cfg.prune_every == 0 else set()
            if k % cfg.reprune_every == 0:
                stages |= set(range(self.phase))
        if not stages:
            return None
        if self.final:
            return {"allowed": self._allowed(stages)}
        return {"goal": self.state["phase_goal"], "count": self.built_count, "allowed": self._allowed(stages)}

    # ----------------------------------------------------------------- rounds and regrowth
    def units_by_stage(self) -> dict[int, dict[str, int]]:
        """Units kept (stored mask 1) per stage and granularity."""
        b = self.bank
        out = {s: {"op": 0, "filter": 0, "weight": 0} for s in range(self.n_stages)}
        for (kind, key), s in self.unit_stage.items():
            bank = {"op": b.op, "filter": b.filter, "weight": b.weight}[kind]
            if key in bank:
                out[s][kind] += int(float(bank[key].mask.sum()))
        return out

    def _op_tensors(self, key: str) -> dict[str, torch.Tensor]:
        """The parameters and buffers of op unit ``key``: of its member modules and of the
        attributes its members read (a masked weight is read by ``get_attr``), by name."""
        names: dict[str, torch.Tensor] = {}
        for n in self.gm.graph.nodes:
            if n.meta.get(MEMBER) != key or str(n.target).startswith(GATE_ROOT):
                continue
            if n.op == "call_module":
                mod = self.gm.get_submodule(str(n.target))
                for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
                    names[f"{n.target}.{name}"] = t
            elif n.op == "get_attr":
                t = _fetch(self.gm, str(n.target))
                if isinstance(t, torch.Tensor):
                    names[str(n.target)] = t
        return names

    def _inner_mask_keys(self, key: str) -> list[str]:
        """Gate-bank state keys of the filter and weight masks inside op ``key``."""
        f = [f"filter.{k}.mask" for k, s in self.struct.filter_scope.items() if s == key]
        w = [f"weight.{k}.mask" for k, s in self.struct.layer_scope.items() if s == key]
        return f + w

    def _fillers(self, allowed=None) -> list:
        """A stage phase's deadline is filled by the units of every kind closest to their
        thresholds (ops included), as the paper's stages prune ops and regrowth then brings
        some back; the final phase fills with weights like a single-stage search."""
        if self.final:
            return super()._fillers(allowed)
        return [u for u in self._candidates(allowed, every=True) if u[0] >= 0]

    @torch.no_grad()
    def pruning_round(self, **kw) -> dict[str, Any]:
        alive = {k for k, m in self.bank.op.items() if float(m.mask) > 0}
        masks_before = self._masks()
        units_before = self.units_by_stage()
        info = super().pruning_round(**kw)
        newly = sorted(k for k in alive if float(self.bank.op[k].mask) == 0)
        for k in newly:  # what regrowth restores: the op as it was when pruned
            self.snapshots[k] = {
                "alpha": self.bank.op[k].alpha.detach().clone(),
                "tensors": {n: t.detach().clone() for n, t in self._op_tensors(k).items()},
                "masks": {m: masks_before[m].clone() for m in self._inner_mask_keys(k) if m in masks_before}}
        self.state["phase_pruned_ops"] = self.state["phase_pruned_ops"] + newly
        after = self.units_by_stage()
        info["pruned_units"] = {f"stage{s + 1}": {g: units_before[s][g] - after[s][g] for g in after[s]}
                                for s in after if any(units_before[s][g] != after[s][g] for g in after[s])}
        info["stages_pruned"] = sorted({self.unit_stage[("op", k)] + 1 for k in newly})
        if not self.final:
            info["stage_params"] = self.built_count().nonzero
        return info

    def potentials(self) -> dict[tuple[str, str], float]:
        """½ (mean σ(α) + mean |momentum of σ(α)|) over the active ops of each (cell, type)
        of the built stages. The momentum of σ(α) is α's SGD momentum buffer through the
        chain rule, σ'(α) = σ(α)(1 - σ(α))."""
        acc: dict[tuple[str, str], list[tuple[float, float]]] = {}
        state = self.opt_a.state
        for k, m in self.bank.op.items():
            if float(m.mask) == 0 or self.unit_stage.get(("op", k), 0) > self.phase:
                continue
            s = float(torch.sigmoid(m.alpha))
            buf = state.get(m.alpha, {}).get("momentum_buffer")
            mom = abs(float(buf) * s * (1 - s)) if buf is not None else 0.0
            acc.setdefault(_cell_and_type(self.struct.op_paths.get(k, k)), []).append((s, mom))
        return {g: 0.5 * (sum(a for a, _ in v) / len(v) + sum(b for _, b in v) / len(v)) for g, v in acc.items()}

    @torch.no_grad()
    def regrow(self) -> dict[str, Any]:
        """Bring back ``round(regrow × ops pruned in this phase)`` ops (module docstring)."""
        pruned_here = self.state["phase_pruned_ops"]
        quota = round(self.cfg.regrow * len(pruned_here))
        pool: dict[tuple[str, str], list[str]] = {}
        for k in pruned_here:
            if float(self.bank.op[k].mask) == 0 and k in self.snapshots:
                pool.setdefault(_cell_and_type(self.struct.op_paths.get(k, k)), []).append(k)
        empty = {"quota": quota, "regrown_ops": [], "regrown_units": {"op": 0, "filter": 0, "weight": 0}}
        if quota <= 0 or not pool:
            return empty
        pot = self.potentials()
        groups = sorted(pool)
        weight = {g: pot.get(g, 0.0) for g in groups}
        if sum(weight.values()) <= 0:
            weight = {g: 1.0 for g in groups}
        quota = min(quota, sum(len(v) for v in pool.values()))
        share = _allocate(quota, weight, {g: len(pool[g]) for g in groups})
        rng = random.Random(self.cfg.seed * 7907 + self.phase)
        chosen = [k for g in groups for k in rng.sample(sorted(pool[g]), share[g])]
        before = self.unit_counts()
        for k in chosen:
            self.restore_op(k)
        after = self.unit_counts()
        self.net = self.build_net()
        self._active_cache = None
        self.state["params"] = count_params(self.gm).nonzero
        return {"quota": quota, "regrown_ops": chosen,
                "regrown_units": {g: after[g] - before[g] for g in after}}

    @torch.no_grad()
    def restore_op(self, key: str) -> None:
        """Regrow op ``key`` as it was when pruned: mask 1, its α, weights and inner masks."""
        snap = self.snapshots.pop(key)
        op = self.bank.op[key]
        op.alpha.copy_(snap["alpha"])
        op.mask.fill_(1.0)
        tensors = self._op_tensors(key)
        for name, t in snap["tensors"].items():
            tensors[name].copy_(t)
        self._restore(snap["masks"])
        scope = self.bank.scopes[key]
        scope.t_alpha.fill_(min(float(scope.t_alpha), float(torch.sigmoid(op.alpha))))

    # ----------------------------------------------------------------- the loop's hooks
    def before_epoch(self) -> None:
        self.state["phase_epoch"] = self.state["epoch"] - self.state["phase_first_epoch"]

    def after_epoch(self, round_info: dict[str, Any]) -> dict[str, Any]:
        extra: dict[str, Any] = {"stage": self.phase + 1, "stages": self.n_stages}
        if not self.final:
            extra["stage_goal"] = self.state["phase_goal"]
            extra.setdefault("stage_params", round_info.get("stage_params"))
        if self.state["done"]:
            return extra
        used = self.state["epoch"] - self.state["phase_first_epoch"]
        ended = (not self.final and (round_info.get("goal_met") or used >= self.state["phase_allot"]))
        if ended:
            extra["stage_end"] = {"stage": self.phase + 1, "epochs": used,
                                  "params": self.built_count().nonzero,
                                  "goal": self.state["phase_goal"], "goal_met": bool(round_info.get("goal_met"))}
            if self.phase >= 1:
                extra["regrowth"] = self.regrow()
            self.enter_phase(self.phase + 1, fresh=True)
        return extra

    def synced_modules(self) -> list[torch.nn.Module]:
        return [self.gm] + ([self.head] if self.head is not None else [])

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"snapshots": self.snapshots, "head": self.head.state_dict() if self.head is not None else None}

    def resume_extra(self, ck: dict[str, Any]) -> None:
        if "snapshots" not in ck:
            raise ValueError("a single-stage checkpoint: resume it without --multi-stage")
        self.enter_phase(self.state["phase"], fresh=False)
        if self.head is not None:
            self.head.load_state_dict(ck["head"])
        self.snapshots = ck["snapshots"]  # the head is shared by the graph enter_phase built
        self.opt_w.load_state_dict(ck["opt_w"])
        self.opt_a.load_state_dict(ck["opt_a"])


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _allocate(quota: int, weight: dict, cap: dict) -> dict:
    """Split ``quota`` across groups in proportion to ``weight`` (largest remainders), never
    above a group's ``cap``; what a full group cannot take goes to the others."""
    share = {g: 0 for g in weight}
    left = quota
    while left > 0:
        open_ = [g for g in weight if share[g] < cap[g]]
        if not open_:
            break
        tot = sum(weight[g] for g in open_) or float(len(open_))
        exact = {g: left * (weight[g] if tot else 1.0) / tot for g in open_}
        give = {g: min(int(exact[g]), cap[g] - share[g]) for g in open_}
        rest = left - sum(give.values())
        for g in sorted(open_, key=lambda g: exact[g] - int(exact[g]), reverse=True):
            if rest <= 0:
                break
            if share[g] + give[g] < cap[g]:
                give[g] += 1
                rest -= 1
        if not sum(give.values()):
            break
        for g in open_:
            share[g] += give[g]
        left = quota - sum(share.values())
    return share
