"""Training loop: schedule, exact resume after an interruption, validation of settings; every optimizer
learns through the loop, and the structured ones leave exact zero groups."""

import copy
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from compress.errors import TrainingInterrupted, UserError
from compress.models.digits import DigitsResNet
from compress.structure.find import find_groups
from compress.train.config import TrainConfig, lr_at, momentum_at
from compress.train.loop import finetune


def test_step_schedule_and_momentum_ramp_by_hand():
    cfg = TrainConfig(epochs=8, lr=0.1, milestones=[4, 6], gamma=0.1, momentum=0.25).resolved()
    assert [lr_at(cfg, e) for e in range(8)] == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    # before the last milestone c = c0; then a geometric ramp 0.25 → 1 over (8-6)//2 = 1 epoch
    assert [momentum_at(cfg, e) for e in range(8)] == pytest.approx([0.25] * 6 + [1.0, 1.0])
    cfg = TrainConfig(epochs=10, lr=1.0, milestones=[6], momentum=0.1).resolved()
    assert momentum_at(cfg, 6) == pytest.approx(0.1 * 10**0.5)  # half-way through a 2-epoch ramp
    assert momentum_at(cfg, 7) == pytest.approx(1.0)


def test_default_milestones():
    assert TrainConfig(epochs=30).resolved().milestones == [15, 22]
    assert TrainConfig(epochs=30, schedule="cosine").resolved().milestones == []


@pytest.mark.parametrize(
    "kw, msg, field",
    [
        (dict(epochs=0), "^epochs must", "epochs"),
        (dict(lr=0.0), "^lr must", "lr"),
        (dict(lam=-1.0), "^lam must", "lam"),
        (dict(lam=float("nan")), "^lam must", "lam"),
        (dict(optimizer="adamw", lam=0.1), "adamw", "lam"),
        (dict(epochs=5, milestones=[7]), "milestone", "milestones"),
    ],
)
def test_bad_settings_are_user_errors(kw, msg, field):
    """Library errors name the library's fields (the CLI shows them as flags: tests/test_cli.py)."""
    with pytest.raises(UserError, match=msg) as e:
        TrainConfig(**kw).resolved().validate()
    assert "--" not in str(e.value) and e.value.field == field


def _run(tmp_path, name, data, interrupt_at=None, resume=False, epochs=3):
    torch.manual_seed(0)
    model = DigitsResNet(channels=8)
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        if interrupt_at is not None and calls["n"] == interrupt_at and torch.is_grad_enabled():
            os.kill(os.getpid(), signal.SIGINT)  # the real Ctrl-C path: the handler sets a flag
        return F.cross_entropy(out, y)

    cfg = TrainConfig(epochs=epochs, lr=0.01, lam=2e-3, milestones=[2], batch_size=32)
    return finetune(
        model,
        data[0],
        data[1],
        torch.rand(1, 1, 8, 8),
        tmp_path / name,
        cfg,
        loss_fn=loss_fn,
        resume=resume,
        progress=False,
    )


@pytest.mark.parametrize("interrupt_at", [5, 10 + 1])  # mid-epoch, and the first step of epoch 2
def test_interrupted_and_resumed_run_is_bitwise_identical(tmp_path, digits_small, interrupt_at):
    full = _run(tmp_path, "full", digits_small)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        _run(tmp_path, "cut", digits_small, interrupt_at=interrupt_at)
    resumed = _run(tmp_path, "cut", digits_small, resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [m["train_loss"] for m in full.metrics] == [m["train_loss"] for m in resumed.metrics]


def test_nan_loss_stops_with_message_and_keeps_checkpoint(tmp_path, digits_small):
    model = DigitsResNet(channels=8)
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        loss = F.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] > 12 and torch.is_grad_enabled() else loss

    cfg = TrainConfig(epochs=3, lr=0.01, lam=1e-3, batch_size=32)
    with pytest.raises(UserError, match=r"loss became nan at epoch 2.*lower lr"):
        finetune(model, *digits_small, torch.rand(1, 1, 8, 8), tmp_path / "r", cfg, loss_fn=loss_fn, progress=False)
    assert (tmp_path / "r" / "checkpoint.safetensors").is_file()
    from compress.train.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "r" / "checkpoint.safetensors")["info"]["epoch"] == 1
    # --resume from the kept checkpoint, with a lower learning rate, finishes the run
    res = finetune(
        DigitsResNet(channels=8),
        *digits_small,
        torch.rand(1, 1, 8, 8),
        tmp_path / "r",
        resume=True,
        resume_lr=0.005,
        progress=False,
    )
    assert [m["epoch"] for m in res.metrics] == [1, 2, 3]
    assert [m["lr"] for m in res.metrics][1:] == pytest.approx([0.0005, 0.00005])  # new base lr, milestones 1, 2


def test_existing_output_dir_is_refused_and_untouched(tmp_path, digits_small):
    out = tmp_path / "r"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="already exists; use force") as e:
        finetune(
            DigitsResNet(channels=8), *digits_small, torch.rand(1, 1, 8, 8), out, TrainConfig(epochs=1), progress=False
        )
    assert e.value.field == "force"
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


