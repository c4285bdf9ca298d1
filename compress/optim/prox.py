"""The group prox in a diagonal metric (ALGORITHMS §2a/§2b), batched over every group.

All optimizers of this package reduce their regularized step to, for every group g,

    min_w  τ_g ‖w‖ + ½ Σ_j d_j (w_j − z_j)²          (d_j > 0)

which is written here in terms of a = d ⊙ z (so no division is needed to form z):
w = 0 iff ‖a‖ ≤ τ, else w_j = a_j r / (d_j r + τ) where r = ‖w‖ solves
φ(r) = Σ (a_j / (d_j r + τ))² = 1. Indices outside every group (and groups with τ = 0)
are not shrunk: w = a / d, which the same formula gives with r = 1, τ = 0.

Groups are indexed per parameter (`GroupIndex`): each parameter is seen as a 3-D view
[A, n, B] where n is the size along its grouped dim, and a LongTensor maps each of the n
indices to a group id (-1: ungrouped). A per-group reduction is then "sum over dims 0
and 2, index_add into a vector of groups", so a step costs a few tensor operations per
parameter and never loops over groups in Python.

The kernels (`make_prox_kernels`) are plain tensor functions of 3-D views so that the
optimizers can hand them to torch.compile; the public functions here run them eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from compress.optim.group_index import GroupIndex, ParamEntry  # noqa: F401  (re-exported)

Tensor = torch.Tensor


# --------------------------------------------------------------------------- kernels


def _col(v: Tensor) -> Tensor:
    return v.view(1, -1, 1)


def make_prox_kernels(ad: Callable, finish: Callable) -> dict[str, Callable]:
    """Elementwise+reduction kernels for one optimizer, fused around its metric.

    `ad(state, scal) -> (a, d)` forms a = d ⊙ z and d (a tensor or a 0-dim scalar) from
    the optimizer's state tensors (3-D views) and scalars; `finish(state, w, scal)` writes
    the prox result w (the structured point) wherever the optimizer keeps it. Every
    kernel takes per-index vectors ([n]) for r, τ; reductions return per-index rows [n].
    """

    # (A fourth sum, Σq²e² for a Halley step, made inductor split the loop in two and
    # doubled the pass's cost, more than the Newton evaluation it would save.)

    def sums0(state, scal, r, tau):
        """Σa² (the zero test) and S2, S3 at the warm start r, in one pass."""
        a, d = ad(state, scal)
        inv = 1.0 / (d * _col(r) + _col(tau))
        q = a * inv
        q2 = q * q
        return (a * a).sum((0, 2)), q2.sum((0, 2)), (q2 * (d * inv)).sum((0, 2))

    def sums(state, scal, r, tau):
        """S2 = Σq² = φ(r) and S3 = Σq²·d/(d r+τ) = −φ'(r)/2, with q = a/(d r+τ)."""
        a, d = ad(state, scal)
        inv = 1.0 / (d * _col(r) + _col(tau))
        q = a * inv
        q2 = q * q
        return q2.sum((0, 2)), (q2 * (d * inv)).sum((0, 2))

    def sq(state, scal):
        """Σa² only (closed-form solvers: the metric is a scalar)."""
        a, _ = ad(state, scal)
        return (a * a).sum((0, 2))

    def final(state, scal, r, tau):
        """w = a r / (d r + τ) (zero groups: r = 0; ungrouped: r = 1, τ = 0), then write it."""
        a, d = ad(state, scal)
        rr = _col(r)
        finish(state, a * rr / (d * rr + _col(tau)), scal)

    def dmax(state, scal):
        """max_j d_j per index (the pg solver's step size 1 / max d)."""
        _, d = ad(state, scal)
        return (d + torch.zeros_like(state[0])).amax((0, 2))

    def pg_obj(state, scal, w):
        """Σw² and Σ(½dw² − aw) at w: the subproblem objective at the starting point."""
        a, d = ad(state, scal)
        return (w * w).sum((0, 2)), ((0.5 * d * w - a) * w).sum((0, 2))

    def pg_sums(state, scal, w, theta, free):
        """For y = w − θ(d w − a): Σy², Σ½dy², Σay (the shrink factor and the new objective)."""
        a, d = ad(state, scal)
        th = _col(free) / d + _col(1.0 - free) * _col(theta)
        y = w - th * (d * w - a)
        return (y * y).sum((0, 2)), (0.5 * d * y * y).sum((0, 2)), (a * y).sum((0, 2))

    def pg_step(state, scal, w, theta, free, factor):
        """w ← factor · (w − θ(d w − a)): one proximal-gradient step (factor = group shrink)."""
        a, d = ad(state, scal)
        th = _col(free) / d + _col(1.0 - free) * _col(theta)
        w.copy_(_col(factor) * (w - th * (d * w - a)))

    def pg_final(state, scal, w):
        finish(state, w, scal)

    return {
        "sums0": sums0,
        "sums": sums,
        "sq": sq,
        "final": final,
        "dmax": dmax,
        "pg_obj": pg_obj,
        "pg_sums": pg_sums,
        "pg_step": pg_step,
        "pg_final": pg_final,
    }


