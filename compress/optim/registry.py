"""One table of the optimizers: name → class, defaults and capabilities.

Everything that used to keep its own list of names (the CLI help, TrainConfig's defaults and
checks, the training loop's keyword plumbing, the budget runner's "needs a group lasso")
reads this table, so adding an optimizer is one entry here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from compress.errors import UserError

REG_SPACES = ("param", "preconditioned")  # regspace.py's (not imported: this module stays free of torch)

# λ of the group-sparse optimizers when none is given (fine-tuning digits-resnet; see DEFAULT_LR)
DEFAULT_LAM = 1.5e-2


def _averaging(cfg, model, groups) -> dict:
    return {"momentum": cfg.momentum}  # RAMDA/RMDA's c; ProxSGD's momentum is another quantity (μ, default 0.9)


def _ramda(cfg, model, groups) -> dict:
    return {**_averaging(cfg, model, groups), "solver": cfg.solver, "eps_restart_factor": cfg.eps_restart_factor}


def _dsgd(cfg, model, groups) -> dict:
    from compress.optim.dsgd import model_layers

    layers, names = model_layers(model, groups)
    return {"k": cfg.dsgd_k, "layers": layers, "layer_names": names}


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer's entry. `path`: "module:Class", imported on first use (so the CLI can show the
    table without loading torch). `structured`: trains a group lasso (λ > 0 allowed; a budget can
    drive it). `momentum_schedule`: the loop ramps its averaging weight c (momentum in (0, 1]).
    `dual_averaging`: its critical λ is exact, so the budget controller sets λ exactly.
    `config_kwargs(cfg, model, groups)`: the class's keyword arguments taken from a TrainConfig.
    tests/test_optim_registry.py checks the capabilities against the classes' own (interface.py)."""

    name: str
    path: str
    default_lr: float
    summary: str
    structured: bool = True
    momentum_schedule: bool = False
    dual_averaging: bool = False
    reg_spaces: tuple[str, ...] = ("param",)
    config_kwargs: Callable = field(default=lambda cfg, model, groups: {})

    @property
    def cls(self) -> type:
        module, name = self.path.split(":")
        return getattr(importlib.import_module(module), name)

    @property
    def default_lam(self) -> float:
        return DEFAULT_LAM if self.structured else 0.0


# Default lrs are for fine-tuning a trained model. RAMDA's were chosen on digits-resnet from a 99.33% dense
# model (20-30 epochs): lr 1e-2 destroyed it, lr 1e-3 with λ 1e-2 kept 95.6% with 43% of groups zero,
# lr 3e-4 with λ 1.5e-2 kept 99.33% with 45% zero. adamw's is for dense training from scratch.
_SPECS = (
    OptimizerSpec(
        "ramda",
        "compress.optim.ramda:RAMDA",
        3e-4,
        "regularized adaptive momentum dual averaging (the method)",
        momentum_schedule=True,
        dual_averaging=True,
        reg_spaces=REG_SPACES,
        config_kwargs=_ramda,
    ),
    OptimizerSpec(
        "rmda",
        "compress.optim.rmda:RMDA",
        1e-2,
        "regularized modernized dual averaging",
        momentum_schedule=True,
        dual_averaging=True,
        config_kwargs=_averaging,
    ),
    OptimizerSpec("proxsgd", "compress.optim.proxsgd:ProxSGD", 1e-2, "proximal momentum SGD"),
    OptimizerSpec(
        "proxadam",
        "compress.optim.proxadam:ProxAdam",
        1e-4,
        "Adam with the group prox in its metric",
        reg_spaces=REG_SPACES,
    ),
    OptimizerSpec(
        "asgo", "compress.optim.asgo:ASGO", 3e-4, "one-sided matrix preconditioner, exact prox in its eigenbasis"
    ),
    OptimizerSpec("dasgo", "compress.optim.asgo:DASGO", 3e-4, "ASGO with the diagonal preconditioner"),
    OptimizerSpec("dsgd", "compress.optim.dsgd:DSGD", 1e-2, "greedy layer-wise proximal steps", config_kwargs=_dsgd),
    OptimizerSpec(
        "adamw",
        "compress.optim.dense:AdamW",
        3e-3,
        "dense training, no group lasso",
        structured=False,
        config_kwargs=lambda cfg, model, groups: {"weight_decay": cfg.weight_decay},
    ),
)
REGISTRY: dict[str, OptimizerSpec] = {s.name: s for s in _SPECS}
OPTIMIZERS = tuple(REGISTRY)
STRUCTURED = tuple(n for n, s in REGISTRY.items() if s.structured)


