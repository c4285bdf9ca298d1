"""The group prox in a one-sided matrix metric (ALGORITHMS §4), batched over every group.

A parameter X, seen as a matrix (m × n: dim 0 by everything else, so a conv kernel is
out × in·k·k), with an SPD metric acting on one side has

    right:  ½‖X − Z‖²_R = ½ Σ_rows    (x_i − z_i) R (x_i − z_i)ᵀ     R = Q diag(h) Qᵀ, n × n
    left:   ½‖X − Z‖²_L = ½ Σ_columns (x_j − z_j)ᵀ L (x_j − z_j)     L = Q diag(h) Qᵀ, m × m

so a right metric never couples two rows and a left metric never couples two columns:
row (dim-0) groups take a right metric, groups along any later dim a left one. Rotating
into the eigenbasis (Y = X Q, or Y = Qᵀ X) keeps the Euclidean norm of every row (column)
and turns the metric into the diagonal h along the rotated axis. A group made of rows of
several such parameters plus entries of diagonally-preconditioned ones (BatchNorm γ/β,
biases) is therefore exactly the §2a problem with d = the concatenation of eigenvalues
and diagonal entries, and z rotated: one secular equation per group, solved for all groups
at once by the shared `metric_group_prox`, then rotated back. One eigendecomposition
serves every group of a layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from compress.optim.prox import GroupIndex, metric_group_prox

Tensor = torch.Tensor

SIDES = ("right", "left")


@dataclass
class EigMetric:
    """A one-sided SPD metric Q diag(h) Qᵀ: `side` "right" acts inside rows, "left" inside columns."""

    q: Tensor  # [b, b], orthonormal columns
    h: Tensor  # [b], > 0
    side: str

    def __post_init__(self):
        if self.side not in SIDES:
            raise ValueError(f"side must be 'right' or 'left', got {self.side!r}")


def as_matrix(t: Tensor) -> Tensor:
    """The m × n view the metrics act on (dim 0 by all trailing dims)."""
    return t.reshape(t.shape[0], -1)


def side_for(index: GroupIndex, k: int, shape: Sequence[int]) -> str:
    """The side that never mixes two groups of parameter k: dim-0 groups → right, later dims → left.

    Ungrouped parameters take the cheaper side (the smaller preconditioner).
    """
    e = index.entries[k]
    if e.has_groups:
        return "right" if e.dim == 0 else "left"
    m = shape[0]
    n = 1
    for s in shape[1:]:
        n *= s
    return "right" if n <= m else "left"


def check_side(index: GroupIndex, k: int, side: str) -> None:
    e = index.entries[k]
    if e.has_groups and (side == "right") != (e.dim == 0):
        raise ValueError(
            f"parameter {k} is grouped along dim {e.dim}: a {side} metric would mix its groups "
            f"(use side={'right' if e.dim == 0 else 'left'!r})"
        )


def rotate(x: Tensor, met: EigMetric) -> Tensor:
    """x in the metric's eigenbasis (same shape as x)."""
    x2 = as_matrix(x)
    y = x2 @ met.q if met.side == "right" else met.q.mT @ x2
    return y.reshape(x.shape)


def unrotate(y: Tensor, met: EigMetric) -> Tensor:
    y2 = as_matrix(y)
    x = y2 @ met.q.mT if met.side == "right" else met.q @ y2
    return x.reshape(y.shape)


def eig_diag(shape: Sequence[int], met: EigMetric) -> Tensor:
    """The eigenvalues h broadcast to a parameter of `shape` in the rotated basis."""
    if met.side == "right":
        return met.h.reshape(1, *shape[1:])
    return met.h.reshape(shape[0], *([1] * (len(shape) - 1)))


def eig_metric_group_prox(
    z: Sequence[Tensor],
    metrics: Sequence,
    index: GroupIndex,
    tau,
    r0: Tensor | None = None,
    tol: float | None = None,
    max_iter: int = 50,
    return_info: bool = False,
):
    """argmin_x Σ_g τ_g‖x_g‖ + Σ_k ½‖x_k − z_k‖²_{A_k}, exactly, for every group at once.

    `metrics[k]`: an `EigMetric` (one-sided SPD matrix), a positive tensor broadcastable to
    z[k] (a diagonal metric) or a positive float. A matrix metric must sit on the side that
    keeps parameter k's groups apart (`side_for`); otherwise a ValueError. `tau`, `r0`,
    `tol`, `max_iter` as in `metric_group_prox`.
    """
    zr, ds = [], []
    for k, (zk, met) in enumerate(zip(z, metrics)):
        if isinstance(met, EigMetric):
            check_side(index, k, met.side)
            zr.append(rotate(zk, met))
            ds.append(eig_diag(zk.shape, met).to(zk.dtype))
        else:
            zr.append(zk)
            ds.append(met)
    out, r, info = metric_group_prox(zr, ds, index, tau, r0=r0, tol=tol, max_iter=max_iter, return_info=True)
    out = [unrotate(o, met) if isinstance(met, EigMetric) else o for o, met in zip(out, metrics)]
    return (out, r, info) if return_info else out
