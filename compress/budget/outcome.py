"""What a budget run achieved: the target held at the exported point, the cost counted on the extracted
model, its measured latency beside the latency model's prediction, and budget.json's summary."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from compress.budget.controller import BudgetController
from compress.budget.latency import LatencyModel
from compress.budget.patterns import ZeroKeeper, enforce
from compress.budget.target import Budget
from compress.files import atomic_write_json
from compress.optim.dense import CosineAdamW
from compress.runs import RUN_FILES


def hold_target(out: Path, result, ctl: BudgetController, setup, train_data) -> tuple[torch.Tensor, int]:
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


def achieved_cost(model, setup, final_zero, eval_data) -> tuple[dict, dict, nn.Module]:
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


def latency_report(out: Path, latency: LatencyModel, final_zero, small, budget: Budget, console) -> dict:
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
