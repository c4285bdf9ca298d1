"""ProxAdam (ProxGen): an Adam step, then the exact group prox in Adam's diagonal metric.

m, v as in torch.optim.Adam; D = sqrt(v̂) + ε with v̂ = v / (1 − β₂ᵗ), m̂ = m / (1 − β₁ᵗ);
W ← argmin_w η λ Σ w_g ‖w_g‖ + ⟨m̂, w⟩ + (1/2η) (w − W)ᵀ D (w − W), i.e. the prox of §2a
with d = D/η around the Adam step z = W − η m̂/D (solved here with d = D, τ = η λ w_g,
the same problem scaled by η). With λ = 0 this is exactly Adam. Ŵ = W.
"""

from __future__ import annotations

import math

from compress.optim.base import ProxOptimizer
from compress.optim.regspace import pick_variant, preconditioned_variant


class ProxAdam(ProxOptimizer):
    """Adam + exact metric group prox; same constructor contract as RAMDA."""

    _state_keys = ("exp_avg", "exp_avg_sq")
    _frozen_keys = ("exp_avg", "exp_avg_sq")

    reg_space = "param"  # "preconditioned": the group lasso on z = D^{1/2} W (regspace.py, ALGORITHMS §5)

    def __new__(cls, *args, reg_space: str = "param", **kwargs):
        return super().__new__(pick_variant(cls, PrecondProxAdam, reg_space))

    def __init__(
        self,
        params,
        lr: float,
        lam: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        groups=None,
        newton_tol: float | None = None,
        max_newton: int = 50,
        compile: bool | None = None,
        reg_space: str = "param",
    ):
        self._check_lr_lam(lr, lam)
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.newton_tol, self.max_newton = newton_tol, max_newton
        super().__init__(params, dict(lr=lr, lam=lam, betas=tuple(betas), eps=eps, t=0), groups=groups, compile=compile)

    # state = (W, m, v), scal = (1 − β₁, β₂, 1 − β₂, η/(1 − β₁ᵗ), sqrt(1 − β₂ᵗ), ε)

    @staticmethod
    def _update(grad, state, scal):
        _, m, v = state
        m.lerp_(grad, scal[0])
        v.mul_(scal[1]).add_(scal[2] * grad * grad)

    @staticmethod
    def _ad(state, scal):
        w, m, v = state
        d = v.sqrt() / scal[4] + scal[5]
        return d * w - scal[3] * m, d

    @staticmethod
    def _finish(state, w, scal):
        state[0].copy_(w)

    def _init_state(self, p, st):
        self._buffers(p, st, zeros=("exp_avg", "exp_avg_sq"))

    def _step(self) -> None:
        vals = []
        for g in self.param_groups:
            g["t"] += 1
            b1, b2 = g["betas"]
            t = g["t"]
            vals.append((1 - b1, b2, 1 - b2, g["lr"] / (1 - b1**t), math.sqrt(1 - b2**t), g["eps"]))
        prob, back = self._begin(vals)
        tau = self._tau([g["lr"] * g["lam"] for g in self.param_groups])
        r, info = prob.solve_exact(tau, self._get_r(), tol=self.newton_tol, max_iter=self.max_newton)
        self._set_r(r)
        self._end(back, info)


PrecondProxAdam = preconditioned_variant(ProxAdam, "ProxAdam with the group lasso on z = D^{1/2} W (D = sqrt(v̂) + ε).")
