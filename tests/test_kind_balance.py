"""Per-kind λ at the budget's controls (compress/budget/critical.py), against direct transcriptions."""

import statistics
from types import SimpleNamespace

import pytest
import torch

from compress.budget.critical import KindBalance, balance_factors


def _groups(kinds, weights=None):
    return [SimpleNamespace(kind=k, weight=w) for k, w in zip(kinds, weights or [1.0] * len(kinds))]


def test_factors_are_the_kind_median_over_the_overall_median():
    g = torch.Generator().manual_seed(0)
    kinds = ["head"] * 7 + ["neuron"] * 40 + ["channel"] * 12
    crit = torch.rand(len(kinds), generator=g, dtype=torch.float64) * torch.tensor(
        [0.01 if k == "head" else 1.0 if k == "neuron" else 3.0 for k in kinds], dtype=torch.float64
    )
    ids = KindBalance(_groups(kinds)).kinds
    got = balance_factors(crit, ids)
    vals = crit.tolist()
    overall = statistics.median_low(vals)
    for i, k in enumerate(kinds):
        mine = statistics.median_low([v for v, kk in zip(vals, kinds) if kk == k])
        assert float(got[i]) == pytest.approx(mine / overall, rel=1e-12)
    # after balancing, each kind's median λ* is the overall one: the median head is as hard to keep as the median neuron
    bal = crit / got
    for k in set(kinds):
        assert statistics.median_low([float(b) for b, kk in zip(bal, kinds) if kk == k]) == pytest.approx(overall)


def test_one_kind_changes_nothing_and_weights_follow_the_optimizer():
    crit = torch.tensor([0.3, 0.1, 0.2], dtype=torch.float64)
    one = KindBalance(_groups(["channel"] * 3, [1.0, 2.0, 3.0]))
    opt = SimpleNamespace(
        index=SimpleNamespace(weights=torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)), param_groups=[{}]
    )
    assert torch.equal(one.rebalance(opt, crit), crit) and opt.index.weights.tolist() == [1.0, 2.0, 3.0]

    two = KindBalance(_groups(["head", "neuron", "neuron", "neuron"], [4.0, 1.0, 1.0, 1.0]))
    w0 = torch.tensor([4.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    opt = SimpleNamespace(index=SimpleNamespace(weights=w0.clone()), param_groups=[{}])
    crit = torch.tensor([0.01, 1.0, 2.0, 3.0], dtype=torch.float64)  # computed with weights w0
    new = two.rebalance(opt, crit)
    f = torch.tensor(
        [0.01 / 1.0, 2.0 / 1.0, 2.0 / 1.0, 2.0 / 1.0], dtype=torch.float64
    )  # medians: head 0.01, neuron 2, all 1
    assert torch.allclose(opt.index.weights, w0 * f) and torch.allclose(new, crit / f)
    # λ* = ‖a‖/(α w): with the new weights the caller's next λ* are crit·w0/w; a second control sees them and keeps f
    again = two.rebalance(opt, crit * w0 / opt.index.weights)
    assert torch.allclose(opt.index.weights, w0 * f) and torch.allclose(again, new)
    assert opt.param_groups[0]["kind_factors"] == pytest.approx([0.01, 2.0])  # per kind, saved with a checkpoint
    # a resumed run: a fresh optimizer holds the groups' own weights; the checkpoint's factors go back on load
    opt2 = SimpleNamespace(index=SimpleNamespace(weights=w0.clone()), param_groups=[dict(opt.param_groups[0])])
    KindBalance(_groups(["head", "neuron", "neuron", "neuron"], [4.0, 1.0, 1.0, 1.0])).restore(opt2)
    assert torch.allclose(opt2.index.weights, w0 * f)


def test_budget_run_on_heads_and_neurons_balances_and_resumes_bit_exactly(tmp_path, digits_small):
    """digits-vit (heads + MLP neurons): the controls give heads and neurons different factors; a run
    stopped in the sparsity phase and resumed equals the straight run bit for bit (the checkpoint's factors
    come back with its optimizer state, before the first resumed step)."""
    from compress.budget.runner import finetune_to_budget
    from compress.budget.target import Budget
    from compress.models import get_model
    from compress.train.config import TrainConfig

    spec = get_model("digits-vit")
    tr, te = digits_small
    cfg = TrainConfig(epochs=3, batch_size=64, milestones=[2], seed=1)
    ctl = {"freeze_epoch": 3}

    def build(seed=0):
        torch.manual_seed(seed)
        return spec.build()

    x = spec.example_input(1)
    init = {k: v.clone() for k, v in build().state_dict().items()}
    kw = dict(progress=False, controller=ctl, measure_alignment=False)
    full = finetune_to_budget(build(), tr, te, x, tmp_path / "full", cfg, Budget(flops=0.6), **kw)

    class Stop(Exception):
        pass

    def stop(state):
        if state["epoch"] == 1:
            raise Stop

    cut = build()
    cut.load_state_dict(init)
    with pytest.raises(Stop):
        finetune_to_budget(cut, tr, te, x, tmp_path / "cut", cfg, Budget(flops=0.6), epoch_callbacks=[stop], **kw)
    from compress.train.checkpoint import load_checkpoint

    groups = load_checkpoint(tmp_path / "cut" / "checkpoint.safetensors")["optimizer"]["param_groups"]
    assert len(set(groups[0]["kind_factors"])) == 2  # heads and neurons got different λ
    res = finetune_to_budget(
        build(9), tr, te, x, tmp_path / "cut", resume=True, progress=False, measure_alignment=False
    )
    assert res.budget["achieved"] == full.budget["achieved"]
    sd_full, sd_res = full.model.state_dict(), res.model.state_dict()
    assert all(torch.equal(sd_full[k], sd_res[k]) for k in sd_full)
