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
from compress.budget.patterns import ZeroKeeper, enforce, kept_widths
from compress.budget.target import Budget
from compress.errors import UserError
from compress.files import atomic_write_json
from compress.optim.dense import CosineAdamW
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
    budget, cfg = setup.budget, setup.cfg
    latency, target = _latency_model(
        model, example_inputs, setup, measure_latency, latency_calibration, latency_time_budget_s, console
    )
    ctl_kw = {k: v for k, v in setup.controller.items() if k != "lam0"}
    ctl_kw.update(
        {
            k: v
            for k, v in (
                ("align", align),
                ("final_optimizer", final_optimizer),
                ("rewind", rewind),
                ("final_lr", final_lr),
            )
            if v is not None
        }
    )
    if measure_alignment and align is None and "align_meter" not in ctl_kw and not _data_parallel():
        # an explicit `align` is the caller's decision; under torchrun ranks would time differently
        ctl_kw["align_meter"] = _align_meter(model, example_inputs, setup, latency, latency_time_budget_s, console)
    ctl = _controller(out, setup, train_data, target, latency, ctl_kw, console)
    ctl_kw.pop("align_meter", None)  # not JSON: config.json records the controller's other settings
    if ctl.keeper is not None and ctl.final_optimizer == "adamw":  # the checkpoint holds the final phase's AdamW
        finetune_kwargs["build_optimizer"] = lambda cfg, model, groups: ctl.make_final_optimizer(model)
    run_info = dict(finetune_kwargs.pop("run_info", None) or {})
    run_info["budget"] = dataclasses.asdict(budget)
    run_info["budget_controller"] = {
        **ctl_kw,
        "freeze_epoch": ctl.freeze_epoch,
        "lam0": setup.lam0,
        "align": ctl.align,
        "final_optimizer": ctl.final_optimizer,
        "rewind": ctl.rewind,
    }
    epoch_cbs = [_state_saver(out, ctl, latency), *finetune_kwargs.pop("epoch_callbacks", ())]
    step_cbs = [ctl.on_step, *finetune_kwargs.pop("step_callbacks", ())]
    t0 = time.perf_counter()
    result = finetune(
        model,
        train_data,
        eval_data,
        example_inputs,
        out,
        None if resume else cfg,
        groups=setup.groups,
        resume=resume,
        run_info=run_info,
        epoch_callbacks=epoch_cbs,
        step_callbacks=step_cbs,
        console=console,
        **finetune_kwargs,
    )
    train_s = time.perf_counter() - t0
    final_zero, post_hoc = _hold_target(out, result, ctl, setup, train_data)
    achieved, acc, small = _achieved(result.model, setup, final_zero, eval_data)
    lat = None
    if latency is not None:
        lat = _latency_report(out, latency, final_zero, small, budget, console)
        achieved["latency_ms"] = lat["measured_ms"]
    summary = budget_summary(budget, ctl, setup.dense, achieved, acc, result.metrics, lat, post_hoc, train_s, cfg)
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


def _hold_target(out: Path, result, ctl: BudgetController, setup: _Setup, train_data) -> tuple[torch.Tensor, int]:
    """The promise: the exported point holds the target. Freezes if training ended before the freeze
    epoch, removes the weakest groups if still above target; returns (final zero mask, groups removed
    after training)."""
    from compress.structure.sparsity import group_norms, zero_mask
    from compress.train.checkpoint import save_weights
    from compress.train.evaluate import recalibrate_batchnorm

    model, groups, cm, cfg = result.model, setup.groups, setup.cm, setup.cfg
    final_zero = zero_mask(groups).cpu()
    post_hoc = 0
    if ctl.frozen is None:  # training ended before the freeze epoch (e.g. interrupted schedule)
        ctl.freeze(result.optimizer, model, cfg, cfg.epochs - 1)
        final_zero = zero_mask(groups).cpu()
    if float(cm.cost(final_zero, ctl.kind)) > ctl.target:
        mask, added = enforce(cm, final_zero, torch.as_tensor(group_norms(groups)).cpu(), ctl.kind, ctl.target)
        ZeroKeeper(groups, mask).apply()
        post_hoc = int(added.sum())
        final_zero = zero_mask(groups).cpu()
    # finetune recalibrates BatchNorm when it commits RAMDA's Ŵ; the AdamW phase ends on W (its running
    # statistics), and a post-hoc removal changes the point: recalibrate like every epoch's evaluation did
    if post_hoc or isinstance(result.optimizer, CosineAdamW):
        recalibrate_batchnorm(model, train_data, next(model.parameters()).device)
        save_weights(out / RUN_FILES["weights"], model)
    return final_zero, post_hoc


