"""Example inputs of every form (tensor, tuple, list, dict) are read the same way everywhere."""

from __future__ import annotations

import torch
from torch import nn

from compress.structure.cost import count_flops
from compress.structure.tensors import as_args, call_model, flatten_tensors, to_device


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fa, self.fb = nn.Linear(4, 3), nn.Linear(5, 3)

    def forward(self, a, b):
        return {"sum": self.fa(a) + self.fb(b), "parts": (a, [b])}


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, generator=g), torch.randn(2, 5, generator=g)


def test_every_form_calls_the_model_alike_and_counts_the_same_flops():
    m = TwoInputs()
    a, b = _inputs()
    ref = m(a, b)["sum"]
    # by hand: 2 rows x (4x3 + 5x3) multiply-adds, 2 FLOPs each
    flops = 2 * 2 * (4 * 3 + 5 * 3)
    for x in ((a, b), [a, b], {"a": a, "b": b}):
        assert torch.equal(call_model(m, x)["sum"], ref)
        assert count_flops(m, x) == flops
    single = nn.Linear(4, 3)
    assert torch.equal(call_model(single, a), single(a)) and count_flops(single, a) == 2 * 2 * 4 * 3


def test_as_args_and_flatten_and_to_device():
    a, b = _inputs()
    assert as_args(a) == ((a,), {}) and as_args([a, b]) == ((a, b), {}) and as_args({"b": b}) == ((), {"b": b})
    out = TwoInputs()(a, b)
    assert [t.shape for t in flatten_tensors(out)] == [(2, 3), (2, 4), (2, 5)]
    moved = to_device({"x": (a, [b]), "n": 3}, torch.device("meta"))
    assert moved["x"][0].is_meta and moved["x"][1][0].is_meta and isinstance(moved["x"][1], list)
    assert moved["n"] == 3
