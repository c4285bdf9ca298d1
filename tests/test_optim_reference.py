"""Slow, direct float64 transcriptions of ALGORITHMS §2 (the references the optimizer tests
compare against), a tiny model to drive them, and checks of the references themselves.

Nothing here imports compress.optim: the prox is solved group by group by bisection on
φ(r) = 1, the updates are written as in the spec.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from compress.structure.group import Group, Slice

DT = torch.float64


# --------------------------------------------------------------------------- group specs


def rows_spec(params):
    """Default grouping: each row of a >= 2-D parameter, weight sqrt(row size)."""
    spec = []
    for k, p in enumerate(params):
        if p.dim() >= 2:
            for i in range(p.shape[0]):
                spec.append(([(k, 0, [i])], math.sqrt(p[0].numel())))
    return spec


def groups_spec(groups, params):
    pos = {id(p): k for k, p in enumerate(params)}
    return [([(pos[id(t)], s.dim, list(s.indices)) for s, t in zip(g.slices, g.tensors)], g.weight) for g in groups]


def _gather(x, k, dim, idx):
    return x[k].movedim(dim, 0)[idx].reshape(-1)


def ref_prox(z, d, spec, tau, iters=80):
    """argmin Σ_g τ_g‖w_g‖ + ½Σ d(w − z)², group by group: zero test, then bisection on r = ‖w‖."""
    w = [t.clone() for t in z]
    if not spec:
        return w
    # entries of each group, padded to a [G, L] table (padding: a = 0, d = 1 adds nothing to φ)
    zs = [torch.cat([_gather(z, k, dm, i) for k, dm, i in sl]).double() for sl, _ in spec]
    ds = [torch.cat([_gather(d, k, dm, i) for k, dm, i in sl]).double() for sl, _ in spec]
    L = max(len(t) for t in zs)
    Z = torch.stack([torch.cat([t, t.new_zeros(L - len(t))]) for t in zs])
    D = torch.stack([torch.cat([t, t.new_ones(L - len(t))]) for t in ds])
    A = D * Z
    T = tau.double()[:, None]
    lo, hi = torch.zeros(len(spec), 1, dtype=DT), Z.norm(dim=1, keepdim=True)  # 0 < r < ‖z‖
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        big = ((A / (D * mid + T)) ** 2).sum(1, keepdim=True) > 1.0  # φ decreasing: root is right of mid
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    roots = (0.5 * (lo + hi)).flatten().tolist()
    zero = (A.norm(dim=1) <= tau.double()).tolist()
    for (slices, _), tg, rt, zr in zip(spec, tau.tolist(), roots, zero):
        r = 0.0 if zr else (None if tg == 0 else rt)
        for k, dm, i in slices:
            zk = z[k].movedim(dm, 0)[i]
            dk = d[k].movedim(dm, 0)[i]
            val = zk.clone() if r is None else dk * zk * r / (dk * r + tg)
            w[k].movedim(dm, 0)[i] = val
    return w


def soft_threshold(z, spec, tau):
    """Closed form (equal d): w_g = max(0, 1 − τ_g/‖z_g‖) z_g, written out group by group."""
    w = [t.clone() for t in z]
    for (slices, _), tg in zip(spec, tau.tolist()):
        nz = math.sqrt(sum(float((z[k].movedim(dm, 0)[i] ** 2).sum()) for k, dm, i in slices))
        f = max(0.0, 1.0 - tg / nz) if nz > 0 else 0.0
        for k, dm, i in slices:
            w[k].movedim(dm, 0)[i] = f * z[k].movedim(dm, 0)[i]
    return w


def taus(spec, factor):
    return torch.tensor([factor * wg for _, wg in spec], dtype=DT)


# --------------------------------------------------------------------------- references


class RefRAMDA:
    def __init__(self, params, lam, c, eps, spec):
        self.W = [p.detach().clone() for p in params]
        self.lam, self.c, self.eps, self.spec = lam, c, eps, spec
        self.restart(1.0)

    def restart(self, eps_factor):
        self.t, self.alpha = 0, 0.0
        self.V = [torch.zeros_like(w) for w in self.W]
        self.U = [torch.zeros_like(w) for w in self.W]
        self.W0 = [w.clone() for w in self.W]
        self.eps *= eps_factor

    def step(self, grads, lr):
        s = lr * math.sqrt(self.t + 1)
        self.alpha += s
        for V, U, g in zip(self.V, self.U, grads):
            V += s * g
            U += s * g * g
        P = [U.pow(1.0 / 3.0) + self.eps for U in self.U]
        z = [W0 - V / Pk for W0, V, Pk in zip(self.W0, self.V, P)]
        self.W_hat = ref_prox(z, P, self.spec, taus(self.spec, self.alpha * self.lam))
        self.W = [(1 - self.c) * W + self.c * Wh for W, Wh in zip(self.W, self.W_hat)]
        self.t += 1


class RefRMDA:
    def __init__(self, params, lam, c, spec):
        self.W = [p.detach().clone() for p in params]
        self.lam, self.c, self.spec = lam, c, spec
        self.restart()

    def restart(self):
        self.t, self.alpha = 0, 0.0
        self.V = [torch.zeros_like(w) for w in self.W]
        self.W0 = [w.clone() for w in self.W]

    def step(self, grads, lr):
        beta = math.sqrt(self.t + 1)
        s = lr * beta
        self.alpha += s
        for V, g in zip(self.V, grads):
            V += s * g
        z = [W0 - V / beta for W0, V in zip(self.W0, self.V)]
        self.W_hat = soft_threshold(z, self.spec, taus(self.spec, self.alpha * self.lam / beta))
        self.W = [(1 - self.c) * W + self.c * Wh for W, Wh in zip(self.W, self.W_hat)]
        self.t += 1


class RefProxSGD:
    def __init__(self, params, lam, mu, spec):
        self.W = [p.detach().clone() for p in params]
        self.lam, self.mu, self.spec = lam, mu, spec
        self.m = None

    def restart(self):
        """ProxSGD has no stages: a learning-rate decay changes nothing else."""

    def step(self, grads, lr):
        self.m = (
            [g.clone() for g in grads]
            if self.m is None
            else [self.mu * m + (1 - self.mu) * g for m, g in zip(self.m, grads)]
        )
        z = [W - lr * m for W, m in zip(self.W, self.m)]
        self.W = soft_threshold(z, self.spec, taus(self.spec, lr * self.lam))
        self.W_hat = self.W


class RefProxAdam:
    def __init__(self, params, lam, betas, eps, spec):
        self.W = [p.detach().clone() for p in params]
        self.lam, (self.b1, self.b2), self.eps, self.spec = lam, betas, eps, spec
        self.m = [torch.zeros_like(w) for w in self.W]
        self.v = [torch.zeros_like(w) for w in self.W]
        self.t = 0

    def restart(self):
        """ProxAdam has no stages either (the moments carry over a decay)."""

    def step(self, grads, lr):
        self.t += 1
        self.m = [self.b1 * m + (1 - self.b1) * g for m, g in zip(self.m, grads)]
        self.v = [self.b2 * v + (1 - self.b2) * g * g for v, g in zip(self.v, grads)]
        mh = [m / (1 - self.b1**self.t) for m in self.m]
        D = [(v / (1 - self.b2**self.t)).sqrt() + self.eps for v in self.v]
        z = [W - lr * m / Dk for W, m, Dk in zip(self.W, mh, D)]
        d = [Dk / lr for Dk in D]  # the metric of the Adam step
        self.W = ref_prox(z, d, self.spec, taus(self.spec, self.lam))
        self.W_hat = self.W


# --------------------------------------------------------------------------- a small model


class TinyNet(nn.Module):
    """conv+BN+ReLU, conv(+bias)+ReLU, linear: row groups, cross-parameter groups, column groups."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5 * 16, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def tiny_problem(seed=0, dtype=DT):
    torch.manual_seed(seed)
    model = TinyNet().to(dtype)
    x = torch.randn(16, 1, 4, 4, dtype=dtype)
    y = torch.randint(0, 3, (16,))
    return model, x, y


