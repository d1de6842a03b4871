"""Configuration dataclasses.

Every config validates in ``__post_init__``, carries a version, and round-trips through JSON
(:meth:`GranularConfig.to_json` / :meth:`GranularConfig.from_json`), so each run can write
its resolved config next to its results.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from granular.errors import GranularError

__all__ = ["GranularConfig", "GateConfig", "SearchConfig", "MultiStageConfig", "RetrainConfig", "parse_size",
           "weights_lr"]


class GranularConfig:
    """Base of all configs: JSON round-trip and checks."""

    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["_version"] = self.VERSION
        d["_type"] = type(self).__name__
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        version = d.pop("_version", cls.VERSION)
        d.pop("_type", None)
        if version > cls.VERSION:
            raise GranularError(f"{cls.__name__} version {version} is newer than this granular "
                                f"understands ({cls.VERSION}): upgrade granular")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise GranularError(f"unknown {cls.__name__} field(s) {', '.join(unknown)}: remove them")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                v = d[f.name]
                sub = _nested_config_type(f)
                kwargs[f.name] = sub.from_dict(v) if sub is not None and isinstance(v, dict) else v
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str):
        return cls.from_dict(json.loads(text))

    def _check(self, ok: bool, msg: str) -> None:
        if not ok:
            raise GranularError(f"{type(self).__name__}: {msg}")


def _nested_config_type(f: dataclasses.Field):
    t = f.type if isinstance(f.type, type) else globals().get(str(f.type))
    return t if isinstance(t, type) and issubclass(t, GranularConfig) else None


@dataclass
class GateConfig(GranularConfig):
    """Which units get gates.

    Args:
        op_gates: gate operation units (branches that join a sum) with α.
        filter_gates: gate the output channels of conv/linear layers with β.
        head_gates: gate the heads of attention layers with β too, one gate per head
            (``passes/find_heads.py``); only with ``filter_gates``.
        weight_masks: mask conv/linear weights with ω.
        mask_stem: also mask the layers that read the graph input (the paper: stem
            weights are not gated).
        mask_head: also mask the layers whose outputs reach the graph output (the classifier).
        start: how α and β gates start. ``"identity"``: the gated model computes what the model
            did (the gate is ``2 σ(a)``, 1 at a = 0), so a trained model keeps its accuracy;
            ``"half"``: the paper's ``σ(0) = 0.5``, for models trained from scratch;
            ``"auto"``: ``"half"`` for models that declare it (the search-space presets set
            ``granular_gate_start = "half"``), else ``"identity"``.
    """

    op_gates: bool = True
    filter_gates: bool = True
    head_gates: bool = True
    weight_masks: bool = True
    mask_stem: bool = False
    mask_head: bool = False
    start: str = "auto"

    def __post_init__(self):
        self._check(self.start in ("auto", "identity", "half"), "start must be 'auto', 'identity' or 'half'")


def parse_size(value: str | int | float) -> int:
    """Parse a parameter count such as ``2.2M``, ``700K``, ``1500`` or ``1e6``.

    Raises:
        GranularError: the value is not a positive number with an optional K/M/G suffix.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = float(value)
    else:
        s = str(value).strip().replace("_", "").replace(",", "")
        mult = 1.0
        if s[-1:].upper() in ("K", "M", "G"):
            mult = {"K": 1e3, "M": 1e6, "G": 1e9}[s[-1].upper()]
            s = s[:-1]
        try:
            n = float(s) * mult
        except ValueError:
            raise GranularError(f"'{value}' is not a parameter count: write a number with an "
                                f"optional K or M suffix, e.g. 2.2M or 700K") from None
    if not n > 0 or n != n or n == float("inf"):
        raise GranularError(f"'{value}' is not a positive parameter count: write e.g. 2.2M or 700K")
    return int(round(n))


