"""ASGO/DASGO and the structured (eigen-metric) group prox against slow float64 references.

The references never rotate into an eigenbasis: the prox is solved group by group on the
dense block metric (bisection on ‖(rA + τI)⁻¹Az‖ = 1, linear solves), the step solves
with P = Q diag(h) Qᵀ instead of dividing by h.
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from test_optim_reference import grads_at, groups_spec, tiny_groups, tiny_problem

from compress.optim import make_optimizer
from compress.optim.asgo import ASGO, DASGO
from compress.optim.eigprox import EigMetric, eig_metric_group_prox
from compress.optim.prox import GroupIndex

DT = torch.float64


# --------------------------------------------------------------------------- dense references


def entry_blocks(shape, kind, dim, idxs):
    """Flat entry indices and which metric block they use, for one slice of a parameter.

    kind: "right" (each row: one block over the row), "left" (each column: one block over
    the column), "diag" (entries one by one). Returns a list of flat-index lists.
    """
    numel = math.prod(shape)
    if kind == "diag":
        ar = torch.arange(numel).reshape(shape)
        return [[int(v)] for i in idxs for v in ar.movedim(dim, 0)[i].flatten()]
    m, n = shape[0], numel // shape[0]
    if kind == "right":
        assert dim == 0
        return [[i * n + j for j in range(n)] for i in idxs]
    assert dim >= 1
    cols = torch.arange(n).reshape(shape[1:])
    out = []
    for c in idxs:
        for j in cols.select(dim - 1, c).flatten().tolist():
            out.append([i * n + j for i in range(m)])
    return out


def dense_prox_one(z, A, tau):
    """min τ‖x‖ + ½(x − z)ᵀA(x − z) for one group (see `dense_prox_batch`)."""
    return dense_prox_batch(z[None], A[None], torch.tensor([float(tau)], dtype=DT))[0]


def dense_prox_batch(z, A, tau, iters=64):
    """min τ‖x‖ + ½(x − z)ᵀA(x − z) per batch row: zero test ‖Az‖ ≤ τ, else bisection on r = ‖x‖,
    the root of ‖(rA + τI)⁻¹Az‖ = 1 (decreasing in r; > 1 at 0, ≤ 1 at ‖z‖); x = r(rA + τI)⁻¹Az."""
    az = (A @ z[..., None])[..., 0]
    eye = torch.eye(z.shape[1], dtype=DT)
    t = torch.where(tau > 0, tau, 1.0)[:, None, None]  # τ = 0 rows: returned as z below
    lo, hi = torch.zeros(len(z), dtype=DT), z.norm(dim=1)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        big = torch.linalg.solve(mid[:, None, None] * A + t * eye, az).norm(dim=1) > 1.0
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    r = (0.5 * (lo + hi))[:, None, None]
    x = r[..., 0] * torch.linalg.solve(r * A + t * eye, az)
    x = torch.where((az.norm(dim=1) <= tau)[:, None], 0.0, x)
    return torch.where((tau == 0)[:, None], z, x)


def dense_structured_prox(z, mats, kinds, spec, tau):
    """The whole prox: `mats[k]` is a dense b×b metric (right/left) or a tensor like z[k] (diag)."""
    out = [t.clone() for t in z]
    if not spec:
        return out
    where, zs, As = [], [], []
    for slices, _ in spec:
        flat_idx, blocks = [], []
        for k, dim, idxs in slices:
            for ent in entry_blocks(tuple(z[k].shape), kinds[k], dim, idxs):
                flat_idx.append((k, ent))
                blocks.append(mats[k] if kinds[k] != "diag" else torch.diag(mats[k].reshape(-1)[ent]))
        where.append(flat_idx)
        zs.append(torch.cat([z[k].reshape(-1)[ent] for k, ent in flat_idx]))
        As.append(torch.block_diag(*blocks))
    tau = tau.to(DT)
    for size in sorted({len(v) for v in zs}):  # one batch per group size: no padding needed
        rows = [i for i, v in enumerate(zs) if len(v) == size]
        X = dense_prox_batch(torch.stack([zs[i] for i in rows]), torch.stack([As[i] for i in rows]), tau[rows])
        for i, xg in zip(rows, X):
            pos = 0
            for k, ent in where[i]:
                out[k].view(-1)[ent] = xg[pos : pos + len(ent)]
                pos += len(ent)
    return out


class RefASGO:
    """ALGORITHMS §4 written out: explicit P, solves, dense block-metric prox."""

    def __init__(self, params, spec, lam, betas, eps, eps_rel, rms, every, diagonal):
        self.W = [p.detach().clone() for p in params]
        self.spec, self.lam, (self.b1, self.b2) = spec, lam, betas
        self.eps, self.eps_rel, self.rms, self.every, self.diagonal = eps, eps_rel, rms, every, diagonal
        dims = {}
        for slices, _ in spec:
            for k, dim, _ in slices:
                dims[k] = dim
        self.side = []
        for k, w in enumerate(self.W):
            if w.dim() < 2:
                self.side.append(None)
            elif k in dims:
                self.side.append("right" if dims[k] == 0 else "left")
            else:
                n = w.numel() // w.shape[0]
                self.side.append("right" if n <= w.shape[0] else "left")
        self.M = [torch.zeros_like(w) for w in self.W]
        self.V = []
        for w, s in zip(self.W, self.side):
            if s is None:
                self.V.append(torch.zeros_like(w))
            else:
                b = w.numel() // w.shape[0] if s == "right" else w.shape[0]
                self.V.append(torch.zeros(b, b, dtype=DT))
        self.P = [None] * len(self.W)
        self.t = 0

    def floor_sqrt(self, lam):
        top = max(float(lam.max()), 0.0)
        return torch.tensor([math.sqrt(max(float(v), self.eps_rel * top, 0.0)) for v in lam], dtype=DT) + self.eps

    def step(self, grads, lr):
        self.t += 1
        t = self.t
        z, mats, kinds = [], [], []
        for k, (w, g) in enumerate(zip(self.W, grads)):
            self.M[k] = self.b1 * self.M[k] + (1 - self.b1) * g
            mh = self.M[k] / (1 - self.b1**t)
            s = self.side[k]
            if s is None:
                self.V[k] = self.b2 * self.V[k] + (1 - self.b2) * g * g
                D = (self.V[k] / (1 - self.b2**t)).sqrt() + self.eps
                z.append(w - lr * mh / D)
                mats.append(D)
                kinds.append("diag")
                continue
            G = g.reshape(g.shape[0], -1)
            outer = G.T @ G if s == "right" else G @ G.T
            self.V[k] = self.b2 * self.V[k] + (1 - self.b2) * outer
            if self.diagonal:
                self.V[k] = torch.diag(torch.diag(self.V[k]))
            if self.diagonal or (t - 1) % self.every == 0:
                lam, Q = torch.linalg.eigh(self.V[k] / (1 - self.b2**t))
                if self.diagonal:
                    lam, Q = torch.diag(self.V[k]) / (1 - self.b2**t), torch.eye(len(lam), dtype=DT)
                self.P[k] = Q @ torch.diag(self.floor_sqrt(lam)) @ Q.T
            Mh = mh.reshape(G.shape)
            U = torch.linalg.solve(self.P[k], Mh.T).T if s == "right" else torch.linalg.solve(self.P[k], Mh)
            c = self.rms * math.sqrt(U.numel()) / float(U.norm()) if self.rms else 1.0
            z.append(w - lr * c * U.reshape(w.shape))
            mats.append(self.P[k] / c)
            kinds.append(s)
        tau = torch.tensor([lr * self.lam * wg for _, wg in self.spec], dtype=DT)
        self.W = dense_structured_prox(z, mats, kinds, self.spec, tau)


# --------------------------------------------------------------------------- the prox


def _random_spd(b, gen, spread=3.0):
    q, _ = torch.linalg.qr(torch.randn(b, b, generator=gen, dtype=DT))
    h = torch.exp(torch.randn(b, generator=gen, dtype=DT) * spread / 2)
    return q, h


def _prox_instance(seed):
    """Row-grouped matrix (right), column-grouped matrix (left), vectors, groups across all three."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.nn.Parameter(torch.randn(6, 2, 2, 2, generator=gen, dtype=DT))  # rows, b = 8
    B = torch.nn.Parameter(torch.randn(5, 6, generator=gen, dtype=DT))  # columns, b = 5
    v = torch.nn.Parameter(torch.randn(6, generator=gen, dtype=DT))
    from compress.structure.group import Group, Slice

    groups = []
    for i in range(6):  # row i of A + entry i of v + column i of B: one group over three metrics
        g = Group(f"g{i}", "channel", "A", [Slice("A", 0, (i,)), Slice("v", 0, (i,)), Slice("B", 1, (i,))])
        g.tensors = [A, v, B]
        g.weight = math.sqrt(8 + 1 + 5)
        groups.append(g)
    params = [A, v, B]
    qa, ha = _random_spd(8, gen)
    qb, hb = _random_spd(5, gen)
    dv = torch.exp(torch.randn(6, generator=gen, dtype=DT))
    z = [torch.randn(p.shape, generator=gen, dtype=DT) for p in params]
    return params, groups, z, [EigMetric(qa, ha, "right"), dv, EigMetric(qb, hb, "left")]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eig_prox_matches_dense_bisection(seed):
    params, groups, z, mets = _prox_instance(seed)
    idx = GroupIndex(params, groups)
    spec = groups_spec(groups, params)
    dense = [mets[0].q @ torch.diag(mets[0].h) @ mets[0].q.T, mets[1], mets[2].q @ torch.diag(mets[2].h) @ mets[2].q.T]
    kinds = ["right", "diag", "left"]
    # thresholds around the zero-test value ‖A z‖_g so that both outcomes occur
    norms = []
    for sl, _ in spec:
        parts = []
        for k, dim, ii in sl:
            az = (
                (z[k].reshape(z[k].shape[0], -1) @ dense[k])
                if kinds[k] == "right"
                else (dense[k] @ z[k])
                if kinds[k] == "left"
                else dense[k] * z[k]
            )
            parts.append(az.movedim(dim, 0)[list(ii)].reshape(-1))
        norms.append(float(torch.cat(parts).norm()))
    tau = torch.tensor(norms, dtype=DT) * torch.tensor([0.3, 0.9, 1.1, 0.5, 2.0, 0.05], dtype=DT)
    got = eig_metric_group_prox(z, mets, idx, tau)
    ref = dense_structured_prox(z, dense, kinds, spec, tau)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)
    zero = [bool(all((got[k].movedim(d, 0)[list(i)] == 0).all() for k, d, i in sl)) for sl, _ in spec]
    assert zero == [False, False, True, False, True, False]


