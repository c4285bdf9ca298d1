"""Groups: membership against hand-written expectations, zero-invariance checked numerically."""

import copy
import json
import math

import pytest
import torch
from torch import nn

from compress.errors import UserError
from compress.models.digits import DigitsResNet
from compress.structure.find import find_groups
from compress.structure.group import (
    Group,
    GroupList,
    Slice,
    bind_groups,
    load_groups,
    save_groups,
)
from compress.structure.sparsity import group_norms, group_sparsity, zero_groups


def _zero(group):
    with torch.no_grad():
        for s, t in zip(group.slices, group.tensors):
            t.index_fill_(s.dim, torch.tensor(s.indices), 0.0)


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)


@pytest.fixture
def digits():
    torch.manual_seed(0)
    m = DigitsResNet()
    _randomize_bn(m)
    return m.eval(), torch.rand(3, 1, 8, 8)


def test_digits_groups_match_hand_written_expectation(digits):
    model, x = digits
    gl = find_groups(model, x)
    # 32 residual-stream channels (stem + both blocks' conv2, coupled by the adds)
    # + 32 conv1 channels per block; the classifier's outputs are never offered.
    assert len(gl) == 96
    assert [g.layer for g in gl] == ["stem.0"] * 32 + ["layers.0.conv1"] * 32 + ["layers.1.conv1"] * 32
    assert {g.kind for g in gl} == {"channel"}
    assert [lay for lay, _ in gl.not_prunable] == ["fc"]
    for c in (0, 17, 31):
        g = gl[c]
        assert {(s.param, s.dim, s.indices) for s in g.slices} == {
            ("stem.0.weight", 0, (c,)),
            ("stem.1.weight", 0, (c,)),
            ("stem.1.bias", 0, (c,)),
            ("layers.0.conv2.weight", 0, (c,)),
            ("layers.0.bn2.weight", 0, (c,)),
            ("layers.0.bn2.bias", 0, (c,)),
            ("layers.1.conv2.weight", 0, (c,)),
            ("layers.1.bn2.weight", 0, (c,)),
            ("layers.1.bn2.bias", 0, (c,)),
        }
        assert {(s.param, s.dim, s.indices) for s in g.dependents} == {
            ("layers.0.conv1.weight", 1, (c,)),
            ("layers.1.conv1.weight", 1, (c,)),
            ("fc.weight", 1, (c,)),
        }
        assert g.weight == pytest.approx(math.sqrt(9 + 2 + 2 * (32 * 9 + 2)))
        for b in (0, 1):
            g = gl[32 * (b + 1) + c]
            assert {(s.param, s.dim, s.indices) for s in g.slices} == {
                (f"layers.{b}.conv1.weight", 0, (c,)),
                (f"layers.{b}.bn1.weight", 0, (c,)),
                (f"layers.{b}.bn1.bias", 0, (c,)),
            }
            assert [(s.param, s.dim, s.indices) for s in g.dependents] == [(f"layers.{b}.conv2.weight", 1, (c,))]
            assert g.weight == pytest.approx(math.sqrt(32 * 9 + 2))
    assert all(g.weight == 1.0 for g in find_groups(model, x, weight="unit"))


def _consumer_inputs(model, x, names):
    seen = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0].detach()))
        for n in names
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_zeroed_group_makes_every_consumer_input_exactly_zero(digits):
    model, x = digits
    for gi in (5, 40, 70):
        m = copy.deepcopy(model)
        g = find_groups(m, x)[gi]
        _zero(g)
        consumers = {s.param.rsplit(".", 1)[0]: s for s in g.dependents}
        seen = _consumer_inputs(m, x, list(consumers))
        for name, s in consumers.items():
            inp = seen[name]
            if inp.dim() == 2:  # fc after pooling
                assert torch.all(inp[:, list(s.indices)] == 0)
            else:
                assert torch.all(inp[:, list(s.indices)] == 0), name
                assert inp.abs().sum() > 0  # other channels are alive


