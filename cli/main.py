"""`compress` command line: a thin typer layer over the Python API.

User mistakes (compress.errors.UserError) print one red line, naming the flag of the library field at
fault, and exit with code 2; `compress --debug ...` shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import options as o

app = typer.Typer(
    help="Compress a PyTorch model: group-sparse fine-tuning (RAMDA) → extraction of the zero "
    "structures → verified ONNX export → ONNX Runtime latency benchmark.\n\n"
    "Typical use:  compress finetune --model digits-resnet --out runs/r1 ; compress export runs/r1 ; "
    "compress bench runs/r1",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
_DEBUG = {"on": bool(os.environ.get("COMPRESS_DEBUG"))}


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False):
    _DEBUG["on"] = _DEBUG["on"] or debug


_FLAG_OF = {"flops": "--target-flops", "params": "--target-params", "latency_ms": "--target-latency-ms"}


def flag_of(field: str) -> str:
    """The flag of a library field: `target_flops` → --target-flops (a Budget's `flops` too)."""
    return _FLAG_OF.get(field, "--" + field.replace("_", "-"))


def user_errors(fn):
    """Turn UserError into a one-line message naming flags, exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from rich.markup import escape

        from compress.errors import TrainingInterrupted, UserError

        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if _DEBUG["on"]:
                raise
            err_console.print(f"[bold red]error:[/] {escape(e.render(flag_of))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except TrainingInterrupted as e:
            err_console.print(f"[yellow]{escape(str(e))}[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@user_errors
def finetune(
    model: o.Model = None,
    out: o.Out = None,
    data: o.Data = None,
    input_shape: o.InputShape = None,
    output: o.Output = None,
    epochs: o.Epochs = None,
    lr: o.Lr = None,
    lam: o.Lam = None,
    optimizer: o.Optimizer = None,
    reg_space: o.RegSpace = None,
    dsgd_k: o.DsgdK = None,
    momentum: o.Momentum = None,
    batch_size: o.BatchSize = None,
    milestones: o.Milestones = None,
    gamma: o.Gamma = None,
    schedule: o.Schedule = None,
    weight_decay: o.WeightDecay = None,
    group_weight: o.GroupWeight = None,
    solver: o.Solver = None,
    seed: o.Seed = None,
    init: o.Init = None,
    device: o.Device = None,
    threads: o.Threads = None,
    distill: o.Distill = None,
    distill_temperature: o.DistillTemperature = None,
    distill_alpha: o.DistillAlpha = None,
    target_flops: o.TargetFlops = None,
    target_params: o.TargetParams = None,
    target_latency_ms: o.TargetLatencyMs = None,
    bench_batch: o.BenchBatch = None,
    bench_threads: o.BenchThreads = None,
    final_optimizer: o.FinalOptimizer = None,
    align: o.Align = None,
    rewind: o.Rewind = None,
    final_lr: o.FinalLr = None,
    freeze_epoch: o.FreezeEpoch = None,
    config: o.Config = None,
    resume: o.Resume = None,
    force: o.Force = False,
    quiet: o.Quiet = False,
):
    """Fine-tune with group lasso so whole channels / heads / neurons become exactly zero.

    Writes RUN/: config.json, groups.json, init.safetensors, checkpoint.safetensors (every
    epoch), metrics.jsonl, training.png and, at the end, weights.safetensors (the structured
    point that `compress export` extracts).
    """
    from compress.request import FinetuneOptions, finetune_from

    given = locals()
    options = FinetuneOptions(**{f.name: given[f.name] for f in dataclasses.fields(FinetuneOptions)})
    run = finetune_from(
        options, config_file=config, resume=resume, force=force, console=console, progress=not quiet, name=flag_of
    )
    console.print(f"[green]done[/] → {run}   next: compress export {run}")


@app.command("export")
@user_errors
def export_cmd(
    run: Annotated[Path, typer.Argument(help="Run directory made by `compress finetune`.")],
    opset: Annotated[int, typer.Option(help="ONNX opset (≥ 17).")] = 17,
    simplify: Annotated[
        bool, typer.Option(help="Simplify the graph (onnxslim, if installed) and verify again.")
    ] = False,
    align: o.ExportAlign = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8: also write RUN/model.int8.onnx (and dense.int8.onnx), calibrated on the run's data, verified, "
            "the fastest form measured."
        ),
    ] = None,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(
            help="Refuse an INT8 model losing more than this: accuracy points, or cosine for non-classification "
            "outputs. \\[default: 1 point / 0.01 cosine]"
        ),
    ] = None,
):
    """Remove the zero structures, export RUN/dense.onnx and RUN/model.onnx, verify, write RUN/report.json."""
    from compress.deploy.pipeline import export_run
    from compress.errors import UserError

    if align is not None and align < 1:
        raise UserError(f"--align must be ≥ 1, got {align}")
    if quantize is not None and quantize.lower() != "int8":
        raise UserError(f"--quantize takes int8, got {quantize!r}")
    if max_accuracy_drop is not None and quantize is None:
        raise UserError("--max-accuracy-drop applies to --quantize int8")
    export_run(run, opset=opset, simplify=simplify, align=align, console=console)
    if quantize is not None:
        from compress.deploy.quantrun import quantize_run

        quantize_run(run, max_accuracy_drop=max_accuracy_drop, console=console)


@app.command()
@user_errors
def bench(
    paths: Annotated[
        list[Path], typer.Argument(help="A run directory, or two ONNX files: DENSE.onnx COMPRESSED.onnx.")
    ],
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,32",
    threads: Annotated[str, typer.Option(help="ORT intra-op threads, comma-separated ('all' = every core).")] = "1,all",
    rounds: Annotated[int | None, typer.Option(help="Timed rounds per model and setting.")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Where to write the JSON (two-file form; a run uses RUN/bench.json).")
    ] = None,
    seq_len: Annotated[
        int, typer.Option("--seq-len", help="Sequence length of token inputs (dynamic non-batch axes).")
    ] = 128,
):
    """Measure ONNX Runtime latency of dense vs compressed, interleaved in one process."""
    from compress.errors import UserError
    from compress.files import atomic_write_json

    try:
        batch_sizes = tuple(int(b) for b in batch.split(","))
        thread_list = tuple(None if t.strip() == "all" else int(t) for t in threads.split(","))
    except ValueError:
        raise UserError("--batch and --threads take comma-separated integers (threads may be 'all')") from None
    if len(paths) == 1:
        from compress.deploy.pipeline import bench_run

        bench_run(
            paths[0], batch_sizes=batch_sizes, threads=thread_list, rounds=rounds, seq_len=seq_len, console=console
        )
        return
    if len(paths) != 2:
        raise UserError("give a run directory, or exactly two ONNX files (dense, compressed)")
    from compress.deploy.bench import benchmark, print_bench_table
    from compress.files import check_writable

    for p in paths:
        if not p.is_file():
            raise UserError(f"{p} does not exist")
    if out is not None:
        check_writable(out)
    kw = {"batch_sizes": batch_sizes, "threads": thread_list, "seq_len": seq_len}
    if rounds is not None:
        kw["rounds"] = rounds
    result = benchmark(paths[0], paths[1], **kw)
    print_bench_table(result, console)
    if out is not None:
        atomic_write_json(out, result)


@app.command("quantize")
@user_errors
def quantize_cmd(
    model: Annotated[Path, typer.Argument(help="An FP32 ONNX file (any model).")],
    calibration: Annotated[
        Path,
        typer.Option(
            help=".npz with one array per ONNX input name (samples on axis 0), "
            "optionally 'labels' for a top-1 accuracy check."
        ),
    ],
    eval_data: Annotated[
        Path | None,
        typer.Option(
            "--eval", help="Held-out .npz, same keys. \\[default: the calibration samples not used to calibrate]"
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="INT8 file to write. \\[default: MODEL with .int8.onnx]")] = None,
    max_accuracy_drop: Annotated[
        float | None,
        typer.Option(
            help="Refuse an INT8 model losing more than this: accuracy points with labels, else cosine. "
            "\\[default: 1 point / 0.01 cosine]"
        ),
    ] = None,
    samples: Annotated[int, typer.Option(help="Calibration samples (a seeded choice).")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the calibration sample.")] = 0,
):
    """INT8-quantize an ONNX file: calibrate, verify against FP32, keep the fastest form measured."""
    from compress.deploy.quantize import quantize_onnx
    from compress.deploy.quantrun import print_quantize
    from compress.files import check_writable

    out = check_writable(out or model.with_name(model.name.removesuffix(".onnx") + ".int8.onnx"))
    rep = quantize_onnx(
        model,
        out,
        calibration,
        eval_data=eval_data,
        max_accuracy_drop=max_accuracy_drop,
        n_calibration=samples,
        seed=seed,
    )
    print_quantize({"files": {"model.onnx": rep}, "recommended": rep["recommended"]}, console)
    console.print(f"[green]wrote[/] {out}")


@app.command()
@user_errors
def inspect(
    run: Annotated[Path | None, typer.Argument(help="A run directory to summarise.")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Show the removable groups of a model.")] = None,
    list_models: Annotated[bool, typer.Option("--list", help="List the built-in models.")] = False,
    input_shape: o.InputShape = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="module:function returning (train, eval) data: a custom model's "
            "example input is one sample of it when --input-shape is not "
            "given."
        ),
    ] = None,
):
    """Show a model's removable structures (and what cannot be pruned, and why), or summarise a run."""
    from compress.inspection import inspect_model, inspect_run, list_builtin

    if list_models:
        list_builtin(console)
    elif model is not None:
        inspect_model(model, console, input_shape=input_shape, data=data)
    elif run is not None:
        inspect_run(run, console)
    else:
        from compress.errors import UserError

        raise UserError("give a run directory, --model NAME, or --list")
