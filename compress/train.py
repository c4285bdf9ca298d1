"""The fine-tuning loop: group-sparse training with a step schedule whose decays are restarts.

Plain PyTorch (no framework): the data order of epoch e is a permutation seeded by
(seed, e), so a run interrupted anywhere — between epochs or mid-epoch by Ctrl-C — and
resumed from its checkpoint ends with bitwise-identical weights on CPU.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from .io import UserError, atomic_write_json, atomic_write_text

# Defaults for fine-tuning a trained model. RAMDA's were chosen on digits-resnet from a 99.33% dense
# model (20-30 epochs): lr 1e-2 destroyed it, lr 1e-3 with λ 1e-2 kept 95.6% with 43% of groups zero,
# lr 3e-4 with λ 1.5e-2 kept 99.33% with 45% zero. adamw's is for dense training from scratch.
DEFAULT_LR = {"ramda": 3e-4, "rmda": 1e-2, "proxsgd": 1e-2, "proxadam": 1e-4, "adamw": 3e-3,
              "asgo": 3e-4, "dasgo": 3e-4, "dsgd": 1e-2}
DEFAULT_LAM = 1.5e-2  # prox optimizers; adamw trains dense (λ = 0)

RUN_FILES = {
    "config": "config.json",
    "groups": "groups.json",
    "init": "init.safetensors",
    "checkpoint": "checkpoint.safetensors",
    "weights": "weights.safetensors",
    "metrics": "metrics.jsonl",
    "plot": "training.png",
}


@dataclass
class TrainConfig:
    """Everything that determines a run; saved as config.json and mirrored by the CLI flags."""

    epochs: int = 30
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    lam: float | None = None  # None: DEFAULT_LAM (0 for adamw)
    optimizer: str = "ramda"
    momentum: float = 0.1  # RAMDA/RMDA averaging weight c0; SGD momentum for proxsgd
    batch_size: int = 64
    milestones: list[int] | None = None  # epochs where lr decays (restart); None: half and 3/4
    gamma: float = 0.1
    schedule: str = "step"  # step | cosine (cosine: no restarts, for dense training)
    weight_decay: float = 0.0
    group_weight: str = "size"  # size (√entries) | flops (∝ FLOPs saved) | unit; "sqrt" = size (old configs)
    solver: str = "exact"
    eps_restart_factor: float = 1.0
    reg_space: str = "param"  # param | preconditioned (ramda, proxadam: group lasso on z = D^{1/2} W)
    dsgd_k: int = 1  # dsgd: layers updated per step
    seed: int = 0
    device: str = "auto"
    amp: str = "none"  # none | bf16 | fp16 (autocast; optimizer state and prox math stay float32)
    threads: int | None = None  # CPU threads for torch (None: torch's default)

    def resolved(self) -> "TrainConfig":
        c = dataclasses.replace(self)
        if c.lr is None:
            c.lr = DEFAULT_LR.get(c.optimizer, 1e-3)
        if c.lam is None:
            c.lam = 0.0 if c.optimizer == "adamw" else DEFAULT_LAM
        if c.milestones is None:
            c.milestones = [] if c.schedule == "cosine" else sorted({c.epochs // 2, (3 * c.epochs) // 4} - {0})
        return c

    def validate(self) -> None:
        if self.epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.lam is not None and (not self.lam >= 0 or math.isinf(self.lam)):
            raise UserError(f"--lam must be a finite number ≥ 0, got {self.lam}")
        if self.batch_size <= 0:
            raise UserError(f"--batch-size must be positive, got {self.batch_size}")
        if not 0 < self.momentum <= 1 and self.optimizer in ("ramda", "rmda"):
            raise UserError(f"--momentum must be in (0, 1] for {self.optimizer}, got {self.momentum}")
        if self.schedule not in ("step", "cosine"):
            raise UserError(f"--schedule must be step or cosine, got {self.schedule!r}")
        if self.threads is not None and self.threads <= 0:
            raise UserError(f"--threads must be positive, got {self.threads}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise UserError(f"--amp must be none, bf16 or fp16, got {self.amp!r}")
        if self.optimizer == "adamw" and (self.lam or 0) > 0:
            raise UserError("adamw trains dense models: use --lam 0, or choose --optimizer "
                            "ramda|rmda|proxsgd|proxadam|asgo|dasgo|dsgd")
        if self.reg_space not in ("param", "preconditioned"):
            raise UserError(f"--reg-space must be param or preconditioned, got {self.reg_space!r}")
        if self.reg_space == "preconditioned" and self.optimizer not in ("ramda", "proxadam"):
            raise UserError("--reg-space preconditioned applies to ramda and proxadam only")
        from .groups import GROUP_WEIGHTS

        if self.group_weight not in GROUP_WEIGHTS:
            raise UserError(f"--group-weight must be size or flops (or unit), got {self.group_weight!r}")
        if self.dsgd_k < 1:
            raise UserError(f"--dsgd-k must be ≥ 1, got {self.dsgd_k}")
        for m in self.milestones or []:
            if not 0 < m < self.epochs:
                raise UserError(f"milestone {m} is outside 1..{self.epochs - 1}")


@dataclass
class RunResult:
    out: Path
    metrics: list[dict] = field(default_factory=list)
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    groups: list | None = None


class TrainingInterrupted(Exception):
    """Ctrl-C: a resumable checkpoint was written."""


class NonFiniteLoss(UserError):
    """The loss became NaN/Inf: the last good checkpoint is kept."""


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    return cfg.lr * cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)


def momentum_at(cfg: TrainConfig, epoch: int) -> float:
    """RAMDA's averaging weight c: c0 until the last milestone, then a ramp to 1.

    The paper raises c = min(c0·√k, 1) once per epoch in the final stage, which needs
    1/c0² epochs to reach 1; for short fine-tuning runs we ramp geometrically from c0
    to 1 over the first half of the final stage, so the last epochs train W = Ŵ and the
    BatchNorm statistics match the exported (structured) point.
    """
    c0 = cfg.momentum
    start = max(cfg.milestones) if cfg.milestones else 0
    if epoch < start or c0 >= 1:
        return c0
    span = max(1, (cfg.epochs - start) // 2)
    k = epoch - start + 1
    return min(1.0, c0 * (1.0 / c0) ** (k / span))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no GPU; use --device cpu or auto")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def _to(x, device):
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def _forward(model, x):
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def _split_batch(batch):
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise UserError("each data item must be an (inputs, target) pair")


def _batches(data, epoch: int, seed: int, batch_size: int, skip: int = 0, shard=None):
    """Yield (index, batch). Datasets get a permutation seeded by (seed, epoch): resumable exactly.

    `shard` picks this process's share of each global batch (data-parallel training).
    """
    if isinstance(data, torch.utils.data.DataLoader):
        for i, b in enumerate(data):
            if i >= skip:
                yield i, b
        return
    n = len(data)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    starts = range(0, n, batch_size)
    tensor_ds = isinstance(data, torch.utils.data.TensorDataset)
    for i, s in enumerate(starts):
        if i < skip:
            continue
        idx = order[s:s + batch_size]
        if shard is not None:
            idx = shard(idx)
        if tensor_ds:
            yield i, tuple(t[idx] for t in data.tensors)
        else:
            yield i, torch.utils.data.default_collate([data[int(j)] for j in idx])


def _num_batches(data, batch_size: int) -> int:
    if isinstance(data, torch.utils.data.DataLoader):
        return len(data)
    return math.ceil(len(data) / batch_size)


@torch.no_grad()
def evaluate(model, data, device, batch_size: int = 256, loss_fn=None) -> dict:
    """Accuracy (argmax over the last dim) and mean loss on `data`."""
    loss_fn = loss_fn or F.cross_entropy
    was = model.training
    model.eval()
    correct, count, loss_sum = 0, 0, 0.0
    for _, batch in _batches(data, 0, 0, batch_size) if not isinstance(data, torch.utils.data.DataLoader) else enumerate(data):
        x, y = _split_batch(batch)
        x, y = _to(x, device), _to(y, device)
        out = _forward(model, x)
        loss_sum += float(loss_fn(out, y)) * len(y)
        correct += int((out.argmax(-1) == y).sum())
        count += len(y)
    model.train(was)
    return {"accuracy": correct / max(count, 1), "loss": loss_sum / max(count, 1)}


def _bn_modules(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(model, data, device, batch_size: int = 256, max_batches: int = 50) -> bool:
    """Recompute BatchNorm running statistics for the current weights (cumulative average).

    The structured point Ŵ is not the point whose activations the running statistics
    followed during training (RAMDA trains the average W), so evaluating or exporting Ŵ
    with stale statistics measures the wrong model: on digits-resnet it read 10-55% where
    Ŵ with recalibrated statistics reads 96-99%. Every rank uses the same (unsharded)
    batches, so the buffers stay identical under data parallelism.
    """
    bns = _bn_modules(model)
    if not bns:
        return False
    saved = [(m.momentum, m.training) for m in bns]
    was = model.training
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i, batch in _batches(data, 0, 12345, batch_size) if not isinstance(data, torch.utils.data.DataLoader) \
            else enumerate(data):
        if i >= max_batches:
            break
        x, _ = _split_batch(batch)
        _forward(model, _to(x, device))
    for m, (mom, tr) in zip(bns, saved):
        m.momentum = mom
    model.train(was)
    return True


class _KeepBatchNormStats:
    """Restore BatchNorm buffers on exit: per-epoch recalibration must not disturb training."""

    def __init__(self, model):
        self.bns = _bn_modules(model)

    def __enter__(self):
        self.saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in self.bns]

    def __exit__(self, *exc):
        for m, buf in zip(self.bns, self.saved):
            for k, v in m.named_buffers(recurse=False):
                v.copy_(buf[k])
        return False


def make_optimizer(cfg: TrainConfig, model, groups):
    from .optim import make_optimizer as _make

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
        from .optim.dsgd import model_layers

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
    from .groups import group_sparsity

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


def _rng_state() -> dict[str, torch.Tensor]:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            st[f"cuda{i}"] = s
    return st


def _set_rng_state(st: dict[str, torch.Tensor]) -> None:
    if "torch" in st:
        torch.set_rng_state(st["torch"])
    cuda = [st[k] for k in sorted(st) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_weights(path, model: torch.nn.Module) -> None:
    """The model's state_dict as safetensors, atomically."""
    from safetensors.torch import save_file

    from .io import atomic_write_with

    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write_with(path, lambda tmp: save_file(sd, tmp))