def test_sparsity_and_zero_groups_against_brute_force(digits):
    model, x = digits
    gl = find_groups(model, x)
    for i in (0, 3, 40, 95):
        _zero(gl[i])
    # a tiny non-zero entry is not zero (no threshold, no underflow in a squared norm)
    with torch.no_grad():
        model.layers[0].bn1.bias[10] = 0.0
        model.layers[0].conv1.weight[10].zero_()
        model.layers[0].bn1.weight[10] = 1e-30
    zs = [
        i
        for i, g in enumerate(gl)
        if all(
            bool(torch.all(t.index_select(s.dim, torch.tensor(s.indices)) == 0)) for s, t in zip(g.slices, g.tensors)
        )
    ]
    assert zero_groups(gl) == zs == [0, 3, 40, 95]
    sizes = [
        sum(t.index_select(s.dim, torch.tensor(s.indices)).numel() for s, t in zip(g.slices, g.tensors)) for g in gl
    ]
    frac, weighted = group_sparsity(gl)
    assert frac == pytest.approx(4 / 96)
    assert weighted == pytest.approx(sum(sizes[i] for i in zs) / sum(sizes))
    norms = group_norms(gl)
    for i in (1, 42):
        direct = math.sqrt(
            sum(
                float(t.detach().index_select(s.dim, torch.tensor(s.indices)).double().pow(2).sum())
                for s, t in zip(gl[i].slices, gl[i].tensors)
            )
        )
        assert float(norms[i]) == pytest.approx(direct, rel=1e-12)


def test_save_load_round_trip_and_mismatch_errors(digits, tmp_path):
    model, x = digits
    gl = find_groups(model, x)
    p = tmp_path / "groups.json"
    save_groups(p, gl)
    other = DigitsResNet()
    back = load_groups(p, other)
    assert [g.to_json() for g in back] == [g.to_json() for g in gl]
    assert back.not_prunable == gl.not_prunable
    assert back[0].tensors[0] is other.stem[0].weight
    with pytest.raises(UserError, match=r"stem\.0\.weight.*shape \[16, 1, 3, 3\]"):
        load_groups(p, DigitsResNet(channels=16))
    with pytest.raises(UserError, match=r"layers\.1\.\w+\.\w+' is not in the model"):
        load_groups(p, DigitsResNet(blocks=1))
    # a file without shapes still has its indices checked
    data = json.loads(p.read_text())
    data.pop("param_shapes")
    data["groups"][0]["slices"][0][2] = [40]
    p.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"stem:0|stem\.0:0"):
        load_groups(p, DigitsResNet())
    with pytest.raises(UserError, match="does not exist"):
        load_groups(tmp_path / "nope.json", model)


def test_group_json_is_backward_compatible():
    g = Group.from_json(
        {"name": "a:0", "kind": "channel", "layer": "a", "weight": 2.0, "slices": [["a.weight", 0, [0]]]}
    )
    assert g.dependents == [] and g.slices == [Slice("a.weight", 0, (0,))]
    with pytest.raises(ValueError, match="not bound"):
        _ = g.size


class _Act(nn.Module):
    def __init__(self, act, norm=None):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = norm
        self.act = act
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.c1(x)
        if self.norm is not None:
            y = self.norm(y)
        return self.c2(self.act(y)).mean((2, 3))


@pytest.mark.parametrize(
    "act,norm,ok,reason",
    [
        (nn.ReLU(), None, True, None),
        (nn.GELU(), nn.BatchNorm2d(8), True, None),
        (nn.Sigmoid(), None, False, "Sigmoid"),
        (nn.Softplus(), None, False, "Softplus"),
        (nn.ReLU(), nn.GroupNorm(2, 8), False, "GroupNorm"),
        (nn.ReLU(), nn.BatchNorm2d(8, affine=False), False, "affine"),
    ],
)
def test_activation_and_norm_rules(act, norm, ok, reason):
    m = _Act(act, norm)
    gl = find_groups(m, torch.rand(2, 3, 6, 6))
    assert (len(gl) == 8) == ok
    if not ok:
        ((layer, why),) = [(lay, r) for lay, r in gl.not_prunable if lay == "c1"]
        assert reason in why


