"""Distillation from the starting model: the losses against a by-hand transcription, the teacher
frozen at the init weights, exact resume and reproducibility, settings validated."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

from compress.errors import TrainingInterrupted, UserError
from compress.models.digits import DigitsResNet
from compress.train import distill as distill_mod
from compress.train.checkpoint import load_weights
from compress.train.config import TrainConfig
from compress.train.distill import distill_loss
from compress.train.loop import finetune


@pytest.fixture(autouse=True)
def no_training_plot(monkeypatch):
    """The per-epoch training.png dominates these short runs; it is not what they test."""
    import compress.train.plots

    monkeypatch.setattr(compress.train.plots, "plot_training", lambda metrics, path: None)


def _kl_by_hand(s, t, T):
    """Σ_rows Σ_c q_c (log q_c − log p_c) / rows · T², with softmaxes written out, in float64 Python."""
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        zs = [v / T for v in srow]
        zt = [v / T for v in trow]
        ls = math.log(sum(math.exp(v) for v in zs))
        lt = math.log(sum(math.exp(v) for v in zt))
        for a, b in zip(zs, zt):
            q = math.exp(b - lt)
            total += q * ((b - lt) - (a - ls))
    return total / len(s) * T * T


def test_losses_match_a_transcription_by_hand():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7) * 3, torch.randn(5, 7) * 3
    for T in (1.0, 4.0):
        assert float(distill_loss("kl", s, t, T)) == pytest.approx(_kl_by_hand(s, t, T), rel=1e-5)
    cos = (
        sum(
            1 - sum(a * b for a, b in zip(x, y)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in y))
            for x, y in zip(s.tolist(), t.tolist())
        )
        / 5
    )
    assert float(distill_loss("cosine", s, t, 1.0)) == pytest.approx(cos, rel=1e-5)
    mse = sum((a - b) ** 2 for x, y in zip(s.tolist(), t.tolist()) for a, b in zip(x, y)) / 35
    assert float(distill_loss("mse", s, t, 1.0)) == pytest.approx(mse, rel=1e-5)
    assert float(distill_loss("kl", t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)  # the teacher itself: no loss


def _run(tmp_path, name, data, interrupt_at=None, resume=False, **kw):
    torch.manual_seed(0)
    model = DigitsResNet(channels=8)
    calls = {"n": 0}

    def loss_fn(out, y):
        calls["n"] += 1
        if interrupt_at is not None and calls["n"] == interrupt_at and torch.is_grad_enabled():
            os.kill(os.getpid(), signal.SIGINT)
        return F.cross_entropy(out, y)

    cfg = TrainConfig(
        epochs=3, lr=0.01, lam=2e-3, milestones=[2], batch_size=32, **{"distill": "kl", "distill_alpha": 0.5, **kw}
    )
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


def _same(a, b) -> bool:
    a, b = a.model.state_dict(), b.model.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_distilled_run_reproduces_and_resumes_bit_for_bit(tmp_path, digits_small):
    full = _run(tmp_path, "full", digits_small)
    again = _run(tmp_path, "again", digits_small)
    assert _same(full, again)
    with pytest.raises(TrainingInterrupted):
        _run(tmp_path, "cut", digits_small, interrupt_at=5)
    resumed = _run(tmp_path, "cut", digits_small, resume=True)  # the teacher comes back from init.safetensors
    assert _same(full, resumed)
    assert [m["train_loss"] for m in full.metrics] == [m["train_loss"] for m in resumed.metrics]
    plain = _run(tmp_path, "plain", digits_small, distill="none")
    assert not _same(full, plain)  # the distillation term did change the training


def test_teacher_is_the_start_and_never_updated(tmp_path, digits_small, monkeypatch):
    teachers = []
    real = distill_mod.make_teacher

    def recording(model, init_weights):
        teachers.append(real(model, init_weights))
        return teachers[-1]

    monkeypatch.setattr(distill_mod, "make_teacher", recording)
    res = _run(tmp_path, "r", digits_small, distill_alpha=1.0)
    (teacher,) = teachers
    init = load_weights(tmp_path / "r" / "init.safetensors")
    sd = teacher.state_dict()
    assert all(torch.equal(sd[k].cpu(), init[k]) for k in init)  # BatchNorm statistics included
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    trained = res.model.state_dict()
    assert any(not torch.equal(trained[k].cpu(), init[k]) for k in init)  # the student did move


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(distill="kd"), "distill"),
        (dict(distill_temperature=0.0), "distill_temperature"),
        (dict(distill_alpha=1.5), "distill_alpha"),
    ],
)
def test_bad_distill_settings_name_their_field(kw, field):
    with pytest.raises(UserError) as e:
        TrainConfig(**kw).resolved().validate()
    assert e.value.field == field and "--" not in str(e.value)


def test_request_carries_the_distill_settings(tmp_path):
    from compress.request import FinetuneOptions, build_request

    req = build_request(FinetuneOptions(out=tmp_path / "r", target_flops=0.5, distill="kl", distill_temperature=2.0))
    assert (req.train.distill, req.train.distill_temperature, req.train.distill_alpha) == ("kl", 2.0, 0.9)
    with pytest.raises(UserError) as e:
        build_request(FinetuneOptions(out=tmp_path / "r2", distill="soft"))
    assert e.value.field == "distill"


def test_cli_names_the_distill_flags(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(
        [sys.executable, "-m", "compress", "finetune", "--distill", "kd", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )
    assert res.returncode == 2 and "--distill" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "r").exists()
