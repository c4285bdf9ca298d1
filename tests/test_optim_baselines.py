"""RMDA, ProxSGD, ProxAdam against direct float64 transcriptions; make_optimizer."""

from __future__ import annotations

import io

import pytest
import torch
from test_optim_reference import (
    RefProxAdam,
    RefProxSGD,
    RefRMDA,
    grads_at,
    groups_spec,
    tiny_groups,
    tiny_problem,
)

from compress.optim import OPTIMIZERS, RMDA, ProxAdam, ProxSGD, make_optimizer

DT = torch.float64


def _drive(make_opt, make_ref, restart=False, steps=20, lrs=None, atol=1e-8):
    model, x, y = tiny_problem(seed=1)
    params = list(model.parameters())
    groups = tiny_groups(model)
    spec = groups_spec(groups, params)
    opt, ref = make_opt(params, groups), make_ref(params, spec)
    lrs = lrs or [None] * steps
    seen = set()
    for t in range(steps):
        if restart and t == steps // 2:
            opt.restart()
            ref.restart()
        if lrs[t] is not None:
            opt.param_groups[0]["lr"] = lrs[t]
        lr = opt.param_groups[0]["lr"]
        grads = grads_at(model, [p.detach() for p in params], x, y)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step(grads_at(model, ref.W, x, y), lr)
        hat = opt._structured_tensors()
        for k, p in enumerate(params):
            assert torch.allclose(hat[k], ref.W_hat[k], rtol=0, atol=atol), (t, k)
            assert torch.allclose(p.detach(), ref.W[k], rtol=0, atol=atol), (t, k)
        seen.add(opt.group_sparsity()[0])
    assert max(seen) > 0 and min(seen) < 1  # zero and non-zero groups were both exercised
    return opt


def test_rmda_matches_transcription():
    _drive(
        lambda ps, gs: RMDA(ps, lr=0.05, lam=0.2, momentum=0.3, groups=gs),
        lambda ps, spec: RefRMDA(ps, lam=0.2, c=0.3, spec=spec),
        restart=True,
        lrs=[0.05] * 10 + [0.02] * 10,
    )


def test_proxsgd_matches_transcription():
    _drive(
        lambda ps, gs: ProxSGD(ps, lr=0.1, lam=0.1, momentum=0.9, groups=gs),
        lambda ps, spec: RefProxSGD(ps, lam=0.1, mu=0.9, spec=spec),
        restart=True,
        lrs=[0.1] * 10 + [0.03] * 10,
    )


def test_proxadam_matches_transcription():
    _drive(
        lambda ps, gs: ProxAdam(ps, lr=0.02, lam=0.01, betas=(0.9, 0.99), eps=1e-8, groups=gs),
        lambda ps, spec: RefProxAdam(ps, lam=0.01, betas=(0.9, 0.99), eps=1e-8, spec=spec),
        restart=True,
        lrs=[0.02] * 10 + [0.005] * 10,
    )


@pytest.mark.parametrize(
    "ours,theirs",
    [
        # ProxAdam with λ = 0 is Adam
        (
            lambda ps: ProxAdam(ps, lr=0.01, lam=0.0, betas=(0.8, 0.95)),
            lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.95), eps=1e-8),
        ),
        # ProxSGD's momentum is SGD(momentum=μ, dampening=μ): at a fixed point m = g
        (
            lambda ps: ProxSGD(ps, lr=0.05, lam=0.0, momentum=0.8),
            lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, dampening=0.8),
        ),
    ],
)
def test_lam_zero_is_the_torch_optimizer(ours, theirs):
    torch.manual_seed(0)
    a = torch.nn.Linear(5, 3).double()
    b = torch.nn.Linear(5, 3).double()
    b.load_state_dict(a.state_dict())
    oa, ob = ours(a.parameters()), theirs(b.parameters())
    for _ in range(10):
        x = torch.randn(8, 5, dtype=DT)
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["rmda", "proxsgd", "proxadam"])
def test_state_dict_roundtrip_bit_exact(name):
    torch.manual_seed(0)
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(12)]
    lr = {"rmda": 0.05, "proxsgd": 0.1, "proxadam": 0.01}[name]

    def make():
        torch.manual_seed(1)
        m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        return m, make_optimizer(name, m.parameters(), lr=lr, lam=2e-2)

    def train(m, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    m1, o1 = make()
    train(m1, o1, data[:6])
    buf = io.BytesIO()
    torch.save({"m": m1.state_dict(), "o": o1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    m2, o2 = make()
    m2.load_state_dict(saved["m"])
    o2.load_state_dict(saved["o"])
    train(m1, o1, data[6:])
    train(m2, o2, data[6:])
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_make_optimizer():
    lin = torch.nn.Linear(4, 3)
    for name in ("ramda", "rmda", "proxsgd", "proxadam", "RAMDA"):
        opt = make_optimizer(name, lin.parameters(), lr=0.01, lam=1e-3)
        assert opt.param_groups[0]["lam"] == 1e-3
    assert isinstance(make_optimizer("adamw", lin.parameters(), lr=0.01, weight_decay=0.1), torch.optim.AdamW)
    assert set(OPTIMIZERS) == {"ramda", "rmda", "proxsgd", "proxadam", "asgo", "dasgo", "dsgd", "adamw"}
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("sgdx", lin.parameters())
    with pytest.raises(ValueError, match="lam=0"):
        make_optimizer("adamw", lin.parameters(), lam=1e-3)
    opt = make_optimizer("ramda", lin.parameters(), lr=0.01, solver="pg", momentum=0.2, eps_restart_factor=0.1)
    assert opt.solver == "pg"


def test_group_spanning_param_groups_is_rejected():
    model, _, _ = tiny_problem()
    groups = tiny_groups(model)
    pg = [{"params": [model.conv1.weight]}, {"params": [p for n, p in model.named_parameters() if n != "conv1.weight"]}]
    with pytest.raises(ValueError, match="spans several param groups"):
        RMDA(pg, lr=0.1, groups=groups)


def test_everything_zero_and_nothing_grouped():
    torch.manual_seed(0)
    for name in ("ramda", "rmda", "proxsgd", "proxadam"):
        m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        opt = make_optimizer(name, m.parameters(), lr=0.1, lam=1e4)  # every group goes to zero
        x = torch.randn(5, 4)
        for _ in range(3):
            opt.zero_grad()
            m(x).sum().backward()
            opt.step()
        assert opt.group_sparsity() == (1.0, 1.0)
        assert torch.isfinite(opt.group_norms()).all()
        opt.zero_grad()
        m(x).sum().backward()
        opt.step()  # stepping from an all-zero structured point is fine too
        with opt.structured_point():
            assert torch.isfinite(m(x)).all()
        # only 1-D parameters: no groups at all
        b = torch.nn.Parameter(torch.randn(3))
        o = make_optimizer(name, [b], lr=0.1, lam=1.0)
        b.grad = torch.ones(3)
        o.step()
        assert o.index.n_groups == 0 and o.group_sparsity() == (0.0, 0.0) and o.group_norms().numel() == 0
