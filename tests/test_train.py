"""Training loop: schedule, exact resume after an interruption, validation of settings."""
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from compress.errors import TrainingInterrupted, UserError
from compress.models.digits import DigitsResNet
from compress.train.config import TrainConfig, lr_at, momentum_at
from compress.train.loop import finetune


def test_step_schedule_and_momentum_ramp_by_hand():
    cfg = TrainConfig(epochs=8, lr=0.1, milestones=[4, 6], gamma=0.1, momentum=0.25).resolved()
    assert [lr_at(cfg, e) for e in range(8)] == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)
    # before the last milestone c = c0; then a geometric ramp 0.25 → 1 over (8-6)//2 = 1 epoch
    assert [momentum_at(cfg, e) for e in range(8)] == pytest.approx([0.25] * 6 + [1.0, 1.0])
    cfg = TrainConfig(epochs=10, lr=1.0, milestones=[6], momentum=0.1).resolved()
    assert momentum_at(cfg, 6) == pytest.approx(0.1 * 10 ** 0.5)  # half-way through a 2-epoch ramp
    assert momentum_at(cfg, 7) == pytest.approx(1.0)


def test_default_milestones():
    assert TrainConfig(epochs=30).resolved().milestones == [15, 22]
    assert TrainConfig(epochs=30, schedule="cosine").resolved().milestones == []


@pytest.mark.parametrize("kw, msg, field", [
    (dict(epochs=0), "^epochs must", "epochs"), (dict(lr=0.0), "^lr must", "lr"), (dict(lam=-1.0), "^lam must", "lam"),
    (dict(lam=float("nan")), "^lam must", "lam"), (dict(optimizer="adamw", lam=0.1), "adamw", "lam"),
    (dict(epochs=5, milestones=[7]), "milestone", "milestones"),
])
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
    return finetune(model, data[0], data[1], torch.rand(1, 1, 8, 8), tmp_path / name, cfg,
                    loss_fn=loss_fn, resume=resume, progress=False)


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
    res = finetune(DigitsResNet(channels=8), *digits_small, torch.rand(1, 1, 8, 8), tmp_path / "r", resume=True,
                   resume_lr=0.005, progress=False)
    assert [m["epoch"] for m in res.metrics] == [1, 2, 3]
    assert [m["lr"] for m in res.metrics][1:] == pytest.approx([0.0005, 0.00005])  # new base lr, milestones 1, 2


def test_existing_output_dir_is_refused_and_untouched(tmp_path, digits_small):
    out = tmp_path / "r"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(UserError, match="already exists; use force") as e:
        finetune(DigitsResNet(channels=8), *digits_small, torch.rand(1, 1, 8, 8), out, TrainConfig(epochs=1),
                 progress=False)
    assert e.value.field == "force"
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("name, extra", [("ramda", {}), ("ramda", {"reg_space": "preconditioned"}), ("rmda", {}),
                                         ("proxsgd", {}), ("proxadam", {}), ("asgo", {}), ("dasgo", {}),
                                         ("dsgd", {"dsgd_k": 2}), ("adamw", {"lam": 0.0})])
def test_every_optimizer_trains_through_the_loop(tmp_path, digits_small, name, extra):
    cfg = TrainConfig(epochs=2, optimizer=name, batch_size=100, **{"lam": 0.05, **extra})
    res = finetune(DigitsResNet(channels=8), *digits_small, torch.rand(1, 1, 8, 8), tmp_path / "r", cfg, progress=False)
    assert len(res.metrics) == 2 and all(math.isfinite(m["train_loss"]) for m in res.metrics)
    assert (tmp_path / "r" / "weights.safetensors").is_file()
    assert (tmp_path / "r" / "dsgd_picks.png").is_file() == (name == "dsgd")
