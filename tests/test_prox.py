"""The batched metric group prox (compress/optim/prox.py) against brute force."""

from __future__ import annotations

import math

import pytest
import torch
from test_optim_reference import groups_spec, ref_prox, rows_spec, soft_threshold

from compress.optim.prox import (
    GroupIndex,
    group_soft_threshold,
    metric_group_prox,
    metric_group_prox_pg,
)
from compress.structure.group import Group, Slice

DT = torch.float64


def _mixed_problem(seed=0, dspan=(1e-6, 1e3), dtype=DT):
    """>= 1000 groups: rows of matrices, dim-1 groups of a conv kernel, groups spanning two tensors."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(600, 3), (200, 17), (4, 250, 3, 3), (150, 6), (150,), (7,)]
    params = [
        torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype) * torch.exp(torch.randn((), generator=g)))
        for s in shapes
    ]
    names = [f"p{k}" for k in range(len(params))]
    groups = []

    def add(slices):
        grp = Group(f"g{len(groups)}", "channel", "x", [Slice(names[k], dim, tuple(idx)) for k, dim, idx in slices])
        grp.tensors = [params[k] for k, _, _ in slices]
        grp.weight = math.sqrt(grp.size)
        groups.append(grp)

    for i in range(600):
        add([(0, 0, [i])])
    for i in range(0, 200, 2):  # some rows left ungrouped (odd rows)
        add([(1, 0, [i])])
    for j in range(250):
        add([(2, 1, [j])])
    for i in range(150):
        add([(3, 0, [i]), (4, 0, [i])])
    lo, hi = math.log(dspan[0]), math.log(dspan[1])
    d = [torch.exp(torch.empty(p.shape, dtype=dtype).uniform_(lo, hi, generator=g)) for p in params]
    z = [p.detach().clone() for p in params]
    index = GroupIndex(params, groups)
    spec = groups_spec(groups, params)
    # thresholds around ‖d z‖ so that about half the groups are zero
    anorm = torch.tensor(
        [math.sqrt(sum(float(((d[k] * z[k]).movedim(dm, 0)[i] ** 2).sum()) for k, dm, i in sl)) for sl, _ in spec],
        dtype=DT,
    )
    tau = anorm * torch.empty(len(spec), dtype=DT).uniform_(0.0, 2.0, generator=g)
    return params, groups, index, spec, z, d, tau, anorm


def _group_norms(w, spec):
    return torch.tensor(
        [math.sqrt(sum(float((w[k].movedim(dm, 0)[i].double() ** 2).sum()) for k, dm, i in sl)) for sl, _ in spec],
        dtype=DT,
    )


def test_exact_prox_matches_brute_force_and_optimality():
    params, groups, index, spec, z, d, tau, anorm = _mixed_problem()
    assert index.n_groups >= 1000
    w, r, info = metric_group_prox(z, d, index, tau, return_info=True)
    ref = ref_prox(z, d, spec, tau)
    norms = _group_norms(w, spec)
    # zero test: exactly the groups with ‖d ⊙ z‖ ≤ τ are zero (entries exactly 0.0)
    assert torch.equal(norms == 0, anorm <= tau)
    assert 0.2 < float((norms == 0).double().mean()) < 0.8
    for a, b in zip(w, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    # optimality: d ⊙ (w − z) + τ w/‖w‖ = 0 on non-zero groups, relative to ‖d ⊙ z‖
    worst = 0.0
    for gi, (sl, _) in enumerate(spec):
        if norms[gi] == 0:
            continue
        res = torch.cat(
            [
                ((d[k] * (w[k] - z[k])).movedim(dm, 0)[i] + tau[gi] * w[k].movedim(dm, 0)[i] / norms[gi]).reshape(-1)
                for k, dm, i in sl
            ]
        )
        worst = max(worst, float(res.norm() / anorm[gi]))
    assert worst <= 1e-8
    # ungrouped entries (odd rows of p1, all of p5) are left at z
    assert torch.allclose(w[1][1::2], z[1][1::2], rtol=1e-15, atol=0)
    assert torch.allclose(w[5], z[5], rtol=1e-15, atol=0)
    # r is ‖w_g‖
    assert torch.allclose(r, norms, rtol=1e-12, atol=0)


def test_exact_prox_float32_close_to_float64():
    params, groups, index, spec, z, d, tau, anorm = _mixed_problem(seed=3, dspan=(1e-3, 1e2), dtype=torch.float32)
    w32 = metric_group_prox(z, d, index, tau)
    w64 = ref_prox([t.double() for t in z], [t.double() for t in d], spec, tau)
    margin = (anorm - tau).abs() / anorm > 1e-5  # away from the zero-test boundary
    n32, n64 = _group_norms(w32, spec), _group_norms(w64, spec)
    assert torch.equal((n32 == 0)[margin], (n64 == 0)[margin])
    for a, b in zip(w32, w64):
        assert float((a.double() - b).abs().max()) <= 1e-4 * float(b.abs().max())


@pytest.mark.parametrize("start", ["zero", "right", "left"])
def test_newton_converges_from_any_warm_start(start):
    params, groups, index, spec, z, d, tau, _ = _mixed_problem(seed=1)
    w_ref, r_ref, _ = metric_group_prox(z, d, index, tau, return_info=True)
    r0 = {"zero": torch.zeros_like(r_ref), "right": r_ref * 10 + 1, "left": r_ref * 0.5}[start]
    w, r, info = metric_group_prox(z, d, index, tau, r0=r0, return_info=True)
    assert torch.allclose(r, r_ref, rtol=1e-10, atol=1e-300)
    for a, b in zip(w, w_ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    # a warm start at the solution needs a single evaluation (the one fused with the zero test)
    _, _, info_warm = metric_group_prox(z, d, index, tau, r0=r_ref, return_info=True)
    assert info_warm["newton_evals"] <= 2 < info["newton_evals"] or start == "left"


def test_equal_d_is_closed_form_soft_threshold():
    params, groups, index, spec, z, _, tau, _ = _mixed_problem(seed=2)
    c = 3.7
    w = metric_group_prox(z, c, index, tau)
    ref = soft_threshold(z, spec, tau / c)
    for a, b in zip(w, ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    w2 = group_soft_threshold(z, index, tau / c)
    for a, b in zip(w2, ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_pg_solver_reaches_exact():
    # the paper's solver needs a moderately conditioned metric to converge in reasonable time
    params, groups, index, spec, z, d, tau, _ = _mixed_problem(seed=4, dspan=(0.5, 2.0))
    w_exact = metric_group_prox(z, d, index, tau)
    w_pg, _, info = metric_group_prox_pg(z, d, index, tau, min_iter=300, max_iter=300, return_info=True)
    for a, b in zip(w_pg, w_exact):
        assert float((a - b).abs().max()) <= 1e-6 * max(1.0, float(b.abs().max()))
    # screening zeroes exactly the groups the exact solver zeroes
    assert torch.equal(_group_norms(w_pg, spec) == 0, _group_norms(w_exact, spec) == 0)
    # default stopping rule (relative objective decrease < 1e-8, 2..100 iterations) stops early
    _, _, info2 = metric_group_prox_pg(z, d, index, tau, return_info=True)
    assert 2 <= info2["pg_iters"] <= 100


def test_all_zero_and_no_groups():
    params, groups, index, spec, z, d, tau, anorm = _mixed_problem(seed=5)
    w = metric_group_prox(z, d, index, anorm * 2)  # every group zero
    assert all(float(n) == 0 for n in _group_norms(w, spec))
    assert torch.allclose(w[5], z[5], rtol=1e-15, atol=0)
    # no groups at all: the prox is the identity
    p = [torch.nn.Parameter(torch.randn(5, dtype=DT))]
    empty = GroupIndex(p, [])
    assert empty.n_groups == 0
    assert torch.equal(metric_group_prox([p[0].detach()], 2.0, empty, 0.0)[0], p[0].detach())
    assert empty.sparsity([p[0]]) == (0.0, 0.0)
    # zero tau: the prox is the identity too, with no zero test mistakes on z = 0 rows
    zz = [t.clone() for t in z]
    zz[0][:10] = 0
    w = metric_group_prox(zz, d, index, torch.zeros(index.n_groups, dtype=DT))
    for a, b in zip(w, zz):
        assert torch.allclose(a, b, rtol=1e-14, atol=0)


def test_default_row_groups_and_sparsity():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, 2, dtype=DT)), torch.nn.Parameter(torch.randn(4, dtype=DT))]
    index = GroupIndex(params, None)
    assert index.n_groups == 4 and index.entries[1].dim is None
    assert torch.allclose(index.weights, torch.full((4,), math.sqrt(6.0), dtype=DT))
    spec = rows_spec(params)
    tau = torch.tensor([0.0, 1.0, 100.0, 100.0], dtype=DT)
    w = group_soft_threshold([p.detach() for p in params], index, tau)
    ref = soft_threshold([p.detach() for p in params], spec, tau)
    assert torch.allclose(w[0], ref[0]) and torch.allclose(w[1], params[1].detach(), rtol=1e-15, atol=0)
    assert index.sparsity(w) == (0.5, 0.5)
    assert torch.allclose(index.group_sq_norms(w).sqrt(), w[0].flatten(1).norm(dim=1))


def test_group_index_rejects_bad_groups():
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(3))

    def grp(name, slices, tensors):
        g = Group(name, "channel", "x", [Slice(*s) for s in slices])
        g.tensors = tensors
        return g

    with pytest.raises(ValueError, match="one dim"):
        GroupIndex([a], [grp("r", [("a", 0, (0,))], [a]), grp("c", [("a", 1, (0,))], [a])])
    with pytest.raises(ValueError, match="overlap"):
        GroupIndex([a], [grp("r", [("a", 0, (0, 1))], [a]), grp("s", [("a", 0, (1,))], [a])])
    with pytest.raises(ValueError, match="not among"):
        GroupIndex([a], [grp("r", [("b", 0, (0,))], [b])])
    with pytest.raises(ValueError, match="not bound"):
        GroupIndex([a], [Group("u", "channel", "x", [Slice("a", 0, (0,))])])
    with pytest.raises(ValueError, match="out of range"):
        GroupIndex([a], [grp("r", [("a", 0, (7,))], [a])])


def test_non_contiguous_inputs():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5, dtype=DT))
    index = GroupIndex([p], None)
    z = torch.randn(5, 6, dtype=DT).t()  # a transposed (non-contiguous) view
    d = torch.rand(5, 6, dtype=DT).t() + 0.5
    tau = torch.rand(6, dtype=DT) * 2
    w = metric_group_prox([z], [d], index, tau)[0]
    ref = metric_group_prox([z.contiguous()], [d.contiguous()], index, tau)[0]
    assert torch.equal(w, ref)
    wp = metric_group_prox_pg([z], [d], index, tau)[0]
    assert torch.allclose(wp, ref, atol=1e-3)
