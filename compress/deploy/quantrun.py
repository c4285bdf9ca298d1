"""INT8 for a run directory: quantize its dense and pruned ONNX files, and time all four side by side.

Why: users ship pruned models quantized, and want to see what pruning adds on top of INT8 (and
whether INT8 pays at all on their CPU). The pruned model is the deliverable, so its INT8 file
must pass the accuracy check (or nothing is written); the dense INT8 file is only a point of
comparison, so a dense refusal is reported, not raised.
"""

from __future__ import annotations

import json
from pathlib import Path

from compress.deploy import calibration as cal
from compress.errors import UserError
from compress.files import atomic_write_json

INT8_FILES = {"model.onnx": "model.int8.onnx", "dense.onnx": "dense.int8.onnx"}
QUANT_REPORT, QUANT_BENCH = "quantize.json", "bench_int8.json"


def run_arrays(run: Path, fp32: Path, n_calibration: int, seed: int, max_held_out: int = 2000):
    """Calibration inputs (seeded sample of the training data) and held-out inputs + labels (test data)."""
    from compress.runs import load_run

    r = load_run(run)
    if not r["data"] or r["data"][1] is None:
        raise UserError(
            f"{run} has no training and held-out data to calibrate on; quantize its ONNX file "
            "with compress.quantize_onnx and your own calibration arrays"
        )
    train, test = r["data"]
    names = [n for n, _, _ in cal.model_inputs(fp32)]
    cal_idx, _ = cal.split(len(train), n_calibration, seed)
    cal_feeds, _ = cal.dataset_arrays(train, cal_idx, names)
    held_idx, _ = cal.split(len(test), max_held_out, seed)
    held, labels = cal.dataset_arrays(test, held_idx, names)
    return cal_feeds, held, labels, cal_idx


def quantize_run(
    run,
    *,
    max_accuracy_drop: float | None = None,
    n_calibration: int = 256,
    seed: int = 0,
    rounds: int | None = None,
    console=None,
) -> dict:
    """RUN/model.onnx → RUN/model.int8.onnx (verified), and RUN/dense.onnx → RUN/dense.int8.onnx; RUN/quantize.json."""
    from rich.console import Console

    from compress.deploy.quantize import quantize_arrays

    console = console or Console()
    run = Path(run)
    for src in INT8_FILES:
        if not (run / src).is_file():
            raise UserError(f"{run / src} does not exist; export the run first")
    cal_feeds, held, labels, cal_idx = run_arrays(run, run / "model.onnx", n_calibration, seed)
    inputs = cal.model_inputs(run / "model.onnx")
    reports = {}
    for src, dst in INT8_FILES.items():
        with console.status(f"quantizing {src}: calibrating, verifying and timing each INT8 form"):
            try:
                reports[src] = quantize_arrays(
                    run / src,
                    run / dst,
                    inputs,
                    cal_feeds,
                    held,
                    labels,
                    max_accuracy_drop=max_accuracy_drop,
                    rounds=rounds,
                )
            except UserError as e:
                if src == "model.onnx":
                    raise
                (run / dst).unlink(missing_ok=True)  # a stale dense INT8 file would mislead the benchmark
                reports[src] = {"refused": str(e)}
    result = {
        "calibration": {"samples": len(cal_idx), "seed": seed, "indices": cal_idx.tolist(), "source": "training data"},
        "held_out": {"samples": len(labels), "source": "test data"},
        "files": reports,
        "recommended": reports["model.onnx"]["recommended"],
    }
    atomic_write_json(run / QUANT_REPORT, result)
    _note_in_export_report(run, result)
    print_quantize(result, console)
    return result


def _note_in_export_report(run: Path, result: dict) -> None:
    path = run / "report.json"
    if path.is_file():
        rep = json.loads(path.read_text())
        m = result["files"]["model.onnx"]
        rep["int8"] = {
            k: m.get(k)
            for k in (
                "int8",
                "form",
                "kind",
                "fp32_accuracy",
                "int8_accuracy",
                "cosine_mean",
                "max_abs_diff",
                "mean_abs_diff",
                "int8_faster",
                "note",
            )
        }
        rep["recommended_file"] = Path(result["recommended"]).name
        atomic_write_json(path, rep)


def print_quantize(result: dict, console) -> None:
    from rich.table import Table

    t = Table(title="INT8 quantization: held-out check and latency (ONNX Runtime, 1 thread)")
    for col in ("file", "form", "accuracy FP32 → INT8", "max / mean |Δ|", "ms b1 FP32 → INT8", "ms b32 FP32 → INT8"):
        t.add_column(col, justify="left" if col in ("file", "form") else "right")
    for src, r in result["files"].items():
        if "refused" in r:
            t.add_row(INT8_FILES[src], "refused", r["refused"], "", "", "")
            continue
        acc = (
            f"{r['fp32_accuracy']:.2f}% → {r['int8_accuracy']:.2f}%"
            if r["kind"] == "accuracy"
            else f"cos {r['cosine_mean']:.4f}"
        )
        lat = r["latency"]["by_batch"]
        t.add_row(
            Path(r["int8"]).name,
            r["form"],
            acc,
            f"{r['max_abs_diff']:.3g} / {r['mean_abs_diff']:.3g}",
            *(f"{lat[b]['fp32_ms']:.3f} → {lat[b]['int8_ms']:.3f}" if b in lat else "–" for b in ("1", "32")),
        )
    console.print(t)
    m = result["files"]["model.onnx"]
    if m.get("held_out_is_calibration"):
        console.print(
            "[yellow]no sample was left after calibration: the check above ran on the calibration "
            "samples themselves; give held-out data for a real check[/]"
        )
    console.print(f"{m['note']}. Recommended file: {Path(result['recommended']).name}")


