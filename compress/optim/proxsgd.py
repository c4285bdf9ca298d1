"""ProxSGD: momentum SGD, then the closed-form group soft-threshold with threshold η λ w_g.

m ← μ m + (1 − μ) g (m = g at the first step), z = W − η m,
W ← max(0, 1 − η λ w_g / ‖z_g‖) z_g. The iterate is the structured point (Ŵ = W).

Why the damped (averaging) momentum: at a fixed point m = g, so the fixed points are
those of the regularized problem, as in the RAMDA authors' ProxSGD. Heavy-ball momentum
without dampening (m = g / (1 − μ) at a fixed point) would silently solve the problem
with λ(1 − μ) instead. This is torch.optim.SGD(momentum=μ, dampening=μ).
"""

from __future__ import annotations

import torch

from compress.optim.base import ProxOptimizer


class ProxSGD(ProxOptimizer):
    """Proximal momentum SGD; `momentum` is the averaging coefficient μ of m (not RAMDA's c)."""

    _state_keys = ("momentum_buffer",)

    def __init__(
        self, params, lr: float, lam: float = 0.0, momentum: float = 0.9, groups=None, compile: bool | None = None
    ):
        self._check_lr_lam(lr, lam)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, lam=lam, momentum=momentum, t=0), groups=groups, compile=compile)

    # state = (W, m), scal = (lr, μ_t, 1, 1 − μ_t) with μ_1 = 0

    @staticmethod
    def _update(grad, state, scal):
        state[1].mul_(scal[1]).add_(scal[3] * grad)

    @staticmethod
    def _ad(state, scal):
        w, m = state
        return w - scal[0] * m, scal[2]

    @staticmethod
    def _finish(state, w, scal):
        state[0].copy_(w)

    def _init_state(self, p, st):
        self._buffers(p, st, zeros=("momentum_buffer",))

    def _step(self) -> None:
        vals = []
        for g in self.param_groups:
            g["t"] += 1
            mu = g["momentum"] if g["t"] > 1 else 0.0
            vals.append((g["lr"], mu, 1.0, 1.0 - mu))
        prob, back = self._begin(vals)
        tau = self._tau([g["lr"] * g["lam"] for g in self.param_groups])
        _, info = prob.solve_closed_form(tau, torch.ones_like(tau))
        self._end(back, info)
