"""Group lasso on the preconditioned variables z = D^{1/2} W (ALGORITHMS §5, seed 003).

A diagonal metric D makes the preconditioned step on W plain gradient descent on
z = D^{1/2} W. Regularizing z instead of W turns the metric prox of §2a into the
closed-form group soft-threshold in z-space, mapped back:

    W_g ← D_g^{-1/2} · shrink_τ(D_g^{1/2} Z_g),   Z = the unregularized minimiser (a/d),

with the same τ (ProxAdam: η λ w_g; RAMDA: α_t λ w_g). z_g = 0 ⇔ W_g = 0, so the zero
pattern means the same in both spaces, but which groups reach zero differs: the zero test
is ‖D^{1/2} Z_g‖ ≤ τ here and ‖D Z_g‖ ≤ τ in parameter space.

Implementation: only the two kernel hooks change. `_ad` hands the shared solver the
z-space problem (a = D^{1/2} Z, d = 1, whose secular equation Newton solves in one step)
and `_finish` maps the result back by D^{-1/2}; the step, restarts, state and
checkpoints are the parent's. `ProxAdam(..., reg_space="preconditioned")` and
`RAMDA(..., reg_space="preconditioned")` construct these classes.
"""
from __future__ import annotations

from .proxadam import ProxAdam
from .ramda import RAMDA

REG_SPACES = ("param", "preconditioned")


class PrecondProxAdam(ProxAdam):
    """ProxAdam with the group lasso on z = D^{1/2} W (D = sqrt(v̂) + ε)."""

    reg_space = "preconditioned"

    @staticmethod
    def _ad(state, scal):
        a, d = ProxAdam._ad(state, scal)
        return a / d.sqrt(), 1.0

    @staticmethod
    def _finish(state, w, scal):
        _, d = ProxAdam._ad(state, scal)
        ProxAdam._finish(state, w / d.sqrt(), scal)


class PrecondRAMDA(RAMDA):
    """RAMDA with the group lasso on z = P^{1/2} W (P = cbrt(U) + ε): Ŵ = P^{-1/2} shrink(P^{1/2}(W⁰ − V/P))."""

    reg_space = "preconditioned"

    @staticmethod
    def _ad(state, scal):
        a, d = RAMDA._ad(state, scal)
        return a / d.sqrt(), 1.0

    @staticmethod
    def _finish(state, w, scal):
        _, d = RAMDA._ad(state, scal)
        RAMDA._finish(state, w / d.sqrt(), scal)


_VARIANTS = {ProxAdam: PrecondProxAdam, RAMDA: PrecondRAMDA}


def variant_for(cls: type, reg_space: str) -> type:
    """The class that regularizes in `reg_space` ("param" | "preconditioned") for ProxAdam / RAMDA."""
    if reg_space not in REG_SPACES:
        raise ValueError(f"reg_space must be one of {REG_SPACES}, got {reg_space!r}")
    if reg_space == "preconditioned":
        return _VARIANTS.get(cls, cls)
    return cls
