"""The fine-tuning loop: group-sparse training with a step schedule whose decays are restarts.

Plain PyTorch (no framework): the data order of epoch e is a permutation seeded by
(seed, e), so a run interrupted anywhere — between epochs or mid-epoch by Ctrl-C — and
resumed from its checkpoint ends with bitwise-identical weights on CPU."""
from __future__ import annotations

import dataclasses
import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from compress.errors import NonFiniteLoss, TrainingInterrupted, UserError
from compress.files import atomic_write_json, atomic_write_text
from compress.runs import RUN_FILES, prepare_run_dir
from compress.train import checkpoint as ckpt
from compress.train.checkpoint import rng_state, save_weights, set_rng_state
from compress.train.config import TrainConfig, lr_at, momentum_at, resolve_device
from compress.train.data import (
    call_model,
    iter_batches,
    num_batches,
    split_batch,
    to_device,
)
from compress.train.evaluate import _KeepBatchNormStats, evaluate, recalibrate_batchnorm


@dataclass
class RunResult:
    out: Path
    metrics: list[dict] = field(default_factory=list)
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    groups: list | None = None


def make_optimizer(cfg: TrainConfig, model, groups):
    from compress.optim import make_optimizer as _make

    params = [p for p in model.parameters() if p.requires_grad]
    kw = {}
    if cfg.optimizer in ("ramda", "rmda"):  # ProxSGD's momentum is a different quantity (averaging μ, default 0.9)
        kw["momentum"] = cfg.momentum
    if cfg.optimizer == "ramda":
        kw["solver"] = cfg.solver
        kw["eps_restart_factor"] = cfg.eps_restart_factor
    if cfg.optimizer in ("ramda", "proxadam") and cfg.reg_space != "param":
        kw["reg_space"] = cfg.reg_space
    if cfg.optimizer == "dsgd":
        from compress.optim.dsgd import model_layers

        kw["k"] = cfg.dsgd_k
        kw["layers"], kw["layer_names"] = model_layers(model, groups)
    if cfg.optimizer == "adamw":
        kw["weight_decay"] = cfg.weight_decay
    try:
        return _make(cfg.optimizer, params, groups=groups, lr=cfg.lr, lam=cfg.lam, **kw)
    except ValueError as e:
        raise UserError(str(e)) from e


def _sparsity(opt, groups) -> tuple[float, float]:
    if hasattr(opt, "group_sparsity"):
        return tuple(float(v) for v in opt.group_sparsity())
    from compress.structure.sparsity import group_sparsity

    return tuple(float(v) for v in group_sparsity(groups))


