"""The fine-tuning loop: group-sparse training with a step schedule whose decays are restarts.

Plain PyTorch (no framework): the data order of epoch e is a permutation seeded by
(seed, e), so a run interrupted anywhere — between epochs or mid-epoch by Ctrl-C — and
resumed from its checkpoint ends with bitwise-identical weights on CPU."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.errors import UserError
from compress.files import atomic_write_json
from compress.optim.interface import as_structured
from compress.runs import RUN_FILES, prepare_run_dir, read_config, read_metrics, write_config
from compress.train import checkpoint as ckpt
from compress.train.checkpoint import save_weights, set_rng_state
from compress.train.config import TrainConfig, resolve_device
from compress.train.data import call_model, to_device
from compress.train.epoch import Run, train_epochs
from compress.train.evaluate import evaluate, recalibrate_batchnorm


@dataclass
class RunResult:
    out: Path
    metrics: list[dict] = field(default_factory=list)
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    groups: list | None = None


def make_optimizer(cfg: TrainConfig, model, groups):
    """The optimizer `cfg` names (compress.optim.registry), its argument errors as UserError."""
    from compress.optim.registry import optimizer_for_config

    try:
        return optimizer_for_config(cfg, model, groups)
    except ValueError as e:
        raise UserError(str(e)) from e


def finetune(
    model: torch.nn.Module,
    train_data,
    eval_data,
    example_inputs,
    out: str | Path,
    config: TrainConfig | None = None,
    *,
    groups=None,
    init_weights: dict[str, torch.Tensor] | None = None,
    run_info: dict | None = None,
    resume: bool = False,
    resume_lr: float | None = None,
    resume_epochs: int | None = None,
    force: bool = False,
    loss_fn: Callable | None = None,
    epoch_callbacks: list[Callable] = (),
    step_callbacks: list[Callable] = (),
    build_optimizer: Callable | None = None,
    console=None,
    progress: bool = True,
    dist_ctx=None,
) -> RunResult:
    """Group-sparse fine-tuning of `model`, writing a run directory `out`.

    `groups`: from `compress.find_groups` (found here when None). `init_weights`: the
    dense starting point (also saved as init.safetensors so export can report the
    accuracy fine-tuning started from). `run_info`: extra JSON for config.json (the CLI
    stores the model and data spec there so `compress export RUN` can rebuild the model).
    `epoch_callbacks`: f(state: dict) called after each epoch with the optimizer, metrics
    and config — the budget controller adjusts λ through it; a callback may put a new optimizer
    in state["optimizer"], which trains from the next epoch on and is checkpointed (a budget run's
    final phase switches to AdamW so). `build_optimizer`: f(cfg, model, groups) → the optimizer
    whose state a resumed checkpoint holds (default `make_optimizer`). `step_callbacks`: f(optimizer)
    after every optimizer step (e.g. keeping removed groups exactly zero). Under torchrun the run is
    data-parallel (see compress.distributed); only rank 0 writes files and prints.
    """
    from rich.console import Console

    out = Path(out)
    cfg, state = _config(out, config, resume, resume_lr, resume_epochs)
    device, ctx, console, progress = _context(cfg, dist_ctx, console or Console(), progress)
    run = Run(
        out=out,
        cfg=cfg,
        model=model,
        device=device,
        ctx=ctx,
        console=console,
        progress=progress,
        loss_fn=_task_loss(model, loss_fn),
        train_data=train_data,
        eval_data=eval_data,
        epoch_callbacks=list(epoch_callbacks),
        step_callbacks=list(step_callbacks),
    )
    _start(run, example_inputs, groups, init_weights, run_info, state, force, build_optimizer)
    with _catch_sigint(run):
        train_epochs(run)
    _finish(run)
    return RunResult(out=out, metrics=run.metrics, model=model, optimizer=run.opt, groups=run.groups)


def _config(
    out: Path, config: TrainConfig | None, resume: bool, resume_lr: float | None, resume_epochs: int | None = None
):
    """(the run's validated TrainConfig, the checkpoint to resume from or None). `resume_epochs` extends
    (or shortens) a resumed run, a finished one too: see `_extended`."""
    if not resume:
        cfg = (config or TrainConfig()).resolved()
        cfg.validate()
        return cfg, None
    saved = read_config(out, "nothing to resume")
    cfg = TrainConfig(**saved["train"])
    state = ckpt.load_checkpoint(out / RUN_FILES["checkpoint"])
    if resume_lr is not None:  # e.g. after a NaN loss: continue with a lower learning rate
        cfg.lr = resume_lr
        cfg.validate()
        saved["train"]["lr"] = resume_lr
        atomic_write_json(out / RUN_FILES["config"], saved)
    if resume_epochs is not None:
        _extended(cfg, saved, state["info"], resume_epochs, out)
        atomic_write_json(out / RUN_FILES["config"], saved)
    if state["info"].get("status") == "done":
        raise UserError(
            f"run {out} already finished; make it longer with `resume` {out} and more `epochs`, or "
            f"start a new run with `init` {out / RUN_FILES['weights']}",
            fields=("init", "resume", "epochs"),
        )
    cfg.validate()
    return cfg, state


def _extended(cfg: TrainConfig, saved: dict, info: dict, epochs: int, out: Path) -> None:
    """`epochs` in place of the saved number. The schedule is a function of the epoch and `epochs`: the
    step schedule keeps its milestones (the lr stays at its last value, RAMDA does not restart) and the
    averaging-weight ramp after the last milestone spans the new length; the cosine schedule is
    stretched over the new length (a finished run's lr rises again to its value at the old end)."""
    if epochs <= info["epoch"]:
        raise UserError(
            f"run {out} has trained {info['epoch']} epochs; `epochs` must be more than that, got {epochs}",
            field="epochs",
        )
    cfg.epochs = saved["train"]["epochs"] = epochs
    if info.get("status") == "done":
        info["status"] = "running"


def _context(cfg: TrainConfig, dist_ctx, console, progress: bool):
    """(device, distributed context, console, progress) of this process; other ranks than 0 stay quiet."""
    from rich.console import Console

    from compress.train.distributed import DistContext

    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = dist_ctx or DistContext.from_env(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not ctx.is_main:
        console, progress = Console(quiet=True), False
    return device, ctx, console, progress


def _start(run: Run, example_inputs, groups, init_weights, run_info, state, force: bool, build_optimizer) -> None:
    """Seed, place the model, find or load the groups, build the optimizer; a new run writes its
    config, groups and starting weights, a resumed one loads its checkpoint."""
    from compress.structure.find import find_groups
    from compress.structure.group import load_groups, save_groups

    resume, cfg, out, model = state is not None, run.cfg, run.out, run.model
    if not resume and run.main:
        prepare_run_dir(out, force)
    run.ctx.barrier()
    torch.manual_seed(cfg.seed)
    if init_weights is not None and not resume:
        ckpt.load_into(model, init_weights, "the init weights")
    model.to(run.device)
    example = to_device(example_inputs, run.device)
    if resume:
        groups = load_groups(out / RUN_FILES["groups"], model)
    elif groups is None:
        groups = find_groups(model, example, weight=cfg.group_weight)
    run.groups = groups
    run.opt = (build_optimizer or make_optimizer)(cfg, model, groups) if resume else make_optimizer(cfg, model, groups)
    if resume:
        _restore(run, state)
        _distiller(run, ckpt.load_weights(out / RUN_FILES["init"]))
        return
    _distiller(run, model.state_dict())
    if run.main:
        wrapper = {"wrapper": model.compress_config()} if hasattr(model, "compress_config") else {}
        write_config(out, cfg, {**wrapper, **(run_info or {})})
        save_groups(out / RUN_FILES["groups"], groups)
        save_weights(out / RUN_FILES["init"], model)
    run.run_meta = {"init_accuracy": evaluate(model, run.eval_data, run.device, loss_fn=run.loss_fn)["accuracy"]}


def _task_loss(model: torch.nn.Module, loss_fn: Callable | None) -> Callable:
    """A wrapper model may bring its task's loss (compress.models.hf: distillation for embeddings)."""
    return loss_fn or getattr(model, "compress_loss", None) or F.cross_entropy


def _distiller(run: Run, init_weights: dict) -> None:
    """The distillation loss of `cfg.distill` (none: the task loss alone). The teacher is the starting
    model: the weights init.safetensors holds, so a resumed run rebuilds the same teacher."""
    cfg = run.cfg
    if cfg.distill == "none":
        return
    from compress.train.distill import DistillLoss, make_teacher

    teacher = make_teacher(run.model, init_weights)
    run.distill = DistillLoss(
        teacher, run.loss_fn, cfg.distill, cfg.distill_temperature, cfg.distill_alpha, call=call_model
    )


def _restore(run: Run, state: dict) -> None:
    """Model, optimizer, RNG, position and metrics of the checkpoint `state`."""
    out = run.out
    ckpt.load_into(run.model, {k: v.to(run.device) for k, v in state["model"].items()}, "checkpoint")
    run.opt.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    info = state["info"]
    run.start_epoch, run.start_batch = info["epoch"], info["batch"]
    run.carry = {"loss_sum": info["loss_sum"], "seen": info["seen"]}
    run.metrics = [m for m in read_metrics(out) if m["epoch"] <= run.start_epoch]
    run.run_meta = info.get("run_meta", {})
    if "lam" in info:
        for g in run.opt.param_groups:
            g["lam"] = info["lam"]
    run.console.print(f"[bold]resuming[/] {out} at epoch {run.start_epoch + 1}, batch {run.start_batch}")


@contextlib.contextmanager
def _catch_sigint(run: Run):
    """Ctrl-C sets `run.interrupted`: the loop checkpoints at the end of the step and stops."""

    def on_sigint(signum, frame):
        run.interrupted = True

    old_handler = None
    try:
        old_handler = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        pass
    try:
        yield
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)


def _finish(run: Run) -> None:
    """The exported point is the structured one: make it the model's weights, and write them."""
    opt = as_structured(run.opt, run.groups)
    if opt.structured:
        opt.commit_structured_point()
        recalibrate_batchnorm(run.model, run.train_data, run.device)
    if run.main:
        save_weights(run.out / RUN_FILES["weights"], run.model)
        if opt.layer_picks is not None:  # DSGD: which layers it chose to update
            from compress.optim.dsgd import plot_layer_picks

            plot_layer_picks(run.opt, run.out / RUN_FILES["dsgd_picks"])
    run.ctx.barrier()
