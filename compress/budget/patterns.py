"""Zero patterns at a budget: enforce, revive, align widths; and keeping a frozen pattern zero."""

from __future__ import annotations

import math

import torch

from compress.errors import UserError
from compress.optim.interface import as_structured
from compress.structure.cost_model import CostModel


class ZeroKeeper:
    """Keeps a fixed set of groups exactly zero: in the parameters and in the optimizer's state buffers it names (`frozen_state_keys`: RAMDA's Ŵ and W⁰, Adam's
    moments), so a frozen entry's state never feeds a survivor's update.

    The (tensor, dim, indices) triples are built once, so re-zeroing after every optimizer
    step is a few `index_fill_` calls per parameter, not a loop over groups.
    """

    def __init__(self, groups, mask: torch.Tensor):
        by_pd: dict[tuple[int, int], tuple[torch.Tensor, int, list]] = {}
        for i in torch.nonzero(torch.as_tensor(mask, dtype=torch.bool)).flatten().tolist():
            g = groups[i]
            for s, t in zip(g.slices, g.tensors):
                by_pd.setdefault((id(t), s.dim), (t, s.dim, []))[2].extend(s.indices)
        self.items = [
            (t, d, torch.tensor(sorted(set(ix)), dtype=torch.long, device=t.device)) for t, d, ix in by_pd.values()
        ]

    @torch.no_grad()
    def apply(self, optimizer=None) -> None:
        """Zero the groups in the parameters and in the buffers `optimizer.frozen_state_keys()` names."""
        keys = as_structured(optimizer).frozen_state_keys() if optimizer is not None else ()
        for t, d, ix in self.items:
            t.index_fill_(d, ix, 0.0)
            st = optimizer.state.get(t) if optimizer is not None else None
            if st:
                for k in keys:
                    buf = st.get(k)
                    if isinstance(buf, torch.Tensor) and buf.shape == t.shape:
                        buf.index_fill_(d, ix, 0.0)


# --------------------------------------------------------------------------- enforcement


def enforce(cm: CostModel, zero: torch.Tensor, norms: torch.Tensor, kind: str, target: float):
    """The zero pattern that holds the target: `zero` plus the fewest weakest groups.

    Groups are ranked by ‖Ŵ_g‖ per unit of cost they save (first-order, at `zero`); the
    smallest prefix of that ranking whose removal brings the exact cost to ≤ target is
    found by bisection (the cost never rises when groups are added). Returns (mask, added).
    """
    zero = torch.as_tensor(zero, dtype=torch.bool).clone()
    if cm.cost(zero, kind) <= target:
        return zero, torch.zeros_like(zero)
    sav = cm.savings(zero, kind)
    score = norms.double() / sav.clamp_min(1e-300)
    score[zero] = math.inf
    score[sav <= 0] = math.inf  # removing it saves nothing (first order): last resort
    order = torch.argsort(score, stable=True)[: int((~zero).sum())]
    lo, hi = 0, len(order)  # cost(prefix hi) ≤ target is guaranteed by check_reachable

    def with_prefix(k):
        m = zero.clone()
        m[order[:k]] = True
        return m

    if cm.cost(with_prefix(hi), kind) > target:
        raise UserError(
            f"the {kind} target {target:g} cannot be reached even with every group removed ({cm.minimum(kind):.4f})"
        )
    while lo < hi:
        mid = (lo + hi) // 2
        if cm.cost(with_prefix(mid), kind) <= target:
            hi = mid
        else:
            lo = mid + 1
    mask = with_prefix(lo)
    return mask, mask & ~zero


def revive(cm: CostModel, zero: torch.Tensor, strength: torch.Tensor, kind: str, target: float):
    """Give back zero groups while the cost stays ≤ target (the controller overshot): the
    strongest first by `strength` per unit of cost (e.g. ‖W_g‖ of the iterate). Returns (mask, revived)."""
    zero = torch.as_tensor(zero, dtype=torch.bool).clone()
    cands = torch.nonzero(zero).flatten()
    if not len(cands):
        return zero, torch.zeros_like(zero)
    # cost per group if it alone came back: savings at the pattern with it removed ≈ savings at zero \ {g}
    back = cm.savings(torch.zeros_like(zero), kind)[cands]  # dense-model cost of the group, for ranking only
    score = strength.double()[cands] / back.clamp_min(1e-300)
    order = cands[torch.argsort(score, descending=True, stable=True)]

    def without(k):
        m = zero.clone()
        m[order[:k]] = False
        return m

    lo, hi = 0, len(order)
    while lo < hi:  # largest k with cost(without k) ≤ target
        mid = (lo + hi + 1) // 2
        if cm.cost(without(mid), kind) <= target:
            lo = mid
        else:
            hi = mid - 1
    mask = without(lo)
    return mask, zero & ~mask


