"""Grouped convolutions (ResNeXt/RegNet blocks): whole conv groups are offered and removed exactly.

References are independent of the code under test: the unmodified model with the removed
groups' slices zeroed (the extracted model must compute the same), and a block built afresh
with the smaller width and group count (FLOPs and parameters must equal it).
"""

import pytest
import torch
from torch import nn

from compress.deploy.export import export_onnx
from compress.deploy.extract import extract
from compress.structure.cost import count_flops, count_params
from compress.structure.cost_model import CostModel
from compress.structure.find import find_groups
from compress.structure.sparsity import zero_mask


class Block(nn.Module):
    """1x1 → grouped 3x3 (G groups of `w // G` channels) → [SE] → 1x1, residual, head."""

    def __init__(self, w=24, G=4, se=False, cin=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, cin, 3, padding=1), nn.BatchNorm2d(cin), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(cin, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(w, w, 3, padding=1, groups=G, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.se = (
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(w, 4, 1), nn.ReLU(), nn.Conv2d(4, w, 1), nn.Sigmoid())
            if se
            else None
        )
        self.c = nn.Sequential(nn.Conv2d(w, cin, 1, bias=False), nn.BatchNorm2d(cin))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 5))

    def forward(self, x):
        x = self.stem(x)
        y = self.b(self.a(x))
        if self.se is not None:
            y = y * self.se(y)
        return self.head(torch.relu(x + self.c(y)))


def _randomized(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model.eval()


def _zero(groups, which):
    with torch.no_grad():
        for i in which:
            for s, t in zip(groups[i].slices, groups[i].tensors):
                t.index_fill_(s.dim, torch.tensor(s.indices), 0.0)


@pytest.mark.parametrize("se", [False, True])
def test_whole_conv_groups_are_offered_and_removed_exactly(se, tmp_path):
    torch.manual_seed(0)
    model, x = _randomized(Block(se=se)), torch.rand(2, 3, 8, 8)
    gl = find_groups(model, x)
    conv = [i for i, g in enumerate(gl) if g.layer == "b.0"]
    assert [gl[i].name for i in conv] == [f"b.0:group{j}" for j in range(4)]
    assert all(gl[i].kind == "convgroup" for i in conv)
    # group j: producer rows, BN and grouped-conv rows of channels 6j..6j+5 (the conv's weight keeps its columns)
    rows = tuple(range(6, 12))
    want = {
        ("a.0.weight", 0),
        ("a.1.weight", 0),
        ("a.1.bias", 0),
        ("b.0.weight", 0),
        ("b.1.weight", 0),
        ("b.1.bias", 0),
    }
    assert {(s.param, s.dim) for s in gl[conv[1]].slices} == want
    assert all(s.indices == rows for s in gl[conv[1]].slices)
    deps = {(s.param, s.dim): s.indices for s in gl[conv[1]].dependents}
    assert deps[("c.0.weight", 1)] == rows and ("b.0.weight", 1) not in deps
    if se:
        assert deps[("se.1.weight", 1)] == rows and deps[("se.3.weight", 0)] == rows

    _zero(gl, [conv[1], conv[3]])
    with torch.no_grad():
        ref = model(x)  # the unmodified model, those groups zeroed
    small, rep = extract(model, gl, x)
    b = small.b[0]
    assert (b.groups, b.in_channels, b.out_channels, tuple(b.weight.shape)) == (2, 12, 12, (12, 6, 3, 3))
    with torch.no_grad():
        assert float((small(x) - ref).abs().max()) <= 1e-5
    fresh = Block(w=12, G=2, se=se)
    assert count_flops(small, x) == count_flops(fresh, x) == rep["flops_after"]
    assert count_params(small) == count_params(fresh) == rep["params_predicted"]
    assert CostModel(model, gl, x).flops(zero_mask(gl)) == count_flops(fresh, x)
    assert export_onnx(small, x, tmp_path / "m.onnx")["max_abs_diff"] <= 1e-4


def test_all_conv_groups_zero_keeps_one():
    model, x = _randomized(Block()), torch.rand(1, 3, 8, 8)
    gl = find_groups(model, x)
    _zero(gl, [i for i, g in enumerate(gl) if g.layer == "b.0"])
    small, rep = extract(model, gl, x)
    assert (small.b[0].groups, small.b[0].out_channels) == (1, 6)
    assert "kept b.0:group0" in rep["layers"]["b.0"]["note"]


def test_depthwise_convolution_still_gives_channel_groups():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)
    )
    x = torch.rand(1, 3, 6, 6)
    model(x)
    gl = find_groups(model, x)
    assert [g.kind for g in gl if g.layer == "0"] == ["channel"] * 8


class Coupled(nn.Module):
    """A grouped conv inside a residual: its input and output channels are the same channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.out(torch.relu(y + self.g(y)))


def test_grouped_conv_coupled_to_its_own_input_is_refused_with_the_reason():
    gl = find_groups(Coupled().eval(), torch.rand(1, 3, 6, 6))
    reasons = [(ly, r) for ly, r in gl.not_prunable]
    assert any(ly == "g" and "input and output channels are coupled" in r for ly, r in reasons)
    assert any(ly == "a" and "grouped convolution g" in r for ly, r in reasons)
    assert not [g for g in gl if g.layer in ("a", "g")]


def test_grouped_conv_on_the_network_input_is_refused():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 2, 1))
    gl = find_groups(model, torch.rand(1, 4, 6, 6))
    assert "no layer produces these channels" in dict(gl.not_prunable)["0"]
    assert gl == []
