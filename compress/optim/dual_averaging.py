"""Dual averaging (RAMDA, RMDA): stages, restarts, the averaging weight c, and the critical λ.

The structured point Ŵ is a function of the dual state, so the λ at which each group's next
prox gives exactly zero can be read off that state (`critical_lams`, ALGORITHMS §2a); the
budget controller uses it to set λ for a zero pattern exactly instead of by trial.
"""

from __future__ import annotations

import math

import torch

from compress.optim.base import ProxOptimizer

Tensor = torch.Tensor


class DualAveraging(ProxOptimizer):
    """Stages, restarts and the averaging weight c shared by RAMDA and RMDA.

    Per stage: s_t = η_t·sqrt(t+1), α_t = α_{t-1} + s_t; `restart()` resets t, α and the
    buffers in `_stage_zero` and sets W⁰ ("w0") to the current point W.
    """

    _has_w_hat = True
    _frozen_keys = ("w_hat", "w0")
    momentum_schedule = True
    _stage_zero: tuple[str, ...] = ()

    def _advance(self) -> list[tuple[float, float]]:
        """Advance every param group by one step: returns (s_t, sqrt(t+1)) per group."""
        out = []
        for g in self.param_groups:
            beta = math.sqrt(g["t"] + 1)
            s = g["lr"] * beta
            g["alpha"] += s
            g["t"] += 1
            out.append((s, beta))
        return out

    def _restart_group(self, group: dict) -> None:
        """Per-group extras of a restart (RAMDA: ε *= eps_restart_factor)."""

    @torch.no_grad()
    def restart(self) -> None:
        """New stage: t, α and the stage buffers reset; W⁰ = the current point W."""
        for g in self.param_groups:
            g["t"], g["alpha"] = 0, 0.0
            self._restart_group(g)
            for p in g["params"]:
                st = self.state.get(p)
                if st:
                    for key in self._stage_zero:
                        st[key].zero_()
                    st["w0"].copy_(p.detach())

    def set_momentum(self, c: float) -> None:
        """Set the averaging weight c (the training loop ramps it to 1 in the final stage)."""
        if not 0 < c <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {c}")
        for g in self.param_groups:
            g["momentum"] = c

    def _next_scalars(self, group: dict) -> tuple:
        """The kernel scalars of the next step with a zero gradient (the subclass's layout)."""
        raise NotImplementedError

    @torch.no_grad()
    def critical_lams(self) -> Tensor | None:
        """Per group, the λ above which the *next* prox makes the group exactly zero.

        The subproblem handed to the prox is min τ‖w‖ + ½Σd(w − a/d)², zero iff ‖a_g‖ ≤ τ_g
        with τ_g = α λ w_g; `_ad` gives a from the dual state (RAMDA: a = P W⁰ − V with
        P = cbrt(U) + ε; RMDA: P = √(t+1); the preconditioned variant: a / √P), so
        λ*_g = ‖a_g‖ / (α w_g) with the α of the next step (zero gradient assumed).
        None before the first step, or with several param groups.
        """
        if len(self.param_groups) != 1:
            return None
        g = self.param_groups[0]
        alpha = g.get("alpha", 0.0) + g["lr"] * math.sqrt(g.get("t", 0) + 1)
        if alpha <= 0:
            return None
        scal = self._next_scalars(g)
        rows = []
        for p in self.index.params:
            st = self.state.get(p)
            if not st or any(k not in st for k in self._state_keys):
                return None
            rows.append(self._ad((p.detach(), *(st[k] for k in self._state_keys)), scal)[0])
        a = self.index.group_sq_norms(rows).sqrt().cpu()
        return a / (alpha * self.index.weights.cpu().clamp_min(1e-300))
