"""Convex check (ALGORITHMS §6): group-lasso multinomial logistic regression on sklearn digits.

A long-run FISTA solution (written here, full batch, float64) is the reference; its
support is certified by the optimality conditions with a margin. RAMDA, RMDA, ProxSGD
and ProxAdam, trained on the same full-batch objective with a step schedule (restarts at
the decays for the dual-averaging methods), must reach exactly that support.
"""

from __future__ import annotations

import math

import pytest
import torch

from compress.optim import make_optimizer
from compress.structure.group import Group, Slice

DT = torch.float64
C = 10


def _data():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=DT)
    return X, torch.tensor(y)


def _grouping(kind, F):
    if kind == "pixel_rows":
        return torch.arange(F) // 8  # 8 groups: the 8 pixels of an image row, all classes
    return torch.randperm(F, generator=torch.Generator().manual_seed(0)) % 16  # 16 random groups


def _fista(X, Y, gid, wg, lam, iters=3000):
    n, F = X.shape
    Xb = torch.cat([X, torch.ones(n, 1, dtype=DT)], 1)
    L = 0.5 * float(torch.linalg.matrix_norm(Xb, 2)) ** 2 / n  # Lipschitz bound of the mean cross-entropy

    def grad(W):
        return (torch.softmax(Xb @ W.T, 1) - Y).T @ Xb / n

    def norms(W):
        return torch.zeros(len(wg), dtype=DT).index_add_(0, gid, (W[:, :F] ** 2).sum(0)).sqrt()

    W = torch.zeros(C, F + 1, dtype=DT)
    Wy, tk = W.clone(), 1.0
    for _ in range(iters):
        Z = Wy - grad(Wy) / L
        f = (1 - lam * wg / L / norms(Z).clamp_min(1e-300)).clamp_min(0)
        Wn = Z.clone()
        Wn[:, :F] *= f[gid]
        tn = (1 + math.sqrt(1 + 4 * tk * tk)) / 2
        Wy, W, tk = Wn + (tk - 1) / tn * (Wn - W), Wn, tn
    support = norms(W) > 0
    # certificate: zero groups strictly inside the subdifferential, non-zero groups clearly non-zero
    ratio = norms(grad(W)) / (lam * wg)
    return support, ratio, norms(W)


@pytest.mark.slow
@pytest.mark.parametrize("kind,lam", [("pixel_rows", 0.01), ("random16", 0.003)])
def test_group_lasso_logistic_support(kind, lam):
    torch.set_num_threads(1)
    X, y = _data()
    n, F = X.shape
    Y = torch.nn.functional.one_hot(y, C).to(DT)
    gid = _grouping(kind, F)
    G = int(gid.max()) + 1
    sizes = torch.bincount(gid, minlength=G)
    wg = torch.sqrt(C * sizes.to(DT))
    support, ratio, ref_norms = _fista(X, Y, gid, wg, lam)
    assert 0 < int(support.sum()) < G
    assert float(ratio[~support].max()) < 0.97 and float(ref_norms[support].min()) > 0.1

    settings = {  # name: (lr, steps, extra)
        "ramda": (0.1, 1500, {"momentum": 0.1}),
        "rmda": (2.0, 1500, {"momentum": 0.1}),
        "proxsgd": (2.0, 1500, {"momentum": 0.9}),
        "proxadam": (0.01, 1500, {}),
    }
    for name, (lr, steps, extra) in settings.items():
        W = torch.nn.Parameter(torch.zeros(C, F, dtype=DT))
        b = torch.nn.Parameter(torch.zeros(C, dtype=DT))
        groups = []
        for g in range(G):
            grp = Group(f"g{g}", "neuron", "W", [Slice("W", 1, tuple(torch.nonzero(gid == g).flatten().tolist()))])
            grp.tensors, grp.weight = [W], float(wg[g])
            groups.append(grp)
        opt = make_optimizer(name, [W, b], groups=groups, lr=lr, lam=lam, **extra)
        for s in range(steps):
            if s in (steps // 2, 3 * steps // 4):  # step schedule: decay (a restart for RAMDA/RMDA)
                for pg in opt.param_groups:
                    pg["lr"] *= 0.3
                opt.restart()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(X @ W.T + b, y).backward()
            opt.step()
        found = opt.group_norms() > 0
        assert torch.equal(found, support), (name, found.tolist(), support.tolist())
