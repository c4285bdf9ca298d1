"""Alignment follows the measurement: with a fake latency table, width changes stay only where the
table says they are faster, and nothing is revived or removed for alignment when it does not pay."""

from __future__ import annotations

import torch

from compress.budget.align_decision import measured_alignment
from compress.models import get_model
from compress.structure.cost_model import CostModel
from compress.structure.find import find_groups


def _setup():
    spec = get_model("digits-resnet")
    torch.manual_seed(0)
    model, x = spec.build(), spec.example_input(1)
    groups = find_groups(model, x)
    return CostModel(model, groups, x)


def _pattern(cm, widths):
    """Zero mask keeping the first `w` groups of layer i (stem, layers.0.conv1, layers.1.conv1)."""
    mask = torch.ones(cm.n_groups, dtype=torch.bool)
    for li, w in enumerate(widths):
        mask[torch.nonzero(cm._layer_of == li).flatten()[:w]] = False
    return mask


def _widths(cm, mask):
    return [int((~mask[cm._layer_of == li]).sum()) for li in range(3)]


def _table(padded: bool, calls: list):
    """latency/dense as a table of widths: padded to blocks of 16 (blocked kernels) or linear in the width."""

    def meter(mask, tag):
        w = _widths(cm_holder[0], mask)
        calls.append(w)
        cost = sum(-(-k // 16) * 16 if padded else k for k in w)
        return cost / (32 + 32 + 32)

    return meter


cm_holder: list = []


def test_alignment_stays_only_in_layers_where_the_table_says_it_pays():
    cm = _setup()
    cm_holder[:] = [cm]
    pre, aligned = _pattern(cm, (31, 19, 13)), _pattern(cm, (32, 16, 16))
    calls: list = []
    mask, rep = measured_alignment(cm, pre, aligned, "flops", 1.0, _table(True, calls), margin=0.01)
    # padded: 19 → 16 saves a block (kept); 31 → 32 and 13 → 16 cost the same padded (reverted)
    assert _widths(cm, mask) == [31, 16, 13]
    assert {r["layer"]: r["kept"] for r in rep["layers"]} == {
        "stem.0": "unaligned",
        "layers.0.conv1": "aligned",
        "layers.1.conv1": "unaligned",
    }
    assert rep["decision"] == "aligned" and calls[:2] == [[31, 19, 13], [32, 16, 16]]
    assert rep["chosen"]["measured_speedup"] == rep["aligned"]["measured_speedup"]  # same padded cost: 96/80
    assert rep["aligned"]["measured_speedup"] > rep["unaligned"]["measured_speedup"]


def test_no_alignment_when_the_table_says_width_is_linear():
    cm = _setup()
    cm_holder[:] = [cm]
    pre, aligned = _pattern(cm, (31, 19, 13)), _pattern(cm, (32, 16, 16))
    calls: list = []
    mask, rep = measured_alignment(cm, pre, aligned, "flops", 1.0, _table(False, calls))
    assert torch.equal(mask, pre) and rep["decision"] == "unaligned" and len(calls) == 2


def test_a_revert_that_breaks_the_budget_keeps_the_aligned_width():
    cm = _setup()
    cm_holder[:] = [cm]
    pre, aligned = _pattern(cm, (31, 19, 13)), _pattern(cm, (32, 16, 16))
    target = float(cm.cost(aligned, "flops"))
    mask, rep = measured_alignment(cm, pre, aligned, "flops", target, _table(True, []), margin=0.01)
    assert float(cm.cost(mask, "flops")) <= target
    rows = {r["layer"]: r for r in rep["layers"]}
    assert float(cm.cost(_pattern(cm, (32, 19, 16)), "flops")) > target  # 19 channels cost more than 16
    assert rows["layers.0.conv1"]["kept"] == "aligned" and "budget" in rows["layers.0.conv1"]["why"]
    assert _widths(cm, mask)[1] == 16


def test_a_revert_that_leaves_the_budget_window_keeps_the_aligned_width():
    """Reverting the layer whose alignment revived groups alone would waste the budget: below `floor` it stays."""
    cm = _setup()
    cm_holder[:] = [cm]
    pre, aligned = _pattern(cm, (31, 19, 13)), _pattern(cm, (32, 16, 16))
    floor = float(cm.cost(_pattern(cm, (32, 16, 13)), "flops")) + 1e-9  # 16 → 13 in the last layer falls below
    mask, rep = measured_alignment(cm, pre, aligned, "flops", 1.0, _table(True, []), margin=0.01, floor=floor)
    rows = {r["layer"]: r for r in rep["layers"]}
    assert rows["layers.1.conv1"]["kept"] == "aligned" and "window" in rows["layers.1.conv1"]["why"]
    assert float(cm.cost(mask, "flops")) >= floor
