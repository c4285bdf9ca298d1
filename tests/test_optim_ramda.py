"""RAMDA against a direct float64 transcription of ALGORITHMS §2, plus its contract."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from test_optim_reference import (
    RefRAMDA,
    grads_at,
    groups_spec,
    rows_spec,
    tiny_groups,
    tiny_problem,
)

from compress.optim import RAMDA

DT = torch.float64


def _run_against_reference(solver, groups_kind, steps=20, restart_at=10, lam=1e-2, lrs=None, atol=1e-8, **kw):
    model, x, y = tiny_problem()
    params = list(model.parameters())
    groups = tiny_groups(model) if groups_kind == "custom" else None
    spec = groups_spec(groups, params) if groups is not None else rows_spec(params)
    ref = RefRAMDA(params, lam=lam, c=0.3, eps=1e-6, spec=spec)
    opt = RAMDA(
        params, lr=0.05, lam=lam, momentum=0.3, eps=1e-6, groups=groups, solver=solver, eps_restart_factor=0.1, **kw
    )
    lrs = lrs or [0.05] * steps
    zeros_seen = 0
    for t in range(steps):
        if t == restart_at:
            opt.restart()
            ref.restart(0.1)
        for g in opt.param_groups:
            g["lr"] = lrs[t]
        grads = grads_at(model, [p.detach() for p in params], x, y)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step(grads_at(model, ref.W, x, y), lrs[t])
        for k, p in enumerate(params):
            st = opt.state[p]
            assert torch.allclose(st["w_hat"], ref.W_hat[k], rtol=0, atol=atol), (t, k)
            assert torch.allclose(p.detach(), ref.W[k], rtol=0, atol=atol), (t, k)
        zeros_seen = max(zeros_seen, opt.group_sparsity()[0])
    return opt, ref, zeros_seen


@pytest.mark.parametrize("groups_kind", ["rows", "custom"])
def test_ramda_exact_matches_transcription(groups_kind):
    lrs = [0.05] * 10 + [0.02] * 10  # an LR decay with a restart, as the training loop does
    opt, ref, zeros = _run_against_reference("exact", groups_kind, lrs=lrs)
    assert zeros > 0  # the test exercises zero groups ...
    assert opt.group_sparsity()[0] < 1  # ... and non-zero ones
    assert opt.param_groups[0]["eps"] == pytest.approx(1e-7)


def test_ramda_pg_solver_close_to_transcription():
    # the paper's inexact solver: close to the exact subproblem solution, not equal
    _run_against_reference("pg", "custom", steps=12, restart_at=6, atol=1e-5, pg_rtol=1e-14, pg_max_iter=500)


def test_ramda_lam_zero_is_madgrad():
    """With ψ = 0: Ŵ = W⁰ − V / (cbrt(U) + ε), W ← (1 − c) W + c Ŵ (MADGRAD, written out here)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5, dtype=DT))
    b = torch.nn.Parameter(torch.randn(5, dtype=DT))
    opt = RAMDA([w, b], lr=0.1, lam=0.0, momentum=0.2, eps=1e-6)
    W0 = [w.detach().clone(), b.detach().clone()]
    V = [torch.zeros_like(t) for t in W0]
    U = [torch.zeros_like(t) for t in W0]
    X = [t.clone() for t in W0]
    for t in range(15):
        gs = [torch.randn_like(w), torch.randn_like(b)]
        w.grad, b.grad = gs
        opt.step()
        s = 0.1 * math.sqrt(t + 1)
        for k in range(2):
            V[k] += s * gs[k]
            U[k] += s * gs[k] ** 2
            zhat = W0[k] - V[k] / (U[k] ** (1 / 3) + 1e-6)
            X[k] = 0.8 * X[k] + 0.2 * zhat
        assert torch.allclose(opt.state[w]["w_hat"], W0[0] - V[0] / (U[0] ** (1 / 3) + 1e-6), rtol=1e-12, atol=1e-12)
        assert torch.allclose(w.detach(), X[0], rtol=1e-12, atol=1e-12)
        assert torch.allclose(b.detach(), X[1], rtol=1e-12, atol=1e-12)


def test_cube_root_state_error_bound_float32():
    """u_cbrt holds cbrt(U) updated as cbrt(c³ + s g²): per step the relative error obeys
    |δ_{t+1}| ≤ |δ_t|·U_t/U_{t+1} + 3 u (u = float32 unit roundoff), checked against float64."""
    torch.manual_seed(0)
    n = 4000
    p = torch.nn.Parameter(torch.zeros(n))
    opt = RAMDA([p], lr=1e-3, lam=0.0)
    U = torch.zeros(n, dtype=DT)
    delta = torch.zeros(n, dtype=DT)
    u = 2.0**-24
    worst = 0.0
    for t in range(300):
        # heavy-tailed gradients with occasional spikes: the hard case for incremental updates
        g = torch.randn(n) * torch.exp(torch.randn(n) * 3)
        p.grad = g
        opt.step()
        s = float(torch.tensor(1e-3 * math.sqrt(t + 1), dtype=torch.float32))
        U_new = U + s * g.double() ** 2
        exact = U_new.pow(1.0 / 3.0)
        new_delta = (opt.state[p]["u_cbrt"].double() - exact) / exact
        bound = delta.abs() * torch.where(U_new > 0, U / U_new, 0.0) + 3 * u
        assert bool((new_delta.abs() <= bound).all()), t
        worst = max(worst, float(new_delta.abs().max()))
        U, delta = U_new, new_delta
    assert worst < 1e-5


