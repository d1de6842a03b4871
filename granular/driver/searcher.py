"""The single-stage search driver: Algorithm 1 of the paper (adaptive pruning).

One-level SGD trains the weights, the gates (α, β) and the thresholds (t_α, t_β, t_ω) on
the training batch with ``L = CE + λ (L_res + L_thr)`` (:mod:`~granular.driver.optim`). After
``warmup_epochs`` of weights-only training the thresholds are initialised a margin below the
gates (``min`` rule) and λ is set; then every ``prune_every`` epochs a pruning round
(:mod:`~granular.driver.rounds`), planned by the budget controller
(:mod:`~granular.driver.controller`) against the rounds left in the epoch budget:

1. the round's quota comes from the remaining excess over the target and the rounds left;
2. the units below their thresholds are committed furthest below first, at most the quota;
   the last round lands on the target, past the thresholds if it must;
3. the last op of every sum and filter of every layer are protected; the exported model is
   counted exactly (:func:`granular.count_params`) and the search stops at the target;
4. λ rises when the thresholds supplied less than the quota, and the thresholds of units the
   quota left below them are re-anchored under them.

The driver never edits the graph: pruning only changes stored masks (buffers).

Under ``torchrun`` the search runs data-parallel (:mod:`granular.distributed`): each process
trains on its shard of every global batch, gradients are averaged after each ``backward``,
parameters and buffers are copied from rank 0 after each epoch's training (BatchNorm running
statistics included) and after BatchNorm recalibration, validation counts are summed over the
ranks, and every rank then takes the same pruning decisions from the same numbers (checked
each epoch). Only rank 0 writes the checkpoint and the metrics log, and shows progress.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.fx as fx

from granular import distributed
from granular.accounting import ParamCount, count_params
from granular.api import export
from granular.config import SearchConfig
from granular.driver.checkpoint import CheckpointMixin
from granular.driver.controller import rounds_left
from granular.driver.optim import OptimMixin, structure
from granular.driver.rounds import RoundMixin
from granular.driver.training import TrainingMixin
from granular.errors import GranularError
from granular.masks import gate_bank, retention, threshold_means
from granular.passes.pipelines import training_graph

__all__ = ["Searcher", "SearchResult", "check_kernels"]


@dataclass
class SearchResult:
    """What :func:`granular.search` returns.

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


class Searcher(OptimMixin, TrainingMixin, RoundMixin, CheckpointMixin):
    """Runs Algorithm 1 on a gated graph. Use :func:`granular.search` unless you need the pieces.

    The parts live in their own modules: optimisers and losses (:class:`OptimMixin`), training,
    recalibration and evaluation (:class:`TrainingMixin`), the pruning round
    (:class:`RoundMixin`) and checkpoints (:class:`CheckpointMixin`); this class holds the
    state and the loop, and the hooks a multi-stage search overrides.
    """

    def __init__(self, gm: fx.GraphModule, data, config: SearchConfig, *, run_dir: Path | None = None,
                 progress: bool = True, device: str | torch.device = "cpu", val_loader_fn=None):
        self.gm = gm
        self.device = torch.device(device)
        self.data = data
        self.cfg = config
        self.run_dir = Path(run_dir) if run_dir else None
        self.progress = progress and distributed.is_main()  # rank 0 alone shows progress
        self.bank = gate_bank(gm)
        self.struct = structure(gm)
        c = config
        self.opt_w = self.opt_a = None
        self.state: dict[str, Any] = {"epoch": 0, "lambda": 0.0, "lambda_started": False, "rounds": 0,
                                      "params": None, "done": False, "reached": False,
                                      "thresholds_initialised": False, "op_cost": {}}
        self.history: list[dict] = []
        self._active_cache = None
        self._update_op_cost()  # μ acts from the first step, not only after round 1
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

    def build_net(self, module: Optional[fx.GraphModule] = None, **stage) -> fx.GraphModule:
        """The graph that training runs (:func:`granular.passes.pipelines.training_graph`): the
        gated graph without its pruned ops, on fused kernels when ``cfg.kernels`` asks for them;
        rebuilt whenever op masks change."""
        return training_graph(self.gm if module is None else module, kernels=self.cfg.kernels, **stage)

    # ----------------------------------------------------------------- the loop's hooks
    def before_epoch(self) -> None:
        """Called before each epoch (a multi-stage search moves between phases here)."""

    def in_warmup(self) -> bool:
        """Whether this epoch trains the weights only."""
        return self.state["epoch"] < self.cfg.warmup_epochs

    def round_due(self, epoch: Optional[int] = None) -> Optional[dict[str, Any]]:
        """Keyword arguments of :meth:`pruning_round` if ``epoch`` (default: this one) ends
        with one, else None."""
        cfg = self.cfg
        e = self.state["epoch"] if epoch is None else epoch
        k = e + 1 - cfg.warmup_epochs
        return {} if k > 0 and k % cfg.prune_every == 0 else None

    def budget_end(self) -> int:
        """The epoch the current budget ends at (a multi-stage phase ends before the search)."""
        return self.cfg.epochs

    def rounds_left(self) -> int:
        """Rounds left in the budget, this epoch's included: the controller plans with it."""
        return rounds_left(self.state["epoch"], self.budget_end(), lambda e: self.round_due(e) is not None)

    def phase_name(self, warmup: bool) -> str:
        return "warmup" if warmup else "search"

    def plan_live_cap(self) -> None:
        """Before a search epoch: the share of each layer's filters and each sum's ops that the
        live thresholds may mask until the next round (:mod:`granular.driver.livecap`):
        ``live_cap`` times the share of the count that round is planned to remove, 0 when no
        round is left in the budget (the live graph is then the committed one)."""
        cfg = self.cfg
        if not cfg.live_cap:
            self.state["live_fraction"] = None
            return
        nxt = next((e for e in range(self.state["epoch"], self.budget_end()) if self.round_due(e) is not None), None)
        fraction = 0.0
        if nxt is not None:
            kw = self.round_due(nxt)
            now = kw["count"]().nonzero if "count" in kw else self.state["params"]
            plan = self.controller().plan(now, self.round_goal(kw.get("goal")), self.rounds_left())
            fraction = min(1.0, cfg.live_cap * plan.quota / max(now, 1))
        self.state["live_fraction"] = fraction

    def after_epoch(self, round_info: dict[str, Any]) -> dict[str, Any]:
        """Called after each epoch's round; returns more fields for the epoch's metrics row."""
        return {}

    # ----------------------------------------------------------------- the loop
    def run(self) -> SearchResult:
        cfg = self.cfg
        from granular.driver.progress import SearchProgress
        if self.state["params"] is None:
            self.state["params"] = count_params(self.gm).nonzero
        with SearchProgress(enabled=self.progress, target=cfg.target_params, epochs=cfg.epochs) as prog:
            while not self.state["done"] and self.state["epoch"] < cfg.epochs:
                epoch = self.state["epoch"]
                self.before_epoch()
                warmup = self.in_warmup()
                if not warmup and not self.state["thresholds_initialised"]:
                    self.init_thresholds()
                if not warmup:
                    self.plan_live_cap()
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
                       **{f"threshold_{k[2:]}": v for k, v in threshold_means(self.gm).items()},
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