def tiny_groups(model):
    """conv1 channel i = (conv1 row, bn γ_i, bn β_i); conv2 channel = (row, bias); fc column pairs (dim 1)."""
    P = dict(model.named_parameters())
    groups = []

    def add(name, slices):
        g = Group(name, "channel", name.split("[")[0], [Slice(*s) for s in slices])
        g.tensors = [P[s[0]] for s in slices]
        g.weight = math.sqrt(sum(len(s[2]) * P[s[0]].numel() // P[s[0]].shape[s[1]] for s in slices))
        groups.append(g)

    for i in range(4):
        add(f"conv1[{i}]", [("conv1.weight", 0, (i,)), ("bn.weight", 0, (i,)), ("bn.bias", 0, (i,))])
    for i in range(5):
        add(f"conv2[{i}]", [("conv2.weight", 0, (i,)), ("conv2.bias", 0, (i,))])
    for j in range(0, 80, 2):
        add(f"fc[{j}]", [("fc.weight", 1, (j, j + 1))])
    return groups


def grads_at(model, W, x, y):
    """Gradient of the tiny model's loss at the point W (list aligned with model.parameters())."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: w.detach().clone().requires_grad_(True) for n, w in zip(names, W)}
    out = torch.func.functional_call(model, params, (x,))
    loss = nn.functional.cross_entropy(out, y)
    return list(torch.autograd.grad(loss, [params[n] for n in names]))


# --------------------------------------------------------------------------- the references themselves


def test_ref_prox_equal_d_is_soft_threshold():
    torch.manual_seed(1)
    z = [torch.randn(6, 5, dtype=DT)]
    spec = rows_spec(z)
    tau = torch.rand(len(spec), dtype=DT) * 4
    w1 = ref_prox(z, [torch.full_like(z[0], 2.0)], spec, tau * 2.0)
    w2 = soft_threshold(z, spec, tau)
    assert torch.allclose(w1[0], w2[0], atol=1e-12)
    assert bool((w2[0].norm(dim=1) == 0).any()) and bool((w2[0].norm(dim=1) > 0).any())


def test_ref_prox_satisfies_optimality():
    torch.manual_seed(2)
    z = [torch.randn(50, 4, dtype=DT)]
    d = [torch.exp(torch.randn(50, 4, dtype=DT) * 2)]
    spec = rows_spec(z)
    tau = torch.rand(50, dtype=DT) * (d[0] * z[0]).norm(dim=1) * 2
    w = ref_prox(z, d, spec, tau)[0]
    nz = w.norm(dim=1) > 0
    grad = d[0] * (w - z[0]) + tau[:, None] * w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)
    assert float(grad[nz].norm(dim=1).max()) < 1e-10
    assert bool(((d[0] * z[0]).norm(dim=1)[~nz] <= tau[~nz]).all())
