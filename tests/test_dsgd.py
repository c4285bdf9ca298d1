"""DSGD against slow float64 transcriptions of ALGORITHMS §3 (greedy layer scores, secant L, group prox)."""

from __future__ import annotations

import math

import pytest
import torch
from test_asgo import finetune_resume_bit_exact, resume_roundtrip
from test_optim_reference import (
    grads_at,
    groups_spec,
    soft_threshold,
    tiny_groups,
    tiny_problem,
)

from compress.optim import make_optimizer
from compress.optim.dsgd import DSGD, model_layers, plot_layer_picks

DT = torch.float64
# TinyNet parameters: conv1.weight, bn.weight, bn.bias, conv2.weight, conv2.bias, fc.weight, fc.bias;
# the groups tie conv1 to bn, conv2 to its bias, fc.weight alone; fc.bias is in no group.
TINY_LAYERS = [[0, 1, 2], [3, 4], [5], [6]]


class RefDSGD:
    def __init__(self, params, layers, spec, lr, lam, k, norm="euclidean", adapt=True, beta=0.9, bounds=(1.0, 1e4)):
        self.W = [p.detach().clone() for p in params]
        self.layers, self.spec, self.lr0, self.lam, self.k = layers, spec, lr, lam, k
        self.norm, self.adapt, self.beta, self.bounds = norm, adapt, beta, bounds
        self.L = [1.0 / lr] * len(layers)
        self.fresh = [False] * len(layers)
        self.delta, self.prev = {}, {}
        self.picks = [0] * len(layers)
        self.layer_of_group = []
        for slices, _ in spec:
            self.layer_of_group.append(next(i for i, ks in enumerate(layers) if slices[0][0] in ks))

    def dual_sq(self, g):
        if self.norm == "spectral" and g.dim() >= 2:
            return float(torch.linalg.svdvals(g.reshape(g.shape[0], -1)).sum()) ** 2
        return float((g**2).sum())

    def primal_sq(self, w):
        if self.norm == "spectral" and w.dim() >= 2:
            return float(torch.linalg.svdvals(w.reshape(w.shape[0], -1)).max()) ** 2
        return float((w**2).sum())

    def dual_map(self, g):
        if self.norm == "spectral" and g.dim() >= 2:
            u, s, vh = torch.linalg.svd(g.reshape(g.shape[0], -1), full_matrices=False)
            r = int((s > 1e-12 * s.max()).sum())  # polar factor on the range of g
            return (float(s.sum()) * u[:, :r] @ vh[:r]).reshape(g.shape)
        return g

    def step(self, grads, lr):
        lo, hi = self.bounds[0] / self.lr0, self.bounds[1] / self.lr0
        for i, ks in enumerate(self.layers):
            if self.adapt and self.fresh[i]:
                dw = sum(self.primal_sq(self.delta[k]) for k in ks)
                if dw > 0:
                    dg = sum(self.dual_sq(grads[k] - self.prev[k]) for k in ks)
                    est = max(math.sqrt(dg / dw), lo)
                    self.L[i] = min(max(self.L[i] ** self.beta * est ** (1 - self.beta), lo), hi)
        scores = [sum(self.dual_sq(grads[k]) for k in ks) / (2 * self.L[i]) for i, ks in enumerate(self.layers)]
        picked = sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[: self.k])
        z = [w.clone() for w in self.W]
        s = {}
        for i in picked:
            s[i] = (lr / self.lr0) / self.L[i]
            for k in self.layers[i]:
                z[k] = self.W[k] - s[i] * self.dual_map(grads[k])
        tau = torch.tensor(
            [self.lam * wg * s.get(li, 0.0) for (_, wg), li in zip(self.spec, self.layer_of_group)], dtype=DT
        )
        new = soft_threshold(z, self.spec, tau)
        self.fresh = [i in picked for i in range(len(self.layers))]
        for i in picked:
            self.picks[i] += 1
            for k in self.layers[i]:
                self.delta[k] = new[k] - self.W[k]
                self.prev[k] = grads[k].clone()
        self.W = new
        return picked


def _drive(steps=20, lr=0.05, lam=0.0, k=1, norm="euclidean", adapt=True, lrs=None, atol=1e-8, bounds=(1.0, 1e4)):
    model, x, y = tiny_problem(seed=4)
    params = list(model.parameters())
    groups = tiny_groups(model)
    opt = DSGD(params, lr=lr, lam=lam, k=k, norm=norm, adapt_L=adapt, groups=groups, L_bounds=bounds)
    assert opt.layers == TINY_LAYERS
    ref = RefDSGD(params, TINY_LAYERS, groups_spec(groups, params), lr, lam, k, norm=norm, adapt=adapt, bounds=bounds)
    lrs = lrs or [lr] * steps
    for t in range(steps):
        opt.param_groups[0]["lr"] = lrs[t]
        for p, g in zip(params, grads_at(model, [p.detach() for p in params], x, y)):
            p.grad = g
        opt.step()
        picked = ref.step(grads_at(model, ref.W, x, y), lrs[t])
        assert opt.pick_history[-1] == picked, t
        for k_, p in enumerate(params):
            assert torch.allclose(p.detach(), ref.W[k_], rtol=0, atol=atol), (t, k_)
    assert opt.param_groups[0]["layer_picks"] == ref.picks
    assert torch.allclose(torch.tensor(opt.layer_L, dtype=DT), torch.tensor(ref.L, dtype=DT), rtol=1e-10)
    return opt, ref