def test_eig_prox_matches_lbfgs_on_smoothed_problem():
    """An independent minimiser: scipy L-BFGS on τ sqrt(‖x‖² + δ²) + ½‖x − z‖²_A, per group."""
    scipy_opt = pytest.importorskip("scipy.optimize")
    params, groups, z, mets = _prox_instance(7)
    idx = GroupIndex(params, groups)
    tau = torch.full((6,), 6.0, dtype=DT)
    got = eig_metric_group_prox(z, mets, idx, tau)
    Pa = mets[0].q @ torch.diag(mets[0].h) @ mets[0].q.T
    Pb = mets[2].q @ torch.diag(mets[2].h) @ mets[2].q.T
    delta = 1e-9
    for i in range(6):
        za, zv, zb = z[0][i].reshape(-1), z[1][i : i + 1], z[2][:, i]

        def f(xn, za=za, zv=zv, zb=zb, i=i):  # bound now: the closure must not see a later iteration
            x = torch.from_numpy(xn)
            xa, xv, xb = x[:8], x[8:9], x[9:]
            ea, ev, eb = xa - za, xv - zv, xb - zb
            val = tau[i] * torch.sqrt(x @ x + delta**2) + 0.5 * (ea @ Pa @ ea + mets[1][i] * ev @ ev + eb @ Pb @ eb)
            grad = tau[i] * x / torch.sqrt(x @ x + delta**2) + torch.cat([Pa @ ea, mets[1][i] * ev, Pb @ eb])
            return float(val), grad.numpy()

        x0 = torch.cat([za, zv, zb]).numpy()
        res = scipy_opt.minimize(
            f, x0, jac=True, method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-12, "ftol": 1e-15}
        )
        mine = torch.cat([got[0][i].reshape(-1), got[1][i : i + 1], got[2][:, i]])
        assert torch.allclose(mine, torch.from_numpy(res.x), atol=2e-5), (
            i,
            (mine - torch.from_numpy(res.x)).abs().max(),
        )
        assert f(mine.numpy())[0] <= res.fun + 1e-9