def _aligned_once(cm: CostModel, zero, weak, strong, kind, target, align, kinds, floor=None):
    """One alignment pass (see `align_widths`): round down per layer, then give back blocks greedily;
    below `floor`, exchange moves (one width some blocks down, then the greedy again) while the cost rises."""
    members = [torch.nonzero(cm._layer_of == li).flatten() for li in range(len(cm.layers))]
    active = [li for li, m in enumerate(members) if kinds[int(m[0])] != "head" and len(m) >= align]
    sub = 8 if align > 8 and align % 8 == 0 else align  # below one block: ORT's smallest block (AVX2)

    def valid(k, n):
        """Widths that need no rounding: multiples of `align`, below it multiples of `sub`, below
        `sub` anything (rounding down would empty the layer), and the full width."""
        return k == n or k < sub or k % (align if k >= align else sub) == 0

    def next_valid(k, n):
        if k >= align:
            return min(n, (k // align + 1) * align)
        return min(n, align, (k // sub + 1) * sub)

    def drop_weakest(mask, li, n):
        m = members[li]
        kept = m[~mask[m]]
        by_weak = kept[torch.argsort(strong[kept], stable=True)]
        by_weak = by_weak[torch.argsort(weak[by_weak], stable=True)]  # ‖Ŵ_g‖, ties by ‖W_g‖
        mask[by_weak[:n]] = True

    def give_back(mask, skip=None):
        """The strongest whole block (per unit of cost) that still fits, until none fits."""
        while True:
            blocks = []
            for li in active:
                m = members[li]
                k = int((~mask[m]).sum())
                if k == len(m) or li == skip:
                    continue
                need = next_valid(k, len(m)) - k
                cand = m[mask[m]]
                blocks.append(cand[torch.argsort(strong[cand], descending=True, stable=True)[:need]])
            if not blocks:
                return mask
            trials = mask.expand(len(blocks), -1).clone()
            for j, b in enumerate(blocks):
                trials[j, b] = False
            cost = torch.as_tensor(cm.cost(trials, kind), dtype=torch.float64).reshape(-1)
            fits = cost <= target
            if not bool(fits.any()):
                return mask
            base = float(cm.cost(mask, kind))
            score = torch.tensor([float(strong[b].sum()) for b in blocks], dtype=torch.float64) / (
                cost - base
            ).clamp_min(1e-300)
            score[~fits] = -math.inf
            mask[blocks[int(torch.argmax(score))]] = False

    mask = zero.clone()
    for li in active:  # round down: each width drops its weakest extra groups
        k, n = int((~mask[members[li]]).sum()), len(members[li])
        if not valid(k, n):
            drop_weakest(mask, li, k - max(w for w in range(k) if valid(w, n)))
    mask = give_back(mask)
    best = float(cm.cost(mask, kind))
    improved = True
    while floor is not None and best < floor and improved:
        improved, current = False, mask
        for li in active:
            k, n = int((~current[members[li]]).sum()), len(members[li])
            for lower in [w for w in range(k - 1, sub - 1, -1) if valid(w, n)]:
                trial = current.clone()
                drop_weakest(trial, li, k - lower)
                trial = give_back(trial, skip=li)
                c = float(cm.cost(trial, kind))
                if c > best:
                    mask, best, improved = trial, c, True
    return mask


def align_widths(
    cm: CostModel, groups, zero, weak, strong, kind: str, target: float, align: int, floor: float | None = None
):
    """The zero pattern whose every channel/neuron width keeps a multiple of `align` groups.

    ONNX Runtime's CPU convolutions run in blocks of `simd_block()` channels: on digits-resnet at
    0.5 of the FLOPs (ORT, 1 thread, AVX-512) 16-aligned widths ran 1.62× faster than dense at
    batch 1, the unaligned pattern of the same run 0.85× (examples/budget_table.py). Each width with ≥ `align` kept groups drops its weakest extra ones
    (`weak`: ‖Ŵ_g‖, like `enforce`), then whole blocks of zero groups come back, the strongest
    per unit of cost first (`strong`: ‖W_g‖, like `revive`), while the exact cost stays ≤
    `target`; a give-back takes a width to its next valid size. Valid: multiples of `align`; below
    `align`, multiples of 8 when `align` is a multiple of 8 above it (AVX-512's 16 here: a width
    of 13 runs as 16, while 8 matches AVX2's block and `compress export --align 8`); any width
    below that (rounding down would empty the layer); the full width. Layers of fewer than
    `align` groups and heads are left alone. `zero` must cost ≤ target; so does the result.
    If the aligned cost falls below `floor` (the greedy stops at a cheap corner: digits-resnet at
    0.45 FLOPs, align 8, turned 32;19,9 into 32;16,8 = 0.38 where 16;32,24 = 0.44 fits), exchange
    moves take one width one or more blocks down and run the give-back again while the cost rises
    (the best move per sweep); still below `floor`, `align` is halved (down to 8), then alignment
    is skipped, so a FLOP budget still lands in its window. Returns (mask, info).
    """
    zero = torch.as_tensor(zero, dtype=torch.bool).clone()
    weak, strong = torch.as_tensor(weak).double().cpu(), torch.as_tensor(strong).double().cpu()
    kinds = [g.kind for g in groups]
    info = {
        "align_requested": int(align),
        "align": 1,
        "cost_before": float(cm.cost(zero, kind)),
        "widths_before": kept_widths(cm, zero),
    }
    a = int(align)
    while a > 1:
        mask = _aligned_once(cm, zero, weak, strong, kind, target, a, kinds, floor)
        c = float(cm.cost(mask, kind))
        if floor is None or c >= floor or c >= info["cost_before"]:
            info.update(
                align=a,
                cost=c,
                removed=int((mask & ~zero).sum()),
                given_back=int((zero & ~mask).sum()),
                widths=kept_widths(cm, mask),
            )
            return mask, info
        info.setdefault("rejected", []).append({"align": a, "cost": c, "widths": kept_widths(cm, mask)})
        a = a // 2 if a // 2 >= 8 else 1
    info.update(cost=info["cost_before"], removed=0, given_back=0, widths=info["widths_before"])
    return zero, info


def kept_widths(cm: CostModel, mask) -> dict:
    """Groups kept per layer (what extraction leaves: an all-zero layer keeps one)."""
    removed = cm.removed(mask).long()
    cut = torch.zeros(len(cm.layers), dtype=torch.long).index_add_(0, cm._layer_of, removed)
    return dict(zip(cm.layers, (cm._layer_size - cut).tolist()))