def test_state_dict_roundtrip_is_bit_exact():
    torch.manual_seed(0)

    def make():
        m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        return m

    m1 = make()
    opt1 = RAMDA(m1.parameters(), lr=0.05, lam=2e-2, momentum=0.3)
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(16)]

    def train(m, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    train(m1, opt1, data[:5])
    opt1.restart()
    train(m1, opt1, data[5:8])
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    m2 = make()
    m2.load_state_dict(saved["model"])
    opt2 = RAMDA(m2.parameters(), lr=0.05, lam=2e-2, momentum=0.3)
    opt2.load_state_dict(saved["opt"])
    train(m1, opt1, data[8:])
    train(m2, opt2, data[8:])
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
        assert torch.equal(opt1.state[p1]["w_hat"], opt2.state[p2]["w_hat"])
    assert opt1.group_sparsity()[0] > 0  # the run had zero groups (warm starts at r = 0 included)
    assert opt2.param_groups[0]["t"] == opt1.param_groups[0]["t"] == 11


def test_structured_point_commit_norms_sparsity():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 4).double()
    opt = RAMDA(lin.parameters(), lr=0.5, lam=0.5, momentum=0.1)
    # before any step the structured point is W itself
    assert opt.group_sparsity() == (0.0, 0.0)
    assert torch.allclose(opt.group_norms(), lin.weight.detach().norm(dim=1))
    for _ in range(5):
        lin.weight.grad = torch.randn(4, 5, dtype=DT) * 0.01
        lin.bias.grad = torch.randn(4, dtype=DT)
        opt.step()
    w_hat = opt.state[lin.weight]["w_hat"]
    zero_rows = (w_hat == 0).all(dim=1)
    assert bool(zero_rows.any())
    assert not bool((lin.weight.detach() == 0).all(dim=1).any())  # W is not sparse with c < 1
    assert opt.group_sparsity() == (float(zero_rows.double().mean()), float(zero_rows.double().mean()))
    assert torch.allclose(opt.group_norms(), w_hat.norm(dim=1))
    W = lin.weight.detach().clone()
    with opt.structured_point():
        assert torch.equal(lin.weight.detach(), w_hat)
    assert torch.equal(lin.weight.detach(), W)
    opt.commit_structured_point()
    assert torch.equal(lin.weight.detach(), w_hat)


def test_lam_and_lr_are_read_from_param_groups_and_momentum_ramp():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3, 4, dtype=DT))
    opt = RAMDA([p], lr=0.1, lam=0.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.randn(3, 4, dtype=DT)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.param_groups[0]["lam"] = 1e3  # a budget controller raising λ: every row goes to zero
    opt.step()
    assert bool((opt.state[p]["w_hat"] == 0).all())
    opt.set_momentum(1.0)
    opt.step()
    assert bool((p.detach() == 0).all())  # c = 1: W = Ŵ exactly
    with pytest.raises(ValueError):
        opt.set_momentum(0.0)


def test_float32_and_no_grad_params():
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(16, 2)
    )
    opt = RAMDA(m.parameters(), lr=0.01, lam=1e-3)
    x = torch.randn(4, 2, 4, 4)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        m(x).sum().backward()
        m[1].weight.grad = None  # a parameter without gradient this step
        opt.step()
    for p in m.parameters():
        assert p.dtype == torch.float32 and opt.state[p]["w_hat"].dtype == torch.float32
        assert torch.isfinite(p).all()
    assert opt.state[m[0].weight]["r"].dtype == torch.float32


def test_channels_last_parameter():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last).double()
    ref = copy.deepcopy(conv).to(memory_format=torch.contiguous_format)
    o1 = RAMDA(conv.parameters(), lr=0.1, lam=1e-2)
    o2 = RAMDA(ref.parameters(), lr=0.1, lam=1e-2)
    for _ in range(3):
        g = torch.randn(4, 3, 3, 3, dtype=DT)
        conv.weight.grad, ref.weight.grad = g.clone(), g.clone()
        conv.bias.grad = ref.bias.grad = torch.ones(4, dtype=DT)
        o1.step()
        o2.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(conv.weight.detach().contiguous(), ref.weight.detach())


def test_bad_arguments():
    p = torch.nn.Parameter(torch.randn(3, 3))
    for kw in (
        dict(lr=-1),
        dict(lr=0.1, lam=-1),
        dict(lr=0.1, momentum=0),
        dict(lr=0.1, eps=0),
        dict(lr=0.1, solver="lbfgs"),
    ):
        with pytest.raises(ValueError):
            RAMDA([p], **kw)
