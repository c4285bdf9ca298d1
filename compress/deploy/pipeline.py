"""Run-level export and bench: rebuild the model from a run directory, extract, export, measure."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compress.errors import UserError
from compress.files import atomic_write_json
from compress.runs import RUN_FILES, load_run
from compress.train.evaluate import evaluate


def export_run(
    run: str | Path, *, opset: int = 17, simplify: bool = False, align: int | None = None, console=None
) -> dict:
    """Extract the zero groups of a run, export dense.onnx and model.onnx, verify, write report.json.

    `align` None: 8 (8-aligned widths run much faster on CPU), except for runs trained to a FLOP or
    parameter budget, whose promise is on the extracted FLOPs/params: there every zero group goes.
    """
    from rich.console import Console

    from compress.deploy.extract import extract
    from compress.deploy.saving import save_compressed

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
    save_compressed(small, run / RUN_FILES["compressed"], {"model": r["config"]["model"]})
    acc = _accuracies(r, small, eval_data, console)
    onnx = {}
    for key, model, name in (
        ("dense", r["dense"], RUN_FILES["dense_onnx"]),
        ("compressed", small, RUN_FILES["model_onnx"]),
    ):
        onnx[key] = _export_verified(model, example, run / name, opset, simplify, eval_data, console)
    report = _run_report(r, small, example, ext, onnx, acc, align)
    task_report = getattr(r["model"], "compress_report", None)  # a wrapper's own figures (hf: heads, NN agreement)
    if task_report is not None:
        with console.status("task metrics of the dense and compressed models"):
            report["task"] = task_report(r["dense"], small, eval_data)
    _drop_stale_bench(run, console)
    atomic_write_json(run / RUN_FILES["report"], report)
    print_report(report, console)
    return report


def start_name(config: dict) -> str:
    """What the starting point is called: "dense" (trained weights given as `init`), else "start" — a run from
    random weights has no dense model to compare with, and the report must not call it one."""
    from compress.models import is_pretrained

    trained = config.get("init") not in (None, "random") or (
        config.get("init") is None and is_pretrained(config.get("model"))
    )
    return "dense" if trained else "start"


def _accuracies(r: dict, small, eval_data, console) -> dict:
    """Top-1 of the starting (dense), fine-tuned and compressed models on the run's held-out data."""
    if eval_data is None:
        return {}
    dev = torch.device("cpu")
    with console.status("evaluating the starting, fine-tuned and compressed models"):
        return {
            f"{start_name(r['config'])}_accuracy": evaluate(r["dense"], eval_data, dev)["accuracy"],
            "finetuned_accuracy": evaluate(r["model"], eval_data, dev)["accuracy"],
            "compressed_accuracy": evaluate(small, eval_data, dev)["accuracy"],
        }


def _export_verified(model, example, path: Path, opset, simplify, eval_data, console) -> dict:
    from compress.deploy.export import export_onnx

    with console.status(f"exporting and verifying {path.name}"):
        return export_onnx(model, example, path, opset=opset, simplify=simplify, eval_data=eval_data)


def _run_report(r: dict, small, example, ext: dict, onnx: dict, acc: dict, align: int) -> dict:
    """report.json: accuracies, sizes, FLOPs, groups and the extraction/ONNX differences."""
    from compress.structure.cost import count_flops, count_params
    from compress.structure.sparsity import zero_groups

    dense_onnx, comp_onnx = onnx["dense"], onnx["compressed"]
    flops_dense, flops_comp = count_flops(r["dense"], example), count_flops(small, example)
    start = start_name(r["config"])
    return {
        "run": str(r["run"]),
        "model": r["config"]["model"],
        "start": r["config"].get("init") or ("pretrained" if start == "dense" else "random"),  # init weights
        **acc,
        "onnx_accuracy": comp_onnx.get("onnx_accuracy"),
        f"{start}_onnx_accuracy": dense_onnx.get("onnx_accuracy"),
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
        "seq_len": _seq_len(example),
    }


def _seq_len(example) -> int | None:
    """The sequence length FLOPs were counted at, for token-id inputs (None for images etc.)."""
    x = example[0] if isinstance(example, (tuple, list)) else example
    return int(x.shape[1]) if torch.is_tensor(x) and not x.is_floating_point() and x.dim() == 2 else None