class _StructuredPoint:
    """`with _StructuredPoint(opt):` evaluates the point that will be exported (Ŵ)."""

    def __init__(self, opt):
        self.cm = opt.structured_point() if hasattr(opt, "structured_point") else None

    def __enter__(self):
        if self.cm is not None:
            self.cm.__enter__()

    def __exit__(self, *exc):
        if self.cm is not None:
            return self.cm.__exit__(*exc)
        return False


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

    from compress.structure.find import find_groups
    from compress.structure.group import load_groups, save_groups
    from compress.train.distributed import DistContext

    console = console or Console()
    out = Path(out)
    # a wrapper model may bring its task's loss (compress.models.hf: distillation for embeddings)
    loss_fn = loss_fn or getattr(model, "compress_loss", None) or F.cross_entropy

    if resume:
        cfg_path = out / RUN_FILES["config"]
        if not cfg_path.is_file():
            raise UserError(f"{out} is not a run directory (no {RUN_FILES['config']}); nothing to resume")
        saved = json.loads(cfg_path.read_text())
        cfg = TrainConfig(**saved["train"])
        state = ckpt.load_checkpoint(out / RUN_FILES["checkpoint"])
        if resume_lr is not None:  # e.g. after a NaN loss: continue with a lower learning rate
            cfg.lr = resume_lr
            cfg.validate()
            saved["train"]["lr"] = resume_lr
            atomic_write_json(cfg_path, saved)
        if state["info"].get("status") == "done":
            raise UserError(f"run {out} already finished; start a new run with --init {out / RUN_FILES['weights']}")
    else:
        cfg = (config or TrainConfig()).resolved()
        state = None
    cfg.validate()

    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ctx = dist_ctx or DistContext.from_env(device.type)
    if ctx.enabled and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    main = ctx.is_main
    if not main:
        console, progress = Console(quiet=True), False
    if not resume and main:
        prepare_run_dir(out, force)
    ctx.barrier()
    torch.manual_seed(cfg.seed)
    if init_weights is not None and not resume:
        ckpt.load_into(model, init_weights, "--init weights")
    model.to(device)
    example = to_device(example_inputs, device)

    if resume:
        groups = load_groups(out / RUN_FILES["groups"], model)
    elif groups is None:
        groups = find_groups(model, example, weight=cfg.group_weight)
    opt = (build_optimizer or make_optimizer)(cfg, model, groups) if resume else make_optimizer(cfg, model, groups)

    if not resume and main:
        wrapper = {"wrapper": model.compress_config()} if hasattr(model, "compress_config") else {}
        atomic_write_json(out / RUN_FILES["config"], {"train": dataclasses.asdict(cfg), **wrapper, **(run_info or {})})
        save_groups(out / RUN_FILES["groups"], groups)
        save_weights(out / RUN_FILES["init"], model)
    if not resume:
        start_epoch, start_batch, metrics, carry = 0, 0, [], {"loss_sum": 0.0, "seen": 0}
        init_eval = evaluate(model, eval_data, device, loss_fn=loss_fn)
        run_meta = {"init_accuracy": init_eval["accuracy"]}
    else:
        ckpt.load_into(model, {k: v.to(device) for k, v in state["model"].items()}, "checkpoint")
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        info = state["info"]
        start_epoch, start_batch = info["epoch"], info["batch"]
        carry = {"loss_sum": info["loss_sum"], "seen": info["seen"]}
        metrics = [json.loads(line) for line in (out / RUN_FILES["metrics"]).read_text().splitlines() if line.strip()] \
            if (out / RUN_FILES["metrics"]).is_file() else []
        metrics = [m for m in metrics if m["epoch"] <= start_epoch]
        run_meta = info.get("run_meta", {})
        for key in ("lam",):
            if key in info:
                for g in opt.param_groups:
                    g[key] = info[key]
        console.print(f"[bold]resuming[/] {out} at epoch {start_epoch + 1}, batch {start_batch}")

    def save(epoch, batch, status="running"):
        if not main:
            return
        info = {"epoch": epoch, "batch": batch, "status": status, **carry, "run_meta": run_meta,
                "lam": opt.param_groups[0].get("lam", 0.0)}
        ckpt.save_checkpoint(out / RUN_FILES["checkpoint"], model, opt, info, rng_state())

    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        interrupted["flag"] = True

    old_handler = None
    try:
        old_handler = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        pass

    net = ctx.wrap(model, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    n_batches = num_batches(train_data, cfg.batch_size)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TextColumn("ETA"),
                   TimeRemainingColumn(), console=console, disable=not progress, transient=True)
    total_steps = cfg.epochs * n_batches
    try:
        with bar:
            task = bar.add_task("fine-tuning", total=total_steps, completed=start_epoch * n_batches + start_batch, loss=float("nan"))
            for epoch in range(start_epoch, cfg.epochs):
                t0 = time.perf_counter()
                lr = lr_at(cfg, epoch)
                for g in opt.param_groups:
                    g["lr"] = lr
                if start_batch == 0:
                    if epoch in cfg.milestones and hasattr(opt, "restart"):
                        opt.restart()
                    carry = {"loss_sum": 0.0, "seen": 0}
                if hasattr(opt, "set_momentum") and cfg.optimizer in ("ramda", "rmda"):
                    opt.set_momentum(momentum_at(cfg, epoch))
                model.train()
                shard = ctx.shard if ctx.enabled else None
                for i, batch in iter_batches(train_data, epoch, cfg.seed, cfg.batch_size, skip=start_batch, shard=shard):
                    x, y = split_batch(batch)
                    x, y = to_device(x, device), to_device(y, device)
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss = loss_fn(call_model(net, x), y)
                    stop, bad = ctx.any(interrupted["flag"], not torch.isfinite(loss), device=device)
                    interrupted["flag"] = stop
                    if bad:
                        raise NonFiniteLoss(
                            f"loss became {float(loss.detach())} at epoch {epoch + 1}, step {i + 1}; the last good checkpoint "
                            f"({out / RUN_FILES['checkpoint']}) is kept: lower --lr (now {cfg.lr:g}) and start again, "
                            f"or resume with --resume {out}")
                    opt.zero_grad(set_to_none=True)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
                    else:
                        loss.backward()
                        opt.step()
                    for cb in step_callbacks:
                        cb(opt)
                    carry["loss_sum"] += float(loss.detach()) * len(y)
                    carry["seen"] += len(y)
                    bar.update(task, advance=1, loss=carry["loss_sum"] / carry["seen"])
                    if interrupted["flag"]:
                        save(epoch, i + 1)
                        raise TrainingInterrupted(f"interrupted at epoch {epoch + 1}, step {i + 1}; "
                                                  f"continue with: compress finetune --resume {out}")
                start_batch = 0
                with _StructuredPoint(opt), _KeepBatchNormStats(model):
                    recalibrate_batchnorm(model, train_data, device)
                    ev = evaluate(model, eval_data, device, loss_fn=loss_fn)
                    sp, wsp = _sparsity(opt, groups)
                m = {"epoch": epoch + 1, "train_loss": carry["loss_sum"] / max(carry["seen"], 1),
                     "eval_loss": ev["loss"], "accuracy": ev["accuracy"], "group_sparsity": sp,
                     "weighted_group_sparsity": wsp, "lr": float(opt.param_groups[0]["lr"]),  # the last step's
                     "lam": float(opt.param_groups[0].get("lam", 0.0)),
                     "momentum": momentum_at(cfg, epoch) if hasattr(opt, "set_momentum") and cfg.optimizer in ("ramda", "rmda")
                     else None,
                     "seconds": time.perf_counter() - t0}
                cb_state = {"epoch": epoch, "optimizer": opt, "model": model, "groups": groups, "metrics": m,
                            "config": cfg}
                for cb in epoch_callbacks:
                    extra = cb(cb_state)
                    if extra:
                        m.update(extra)
                opt = cb_state["optimizer"]  # a callback may hand over a new optimizer (see the docstring)
                metrics.append(m)
                save(epoch + 1, 0, "done" if epoch + 1 == cfg.epochs else "running")
                if main:
                    atomic_write_text(out / RUN_FILES["metrics"], "".join(json.dumps(r) + "\n" for r in metrics))
                    from compress.train.plots import plot_training

                    plot_training(metrics, out / RUN_FILES["plot"])
                console.print(
                    f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {m['train_loss']:.4f}  acc {100 * m['accuracy']:6.2f}%  "
                    f"groups zero {100 * sp:5.1f}% (weighted {100 * wsp:5.1f}%)  lr {m['lr']:.3g}"
                    + (f"  λ {m['lam']:.3g}" if m["lam"] else "") + f"  [{m['seconds']:.1f}s]", soft_wrap=True)
                if interrupted["flag"]:
                    raise TrainingInterrupted(f"interrupted after epoch {epoch + 1}; "
                                              f"continue with: compress finetune --resume {out}")
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)

    # The exported point is the structured one: make it the model's weights.
    if hasattr(opt, "commit_structured_point"):
        opt.commit_structured_point()
        recalibrate_batchnorm(model, train_data, device)
    if main:
        save_weights(out / RUN_FILES["weights"], model)
        if hasattr(opt, "layer_picks"):  # DSGD: which layers it chose to update
            from compress.optim.dsgd import plot_layer_picks

            plot_layer_picks(opt, out / "dsgd_picks.png")
    ctx.barrier()
    return RunResult(out=out, metrics=metrics, model=model, optimizer=opt, groups=groups)
