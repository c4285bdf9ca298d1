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
        entries = []
        for k, p in enumerate(self.params):
            d = dims[k]
            if d is None:
                entries.append((None, (1, 1, p.numel()), torch.full((1,), -1, dtype=torch.long)))
            else:
                entries.append((d, (math.prod(p.shape[:d]), p.shape[d], math.prod(p.shape[d + 1:])), gid_lists[k]))
        self._set_entries(entries)

    def _set_entries(self, entries) -> None:
        """entries: (dim, [A, n, B], gid [n] with -1 = ungrouped) per parameter."""
        G, device = self.n_groups, self.device
        self.entries: list[ParamEntry] = []
        pair_e, pair_g = [], []
        for k, (d, shape3, gid) in enumerate(entries):
            used = torch.unique(gid[gid >= 0].cpu())
            pair_e.append(torch.full_like(used, k))
            pair_g.append(used)
            gid = gid.to(device)
            self.entries.append(ParamEntry(d, shape3, gid, torch.where(gid < 0, G, gid), bool(used.numel())))
        self.pair_entry = torch.cat(pair_e).to(device) if pair_e else torch.zeros(0, dtype=torch.long, device=device)
        self.pair_group = torch.cat(pair_g).to(device) if pair_g else torch.zeros(0, dtype=torch.long, device=device)
        self.grouped = [k for k, e in enumerate(self.entries) if e.has_groups]
        self._gid_flat = torch.cat([e.gid_ext for e in self.entries]) if self.entries else \
            torch.zeros(0, dtype=torch.long, device=device)
        self._splits = [len(e.gid_ext) for e in self.entries]
        self._gid_cache: dict = {}

    def packed(self, packs: Sequence[Sequence[int]]) -> tuple["GroupIndex", list]:
        """An index for stepping in which each list of parameters in `packs` becomes one flat
        parameter [1, N, 1] with a group id per element (many small tensors, one set of ops).

        Returns (index, layout): layout[j] is ("param", k) or ("pack", i) for the j-th
        entry of the new index (packs after the unpacked parameters, in order).
        """
        out = object.__new__(GroupIndex)
        out.n_groups, out.device, out.weights, out.sizes, out.names = \
            self.n_groups, self.device, self.weights, self.sizes, self.names
        in_pack = {k for pk in packs for k in pk}
        layout = [("param", k) for k in range(len(self.params)) if k not in in_pack]
        entries = [(self.entries[k].dim, self.entries[k].shape3, self.entries[k].gid) for _, k in layout]
        params = [self.params[k] for _, k in layout]
        for i, pk in enumerate(packs):
            ids = []
            for k in pk:
                A, n, B = self.entries[k].shape3
                ids.append(self.entries[k].gid.view(1, n, 1).expand(A, n, B).reshape(-1))
            gid = torch.cat(ids)
            entries.append((0, (1, len(gid), 1), gid))
            params.append(self.params[pk[0]].new_empty(0))  # dtype/device stand-in
            layout.append(("pack", i))
        out.params = params
        out._set_entries(entries)
        return out, layout

    # ---- views and group vectors

    def view3(self, k: int, t: Tensor) -> Tensor:
        """`t` (shaped like parameter k) as the [A, n, B] view its group reductions use."""
        return t.reshape(self.entries[k].shape3)

    def expand(self, k: int, vec: Tensor, fill: float, dtype: torch.dtype) -> Tensor:
        """Per-index values [n] for parameter k from a per-group vector (ungrouped: `fill`)."""
        ext = torch.cat([vec, vec.new_full((1,), fill)])
        return ext[self.entries[k].gid_ext].to(dtype)

    def expand_all(self, vec: Tensor, fill: float, dtypes: Sequence[torch.dtype]) -> list[Tensor]:
        """`expand` for every parameter with one gather (views into one flat vector per dtype)."""
        flat = torch.cat([vec, vec.new_full((1,), fill)])[self._gid_flat]
        by_dtype = {dt: flat.to(dt).split(self._splits) for dt in set(dtypes)}
        return [by_dtype[dt][k] for k, dt in enumerate(dtypes)]

    def sum_rows(self, ks: Sequence[int], rows: Sequence[Tensor]) -> Tensor:
        """Per-group sums (float64 [n_groups]) of per-index rows of parameters `ks`, one index_add."""
        out = torch.zeros(self.n_groups + 1, dtype=torch.float64, device=self.device)
        if ks:
            out.index_add_(0, self._gid_cat(ks), torch.cat(list(rows)).to(torch.float64))
        return out[: self.n_groups]

    def amax_rows(self, ks: Sequence[int], rows: Sequence[Tensor]) -> Tensor:
        out = torch.zeros(self.n_groups + 1, dtype=torch.float64, device=self.device)
        if ks:
            out.scatter_reduce_(0, self._gid_cat(ks), torch.cat(list(rows)).to(torch.float64), reduce="amax")
        return out[: self.n_groups]

    def _gid_cat(self, ks: Sequence[int]) -> Tensor:
        key = tuple(ks)
        hit = self._gid_cache.get(key)
        if hit is None:
            hit = torch.cat([self.entries[k].gid_ext for k in ks])
            if len(self._gid_cache) < 64:
                self._gid_cache[key] = hit
        return hit

    def entries_touching(self, groups_mask: Tensor) -> list[int]:
        """Parameters holding a slice of at least one group in `groups_mask` (vectorized, one sync)."""
        hit = torch.zeros(len(self.entries), dtype=torch.float64, device=self.device)
        hit.index_add_(0, self.pair_entry, groups_mask[self.pair_group].to(torch.float64))
        return torch.nonzero(hit > 0).flatten().tolist()

    def group_sq_norms(self, tensors: Sequence[Tensor]) -> Tensor:
        """Σ x² per group (float64) for tensors aligned with `params`."""
        rows = []
        for k in self.grouped:
            x = self.view3(k, tensors[k].detach()).double()
            rows.append((x * x).sum((0, 2)))
        return self.sum_rows(self.grouped, rows)

    def group_amax(self, tensors: Sequence[Tensor]) -> Tensor:
        """max |x| per group (float64) for tensors aligned with `params`."""
        rows = []
        for k in self.grouped:
            x = self.view3(k, tensors[k].detach()).abs()
            rows.append(x.amax((0, 2)) if x.numel() else x.new_zeros(x.shape[1]))
        return self.amax_rows(self.grouped, rows)

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

    return {"sums0": sums0, "sums": sums, "sq": sq, "final": final, "dmax": dmax,
            "pg_obj": pg_obj, "pg_sums": pg_sums, "pg_step": pg_step, "pg_final": pg_final}


