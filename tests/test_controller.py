"""The budget controller alone, on synthetic rounds: quota, λ update, deadline, schedules."""

import pytest

from granular.driver.controller import BudgetController, RoundPlan, rounds_left


def test_cubic_schedule_reaches_the_goal_exactly_on_the_last_round():
    c = BudgetController("cubic", 0.1)
    now, goal, history = 100_000, 10_000, []
    for left in range(6, 0, -1):
        plan = c.plan(now, goal, left)
        assert plan.quota == now - plan.goal and plan.deadline == (left == 1)
        now = plan.goal  # the round delivered its quota
        history.append(now)
    assert history[-1] == goal
    # Zhu & Gupta: after round k of K the excess is (1 - k/K)^3 of the start's
    for k, n in enumerate(history, start=1):
        assert n - goal == pytest.approx(90_000 * (1 - k / 6) ** 3, abs=6)
    # front-loaded: the first round takes the most
    drops = [a - b for a, b in zip([100_000] + history, history)]
    assert drops == sorted(drops, reverse=True)


def test_linear_schedule_shares_the_excess_evenly():
    c = BudgetController("linear", 0.1)
    assert c.plan(10_000, 4_000, 3).quota == 2_000
    assert c.plan(8_000, 4_000, 2).quota == 2_000
    assert c.plan(6_000, 4_000, 1) == RoundPlan(goal=4_000, quota=2_000, deadline=True)


def test_a_round_that_fell_short_is_made_up_by_the_rounds_after_it():
    c = BudgetController("linear", 0.1)
    first = c.plan(10_000, 4_000, 3)
    # nothing was delivered: the next plan shares the whole excess over the two rounds left
    assert c.plan(10_000, 4_000, 2).quota == 3_000 > first.quota


def test_lambda_rises_toward_the_rate_that_delivers_the_quota():
    c = BudgetController("cubic", 0.01, lambda_grow_max=4.0)
    plan = c.plan(10_000, 1_000, 5)
    assert c.update(plan, supply=0) == "raise" and c.lam == pytest.approx(0.04)        # capped at 4x
    assert c.update(plan, supply=plan.quota // 2) == "raise" and c.lam == pytest.approx(0.08)  # 2x short
    assert c.update(plan, supply=int(plan.quota * 0.9)) == "raise" and c.lam == pytest.approx(0.12)  # at least 1.5x
    # a round that supplied its quota, or up to twice it, left the model above its target: λ holds
    assert c.update(plan, supply=plan.quota) == "hold" and c.lam == pytest.approx(0.12)
    assert c.update(plan, supply=plan.quota * 2) == "hold" and c.lam == pytest.approx(0.12)
    assert c.state["rounds"] == 5


def test_lambda_eases_only_when_supply_is_far_above_the_quota():
    c = BudgetController("cubic", 1.0, lambda_grow_max=4.0)
    plan = c.plan(10_000, 1_000, 5)
    assert c.update(plan, supply=plan.quota * 3) == "ease" and c.lam == pytest.approx(2 / 3)  # down to 2x
    assert c.update(plan, supply=plan.quota * 100) == "ease" and c.lam == pytest.approx(2 / 3 / 4)  # at most /4
    # the deadline round decides nothing about λ
    last = c.plan(10_000, 1_000, 1)
    assert c.update(last, supply=0) == "hold" and c.lam == pytest.approx(2 / 3 / 4)


def test_nothing_is_planned_while_lambda_is_zero_except_at_the_deadline():
    c = BudgetController("cubic", 0.0)
    assert c.plan(10_000, 1_000, 4).quota == 0
    assert c.update(c.plan(10_000, 1_000, 4), supply=5_000) == "hold" and c.lam == 0
    assert c.plan(10_000, 1_000, 1) == RoundPlan(goal=1_000, quota=9_000, deadline=True)


def test_a_met_goal_plans_nothing():
    c = BudgetController("cubic", 0.1)
    plan = c.plan(900, 1_000, 3)
    assert plan.quota == 0 and plan.goal == 900
    assert c.update(plan, supply=0) == "hold" and c.lam == pytest.approx(0.1)


def test_state_is_shared_in_place_and_round_trips():
    state: dict = {}
    c = BudgetController("cubic", 0.5, state=state)
    c.update(c.plan(10_000, 0, 3), supply=0)
    assert state["lambda"] == c.lam == pytest.approx(2.0)
    again = BudgetController("cubic", 123.0, state=dict(state))  # lambda_init is ignored on resume
    assert again.lam == pytest.approx(2.0) and again.state["rounds"] == 1


def test_rounds_left_counts_the_due_epochs():
    due = lambda e: e >= 5 and (e + 1 - 5) % 2 == 0  # noqa: E731 - warm-up 5, a round every 2 epochs
    assert rounds_left(0, 30, due) == 12
    assert rounds_left(28, 30, due) == 1
    assert rounds_left(29, 30, due) == 0


def test_bad_schedule_is_rejected():
    with pytest.raises(ValueError, match="schedule"):
        BudgetController("exponential", 0.1)
