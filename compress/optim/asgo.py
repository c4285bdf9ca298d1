"""ASGO and DASGO (ALGORITHMS §4, seed 002) with the exact structured group prox.

Matrix parameters W (m × n; conv kernels as out × in·k·k), preconditioned on one side:

    M ← β₁ M + (1 − β₁) G,      V ← β₂ V + (1 − β₂) GᵀG  (right)  or  G Gᵀ  (left)
    every `precond_every` steps:  V / (1 − β₂ᵗ) = Q diag(λ) Qᵀ,
                                   h = sqrt(max(λ, eps_rel·λ_max)) + eps,   P = Q diag(h) Qᵀ
    U = M̂ P⁻¹ (right) or P⁻¹ M̂ (left),  M̂ = M / (1 − β₁ᵗ)
    c = rms·sqrt(mn) / ‖U‖_F          (the update's RMS is `rms`; rms=None: c = 1)
    z = W − η c U,   W ← argmin_x ηλ Σ_g w_g‖x_g‖ + ½‖x − z‖²_{P/c}

z minimises ⟨M̂, x⟩ + ‖x − W‖²_P / (2ηc), so adding λψ gives exactly this prox: the metric
of the regularized step is P/c. DASGO keeps only the diagonal of V (P = diag(h)).
Vectors and scalars fall back to Adam (d = sqrt(v̂) + ε, as ProxAdam), so a group that
spans a conv row, its BatchNorm γ/β and residual-coupled rows of other convs has the block
metric diag(P₁/c₁, D, P₂/c₂, ...): the metric of the whole step. It is solved exactly by
one secular equation per group in the eigenbases (eigprox.py).

Side: dim-0 (output-channel) groups → right (acts inside rows), groups along later dims
(input channels) → left; ungrouped matrices take the smaller side. The inverse root is
by eigendecomposition (torch.linalg.eigh, batched over same-size preconditioners): the
exact prox needs the eigenbasis, which a Newton–Schulz iteration does not give.
Preconditioners larger than `max_precond_dim` fall back to the diagonal (DASGO) form.

Why the relative floor eps_rel (default 1e-3, so h ≥ 0.03·h_max): V has rank ≤ rank(G)
early on; rounding puts components of M̂ of size ~unit-roundoff·‖M̂‖ into V's null space,
and an absolute ε alone would amplify them by 1/ε (in float32 as large as the real update).
The prox needs more: in a direction with a tiny eigenvalue the metric says moving is free,
so the group prox shrinks W's component there hard every step, wiping the directions that
gradients rarely visit. Fine-tuning digits-resnet (6 epochs, λ = 0.03, no group zero yet)
kept 94.7% accuracy with eps_rel = 1e-6, 98.4% with 1e-3, 99.6% with 1e-1 (dense: 100%).
"""

from __future__ import annotations

import math

import torch

from compress.optim.base import ProxOptimizer
from compress.optim.eigprox import EigMetric, as_matrix, eig_metric_group_prox, side_for

Tensor = torch.Tensor


def floored_root(lam: Tensor, eps_rel: float, eps: float) -> Tensor:
    """h = sqrt(max(λ, eps_rel·max(λ))) + eps along the last dim (λ ≥ 0 up to rounding)."""
    top = lam.amax(-1, keepdim=True).clamp_min(0)
    return torch.maximum(lam, eps_rel * top).clamp_min(0).sqrt() + eps


