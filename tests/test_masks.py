"""Retention is counted within the surviving units of the coarser granularities."""

from __future__ import annotations

import torch

import granular
from granular.masks import gate_bank, retention
from granular.meta import GATE

from _models import example, user_model


def _gm():
    return granular.prepare(user_model("resnet_like"), example())


def _scope_units(gm, scope):
    """The filter and weight gate keys inside the op ``scope``."""
    out = {"filter": [], "weight": []}
    for n in gm.graph.nodes:
        g = n.meta.get(GATE)
        if g is not None and g.kind in out and g.scope == scope:
            out[g.kind].append(g.key)
    return out


@torch.no_grad()
def test_a_pruned_op_takes_its_filters_and_weights_out_of_the_count():
    gm = _gm()
    bank = gate_bank(gm)
    assert retention(gm) == {"op": 1.0, "filter": 1.0, "weight": 1.0}
    op = next(k for k in bank.op if _scope_units(gm, k)["filter"])
    bank.op[op].mask.zero_()  # its filter and weight masks stay 1, but they are gone from the export
    r = retention(gm)
    assert r["op"] == (len(bank.op) - 1) / len(bank.op)
    assert r["filter"] == 1.0 and r["weight"] == 1.0


@torch.no_grad()
def test_a_pruned_filter_takes_its_row_of_weights_out_of_the_count():
    gm = _gm()
    bank = gate_bank(gm)
    op = next(k for k in bank.op if _scope_units(gm, k)["filter"])
    f = _scope_units(gm, op)["filter"][0]
    n_filters = sum(m.mask.numel() for m in bank.filter.values())
    bank.filter[f].mask[0] = 0
    r = retention(gm)
    assert r["filter"] == (n_filters - 1) / n_filters
    assert r["weight"] == 1.0  # the pruned filter's weights are not counted as kept
    w = next(k for k in _scope_units(gm, op)["weight"] if bank.weight[k].mask.shape[0] == bank.filter[f].mask.numel())
    bank.weight[w].mask[1].view(-1)[0] = 0  # one weight in a kept row
    total = sum(m.mask.numel() for m in bank.weight.values()) - bank.weight[w].mask[0].numel()
    assert retention(gm)["weight"] == (total - 1) / total
