"""finetune_to_budget: a fine-tuning run whose λ the controller sets, with resume and a report."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress.budget.controller import LAM0_FALLBACK, BudgetController
from compress.budget.latency import LatencyModel
from compress.budget.latency_memo import MeasuredLatencies
from compress.budget.outcome import achieved_cost, budget_summary, hold_target, latency_report
from compress.budget.patterns import ZeroKeeper, kept_widths
from compress.budget.target import Budget
from compress.errors import UserError
from compress.files import atomic_write_json
from compress.runs import RUN_FILES, read_config
from compress.structure.cost_model import CostModel
from compress.train.config import TrainConfig

# --------------------------------------------------------------------------- the API


@dataclass
class BudgetRunResult:
    """`compress.train.RunResult` fields plus `budget`: the summary also saved as out/budget.json."""

    out: Path
    metrics: list
    model: nn.Module | None
    optimizer: object
    groups: list | None
    budget: dict


def finetune_to_budget(
    model: nn.Module,
    train_data,
    eval_data,
    example_inputs,
    out,
    config=None,
    budget: Budget | None = None,
    *,
    groups=None,
    resume: bool = False,
    controller: dict | None = None,
    align: int | None = None,
    final_optimizer: str | None = None,
    rewind: str | None = None,
    final_lr: float | None = None,
    measure_latency: bool | None = None,
    latency_calibration=(0.75, 0.5, 0.3),
    latency_time_budget_s: float = 1.5,
    measure_alignment: bool = True,
    console=None,
    **finetune_kwargs,
) -> BudgetRunResult:
    """Fine-tune `model` so that the exported model meets `budget`; λ is found by the controller.

    `config.lam` (if > 0) is only λ's starting value; `config.milestones=None` means one lr decay
    at 3/4 of the epochs, where the final phase (frozen structure) begins (`budget_config`). `controller`: keyword
    arguments for `BudgetController` (freeze_epoch, plan_end, gain, tol, revive, final_lr, ...).
    `final_optimizer`: "adamw" or "same" (`BudgetController`; None: its default). `rewind`: "init" resets
    the model to its starting weights (out/init.safetensors) at the freeze, before the AdamW phase. `final_lr`: the
    final AdamW phase's peak learning rate (None: the controller's 1e-3; pretrained encoders want ~1e-4). `align`: at the freeze every
    channel/neuron width keeps a multiple of this many groups (`align_widths`; None: `simd_block()`,
    1: off), so the exported model runs on ONNX Runtime's blocked kernels; with `measure_alignment` (default;
    not when `align` is given: that is the caller's decision, nor under torchrun, where ranks would time apart)
    each width alignment changed is kept only where ONNX Runtime measures it faster (at the budget's batch
    and threads; `measured_alignment`), and budget.json's freeze.alignment.measured says so. Other keyword
    arguments go to `compress.train.finetune` (force, init_weights, run_info, loss_fn, callbacks,
    progress, ...). After training the zero groups are extracted and
    counted for real, a latency target (or `measure_latency=True`) is measured with ONNX
    Runtime, and out/budget.json states target, achieved and dense cost side by side.
    """
    from rich.console import Console

    from compress.train.loop import finetune

    console = console or Console()
    out = Path(out)
    setup = _setup(out, config, budget, groups, resume, controller, model, example_inputs)
    latency, target = _latency_model(
        model, example_inputs, setup, measure_latency, latency_calibration, latency_time_budget_s, console
    )
    given = {"align": align, "final_optimizer": final_optimizer, "rewind": rewind, "final_lr": final_lr}
    ctl_kw = {k: v for k, v in setup.controller.items() if k != "lam0"} | {
        k: v for k, v in given.items() if v is not None
    }
    if measure_alignment and align is None and "align_meter" not in ctl_kw and not _data_parallel():
        # an explicit `align` is the caller's decision; under torchrun ranks would time differently
        ctl_kw["align_meter"] = _align_meter(model, example_inputs, setup, latency, latency_time_budget_s, console)
    ctl = _controller(out, setup, train_data, target, latency, ctl_kw, console)
    ctl_kw.pop("align_meter", None)  # not JSON: config.json records the controller's other settings
    kwargs = _finetune_options(out, finetune_kwargs, setup, ctl, ctl_kw, latency)
    t0 = time.perf_counter()
    result = finetune(
        model, train_data, eval_data, example_inputs, out, None if resume else setup.cfg,
        groups=setup.groups, resume=resume, console=console, **kwargs,
    )  # fmt: skip
    return _outcome(out, result, ctl, setup, train_data, eval_data, latency, time.perf_counter() - t0, console)


def _finetune_options(out: Path, finetune_kwargs: dict, setup, ctl: BudgetController, ctl_kw: dict, latency) -> dict:
    """compress.train.finetune's keyword arguments for a budget run: the controller's callbacks, the final
    phase's optimizer for a resume, and config.json's record of the budget and the controller."""
    kwargs = dict(finetune_kwargs)
    if ctl.keeper is not None and ctl.final_optimizer == "adamw":  # the checkpoint holds the final phase's AdamW
        kwargs["build_optimizer"] = lambda cfg, model, groups: ctl.make_final_optimizer(model)
    elif ctl.balance is not None:  # resuming in the sparsity phase: the checkpoint's per-kind weights, first
        from compress.train.loop import make_optimizer

        def build_balanced(cfg, model, groups):
            opt = make_optimizer(cfg, model, groups)
            load = opt.load_state_dict

            def load_and_restore(state_dict):
                load(state_dict)
                ctl.balance.restore(opt)

            opt.load_state_dict = load_and_restore
            return opt

        kwargs["build_optimizer"] = build_balanced
    run_info = dict(kwargs.pop("run_info", None) or {})
    run_info["budget"] = dataclasses.asdict(setup.budget)
    run_info["budget_controller"] = {
        **ctl_kw,
        "freeze_epoch": ctl.freeze_epoch,
        "lam0": setup.lam0,
        "align": ctl.align,
        "final_optimizer": ctl.final_optimizer,
        "rewind": ctl.rewind,
    }
    kwargs["run_info"] = run_info
    kwargs["epoch_callbacks"] = [_state_saver(out, ctl, latency), *kwargs.pop("epoch_callbacks", ())]
    kwargs["step_callbacks"] = [ctl.on_step, *kwargs.pop("step_callbacks", ())]
    return kwargs


def _outcome(out: Path, result, ctl, setup, train_data, eval_data, latency, train_s: float, console):
    """The target held, the cost counted on the extracted model, latency measured; budget.json written."""
    final_zero, post_hoc = hold_target(out, result, ctl, setup, train_data)
    achieved, acc, small = achieved_cost(result.model, setup, final_zero, eval_data)
    lat = None
    if latency is not None:
        lat = latency_report(out, latency, final_zero, small, setup.budget, console)
        achieved["latency_ms"] = lat["measured_ms"]
    summary = budget_summary(
        setup.budget, ctl, setup.dense, achieved, acc, result.metrics, lat, post_hoc, train_s, setup.cfg
    )
    atomic_write_json(out / RUN_FILES["budget"], summary)
    return BudgetRunResult(
        out=result.out,
        metrics=result.metrics,
        model=result.model,
        optimizer=result.optimizer,
        groups=setup.groups,
        budget=summary,
    )


@dataclass
class _Setup:
    """What a budget run knows before training: resolved config and budget, groups, cost model, and
    when resuming the controller's saved state and the checkpoint's position."""

    budget: Budget
    cfg: TrainConfig
    controller: dict
    groups: list
    cm: CostModel
    example: object
    lam0: float
    restore: dict | None = None
    position: dict | None = None

    @property
    def dense(self) -> dict:
        return {"flops": self.cm.dense_flops, "params": self.cm.dense_params}


def _setup(out: Path, config, budget, groups, resume: bool, controller, model, example_inputs) -> _Setup:
    """The budget, config and controller options: from the run directory when resuming, else as given."""
    import json

    from compress.structure.group import load_groups
    from compress.train import checkpoint as ckpt

    restore = position = None
    if resume:
        saved = read_config(out, "nothing to resume")
        if "budget" not in saved:
            raise UserError(f"{out} was not trained to a budget; resume it with compress finetune --resume")
        budget, cfg = Budget(**saved["budget"]), TrainConfig(**saved["train"])
        # runs saved before the option existed trained their final phase with the same optimizer
        controller = {"final_optimizer": "same", **saved.get("budget_controller", {}), **(controller or {})}
        groups = load_groups(out / RUN_FILES["groups"], model)
        state_path = out / RUN_FILES["budget_state"]
        restore = json.loads(state_path.read_text()) if state_path.is_file() else None
        position = ckpt.load_checkpoint(out / RUN_FILES["checkpoint"])["info"]
    else:
        if budget is None:
            raise UserError("finetune_to_budget needs a budget, e.g. Budget(flops=0.5)")
        cfg = budget_config(config or TrainConfig())
    _check_runnable(budget, cfg)
    controller = dict(controller or {})
    lam0 = controller.get("lam0") or (cfg.lam if cfg.lam > 0 else LAM0_FALLBACK)
    if not resume:
        cfg = dataclasses.replace(cfg, lam=lam0)
    return _Setup(
        budget, cfg, controller, *_cost_model(model, groups, example_inputs, cfg, budget), lam0, restore, position
    )


def _check_runnable(budget: Budget, cfg: TrainConfig) -> None:
    import os

    from compress.optim.registry import STRUCTURED, spec

    if budget.kind == "latency" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(
            "a latency target is measured on this machine and cannot be used under torchrun; "
            "use `target_flops` or `target_params` for data-parallel runs",
            field="target_latency_ms",
            fields=("target_flops", "target_params"),
        )
    if not spec(cfg.optimizer).structured:
        raise UserError(
            f"a budget needs a group-sparse optimizer ({', '.join(STRUCTURED)}); {cfg.optimizer} trains dense models"
        )


def _cost_model(model, groups, example_inputs, cfg, budget: Budget) -> tuple:
    """(groups, cost model, CPU example): groups found on the CPU example when not given; the budget
    must be reachable by removing groups."""
    from compress.structure.find import find_groups
    from compress.train.data import to_device

    example = to_device(example_inputs, torch.device("cpu"))
    if groups is None:
        groups = find_groups(model, example, weight=cfg.group_weight)
    cm = CostModel(model, groups, example)
    budget.check_reachable(cm)
    return groups, cm, example


def _latency_model(model, example_inputs, setup: _Setup, measure_latency, calibration, time_budget_s, console):
    """(latency model or None, the blocked-FLOP target a latency budget maps to, or None)."""
    budget, restore = setup.budget, setup.restore
    if not (budget.kind == "latency" or measure_latency):
        return None, None
    latency = LatencyModel(
        model,
        setup.groups,
        setup.example,
        setup.cm,
        batch=budget.batch,
        threads=budget.threads,
        time_budget_s=time_budget_s,
        log=console.print,
    )
    if restore and restore.get("latency"):
        lt = restore["latency"]
        latency.points, latency.fit = lt["points"], tuple(lt["fit"])
        latency.fit_calibration = tuple(lt["fit_calibration"]) if lt.get("fit_calibration") else None
        latency.min_point = lt["min_point"]
    elif budget.kind == "latency":
        with console.status("measuring latency at calibration patterns (extract → ONNX → ONNX Runtime)"):
            latency.calibrate(calibration, target_ms=budget.latency_ms)
    if budget.kind != "latency":
        return latency, None
    target = restore["target"] if restore else latency.flops_for(budget.latency_ms)
    console.print(
        f"budget: {budget.describe()} → blocked-FLOP fraction {target:.4f} "
        f"(fit latency/dense = {latency.fit[0]:.3f} + {latency.fit[1]:.3f}·blocked FLOPs)"
    )
    return latency, target


def _data_parallel() -> bool:
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _align_meter(model, example_inputs, setup: _Setup, latency, time_budget_s: float, console):
    """meter(mask, tag) → the pattern's ONNX Runtime latency / dense (extract, export, benchmark), for the
    freeze's alignment decision. A latency target is timed as stated (its own latency model); a FLOP or
    parameter target states no deployment, so 1 thread at batch 1 and 32 (the README's bench settings; 1
    thread also keeps a busy machine's noise out), their geometric mean. Built lazily: only a freeze whose
    alignment changes widths measures."""
    held = {"models": [latency] if latency is not None else None}

    memo = MeasuredLatencies(model, setup.example, "latency" if latency is not None else "b1,b32 t1")

    def meter(mask, tag):
        widths = kept_widths(setup.cm, mask)
        if latency is None and memo.get(widths) is not None:  # measured before on this machine: same decision
            return memo.get(widths)
        if held["models"] is None:
            held["models"] = [
                LatencyModel(
                    model,
                    setup.groups,
                    setup.example,
                    setup.cm,
                    batch=b,
                    threads=1,
                    time_budget_s=time_budget_s,
                    log=console.print,
                )
                for b in (1, 32)
            ]
        ratios = [float(m.measure(mask, tag=f"alignment: {tag}")["ratio"]) for m in held["models"]]
        ratio = math.prod(ratios) ** (1 / len(ratios))
        if latency is None:
            memo.put(widths, ratio)
        return ratio

    return meter


def _controller(out: Path, setup: _Setup, train_data, target, latency, ctl_kw: dict, console) -> BudgetController:
    """The λ controller, with its state from budget_state.json and the checkpoint when resuming."""
    from compress.train.data import num_batches

    def start_weights():  # what finetune saved before its first step (also there when resuming before the freeze)
        from safetensors.torch import load_file

        return load_file(out / RUN_FILES["init"])

    cfg, budget, groups = setup.cfg, setup.budget, setup.groups
    ctl = BudgetController(
        budget,
        setup.cm,
        groups,
        cfg,
        num_batches(train_data, cfg.batch_size),
        target=target,
        lam0=setup.lam0,
        latency=latency if budget.kind == "latency" else None,
        bn_data=train_data,
        log=console.print,
        rewind_weights=start_weights,
        **ctl_kw,
    )
    restore, info = setup.restore, setup.position
    if restore:
        ctl.counts, ctl.history, ctl.freeze_info = restore["counts"], restore["history"], restore["freeze_info"]
        ctl.target = restore["target"]
        frozen_at = restore["freeze_info"].get("epoch")
        if restore.get("frozen") is not None and frozen_at and info["epoch"] >= frozen_at:
            mask = torch.zeros(len(groups), dtype=torch.bool)
            mask[restore["frozen"]] = True
            ctl.frozen, ctl.keeper = mask, ZeroKeeper(groups, mask)
        ctl.step = info["epoch"] * ctl.steps_per_epoch + info["batch"]

    return ctl


def _state_saver(out: Path, ctl: BudgetController, latency):
    """The epoch callback: the controller's step, then its state (and the latency fit) to budget_state.json."""

    def save_state(st):
        extra = ctl.on_epoch(st)
        s = ctl.state()
        if latency is not None and latency.fit is not None:
            s["latency"] = {
                "points": latency.points,
                "fit": list(latency.fit),
                "min_point": latency.min_point,
                "fit_calibration": list(latency.fit_calibration) if latency.fit_calibration else None,
            }
        if out.is_dir():
            atomic_write_json(out / RUN_FILES["budget_state"], s)
        return extra

    return save_state


def budget_config(cfg) -> TrainConfig:
    """`cfg` resolved for a budget run (the CLI and the API share this): with `milestones=None` and a
    step schedule, one lr decay where the final phase starts (3/4 of the epochs) instead of the
    plain runs' two — the frozen structure then trains at lr·γ and settles (digits-resnet at 0.5
    FLOPs: 0.993 vs 0.891 with no decay, same dense start)."""
    if cfg.milestones is None and cfg.schedule == "step" and cfg.epochs >= 4:
        cfg = dataclasses.replace(cfg, milestones=[round(0.75 * cfg.epochs)])
    cfg = cfg.resolved()
    cfg.validate()
    return cfg