def _achieved(model, setup: _Setup, final_zero, eval_data) -> tuple[dict, dict, nn.Module]:
    """(achieved cost, extracted model's accuracy, the extracted model): groups removed for real."""
    from compress.deploy.extract import extract
    from compress.train.evaluate import evaluate

    cm, dense = setup.cm, setup.dense
    device, was = next(model.parameters()).device, model.training
    small, rep = extract(model.cpu(), setup.groups, setup.example)
    model.to(device).train(was)
    achieved = {
        "flops": rep["flops_after"],
        "params": rep["params_after"],
        "flops_fraction": rep["flops_after"] / dense["flops"],
        "params_fraction": rep["params_after"] / dense["params"],
        "flops_predicted": cm.flops(final_zero),
        "params_predicted": cm.params(final_zero),
    }
    acc = {} if eval_data is None else {"accuracy": evaluate(small, eval_data, torch.device("cpu"))["accuracy"]}
    return achieved, acc, small


def _latency_report(out: Path, latency: LatencyModel, final_zero, small, budget: Budget, console) -> dict:
    """The compressed model's measured latency beside the latency model's predictions."""
    predicted = latency.predict(final_zero) if latency.fit else None
    predicted_cal = latency.predict(final_zero, latency.fit_calibration) if latency.fit_calibration else None
    with console.status("measuring the latency of the compressed model"):
        pt = latency.measure(final_zero, model=small, tag="final model")
    meas = latency.latency_of(pt)
    lat = {
        "measured_ms": meas,
        "measured_raw_ms": pt["latency_ms"],
        "dense_ms": latency.dense_ms,
        "dense_raw_ms": pt["dense_ms"],
        "ratio_to_dense": pt["ratio"],
        "target_ms": budget.latency_ms,
        "batch": budget.batch,
        "threads": pt["threads"],
        "measured_note": "ratio to the dense model timed interleaved in the same run × the dense model's "
        "median latency over all runs of this session",
        # from the fit to the calibration patterns only (before training): the model's own prediction
        "predicted_ms": predicted_cal,
        "prediction_error": None if predicted_cal is None else (predicted_cal - meas) / meas,
        # refit on every pattern measured before the final export, incl. the freeze probes (one of
        # which has the final architecture): a consistency check of the measurements, not a model
        "predicted_ms_refit": predicted,
        "prediction_error_refit": None if predicted is None else (predicted - meas) / meas,
    }
    if latency.fit:
        lat["table"] = latency.table()
        atomic_write_json(out / RUN_FILES["latency"], latency.table())
    return lat


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


def budget_summary(
    budget: Budget,
    ctl: BudgetController,
    dense: dict,
    achieved: dict,
    accuracy: dict,
    metrics: list,
    latency: dict | None,
    post_hoc: int,
    train_seconds: float,
    cfg,
) -> dict:
    """Target, achieved and dense cost side by side, how λ ended, and who removed which groups."""
    kind = budget.kind
    s = {
        "target": {
            "kind": kind,
            "value": budget.target,
            "describe": budget.describe(),
            "controlled_as": {"kind": ctl.kind, "fraction": ctl.target},
        },
        "dense": dense,
        "achieved": achieved,
        "met": (
            achieved["latency_ms"] <= budget.target
            if kind == "latency"
            else achieved[f"{kind}_fraction"] <= budget.target
        ),
        **accuracy,
        "lam_final": ctl.freeze_info.get("lam_at_freeze"),  # λ that produced the frozen pattern
        "lam_final_phase": ctl.final_lam,
        "groups_total": ctl.cm.n_groups,
        "removed_by_optimizer": ctl.counts["removed_by_optimizer"],
        "removed_by_enforcement": ctl.counts["removed_by_enforcement"] + post_hoc,
        "removed_by_alignment": ctl.counts.get("removed_by_alignment", 0),
        "align": ctl.freeze_info.get("alignment", {}).get("align", 1),
        # predicted (blocked FLOPs) and measured (ONNX Runtime) speedups, unaligned / aligned / chosen
        "alignment_measured": ctl.freeze_info.get("alignment", {}).get("measured"),
        "revived": ctl.counts["revived"],
        "removed_post_hoc_without_finetuning": post_hoc,
        "freeze": ctl.freeze_info,
        "group_weight": cfg.group_weight,
        "optimizer": cfg.optimizer,
        "final_optimizer": ctl.final_optimizer,
        "rewind": ctl.rewind,
        "epochs": cfg.epochs,
        "train_seconds": train_seconds,
        "control_history": ctl.history,
    }
    if latency is not None:
        s["latency"] = latency
    return s