def bench_quantized(run, *, batch_sizes=(1, 32), rounds: int | None = None, console=None) -> dict | None:
    """Dense FP32 / pruned FP32 / dense INT8 / pruned INT8 at 1 thread; RUN/bench_int8.json.

    Each INT8 file is timed interleaved with its own FP32 file (the comparison that decides
    whether to ship it), so the dense and pruned columns come from two interleaved pairs. An INT8
    file older than its FP32 file (the run was exported again without quantizing) is skipped: None
    when that is the pruned one."""
    from rich.console import Console

    from compress.deploy.bench import benchmark

    console = console or Console()
    run = Path(run)
    if not (run / "model.int8.onnx").is_file():
        raise UserError(f"{run} has no model.int8.onnx; export the run with INT8 quantization first")
    stale = [
        d
        for s, d in INT8_FILES.items()
        if (run / d).is_file() and (run / d).stat().st_mtime < (run / s).stat().st_mtime
    ]
    for d in stale:
        console.print(
            f"[yellow]{d} is older than the FP32 file it was made from (the run was exported again "
            "since): not benchmarked; export again with INT8 quantization[/]"
        )
    if "model.int8.onnx" in stale:
        return None
    kw = {"batch_sizes": tuple(batch_sizes), "threads": (1,), "providers": ["CPUExecutionProvider"]}
    if rounds is not None:
        kw["rounds"] = rounds
    cols = {}
    for src, dst in INT8_FILES.items():
        if not (run / dst).is_file() or dst in stale:
            continue
        with console.status(f"benchmarking {src} vs {dst}, interleaved"):
            rep = benchmark(str(run / src), str(run / dst), **kw)
        for r in rep["results"]:
            if r["engine"] == "onnxruntime":
                cols.setdefault(str(r["batch"]), {})[src] = r["dense"]["median_ms"]
                cols[str(r["batch"])][dst] = r["compressed"]["median_ms"]
    qpath = run / QUANT_REPORT
    quant = json.loads(qpath.read_text()) if qpath.is_file() else None
    result = {"threads": 1, "median_ms": cols, "accuracy": _accuracies(quant), "notes": _speed_notes(cols)}
    atomic_write_json(run / QUANT_BENCH, result)
    print_bench_quantized(result, console)
    return result


def _accuracies(quant: dict | None) -> dict:
    """Held-out accuracy (%) of each file, or cosine of each INT8 file to its FP32 file (FP32 = 1)."""
    if not quant:
        return {}
    out = {}
    for src, r in quant["files"].items():
        if "refused" in r:
            continue
        cls = r["kind"] == "accuracy"
        out["kind"] = r["kind"]
        out[src] = r["fp32_accuracy"] if cls else 1.0
        out[INT8_FILES[src]] = r["int8_accuracy"] if cls else r["cosine_mean"]
    return out


def _speed_notes(cols: dict) -> list[str]:
    notes = []
    for src, dst in INT8_FILES.items():
        for b, row in cols.items():
            if dst in row and row[dst] >= row[src]:
                notes.append(
                    f"{dst} is SLOWER than {src} on this CPU at batch {b} ({row[dst]:.3f} vs "
                    f"{row[src]:.3f} ms, 1 thread): ship {src} for this batch size"
                )
    return notes


def print_bench_quantized(result: dict, console) -> None:
    from rich.table import Table

    names = ("dense.onnx", "model.onnx", "dense.int8.onnx", "model.int8.onnx")
    heads = ("dense FP32", "pruned FP32", "dense INT8", "pruned INT8")
    t = Table(title="ONNX Runtime median latency, 1 thread (each INT8 file interleaved with its FP32 file)")
    t.add_column("")
    for h in heads:
        t.add_column(h, justify="right")
    for b, row in result["median_ms"].items():
        t.add_row(f"batch {b} (ms)", *(f"{row[n]:.3f}" if n in row else "–" for n in names))
    acc = result["accuracy"]
    if acc:
        cls = acc["kind"] == "accuracy"
        t.add_row(
            "held-out accuracy" if cls else "cosine to its FP32 file",
            *((f"{acc[n]:.2f}%" if cls else f"{acc[n]:.4f}") if n in acc else "–" for n in names),
        )
    console.print(t)
    for n in result["notes"]:
        console.print(f"[yellow]{n}[/]")
