"""The budget controller: how much each pruning round may remove, and how λ moves.

The method's rounds commit the units whose gates (or weights) have fallen below their learned
thresholds, and an adaptive λ scales the push (``λ (L_res + L_thr)``) that drives them there.
Left to itself that loop ignores the epoch budget: the first round is decided by noise, and
later rounds shrink the excess geometrically without ever reaching the target. The controller
plans against the budget instead:

* **quota**: each round may remove at most a share of the remaining excess over its goal,
  from the rounds left in the budget. ``cubic`` (default) follows Zhu & Gupta's gradual
  schedule: after round ``k`` of ``K`` the excess is ``(1 - k/K)^3`` of where it started,
  which, planned from the excess left now, is ``1 - ((R - 1) / R)^3`` of it with ``R``
  rounds left (this one included). It front-loads pruning while the network is redundant
  and slows down near the target. ``linear`` removes ``excess / R``. Both re-plan from the
  count reached, so a round that fell short is made up by the ones after it.
* **commit**: the driver offers the round's units furthest below their thresholds first and
  commits the shortest such prefix that meets the round's goal (``now - quota``), never more.
* **deadline**: the last round of the budget lands on the goal itself: when the units below
  threshold do not get there, the units *closest to* their thresholds are added, in that
  order, so a search with a few rounds always ends within the landing tolerance.
* **λ** starts above 0 and moves multiplicatively toward the rate that delivers the quota:
  a round whose supply (what every unit below threshold would have removed) fell short of
  its quota raises λ by ``quota / supply`` (between ``lambda_grow_min`` and
  ``lambda_grow_max``). It is never cut because the model is still above its target (the
  old rule that froze λ); it eases only when the thresholds supplied more than
  ``ease_above`` times the quota, down to that rate (at most ``1 / lambda_grow_max`` per
  round): a λ far above the quota's rate pushes the live thresholds past most gates between
  rounds, and training accuracy collapses even though the rounds commit only the quota.
  While λ is 0 nothing is pruned, except at the deadline.

The controller holds no tensors: its state is a small dict that a driver keeps in its
checkpointed ``state`` (the :class:`~granular.driver.searcher.Searcher` passes its own
``state``, so ``state["lambda"]`` is the one λ). It decides; the driver applies
(:mod:`granular.driver.rounds`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["BudgetController", "RoundPlan", "rounds_left"]


@dataclass(frozen=True)
class RoundPlan:
    """What one round may do.

    Attributes:
        goal: the count the round works towards: it commits units until the count is at or
            below ``goal``, and no further.
        quota: ``now - goal``, the most the round may remove.
        deadline: the last round of the budget: reach ``goal`` even past the thresholds.
    """

    goal: int
    quota: int
    deadline: bool


class BudgetController:
    """Plans pruning rounds against an epoch budget and adapts λ (module docstring).

    Args:
        schedule: ``"cubic"`` or ``"linear"``.
        lambda_init: λ at the first round (above 0; 0 disables pruning before the deadline).
        lambda_grow_min, lambda_grow_max: bounds of one raise of λ.
        lambda_max: λ never grows past this.
        state: a :meth:`state_dict` to continue from; the dict is updated in place.
    """

    def __init__(self, schedule: str = "cubic", lambda_init: float = 1e-2, *, lambda_grow_min: float = 1.5,
                 lambda_grow_max: float = 4.0, lambda_max: float = 1e3, ease_above: float = 2.0,
                 state: dict[str, Any] | None = None):
        if schedule not in ("cubic", "linear"):
            raise ValueError(f"schedule must be 'cubic' or 'linear', not {schedule!r}")
        self.schedule = schedule
        self.lambda_grow_min, self.lambda_grow_max, self.lambda_max = lambda_grow_min, lambda_grow_max, lambda_max
        self.ease_above = ease_above
        # ``state`` is used in place (not copied), so a driver can keep it inside its own state
        self.state: dict[str, Any] = state if state is not None else {}
        self.state.setdefault("lambda", float(lambda_init))
        self.state.setdefault("rounds", 0)

    @property
    def lam(self) -> float:
        """The current λ."""
        return float(self.state["lambda"])

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def share(self, rounds_left: int) -> float:
        """The fraction of the remaining excess this round removes, with ``rounds_left`` rounds
        left in the budget, this one included."""
        r = max(int(rounds_left), 1)
        if self.schedule == "linear":
            return 1.0 / r
        return 1.0 - ((r - 1) / r) ** 3

    def plan(self, now: int, goal: int, rounds_left: int) -> RoundPlan:
        """The round's plan, with the count at ``now``, the budget's ``goal`` (the target, or
        a stage's goal) and ``rounds_left`` rounds in the budget (this one included)."""
        excess = now - goal
        deadline = rounds_left <= 1
        if excess <= 0:
            return RoundPlan(goal=now, quota=0, deadline=deadline)
        if deadline:
            return RoundPlan(goal=goal, quota=excess, deadline=True)
        if self.lam <= 0:
            return RoundPlan(goal=now, quota=0, deadline=False)
        quota = max(1, math.ceil(excess * self.share(rounds_left)))
        return RoundPlan(goal=now - quota, quota=quota, deadline=False)

    def update(self, plan: RoundPlan, supply: int) -> str:
        """Adapt λ after a round whose units below threshold would have removed ``supply``
        parameters (before the quota capped them). Returns ``"raise"``, ``"ease"`` or ``"hold"``."""
        self.state["rounds"] = int(self.state["rounds"]) + 1
        if plan.quota <= 0 or plan.deadline or self.lam <= 0:
            return "hold"
        if supply > self.ease_above * plan.quota:
            factor = max(self.ease_above * plan.quota / supply, 1.0 / self.lambda_grow_max)
            self.state["lambda"] = self.lam * factor
            return "ease"
        if supply >= plan.quota:
            return "hold"
        factor = plan.quota / max(supply, 1)
        factor = min(max(factor, self.lambda_grow_min), self.lambda_grow_max)
        self.state["lambda"] = min(self.lam * factor, self.lambda_max)
        return "raise"


def rounds_left(epoch: int, last_epoch: int, due) -> int:
    """How many of the epochs ``epoch .. last_epoch - 1`` end with a round (``due(e)``)."""
    return sum(1 for e in range(epoch, last_epoch) if due(e))
