"""The optimizer table, the interface the loop and the budget controller use, and the critical λ
against a brute-force bisection on λ (one more step, zero gradient)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compress import optim
from compress.budget.patterns import ZeroKeeper
from compress.errors import UserError
from compress.optim.interface import StructuredOptimizer, as_structured
from compress.optim.registry import (
    REGISTRY,
    build_optimizer,
    help_text,
    spec,
    validate_config,
)
from compress.structure.sparsity import group_norms
from compress.train.config import DEFAULT_LR, TrainConfig

VARIANTS = [("ramda", {}), ("rmda", {}), ("ramda", {"reg_space": "preconditioned"})]


def _trained(name: str, kw: dict, steps: int = 4, seed: int = 0):
    """Float64 params (two matrices, rows are the groups, one bias), an optimizer after `steps` random-gradient steps."""
    g = torch.Generator().manual_seed(seed)
    data = [
        torch.randn(6, 5, generator=g, dtype=torch.float64),
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        torch.randn(4, generator=g, dtype=torch.float64),
    ]
    ps = [nn.Parameter(d.clone()) for d in data]
    opt = build_optimizer(name, ps, lr=0.05, lam=1e-3, **kw)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
    return ps, opt


def _zero_after_next_step(name: str, kw: dict, ps, state: dict, lam: float) -> torch.Tensor:
    """Which groups the next step (no gradient) at λ makes exactly zero, on a copy restored from `state`."""
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    o = build_optimizer(name, qs, lr=0.05, lam=lam, **kw)
    o.load_state_dict(state)
    for pg in o.param_groups:
        pg["lam"] = lam
    o.step()
    return o.group_norms() == 0


@pytest.mark.parametrize("name, kw", VARIANTS, ids=["ramda", "rmda", "ramda-preconditioned"])
def test_critical_lams_equal_brute_force_bisection(name, kw):
    ps, opt = _trained(name, kw)
    crit = opt.critical_lams()
    assert crit is not None and crit.shape == (opt.index.n_groups,) and bool((crit > 0).all())
    state = opt.state_dict()
    for gi in range(opt.index.n_groups):
        lo, hi = 1e-8, 1e3  # log-space bisection on "the next step zeroes group gi"
        assert not bool(_zero_after_next_step(name, kw, ps, state, lo)[gi])
        assert bool(_zero_after_next_step(name, kw, ps, state, hi)[gi])
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            if bool(_zero_after_next_step(name, kw, ps, state, mid)[gi]):
                hi = mid
            else:
                lo = mid
        assert float(crit[gi]) == pytest.approx(hi, rel=1e-7), f"group {gi}"


def test_preconditioned_ramda_has_its_own_critical_lams():
    """The z-space zero test differs from the parameter-space one: same state, other λ*."""
    _, plain = _trained("ramda", {})
    _, pre = _trained("ramda", {"reg_space": "preconditioned"})
    assert type(pre).__name__ == "PrecondRAMDA"
    assert not torch.allclose(plain.critical_lams(), pre.critical_lams(), rtol=1e-3)


def test_critical_lams_none_where_the_zero_test_needs_the_next_gradient():
    for name in ("proxsgd", "proxadam", "asgo", "dsgd"):
        _, opt = _trained(name, {}, steps=1)
        assert opt.critical_lams() is None, name
    _, fresh = _trained("ramda", {}, steps=0)
    assert fresh.critical_lams() is None  # no dual state yet


def test_every_entry_builds_and_answers_the_interface():
    lin = nn.Linear(4, 3)
    for name, s in REGISTRY.items():
        opt = build_optimizer(name, list(lin.parameters()), lr=1e-3)
        assert isinstance(opt, s.cls) and isinstance(opt, StructuredOptimizer), name
        assert s.structured == (name != "adamw") and s.momentum_schedule == (name in ("ramda", "rmda"))
        assert s.dual_averaging == (name in ("ramda", "rmda"))
        assert (s.structured, s.momentum_schedule, s.dual_averaging) == (
            s.cls.structured,
            s.cls.momentum_schedule,
            issubclass(s.cls, optim.DualAveraging),
        ), name  # table = class
        assert DEFAULT_LR[name] == s.default_lr and s.default_lam == (0.0 if name == "adamw" else 1.5e-2)
        assert name in help_text()
    assert spec("DASGO").cls is optim.DASGO
    with pytest.raises(ValueError, match="unknown optimizer"):
        spec("sgdx")


def test_validate_config_reads_the_table():
    validate_config(TrainConfig(optimizer="proxadam", reg_space="preconditioned").resolved())
    for cfg, msg in [
        (TrainConfig(optimizer="sgdx"), "unknown optimizer"),
        (TrainConfig(optimizer="rmda", momentum=0.0), "momentum"),
        (TrainConfig(optimizer="adamw", lam=0.1), "dense"),
        (TrainConfig(optimizer="rmda", reg_space="preconditioned"), "ramda and proxadam"),
        (TrainConfig(optimizer="ramda", reg_space="z"), "param or preconditioned"),
    ]:
        with pytest.raises(UserError, match=msg):
            validate_config(cfg)
    validate_config(TrainConfig(optimizer="proxsgd", momentum=0.0))  # its momentum is another quantity


def test_dense_answers_from_the_model_and_foreign_optimizers_are_viewed_as_dense():
    from compress.structure.find import find_groups

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2))
    groups = find_groups(model, torch.randn(2, 5))
    with torch.no_grad():
        model[0].weight[1].zero_()
        model[0].bias[1].zero_()
    dense = build_optimizer("adamw", model.parameters(), groups=groups, lr=1e-3)
    assert torch.equal(dense.group_norms(), group_norms(groups)) and dense.group_sparsity()[0] > 0
    assert dense.critical_lams() is None and dense.layer_picks is None and not dense.structured
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    view = as_structured(sgd, groups)
    assert view is not sgd and torch.equal(view.group_norms(), group_norms(groups))
    assert as_structured(dense) is dense


def test_zero_keeper_zeroes_exactly_the_buffers_the_optimizer_names():
    ps, opt = _trained("ramda", {})
    assert opt.frozen_state_keys() == ("w_hat", "w0")
    groups_mask = torch.zeros(opt.index.n_groups, dtype=torch.bool)
    groups_mask[0] = True  # row 0 of the first matrix
    keeper = ZeroKeeper.__new__(ZeroKeeper)
    keeper.items = [(ps[0], 0, torch.tensor([0]))]
    opt.frozen_state_keys = lambda: ("v",)  # the keeper must read the names from the optimizer
    keeper.apply(opt)
    st = opt.state[ps[0]]
    assert bool((ps[0][0] == 0).all()) and bool((st["v"][0] == 0).all())
    assert bool((st["w_hat"][0] != 0).any()) and bool((st["w0"][0] != 0).any())


@pytest.mark.parametrize("reg_space", ["param", "preconditioned"])
def test_budget_controller_sets_lambda_exactly_for_every_dual_averaging_variant(reg_space):
    """The preconditioned RAMDA used to fall out of the exact rule (a dispatch on the class name)."""
    from compress.budget.controller import BudgetController
    from compress.budget.target import Budget
    from compress.models import get_model
    from compress.structure.cost_model import CostModel
    from compress.structure.find import find_groups

    spec_ = get_model("digits-resnet")
    torch.manual_seed(0)
    model, x = spec_.build(), spec_.example_input(1)
    groups = find_groups(model, x)
    cfg = TrainConfig(epochs=4, reg_space=reg_space).resolved()
    ctl = BudgetController(Budget(flops=0.5), CostModel(model, groups, x), groups, cfg, steps_per_epoch=4)
    opt = build_optimizer("ramda", model.parameters(), groups=groups, lr=0.01, lam=1e-4, reg_space=reg_space)
    for _ in range(2):
        opt.zero_grad()
        model(torch.rand(8, 1, 8, 8)).logsumexp(-1).mean().backward()
        opt.step()
    rec = ctl._control(opt, 2.0)
    assert rec["rule"] == "exact"
    crit = opt.critical_lams()
    assert rec["zero"] == int((crit <= rec["lam"]).sum()) > 0 and rec["cost"] <= rec["plan"]
