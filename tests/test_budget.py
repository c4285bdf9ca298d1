"""Budgets: the cost model equals what extraction really produces; the controller hits a
FLOP target; enforcement never leaves the model above the target; Budget validation."""
import copy
import math

import pytest
import torch
from torch import nn

from compress.budget import Budget, CostModel, ZeroKeeper
from compress.cost import count_flops, count_params
from compress.extract import extract
from compress.groups import find_groups
from compress.io import UserError
from compress.models import get_model, model_names

SLOW_MODELS = {"resnet50", "mobilenetv2", "vit-tiny"}  # full-size extraction: tens of seconds to minutes


def _randomize(model, seed=0):
    """Non-trivial BN statistics and 1-d parameters, so extraction's equivalence check bites."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _real_counts(model, groups, mask, example):
    """Zero the masked groups of a copy, extract it for real, count with torch's flop counter."""
    work = copy.deepcopy(model)
    gl = find_groups(work, example)
    assert [g.name for g in gl] == [g.name for g in groups]
    with torch.no_grad():
        for i in torch.nonzero(mask).flatten().tolist():
            for s, t in zip(gl[i].slices, gl[i].tensors):
                t.index_fill_(s.dim, torch.tensor(s.indices), 0.0)
    small, _ = extract(work, gl, example)
    return count_flops(small, example), count_params(small)


def _patterns(groups, seed):
    """A sparse and a dense random pattern, plus one with a whole layer zero (extraction keeps one group)."""
    g = torch.Generator().manual_seed(seed)
    n = len(groups)
    a = torch.rand(n, generator=g) < 0.3
    b = torch.rand(n, generator=g) < 0.8
    layer = groups[n // 2].layer
    b |= torch.tensor([gr.layer == layer for gr in groups])
    return [a, b]


def _check_model(model, example, seed=0):
    model = _randomize(model.eval(), seed)
    groups = find_groups(model, example)
    cm = CostModel(model, groups, example)
    none = torch.zeros(len(groups), dtype=torch.bool)
    assert cm.flops(none) == count_flops(model, example) == cm.dense_flops
    assert cm.params(none) == count_params(model) == cm.dense_params
    assert cm.unattributed == []
    masks = _patterns(groups, seed)
    batch_flops, batch_params = cm.flops(torch.stack(masks)), cm.params(torch.stack(masks))
    for k, mask in enumerate(masks):
        flops, params = _real_counts(model, groups, mask, example)
        assert (cm.flops(mask), cm.params(mask)) == (flops, params)
        assert (int(batch_flops[k]), int(batch_params[k])) == (flops, params)
        assert flops < cm.dense_flops


def _spec_input(name):
    spec = get_model(name)
    torch.manual_seed(0)
    return spec.build(), spec.example_input(1)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_MODELS else []) for n in model_names()]
)
def test_cost_model_equals_extracted_model_on_every_builtin_model(name):
    model, x = _spec_input(name)
    if name == "bert-mini":
        x = x[:, :16]  # a shorter sequence: same groups and same cost structure, faster extraction
    _check_model(model, x)


def test_cost_model_small_vit_heads_and_neurons():
    """The same ViT code path as vit-tiny (heads and MLP neurons), small enough for the fast suite."""
    from compress.models.vit import ViT

    torch.manual_seed(0)
    _check_model(ViT(image=32, patch=8, dim=48, depth=2, heads=3, mlp=64, num_classes=10), torch.rand(1, 3, 32, 32))


