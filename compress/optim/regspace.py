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
`RAMDA(..., reg_space="preconditioned")` construct the variants their modules define
with `preconditioned_variant` (PrecondProxAdam, PrecondRAMDA).
"""

from __future__ import annotations

from compress.optim.registry import REG_SPACES


def preconditioned_variant(parent: type, doc: str) -> type:
    """`parent` with its subproblem handed over in z-space and the result mapped back by D^{-1/2}."""

    def _ad(state, scal):
        a, d = parent._ad(state, scal)
        return a / d.sqrt(), 1.0

    def _finish(state, w, scal):
        _, d = parent._ad(state, scal)
        parent._finish(state, w / d.sqrt(), scal)

    return type(
        f"Precond{parent.__name__}",
        (parent,),
        {
            "__doc__": doc,
            "__module__": parent.__module__,
            "reg_space": "preconditioned",
            "_ad": staticmethod(_ad),
            "_finish": staticmethod(_finish),
        },
    )


def pick_variant(cls: type, variant: type, reg_space: str) -> type:
    """The class that regularizes in `reg_space`: `cls` for "param", its `variant` for "preconditioned"."""
    if reg_space not in REG_SPACES:
        raise ValueError(f"reg_space must be one of {REG_SPACES}, got {reg_space!r}")
    return variant if reg_space == "preconditioned" else cls
