"""One epoch of the search: thresholds, training steps, BatchNorm recalibration, validation,
and what keeps the ranks of a data-parallel search alike (:mod:`granular.distributed`)."""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from granular import distributed
from granular.masks import mask_buffers
from granular.metrics import count_correct

__all__ = ["TrainingMixin"]


class TrainingMixin:
    """Training, recalibration and evaluation of :class:`~granular.driver.searcher.Searcher`."""

    @torch.no_grad()
    def init_thresholds(self) -> None:
        """Set every threshold by the configured rule (``docs/method.md``, "Threshold initialisation")."""
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

    def evaluate(self, model: nn.Module) -> Optional[float]:
        """Top-1 validation accuracy of ``model`` (None without validation data)."""
        if not hasattr(self.data, "val_loader"):
            return None
        (correct,), tot = count_correct(model, self.data.val_loader(), self.device)
        if distributed.is_distributed():  # each rank saw its shard of the validation set
            correct, tot = (int(v) for v in distributed.all_reduce_sum([correct, tot]))
        return correct / tot if tot else None

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
        for k, v in sorted(mask_buffers(self.bank).items()):
            h.update(k.encode())
            h.update(v.detach().to("cpu", torch.uint8).numpy().tobytes())
        return h.hexdigest(), json.dumps(self.state, sort_keys=True, default=str)