@dataclass
class SearchConfig(GranularConfig):
    """Algorithm 1 of the paper (adaptive pruning, ``docs/method.md``), with its defaults.

    Args:
        target_params: stop when the exported model's nonzero parameters are at or below this.
        epochs: the most epochs to run (warm-up included) before giving up on the target.
        warmup_epochs: epochs that train the weights only, with λ = 0.
        prune_every: e, the epochs between pruning rounds; None (the default) picks 2, or 1 when
            fewer than 8 epochs follow the warm-up, so a short budget still gets the several
            rounds the budget controller plans with (4 epochs: 4 rounds, not 2).
        batch_size: training batch size.
        lr_weights: the weights' SGD learning rate (constant). None (the default) picks it from
            how the gates start (:attr:`GateConfig.start`): 0.03 for ``"identity"`` (a trained,
            zoo or own model: the rate that measured best when pruning trained models in
            ``benchmarks/versus.py``), 0.01 for ``"half"`` (the search-space presets, where the
            landing figures were measured). :func:`weights_lr` resolves it.
        lr_ramp_epochs: the weights' learning rate rises linearly from 0 to its value over the
            run's first this-many epochs (default 0: no ramp). On a trained model a one-epoch
            ramp halves the first epoch's drop in training accuracy but cost the final model
            about a point at 30% in ``benchmarks/versus.py`` (``docs/benchmarks.md``).
        lr_gates, lr_thresholds, lr_t_omega: SGD learning rates of the other groups.
        weight_decay: on the weights only.
        momentum: SGD momentum for every group.
        grad_clip: gradient-norm clip on the weights.
        threshold_init: ``"min"`` (the journal's rule: the minimum of the current
            granularity parameters) or ``"zero"`` (the released code).
        threshold_margin: thresholds start (and are re-anchored after each round) this
            fraction below the smallest kept gate of their scope, so that no unit is pruned by
            noise before λ has pushed it.
        weight_scale: what ``t_ω`` is measured in: the weight masks compare ``|w| / scale``
            with ``scale`` the mean kept ``|w|`` of the whole model (``"global"``, the
            default: a threshold ranks weights across layers as global magnitude pruning
            does) or of each layer (``"layer"``: about the same share of every layer). On a
            trained ResNet-8 searched to 10% the global scale scored 81.7 ± 0.5% against
            80.8 ± 1.4% (``docs/benchmarks.md``).
        mu: weight of the parameter cost in the resource loss (0 = uniform per-op penalty).
        schedule: the budget controller's per-round quota (:mod:`granular.driver.controller`):
            ``"cubic"`` (Zhu & Gupta's gradual schedule) or ``"linear"`` (excess / rounds left).
        lambda_init: λ when the thresholds are set; None picks the λ that raises a
            threshold by about ``lambda_rise`` per round (from the learning rate, momentum and
            steps per round).
        lambda_rise: the threshold rise per round that the automatic ``lambda_init`` aims at.
        lambda_grow_max: the most one round may multiply λ by.
        live_cap: between rounds the live thresholds may mask at most this many times the
            share of the count the next round removes, of each layer's filters and each sum's
            ops (:mod:`granular.driver.livecap`); 0 lets them mask without limit (the paper).
            0.5 by default: at 1, a round that must remove 60-70% of a trained ResNet masked
            that much of every layer live and training collapsed (``docs/benchmarks.md``).
        land: commit at most each round's quota (the units furthest below their thresholds
            first), and at the last round land on the target.
        land_within: a landing this close below the target (fraction) is good enough;
            further off, the overshooting unit is set aside and the landing retried.
        land_attempts: how many times a landing may be retried.
        bn_recalibration_batches: training batches used after each epoch to re-estimate
            BatchNorm statistics for the committed architecture (0 turns it off).
        gates: which units get gates.
        seed: random seed.
        multi_stage: ``"auto"`` (multi-stage search when the model has 3 or more
            resolutions), ``"on"`` or ``"off"`` (Algorithm 2, ``docs/method.md``).
        single_resolution: what ``multi_stage="on"`` does with a model of one resolution:
            ``"stop"`` with an error, or ``"fallback"`` to a single-stage search.
        stages: the most stages; smaller resolutions merge into the last.
        stage_keep: each stage prunes until its nonzero parameters fall to this fraction of
            their count at the stage start.
        reprune_every: e1, the epochs between re-pruning rounds of earlier stages (the current
            stage uses ``prune_every``, e2).
        regrow: r, the fraction of the ops pruned in a stage that regrowth brings back after
            each stage from the second on (0 disables regrowth).
        aux_fraction: the size of an auxiliary head as a fraction of its stage.
        kernels: the fused Triton conv (``fuse_kernels``): ``"on"`` (stop if it cannot run),
            ``"off"`` (eager gated graph) or ``"auto"``, which keeps the eager graph until the
            kernels have passed their tests and benchmark on a GPU (they are tested under
            triton's interpreter only).
    """

    target_params: int = 0
    epochs: int = 100
    warmup_epochs: int = 5
    prune_every: Optional[int] = None
    batch_size: int = 96
    lr_weights: Optional[float] = None
    lr_ramp_epochs: float = 0.0
    lr_gates: float = 1.0
    lr_thresholds: float = 0.1
    lr_t_omega: float = 0.1
    weight_decay: float = 3e-4
    momentum: float = 0.9
    grad_clip: float = 5.0
    threshold_init: str = "min"
    threshold_margin: float = 0.2
    weight_scale: str = "global"
    mu: float = 0.0
    schedule: str = "cubic"
    lambda_init: Optional[float] = None
    lambda_rise: float = 0.05
    lambda_grow_max: float = 4.0
    live_cap: float = 0.5
    land: bool = True
    land_within: float = 0.01
    land_attempts: int = 8
    bn_recalibration_batches: int = 8
    gates: GateConfig = field(default_factory=GateConfig)
    seed: int = 0
    multi_stage: str = "auto"
    single_resolution: str = "stop"
    stages: int = 3
    stage_keep: float = 0.5
    reprune_every: int = 6
    regrow: float = 0.2
    aux_fraction: float = 0.1
    kernels: str = "auto"

    def __post_init__(self):
        if isinstance(self.gates, dict):
            self.gates = GateConfig.from_dict(self.gates)
        self._check(isinstance(self.target_params, int) and self.target_params >= 0,
                    "target_params must be a non-negative integer")
        self._check(self.epochs >= 1, "epochs must be at least 1")
        self._check(0 <= self.warmup_epochs < self.epochs or self.epochs == 1,
                    "warmup_epochs must be below epochs: lower --warmup-epochs or raise --epochs")
        if self.prune_every is None:
            self.prune_every = 1 if self.epochs - self.warmup_epochs < 8 else 2
        self._check(self.prune_every >= 1, "prune_every must be at least 1")
        self._check(self.batch_size >= 1, "batch_size must be at least 1")
        self._check(self.threshold_init in ("min", "zero"), "threshold_init must be 'min' or 'zero'")
        self._check(0 <= self.threshold_margin < 1, "threshold_margin must be in [0, 1), e.g. 0.2")
        self._check(self.weight_scale in ("global", "layer"), "weight_scale must be 'global' or 'layer'")
        self._check(self.schedule in ("cubic", "linear"), "schedule must be 'cubic' or 'linear'")
        self._check(self.lambda_init is None or self.lambda_init >= 0, "lambda_init must be non-negative")
        self._check(self.lambda_rise > 0, "lambda_rise must be positive")
        self._check(self.lambda_grow_max >= 1.5, "lambda_grow_max must be at least 1.5")
        self._check(self.mu >= 0, "mu must be non-negative")
        self._check(self.live_cap >= 0, "live_cap must be non-negative (0 turns the cap off), e.g. 1")
        self._check(self.bn_recalibration_batches >= 0, "bn_recalibration_batches must be non-negative")
        self._check(self.multi_stage in ("auto", "on", "off"), "multi_stage must be 'auto', 'on' or 'off'")
        self._check(self.single_resolution in ("stop", "fallback"), "single_resolution must be 'stop' or 'fallback'")
        self._check(self.stages >= 2, "stages must be at least 2")
        self._check(0 < self.stage_keep < 1, "stage_keep must be between 0 and 1 (e.g. 0.5)")
        self._check(self.reprune_every >= 1, "reprune_every must be at least 1")
        self._check(0 <= self.regrow <= 1, "regrow must be between 0 and 1 (0 disables regrowth)")
        self._check(0 < self.aux_fraction < 1, "aux_fraction must be between 0 and 1")
        self._check(self.kernels in ("auto", "on", "off"), "kernels must be 'auto', 'on' or 'off'")
        self._check(self.lr_weights is None or self.lr_weights >= 0, "lr_weights must be non-negative")
        self._check(self.lr_ramp_epochs >= 0, "lr_ramp_epochs must be non-negative")
        for name in ("lr_gates", "lr_thresholds", "lr_t_omega"):
            self._check(getattr(self, name) >= 0, f"{name} must be non-negative")


@dataclass
class MultiStageConfig(SearchConfig):
    """A :class:`SearchConfig` that always asks for the multi-stage driver (Algorithm 2 of the
    paper): :func:`granular.search` dispatches on the config's type. ``multi_stage`` is "on"
    unless given; ``single_resolution="fallback"`` still searches a model of one resolution
    in one stage."""

    multi_stage: str = "on"


@dataclass
class RetrainConfig(GranularConfig):
    """How to retrain a discovered architecture.

    Args:
        arch: ``"exact"`` (the exported model) or ``"aligned"`` (the paper's cell widths, ``docs/method.md``).
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


WEIGHTS_LR = {"identity": 0.03, "half": 0.01}  # SearchConfig.lr_weights=None, by gate start


def weights_lr(cfg: SearchConfig, gate_start: str) -> float:
    """The search's learning rate for the weights: ``cfg.lr_weights``, or when it is None the
    default for how the gates started (``"identity"`` or ``"half"``; see :class:`SearchConfig`)."""
    return cfg.lr_weights if cfg.lr_weights is not None else WEIGHTS_LR[gate_start]

