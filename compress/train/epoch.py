"""One fine-tuning run's epochs: the steps, the evaluation at the structured point, the
callbacks, the checkpoint and the report of each epoch.

`Run` holds what the epochs share and change (the optimizer a callback may replace, the
position a checkpoint records); compress.train.loop sets it up and finishes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compress.errors import NonFiniteLoss, TrainingInterrupted
from compress.files import atomic_write_text
from compress.optim.interface import as_structured
from compress.runs import RUN_FILES
from compress.train import checkpoint as ckpt
from compress.train.checkpoint import rng_state
from compress.train.config import TrainConfig, lr_at, momentum_at
from compress.train.data import (
    call_model,
    iter_batches,
    num_batches,
    split_batch,
    to_device,
)
from compress.train.evaluate import _KeepBatchNormStats, evaluate, recalibrate_batchnorm


@dataclass
class Run:
    """The state of one fine-tuning run, shared by its epochs."""

    out: Path
    cfg: TrainConfig
    model: torch.nn.Module
    device: torch.device
    ctx: object  # compress.train.distributed.DistContext
    console: object
    progress: bool
    loss_fn: Callable
    train_data: object
    eval_data: object
    epoch_callbacks: list = field(default_factory=list)
    step_callbacks: list = field(default_factory=list)
    groups: list | None = None
    opt: torch.optim.Optimizer | None = None
    start_epoch: int = 0
    start_batch: int = 0
    metrics: list = field(default_factory=list)
    carry: dict = field(default_factory=lambda: {"loss_sum": 0.0, "seen": 0})
    run_meta: dict = field(default_factory=dict)
    interrupted: bool = False
    distill: Callable | None = None  # compress.train.distill.DistillLoss: replaces loss_fn in training steps

    @property
    def main(self) -> bool:
        return self.ctx.is_main


def train_epochs(run: Run) -> None:
    """Epochs start_epoch … cfg.epochs − 1 (from start_batch in the first), behind a progress bar."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cfg = run.cfg
    net = run.ctx.wrap(run.model, run.device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    scaler = torch.amp.GradScaler(run.device.type) if cfg.amp == "fp16" else None
    n_batches = num_batches(run.train_data, cfg.batch_size)
    bar = Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=run.console,
        disable=not run.progress,
        transient=True,
    )
    with bar:
        task = bar.add_task(
            "fine-tuning",
            total=cfg.epochs * n_batches,
            completed=run.start_epoch * n_batches + run.start_batch,
            loss=float("nan"),
        )
        for epoch in range(run.start_epoch, cfg.epochs):
            t0 = time.perf_counter()
            _begin_epoch(run, epoch)
            _train_batches(run, net, (amp_dtype, scaler), epoch, lambda loss: bar.update(task, advance=1, loss=loss))
            m = _epoch_metrics(run, epoch, t0)
            _end_epoch(run, epoch, m)


def _begin_epoch(run: Run, epoch: int) -> None:
    """The epoch's lr; at a milestone (not mid-epoch) a new optimizer stage; the averaging weight."""
    cfg, opt = run.cfg, as_structured(run.opt, run.groups)
    lr = lr_at(cfg, epoch)
    for g in run.opt.param_groups:
        g["lr"] = lr
    if run.start_batch == 0:
        if epoch in cfg.milestones:
            opt.restart()
        run.carry = {"loss_sum": 0.0, "seen": 0}
    if opt.momentum_schedule:
        opt.set_momentum(momentum_at(cfg, epoch))