def test_layernorm_constant_add_not_offered_multihead_attention_heads_are():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 16)
            self.ln = nn.LayerNorm(16)
            self.fc2 = nn.Linear(16, 16)
            self.fc3 = nn.Linear(16, 8)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.ln(self.fc1(x)))
            h = self.fc3(torch.relu(self.fc2(h) + 1.0))
            h, _ = self.mha(h, h, h)
            return self.head(h)

    gl = find_groups(M(), torch.rand(2, 5, 8))
    reasons = dict(gl.not_prunable)
    assert "LayerNorm" in reasons["fc1"]
    assert "add" in reasons["fc2"]
    assert [g.name for g in gl if g.layer == "mha"] == ["mha:head0", "mha:head1"]  # issue 18: heads of MHA
    assert not any(g.layer in ("fc1", "fc2", "head") for g in gl)


def test_mlp_neurons_and_ignored_layers():
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    gl = find_groups(m, torch.rand(2, 4))
    assert [g.kind for g in gl] == ["neuron"] * 11
    assert [(s.param, s.dim, s.indices) for s in gl[0].slices] == [("0.weight", 0, (0,)), ("0.bias", 0, (0,))]
    assert [(s.param, s.dim, s.indices) for s in gl[0].dependents] == [("2.weight", 1, (0,))]
    gl2 = find_groups(m, torch.rand(2, 4), ignored_layers=[m[2]])
    assert len(gl2) == 6 and ("2", "ignored by the caller") in gl2.not_prunable


def test_bind_groups_rejects_missing_parameter():
    g = GroupList([Group("x:0", "channel", "x", [Slice("x.weight", 0, (0,))])])
    with pytest.raises(UserError, match="x.weight"):
        bind_groups(g, nn.Linear(2, 2))


def test_grouped_convolution_is_grouped_whole_not_guessed():
    """Channels of a grouped conv come in whole conv groups (tests/test_grouped_conv.py), never alone."""
    m = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 2, 1))
    gl = find_groups(m, torch.rand(1, 4, 8, 8))
    assert [(g.name, g.kind) for g in gl] == [("2:group0", "convgroup"), ("2:group1", "convgroup")]


def test_layer_that_produces_and_consumes_one_group_keeps_its_input_columns_as_dependents():
    """An expand=1 inverted residual with a shortcut: its projection conv writes the stem's channels
    (out rows, coupled by the add) and reads them (in columns, through the depthwise conv).
    Predicted sizes must equal the really extracted model's parameter count."""
    from compress.deploy.extract import extract, predicted_params
    from compress.models.mobilenetv2 import InvertedResidual, _cbr

    torch.manual_seed(0)
    model = nn.Sequential(
        _cbr(3, 16, 3, 2),
        InvertedResidual(16, 16, 1, 1),
        InvertedResidual(16, 24, 2, 4),
        _cbr(24, 32, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    _randomize_bn(model)
    model.eval()
    x = torch.rand(1, 3, 32, 32)
    gl = find_groups(model, x)
    stem = [g for g in gl if g.layer == "0.0"]
    assert len(stem) == 16
    for c, g in enumerate(stem):
        assert {(s.param, s.dim, s.indices) for s in g.slices} == {
            ("0.0.weight", 0, (c,)),
            ("0.1.weight", 0, (c,)),
            ("0.1.bias", 0, (c,)),
            ("1.conv.0.0.weight", 0, (c,)),
            ("1.conv.0.1.weight", 0, (c,)),
            ("1.conv.0.1.bias", 0, (c,)),
            ("1.conv.1.weight", 0, (c,)),
            ("1.conv.2.weight", 0, (c,)),
            ("1.conv.2.bias", 0, (c,)),
        }
        assert {(s.param, s.dim, s.indices) for s in g.dependents} == {
            ("1.conv.1.weight", 1, (c,)),
            ("2.conv.0.0.weight", 1, (c,)),
        }
    g = torch.Generator().manual_seed(0)
    half = torch.randperm(len(gl), generator=g)[: len(gl) // 2].tolist()
    for i in half:
        _zero(gl[i])
    small, report = extract(model, gl, x)
    index = {gr.name: i for i, gr in enumerate(gl)}
    removed = [index[n] for n in report["removed_groups"]]
    assert len(removed) >= len(half) - 3  # at most one group kept per all-zero layer
    real = sum(p.numel() for p in small.parameters())
    assert predicted_params(model, gl, removed) == real
