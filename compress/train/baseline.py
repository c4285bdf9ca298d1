"""Where a run starts. Group lasso on random weights removes structures of a model that has learnt
nothing (digits-resnet from random weights: 10% accuracy, 75% of the groups gone), so a sparse run
never starts from random weights silently: `init` dense trains a built-in model's dense baseline once
(the recipe below) and caches it; `init` random says the random start is intended; no `init` on a
sparse run prints a warning naming both.

The cache: $COMPRESS_CACHE, else $XDG_CACHE_HOME/compress, else ~/.cache/compress; one run directory
per model and seed under dense/ (delete it to retrain)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from compress.errors import UserError
from compress.files import cache_dir

# The dense recipe of every built-in model: AdamW, cosine to 0, no group lasso (README's first command).
RECIPE = {"optimizer": "adamw", "lam": 0.0, "schedule": "cosine", "epochs": 30}
DENSE, RANDOM = "dense", "random"


def start_kind(init) -> str | None:
    """DENSE or RANDOM for those words given as `init`, None for a weights file (or no `init`)."""
    return str(init) if init is not None and str(init) in (DENSE, RANDOM) else None


def baseline_dir(model: str, seed: int) -> Path:
    return cache_dir() / "dense" / f"{model}-seed{seed}"


def dense_baseline(model: str, is_builtin: bool, train, console, train_run: Callable[[Path, dict], None]) -> Path:
    """The weights of `model`'s cached dense baseline (seed, device and threads of `train`), trained first
    when missing by `train_run(run_dir, recipe)` (the caller's way of running a finetune request)."""
    from compress.runs import RUN_FILES

    if not is_builtin:
        raise UserError(
            "`init` dense trains the recipe of a built-in model; for your own model train a dense "
            "model first (`optimizer` adamw, `lam` 0, `schedule` cosine) and give its "
            "weights.safetensors as `init`",
            field="init",
            fields=("optimizer", "lam", "schedule"),
        )
    run = baseline_dir(model, train.seed)
    weights = run / RUN_FILES["weights"]
    if weights.is_file():
        console.print(f"[bold]init[/]: the cached dense baseline {weights}")
        return weights
    console.print(
        f"[bold]init[/]: training the dense baseline of {model} first (AdamW, cosine, "
        f"{RECIPE['epochs']} epochs, seed {train.seed}); it is cached in {run}"
    )
    train_run(run, RECIPE)
    return weights


def warn_random_start(console, sparse: bool, name=None) -> None:
    """The line a sparse run from random weights prints (no `init` given); `name` writes a field as its
    caller calls it (the CLI: a flag)."""
    if sparse:
        from rich.markup import escape

        init = (name or (lambda f: f"`{f}`"))("init")
        console.print(
            "[yellow]warning:[/] "
            + escape(
                f"starting from random weights: the group lasso will remove structures of an untrained model. Start "
                f"from a trained model with {init} dense (built-in models: trains and caches a dense baseline under "
                f"{cache_dir() / 'dense'}) or {init} FILE, or give {init} random to say this is intended"
            ),
            soft_wrap=True,
            highlight=False,
        )
