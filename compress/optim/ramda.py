"""RAMDA: Regularized Adaptive Momentum Dual Averaging (ALGORITHMS §2, seed 000).

Per stage (between restarts), with s_t = η_t·sqrt(t+1):
  α_t = α_{t-1} + s_t,  V += s_t G,  U += s_t G²,  P = cbrt(U) + ε,
  Ŵ = argmin α_t ψ(W) + ⟨V, W⟩ + ½ (W − W⁰)ᵀ P (W − W⁰),   W ← (1 − c) W + c Ŵ.

State per parameter: v (V), u_cbrt (cbrt(U), see below), w0 (W⁰), w_hat (Ŵ) and r (the
warm start of each group's secular-equation root): four parameter-sized buffers.

Why cbrt(U) instead of U: P needs the cube root every step, and a cube root is the
expensive part of the step (ALGORITHMS §7). Keeping c = cbrt(U) and updating
c ← cbrt(c³ + s g²) saves the U buffer and is as accurate as storing U in the same
precision: the relative error obeys |δ_{t+1}| ≤ |δ_t|·U_t/U_{t+1} + O(unit roundoff)
(tests/test_optim_ramda.py checks this bound step by step).

The cube root itself: eagerly exp(log(x)/3) plus one Newton polish (few ops: small
tensors are dominated by per-op overhead); compiled, a division-only form that runs at
memory speed (exp/log made the fused kernel compute-bound, twice as slow): an initial
guess from the float's bits (exponent / 3, within 3.5%) and 3 (float32) or 4 (float64)
Newton steps, accurate to about one ulp.
"""

from __future__ import annotations

import math

import torch

from compress.optim.dual_averaging import DualAveraging
from compress.optim.regspace import pick_variant, preconditioned_variant


def _cbrt_bits_newton(x):
    """cbrt(x) for x >= 0 without exp/log: bits(x)/3 + K as a first guess, then Newton."""
    if x.dtype == torch.float32:
        guess = (709921077.0 + x.view(torch.int32).to(torch.float32) * (1.0 / 3.0)).to(torch.int32).view(torch.float32)
        iters = 3
    else:
        guess = (
            (3071306043645493248.0 + x.view(torch.int64).to(torch.float64) * (1.0 / 3.0))
            .to(torch.int64)
            .view(torch.float64)
        )
        iters = 4
    c = guess
    for _ in range(iters):
        c = c - (c * c * c - x) / (3.0 * c * c)
    return torch.where(x > 0, c, 0.0)


def _cbrt(x):
    """cbrt(x) for x >= 0 (see the module docstring for the two forms)."""
    if torch.compiler.is_compiling() and x.dtype in (torch.float32, torch.float64):
        return _cbrt_bits_newton(x)
    c = torch.exp(torch.log(x) * (1.0 / 3.0))
    return torch.where(c > 0, c - (c * c * c - x) / (3.0 * c * c), c)


class RAMDA(DualAveraging):
    """RAMDA with the exact metric group prox (`solver="exact"`) or the paper's pg solver.

    `groups=None`: every parameter with >= 2 dims is grouped by dim-0 rows with weight
    sqrt(row size); 1-D parameters are trained but not regularized. `lam`, `lr`,
    `momentum` (c) and `eps` live in param_groups (schedulers and the budget controller
    may change them). `restart()` starts a new stage (also ε *= eps_restart_factor);
    `set_momentum(c)` sets c.
    """

    _state_keys = ("v", "u_cbrt", "w0", "w_hat")
    _stage_zero = ("v", "u_cbrt")

    reg_space = "param"  # "preconditioned": the group lasso on z = D^{1/2} W (regspace.py, ALGORITHMS §5)

    def __new__(cls, *args, reg_space: str = "param", **kwargs):
        return super().__new__(pick_variant(cls, PrecondRAMDA, reg_space))

    def __init__(
        self,
        params,
        lr: float,
        lam: float = 0.0,
        momentum: float = 0.1,
        eps: float = 1e-6,
        groups=None,
        solver: str = "exact",
        eps_restart_factor: float = 1.0,
        newton_tol: float | None = None,
        max_newton: int = 50,
        pg_rtol: float = 1e-8,
        pg_min_iter: int = 2,
        pg_max_iter: int = 100,
        compile: bool | None = None,
        reg_space: str = "param",
    ):
        self._check_lr_lam(lr, lam)
        if not 0 < momentum <= 1:
            raise ValueError(f"momentum (the averaging weight c) must be in (0, 1], got {momentum}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not eps_restart_factor > 0:
            raise ValueError(f"eps_restart_factor must be > 0, got {eps_restart_factor}")
        if solver not in ("exact", "pg"):
            raise ValueError(f"solver must be 'exact' or 'pg', got {solver!r}")
        if max_newton < 1 or pg_max_iter < 1 or pg_min_iter < 1:
            raise ValueError("iteration limits must be >= 1")
        self.solver = solver
        self.newton_tol, self.max_newton = newton_tol, max_newton
        self.pg_rtol, self.pg_min_iter, self.pg_max_iter = pg_rtol, pg_min_iter, pg_max_iter
        defaults = dict(
            lr=lr, lam=lam, momentum=momentum, eps=eps, eps_restart_factor=eps_restart_factor, t=0, alpha=0.0
        )
        super().__init__(params, defaults, groups=groups, compile=compile)

    # ---- kernels (state = (W, V, cbrt U, W0, Ŵ), scal = (s, eps, c))

    @staticmethod
    def _update(grad, state, scal):
        _, v, cu, _, _ = state
        s = scal[0]
        v.add_(s * grad)
        cu.copy_(_cbrt(cu * cu * cu + s * grad * grad))

    @staticmethod
    def _ad(state, scal):
        _, v, cu, w0, _ = state
        d = cu + scal[1]
        return d * w0 - v, d

    @staticmethod
    def _finish(state, w, scal):
        state[4].copy_(w)
        state[0].lerp_(w, scal[2])

    def _init_state(self, p, st):
        self._buffers(p, st, zeros=("v", "u_cbrt"), copies=("w0", "w_hat"))

    def _next_scalars(self, group: dict) -> tuple:
        return (group["lr"] * math.sqrt(group["t"] + 1), group["eps"], group["momentum"])

    def _restart_group(self, group: dict) -> None:
        group["eps"] = group["eps"] * group["eps_restart_factor"]

    def _step(self) -> None:
        vals = [(s, g["eps"], g["momentum"]) for (s, _), g in zip(self._advance(), self.param_groups)]
        prob, back = self._begin(vals)
        tau = self._tau([g["alpha"] * g["lam"] for g in self.param_groups])
        if self.solver == "exact":
            r, info = prob.solve_exact(tau, self._get_r(), tol=self.newton_tol, max_iter=self.max_newton)
            self._set_r(r)
        else:
            _, info = prob.solve_pg(
                tau, self._step_views("w_hat"), rtol=self.pg_rtol, min_iter=self.pg_min_iter, max_iter=self.pg_max_iter
            )
        self._end(back, info)


PrecondRAMDA = preconditioned_variant(
    RAMDA, "RAMDA with the group lasso on z = P^{1/2} W (P = cbrt(U) + ε): Ŵ = P^{-1/2} shrink(P^{1/2}(W⁰ − V/P))."
)
