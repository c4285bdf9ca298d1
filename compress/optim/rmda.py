"""RMDA: Regularized Modernized Dual Averaging (Huang & Lee, ICLR 2022; ALGORITHMS §2c).

RAMDA without the adaptive metric: P = β_t I with β_t = sqrt(t+1), s_t = η_t β_t,
α_t = Σ s, V = Σ s G, Ŵ = prox_{α_t ψ / β_t}(W⁰ − V/β_t) (the closed-form group
soft-threshold), W ← (1 − c) W + c Ŵ; stages and restarts as in RAMDA.
State per parameter: v, w0, w_hat (three parameter-sized buffers).
"""
from __future__ import annotations

import math

import torch

from .base import ProxOptimizer


class RMDA(ProxOptimizer):
    """RMDA; same constructor contract as RAMDA (no ε: the metric is a scalar)."""

    _state_keys = ("v", "w0", "w_hat")
    _has_w_hat = True

    def __init__(self, params, lr: float, lam: float = 0.0, momentum: float = 0.1, groups=None,
                 compile: bool | None = None):
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum (the averaging weight c) must be in (0, 1], got {momentum}")
        defaults = dict(lr=lr, lam=lam, momentum=momentum, t=0, alpha=0.0)
        super().__init__(params, defaults, groups=groups, compile=compile)

    # state = (W, V, W0, Ŵ), scal = (s, β, c)

    @staticmethod
    def _update(grad, state, scal):
        state[1].add_(scal[0] * grad)

    @staticmethod
    def _ad(state, scal):
        _, v, w0, _ = state
        beta = scal[1]
        return beta * w0 - v, beta

    @staticmethod
    def _finish(state, w, scal):
        state[3].copy_(w)
        state[0].lerp_(w, scal[2])

    def _init_state(self, p, st):
        st["v"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        st["w0"] = p.detach().clone(memory_format=torch.contiguous_format)
        st["w_hat"] = p.detach().clone(memory_format=torch.contiguous_format)

    @torch.no_grad()
    def restart(self) -> None:
        """New stage: t, α, V reset; W⁰ = the current point W."""
        for g in self.param_groups:
            g["t"], g["alpha"] = 0, 0.0
            for p in g["params"]:
                st = self.state.get(p)
                if st:
                    st["v"].zero_()
                    st["w0"].copy_(p.detach())

    def set_momentum(self, c: float) -> None:
        """Set the averaging weight c."""
        if not 0 < c <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {c}")
        for g in self.param_groups:
            g["momentum"] = c

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        vals, betas = [], []
        for g in self.param_groups:
            beta = math.sqrt(g["t"] + 1)
            s = g["lr"] * beta
            g["alpha"] += s
            g["t"] += 1
            vals.append((s, beta, g["momentum"]))
            betas.append(beta)
        prob, back = self._begin(vals)
        tau = self._tau([g["alpha"] * g["lam"] for g in self.param_groups])
        dscale = torch.tensor(betas, dtype=torch.float64, device=self.index.device)[self._group_pg]
        _, info = prob.solve_closed_form(tau, dscale)
        self._end(back, info)
        return loss