# --------------------------------------------------------------------------- solvers


def default_newton_tol(dtype: torch.dtype) -> float:
    """Target relative accuracy of r: about the dtype's resolution (float32: 1e-7, float64: 1e-15)."""
    return 1e-7 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-15


def secular_newton(r: Tensor, s2: Tensor, s3: Tensor, active: Tensor,
                   evaluate: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
                   tol: float, noise: float, max_iter: int) -> tuple[Tensor, int]:
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
        idx, G, grouped = self.index, self.index.n_groups, self.grouped
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
        return r, {"zero": int(((na <= tau) & ~free).sum()), "active": int(((na > tau) & ~free).sum()),
                   "newton_evals": 0}

    def solve_pg(self, tau: Tensor, w: Sequence[Tensor], rtol: float = 1e-8, min_iter: int = 2,
                 max_iter: int = 100) -> tuple[Tensor, dict]:
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


def metric_group_prox(z: Sequence[Tensor], d, index: GroupIndex, tau, r0: Tensor | None = None,
                      tol: float | None = None, max_iter: int = 50, return_info: bool = False):
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


def metric_group_prox_pg(z: Sequence[Tensor], d, index: GroupIndex, tau, w0: Sequence[Tensor] | None = None,
                         rtol: float = 1e-8, min_iter: int = 2, max_iter: int = 100, return_info: bool = False):
    """The same subproblem by the paper's screening + proximal gradient (§2b), from `w0` (default z)."""
    out = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in z]  # contiguous: written through views
    w = [(t if w0 is None else w0[k]).clone(memory_format=torch.contiguous_format) for k, t in enumerate(z)]
    tau = _as_tau(index, tau)
    norms, info = _problem(index, z, d, out).solve_pg(tau, [index.view3(k, t) for k, t in enumerate(w)], rtol=rtol,
                                                      min_iter=min_iter, max_iter=max_iter)
    return (out, norms, info) if return_info else out


def group_soft_threshold(z: Sequence[Tensor], index: GroupIndex, tau) -> list[Tensor]:
    """Closed-form group soft-threshold: w_g = max(0, 1 − τ_g/‖z_g‖) z_g (ungrouped entries kept)."""
    out = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in z]  # contiguous: written through views
    tau = _as_tau(index, tau)
    _problem(index, z, 1.0, out).solve_closed_form(tau, torch.ones_like(tau))
    return out
