"""Regularization in preconditioned variables (ALGORITHMS §5) against direct z-space transcriptions."""

from __future__ import annotations

import math

import pytest
import torch
from test_asgo import resume_roundtrip
from test_optim_reference import (
    grads_at,
    groups_spec,
    soft_threshold,
    taus,
    tiny_groups,
    tiny_problem,
)

from compress.optim import RAMDA, ProxAdam, make_optimizer
from compress.optim.proxadam import PrecondProxAdam
from compress.optim.ramda import PrecondRAMDA

DT = torch.float64


class RefProxAdamZ:
    """Adam step on W, then in z = D^{1/2} W: z ← shrink(z, ηλw_g), W = D^{-1/2} z."""

    def __init__(self, params, lam, betas, eps, spec):
        self.W = [p.detach().clone() for p in params]
        self.lam, (self.b1, self.b2), self.eps, self.spec = lam, betas, eps, spec
        self.m = [torch.zeros_like(w) for w in self.W]
        self.v = [torch.zeros_like(w) for w in self.W]
        self.t = 0

    def step(self, grads, lr):
        self.t += 1
        self.m = [self.b1 * m + (1 - self.b1) * g for m, g in zip(self.m, grads)]
        self.v = [self.b2 * v + (1 - self.b2) * g * g for v, g in zip(self.v, grads)]
        D = [(v / (1 - self.b2**self.t)).sqrt() + self.eps for v in self.v]
        w_adam = [W - lr * (m / (1 - self.b1**self.t)) / Dk for W, m, Dk in zip(self.W, self.m, D)]
        z = [Dk.sqrt() * w for Dk, w in zip(D, w_adam)]
        z = soft_threshold(z, self.spec, taus(self.spec, lr * self.lam))
        self.W = [zk / Dk.sqrt() for zk, Dk in zip(z, D)]


class RefRAMDAZ:
    """RAMDA with Ŵ = P^{-1/2} shrink(P^{1/2}(W⁰ − V/P), α λ w_g)."""

    def __init__(self, params, lam, c, eps, spec):
        self.W = [p.detach().clone() for p in params]
        self.lam, self.c, self.eps, self.spec = lam, c, eps, spec
        self.restart()

    def restart(self):
        self.t, self.alpha = 0, 0.0
        self.V = [torch.zeros_like(w) for w in self.W]
        self.U = [torch.zeros_like(w) for w in self.W]
        self.W0 = [w.clone() for w in self.W]

    def step(self, grads, lr):
        s = lr * math.sqrt(self.t + 1)
        self.alpha += s
        self.V = [V + s * g for V, g in zip(self.V, grads)]
        self.U = [U + s * g * g for U, g in zip(self.U, grads)]
        P = [U.pow(1.0 / 3.0) + self.eps for U in self.U]
        z = [Pk.sqrt() * (W0 - V / Pk) for Pk, W0, V in zip(P, self.W0, self.V)]
        z = soft_threshold(z, self.spec, taus(self.spec, self.alpha * self.lam))
        self.W_hat = [zk / Pk.sqrt() for zk, Pk in zip(z, P)]
        self.W = [(1 - self.c) * W + self.c * Wh for W, Wh in zip(self.W, self.W_hat)]
        self.t += 1


def _drive(opt, ref, model, x, y, lrs, restart_at=None, atol=1e-8):
    params = list(model.parameters())
    seen = set()
    for t, lr in enumerate(lrs):
        if t == restart_at:
            opt.restart()
            ref.restart()
        opt.param_groups[0]["lr"] = lr
        for p, g in zip(params, grads_at(model, [p.detach() for p in params], x, y)):
            p.grad = g
        opt.step()
        ref.step(grads_at(model, ref.W, x, y), lr)
        hat = opt._structured_tensors()
        for k, p in enumerate(params):
            assert torch.allclose(p.detach(), ref.W[k], rtol=0, atol=atol), (t, k)
            assert torch.allclose(hat[k], getattr(ref, "W_hat", ref.W)[k], rtol=0, atol=atol), (t, k)
        seen.add(opt.group_sparsity()[0])
    assert max(seen) > 0 and min(seen) < 1
    return opt


def test_proxadam_preconditioned_matches_transcription():
    model, x, y = tiny_problem(seed=6)
    params = list(model.parameters())
    groups = tiny_groups(model)
    opt = ProxAdam(params, lr=0.02, lam=0.1, betas=(0.9, 0.99), groups=groups, reg_space="preconditioned")
    assert isinstance(opt, PrecondProxAdam) and opt.reg_space == "preconditioned"
    ref = RefProxAdamZ(params, 0.1, (0.9, 0.99), 1e-8, groups_spec(groups, params))
    _drive(opt, ref, model, x, y, [0.02] * 10 + [0.005] * 10)