def _mobile(first_block):
    from compress.models.mobilenetv2 import InvertedResidual, _cbr

    torch.manual_seed(0)
    return nn.Sequential(_cbr(3, 16, 3, 2), first_block, InvertedResidual(24, 24, 1, 4), InvertedResidual(24, 24, 1, 4),
                         _cbr(24, 64, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def test_cost_model_small_inverted_residuals_with_depthwise_convs():
    """MobileNetV2's blocks (expand=1 block, expand, depthwise, coupled projections), small enough to extract quickly."""
    from compress.models.mobilenetv2 import InvertedResidual

    _check_model(_mobile(InvertedResidual(16, 24, 1, 1)), torch.rand(1, 3, 32, 32), seed=1)


def test_cost_model_producer_that_also_consumes_its_own_group():
    from compress.models.mobilenetv2 import InvertedResidual

    model = _mobile(InvertedResidual(16, 16, 1, 1))
    model[2] = InvertedResidual(16, 24, 2, 4)
    _check_model(model, torch.rand(1, 3, 32, 32), seed=1)


def test_cost_model_scales_with_batch_and_matches_hand_formula():
    """digits-resnet by hand: FLOPs = 2·64·(9·cs + 2·9·cs·c) + 2·10·cs per sample (convs on 8x8, fc)."""
    from compress.models.digits import DigitsResNet

    model = DigitsResNet().eval()
    x = torch.rand(3, 1, 8, 8)
    groups = find_groups(model, x)
    cm = CostModel(model, groups, x)
    mask = torch.zeros(len(groups), dtype=torch.bool)
    layer = [g.layer for g in groups]
    stem = [i for i, l in enumerate(layer) if l == "stem.0"]
    c1 = [i for i, l in enumerate(layer) if l == "layers.0.conv1"]
    mask[stem[:5]] = True
    mask[c1[:12]] = True
    cs, ca, cb = 27, 20, 32

    def hand(cs, ca, cb):
        per_sample = 2 * 64 * (9 * cs + 9 * cs * ca * 2 + 9 * cs * cb * 2) + 2 * 10 * cs
        return 3 * per_sample

    assert cm.flops(mask) == hand(cs, ca, cb)
    assert cm.dense_flops == hand(32, 32, 32)


def test_savings_rank_matches_exact_single_removals():
    """First-order savings equal the exact cost drop of removing one more group (one dim per parameter)."""
    model, x = _spec_input("resnet20")
    groups = find_groups(model.eval(), x)
    cm = CostModel(model, groups, x)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(len(groups), generator=g) < 0.4
    s = cm.savings(mask, "flops")
    live = torch.nonzero(~mask).flatten()[:40]
    trial = mask.repeat(len(live), 1)
    trial[torch.arange(len(live)), live] = True
    exact = cm.cost(mask, "flops") - cm.cost(trial, "flops")
    assert torch.allclose(s[live], exact, rtol=1e-9, atol=1e-12)
    assert bool((s[mask] == 0).all())


# --------------------------------------------------------------------------- Budget validation


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(), "exactly one"),
        (dict(flops=0.5, params=0.5), "exactly one"),
        (dict(flops=0.0), "(0, 1)"),
        (dict(flops=1.0), "(0, 1)"),
        (dict(params=1.5), "(0, 1)"),
        (dict(flops=float("nan")), "(0, 1)"),
        (dict(latency_ms=-1.0), "positive"),
        (dict(latency_ms=2.0, batch=0), "batch"),
        (dict(latency_ms=2.0, threads=0), "threads"),
        (dict(flops=0.5, batch=4), "latency"),
    ],
)
def test_budget_validation_errors(kw, msg):
    with pytest.raises(UserError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
        Budget(**kw)
    assert "\n" not in str(e.value)


def test_budget_below_smallest_model_is_an_error():
    model, x = _spec_input("digits-resnet")
    groups = find_groups(model.eval(), x)
    cm = CostModel(model, groups, x)
    floor = cm.minimum("flops")
    assert 0 < floor < 0.05
    with pytest.raises(UserError, match="smallest"):
        Budget(flops=floor / 2).check_reachable(cm)
    Budget(flops=min(0.99, floor * 2)).check_reachable(cm)


# --------------------------------------------------------------------------- zero keeping


def test_zero_keeper_zeroes_parameters_and_optimizer_buffers():
    model, x = _spec_input("digits-resnet")
    groups = find_groups(model, x)
    mask = torch.zeros(len(groups), dtype=torch.bool)
    mask[[0, 5, 40, 70]] = True
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    for p in model.parameters():
        opt.state[p]["w_hat"] = torch.randn_like(p)
        opt.state[p]["v"] = torch.ones_like(p)
    ZeroKeeper(groups, mask).apply(opt)
    for i, g in enumerate(groups):
        for s, t in zip(g.slices, g.tensors):
            sl = t.detach().index_select(s.dim, torch.tensor(s.indices))
            wh = opt.state[t]["w_hat"].index_select(s.dim, torch.tensor(s.indices))
            assert bool((sl == 0).all()) == bool(mask[i]) and bool((wh == 0).all()) == bool(mask[i])
    assert all(bool((opt.state[p]["v"] == 1).all()) for p in model.parameters())  # other buffers untouched


# --------------------------------------------------------------------------- controller


@pytest.mark.parametrize("name", ["RAMDA", "RMDA"])
def test_critical_lambda_predicts_the_next_prox(name):
    """λ*_g from the dual state: after one more step (zero gradient) at λ, Ŵ_g = 0 iff λ*_g ≤ λ."""
    import compress.optim as optim
    from compress.budget import critical_lams

    torch.manual_seed(0)
    model, x = _spec_input("digits-resnet")
    groups = find_groups(model, x)
    opt = getattr(optim, name)(model.parameters(), lr=0.01, lam=1e-4, groups=groups)
    for _ in range(3):
        opt.zero_grad()
        model(torch.rand(8, 1, 8, 8)).logsumexp(-1).mean().backward()
        opt.step()
    crit = critical_lams(opt)
    vals = crit.sort().values
    gaps = vals[1:] - vals[:-1]
    k = int(torch.argmax(gaps[len(gaps) // 3: 2 * len(gaps) // 3])) + len(gaps) // 3
    lam = float((vals[k] + vals[k + 1]) / 2)  # halfway between two critical values: no ties
    for g in opt.param_groups:
        g["lam"] = lam
    opt.zero_grad(set_to_none=True)
    opt.step()
    assert torch.equal(opt.group_norms() == 0, crit <= lam)
    assert 0 < int((crit <= lam).sum()) < len(groups)


def _digits_setup(seed=0):
    spec = get_model("digits-resnet")
    torch.manual_seed(seed)
    model = spec.build()
    return model, spec.example_input(1)


@pytest.mark.parametrize("kind,target", [("flops", 0.5), ("params", 0.3)])
def test_enforcement_never_leaves_the_pattern_above_target_and_is_minimal(kind, target):
    """Against a linear scan: the bisection finds the shortest prefix of the weakness ranking that fits."""
    from compress.budget import enforce

    model, x = _digits_setup()
    groups = find_groups(model, x)
    cm = CostModel(model, groups, x)
    g = torch.Generator().manual_seed(5)
    for trial in range(4):
        zero = torch.rand(len(groups), generator=g) < 0.1 * trial
        norms = torch.rand(len(groups), generator=g, dtype=torch.float64)
        mask, added = enforce(cm, zero, norms, kind, target)
        assert cm.cost(mask, kind) <= target
        assert torch.equal(mask, zero | added) and not bool((added & zero).any())
        # slow reference: walk the same ranking one group at a time
        score = norms / cm.savings(zero, kind).clamp_min(1e-300)
        score[zero] = math.inf
        ref = zero.clone()
        for i in torch.argsort(score, stable=True).tolist():
            if cm.cost(ref, kind) <= target:
                break
            ref[i] = True
        assert torch.equal(mask, ref)


def test_finetune_to_budget_enforcement_holds_the_target_when_the_optimizer_removes_nothing(tmp_path, digits_small):
    """λ pinned near zero (controller disabled): every removal is enforcement's, and the real
    extracted model is still within the target."""
    from compress.budget import finetune_to_budget
    from compress.train import TrainConfig

    model, x = _digits_setup()
    tr, te = digits_small
    cfg = TrainConfig(epochs=2, batch_size=64, lam=1e-12, optimizer="proxsgd", milestones=[1])
    res = finetune_to_budget(model, tr, te, x, tmp_path / "run", cfg, Budget(flops=0.4),
                             controller={"exact": False, "gain": 0.0, "freeze_epoch": 1}, progress=False)
    b = res.budget
    assert b["removed_by_optimizer"] == 0 and b["removed_by_enforcement"] > 0
    assert b["achieved"]["flops_fraction"] <= 0.4
    assert b["achieved"]["flops"] == b["achieved"]["flops_predicted"]
    saved = __import__("json").loads((tmp_path / "run" / "budget.json").read_text())
    assert saved["achieved"]["flops"] == b["achieved"]["flops"]


def test_controller_reaches_a_flop_target_in_a_short_run(tmp_path, digits_small):
    from compress.budget import finetune_to_budget
    from compress.train import TrainConfig

    model, x = _digits_setup()
    tr, te = digits_small
    cfg = TrainConfig(epochs=6, batch_size=32, milestones=[4])
    res = finetune_to_budget(model, tr, te, x, tmp_path / "run", cfg, Budget(flops=0.5), progress=False)
    b = res.budget
    f = b["achieved"]["flops_fraction"]
    assert 0.45 <= f <= 0.5, f
    # the real extracted model, counted independently of the cost model
    from compress.groups import find_groups as fg

    small, _ = extract(res.model, res.groups, x)
    assert count_flops(small, x) / count_flops(get_model("digits-resnet").build(), x) == pytest.approx(f)
    assert b["removed_by_optimizer"] > 0
    assert [m["lam"] for m in res.metrics if m["phase"] == "final"][-1] == 0.0
    assert all(m["cost"] <= 0.5 for m in res.metrics if m["phase"] == "final")


def test_blocked_flops_pad_channel_counts_like_nchwc_kernels():
    """digits-resnet by hand with block 16: 27 stem channels cost as 32, 20 as 32, 5 stay 5 (≤ block/2)."""
    from compress.models.digits import DigitsResNet

    model = DigitsResNet().eval()
    x = torch.rand(1, 1, 8, 8)
    groups = find_groups(model, x)
    cm = CostModel(model, groups, x)
    layer = [g.layer for g in groups]
    mask = torch.zeros(len(groups), dtype=torch.bool)
    for name, k in (("stem.0", 5), ("layers.0.conv1", 12), ("layers.1.conv1", 27)):
        idx = [i for i, l in enumerate(layer) if l == name]
        mask[idx[:k]] = True

    def hand(cs, ca, cb):
        return 2 * 64 * (9 * cs + 9 * cs * ca * 2 + 9 * cs * cb * 2) + 2 * 10 * cs

    assert cm.flops(mask) == hand(27, 20, 5)
    assert cm.flops(mask, block=16) == hand(32, 32, 5)
    assert cm.flops(mask, block=8) == hand(32, 24, 8)  # 5 > 8 // 2: padded


def test_latency_target_below_the_smallest_model_is_a_one_line_error(tmp_path, digits_small):
    """Measured, not assumed: the smallest valid model is exported and timed, then the target refused."""
    from compress.budget import finetune_to_budget
    from compress.train import TrainConfig

    model, x = _digits_setup()
    tr, te = digits_small
    with pytest.raises(UserError, match="below what the smallest valid model reaches") as e:
        finetune_to_budget(model, tr, te, x, tmp_path / "run", TrainConfig(epochs=1), Budget(latency_ms=1e-6),
                           latency_time_budget_s=0.1, progress=False)
    assert "\n" not in str(e.value) and " ms measured" in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before any training or run files


def test_budget_run_resumes_after_the_freeze_bit_exactly(tmp_path, digits_small):
    """Stopped after the freeze (epoch 2) and resumed from the epoch-2 checkpoint: the frozen pattern comes
    back from budget_state.json, and the final weights equal one uninterrupted run's bit for bit."""
    from compress.budget import finetune_to_budget
    from compress.train import TrainConfig

    tr, te = digits_small
    cfg = TrainConfig(epochs=4, batch_size=64, milestones=[2], seed=3)

    model, x = _digits_setup()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    ctl = {"freeze_epoch": 2}
    full = finetune_to_budget(model, tr, te, x, tmp_path / "full", cfg, Budget(flops=0.6), progress=False, controller=ctl)

    class Stop(Exception):
        pass

    def stop_after_third(state):
        if state["epoch"] == 2:
            raise Stop

    model2, _ = _digits_setup()
    model2.load_state_dict(init)
    with pytest.raises(Stop):
        finetune_to_budget(model2, tr, te, x, tmp_path / "cut", cfg, Budget(flops=0.6), progress=False,
                           controller=ctl, epoch_callbacks=[stop_after_third])
    state = __import__("json").loads((tmp_path / "cut" / "budget_state.json").read_text())
    assert state["frozen"] and state["freeze_info"]["epoch"] == 2
    model3, _ = _digits_setup(seed=9)  # weights come from the checkpoint
    res = finetune_to_budget(model3, tr, te, x, tmp_path / "cut", resume=True, progress=False)
    assert res.budget["removed_by_optimizer"] == full.budget["removed_by_optimizer"]
    assert res.budget["achieved"] == full.budget["achieved"]
    sd_full, sd_res = full.model.state_dict(), res.model.state_dict()
    assert all(torch.equal(sd_full[k], sd_res[k]) for k in sd_full)
