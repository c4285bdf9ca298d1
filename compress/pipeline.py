"""Run-directory steps after training: `export_run` (extract → ONNX → verify → report) and `bench_run`.

A run directory is self-describing: config.json names the model and data, so these
steps rebuild everything from files and never need the Python objects of training.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .io import UserError, atomic_write_json
from .train import RUN_FILES, evaluate


def load_run(run: str | Path) -> dict:
    """Config, model spec, data and groups of a finished run (weights loaded = the structured point)."""
    from .groups import load_groups
    from .userspec import parse_input_shape, resolve_data, resolve_model

    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist; create one with: compress finetune --out {run}")
    cfg_path = run / RUN_FILES["config"]
    if not cfg_path.is_file():
        raise UserError(f"{run} is not a run directory (no {RUN_FILES['config']})")
    config = json.loads(cfg_path.read_text())
    if "model" not in config:
        raise UserError(f"{run} was made from Python with a model object; export it with compress.extract and "
                        "compress.export_onnx")
    weights = run / RUN_FILES["weights"]
    if not weights.is_file():
        raise UserError(f"{run} has no {RUN_FILES['weights']}: training did not finish; "
                        f"continue it with: compress finetune --resume {run}")
    spec = resolve_model(config["model"], parse_input_shape(config.get("input_shape")))
    model = spec.build()
    ckpt.load_into(model, ckpt.load_weights(weights), str(weights))
    dense = spec.build()
    ckpt.load_into(dense, ckpt.load_weights(run / RUN_FILES["init"]), str(run / RUN_FILES["init"]))
    data = resolve_data(config["data"]) if config.get("data") else (spec.data() if spec.data else None)
    groups = load_groups(run / RUN_FILES["groups"], model)
    return {"run": run, "config": config, "spec": spec, "model": model.eval(), "dense": dense.eval(),
            "data": data, "groups": groups}


def export_run(run: str | Path, *, opset: int = 17, simplify: bool = False, align: int | None = None,
               console=None) -> dict:
    """Extract the zero groups of a run, export dense.onnx and model.onnx, verify, write report.json.

    `align` None: 8 (8-aligned widths run much faster on CPU), except for runs trained to a FLOP or
    parameter budget, whose promise is on the extracted FLOPs/params: there every zero group goes.
    """
    from rich.console import Console

    from .cost import count_flops, count_params
    from .export import export_onnx
    from .extract import extract
    from .groups import zero_groups

    console = console or Console()
    r = load_run(run)
    run = r["run"]
    if align is None:
        budget = r["config"].get("budget") or {}
        align = 1 if budget.get("flops") is not None or budget.get("params") is not None else 8
    example = r["spec"].example_input(1)
    eval_data = r["data"][1] if r["data"] else None

    with console.status("extracting zero groups"):
        small, ext = extract(r["model"], r["groups"], example, align=align)
    from .saving import save_compressed

    save_compressed(small, run / "compressed.safetensors", {"model": r["config"]["model"]})
    dev = torch.device("cpu")
    acc = {}
    if eval_data is not None:
        with console.status("evaluating dense, fine-tuned and compressed models"):
            acc["dense_accuracy"] = evaluate(r["dense"], eval_data, dev)["accuracy"]
            acc["finetuned_accuracy"] = evaluate(r["model"], eval_data, dev)["accuracy"]
            acc["compressed_accuracy"] = evaluate(small, eval_data, dev)["accuracy"]
    with console.status("exporting and verifying dense.onnx"):
        dense_onnx = export_onnx(r["dense"], example, run / "dense.onnx", opset=opset, simplify=simplify,
                                 eval_data=eval_data)
    with console.status("exporting and verifying model.onnx"):
        comp_onnx = export_onnx(small, example, run / "model.onnx", opset=opset, simplify=simplify,
                                eval_data=eval_data)
    flops_dense, flops_comp = count_flops(r["dense"], example), count_flops(small, example)
    report = {
        "run": str(run),
        "model": r["config"]["model"],
        **acc,
        "onnx_accuracy": comp_onnx.get("onnx_accuracy"),
        "dense_onnx_accuracy": dense_onnx.get("onnx_accuracy"),
        "params_dense": count_params(r["dense"]),
        "params_compressed": count_params(small),
        "flops_dense": flops_dense,
        "flops_compressed": flops_comp,
        "flop_ratio": flops_dense / max(flops_comp, 1),
        "groups_total": len(r["groups"]),
        "groups_zero": len(zero_groups(r["groups"])),
        "groups_removed": ext["groups_removed"],
        "align": align,
        "max_abs_diff_extract": ext["max_abs_diff"],
        "max_abs_diff_onnx": comp_onnx["max_abs_diff"],
        "max_rel_diff_onnx": comp_onnx.get("max_rel_diff"),
        "dense_onnx_bytes": dense_onnx["file_bytes"],
        "onnx_bytes": comp_onnx["file_bytes"],
        "extraction": {k: v for k, v in ext.items() if k != "max_abs_diff"},
    }
    atomic_write_json(run / "report.json", report)
    print_report(report, console)
    return report


def print_report(report: dict, console) -> None:
    from rich.table import Table

    def pct(v):
        return "–" if v is None else f"{100 * v:.2f}%"

    t = Table(title=f"compress export — {report['run']}", show_lines=False)
    t.add_column("")
    t.add_column("dense", justify="right")
    t.add_column("compressed", justify="right")
    t.add_column("ratio", justify="right")
    t.add_row("accuracy (torch)", pct(report.get("dense_accuracy")), pct(report.get("compressed_accuracy")), "")
    t.add_row("accuracy (ONNX Runtime)", pct(report.get("dense_onnx_accuracy")), pct(report.get("onnx_accuracy")), "")
    t.add_row("parameters", f"{report['params_dense']:,}", f"{report['params_compressed']:,}",
              f"{report['params_dense'] / max(report['params_compressed'], 1):.2f}×")
    t.add_row("FLOPs / sample", f"{report['flops_dense']:,}", f"{report['flops_compressed']:,}",
              f"{report['flop_ratio']:.2f}×")
    t.add_row("ONNX file", f"{report['dense_onnx_bytes'] / 1024:.1f} KiB", f"{report['onnx_bytes'] / 1024:.1f} KiB",
              f"{report['dense_onnx_bytes'] / max(report['onnx_bytes'], 1):.2f}×")
    t.add_row("groups removed (zero)", "", f"{report['groups_removed']} ({report.get('groups_zero', report['groups_removed'])}) / {report['groups_total']}", "")
    t.add_row("max |Δ| extract / ONNX", "", f"{report['max_abs_diff_extract']:.1e} / {report['max_abs_diff_onnx']:.1e}", "")
    console.print(t)


def bench_run(run: str | Path, *, batch_sizes=(1, 32), threads=(1, None), rounds: int | None = None,
              console=None) -> dict:
    """Benchmark RUN/dense.onnx against RUN/model.onnx; writes bench.json and bench.png.

    A run trained to a latency target (RUN/budget.json) is also timed at the target's batch and
    threads, and its measured latency is printed next to the prediction made while training."""
    from rich.console import Console

    from .bench import benchmark, plot_bench, print_bench_table

    console = console or Console()
    run = Path(run)
    dense, comp = run / "dense.onnx", run / "model.onnx"
    for p in (dense, comp):
        if not p.is_file():
            raise UserError(f"{p} does not exist; run `compress export {run}` first")
    budget_path = run / "budget.json"
    lat = json.loads(budget_path.read_text()).get("latency") if budget_path.is_file() else None
    lat = lat if lat and lat.get("target_ms") is not None else None
    if lat:
        batch_sizes = tuple(dict.fromkeys([*batch_sizes, lat["batch"]]))
        threads = tuple(dict.fromkeys([*threads, lat["threads"]]))
    kw = {"batch_sizes": tuple(batch_sizes), "threads": tuple(threads)}
    if rounds is not None:
        kw["rounds"] = rounds
    report_path = run / "report.json"
    if report_path.is_file():
        rep = json.loads(report_path.read_text())
        kw["flops"] = (rep["flops_dense"], rep["flops_compressed"])
    with console.status("benchmarking ONNX Runtime: dense vs compressed, interleaved"):
        result = benchmark(dense, comp, **kw)
    if lat:
        result["latency_target"] = latency_vs_prediction(lat, result)
    atomic_write_json(run / "bench.json", result)
    plot_bench(result, run / "bench.png")
    print_bench_table(result, console)
    if lat:
        print_latency_vs_prediction(result["latency_target"], console)
    return result


def latency_vs_prediction(lat: dict, result: dict) -> dict:
    """The latency target of a budget run beside this benchmark's measurement at its batch/threads.

    The prediction is a ratio to the dense model (fit at calibration), so it is also scaled by
    the dense latency measured now: load on the machine moves both alike."""
    row = next(r for r in result["results"] if r["engine"] == "onnxruntime" and r["provider"] == "CPU"
               and r["batch"] == lat["batch"] and r["threads"] == lat["threads"])
    measured, dense_now = row["compressed"]["median_ms"], row["dense"]["median_ms"]
    pred = lat.get("predicted_ms")
    pred_now = None if pred is None else pred / lat["dense_ms"] * dense_now
    return {"target_ms": lat["target_ms"], "batch": lat["batch"], "threads": lat["threads"],
            "predicted_ms": pred, "measured_at_training_ms": lat["measured_ms"], "dense_at_training_ms": lat["dense_ms"],
            "measured_ms": measured, "dense_ms": dense_now, "predicted_now_ms": pred_now,
            "prediction_error": None if pred_now is None else (pred_now - measured) / measured,
            "met": measured <= lat["target_ms"]}


def print_latency_vs_prediction(v: dict, console) -> None:
    pred = "–" if v["predicted_ms"] is None else f"{v['predicted_ms']:.3f} ms"
    now = "" if v["predicted_now_ms"] is None else (f" (× today's dense {v['dense_ms']:.3f} / training's "
                                                    f"{v['dense_at_training_ms']:.3f}: {v['predicted_now_ms']:.3f} ms, "
                                                    f"error {100 * v['prediction_error']:+.1f}%)")
    console.print(f"latency target {v['target_ms']:g} ms (batch {v['batch']}, {v['threads']} thread"
                  f"{'s' * (v['threads'] > 1)}): measured {v['measured_ms']:.3f} ms "
                  f"({'met' if v['met'] else 'NOT met'}), predicted {pred}{now}; "
                  f"measured at training {v['measured_at_training_ms']:.3f} ms")
