"""A budget run's settings from a request's merged options: the `Budget`, and the keyword arguments of
`finetune_to_budget` (with the `BudgetController`'s under "controller"), validated where they are read."""

from __future__ import annotations

from compress.budget.target import Budget
from compress.errors import UserError

TARGETS = ("target_flops", "target_params", "target_latency_ms")
_BUDGET = {
    "target_flops": "flops",
    "target_params": "params",
    "target_latency_ms": "latency_ms",
    "bench_batch": "batch",
    "bench_threads": "threads",
}  # option → Budget field
CONTROLLER = ("final_optimizer", "align", "rewind", "final_lr", "freeze_epoch")  # the budget path's settings


def budget_of(given: dict) -> Budget | None:
    """The Budget of a target run (then `lam` must not be given); None for a plain run."""
    if not any(k in given for k in TARGETS):
        extra = [k for k in ("bench_batch", "bench_threads") if k in given]
        if extra:
            raise UserError(
                "`bench_batch` and `bench_threads` only apply to `target_latency_ms`",
                field=extra[0],
                fields=("bench_batch", "bench_threads", "target_latency_ms"),
            )
        return None
    if "lam" in given:
        raise UserError(
            "give either `lam` or a target (`target_flops`/`target_params`/`target_latency_ms`): "
            "with a target, λ is found automatically",
            field="lam",
            fields=TARGETS,
        )
    try:
        return Budget(**{_BUDGET[k]: v for k, v in given.items() if k in _BUDGET})
    except UserError as e:
        raise e.renamed({b: k for k, b in _BUDGET.items()}) from None


def controller_of(given: dict, budget: Budget | None, epochs: int) -> dict:
    """`finetune_to_budget`'s keyword arguments among `given`; an error when one is given without a target."""
    controller = {k: given[k] for k in CONTROLLER if k in given}
    if controller.get("final_lr") is not None and not controller["final_lr"] > 0:
        raise UserError(f"`final_lr` must be positive, got {controller['final_lr']}", field="final_lr")
    if budget is None and controller:
        raise UserError(
            f"`{next(iter(controller))}` applies to target runs only "
            "(`target_flops`/`target_params`/`target_latency_ms`)",
            field=next(iter(controller)),
            fields=TARGETS,
        )
    if "freeze_epoch" in controller:  # a BudgetController setting; the others are finetune_to_budget's
        freeze = controller.pop("freeze_epoch")
        if not (isinstance(freeze, int) and 1 <= freeze <= epochs):
            raise UserError(f"`freeze_epoch` must be an epoch in 1..{epochs}, got {freeze}", field="freeze_epoch")
        controller["controller"] = {"freeze_epoch": freeze}
    return controller


def pretrained_defaults(model: str | None, controller: dict, lr: float) -> None:
    """A budget run from a pretrained Hugging Face model: the first quarter of the epochs chooses the structure,
    the final AdamW phase retrains it from the pretrained weights (`rewind` init) at the run's `lr`, so what was
    learned is kept rather than shrunk by the group lasso. all-MiniLM-L6-v2 at 0.5 of the FLOPs, 4 epochs, seed 0:
    cosine 0.870 against 0.579 with the general defaults (README, "Against the tools you would pick instead")."""
    from compress.models import is_pretrained

    if is_pretrained(model) and controller.get("final_optimizer", "adamw") == "adamw":
        controller.setdefault("rewind", "init")
        controller.setdefault("final_lr", lr)


def default_freeze_epoch(cfg, rewind: str = "none") -> int:
    """Where the final phase starts: the last learning-rate milestone when it leaves 10–40% of
    the epochs (RAMDA restarts there anyway), otherwise the last quarter. With `rewind="init"` the
    survivors restart from the starting weights, so the sparsity phase only chooses the structure:
    the first quarter does (all-MiniLM-L6-v2, 4 epochs, 0.5 FLOPs: cosine 0.80 frozen at 1 vs 0.70 at 3;
    digits-resnet, 30 epochs, 0.1 FLOPs, 3 seeds: 98.4% mean frozen at 8 vs 95.4% at 22)."""
    e = cfg.epochs
    if rewind == "init":
        return max(1, round(0.25 * e))
    ms = [m for m in (cfg.milestones or []) if 0.6 * e <= m <= 0.9 * e]
    if ms:
        return max(ms)
    return max(1, e - max(1, round(0.25 * e))) if e > 1 else 1