def flops_at(run: Path, seq_len: int) -> tuple[int, int]:
    """Dense and compressed FLOPs at another sequence length (attention is quadratic in it)."""
    from compress.deploy.saving import load_compressed
    from compress.runs import run_config
    from compress.structure.cost import count_flops

    config = run_config(run)
    from compress.models.userspec import resolve_model

    dense = resolve_model(config["model"]).build().eval()
    small = load_compressed(run)
    ex = tuple(torch.ones(1, seq_len, dtype=torch.long) for _ in range(2))
    return count_flops(dense, ex), count_flops(small, ex)


def print_report(report: dict, console) -> None:
    from rich.table import Table

    def pct(v):
        return "–" if v is None else f"{100 * v:.2f}%"

    start = "start" if report.get("start") == "random" else "dense"
    t = Table(title=f"compress export — {report['run']}", show_lines=False)
    t.add_column("")
    t.add_column("dense" if start == "dense" else "start (random weights)", justify="right")
    t.add_column("compressed", justify="right")
    t.add_column("ratio", justify="right")
    metric = "mean cosine" if report.get("task", {}).get("task") == "embedding" else "accuracy"  # the wrapper's score
    t.add_row(f"{metric} (torch)", pct(report.get(f"{start}_accuracy")), pct(report.get("compressed_accuracy")), "")
    t.add_row(
        f"{metric} (ONNX Runtime)", pct(report.get(f"{start}_onnx_accuracy")), pct(report.get("onnx_accuracy")), ""
    )
    t.add_row(
        "parameters",
        f"{report['params_dense']:,}",
        f"{report['params_compressed']:,}",
        f"{report['params_dense'] / max(report['params_compressed'], 1):.2f}×",
    )
    t.add_row(
        "FLOPs / sample",
        f"{report['flops_dense']:,}",
        f"{report['flops_compressed']:,}",
        f"{report['flop_ratio']:.2f}×",
    )
    t.add_row(
        "ONNX file",
        f"{report['dense_onnx_bytes'] / 1024:.1f} KiB",
        f"{report['onnx_bytes'] / 1024:.1f} KiB",
        f"{report['dense_onnx_bytes'] / max(report['onnx_bytes'], 1):.2f}×",
    )
    t.add_row(
        "groups removed (zero)",
        "",
        f"{report['groups_removed']} ({report.get('groups_zero', report['groups_removed'])}) / {report['groups_total']}",
        "",
    )
    t.add_row(
        "max |Δ| extract / ONNX", "", f"{report['max_abs_diff_extract']:.1e} / {report['max_abs_diff_onnx']:.1e}", ""
    )
    console.print(t)
    if "task" in report:
        print_task(report["task"], console)


def print_task(task: dict, console) -> None:
    """A wrapper's per-layer structure (heads, neurons: dense → kept) and its task metrics."""
    from rich.table import Table

    t = Table(title=f"structure kept ({task['task']})")
    for c in ("layer", "heads", "neurons"):
        t.add_column(c, justify="left" if c == "layer" else "right")
    for row in task["layers"]:
        t.add_row(row["layer"], *(f"{row[k][1]} / {row[k][0]}" for k in ("heads", "neurons")))
    tot = {k: [sum(r[k][i] or 0 for r in task["layers"]) for i in (0, 1)] for k in ("heads", "neurons")}
    t.add_row("total", *(f"{tot[k][1]:,} / {tot[k][0]:,}" for k in ("heads", "neurons")))
    console.print(t)
    if "cosine" in task:
        console.print(
            f"held-out ({task['sentences']} sentences): mean cosine to dense {task['cosine']:.4f}, "
            f"nearest-neighbour agreement {task['nn_agreement']:.3f}"
        )


def _drop_stale_bench(run: Path, console) -> None:
    """A new export makes the old measurements describe files that are gone: remove them."""
    from compress.runs import RUN_FILES

    stale = [run / RUN_FILES[k] for k in ("bench", "bench_plot", "bench_int8") if (run / RUN_FILES[k]).is_file()]
    for p in stale:
        p.unlink()
    if stale:
        console.print(
            f"removed {', '.join(p.name for p in stale)}: measured on the previous export; "
            f"measure again with: compress bench {run}"
        )


def bench_files(run: Path) -> dict:
    """sha256 of the ONNX files a run's bench measures: bench.json records them, inspect compares."""
    from compress.files import sha256_of

    return {name: sha256_of(run / name) for name in ("dense.onnx", "model.onnx") if (run / name).is_file()}