# --------------------------------------------------------------------------- solvers


def default_newton_tol(dtype: torch.dtype) -> float:
    """Target relative accuracy of r: about the dtype's resolution (float32: 1e-7, float64: 1e-15)."""
    return 1e-7 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-15


def secular_newton(
    r: Tensor,
    s2: Tensor,
    s3: Tensor,
    active: Tensor,
    evaluate: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
    tol: float,
    noise: float,
    max_iter: int,
) -> tuple[Tensor, int]:
    """Newton on f(r) = 1/sqrt(φ(r)) − 1 for every `active` group at once.

    f is increasing and concave (φ^{-1/2} is the reciprocal of a norm of z_j/(r+τ/d_j),
    as in trust-region secular equations), so from a point left of the root Newton climbs
    monotonically and quadratically, and from the right one step lands on the left; a
    negative step is clamped to r = 0, which is always left of the root of a non-zero
    group. With φ = S2 and φ' = −2 S3 the step is Δr = S2 (sqrt(S2) − 1) / S3. A group
    stops when the error left after its step, ≈ (|Δr|/r)², is below `tol`, or when
    φ = 1 to rounding (`noise`). `evaluate(r, active)` returns (S2, S3) at r for the
    active groups. Returns (r, number of evaluations used after the first).
    """
    evals = 0
    for it in range(max_iter):
        rs2 = s2.sqrt()
        delta = torch.where(active, s2 * (rs2 - 1.0) / torch.where(active, s3, 1.0), 0.0)
        rn = (r + delta).clamp_min(0.0)
        rel = delta.abs() / torch.where(rn > 0, rn, 1.0)
        done = ((rel * rel <= tol) & (rn > 0)) | ((rs2 - 1.0).abs() <= noise)
        r = torch.where(active, rn, r)
        active = active & ~done
        if it + 1 == max_iter or not bool(active.any()):
            break
        s2, s3 = evaluate(r, active)
        evals += 1
    return r, evals


def _noise(dtype: torch.dtype) -> float:
    return 16 * torch.finfo(dtype).eps


