"""RMDA: Regularized Modernized Dual Averaging (Huang & Lee, ICLR 2022; ALGORITHMS §2c).

RAMDA without the adaptive metric: P = β_t I with β_t = sqrt(t+1), s_t = η_t β_t,
α_t = Σ s, V = Σ s G, Ŵ = prox_{α_t ψ / β_t}(W⁰ − V/β_t) (the closed-form group
soft-threshold), W ← (1 − c) W + c Ŵ; stages and restarts as in RAMDA.
State per parameter: v, w0, w_hat (three parameter-sized buffers).
"""

from __future__ import annotations

import math

import torch

from compress.optim.dual_averaging import DualAveraging


class RMDA(DualAveraging):
    """RMDA; same constructor contract as RAMDA (no ε: the metric is a scalar)."""

    _state_keys = ("v", "w0", "w_hat")
    _stage_zero = ("v",)

    def __init__(
        self, params, lr: float, lam: float = 0.0, momentum: float = 0.1, groups=None, compile: bool | None = None
    ):
        self._check_lr_lam(lr, lam)
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

    def _next_scalars(self, group: dict) -> tuple:
        beta = math.sqrt(group["t"] + 1)
        return (group["lr"] * beta, beta, group["momentum"])

    def _init_state(self, p, st):
        self._buffers(p, st, zeros=("v",), copies=("w0", "w_hat"))

    def _step(self) -> None:
        adv = self._advance()
        prob, back = self._begin([(s, beta, g["momentum"]) for (s, beta), g in zip(adv, self.param_groups)])
        tau = self._tau([g["alpha"] * g["lam"] for g in self.param_groups])
        dscale = torch.tensor([beta for _, beta in adv], dtype=torch.float64, device=self.index.device)[self._group_pg]
        _, info = prob.solve_closed_form(tau, dscale)
        self._end(back, info)