# The nine optimizers (RAMDA twice: parameter and preconditioned regularisation space). From the same random
# DigitsResNet(channels=8), 3 epochs of 6 steps, λ = 1e-3 and a learning rate that trains each; measured on
# this subset (full-batch cross-entropy, train-mode BatchNorm): 2.383 before, after: ramda 1.83, ramda-p 1.64,
# rmda 2.07, proxsgd 2.11, proxadam 1.97, asgo 2.08, dasgo 2.06, dsgd 2.12, adamw 1.37.
LEARN = [
    ("ramda", 3e-3, {}),
    ("ramda", 9e-3, {"reg_space": "preconditioned"}),
    ("rmda", 0.1, {}),
    ("proxsgd", 0.1, {}),
    ("proxadam", 3e-3, {}),
    ("asgo", 6e-3, {}),
    ("dasgo", 6e-3, {}),
    ("dsgd", 0.1, {"dsgd_k": 2}),
    ("adamw", 3e-3, {}),
]
LEARN_IDS = [n + ("-precond" if e.get("reg_space") else "") for n, _, e in LEARN]
# A λ large enough that one epoch (6 steps) zeroes groups (measured: 3 to 24 of 24); the preconditioned space
# measures groups in D^{1/2}-scaled units, where the same λ is weaker.
ZERO_LAM = {"param": 0.3, "preconditioned": 1.0}


@pytest.fixture
def no_training_plot(monkeypatch):
    """The per-epoch training.png is ~85% of these short runs' time (matplotlib layout); it is not what they test."""
    import compress.train.plots

    monkeypatch.setattr(compress.train.plots, "plot_training", lambda metrics, path: None)


def _full_batch_loss(model, data):
    """Cross-entropy of the whole training subset in one batch, on a copy (train-mode BatchNorm, no stat update
    on the model under test)."""
    x, y = data.tensors
    with torch.no_grad():
        return float(F.cross_entropy(copy.deepcopy(model).train()(x), y))


def _exactly_zero_groups(model, x):
    """Groups whose every slice (weight rows, biases, BatchNorm γ/β, coupled channels) is exactly 0.0."""
    groups = find_groups(model, x)
    zero = [
        all(bool((t.index_select(s.dim, torch.tensor(s.indices)) == 0).all()) for s, t in zip(g.slices, g.tensors))
        for g in groups
    ]
    return sum(zero), len(groups)


@pytest.mark.parametrize("name, lr, extra", LEARN, ids=LEARN_IDS)
def test_every_optimizer_lowers_the_loss_through_the_loop(tmp_path, digits_small, no_training_plot, name, lr, extra):
    """Each optimizer must learn: below the best constant predictor (the label entropy, ≈ 2.29 here, what a
    model reaches by its biases alone) by a margin, from 2.38. A step that does nothing, has the wrong sign
    or zeroes the network stays above it."""
    tr, te = digits_small
    counts = torch.bincount(tr.tensors[1]).double() / len(tr)
    label_entropy = float(-(counts * counts.log()).nansum())
    torch.manual_seed(0)
    model = DigitsResNet(channels=8)
    before = _full_batch_loss(model, tr)
    cfg = TrainConfig(
        epochs=3, optimizer=name, lr=lr, lam=0.0 if name == "adamw" else 1e-3, batch_size=50, milestones=[], **extra
    )
    res = finetune(model, tr, te, torch.rand(1, 1, 8, 8), tmp_path / "r", cfg, progress=False)
    after = _full_batch_loss(res.model, tr)
    assert before > label_entropy + 0.05 and after < label_entropy - 0.1, (before, label_entropy, after)
    assert len(res.metrics) == 3 and all(math.isfinite(m["train_loss"]) for m in res.metrics)
    assert (tmp_path / "r" / "weights.safetensors").is_file()
    assert (tmp_path / "r" / "dsgd_picks.png").is_file() == (name == "dsgd")


@pytest.mark.parametrize("name, lr, extra", LEARN, ids=LEARN_IDS)
def test_structured_optimizers_produce_exact_zero_groups(tmp_path, digits_small, no_training_plot, name, lr, extra):
    """With a large λ the prox sets whole groups to exactly 0.0 (not merely small), and the run's reported group
    sparsity is that count; AdamW (dense) leaves every group alive."""
    lam = 0.0 if name == "adamw" else ZERO_LAM[extra.get("reg_space", "param")]
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=1, optimizer=name, lr=lr, lam=lam, batch_size=50, milestones=[], **extra)
    res = finetune(DigitsResNet(channels=8), *digits_small, torch.rand(1, 1, 8, 8), tmp_path / "r", cfg, progress=False)
    zero, total = _exactly_zero_groups(res.model, torch.rand(1, 1, 8, 8))
    assert total == 24
    if name == "adamw":
        assert zero == 0
    else:
        assert zero >= 1, name
    assert res.metrics[-1]["group_sparsity"] == pytest.approx(zero / total)