def _train_batches(run: Run, net, amp: tuple, epoch: int, advance: Callable) -> None:
    """The optimizer steps of one epoch; stops every rank together on Ctrl-C or a non-finite loss.
    `amp`: (autocast dtype or None, GradScaler or None), made once per run."""
    cfg, device, carry = run.cfg, run.device, run.carry
    amp_dtype, scaler = amp
    run.model.train()
    shard = run.ctx.shard if run.ctx.enabled else None
    for i, batch in iter_batches(run.train_data, epoch, cfg.seed, cfg.batch_size, skip=run.start_batch, shard=shard):
        x, y = split_batch(batch)
        x, y = to_device(x, device), to_device(y, device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = call_model(net, x)
            loss = run.distill(out, y, x) if run.distill is not None else run.loss_fn(out, y)
        run.interrupted, bad = run.ctx.any(run.interrupted, not torch.isfinite(loss), device=device)
        if bad:
            raise NonFiniteLoss(
                f"loss became {float(loss.detach())} at epoch {epoch + 1}, step {i + 1}; the last good checkpoint "
                f"({run.out / RUN_FILES['checkpoint']}) is kept: lower `lr` (now {cfg.lr:g}) and "
                f"start again, or `resume` {run.out} with a lower `lr`",
                field="lr",
                fields=("resume",),
            )
        _step(run.opt, loss, scaler)
        for cb in run.step_callbacks:
            cb(run.opt)
        carry["loss_sum"] += float(loss.detach()) * len(y)
        carry["seen"] += len(y)
        advance(carry["loss_sum"] / carry["seen"])
        if run.interrupted:
            save_checkpoint(run, epoch, i + 1)
            raise TrainingInterrupted(
                f"interrupted at epoch {epoch + 1}, step {i + 1}; continue with: compress finetune --resume {run.out}"
            )
    run.start_batch = 0


def _step(opt, loss: torch.Tensor, scaler) -> None:
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


def _epoch_metrics(run: Run, epoch: int, t0: float) -> dict:
    """Loss, accuracy and sparsity at the point that will be exported (Ŵ, BatchNorm recalibrated)."""
    opt, model = as_structured(run.opt, run.groups), run.model
    with opt.structured_point(), _KeepBatchNormStats(model):
        recalibrate_batchnorm(model, run.train_data, run.device)
        ev = evaluate(model, run.eval_data, run.device, loss_fn=run.loss_fn)
        sp, wsp = (float(v) for v in opt.group_sparsity())
    carry, pg = run.carry, run.opt.param_groups[0]
    return {
        "epoch": epoch + 1,
        "train_loss": carry["loss_sum"] / max(carry["seen"], 1),
        "eval_loss": ev["loss"],
        "accuracy": ev["accuracy"],
        "group_sparsity": sp,
        "weighted_group_sparsity": wsp,
        "lr": float(pg["lr"]),  # the last step's
        "lam": float(pg.get("lam", 0.0)),
        "momentum": momentum_at(run.cfg, epoch) if opt.momentum_schedule else None,
        "seconds": time.perf_counter() - t0,
    }


def _end_epoch(run: Run, epoch: int, m: dict) -> None:
    """Callbacks (which may hand over a new optimizer), checkpoint, metrics file and plot, one line."""
    cfg = run.cfg
    state = {
        "epoch": epoch,
        "optimizer": run.opt,
        "model": run.model,
        "groups": run.groups,
        "metrics": m,
        "config": cfg,
    }
    for cb in run.epoch_callbacks:
        extra = cb(state)
        if extra:
            m.update(extra)
    run.opt = state["optimizer"]  # trains from the next epoch on (see finetune's docstring)
    run.metrics.append(m)
    save_checkpoint(run, epoch + 1, 0, "done" if epoch + 1 == cfg.epochs else "running")
    if run.main:
        atomic_write_text(run.out / RUN_FILES["metrics"], "".join(json.dumps(r) + "\n" for r in run.metrics))
        from compress.train.plots import plot_training

        plot_training(run.metrics, run.out / RUN_FILES["plot"])
    run.console.print(
        f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {m['train_loss']:.4f}  acc {100 * m['accuracy']:6.2f}%  "
        f"groups zero {100 * m['group_sparsity']:5.1f}% (weighted {100 * m['weighted_group_sparsity']:5.1f}%)  "
        f"lr {m['lr']:.3g}" + (f"  λ {m['lam']:.3g}" if m["lam"] else "") + f"  [{m['seconds']:.1f}s]",
        soft_wrap=True,
    )
    if run.interrupted:
        raise TrainingInterrupted(
            f"interrupted after epoch {epoch + 1}; continue with: compress finetune --resume {run.out}"
        )


def save_checkpoint(run: Run, epoch: int, batch: int, status: str = "running") -> None:
    """The position (epoch, batch), loss sums, λ, RNG, model and optimizer; rank 0 only."""
    if not run.main:
        return
    info = {
        "epoch": epoch,
        "batch": batch,
        "status": status,
        **run.carry,
        "run_meta": run.run_meta,
        "lam": run.opt.param_groups[0].get("lam", 0.0),
    }
    ckpt.save_checkpoint(run.out / RUN_FILES["checkpoint"], run.model, run.opt, info, rng_state())
