"""Alignment decided by measured latency: width rounding is kept only where it measures faster.

`align_widths` proposes widths in multiples of the SIMD block; that is an assumption about the kernels,
and it was wrong on a user's depthwise-separable CNN (the freeze revived 71 groups and cut the stem from
32 to 8 channels for a 1.02× speedup, accuracy 96.7% → 88.7%) and on another machine of the same kind.
So the proposal is measured: the whole aligned pattern against the unaligned one first, then each layer
whose width alignment changed, reverted alone to the optimizer's width. A change stays only if reverting
it measures slower by more than `margin` — the optimizer's pattern wins ties, and no group is revived or
removed for alignment unless the latency says it pays.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compress.budget.patterns import kept_widths
from compress.structure.cost_model import CostModel

# meter(mask, tag) → latency of the extracted pattern as a ratio to the dense model (LatencyModel.measure's
# "ratio"; a test passes a table)
Meter = Callable[[torch.Tensor, str], float]


def measured_alignment(
    cm: CostModel,
    pre: torch.Tensor,
    aligned: torch.Tensor,
    kind: str,
    target: float,
    meter: Meter,
    margin: float = 0.03,
    max_probes: int = 8,
    floor: float | None = None,
    log=None,
) -> tuple[torch.Tensor, dict]:
    """(mask, report): `aligned` where its width changes measure faster than `pre`'s, `pre` elsewhere.

    Reverting a layer must keep the `kind` cost ≤ `target` and, if given, ≥ `floor` (else the aligned width
    stays, noted so: reverting only the layers whose alignment revived groups would leave a mix cheaper
    than both patterns — digits-resnet at 0.1 FLOPs ended at 0.064 so);
    at most `max_probes` layers are probed, the largest width changes first. The report holds the
    predicted (blocked-FLOP) and measured speedups of the unaligned, aligned and chosen patterns.
    """
    log = log or (lambda msg: None)
    w_pre, w_al = kept_widths(cm, pre), kept_widths(cm, aligned)
    r_pre, r_al = meter(pre, "unaligned pattern"), meter(aligned, "aligned pattern")
    report = {"margin": margin, "unaligned": _point(cm, pre, r_pre), "aligned": _point(cm, aligned, r_al), "layers": []}
    if r_al > r_pre * (1 - margin):  # alignment as a whole does not pay here
        report.update(decision="unaligned", chosen=report["unaligned"])
        log(
            f"budget: alignment measured {1 / r_al:.2f}× vs unaligned {1 / r_pre:.2f}× — not worth it, kept the "
            "optimizer's widths"
        )
        return pre.clone(), report
    mask, r_cur = aligned.clone(), r_al
    changed = sorted(
        (li for li, name in enumerate(cm.layers) if w_pre[name] != w_al[name]),
        key=lambda li: -abs(w_pre[cm.layers[li]] - w_al[cm.layers[li]]),
    )
    for li in changed[:max_probes]:
        name, members = cm.layers[li], torch.nonzero(cm._layer_of == li).flatten()
        trial = mask.clone()
        trial[members] = pre[members]
        row = {"layer": name, "width_unaligned": w_pre[name], "width_aligned": w_al[name]}
        c = float(cm.cost(trial, kind))
        if c > target or (floor is not None and c < floor):
            why = "exceeds the budget" if c > target else "leaves the budget's window unused"
            report["layers"].append({**row, "kept": "aligned", "why": f"the unaligned width alone {why}"})
            continue
        r = meter(trial, f"{name} unaligned")
        pays = r > r_cur * (1 + margin)
        row.update(kept="aligned" if pays else "unaligned", speedup_with=1 / r_cur, speedup_without=1 / r)
        report["layers"].append(row)
        if not pays:
            mask, r_cur = trial, r
    report.update(decision="aligned" if bool((mask != pre).any()) else "unaligned", chosen=_point(cm, mask, r_cur))
    log(
        f"budget: alignment measured: unaligned {1 / r_pre:.2f}×, aligned {1 / r_al:.2f}×, chosen {1 / r_cur:.2f}× "
        f"({sum(r['kept'] == 'aligned' for r in report['layers'])} of {len(changed)} changed widths kept)"
    )
    return mask, report


def _point(cm: CostModel, mask: torch.Tensor, ratio: float) -> dict:
    """Predicted (dense / blocked FLOPs) and measured (dense / latency) speedup of a pattern, and its widths."""
    return {
        "predicted_speedup": 1 / float(cm.cost(mask, "flops_blocked")),
        "measured_speedup": 1 / ratio,
        "flops": float(cm.cost(mask, "flops")),
        "widths": kept_widths(cm, mask),
    }