def test_wrong_side_is_refused():
    params, groups, z, mets = _prox_instance(0)
    idx = GroupIndex(params, groups)
    bad = [EigMetric(torch.eye(6, dtype=DT), torch.ones(6, dtype=DT), "left"), mets[1], mets[2]]
    with pytest.raises(ValueError, match="would mix its groups"):
        eig_metric_group_prox(z, bad, idx, 1.0)


# --------------------------------------------------------------------------- the optimizers


def _drive(opt_cls, steps=20, lam=0.02, every=1, rms=0.2, lrs=None, **kw):
    model, x, y = tiny_problem(seed=3)
    params = list(model.parameters())
    groups = tiny_groups(model)
    spec = groups_spec(groups, params)
    diag = opt_cls is DASGO
    opt = opt_cls(
        params,
        lr=0.02,
        lam=lam,
        betas=(0.9, 0.95),
        eps=1e-8,
        eps_rel=1e-6,
        rms=rms,
        precond_every=every,
        groups=groups,
        **kw,
    )
    ref = RefASGO(params, spec, lam=lam, betas=(0.9, 0.95), eps=1e-8, eps_rel=1e-6, rms=rms, every=every, diagonal=diag)
    assert opt.preconditioner_sides() == [s if s is None else s + ("-diag" if diag else "") for s in ref.side]
    lrs = lrs or [0.02] * steps
    seen = set()
    for t in range(steps):
        opt.param_groups[0]["lr"] = lrs[t]
        grads = grads_at(model, [p.detach() for p in params], x, y)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        ref.step(grads_at(model, ref.W, x, y), lrs[t])
        for k, p in enumerate(params):
            assert torch.allclose(p.detach(), ref.W[k], rtol=0, atol=1e-8), (t, k, (p - ref.W[k]).abs().max())
        seen.add(opt.group_sparsity()[0])
    return opt, seen


