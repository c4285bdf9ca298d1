"""The exact control: from the optimizer's critical λs, the λ whose zero pattern meets the plan — one λ
per kind of group, so attention heads and MLP neurons compete on equal terms.

Why a λ per kind: the exact control zeroes every group whose critical λ*_g (‖a_g‖/(α w_g), a = P W⁰ − V) is below
one λ, so one kind can lose everything first: all-MiniLM-L6-v2 at a 0.5 FLOP target lost 65 of 72
heads (their q/k gradients, hence RAMDA's preconditioner P, are small under distillation). Scaling w_g
by the median λ* of its kind (relative to the median over all groups) is a λ per kind: the median head
and the median neuron become equally hard to keep, while within a kind RAMDA's ranking is unchanged.
With one kind (a CNN's channels) it does nothing.
"""

from __future__ import annotations

import torch


def lam_on_plan(crit: torch.Tensor, plan: float, cost_of, lam0: float) -> tuple[float, float]:
    """(λ, its pattern's cost): the smallest λ whose zero pattern {g: λ*_g ≤ λ} costs ≤ `plan` under
    `cost_of(mask)` (bisection over the sorted λ*); `lam0` when there are no groups."""
    order = torch.argsort(crit)
    vals = crit[order]

    def cost(k):
        m = torch.zeros(len(crit), dtype=torch.bool)
        m[order[:k]] = True
        return cost_of(m)

    lo, hi = 0, len(order)
    if cost(hi) > plan:
        lo = hi
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(mid) <= plan:
            hi = mid
        else:
            lo = mid + 1
    k = lo
    # ties: every group with λ*_g ≤ λ is zero, so take all groups sharing the k-th value
    if k == 0:
        lam = float(vals[0]) * (1 - 1e-6) if len(vals) else lam0
    else:
        lam = float(vals[k - 1]) * (1 + 1e-9)
    lam = max(lam, 1e-12)
    return lam, cost(int((crit <= lam).sum())) if k else cost(0)


def kind_ids(groups) -> torch.Tensor:
    """Per group the index of its kind (first-seen order)."""
    seen: dict[str, int] = {}
    return torch.tensor([seen.setdefault(g.kind, len(seen)) for g in groups], dtype=torch.long)


def balance_factors(base_crit: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """Per group median_kind(λ*) / median_all(λ*) (lower medians, as torch.median), 1 where undefined."""
    crit = base_crit.double()
    overall = float(crit.median()) if len(crit) else 0.0
    factors = torch.ones(len(crit), dtype=torch.float64)
    if overall <= 0 or len(kinds) == 0 or int(kinds.max()) == 0:
        return factors
    for k in torch.unique(kinds).tolist():  # a handful of kinds, not groups
        mine = kinds == k
        m = float(crit[mine].median())
        if m > 0:
            factors[mine] = m / overall
    return factors


class KindBalance:
    """Holds the per-kind factors and writes w_g = w⁰_g · factor_g into the optimizer's group index
    (shared by its step kernels). The factors per kind also go into the optimizer's first param group
    (`kind_factors`), so a checkpoint carries the ones its state was trained with: `restore` puts them
    back into a resumed optimizer before its first step."""

    KEY = "kind_factors"

    def __init__(self, groups):
        self.kinds = kind_ids(groups)
        self.factors: torch.Tensor | None = None
        self._w0 = torch.tensor([float(g.weight) for g in groups], dtype=torch.float64)  # what the index starts with

    @property
    def active(self) -> bool:
        return len(self.kinds) > 0 and int(self.kinds.max()) > 0

    def _weights(self, opt) -> torch.Tensor | None:
        index = getattr(opt, "index", None)
        weights = getattr(index, "weights", None)
        if weights is None or len(weights) != len(self.kinds):
            return None
        return weights

    def _apply(self, opt, weights: torch.Tensor) -> None:
        weights.copy_(self._w0.to(weights) * self.factors.to(weights))
        per_kind = torch.zeros(int(self.kinds.max()) + 1, dtype=torch.float64)
        per_kind[self.kinds] = self.factors
        opt.param_groups[0][self.KEY] = per_kind.tolist()

    def rebalance(self, opt, crit: torch.Tensor) -> torch.Tensor:
        """New factors from `crit` (computed with the current weights); returns λ* under the new weights."""
        weights = self._weights(opt)
        if weights is None or not self.active:
            return crit
        base = crit.double() * (weights.cpu().double() / self._w0)
        self.factors = balance_factors(base, self.kinds)
        self._apply(opt, weights)
        return (base / self.factors).to(crit.dtype)

    def restore(self, opt) -> None:
        """After a checkpoint's state was loaded into `opt`: its factors back into the group weights."""
        saved = opt.param_groups[0].get(self.KEY) if opt.param_groups else None
        weights = self._weights(opt)
        if saved is None or weights is None:
            return
        self.factors = torch.tensor(saved, dtype=torch.float64)[self.kinds]
        self._apply(opt, weights)