def test_all_layers_constant_L_is_gradient_descent():
    model, x, y = tiny_problem(seed=5)
    params = list(model.parameters())
    opt = DSGD(params, lr=0.1, k=4, adapt_L=False, groups=tiny_groups(model))
    W = [p.detach().clone() for p in params]
    for _ in range(20):
        for p, g in zip(params, grads_at(model, [p.detach() for p in params], x, y)):
            p.grad = g
        opt.step()
        W = [w - 0.1 * g for w, g in zip(W, grads_at(model, W, x, y))]
        for p, w in zip(params, W):
            assert torch.allclose(p.detach(), w, rtol=0, atol=1e-12)
    assert opt.param_groups[0]["layer_picks"] == [20] * 4


def test_all_layers_constant_L_with_lam_is_proximal_gradient():
    model, x, y = tiny_problem(seed=5)
    params = list(model.parameters())
    groups = tiny_groups(model)
    spec = groups_spec(groups, params)
    opt = DSGD(params, lr=0.1, lam=0.08, k=10, adapt_L=False, groups=groups)
    W = [p.detach().clone() for p in params]
    for _ in range(20):
        for p, g in zip(params, grads_at(model, [p.detach() for p in params], x, y)):
            p.grad = g
        opt.step()
        z = [w - 0.1 * g for w, g in zip(W, grads_at(model, W, x, y))]
        W = soft_threshold(z, spec, torch.tensor([0.1 * 0.08 * wg for _, wg in spec], dtype=DT))
        for p, w in zip(params, W):
            assert torch.allclose(p.detach(), w, rtol=0, atol=1e-12)
    zero = opt.group_sparsity()[0]
    assert 0 < zero < 1


def test_greedy_secant_matches_transcription():
    opt, ref = _drive(lr=1.0, lam=0.01, k=1, lrs=[1.0] * 12 + [0.5] * 8, bounds=(0.01, 1e4))
    assert sum(v > 0 for v in ref.picks) >= 3  # the greedy choice moved between layers
    assert len(set(ref.L)) > 1  # and the secant estimates differ
    assert 0 < opt.group_sparsity()[0] < 1


def test_spectral_norm_top2_matches_transcription():
    opt, ref = _drive(lr=0.5, lam=0.02, k=2, norm="spectral", bounds=(0.01, 1e4))
    assert sum(v > 0 for v in ref.picks) >= 3 and 0 < opt.group_sparsity()[0] < 1


def test_layers_must_hold_whole_groups_and_names():
    model, _, _ = tiny_problem()
    groups = tiny_groups(model)
    P = dict(model.named_parameters())
    with pytest.raises(ValueError, match="spans several layers"):
        DSGD(model.parameters(), lr=0.1, groups=groups, layers=[[P["conv1.weight"]], [P["bn.weight"], P["bn.bias"]]])
    opt = DSGD(model.parameters(), lr=0.1, groups=groups)
    assert opt.layer_names == ["conv1+bn", "conv2", "fc", "param6"]
    layers, names = model_layers(model, groups)
    assert names == ["conv1+bn", "conv2", "fc"]
    opt = DSGD(model.parameters(), lr=0.1, groups=groups, layers=layers, layer_names=names)
    assert opt.layers == [[0, 1, 2], [3, 4], [5, 6]]


def test_digits_resnet_layers():
    from compress.models import get_model
    from compress.structure.find import find_groups

    spec = get_model("digits-resnet")
    m = spec.build()
    groups = find_groups(m, spec.example_input(2))
    layers, names = model_layers(m, groups)
    assert names == [
        "stem.0+stem.1+layers.0.conv2+layers.0.bn2+layers.1.conv2+layers.1.bn2",
        "layers.0.conv1+layers.0.bn1",
        "layers.1.conv1+layers.1.bn1",
        "fc",
    ]
    opt = make_optimizer("dsgd", m.parameters(), groups=groups, lr=1e-2, lam=1e-3, k=2)
    assert len(opt.layers) == 5  # fc.weight and fc.bias are in no group: one layer each by default


def test_state_dict_roundtrip_bit_exact_and_json(tmp_path):
    o1, o2 = resume_roundtrip("dsgd", lr=0.05, lam=2e-2, k=2, split=6, steps=12, json_param_groups=True)
    assert o1.layer_picks == o2.layer_picks and sum(o1.layer_picks.values()) == 2 * 12
    plot_layer_picks(o1, tmp_path / "picks.png")
    assert (tmp_path / "picks.png").read_bytes()[:4] == b"\x89PNG"


def test_finetune_resume_bit_exact(tmp_path):
    runs = finetune_resume_bit_exact("dsgd", tmp_path, lam=0.05)
    assert sum(runs[1].optimizer.layer_picks.values()) == 2 * 2  # 128 samples, batch 64, 2 epochs