def spec(name: str) -> OptimizerSpec:
    """The entry of `name` (case-insensitive); ValueError naming the choices otherwise."""
    key = str(name).lower()
    if key not in REGISTRY:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
    return REGISTRY[key]


def build_optimizer(name: str, params, groups=None, lr: float = 1e-3, lam: float = 0.0, **kw):
    """The optimizer called `name` over `params` and `groups`; extra keywords go to its class
    (momentum, solver, eps_restart_factor, reg_space for RAMDA; reg_space for ProxAdam;
    precond_every for ASGO; k, layers for DSGD; weight_decay for AdamW). AdamW trains dense
    models: `groups` only serve its sparsity report, and λ must be 0."""
    s = spec(name)
    if not s.structured:
        if lam:
            raise ValueError(
                f"{s.name} trains dense models and takes no group lasso: use lam=0 (got {lam}) "
                f"or one of {'|'.join(STRUCTURED)}"
            )
        return s.cls(params, lr=lr, groups=groups, **kw)
    return s.cls(params, lr=lr, lam=lam, groups=groups, **kw)


def optimizer_for_config(cfg, model, groups):
    """The optimizer a resolved TrainConfig asks for, over the model's trainable parameters."""
    s = spec(cfg.optimizer)
    kw = s.config_kwargs(cfg, model, groups)
    if cfg.reg_space != "param":
        kw["reg_space"] = cfg.reg_space
    params = [p for p in model.parameters() if p.requires_grad]
    return build_optimizer(s.name, params, groups=groups, lr=cfg.lr, lam=cfg.lam, **kw)


def validate_config(cfg) -> None:
    """The optimizer-dependent checks of a TrainConfig (UserError)."""
    key = str(cfg.optimizer).lower()
    if key not in REGISTRY:
        raise UserError(
            f"unknown `optimizer` {cfg.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}", field="optimizer"
        )
    s = REGISTRY[key]
    if s.momentum_schedule and not 0 < cfg.momentum <= 1:
        raise UserError(f"`momentum` must be in (0, 1] for {cfg.optimizer}, got {cfg.momentum}", field="momentum")
    if not s.structured and (cfg.lam or 0) > 0:
        raise UserError(
            f"{s.name} trains dense models: use `lam` 0, or choose `optimizer` {'|'.join(STRUCTURED)}",
            field="lam",
            fields=("optimizer",),
        )
    if cfg.reg_space not in REG_SPACES:
        raise UserError(f"`reg_space` must be param or preconditioned, got {cfg.reg_space!r}", field="reg_space")
    if cfg.reg_space not in s.reg_spaces:
        with_precond = [n for n, e in REGISTRY.items() if "preconditioned" in e.reg_spaces]
        raise UserError(f"`reg_space` {cfg.reg_space} applies to {' and '.join(with_precond)} only", field="reg_space")


def help_text() -> str:
    """The choices for a command-line help line: 'ramda | rmda | … | adamw (dense).'"""
    return " | ".join(n if s.structured else f"{n} (dense)" for n, s in REGISTRY.items()) + "."


def describe() -> str:
    """One line per optimizer: name, default lr, what it is."""
    return "\n".join(f"{n:9s} lr {s.default_lr:g}  {s.summary}" for n, s in REGISTRY.items())