@pytest.mark.parametrize("solver", ["exact", "pg"])
def test_ramda_preconditioned_matches_transcription(solver):
    model, x, y = tiny_problem(seed=7)
    params = list(model.parameters())
    groups = tiny_groups(model)
    opt = RAMDA(params, lr=0.05, lam=0.05, momentum=0.3, groups=groups, solver=solver, reg_space="preconditioned")
    assert isinstance(opt, PrecondRAMDA)
    ref = RefRAMDAZ(params, 0.05, 0.3, 1e-6, groups_spec(groups, params))
    _drive(opt, ref, model, x, y, [0.05] * 10 + [0.02] * 10, restart_at=10)


def test_spaces_differ_but_agree_without_regularization():
    """λ > 0: different points; λ = 0: both are Adam exactly. (λ is not in the same units in
    the two spaces: z = D^{1/2}W with D ≈ |g| ≪ 1 needs a larger λ for the same sparsity.)"""
    out = {}
    for space, lam_on in (("param", 0.01), ("preconditioned", 0.1)):
        for lam in (0.0, lam_on):
            model, x, y = tiny_problem(seed=8)
            params = list(model.parameters())
            opt = ProxAdam(params, lr=0.02, lam=lam, groups=tiny_groups(model), reg_space=space)
            for _ in range(15):
                for p, g in zip(params, grads_at(model, [p.detach() for p in params], x, y)):
                    p.grad = g
                opt.step()
            out[space, lam] = ([p.detach().clone() for p in params], opt.group_norms() == 0)
    for a, b in zip(out["param", 0.0][0], out["preconditioned", 0.0][0]):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    (wp, zp), (wz, zz) = out["param", 0.01], out["preconditioned", 0.1]
    assert zp.any() and zz.any() and not zp.all() and not zz.all()
    assert max(float((a - b).abs().max()) for a, b in zip(wp, wz)) > 1e-3


def test_adamw_decay_is_l2_of_preconditioned_variables():
    """AdamW = Adam on f plus, in z = D^{1/2}W, a gradient step on (λ/2)‖z‖² (D held fixed).

    Written in z-space: z ← z − η D^{-1/2} m̂ − η λ z, W = D^{-1/2} z. Coupled L2 (λ/2)‖W‖²
    (Adam with weight_decay, whose gradient λW goes through the moments) is a different method.
    """
    torch.manual_seed(0)
    A = torch.randn(40, 7, dtype=DT)
    b = torch.randn(40, dtype=DT)
    lr, lam, (b1, b2), eps = 0.03, 0.2, (0.9, 0.99), 1e-8

    def grad(w, idx):
        r = A[idx] @ w - b[idx]
        return A[idx].T @ r / len(idx) + 0.1 * w.pow(3)

    batches = [torch.randint(0, 40, (10,)) for _ in range(20)]
    wt = torch.nn.Parameter(torch.randn(7, dtype=DT))
    w_c = torch.nn.Parameter(wt.detach().clone())
    w = wt.detach().clone()
    opt = torch.optim.AdamW([wt], lr=lr, betas=(b1, b2), eps=eps, weight_decay=lam)
    coupled = torch.optim.Adam([w_c], lr=lr, betas=(b1, b2), eps=eps, weight_decay=lam)
    m = torch.zeros(7, dtype=DT)
    v = torch.zeros(7, dtype=DT)
    for t, idx in enumerate(batches, start=1):
        g = grad(w, idx)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        D = (v / (1 - b2**t)).sqrt() + eps
        z = D.sqrt() * w
        z = z - lr * (m / (1 - b1**t)) / D.sqrt() - lr * lam * z
        w = z / D.sqrt()
        for p, o in ((wt, opt), (w_c, coupled)):
            p.grad = grad(p.detach(), idx)
            o.step()
        assert torch.allclose(wt.detach(), w, rtol=0, atol=1e-12), t
    assert float((w_c.detach() - w).abs().max()) > 1e-3


def test_make_optimizer_reg_space_and_bit_exact_resume():
    lin = torch.nn.Linear(4, 3)
    assert isinstance(
        make_optimizer("proxadam", lin.parameters(), lr=1e-3, reg_space="preconditioned"), PrecondProxAdam
    )
    assert type(make_optimizer("ramda", lin.parameters(), lr=1e-3, reg_space="param")) is RAMDA
    with pytest.raises(ValueError, match="reg_space"):
        make_optimizer("ramda", lin.parameters(), lr=1e-3, reg_space="z")
    resume_roundtrip("ramda", lr=0.05, lam=2e-2, reg_space="preconditioned", split=5, steps=10)
    resume_roundtrip("proxadam", lr=0.01, lam=0.2, reg_space="preconditioned", split=5, steps=10)