class ProxProblem:
    """One instance of the batched subproblem: kernels and their arguments per parameter.

    `states[k]`: the tuple of 3-D views the kernels' `ad`/`finish` read for parameter k
    (first: a tensor shaped like the parameter); `scals[k]`: its scalar tensors;
    `call(name, k, *args)` runs a kernel (possibly compiled). `tau` is per group (float64).
    Per-index vectors (r, τ, ...) are expanded for all parameters with one gather, and
    per-index sums go into the group vectors with one index_add.
    """

    def __init__(self, index: GroupIndex, call: Callable, states: Sequence[tuple], scals: Sequence[tuple]):
        self.index, self.call, self.states, self.scals = index, call, states, scals
        self.dtypes = [p.dtype for p in index.params]
        self.grouped = index.grouped

    def _expand(self, vec: Tensor, fill: float) -> list[Tensor]:
        return self.index.expand_all(vec, fill, self.dtypes)

    def _low_dtype(self) -> torch.dtype:
        dts = {self.dtypes[k] for k in self.grouped} or {torch.float64}
        return max(dts, key=lambda d: torch.finfo(d).eps)

    def _run(self, name: str, ks: Sequence[int], *vecs: list[Tensor]) -> list:
        return [self.call(name, k, self.states[k], self.scals[k], *(v[k] for v in vecs)) for k in ks]

    def _final(self, r: Tensor, tau: Tensor, ks=None) -> None:
        ks = range(len(self.states)) if ks is None else ks
        self._run("final", ks, self._expand(r, 1.0), self._expand(tau, 0.0))

    def solve_exact(self, tau: Tensor, r0: Tensor, tol: float | None = None, max_iter: int = 50) -> tuple[Tensor, dict]:
        """Exact prox (§2a): zero test, then batched Newton warm-started at r0; writes via `final`."""
        idx, grouped = self.index, self.grouped
        free = tau <= 0
        if not grouped or bool(free.all()):  # nothing to shrink: w = a / d everywhere
            r = torch.ones_like(tau)
            self._final(r, tau)
            return r, {"zero": 0, "active": 0, "newton_evals": 0}
        r = torch.where(free, 1.0, r0.to(torch.float64))
        t_idx = self._expand(tau, 0.0)
        outs = self._run("sums0", grouped, self._expand(r, 1.0), t_idx)
        sa, s2, s3 = (idx.sum_rows(grouped, [o[i] for o in outs]) for i in range(3))
        zero = (sa <= tau * tau) & ~free
        active = ~zero & ~free
        r = torch.where(zero, 0.0, r)
        low = self._low_dtype()
        tol = default_newton_tol(low) if tol is None else tol

        def evaluate(rr, act):
            ks = [k for k in idx.entries_touching(act)]
            outs = self._run("sums", ks, self._expand(rr, 1.0), t_idx)
            return tuple(idx.sum_rows(ks, [o[i] for o in outs]) for i in range(2))

        n_active = int(active.sum())
        evals = 0
        if n_active:
            r, evals = secular_newton(r, s2, s3, active, evaluate, tol, _noise(low), max_iter)
        self._final(r, tau)
        return r, {"zero": int(zero.sum()), "active": n_active, "newton_evals": 1 + evals}

    def solve_closed_form(self, tau: Tensor, dscale: Tensor) -> tuple[Tensor, dict]:
        """Equal d within each group (d = `dscale`[g]): r = (‖a‖ − τ)/d, no iterations."""
        idx, grouped = self.index, self.grouped
        na = idx.sum_rows(grouped, self._run("sq", grouped)).sqrt()
        free = tau <= 0
        r = torch.where(free, 1.0, ((na - tau) / dscale).clamp_min(0.0))
        self._final(r, tau)
        return r, {
            "zero": int(((na <= tau) & ~free).sum()),
            "active": int(((na > tau) & ~free).sum()),
            "newton_evals": 0,
        }

    def solve_pg(
        self, tau: Tensor, w: Sequence[Tensor], rtol: float = 1e-8, min_iter: int = 2, max_iter: int = 100
    ) -> tuple[Tensor, dict]:
        """The paper's solver (§2b): screening, then proximal gradient with θ_g = 1/max d.

        `w[k]` (a 3-D view per grouped parameter) holds the starting point; it is
        overwritten by the iterates and finally handed to `finish`. Stops when the relative
        decrease of the (summed) subproblem objective falls below `rtol`, after `min_iter`
        iterations. Returns the group norms ‖w_g‖ and stats.
        """
        idx, G, grouped = self.index, self.index.n_groups, self.grouped
        free = tau <= 0
        sa = idx.sum_rows(grouped, self._run("sq", grouped))
        dm = idx.amax_rows(grouped, self._run("dmax", grouped))
        zero = (sa <= tau * tau) & ~free
        theta = torch.where(dm > 0, 1.0 / dm, 0.0)
        th, fr = self._expand(theta, 0.0), self._expand(free.to(torch.float64), 1.0)
        wl = [w[k] if k in set(grouped) else None for k in range(len(self.states))]
        outs = self._run("pg_obj", grouped, wl)
        w2, obj_w = (idx.sum_rows(grouped, [o[i] for o in outs]) for i in range(2))
        prev = float((tau * w2.sqrt() + obj_w).sum())  # objective at the start (grouped entries only)
        it = 0
        norms = torch.zeros(G, dtype=torch.float64, device=idx.device)
        for it in range(1, max_iter + 1):
            outs = self._run("pg_sums", grouped, wl, th, fr)
            y2, dy2, ay = (idx.sum_rows(grouped, [o[i] for o in outs]) for i in range(3))
            ny = y2.sqrt()
            factor = torch.where(ny > 0, (1.0 - theta * tau / torch.where(ny > 0, ny, 1.0)).clamp_min(0.0), 0.0)
            factor = torch.where(zero, 0.0, torch.where(free, 1.0, factor))
            norms = factor * ny
            cur = float((tau * norms + factor * factor * dy2 - factor * ay).sum())
            self._run("pg_step", grouped, wl, th, fr, self._expand(factor, 1.0))
            if it >= min_iter and (prev - cur) / (abs(cur) + 1.0) < rtol:
                break
            prev = cur
        self._run("pg_final", grouped, wl)
        rest = [k for k in range(len(self.states)) if k not in set(grouped)]
        if rest:  # ungrouped parameters: the closed form w = a/d
            self._final(torch.ones_like(tau), torch.zeros_like(tau), rest)
        return norms, {"zero": int(zero.sum()), "active": int((~zero & ~free).sum()), "pg_iters": it}