def test_asgo_matches_transcription():
    _, seen = _drive(ASGO, lam=0.03, lrs=[0.02] * 12 + [0.01] * 8)
    assert max(seen) > 0 and min(seen) < 1


def test_asgo_stale_preconditioner_matches_transcription():
    _, seen = _drive(ASGO, lam=0.03, every=3)
    assert max(seen) > 0 and min(seen) < 1


def test_asgo_without_rms_scaling_and_lam_zero():
    _, seen = _drive(ASGO, lam=0.0, rms=None)
    assert seen == {0.0}


def test_dasgo_matches_transcription():
    _, seen = _drive(DASGO, lam=0.03)
    assert max(seen) > 0 and min(seen) < 1


@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_zero_groups_stay_exactly_zero_no_mixing(lam):
    """A zero row with a zero gradient stays exactly zero under the preconditioned step.

    A left preconditioner on row groups would mix rows: the same step computed with it makes
    the zero rows non-zero, so the test can tell the sides apart.
    """
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.randn(6, 10, dtype=DT))
    zero_rows = [1, 4]
    with torch.no_grad():
        W[zero_rows] = 0
    opt = ASGO([W], lr=0.05, lam=lam, precond_every=1)  # default groups: rows → right side
    assert opt.preconditioner_sides() == ["right"]
    for _ in range(5):
        G = torch.randn(6, 10, dtype=DT)
        G[zero_rows] = 0
        W.grad = G
        opt.step()
        assert bool((W.detach()[zero_rows] == 0).all())
        assert bool((W.detach().norm(dim=1)[[0, 2, 3, 5]] > 0).all())
    # a left preconditioner mixes rows: with any history in which those rows were non-zero
    # (here one earlier full gradient), (L)^{-1/2} G puts the other rows into the zero rows
    F = torch.randn(6, 10, dtype=DT)
    lam_, Q = torch.linalg.eigh(F @ F.T + G @ G.T)
    left = Q @ torch.diag(lam_.rsqrt()) @ Q.T @ G
    assert float(left[zero_rows].abs().max()) > 1e-3