class ASGO(ProxOptimizer):
    """ASGO (one-sided full-matrix preconditioner) + exact structured group prox; `diagonal=True`: DASGO.

    Same contract as RAMDA: `ASGO(params, lr, lam=..., groups=...)`. The iterate is the
    structured point. `precond_every`: steps between eigendecompositions (the metric in
    between is the last one, for the step and the prox alike).
    """

    _frozen_keys = ("exp_avg", "exp_avg_sq")  # the preconditioners are not per entry

    def __init__(
        self,
        params,
        lr: float,
        lam: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        eps_rel: float = 1e-3,
        rms: float | None = 0.2,
        precond_every: int = 10,
        diagonal: bool = False,
        max_precond_dim: int = 2048,
        groups=None,
        newton_tol: float | None = None,
        max_newton: int = 50,
    ):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0 or not eps_rel >= 0:
            raise ValueError(f"eps must be > 0 and eps_rel >= 0, got {eps}, {eps_rel}")
        if rms is not None and not rms > 0:
            raise ValueError(f"rms must be > 0 or None, got {rms}")
        if int(precond_every) < 1 or int(max_precond_dim) < 1:
            raise ValueError("precond_every and max_precond_dim must be >= 1")
        self.diagonal, self.max_precond_dim = bool(diagonal), int(max_precond_dim)
        self.newton_tol, self.max_newton = newton_tol, max_newton
        defaults = dict(
            lr=lr, lam=lam, betas=tuple(betas), eps=eps, eps_rel=eps_rel, rms=rms, precond_every=int(precond_every), t=0
        )
        super().__init__(params, defaults, groups=groups, compile=False)

    # ------------------------------------------------------------------ layout

    def _build_index(self) -> None:
        super()._build_index()
        self._layout = []  # per parameter: None (Adam) or (side, preconditioner size b, diagonal?)
        self._k_of = {id(p): k for k, p in enumerate(self.index.params)}
        for k, p in enumerate(self.index.params):
            if p.dim() < 2 or p.numel() == 0:
                self._layout.append(None)
                continue
            side = side_for(self.index, k, p.shape)
            b = p.numel() // p.shape[0] if side == "right" else p.shape[0]
            self._layout.append((side, b, self.diagonal or b > self.max_precond_dim))

    def preconditioner_sides(self) -> list[str | None]:
        """Per parameter: "right", "left" (matrix), "right-diag"/"left-diag" (DASGO form) or None (Adam)."""
        return [None if lay is None else lay[0] + ("-diag" if lay[2] else "") for lay in self._layout]

    def _init_state(self, p: Tensor, st: dict) -> None:
        lay = self._layout[self._k_of[id(p)]]
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        if lay is None:
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            return
        _, b, diag = lay
        if diag:
            st["precond"] = p.new_zeros(b)
        else:
            st["precond"] = p.new_zeros(b, b)
            st["q"] = torch.eye(b, dtype=p.dtype, device=p.device)
            st["h"] = p.new_ones(b)

    # ------------------------------------------------------------------ step

    def _refresh(self, ks: list[int]) -> None:
        """Eigendecompositions of V̂ for parameters `ks`, batched per (size, dtype) bucket."""
        params = self.index.params
        buckets: dict = {}
        for k in ks:
            p = params[k]
            buckets.setdefault((self._layout[k][1], p.dtype, p.device), []).append(k)
        for kk in buckets.values():
            mats = []
            for k in kk:
                g = self.param_groups[self._pg_of[k]]
                mats.append(self.state[params[k]]["precond"] / (1 - g["betas"][1] ** g["t"]))
            lam, q = torch.linalg.eigh(torch.stack(mats))
            for i, k in enumerate(kk):
                g = self.param_groups[self._pg_of[k]]
                st = self.state[params[k]]
                st["q"].copy_(q[i])
                st["h"].copy_(floored_root(lam[i], g["eps_rel"], g["eps"]))

    def _step(self) -> None:
        idx = self.index
        params = idx.params
        for g in self.param_groups:
            g["t"] += 1
        refresh = []
        for k, p in enumerate(params):
            st = self.state[p]
            if not st:
                self._init_state(p, st)
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            grad = torch.zeros_like(p) if p.grad is None else p.grad.detach()
            g = self.param_groups[self._pg_of[k]]
            b1, b2 = g["betas"]
            st["exp_avg"].lerp_(grad, 1 - b1)
            lay = self._layout[k]
            if lay is None:
                st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                continue
            side, _, diag = lay
            G = as_matrix(grad)
            if diag:
                prod = (G * G).sum(0 if side == "right" else 1)
            else:
                prod = G.mT @ G if side == "right" else G @ G.mT
            st["precond"].mul_(b2).add_(prod, alpha=1 - b2)
            if not diag and (g["t"] - 1) % g["precond_every"] == 0:
                refresh.append(k)
        if refresh:
            self._refresh(refresh)

        zs, metrics = [], []
        for k, p in enumerate(params):
            z, met = self._direction(k, p)
            if not idx.entries[k].has_groups:
                met = 1.0  # untouched by the prox: w = z exactly
            zs.append(z)
            metrics.append(met)
        tau = self._tau([g["lr"] * g["lam"] for g in self.param_groups])
        if idx.n_groups and bool((tau > 0).any()):
            out, r, info = eig_metric_group_prox(
                zs, metrics, idx, tau, r0=self._get_r(), tol=self.newton_tol, max_iter=self.max_newton, return_info=True
            )
            self._set_r(r)
        else:
            out, info = zs, {"zero": 0, "active": 0, "newton_evals": 0}
        for p, w in zip(params, out):
            p.detach().copy_(w)
        self.last_stats = info

    def _direction(self, k: int, p: Tensor):
        """(z, metric of the step) for parameter k: the unregularized step and its prox metric."""
        st = self.state[p]
        g = self.param_groups[self._pg_of[k]]
        b1, b2 = g["betas"]
        t, lr = g["t"], g["lr"]
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        w = p.detach()
        lay = self._layout[k]
        if lay is None:
            d = (st["exp_avg_sq"] / bc2).sqrt() + g["eps"]
            return w - lr * (st["exp_avg"] / bc1) / d, d
        side, _, diag = lay
        mh = as_matrix(st["exp_avg"]) / bc1
        if diag:
            h = floored_root(st["precond"] / bc2, g["eps_rel"], g["eps"])
            hb = h.reshape(1, -1) if side == "right" else h.reshape(-1, 1)
            u = mh / hb
            unorm = u.norm()
        else:
            q, h = st["q"], st["h"]
            if side == "right":
                ut = (mh @ q) / h
                u = ut @ q.mT
            else:
                ut = (q.mT @ mh) / h.reshape(-1, 1)
                u = q @ ut
            unorm = ut.norm()  # ‖U‖ = ‖Qᵀ-rotated U‖
        c = 1.0
        un = float(unorm)
        if g["rms"] is not None and un > 0:
            c = g["rms"] * math.sqrt(u.numel()) / un
        z = w - (lr * c) * u.reshape(w.shape)
        if diag:
            shape = (1, *w.shape[1:]) if side == "right" else (w.shape[0],) + (1,) * (w.dim() - 1)
            return z, (h / c).reshape(shape)
        return z, EigMetric(q, h / c, side)


class DASGO(ASGO):
    """DASGO: ASGO with only the diagonal of the one-sided preconditioner (no eigendecompositions)."""

    def __init__(self, params, lr: float, lam: float = 0.0, **kw):
        kw.pop("diagonal", None)
        super().__init__(params, lr, lam=lam, diagonal=True, **kw)
