"""finetune_to_budget: a fine-tuning run whose λ the controller sets, with resume and a report."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress.budget.controller import BudgetController
from compress.budget.latency import LatencyModel
from compress.budget.patterns import ZeroKeeper, enforce
from compress.budget.target import Budget
from compress.errors import UserError
from compress.files import atomic_write_json
from compress.optim.cosine_adamw import CosineAdamW
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


BUDGET_FILES = {"summary": "budget.json", "state": "budget_state.json"}


def finetune_to_budget(model: nn.Module, train_data, eval_data, example_inputs, out, config=None,
                       budget: Budget | None = None, *, groups=None, resume: bool = False,
                       controller: dict | None = None, align: int | None = None,
                       final_optimizer: str | None = None, rewind: str | None = None, measure_latency: bool | None = None,
                       latency_calibration=(0.75, 0.5, 0.3), latency_time_budget_s: float = 1.5,
                       console=None, **finetune_kwargs) -> BudgetRunResult:
    """Fine-tune `model` so that the exported model meets `budget`; λ is found by the controller.

    `config.lam` (if > 0) is only λ's starting value; `config.milestones=None` means one lr decay
    at 3/4 of the epochs, where the final phase (frozen structure) begins (`budget_config`). `controller`: keyword
    arguments for `BudgetController` (freeze_epoch, plan_end, gain, tol, revive, final_lr, ...).
    `final_optimizer`: "adamw" or "same" (`BudgetController`; None: its default). `rewind`: "init" resets
    the model to its starting weights (out/init.safetensors) at the freeze, before the AdamW phase. `align`: at the freeze every
    channel/neuron width keeps a multiple of this many groups (`align_widths`; None: `simd_block()`,
    1: off), so the exported model runs on ONNX Runtime's blocked kernels. Other keyword
    arguments go to `compress.train.finetune` (force, init_weights, run_info, loss_fn, callbacks,
    progress, ...). After training the zero groups are extracted and
    counted for real, a latency target (or `measure_latency=True`) is measured with ONNX
    Runtime, and out/budget.json states target, achieved and dense cost side by side.
    """
    import json

    from rich.console import Console

    from compress.deploy.extract import extract
    from compress.runs import RUN_FILES
    from compress.structure.find import find_groups
    from compress.structure.group import load_groups
    from compress.structure.sparsity import zero_mask
    from compress.train import checkpoint as ckpt
    from compress.train.checkpoint import save_weights
    from compress.train.config import TrainConfig
    from compress.train.data import num_batches, to_device
    from compress.train.evaluate import evaluate, recalibrate_batchnorm
    from compress.train.loop import finetune

    console = console or Console()
    out = Path(out)
    restore = None
    if resume:
        cfg_path = out / RUN_FILES["config"]
        if not cfg_path.is_file():
            raise UserError(f"{out} is not a run directory (no {RUN_FILES['config']}); nothing to resume")
        saved = json.loads(cfg_path.read_text())
        if "budget" not in saved:
            raise UserError(f"{out} was not trained to a budget; resume it with compress finetune --resume")
        budget = Budget(**saved["budget"])
        cfg = TrainConfig(**saved["train"])
        # runs saved before the option existed trained their final phase with the same optimizer
        controller = {"final_optimizer": "same", **saved.get("budget_controller", {}), **(controller or {})}
        groups = load_groups(out / RUN_FILES["groups"], model)
        state_path = out / BUDGET_FILES["state"]
        restore = json.loads(state_path.read_text()) if state_path.is_file() else None
        info = ckpt.load_checkpoint(out / RUN_FILES["checkpoint"])["info"]
    else:
        if budget is None:
            raise UserError("finetune_to_budget needs a budget, e.g. Budget(flops=0.5)")
        cfg = budget_config(config or TrainConfig())
        info = None
    if budget.kind == "latency" and int(__import__("os").environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("a latency target is measured on this machine and cannot be used under torchrun; "
                        "use --target-flops or --target-params for data-parallel runs")
    if cfg.optimizer == "adamw":
        raise UserError("a budget needs a group-sparse optimizer (ramda, rmda, proxsgd or proxadam); adamw trains dense models")
    lam0 = (controller or {}).get("lam0") or (cfg.lam if cfg.lam > 0 else 1e-4)
    if not resume:
        cfg = dataclasses.replace(cfg, lam=lam0)
    example = to_device(example_inputs, torch.device("cpu"))
    model_cpu_example = example
    if groups is None:
        groups = find_groups(model, model_cpu_example, weight=cfg.group_weight)
    cm = CostModel(model, groups, model_cpu_example)
    budget.check_reachable(cm)
    dense = {"flops": cm.dense_flops, "params": cm.dense_params}

    latency = None
    target = None
    if budget.kind == "latency" or measure_latency:
        latency = LatencyModel(model, groups, model_cpu_example, cm, batch=budget.batch, threads=budget.threads,
                               time_budget_s=latency_time_budget_s, log=console.print)
        if restore and restore.get("latency"):
            lt = restore["latency"]
            latency.points, latency.fit = lt["points"], tuple(lt["fit"])
            latency.fit_calibration = tuple(lt["fit_calibration"]) if lt.get("fit_calibration") else None
            latency.min_point = lt["min_point"]
        elif budget.kind == "latency":
            with console.status("measuring latency at calibration patterns (extract → ONNX → ONNX Runtime)"):
                latency.calibrate(latency_calibration, target_ms=budget.latency_ms)
        if budget.kind == "latency":
            target = restore["target"] if restore else latency.flops_for(budget.latency_ms)
            console.print(f"budget: {budget.describe()} → blocked-FLOP fraction {target:.4f} "
                          f"(fit latency/dense = {latency.fit[0]:.3f} + {latency.fit[1]:.3f}·blocked FLOPs)")

    ctl_kw = {k: v for k, v in (controller or {}).items() if k != "lam0"}
    if align is not None:
        ctl_kw["align"] = align
    if final_optimizer is not None:
        ctl_kw["final_optimizer"] = final_optimizer
    if rewind is not None:
        ctl_kw["rewind"] = rewind

    def start_weights():  # what finetune saved before its first step (also there when resuming before the freeze)
        from safetensors.torch import load_file

        return load_file(out / RUN_FILES["init"])

    ctl = BudgetController(budget, cm, groups, cfg, num_batches(train_data, cfg.batch_size), target=target,
                           lam0=lam0, latency=latency if budget.kind == "latency" else None,
                           bn_data=train_data, log=console.print, rewind_weights=start_weights, **ctl_kw)
    if restore:
        ctl.counts, ctl.history, ctl.freeze_info = restore["counts"], restore["history"], restore["freeze_info"]
        ctl.target = restore["target"]
        if restore.get("frozen") is not None and restore["freeze_info"].get("epoch") and info["epoch"] >= restore["freeze_info"]["epoch"]:
            mask = torch.zeros(len(groups), dtype=torch.bool)
            mask[restore["frozen"]] = True
            ctl.frozen, ctl.keeper = mask, ZeroKeeper(groups, mask)
        ctl.step = info["epoch"] * ctl.steps_per_epoch + info["batch"]
    if ctl.keeper is not None and ctl.final_optimizer == "adamw":  # the checkpoint holds the final phase's AdamW
        finetune_kwargs["build_optimizer"] = lambda cfg, model, groups: ctl.make_final_optimizer(model)

    def save_state(st):
        extra = ctl.on_epoch(st)
        s = ctl.state()
        if latency is not None and latency.fit is not None:
            s["latency"] = {"points": latency.points, "fit": list(latency.fit), "min_point": latency.min_point,
                            "fit_calibration": list(latency.fit_calibration) if latency.fit_calibration else None}
        if out.is_dir():
            atomic_write_json(out / BUDGET_FILES["state"], s)
        return extra

    user_epoch = list(finetune_kwargs.pop("epoch_callbacks", ()))
    user_step = list(finetune_kwargs.pop("step_callbacks", ()))
    run_info = dict(finetune_kwargs.pop("run_info", None) or {})
    run_info["budget"] = dataclasses.asdict(budget)
    run_info["budget_controller"] = {**ctl_kw, "freeze_epoch": ctl.freeze_epoch, "lam0": lam0, "align": ctl.align,
                                     "final_optimizer": ctl.final_optimizer, "rewind": ctl.rewind}
    t0 = time.perf_counter()
    result = finetune(model, train_data, eval_data, example_inputs, out, None if resume else cfg, groups=groups,
                      resume=resume, run_info=run_info, epoch_callbacks=[save_state, *user_epoch],
                      step_callbacks=[ctl.on_step, *user_step], console=console, **finetune_kwargs)
    train_s = time.perf_counter() - t0
    model = result.model
    device = next(model.parameters()).device

    # ---- the promise: the exported point holds the target
    final_zero = zero_mask(groups).cpu()
    post_hoc = 0
    if ctl.frozen is None:  # training ended before the freeze epoch (e.g. interrupted schedule)
        ctl.freeze(result.optimizer, model, cfg, cfg.epochs - 1)
        final_zero = zero_mask(groups).cpu()
    if float(cm.cost(final_zero, ctl.kind)) > ctl.target:
        mask, added = enforce(cm, final_zero, torch.as_tensor(
            __import__("compress.groups", fromlist=["group_norms"]).group_norms(groups)).cpu(), ctl.kind, ctl.target)
        ZeroKeeper(groups, mask).apply()
        post_hoc = int(added.sum())
        final_zero = zero_mask(groups).cpu()
    acc = {}
    # finetune recalibrates BatchNorm when it commits RAMDA's Ŵ; the AdamW phase ends on W (its running
    # statistics), and a post-hoc removal changes the point: recalibrate like every epoch's evaluation did
    if post_hoc or isinstance(result.optimizer, CosineAdamW):
        recalibrate_batchnorm(model, train_data, device)
        save_weights(out / RUN_FILES["weights"], model)

    was = model.training
    small, rep = extract(model.cpu(), groups, model_cpu_example)
    model.to(device).train(was)
    achieved = {"flops": rep["flops_after"], "params": rep["params_after"],
                "flops_fraction": rep["flops_after"] / dense["flops"], "params_fraction": rep["params_after"] / dense["params"],
                "flops_predicted": cm.flops(final_zero), "params_predicted": cm.params(final_zero)}
    if eval_data is not None:
        acc["accuracy"] = evaluate(small, eval_data, torch.device("cpu"))["accuracy"]
    lat = None
    if latency is not None:
        predicted = latency.predict(final_zero) if latency.fit else None
        predicted_cal = latency.predict(final_zero, latency.fit_calibration) if latency.fit_calibration else None
        with console.status("measuring the latency of the compressed model"):
            pt = latency.measure(final_zero, model=small, tag="final model")
        meas = latency.latency_of(pt)
        lat = {"measured_ms": meas, "measured_raw_ms": pt["latency_ms"], "dense_ms": latency.dense_ms,
               "dense_raw_ms": pt["dense_ms"], "ratio_to_dense": pt["ratio"], "target_ms": budget.latency_ms,
               "batch": budget.batch, "threads": pt["threads"],
               "measured_note": "ratio to the dense model timed interleaved in the same run × the dense model's "
                                "median latency over all runs of this session",
               # from the fit to the calibration patterns only (before training): the model's own prediction
               "predicted_ms": predicted_cal,
               "prediction_error": None if predicted_cal is None else (predicted_cal - meas) / meas,
               # refit on every pattern measured before the final export, incl. the freeze probes (one of
               # which has the final architecture): a consistency check of the measurements, not a model
               "predicted_ms_refit": predicted,
               "prediction_error_refit": None if predicted is None else (predicted - meas) / meas}
        if latency.fit:
            lat["table"] = latency.table()
            atomic_write_json(out / "latency.json", latency.table())
        achieved["latency_ms"] = meas
    summary = budget_summary(budget, ctl, dense, achieved, acc, result.metrics, lat, post_hoc, train_s, cfg)
    atomic_write_json(out / BUDGET_FILES["summary"], summary)
    return BudgetRunResult(out=result.out, metrics=result.metrics, model=model, optimizer=result.optimizer,
                           groups=groups, budget=summary)


def budget_config(cfg) -> "TrainConfig":
    """`cfg` resolved for a budget run (the CLI and the API share this): with `milestones=None` and a
    step schedule, one lr decay where the final phase starts (3/4 of the epochs) instead of the
    plain runs' two — the frozen structure then trains at lr·γ and settles (digits-resnet at 0.5
    FLOPs: 0.993 vs 0.891 with no decay, same dense start)."""
    if cfg.milestones is None and cfg.schedule == "step" and cfg.epochs >= 4:
        cfg = dataclasses.replace(cfg, milestones=[round(0.75 * cfg.epochs)])
    cfg = cfg.resolved()
    cfg.validate()
    return cfg


def budget_summary(budget: Budget, ctl: BudgetController, dense: dict, achieved: dict, accuracy: dict,
                   metrics: list, latency: dict | None, post_hoc: int, train_seconds: float, cfg) -> dict:
    """Target, achieved and dense cost side by side, how λ ended, and who removed which groups."""
    kind = budget.kind
    s = {
        "target": {"kind": kind, "value": budget.target, "describe": budget.describe(),
                   "controlled_as": {"kind": ctl.kind, "fraction": ctl.target}},
        "dense": dense,
        "achieved": achieved,
        "met": (achieved["latency_ms"] <= budget.target if kind == "latency"
                else achieved[f"{kind}_fraction"] <= budget.target),
        **accuracy,
        "lam_final": ctl.freeze_info.get("lam_at_freeze"),  # λ that produced the frozen pattern
        "lam_final_phase": ctl.final_lam,
        "groups_total": ctl.cm.n_groups,
        "removed_by_optimizer": ctl.counts["removed_by_optimizer"],
        "removed_by_enforcement": ctl.counts["removed_by_enforcement"] + post_hoc,
        "removed_by_alignment": ctl.counts.get("removed_by_alignment", 0),
        "align": ctl.freeze_info.get("alignment", {}).get("align", 1),
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
