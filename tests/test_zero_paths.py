"""Paths that keep a zero channel at zero: constant zero padding, a BatchNorm applied functionally
inside a fused BN+activation module. Offered when exact, refused with the reason when not; the
compressed model is compared with the dense model whose groups were zeroed (the ground truth)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.deploy.extract import extract
from compress.structure.find import find_groups


class _Pad(nn.Module):
    """conv → F.pad(value) → conv, as HF MobileNetV2 pads before its strided depthwise convs."""

    def __init__(self, value=0.0, pad=(1, 1, 1, 1)):
        super().__init__()
        extra = pad[4] + pad[5] if len(pad) > 4 else 0  # channels added by padding dim 1
        self.c1, self.c2, self.value, self.pad = nn.Conv2d(3, 8, 3), nn.Conv2d(8 + extra, 4, 3), value, pad

    def forward(self, x):
        return self.c2(F.pad(torch.relu(self.c1(x)), self.pad, value=self.value))


class _BNAct(nn.BatchNorm2d):
    """BatchNorm2d subclass that calls F.batch_norm then an activation in one forward (timm BatchNormAct2d)."""

    def __init__(self, c, act):
        super().__init__(c)
        self.act = act

    def forward(self, x):
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(y)


def _bnact_model(act):
    m = nn.Sequential(nn.Conv2d(3, 8, 3), _BNAct(8, act), nn.Conv2d(8, 4, 3))
    with torch.no_grad():  # non-trivial running stats: BN(0) = β − γμ/σ ≠ 0 unless γ, β are zeroed too
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
        m[1].bias.uniform_(-1, 1)
    return m.eval()


def _zero_every_other(groups, layer):
    with torch.no_grad():
        for g in [g for g in groups if g.layer == layer][::2]:
            for s, t in zip(g.slices, g.tensors):
                t.index_fill_(s.dim, torch.tensor(s.indices), 0.0)


@pytest.mark.parametrize("model_fn, layer", [(lambda: _Pad().eval(), "c1"), (lambda: _bnact_model(nn.ReLU()), "0")])
def test_zero_keeping_path_offered_and_extracted_exactly(model_fn, layer):
    torch.manual_seed(0)
    m, x = model_fn(), torch.randn(2, 3, 12, 12)
    groups = find_groups(m, x, check=False)  # the static analysis alone
    assert len([g for g in groups if g.layer == layer]) == 8
    _zero_every_other(groups, layer)
    small, _ = extract(m, groups, x)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in m.parameters())
    torch.testing.assert_close(small(x), m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "model_fn, layer, why",
    [
        (lambda: _Pad(value=1.0), "c1", "fill value 1"),
        (lambda: _Pad(pad=(0, 0, 0, 0, 1, 0)), "c1", "may shift channels"),
        (lambda: _bnact_model(nn.Sigmoid()), "0", "Sigmoid after its BatchNorm"),
    ],
)
def test_path_that_does_not_keep_zero_refused_statically(model_fn, layer, why):
    m = model_fn().eval()
    groups = find_groups(m, torch.randn(2, 3, 12, 12), check=False)
    assert not [g for g in groups if g.layer == layer]
    assert any(lay == layer and why in r for lay, r in groups.not_prunable), groups.not_prunable


class _Tied(nn.Module):
    """Two Embedding modules sharing one weight (T5: `encoder.embed_tokens` is `shared`); the residual
    stream it starts is coupled with fc2's outputs."""

    def __init__(self):
        super().__init__()
        self.shared, self.embed = nn.Embedding(20, 8), nn.Embedding(20, 8)
        self.embed.weight = self.shared.weight
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(torch.relu(h)).mean(1)


def test_tied_embedding_kept_in_its_group_under_its_canonical_name():
    torch.manual_seed(0)
    m, ids = _Tied().eval(), torch.randint(0, 20, (2, 5))
    groups = find_groups(m, ids, check=False)
    g = next(g for g in groups if g.layer == "fc2")
    assert {s.param for s in g.slices} == {"fc2.weight", "fc2.bias", "shared.weight"}
    _zero_every_other(groups, "fc2")
    small, _ = extract(m, groups, ids)
    assert small.embed.weight.shape == (20, 4)
    torch.testing.assert_close(small(ids), m(ids), atol=1e-5, rtol=1e-5)
