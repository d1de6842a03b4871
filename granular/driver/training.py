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
from granular.errors import GranularError
from granular.masks import mask_buffers
from granular.metrics import count_correct

__all__ = ["TrainingMixin"]


class TrainingMixin:
    """Training, recalibration and evaluation of :class:`~granular.driver.searcher.Searcher`."""

    @torch.no_grad()
    def _scope_minima(self, scopes=None) -> dict[str, dict[str, float]]:
        """The smallest kept value each threshold compares, per scope: σ(α) of an alive op,
        σ(β) of its kept filters, ``|w| / scale`` of its kept weights."""
        b, out = self.bank, {}

        def put(sid, name, v):
            if scopes is None or sid in scopes:
                d = out.setdefault(sid, {})
                d[name] = min(d.get(name, float("inf")), v)
        for k, m in b.op.items():
            if float(m.mask) > 0:
                put(k, "t_alpha", float(torch.sigmoid(m.alpha)))
        for k, m in b.filter.items():
            if float(m.mask.sum()) > 0:
                put(self.struct.filter_scope[k], "t_beta", float(torch.sigmoid(m.beta)[m.mask > 0].min()))
        for k, m in b.weight.items():
            kept = m.mask > 0
            if bool(kept.any()):
                put(self.struct.layer_scope[k], "t_omega", float((self.struct.weight_of[k].abs()[kept] / m.scale).min()))
        return out

    @torch.no_grad()
    def init_thresholds(self, scopes=None) -> None:
        """Set the thresholds of ``scopes`` (all by default) by the configured rule
        (``docs/method.md``, "Threshold initialisation"), ``threshold_margin`` below the
        smallest kept value of each scope, so that no unit starts on its threshold (where the
        step's gradient peaks and noise alone would decide). Each weight mask's ``scale``
        becomes the mean kept magnitude of the model (``weight_scale="global"``) or of its
        layer. The first call also sets λ."""
        cfg, b = self.cfg, self.bank
        model_scale = None
        if cfg.weight_scale == "global" and b.weight:
            kept = torch.cat([self.struct.weight_of[k].detach().abs()[m.mask > 0] for k, m in b.weight.items()])
            model_scale = float(kept.mean()) if kept.numel() and float(kept.mean()) > 0 else 1.0
        for k, m in b.weight.items():
            if scopes is None or self.struct.layer_scope[k] in scopes:
                kept = self.struct.weight_of[k].abs()[m.mask > 0]
                layer = float(kept.mean()) if kept.numel() and float(kept.mean()) > 0 else 1.0
                m.scale.fill_(layer if model_scale is None else model_scale)
        keep = 1.0 - cfg.threshold_margin
        minima = self._scope_minima(scopes)
        for sid, scope in b.scopes.items():
            if scopes is not None and sid not in scopes:
                continue
            for name in ("t_alpha", "t_beta", "t_omega"):
                if hasattr(scope, name):
                    v = minima.get(sid, {}).get(name, 0.0)
                    getattr(scope, name).fill_(0.0 if cfg.threshold_init == "zero" else keep * v)
        if not self.state.get("lambda_started"):
            self.state["lambda"] = self.initial_lambda()
            self.state["lambda_started"] = True
        self.state["thresholds_initialised"] = True

    def initial_lambda(self) -> float:
        """``lambda_init``, or the λ whose push ``λ e^(-t)`` on a threshold raises it by about
        ``lambda_rise`` over one round of SGD steps (momentum multiplies a steady push by
        ``1 / (1 - momentum)``).

        A budget of 4 rounds or fewer (a trained model pruned in a few epochs) has no time to
        raise λ round by round from there: its thresholds rise by 4 times their mean margin
        below the gates per round instead, so the first round already finds units below them
        (the live cap, not λ, keeps that from masking more than the round's share). Measured on
        a trained ResNet-8 searched for 4 epochs to 30%: with the slow start the first two
        rounds supplied 7% and 17% of their quotas, and the deadline cut the rest by margin
        alone (41.8% accuracy before fine-tuning); with this start, 81.6%."""
        cfg = self.cfg
        if cfg.lambda_init is not None:
            return float(cfg.lambda_init)
        steps = cfg.prune_every * max(len(self.data.train_loader(self.state["epoch"])), 1)
        lr = max(cfg.lr_thresholds, 1e-12)
        rise = cfg.lambda_rise
        if (cfg.epochs - cfg.warmup_epochs) // cfg.prune_every <= 4:
            rise = max(rise, 4.0 * self._margin_gap())
        return rise * (1.0 - cfg.momentum) / (lr * steps)

    @torch.no_grad()
    def _margin_gap(self) -> float:
        """The mean distance from the α and β thresholds up to the smallest gate of their scope."""
        gaps = [v - float(getattr(self.bank.scopes[sid], name))
                for sid, mins in self._scope_minima().items() for name, v in mins.items() if name != "t_omega"]
        return sum(gaps) / len(gaps) if gaps else 0.0

    @torch.no_grad()
    def anchor_thresholds(self) -> None:
        """After a round: a scope whose kept units are below its threshold (the round's quota
        left them) gets its threshold back ``threshold_margin`` below the smallest of them,
        so the live training graph masks nothing the round did not commit."""
        keep = 1.0 - self.cfg.threshold_margin
        for sid, mins in self._scope_minima().items():
            scope = self.bank.scopes[sid]
            for name, v in mins.items():
                t = getattr(scope, name, None)
                if t is not None and v < float(t):
                    t.fill_(keep * v)

    def train_epoch(self, epoch: int, warmup: bool, bar=None) -> dict[str, float]:
        """One epoch over the training data. Warm-up steps only the weights, so gates and
        thresholds stop requiring gradients for it (and require them again after, however
        the epoch ends)."""
        for p in self._arch:
            p.requires_grad_(not warmup)
        try:
            return self._train_epoch(epoch, warmup, bar)
        finally:
            for p in self._arch:
                p.requires_grad_(True)

    def _train_epoch(self, epoch: int, warmup: bool, bar=None) -> dict[str, float]:
        cfg = self.cfg
        self.net.train()
        loader = self.data.train_loader(epoch)
        lam = 0.0 if warmup else self.state["lambda"]
        tot = correct = skipped = 0
        sum_loss = sum_ce = 0.0
        steps = len(loader)
        for i, (x, y) in enumerate(loader):
            self.set_weights_lr(epoch, i, steps)
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
            norm = nn.utils.clip_grad_norm_(self.weights, cfg.grad_clip)
            if not self._finite_step(loss, norm, warmup):
                skipped += 1
                continue
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
        if skipped * 2 > len(loader):
            raise GranularError(f"the search diverged: {skipped} of {len(loader)} training steps in epoch "
                                f"{epoch + 1} had non-finite losses or gradients; lower the learning rates "
                                f"or --lambda-init, then --resume")
        out = {"loss": sum_loss / max(tot, 1), "ce": sum_ce / max(tot, 1), "train_acc": correct / max(tot, 1)}
        if skipped:
            out["skipped_steps"] = skipped
        return out

    def _finite_step(self, loss: torch.Tensor, weight_norm: torch.Tensor, warmup: bool) -> bool:
        """Whether this step's loss and gradients are finite (``weight_norm``: the weights'
        gradient norm). A non-finite step is dropped (gradients cleared) instead of written
        into the weights, gates and thresholds, where SGD momentum would carry it into every
        later step."""
        ok = bool(torch.isfinite(loss)) and bool(torch.isfinite(weight_norm))
        if ok and not warmup:
            grads = [p.grad for p in self._arch if p.grad is not None]
            ok = not grads or bool(torch.isfinite(nn.utils.get_total_norm(grads)))
        if not ok:
            self.opt_w.zero_grad(set_to_none=True)
            self.opt_a.zero_grad(set_to_none=True)
        return ok

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