def resume_roundtrip(opt_name, split=6, steps=14, json_param_groups=False, **kw):
    """Train `steps` float32 steps in one go and, from a state_dict saved after `split`, in a
    second model/optimizer; returns both optimizers after asserting the weights are bitwise equal."""
    torch.manual_seed(0)
    data = [(torch.randn(16, 6), torch.randint(0, 3, (16,))) for _ in range(steps)]

    def make():
        torch.manual_seed(1)
        m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        return m, make_optimizer(opt_name, m.parameters(), **kw)

    def train(m, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    m1, o1 = make()
    train(m1, o1, data[:split])
    sd = o1.state_dict()
    if json_param_groups:  # the checkpoint stores param groups as JSON
        sd["param_groups"] = json.loads(json.dumps(sd["param_groups"]))
    buf = io.BytesIO()
    torch.save({"m": m1.state_dict(), "o": sd}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    m2, o2 = make()
    m2.load_state_dict(saved["m"])
    o2.load_state_dict(saved["o"])
    train(m1, o1, data[split:])
    train(m2, o2, data[split:])
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert p.dtype == torch.float32 and torch.equal(p, q)
    return o1, o2


@pytest.mark.parametrize("name", ["asgo", "dasgo"])
def test_state_dict_roundtrip_bit_exact_float32(name):
    # split 6 with precond_every 4: the resumed run starts between two eigendecompositions
    o1, o2 = resume_roundtrip(name, lr=0.01, lam=2e-2, precond_every=4, json_param_groups=True)
    assert o1.group_sparsity() == o2.group_sparsity()


def test_make_optimizer_names_and_validation():
    lin = torch.nn.Linear(4, 3)
    assert isinstance(make_optimizer("asgo", lin.parameters(), lr=1e-3, lam=1e-3), ASGO)
    o = make_optimizer("DASGO", lin.parameters(), lr=1e-3, lam=1e-3)
    assert isinstance(o, DASGO) and o.preconditioner_sides() == ["right-diag", None]
    with pytest.raises(ValueError, match="rms"):
        ASGO(lin.parameters(), lr=1e-3, rms=0.0)
    big = torch.nn.Linear(3000, 2)  # ungrouped? no: rows of 3000 → right side of size 3000 > max → diagonal
    o = ASGO(big.parameters(), lr=1e-3, max_precond_dim=2048)
    assert o.preconditioner_sides()[0] == "right-diag"


class _Stop(Exception):
    pass


def finetune_resume_bit_exact(name, tmp_path, **cfg_kw):
    """compress.train.finetune with optimizer `name`: a run stopped in epoch 2 and resumed from its
    checkpoint (safetensors + JSON) ends with the same weights as an uninterrupted run."""
    from compress.models import get_model
    from compress.models.digits import digits_datasets
    from compress.train.config import TrainConfig
    from compress.train.loop import finetune

    spec = get_model("digits-resnet")
    tr, te = digits_datasets()
    tr = torch.utils.data.TensorDataset(*(t[:128] for t in tr.tensors))
    te = torch.utils.data.TensorDataset(*(t[:64] for t in te.tensors))
    cfg = TrainConfig(epochs=2, optimizer=name, lr=1e-3, device="cpu", milestones=[1], **cfg_kw)
    torch.manual_seed(0)
    init = spec.build().state_dict()
    runs = []
    for stop in (False, True):
        m = spec.build()
        m.load_state_dict(init)

        def stopper(st, stop=stop):
            if stop and st["epoch"] == 1:  # after epoch 1 was checkpointed
                raise _Stop

        try:
            runs.append(
                finetune(
                    m,
                    tr,
                    te,
                    spec.example_input(2),
                    tmp_path / f"run{stop}",
                    cfg,
                    force=True,
                    progress=False,
                    epoch_callbacks=[stopper],
                )
            )
        except _Stop:
            runs.append(
                finetune(
                    spec.build(), tr, te, spec.example_input(2), tmp_path / f"run{stop}", resume=True, progress=False
                )
            )
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    return runs


@pytest.mark.slow
def test_finetune_resume_bit_exact(tmp_path):
    runs = finetune_resume_bit_exact("asgo", tmp_path, lam=0.5)
    assert isinstance(runs[1].optimizer, ASGO) and runs[1].optimizer.group_sparsity()[0] > 0
