"""The live-masking cap: between rounds, the live thresholds mask no more than the next round
will commit.

In training mode every gate is thresholded live (:mod:`granular.gates`), so a threshold that
rises past its gates masks them at once, long before a round commits anything. Gates that
start equal (every filter of a trained layer opens at the same σ) move almost in lockstep, so
one threshold passing them masks the whole layer in one epoch: the network then trains through
a state far smaller than the committed one, and its accuracy collapses even though the rounds
commit only their quota (we measured a trained ResNet falling from 94% to 9% training accuracy
in two epochs this way).

The cap keeps the live graph close to the committed one. Before each search epoch the driver
sets ``fraction``: ``live_cap`` times the share of the count the next round is planned to
remove (:meth:`~granular.driver.searcher.Searcher.plan_live_cap`). After every optimiser step:

* each layer's live threshold ``t_β`` is lowered, when needed, so that at most that fraction of
  the layer's kept filters fall below it (to the first gate it may not pass, which stays kept) (a scope's threshold serves all its layers, so it
  takes the smallest of their caps);
* each sum of two or more alive ops keeps at least ``1 - fraction`` of them, and always one,
  live: the ops furthest below their own ``t_α`` stay masked, the others' thresholds drop to
  their gates. A residual branch beside an identity is not capped (counting the
  identity as an input starved the rounds of timm:resnet10t: 96% -> 79-92% accuracy).

Only thresholds move (down), never gates or weights, so the cap changes which units a round
can find below threshold, not how training reaches them: a round's candidates are still the
units the thresholds passed, ranked by how far. Weight thresholds are not capped: magnitudes
are spread, so a rising ``t_ω`` masks weights gradually, not a layer at once.
"""

from __future__ import annotations

import torch

from granular.gates import GateBank

__all__ = ["LiveCap"]


class LiveCap:
    """The cap for one set of stored masks (rebuild it when a round changes them).

    Args:
        bank: the gate bank.
        filter_scope: filter-gate key -> its scope id.
        sums: the op keys of each sum.
    """

    def __init__(self, bank: GateBank, filter_scope: dict[str, str], sums: list[list[str]]):
        self._filters(bank, filter_scope)
        self._ops(bank, sums)

    # ------------------------------------------------------------------ layout (once per round)
    def _filters(self, bank: GateBank, filter_scope: dict[str, str]) -> None:
        def dead(sid):
            return sid in bank.op and float(bank.op[sid].mask) == 0
        keys = [k for k, g in bank.filter.items() if not dead(filter_scope[k]) and float(g.mask.sum()) > 0]
        scopes = sorted({filter_scope[k] for k in keys})
        where = {sid: i for i, sid in enumerate(scopes)}
        self.betas = [bank.filter[k].beta for k in keys]
        self.t_beta = [bank.scopes[sid].t_beta for sid in scopes]
        flat, rows, cols, sizes, offset = [], [], [], [], 0
        for r, k in enumerate(keys):
            kept = torch.nonzero(bank.filter[k].mask > 0).flatten()
            flat.append(kept + offset)
            rows.append(torch.full_like(kept, r))
            cols.append(torch.arange(kept.numel()))
            sizes.append(kept.numel())
            offset += bank.filter[k].beta.numel()
        cat = (lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long))
        self.f_flat, self.f_row, self.f_col = cat(flat), cat(rows), cat(cols)
        self.f_size = torch.tensor(sizes, dtype=torch.long)
        self.f_scope = torch.tensor([where[filter_scope[k]] for k in keys], dtype=torch.long)
        self.f_width = max(sizes, default=0)

    def _ops(self, bank: GateBank, sums: list[list[str]]) -> None:
        # sums of two or more alive ops; a residual branch (one op beside an identity) is not
        # capped: masking it live keeps the identity, and capping it starved the rounds of
        # timm:resnet10t (its blocks are few and large) until the deadline cut 2/3 of the model
        alive = [[k for k in keys if float(bank.op[k].mask) > 0] for keys in sums]
        sums = [s for s in alive if len(s) > 1]
        ops = sorted({k for s in sums for k in s})
        where = {k: i for i, k in enumerate(ops)}
        self.alphas = [bank.op[k].alpha for k in ops]
        self.t_alpha = [bank.scopes[k].t_alpha for k in ops]
        self.o_op = torch.tensor([where[k] for s in sums for k in s], dtype=torch.long)
        self.o_row = torch.tensor([r for r, s in enumerate(sums) for _ in s], dtype=torch.long)
        self.o_col = torch.tensor([c for s in sums for c in range(len(s))], dtype=torch.long)
        self.o_size = torch.tensor([len(s) for s in sums], dtype=torch.long)
        self.o_width = max((len(s) for s in sums), default=0)

    # ------------------------------------------------------------------ per step
    @staticmethod
    def allowed(sizes: torch.Tensor, fraction: float) -> torch.Tensor:
        """How many of ``sizes`` kept units may be masked live: ``⌊fraction · n⌋``, leaving one."""
        return torch.minimum((sizes.double() * fraction).floor().long(), (sizes - 1).clamp_min(0))

    @torch.no_grad()
    def apply(self, fraction: float) -> None:
        """Lower the thresholds that mask more than ``fraction`` of a layer or a sum live."""
        if fraction >= 1.0:
            return
        if self.betas:
            self._cap_filters(fraction)
        if self.alphas:
            self._cap_ops(fraction)

    def _padded(self, rows, cols, values, n_rows, width):
        p = torch.full((n_rows, width), float("inf"), dtype=values.dtype, device=values.device)
        p[rows.to(values.device), cols.to(values.device)] = values
        return p

    def _cap_filters(self, fraction: float) -> None:
        dev = self.betas[0].device
        s = torch.sigmoid(torch.cat([b.detach().flatten() for b in self.betas]))[self.f_flat.to(dev)]
        ordered = self._padded(self.f_row, self.f_col, s, len(self.f_size), self.f_width).sort(dim=1).values
        k = self.allowed(self.f_size, fraction).to(dev)
        # at most k kept filters lie strictly below the (k+1)-th smallest gate. Not a hair below
        # it: near-equal gates differ by far less than any hair, which would then pass them all
        per_layer = ordered.gather(1, k[:, None]).squeeze(1)
        cap = torch.full((len(self.t_beta),), float("inf"), dtype=s.dtype, device=dev)
        cap = cap.scatter_reduce(0, self.f_scope.to(dev), per_layer, reduce="amin")
        t = torch.stack([x.detach() for x in self.t_beta])
        torch._foreach_copy_(self.t_beta, list(torch.minimum(t, cap.to(t.dtype)).unbind()))

    def _cap_ops(self, fraction: float) -> None:
        dev = self.alphas[0].device
        s = torch.sigmoid(torch.stack([a.detach() for a in self.alphas]))
        t = torch.stack([x.detach() for x in self.t_alpha])
        o_op = self.o_op.to(dev)
        margin = (s - t)[o_op]
        padded = self._padded(self.o_row, self.o_col, margin, len(self.o_size), self.o_width)
        rank = padded.argsort(dim=1).argsort(dim=1)[self.o_row.to(dev), self.o_col.to(dev)]
        k = self.allowed(self.o_size, fraction).to(dev)[self.o_row.to(dev)]
        # ops beyond the k furthest below their thresholds get the threshold at their gate
        new = torch.where(rank >= k, torch.minimum(t[o_op], s[o_op]), t[o_op])
        t_new = t.scatter_reduce(0, o_op, new, reduce="amin")
        torch._foreach_copy_(self.t_alpha, list(t_new.unbind()))