def bench_run(
    run: str | Path,
    *,
    batch_sizes=(1, 32),
    threads=(1, None),
    rounds: int | None = None,
    seq_len: int = 128,
    console=None,
) -> dict:
    """Benchmark RUN/dense.onnx against RUN/model.onnx; writes bench.json and bench.png.

    A run trained to a latency target (RUN/budget.json) is also timed at the target's batch and
    threads, and its measured latency is printed next to the prediction made while training."""
    from rich.console import Console

    from compress.deploy.bench import benchmark
    from compress.deploy.bench_report import plot_bench, print_bench_table

    console = console or Console()
    run = Path(run)
    dense, comp = run / RUN_FILES["dense_onnx"], run / RUN_FILES["model_onnx"]
    for p in (dense, comp):
        if not p.is_file():
            raise UserError(f"{p} does not exist; run `compress export {run}` first")
    budget_path = run / RUN_FILES["budget"]
    lat = json.loads(budget_path.read_text()).get("latency") if budget_path.is_file() else None
    lat = lat if lat and lat.get("target_ms") is not None else None
    if lat:
        batch_sizes = tuple(dict.fromkeys([*batch_sizes, lat["batch"]]))
        threads = tuple(dict.fromkeys([*threads, lat["threads"]]))
    kw = {"batch_sizes": tuple(batch_sizes), "threads": tuple(threads), "seq_len": seq_len}
    if rounds is not None:
        kw["rounds"] = rounds
    report_path = run / RUN_FILES["report"]
    if report_path.is_file():
        rep = json.loads(report_path.read_text())
        kw["flops"] = (rep["flops_dense"], rep["flops_compressed"])
        if rep.get("seq_len") not in (None, seq_len):
            kw["flops"] = flops_at(run, seq_len)
    with console.status("benchmarking ONNX Runtime: dense vs compressed, interleaved"):
        result = benchmark(dense, comp, **kw)
    if lat:
        result["latency_target"] = latency_vs_prediction(lat, result)
    result["files"] = bench_files(run)
    atomic_write_json(run / RUN_FILES["bench"], result)
    plot_bench(result, run / RUN_FILES["bench_plot"])
    print_bench_table(result, console)
    if report_path.is_file() and "task" in rep:
        print_task(rep["task"], console)
    if lat:
        print_latency_vs_prediction(result["latency_target"], console)
    if (run / "model.int8.onnx").is_file():
        from compress.deploy.quantrun import bench_quantized

        result["int8"] = bench_quantized(run, batch_sizes=batch_sizes, rounds=rounds, console=console)
    return result


def latency_vs_prediction(lat: dict, result: dict) -> dict:
    """The latency target of a budget run beside this benchmark's measurement at its batch/threads.

    The prediction is a ratio to the dense model (fit at calibration), so it is also scaled by
    the dense latency measured now: load on the machine moves both alike."""
    row = next(
        r
        for r in result["results"]
        if r["engine"] == "onnxruntime"
        and r["provider"] == "CPU"
        and r["batch"] == lat["batch"]
        and r["threads"] == lat["threads"]
    )
    measured, dense_now = row["compressed"]["median_ms"], row["dense"]["median_ms"]
    pred = lat.get("predicted_ms")
    pred_now = None if pred is None else pred / lat["dense_ms"] * dense_now
    return {
        "target_ms": lat["target_ms"],
        "batch": lat["batch"],
        "threads": lat["threads"],
        "predicted_ms": pred,
        "measured_at_training_ms": lat["measured_ms"],
        "dense_at_training_ms": lat["dense_ms"],
        "measured_ms": measured,
        "dense_ms": dense_now,
        "predicted_now_ms": pred_now,
        "prediction_error": None if pred_now is None else (pred_now - measured) / measured,
        "met": measured <= lat["target_ms"],
    }


def print_latency_vs_prediction(v: dict, console) -> None:
    pred = "–" if v["predicted_ms"] is None else f"{v['predicted_ms']:.3f} ms"
    now = (
        ""
        if v["predicted_now_ms"] is None
        else (
            f" (× today's dense {v['dense_ms']:.3f} / training's "
            f"{v['dense_at_training_ms']:.3f}: {v['predicted_now_ms']:.3f} ms, "
            f"error {100 * v['prediction_error']:+.1f}%)"
        )
    )
    console.print(
        f"latency target {v['target_ms']:g} ms (batch {v['batch']}, {v['threads']} thread"
        f"{'s' * (v['threads'] > 1)}): measured {v['measured_ms']:.3f} ms "
        f"({'met' if v['met'] else 'NOT met'}), predicted {pred}{now}; "
        f"measured at training {v['measured_at_training_ms']:.3f} ms"
    )