def prepare_run_dir(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing run unless forced; never delete anything but the run's own files."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise UserError(f"output directory {out} already exists; use --force to overwrite its run files, "
                            "or --resume to continue it")
        if force:
            for name in list(RUN_FILES.values()) + ["report.json", "bench.json", "model.onnx", "dense.onnx",
                                                    "bench.png", "compressed.safetensors", "budget.json", "dsgd_picks.png"]:
                (out / name).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out}: {e.strerror}") from e


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

    from .groups import find_groups, load_groups, save_groups

    from .distributed import DistContext

    console = console or Console()
    out = Path(out)
    loss_fn = loss_fn or F.cross_entropy

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
    example = _to(example_inputs, device)

    if resume:
        groups = load_groups(out / RUN_FILES["groups"], model)
    elif groups is None:
        groups = find_groups(model, example, weight=cfg.group_weight)
    opt = (build_optimizer or make_optimizer)(cfg, model, groups) if resume else make_optimizer(cfg, model, groups)

    if not resume and main:
        atomic_write_json(out / RUN_FILES["config"], {"train": dataclasses.asdict(cfg), **(run_info or {})})
        save_groups(out / RUN_FILES["groups"], groups)
        save_weights(out / RUN_FILES["init"], model)
    if not resume:
        start_epoch, start_batch, metrics, carry = 0, 0, [], {"loss_sum": 0.0, "seen": 0}
        init_eval = evaluate(model, eval_data, device, loss_fn=loss_fn)
        run_meta = {"init_accuracy": init_eval["accuracy"]}
    else:
        ckpt.load_into(model, {k: v.to(device) for k, v in state["model"].items()}, "checkpoint")
        opt.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
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
        ckpt.save_checkpoint(out / RUN_FILES["checkpoint"], model, opt, info, _rng_state())

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
    n_batches = _num_batches(train_data, cfg.batch_size)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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
                for i, batch in _batches(train_data, epoch, cfg.seed, cfg.batch_size, skip=start_batch, shard=shard):
                    x, y = _split_batch(batch)
                    x, y = _to(x, device), _to(y, device)
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss = loss_fn(_forward(net, x), y)
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
                    from .plots import plot_training

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
            from .optim.dsgd import plot_layer_picks

            plot_layer_picks(opt, out / "dsgd_picks.png")
    ctx.barrier()
    return RunResult(out=out, metrics=metrics, model=model, optimizer=opt, groups=groups)
