"""Extraction: exact outputs, parameter counts predicted by hand, all-zero layers, failures named."""

import random

import pytest
import torch
from torch import nn

from compress.deploy.extract import ExtractionError, extract
from compress.models.digits import DigitsResNet
from compress.structure.find import find_groups
from compress.structure.group import Group, GroupList, Slice, bind_groups


def _zero(group):
    with torch.no_grad():
        for s, t in zip(group.slices, group.tensors):
            t.index_fill_(s.dim, torch.tensor(s.indices), 0.0)


def _digits(seed=0):
    torch.manual_seed(seed)
    m = DigitsResNet()
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.5, 0.5)
    return m.eval(), torch.rand(8, 1, 8, 8)


def _digits_params(cs, c1, c2, classes=10):
    """DigitsResNet parameter count with cs stem channels and c1, c2 conv1 channels, by hand."""
    stem = cs * 1 * 9 + 2 * cs
    blocks = sum(c * cs * 9 + 2 * c + cs * c * 9 + 2 * cs for c in (c1, c2))
    return stem + blocks + cs * classes + classes


def test_digits_params_formula_matches_the_dense_model():
    assert _digits_params(32, 32, 32) == sum(p.numel() for p in DigitsResNet().parameters())


@pytest.mark.parametrize("seed", [0, 1])
def test_random_half_removed_is_exact_and_param_count_as_predicted(seed):
    model, x = _digits(seed)
    gl = find_groups(model, x)
    rng = random.Random(seed)
    chosen = rng.sample(range(len(gl)), len(gl) // 2)
    for i in chosen:
        _zero(gl[i])
    small, rep = extract(model, gl, x)
    with torch.no_grad():
        ref, out = model(x), small(x)
    assert (ref - out).abs().max() <= 1e-5 * ref.abs().max()
    kept = [32 - sum(1 for i in chosen if gl[i].layer == lay) for lay in ("stem.0", "layers.0.conv1", "layers.1.conv1")]
    assert sum(p.numel() for p in small.parameters()) == _digits_params(*kept) == rep["params_after"]
    assert rep["params_predicted"] == rep["params_after"]
    assert small.stem[0].out_channels == kept[0] and small.layers[1].conv1.out_channels == kept[2]
    assert rep["groups_removed"] == len(chosen) and rep["flops_after"] < rep["flops_before"]
    # the model handed in is untouched
    assert model.stem[0].out_channels == 32


def test_nothing_zero_gives_identical_model():
    model, x = _digits()
    gl = find_groups(model, x)
    small, rep = extract(model, gl, x)
    assert small is not model
    assert rep["groups_removed"] == 0 and rep["max_abs_diff"] == 0.0
    sd, sd2 = model.state_dict(), small.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_all_groups_of_one_layer_zero_keeps_one_and_stays_exact():
    model, x = _digits()
    gl = find_groups(model, x)
    for g in gl:
        if g.layer == "layers.0.conv1":
            _zero(g)
    small, rep = extract(model, gl, x)
    info = rep["layers"]["layers.0.conv1"]
    assert info["zero"] == 32 and info["removed"] == 31 and info["kept"] == "layers.0.conv1:0"
    assert "all 32 groups are zero" in info["note"]
    assert small.layers[0].conv1.out_channels == 1
    with torch.no_grad():
        assert torch.allclose(model(x), small(x), atol=1e-6)
        assert small(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_a_group_that_is_not_zero_invariant_is_named():
    model, x = _digits()
    find_groups(model, x)
    # a bogus group: conv1 row 3 zeroed but BN β left alive -> channel 3 is relu(β) != 0
    bogus = GroupList(
        [Group(f"bogus:{c}", "channel", "layers.0.conv1", [Slice("layers.0.conv1.weight", 0, (c,))]) for c in (3, 4)]
    )
    bind_groups(bogus, model)
    _zero(bogus[0])
    with torch.no_grad():
        model.layers[0].bn1.bias[3] = 1.0
        model.layers[0].bn1.running_mean[3] = 0.0
    with pytest.raises(ExtractionError, match="bogus:3") as e:
        extract(model, bogus, x)
    assert e.value.group == "bogus:3"


def test_onnx_export_of_extracted_model_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, x = _digits()
    gl = find_groups(model, x)
    for i in range(0, len(gl), 2):
        _zero(gl[i])
    small, _ = extract(model, gl, x)
    path = tmp_path / "m.onnx"
    torch.onnx.export(
        small,
        (x,),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
        opset_version=17,
    )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert abs(got - ref).max() <= 1e-4 * max(1.0, abs(ref).max())


class _ConcatFlatten(nn.Module):
    """Two branches concatenated, a 1x1 conv, then flatten of a 4x4 map into a Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.c = nn.Conv2d(10, 5, 1)
        self.fc1 = nn.Linear(5 * 4 * 4, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        y = torch.relu(self.c(y)).flatten(1)
        return self.fc2(torch.relu(self.fc1(y)))


def test_concat_and_flatten_consumers_are_mapped_per_channel():
    torch.manual_seed(0)
    m = _ConcatFlatten().eval()
    for bn in (m.a[1], m.b[1]):
        bn.bias.data.uniform_(0.2, 0.5)  # relu(BN(0)) > 0 unless γ, β are zeroed
    x = torch.rand(4, 3, 4, 4)
    gl = find_groups(m, x)
    assert [(g.layer, g.kind) for g in gl] == (
        [("a.0", "channel")] * 4 + [("b.0", "channel")] * 6 + [("c", "channel")] * 5 + [("fc1", "neuron")] * 7
    )
    # b's channel 2 is column 4 + 2 of c; c's channel 3 is columns 48..63 of fc1
    assert [(s.param, s.dim, s.indices) for s in gl[4 + 2].dependents] == [("c.weight", 1, (6,))]
    assert [(s.param, s.dim, s.indices) for s in gl[10 + 3].dependents] == [("fc1.weight", 1, tuple(range(48, 64)))]
    for i in (0, 2, 4 + 1, 4 + 2, 10, 10 + 3, 15 + 6):
        _zero(gl[i])
    small, rep = extract(m, gl, x)
    with torch.no_grad():
        assert (m(x) - small(x)).abs().max() <= 1e-5 * m(x).abs().max()
    assert small.a[0].out_channels == 2 and small.b[0].out_channels == 4 and small.c.in_channels == 6
    assert small.fc1.in_features == 3 * 16 and small.fc1.out_features == 6
    assert rep["params_after"] == rep["params_predicted"] == sum(p.numel() for p in small.parameters())


class _SqueezeExcite(nn.Module):
    """conv-BN-ReLU, then x * sigmoid(expand(relu(reduce(pool(x))))), then a consumer conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.reduce = nn.Conv2d(8, 4, 1)
        self.expand = nn.Conv2d(4, 8, 1)
        self.out = nn.Conv2d(8, 5, 3)

    def forward(self, x):
        x = self.conv(x)
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.out(x * gate).mean((2, 3))


def test_squeeze_excitation_gate_does_not_block_the_gated_channels():
    torch.manual_seed(0)
    m = _SqueezeExcite().eval()
    m.conv[1].bias.data.uniform_(0.2, 0.5)
    x = torch.rand(4, 3, 6, 6)
    gl = find_groups(m, x)
    assert [g.layer for g in gl] == ["conv.0"] * 8 + ["reduce"] * 4
    g = gl[2]
    # sigmoid(0) = 0.5 != 0, but it only multiplies the zero channel: the expand row is a
    # dependent (deleted, not regularized)
    assert {(s.param, s.dim, s.indices) for s in g.slices} == {
        ("conv.0.weight", 0, (2,)),
        ("conv.0.bias", 0, (2,)),
        ("conv.1.weight", 0, (2,)),
        ("conv.1.bias", 0, (2,)),
    }
    assert {(s.param, s.dim, s.indices) for s in g.dependents} == {
        ("reduce.weight", 1, (2,)),
        ("expand.weight", 0, (2,)),
        ("expand.bias", 0, (2,)),
        ("out.weight", 1, (2,)),
    }
    for i in (1, 2, 5, 9):
        _zero(gl[i])
    small, rep = extract(m, gl, x)
    with torch.no_grad():
        ref = m(x)
        assert (ref - small(x)).abs().max() <= 1e-5 * ref.abs().max()
    assert small.conv[0].out_channels == 5 and small.expand.out_channels == 5 and small.reduce.out_channels == 3
