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

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

Tensor = torch.Tensor


# --------------------------------------------------------------------------- the index


@dataclass
class ParamEntry:
    """How one parameter is grouped: `dim` (None: not at all) and a group id per index along it."""

    dim: int | None
    shape3: tuple[int, int, int]  # [A, n, B] view: n = size along dim
    gid: Tensor  # [n] long, group id or -1
    gid_ext: Tensor  # [n] long, -1 replaced by n_groups (a dummy slot)
    has_groups: bool


class GroupIndex:
    """Per-parameter map "index along the grouped dim -> group id", built once.

    `params`: the tensors the optimizer updates, in a fixed order. `groups`: None (every
    parameter with >= 2 dims is grouped by its dim-0 rows with weight sqrt(row size);
    1-D parameters are not regularized) or a list of bound `compress.groups.Group`
    (their `.tensors` must be among `params`, matched by identity).
    """

    def __init__(self, params: Sequence[Tensor], groups=None):
        self.params = list(params)
        pos = {id(p): k for k, p in enumerate(self.params)}
        if len(pos) != len(self.params):
            raise ValueError("a parameter appears twice in the optimizer")
        dims: list[int | None] = [None] * len(self.params)
        gid_lists: list[Tensor | None] = [None] * len(self.params)
        weights: list[float] = []
        sizes: list[int] = []
        self.names: list[str] = []
        if groups is None:
            for k, p in enumerate(self.params):
                if p.dim() < 2:
                    continue
                n = p.shape[0]
                dims[k] = 0
                gid_lists[k] = torch.arange(len(weights), len(weights) + n)
                row = p.numel() // max(n, 1)
                weights += [math.sqrt(row)] * n
                sizes += [row] * n
                self.names += [f"param{k}[{i}]" for i in range(n)]
        else:
            for gi, g in enumerate(groups):
                tensors = getattr(g, "tensors", None)
                name = getattr(g, "name", f"group{gi}")
                if not tensors or len(tensors) != len(g.slices):
                    raise ValueError(f"group {name} is not bound to a model; call compress.groups.bind_groups")
                size = 0
                for s, t in zip(g.slices, tensors):
                    k = pos.get(id(t))
                    if k is None:
                        raise ValueError(
                            f"group {name}: parameter {s.param!r} is not among the optimizer's parameters "
                            "(pass the same model's parameters, with requires_grad=True)"
                        )
                    p = self.params[k]
                    if not 0 <= s.dim < p.dim():
                        raise ValueError(f"group {name}: dim {s.dim} does not exist in {s.param!r} of shape {list(p.shape)}")
                    if dims[k] is None:
                        dims[k] = s.dim
                        gid_lists[k] = torch.full((p.shape[s.dim],), -1, dtype=torch.long)
                    elif dims[k] != s.dim:
                        raise ValueError(
                            f"parameter {s.param!r} carries groups on dims {dims[k]} and {s.dim}; "
                            "a parameter may be grouped along one dim only"
                        )
                    idx = torch.as_tensor(list(s.indices), dtype=torch.long)
                    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= p.shape[s.dim]):
                        raise ValueError(f"group {name}: indices out of range for {s.param!r} of shape {list(p.shape)}")
                    gl = gid_lists[k]
                    taken = gl[idx]
                    if bool((taken >= 0).any()):
                        other = int(taken[taken >= 0][0])
                        raise ValueError(
                            f"groups {self.names[other] if other < len(self.names) else other} and {name} "
                            f"overlap in {s.param!r}; groups must be disjoint"
                        )
                    gl[idx] = gi
                    size += len(s.indices) * (p.numel() // max(p.shape[s.dim], 1))
                weights.append(float(g.weight))
                sizes.append(size)
                self.names.append(name)
        self.n_groups = len(weights)
        device = self.params[0].device if self.params else torch.device("cpu")
        for p in self.params:
            if p.device != device:
                raise ValueError("all parameters of a prox optimizer must be on one device")
        self.device = device
        self.weights = torch.tensor(weights, dtype=torch.float64, device=device)
        self.sizes = torch.tensor(sizes, dtype=torch.float64, device=device)
        if bool((self.weights < 0).any()):
            raise ValueError("group weights must be >= 0")
        self.entries: list[ParamEntry] = []
        pair_e, pair_g = [], []
        G = self.n_groups
        for k, p in enumerate(self.params):
            d = dims[k]
            if d is None:
                gid = torch.full((1,), -1, dtype=torch.long)
                shape3 = (1, 1, p.numel())
            else:
                gid = gid_lists[k]
                shape3 = (math.prod(p.shape[:d]), p.shape[d], math.prod(p.shape[d + 1:]))
            used = torch.unique(gid[gid >= 0])
            pair_e.append(torch.full_like(used, k))
            pair_g.append(used)
            gid = gid.to(device)
            self.entries.append(ParamEntry(d, shape3, gid, torch.where(gid < 0, G, gid), bool(used.numel())))
        self.pair_entry = torch.cat(pair_e).to(device) if pair_e else torch.zeros(0, dtype=torch.long, device=device)
        self.pair_group = torch.cat(pair_g).to(device) if pair_g else torch.zeros(0, dtype=torch.long, device=device)
        # Groups of the same size/dtype need nothing special: everything is per index.
        self.grouped = [k for k, e in enumerate(self.entries) if e.has_groups]

    # ---- views and group vectors

    def view3(self, k: int, t: Tensor) -> Tensor:
        """`t` (shaped like parameter k) as the [A, n, B] view its group reductions use."""
        return t.reshape(self.entries[k].shape3)

    def expand(self, k: int, vec: Tensor, fill: float, dtype: torch.dtype) -> Tensor:
        """Per-index values [n] for parameter k from a per-group vector (ungrouped: `fill`)."""
        ext = torch.cat([vec, vec.new_full((1,), fill)])
        return ext[self.entries[k].gid_ext].to(dtype)

    def add_rows(self, k: int, rows: Tensor, out: Tensor) -> None:
        """out[g] += rows[i] for every index i of parameter k in group g (out has n_groups + 1 slots)."""
        out.index_add_(0, self.entries[k].gid_ext, rows.to(out.dtype))

    def new_sums(self, count: int = 1) -> list[Tensor]:
        return [torch.zeros(self.n_groups + 1, dtype=torch.float64, device=self.device) for _ in range(count)]

    def entries_touching(self, groups_mask: Tensor) -> list[int]:
        """Parameters holding a slice of at least one group in `groups_mask` (vectorized, one sync)."""
        hit = torch.zeros(len(self.entries), dtype=torch.float64, device=self.device)
        hit.index_add_(0, self.pair_entry, groups_mask[self.pair_group].to(torch.float64))
        return torch.nonzero(hit > 0).flatten().tolist()

    def group_sq_norms(self, tensors: Sequence[Tensor]) -> Tensor:
        """Σ x² per group (float64) for tensors aligned with `params`."""
        (out,) = self.new_sums(1)
        for k in self.grouped:
            x = self.view3(k, tensors[k].detach()).double()
            self.add_rows(k, (x * x).sum((0, 2)), out)
        return out[: self.n_groups]

    def group_amax(self, tensors: Sequence[Tensor]) -> Tensor:
        """max |x| per group (float64) for tensors aligned with `params`."""
        out = torch.zeros(self.n_groups + 1, dtype=torch.float64, device=self.device)
        for k in self.grouped:
            x = self.view3(k, tensors[k].detach()).abs()
            rows = x.amax((0, 2)).double() if x.numel() else x.new_zeros(x.shape[1]).double()
            out.scatter_reduce_(0, self.entries[k].gid_ext, rows, reduce="amax")
        return out[: self.n_groups]

    def sparsity(self, tensors: Sequence[Tensor]) -> tuple[float, float]:
        """(fraction of groups exactly zero, fraction of grouped entries inside zero groups)."""
        if self.n_groups == 0:
            return 0.0, 0.0
        z = self.group_amax(tensors) == 0
        total = float(self.sizes.sum())
        return float(z.double().mean()), (float(self.sizes[z].sum()) / total if total > 0 else 0.0)


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

    def sums0(state, scal, r, tau):
        """Σa² (the zero test) and Σq², Σq²·d/(d r+τ) at the warm start r, in one pass."""
        a, d = ad(state, scal)
        inv = 1.0 / (d * _col(r) + _col(tau))
        q = a * inv
        q2 = q * q
        return (a * a).sum((0, 2)), q2.sum((0, 2)), (q2 * (d * inv)).sum((0, 2))

    def sums(state, scal, r, tau):
        """One Newton evaluation of φ and its slope."""
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

    def pg_sums(state, scal, w, theta, free):
        """For y = w − θ(d w − a): Σy², Σ½dy², Σay, and at w: Σw², Σ(½dw² − aw)."""
        a, d = ad(state, scal)
        th = _col(free) / d + _col(1.0 - free) * _col(theta)
        y = w - th * (d * w - a)
        dy = 0.5 * d * y
        return (y * y).sum((0, 2)), (dy * y).sum((0, 2)), (a * y).sum((0, 2)), (w * w).sum((0, 2)), \
            ((0.5 * d * w - a) * w).sum((0, 2))

    def pg_step(state, scal, w, theta, free, factor):
        """w ← factor · (w − θ(d w − a)): one proximal-gradient step (factor = group shrink)."""
        a, d = ad(state, scal)
        th = _col(free) / d + _col(1.0 - free) * _col(theta)
        w.copy_(_col(factor) * (w - th * (d * w - a)))

    def pg_final(state, scal, w):
        finish(state, w, scal)

    return {"sums0": sums0, "sums": sums, "sq": sq, "final": final, "dmax": dmax,
            "pg_sums": pg_sums, "pg_step": pg_step, "pg_final": pg_final}


# --------------------------------------------------------------------------- solvers


def default_newton_tol(dtype: torch.dtype) -> float:
    """Stop when |Δr| ≤ tol·r: Newton's quadratic convergence then leaves ≈ 1.5·tol² relative error."""
    return 1e-4 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-7


def secular_newton(r: Tensor, s2: Tensor, s3: Tensor, active: Tensor,
                   evaluate: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
                   tol: float, noise: float, max_iter: int) -> tuple[Tensor, int]:
    """Newton on f(r) = 1/sqrt(φ(r)) − 1 for every `active` group at once.

    f is increasing and concave (φ^{-1/2} is the reciprocal of a norm of z_j/(r+τ/d_j),
    as in trust-region secular equations), so from a point left of the root Newton climbs
    monotonically and quadratically, and from the right one step lands on the left; a
    negative step is clamped to r = 0, which is always left of the root of a non-zero
    group. `s2`, `s3` are Σq², Σq²·d/(dr+τ) at `r`; `evaluate(r, active)` recomputes
    them for the active groups. Returns (r, number of evaluations used after the first).
    """
    evals = 0
    for it in range(max_iter):
        rs2 = s2.sqrt()
        delta = torch.where(active, s2 * (rs2 - 1.0) / torch.where(active, s3, 1.0), 0.0)
        rn = (r + delta).clamp_min(0.0)
        done = (delta.abs() <= tol * rn) | ((rs2 - 1.0).abs() <= noise)
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
    """One instance of the batched subproblem: kernels + their state arguments per parameter.

    `state_of(k)` returns the tuple of 3-D views the kernels' `ad`/`finish` read for
    parameter k; `scal_of(k)` the scalar tensors. `call(name, *args)` runs a kernel
    (possibly compiled). `tau` is per group (float64).
    """

    def __init__(self, index: GroupIndex, call: Callable, state_of: Callable, scal_of: Callable,
                 params: Sequence[int] | None = None):
        self.index, self.call, self.state_of, self.scal_of = index, call, state_of, scal_of
        self.params = list(range(len(index.entries))) if params is None else list(params)

    def _dtype(self, k):
        return self.index.params[k].dtype

    def _rt(self, k, r, tau):
        dt = self._dtype(k)
        return self.index.expand(k, r, 1.0, dt), self.index.expand(k, tau, 0.0, dt)

    def solve_exact(self, tau: Tensor, r0: Tensor, tol: float | None = None, max_iter: int = 50) -> tuple[Tensor, dict]:
        """Exact prox (§2a): zero test, then batched Newton warm-started at r0; writes via `final`."""
        idx = self.index
        G = idx.n_groups
        grouped = [k for k in self.params if idx.entries[k].has_groups]
        free = tau <= 0
        r = torch.where(free, 1.0, r0.to(torch.float64))
        sa, s2, s3 = idx.new_sums(3)
        for k in grouped:
            rk, tk = self._rt(k, r, tau)
            a2, q2, q3 = self.call("sums0", self.state_of(k), self.scal_of(k), rk, tk)
            idx.add_rows(k, a2, sa)
            idx.add_rows(k, q2, s2)
            idx.add_rows(k, q3, s3)
        sa, s2, s3 = sa[:G], s2[:G], s3[:G]
        zero = (sa <= tau * tau) & ~free
        active = ~zero & ~free
        r = torch.where(zero, 0.0, r)
        dtypes = {self._dtype(k) for k in grouped} or {torch.float64}
        low = max(dtypes, key=lambda d: torch.finfo(d).eps)
        if tol is None:
            tol = default_newton_tol(low)

        def evaluate(rr, act):
            t2, t3 = idx.new_sums(2)
            ks = set(idx.entries_touching(act))
            for k in grouped:
                if k in ks:
                    rk, tk = self._rt(k, rr, tau)
                    q2, q3 = self.call("sums", self.state_of(k), self.scal_of(k), rk, tk)
                    idx.add_rows(k, q2, t2)
                    idx.add_rows(k, q3, t3)
            return t2[:G], torch.where(act, t3[:G], 1.0)

        n_active = int(active.sum()) if G else 0
        evals = 0
        if n_active:
            r, evals = secular_newton(r, s2, s3, active, evaluate, tol, _noise(low), max_iter)
        for k in self.params:
            rk, tk = self._rt(k, r, tau)
            self.call("final", self.state_of(k), self.scal_of(k), rk, tk)
        return r, {"zero": int(zero.sum()) if G else 0, "active": n_active, "newton_evals": 1 + evals}

    def solve_closed_form(self, tau: Tensor, dscale: Tensor) -> tuple[Tensor, dict]:
        """Equal d within each group (d = `dscale`[g]): r = (‖a‖ − τ)/d, no iterations."""
        idx = self.index
        G = idx.n_groups
        (sa,) = idx.new_sums(1)
        for k in self.params:
            if idx.entries[k].has_groups:
                idx.add_rows(k, self.call("sq", self.state_of(k), self.scal_of(k)), sa)
        na = sa[:G].sqrt()
        free = tau <= 0
        r = torch.where(free, 1.0, ((na - tau) / dscale).clamp_min(0.0))
        for k in self.params:
            rk, tk = self._rt(k, r, tau)
            self.call("final", self.state_of(k), self.scal_of(k), rk, tk)
        return r, {"zero": int(((na <= tau) & ~free).sum()), "active": int(((na > tau) & ~free).sum()), "newton_evals": 0}

    def solve_pg(self, tau: Tensor, w_of: Callable[[int], Tensor], rtol: float = 1e-8, min_iter: int = 2,
                 max_iter: int = 100) -> tuple[Tensor, dict]:
        """The paper's solver (§2b): screening, then proximal gradient with θ_g = 1/max d.

        `w_of(k)` is a buffer (3-D view) holding the starting point; it is overwritten by
        the iterates and finally handed to `finish`. Stops when the relative decrease of
        the (summed) subproblem objective falls below `rtol`, after `min_iter` iterations.
        Returns the group norms ‖w_g‖ (as r) and stats.
        """
        idx = self.index
        G = idx.n_groups
        grouped = [k for k in self.params if idx.entries[k].has_groups]
        free = tau <= 0
        sa = idx.new_sums(1)[0]
        dm = torch.zeros(G + 1, dtype=torch.float64, device=idx.device)
        for k in grouped:
            st, sc = self.state_of(k), self.scal_of(k)
            idx.add_rows(k, self.call("sq", st, sc), sa)
            dm.scatter_reduce_(0, idx.entries[k].gid_ext, self.call("dmax", st, sc).double(), reduce="amax")
        zero = (sa[:G] <= tau * tau) & ~free
        theta = torch.where(dm[:G] > 0, 1.0 / dm[:G], 0.0)
        prev = None
        it = 0
        norms = torch.zeros(G, dtype=torch.float64, device=idx.device)
        for it in range(1, max_iter + 1):
            y2, dy2, ay, w2, obj_w = idx.new_sums(5)
            for k in grouped:
                dt = self._dtype(k)
                th = idx.expand(k, theta, 0.0, dt)
                fr = idx.expand(k, free.to(torch.float64), 1.0, dt)
                outs = self.call("pg_sums", self.state_of(k), self.scal_of(k), w_of(k), th, fr)
                for o, acc in zip(outs, (y2, dy2, ay, w2, obj_w)):
                    idx.add_rows(k, o, acc)
            ny = y2[:G].sqrt()
            factor = torch.where(ny > 0, (1.0 - theta * tau / torch.where(ny > 0, ny, 1.0)).clamp_min(0.0), 0.0)
            factor = torch.where(zero, 0.0, torch.where(free, 1.0, factor))
            if prev is None:  # objective at the starting point (grouped entries only)
                prev = float((tau * w2[:G].sqrt() + obj_w[:G]).sum())
            norms = factor * ny
            cur = float((tau * norms + factor * factor * dy2[:G] - factor * ay[:G]).sum())
            for k in grouped:
                dt = self._dtype(k)
                th = idx.expand(k, theta, 0.0, dt)
                fr = idx.expand(k, free.to(torch.float64), 1.0, dt)
                fa = idx.expand(k, factor, 1.0, dt)
                self.call("pg_step", self.state_of(k), self.scal_of(k), w_of(k), th, fr, fa)
            if it >= min_iter and (prev - cur) / (abs(cur) + 1.0) < rtol:
                break
            prev = cur
        ones, zeros = torch.ones(G, dtype=torch.float64, device=idx.device), torch.zeros(G, dtype=torch.float64, device=idx.device)
        for k in self.params:
            if idx.entries[k].has_groups:
                self.call("pg_final", self.state_of(k), self.scal_of(k), w_of(k))
            else:  # ungrouped parameters: the closed form w = a/d
                rk, tk = self._rt(k, ones, zeros)
                self.call("final", self.state_of(k), self.scal_of(k), rk, tk)
        return norms, {"zero": int(zero.sum()), "active": int((~zero & ~free).sum()), "pg_iters": it}


# --------------------------------------------------------------------------- public API


def _ad_metric(state, scal):
    z, d, _ = state
    return d * z, d


def _finish_out(state, w, scal):
    state[2].copy_(w)


_EAGER = make_prox_kernels(_ad_metric, _finish_out)


def _eager_call(name, *args):
    return _EAGER[name](*args)


def _as_tau(index: GroupIndex, tau) -> Tensor:
    t = torch.as_tensor(tau, dtype=torch.float64, device=index.device)
    t = t.expand(index.n_groups).clone() if t.dim() == 0 else t
    if t.shape != (index.n_groups,) or bool((t < 0).any()):
        raise ValueError(f"tau must be >= 0, one value per group ({index.n_groups}), got shape {tuple(t.shape)}")
    return t


def _problem(index: GroupIndex, z: Sequence[Tensor], d, out: list[Tensor]) -> ProxProblem:
    def state_of(k):
        dk = d[k] if isinstance(d, (list, tuple)) else d
        dk = torch.as_tensor(dk, dtype=z[k].dtype, device=z[k].device)
        dk = index.view3(k, dk.expand_as(z[k])) if dk.dim() else dk
        return index.view3(k, z[k]), dk, index.view3(k, out[k])

    return ProxProblem(index, _eager_call, state_of, lambda k: ())


def metric_group_prox(z: Sequence[Tensor], d, index: GroupIndex, tau, r0: Tensor | None = None,
                      tol: float | None = None, max_iter: int = 50, return_info: bool = False):
    """argmin_w Σ_g τ_g‖w_g‖ + ½ Σ d (w − z)², exactly (zero test + batched Newton).

    `z`: tensors aligned with `index.params`; `d`: matching positive tensors (or one
    positive float); `tau`: τ_g per group (or a float for all). `r0`: warm start (the
    previous r). Returns the list of w (and (r, stats) with return_info=True).
    """
    out = [torch.empty_like(t) for t in z]
    tau = _as_tau(index, tau)
    r0 = torch.zeros(index.n_groups, dtype=torch.float64, device=index.device) if r0 is None else r0
    r, info = _problem(index, z, d, out).solve_exact(tau, r0, tol=tol, max_iter=max_iter)
    return (out, r, info) if return_info else out


def metric_group_prox_pg(z: Sequence[Tensor], d, index: GroupIndex, tau, w0: Sequence[Tensor] | None = None,
                         rtol: float = 1e-8, min_iter: int = 2, max_iter: int = 100, return_info: bool = False):
    """The same subproblem by the paper's screening + proximal gradient (§2b), from `w0` (default z)."""
    out = [torch.empty_like(t) for t in z]
    w = [(t if w0 is None else w0[k]).clone() for k, t in enumerate(z)]
    tau = _as_tau(index, tau)
    norms, info = _problem(index, z, d, out).solve_pg(tau, lambda k: index.view3(k, w[k]), rtol=rtol,
                                                      min_iter=min_iter, max_iter=max_iter)
    return (out, norms, info) if return_info else out


def group_soft_threshold(z: Sequence[Tensor], index: GroupIndex, tau) -> list[Tensor]:
    """Closed-form group soft-threshold: w_g = max(0, 1 − τ_g/‖z_g‖) z_g (ungrouped entries kept)."""
    out = [torch.empty_like(t) for t in z]
    tau = _as_tau(index, tau)
    _problem(index, z, 1.0, out).solve_closed_form(tau, torch.ones_like(tau))
    return out
