"""Training configuration: every setting of a run, its defaults, schedules and validation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from compress.errors import UserError
from compress.optim.registry import DEFAULT_LAM, REGISTRY, validate_config
from compress.train.distill import DISTILL_KINDS

DEFAULT_LR = {name: s.default_lr for name, s in REGISTRY.items()}  # the optimizer table's (registry.py)


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
    distill: str = "none"  # none | kl | cosine | mse: from a frozen copy of the starting model (train/distill.py)
    distill_temperature: float = 4.0  # kl: softmax temperature T (the loss is scaled by T²)
    distill_alpha: float = 0.9  # loss = alpha · distillation + (1 − alpha) · task loss

    def resolved(self) -> TrainConfig:
        c = dataclasses.replace(self)
        if c.lr is None:
            c.lr = DEFAULT_LR.get(c.optimizer, 1e-3)
        if c.lam is None:
            c.lam = REGISTRY[c.optimizer].default_lam if c.optimizer in REGISTRY else DEFAULT_LAM
        if c.milestones is None:
            c.milestones = [] if c.schedule == "cosine" else sorted({c.epochs // 2, (3 * c.epochs) // 4} - {0})
        return c

    def validate(self) -> None:
        """UserError naming the field at fault (`field`); the CLI shows it as its flag."""
        _check(self.epochs > 0, "epochs", f"must be positive, got {self.epochs}")
        _check(self.lr is None or self.lr > 0, "lr", f"must be positive, got {self.lr}")
        _check(
            self.lam is None or (self.lam >= 0 and not math.isinf(self.lam)),
            "lam",
            f"must be a finite number ≥ 0, got {self.lam}",
        )
        _check(self.batch_size > 0, "batch_size", f"must be positive, got {self.batch_size}")
        _check(self.schedule in ("step", "cosine"), "schedule", f"must be step or cosine, got {self.schedule!r}")
        _check(self.threads is None or self.threads > 0, "threads", f"must be positive, got {self.threads}")
        _check(self.amp in ("none", "bf16", "fp16"), "amp", f"must be none, bf16 or fp16, got {self.amp!r}")
        validate_config(self)  # the optimizer-dependent checks (registry.py)
        from compress.structure.find import GROUP_WEIGHTS

        _check(
            self.group_weight in GROUP_WEIGHTS,
            "group_weight",
            f"must be size or flops (or unit), got {self.group_weight!r}",
        )
        _check(
            self.distill in DISTILL_KINDS, "distill", f"must be one of {', '.join(DISTILL_KINDS)}, got {self.distill!r}"
        )
        _check(
            self.distill_temperature > 0 and math.isfinite(self.distill_temperature),
            "distill_temperature",
            f"must be a finite number > 0, got {self.distill_temperature}",
        )
        _check(0 <= self.distill_alpha <= 1, "distill_alpha", f"must be between 0 and 1, got {self.distill_alpha}")
        _check(self.dsgd_k >= 1, "dsgd_k", f"must be ≥ 1, got {self.dsgd_k}")
        _check(_is_device_name(self.device), "device", f"must be auto, cpu or cuda, got {self.device!r}")
        for m in self.milestones or []:
            if not 0 < m < self.epochs:
                raise UserError(f"milestone {m} is outside 1..{self.epochs - 1}", field="milestones")


def _check(ok: bool, field: str, text: str) -> None:
    if not ok:
        raise UserError(f"`{field}` {text}", field=field)


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
        raise UserError("`device` cuda was asked for but torch sees no GPU; use `device` cpu or auto", field="device")
    _check(_is_device_name(name), "device", f"must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def _is_device_name(name) -> bool:
    return name in ("auto", "cpu", "cuda") or (isinstance(name, str) and name.startswith("cuda:"))