# --------------------------------------------------------------------------- public API


def _ad_metric(state, scal):
    z, d, _ = state
    return d * z, d


def _finish_out(state, w, scal):
    state[2].copy_(w)


_EAGER = make_prox_kernels(_ad_metric, _finish_out)


def _eager_call(name, k, *args):
    return _EAGER[name](*args)


def _as_tau(index: GroupIndex, tau) -> Tensor:
    t = torch.as_tensor(tau, dtype=torch.float64, device=index.device)
    t = t.expand(index.n_groups).clone() if t.dim() == 0 else t
    if t.shape != (index.n_groups,) or bool((t < 0).any()):
        raise ValueError(f"tau must be >= 0, one value per group ({index.n_groups}), got shape {tuple(t.shape)}")
    return t


def _problem(index: GroupIndex, z: Sequence[Tensor], d, out: list[Tensor]) -> ProxProblem:
    states = []
    for k in range(len(z)):
        dk = d[k] if isinstance(d, (list, tuple)) else d
        dk = torch.as_tensor(dk, dtype=z[k].dtype, device=z[k].device)
        dk = index.view3(k, dk.expand_as(z[k])) if dk.dim() else dk
        states.append((index.view3(k, z[k]), dk, index.view3(k, out[k])))
    return ProxProblem(index, _eager_call, states, [()] * len(z))


def metric_group_prox(
    z: Sequence[Tensor],
    d,
    index: GroupIndex,
    tau,
    r0: Tensor | None = None,
    tol: float | None = None,
    max_iter: int = 50,
    return_info: bool = False,
):
    """argmin_w Σ_g τ_g‖w_g‖ + ½ Σ d (w − z)², exactly (zero test + batched Newton).

    `z`: tensors aligned with `index.params`; `d`: matching positive tensors (or one
    positive float); `tau`: τ_g per group (or a float for all). `r0`: warm start (the
    previous r). Returns the list of w (and (r, stats) with return_info=True).
    """
    out = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in z]  # contiguous: written through views
    tau = _as_tau(index, tau)
    r0 = torch.zeros(index.n_groups, dtype=torch.float64, device=index.device) if r0 is None else r0
    r, info = _problem(index, z, d, out).solve_exact(tau, r0, tol=tol, max_iter=max_iter)
    return (out, r, info) if return_info else out


def metric_group_prox_pg(
    z: Sequence[Tensor],
    d,
    index: GroupIndex,
    tau,
    w0: Sequence[Tensor] | None = None,
    rtol: float = 1e-8,
    min_iter: int = 2,
    max_iter: int = 100,
    return_info: bool = False,
):
    """The same subproblem by the paper's screening + proximal gradient (§2b), from `w0` (default z)."""
    out = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in z]  # contiguous: written through views
    w = [(t if w0 is None else w0[k]).clone(memory_format=torch.contiguous_format) for k, t in enumerate(z)]
    tau = _as_tau(index, tau)
    norms, info = _problem(index, z, d, out).solve_pg(
        tau, [index.view3(k, t) for k, t in enumerate(w)], rtol=rtol, min_iter=min_iter, max_iter=max_iter
    )
    return (out, norms, info) if return_info else out


def group_soft_threshold(z: Sequence[Tensor], index: GroupIndex, tau) -> list[Tensor]:
    """Closed-form group soft-threshold: w_g = max(0, 1 − τ_g/‖z_g‖) z_g (ungrouped entries kept)."""
    out = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in z]  # contiguous: written through views
    tau = _as_tau(index, tau)
    _problem(index, z, 1.0, out).solve_closed_form(tau, torch.ones_like(tau))
    return out
