"""`compress` command line: a thin typer layer over the Python API.

User mistakes (compress.io.UserError) print one red line and exit with code 2;
`compress --debug ...` shows the traceback instead.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import tomllib
import typer
from rich.console import Console

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
def _main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors.")):
    _DEBUG["on"] = _DEBUG["on"] or debug


def user_errors(fn):
    """Turn UserError into a one-line message and exit code 2; Ctrl-C into exit code 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from compress.errors import TrainingInterrupted, UserError

        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if _DEBUG["on"]:
                raise
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except TrainingInterrupted as e:
            err_console.print(f"[yellow]{e}[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(130)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130)

    return wrapper


def _parse_milestones(text: Optional[str]):
    if text is None or isinstance(text, list):
        return text
    from compress.errors import UserError

    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--milestones must be comma-separated epoch numbers, e.g. 15,22; got {text!r}") from None


def _read_config(path: Optional[Path]) -> dict:
    if path is None:
        return {}
    from compress.errors import UserError

    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from e
    return {k.replace("-", "_"): v for k, v in data.items()}


@app.command()
@user_errors
def finetune(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Built-in name (see `compress inspect --list`), "
                                        "module:factory, path/to/file.py:factory, or hf:PATH (a local Hugging Face "
                                        "model folder). \\[default: digits-resnet]"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory to create."),
    data: Optional[str] = typer.Option(None, help="module:function returning (train, eval) datasets or loaders. "
                                       "Built-in models bring their own data. hf: models also take sentences.txt "
                                       "(embeddings: distillation) or file.jsonl (text/label classification)."),
    input_shape: Optional[str] = typer.Option(None, help="Example input shape for a custom model, batch first, "
                                              "e.g. 1,3,32,32 (or give the model an example_input(batch) method)."),
    epochs: Optional[int] = typer.Option(None, help="Training epochs. \\[default: 30]"),
    lr: Optional[float] = typer.Option(None, help="Learning rate (defaults are for fine-tuning a trained model: "
                                       "ramda 3e-4, rmda/proxsgd 1e-2, proxadam 1e-4; adamw 3e-3)."),
    lam: Optional[float] = typer.Option(None, help="Group-lasso strength λ; 0 trains a dense model. Larger λ → more "
                                        "structures removed. \\[default: 1.5e-2, 0 for adamw]"),
    optimizer: Optional[str] = typer.Option(None, help="ramda | rmda | proxsgd | proxadam | asgo | dasgo | dsgd | "
                                            "adamw (dense). \\[default: ramda]"),
    reg_space: Optional[str] = typer.Option(None, help="ramda/proxadam: group lasso on the parameters (param) or on "
                                            "the preconditioned variables (preconditioned). \\[default: param]"),
    dsgd_k: Optional[int] = typer.Option(None, help="dsgd: layers updated per step. \\[default: 1]"),
    momentum: Optional[float] = typer.Option(None, help="RAMDA/RMDA averaging weight c0 (ramped to 1 in the final "
                                             "stage). \\[default: 0.1]"),
    batch_size: Optional[int] = typer.Option(None, help="Mini-batch size. \\[default: 64]"),
    milestones: Optional[str] = typer.Option(None, help="Epochs where the learning rate decays by --gamma and RAMDA "
                                             "restarts, e.g. 15,22. \\[default: half and 3/4 of --epochs]"),
    gamma: Optional[float] = typer.Option(None, help="Learning-rate decay factor at milestones. \\[default: 0.1]"),
    schedule: Optional[str] = typer.Option(None, help="step (milestones, RAMDA restarts) or cosine (dense "
                                           "training). \\[default: step]"),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (dense training). \\[default: 0]"),
    group_weight: Optional[str] = typer.Option(None, help="Group weight w_g: size (√entries, the paper's) or flops "
                                               "(∝ the FLOPs removing the group saves: the regularizer prefers "
                                               "removing the costliest structures). \\[default: size]"),
    solver: Optional[str] = typer.Option(None, help="RAMDA subproblem solver: exact or pg. \\[default: exact]"),
    seed: Optional[int] = typer.Option(None, help="Random seed (init, data order). \\[default: 0]"),
    init: Optional[Path] = typer.Option(None, help="Start from these weights (safetensors, a checkpoint, or a "
                                        "state_dict saved with torch.save; never unpickles code)."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda. \\[default: auto]"),
    threads: Optional[int] = typer.Option(None, help="CPU threads for torch. Small models train fastest on 1, "
                                          "and so does any model on a busy machine. \\[default: torch's]"),
    target_flops: Optional[float] = typer.Option(None, help="Budget instead of λ: the exported model's FLOPs as a "
                                                 "fraction of the dense model, e.g. 0.5. λ is found automatically."),
    target_params: Optional[float] = typer.Option(None, help="Budget: parameters as a fraction of the dense model."),
    target_latency_ms: Optional[float] = typer.Option(None, help="Budget: ONNX Runtime CPU latency in ms on this "
                                                      "machine, at --bench-batch with --bench-threads."),
    bench_batch: Optional[int] = typer.Option(None, help="Batch size of a latency target. \\[default: 1]"),
    bench_threads: Optional[int] = typer.Option(None, help="Intra-op threads of a latency target. \\[default: all cores]"),
    final_optimizer: Optional[str] = typer.Option(None, help="Target runs: the optimizer of the final phase, which "
                                                  "trains the frozen structure (zero groups kept exactly zero): "
                                                  "adamw (lr 1e-3 cosine to 0, wd 1e-4) or same (RAMDA at λ=0; "
                                                  "noisier and less accurate on digits). \\[default: adamw]"),
    align: Optional[int] = typer.Option(None, help="Target runs: at the freeze every channel/neuron width keeps a "
                                        "multiple of this many, at the same budget. ONNX Runtime's CPU convolutions "
                                        "compute channels in blocks of 8 (AVX2) or 16 (AVX-512), so a width of 17 "
                                        "costs as much as 32: aligned widths turn saved FLOPs into real speed "
                                        "(digits-resnet at half the FLOPs, batch 1: 1.62× faster than dense aligned, "
                                        "0.85× unaligned). 1 = off. "
                                        "\\[default: 16 with AVX-512, else 8]"),
    rewind: Optional[str] = typer.Option(None, help="Target runs: init restarts the surviving weights from the "
                                         "starting (--init) weights at the freeze, so the final AdamW phase trains "
                                         "them free of the group lasso's shrinkage (all-MiniLM-L6-v2 at 0.95 FLOPs: "
                                         "cosine 0.989 vs 0.918); none keeps the trained survivors (better on "
                                         "digits-resnet at 0.1 FLOPs: 90.7% vs 86.9%). \\[default: none]"),
    config: Optional[Path] = typer.Option(None, help="TOML file whose keys mirror these flags (flags win)."),
    resume: Optional[Path] = typer.Option(None, help="Continue an interrupted run directory exactly where it stopped."),
    force: bool = typer.Option(False, "--force", help="Overwrite the run files in an existing --out directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """Fine-tune with group lasso so whole channels / heads / neurons become exactly zero.

    Writes RUN/: config.json, groups.json, init.safetensors, checkpoint.safetensors (every
    epoch), metrics.jsonl, training.png and, at the end, weights.safetensors (the structured
    point that `compress export` extracts).
    """
    from compress.errors import UserError
    from compress.models.userspec import parse_input_shape, resolve_model
    from compress.train import checkpoint as ckpt
    from compress.train.config import TrainConfig
    from compress.train.loop import finetune as run_finetune

    if resume is not None:
        if out is not None and Path(out) != resume:
            raise UserError("give either --resume RUN or --out RUN, not both")
        saved = _load_saved_run(resume)
        spec = resolve_model(saved["model"], parse_input_shape(saved.get("input_shape")))
        train_data, eval_data = _data_for(spec, saved.get("data"))
        given = dict(locals())
        if any(given[k] is not None for k in _NOT_ON_RESUME):
            raise UserError("--resume continues a run with its saved settings; only --lr (e.g. lower after a NaN "
                            "loss) and --quiet may be given with it")
        if "budget" in saved:
            from compress.budget.runner import finetune_to_budget

            if lr is not None:
                raise UserError("a budget run resumes with its saved settings; --lr cannot be changed")
            finetune_to_budget(spec.build(), train_data, eval_data, spec.example_input(1), resume, resume=True,
                               console=console, progress=not quiet)
            console.print(f"[green]done[/] → {resume}   next: compress export {resume}")
            return
        run_finetune(spec.build(), train_data, eval_data, spec.example_input(1), resume, resume=True,
                     resume_lr=lr, console=console, progress=not quiet)
        console.print(f"[green]done[/] → {resume}   next: compress export {resume}")
        return

    opts = _read_config(config)
    flags = dict(model=model, out=out, data=data, epochs=epochs, lr=lr, lam=lam, optimizer=optimizer,
                 momentum=momentum, reg_space=reg_space, dsgd_k=dsgd_k, batch_size=batch_size, milestones=milestones, gamma=gamma, schedule=schedule,
                 weight_decay=weight_decay, group_weight=group_weight, solver=solver, seed=seed, init=init,
                 device=device, input_shape=input_shape, threads=threads, target_flops=target_flops,
                 target_params=target_params, target_latency_ms=target_latency_ms, bench_batch=bench_batch,
                 bench_threads=bench_threads, final_optimizer=final_optimizer, align=align, rewind=rewind)
    unknown = set(opts) - set(flags)
    if unknown:
        raise UserError(f"config file {config} has unknown keys: {', '.join(sorted(unknown))}")
    merged = {**opts, **{k: v for k, v in flags.items() if v is not None}}
    if merged.get("out") is None:
        raise UserError("--out RUN is required: the run directory to create")
    model_name = merged.pop("model", "digits-resnet")
    data_spec = merged.pop("data", None)
    out_dir = Path(merged.pop("out"))
    init_path = merged.pop("init", None)
    shape_text = merged.pop("input_shape", None)
    budget_opts = {k: merged.pop(k) for k in ("final_optimizer", "align", "rewind") if k in merged}
    budget = _budget_from(merged)
    if budget is None and budget_opts:
        raise UserError(f"--{next(iter(budget_opts)).replace('_', '-')} applies to target runs only "
                        "(--target-flops/--target-params/--target-latency-ms)")
    merged["milestones"] = _parse_milestones(merged.get("milestones"))
    cfg = TrainConfig(**merged)
    cfg.validate()
    if budget is not None:
        from compress.budget.runner import budget_config

        cfg = budget_config(cfg)  # the same defaults as the Python API (one lr decay, at the freeze)
    else:
        cfg = cfg.resolved()
        cfg.validate()
    spec = resolve_model(model_name, parse_input_shape(shape_text))
    init_weights = ckpt.load_weights(Path(init_path)) if init_path else None
    import torch

    torch.manual_seed(cfg.seed)  # the model's random init is part of the run: same seed, same bits
    net = spec.build()
    example = _checked_example(spec, net)
    train_data, eval_data = _data_for(spec, data_spec)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise UserError(f"output directory {out_dir} already exists; use --force to overwrite its run files, "
                        f"or --resume {out_dir} to continue it")
    console.print(f"[bold]compress finetune[/] model={model_name} optimizer={cfg.optimizer} lr={cfg.lr:g} "
                  f"λ={cfg.lam:g} epochs={cfg.epochs} milestones={cfg.milestones} → {out_dir}")
    if data_spec and Path(data_spec).is_file():  # a data file (hf: sentences.txt): export finds it from anywhere
        data_spec = str(Path(data_spec).resolve())
    run_info = {"model": model_name, "data": data_spec, "input_shape": shape_text,
                "init": str(init_path) if init_path else None}
    if budget is not None:
        from compress.budget.runner import finetune_to_budget

        console.print(f"[bold]budget[/]: {budget.describe()} — λ is found automatically")
        finetune_to_budget(net, train_data, eval_data, example, out_dir, cfg, budget, init_weights=init_weights,
                           run_info=run_info, force=force, console=console, progress=not quiet, **budget_opts)
    else:
        run_finetune(net, train_data, eval_data, example, out_dir, cfg, init_weights=init_weights,
                     run_info=run_info, force=force, console=console, progress=not quiet)
    console.print(f"[green]done[/] → {out_dir}   next: compress export {out_dir}")


def _budget_from(opts: dict):
    """Pop the budget flags; a Budget when a target is given (then --lam must not be)."""
    from compress.errors import UserError

    keys = ("target_flops", "target_params", "target_latency_ms", "bench_batch", "bench_threads")
    vals = {k: opts.pop(k, None) for k in keys}
    if all(vals[k] is None for k in keys[:3]):
        if vals["bench_batch"] is not None or vals["bench_threads"] is not None:
            raise UserError("--bench-batch and --bench-threads only apply to --target-latency-ms")
        return None
    if opts.get("lam") is not None:
        raise UserError("give either --lam or a target (--target-flops/--target-params/--target-latency-ms): "
                        "with a target, λ is found automatically")
    from compress.budget.target import Budget

    return Budget(flops=vals["target_flops"], params=vals["target_params"], latency_ms=vals["target_latency_ms"],
                  batch=vals["bench_batch"] or 1, threads=vals["bench_threads"])


_NOT_ON_RESUME = ("model", "data", "epochs", "lam", "optimizer", "reg_space", "dsgd_k", "momentum", "batch_size", "milestones", "gamma",
                  "schedule", "weight_decay", "group_weight", "solver", "seed", "init", "device", "config",
                  "input_shape", "threads", "target_flops", "target_params", "target_latency_ms", "bench_batch",
                  "bench_threads", "final_optimizer", "align", "rewind")


def _load_saved_run(run: Path) -> dict:
    import json

    from compress.errors import UserError

    cfg = run / "config.json"
    if not cfg.is_file():
        raise UserError(f"{run} is not a run directory (no config.json); nothing to resume")
    return json.loads(cfg.read_text())


def _data_for(spec, data_spec):
    from compress.errors import UserError
    from compress.models.userspec import resolve_data

    if data_spec:
        return resolve_data(data_spec, spec)
    if spec.data is None:
        raise UserError(f"model {spec.name!r} has no built-in data: give --data module:function")
    return spec.data()


def _checked_example(spec, net):
    """The example input, with a clear error if the model cannot run on it."""
    import torch

    from compress.errors import UserError

    example = spec.example_input(1)
    try:
        with torch.no_grad():
            net.eval()
            net(*example) if isinstance(example, tuple) else net(example)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's model failing is the user's to fix
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"the model's forward failed on its example input: {type(e).__name__}: {first}") from e
    return example


@app.command("export")
@user_errors
def export_cmd(
    run: Path = typer.Argument(..., help="Run directory made by `compress finetune`."),
    opset: int = typer.Option(17, help="ONNX opset (≥ 17)."),
    simplify: bool = typer.Option(False, help="Simplify the graph (onnxslim, if installed) and verify again."),
    align: Optional[int] = typer.Option(None, help="Keep a multiple of this many channels/neurons per layer (extra zero "
                                        "channels are kept: exact). CPU kernels run 8-aligned widths much faster; 1 "
                                        "removes every zero group. \\[default: 8; 1 for a FLOP or parameter budget run, "
                                        "whose promise is on FLOPs/params]"),
):
    """Remove the zero structures, export RUN/dense.onnx and RUN/model.onnx, verify, write RUN/report.json."""
    from compress.deploy.pipeline import export_run

    if align is not None and align < 1:
        from compress.errors import UserError

        raise UserError(f"--align must be ≥ 1, got {align}")
    export_run(run, opset=opset, simplify=simplify, align=align, console=console)


@app.command()
@user_errors
def bench(
    paths: list[Path] = typer.Argument(..., help="A run directory, or two ONNX files: DENSE.onnx COMPRESSED.onnx."),
    batch: str = typer.Option("1,32", help="Batch sizes, comma-separated."),
    threads: str = typer.Option("1,all", help="ORT intra-op threads, comma-separated ('all' = every core)."),
    rounds: Optional[int] = typer.Option(None, help="Timed rounds per model and setting."),
    out: Optional[Path] = typer.Option(None, help="Where to write the JSON (two-file form; a run uses RUN/bench.json)."),
    seq_len: int = typer.Option(128, "--seq-len", help="Sequence length of token inputs (dynamic non-batch axes)."),
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

        bench_run(paths[0], batch_sizes=batch_sizes, threads=thread_list, rounds=rounds, seq_len=seq_len,
                  console=console)
        return
    if len(paths) != 2:
        raise UserError("give a run directory, or exactly two ONNX files (dense, compressed)")
    from compress.deploy.bench import benchmark, print_bench_table

    for p in paths:
        if not p.is_file():
            raise UserError(f"{p} does not exist")
    kw = {"batch_sizes": batch_sizes, "threads": thread_list, "seq_len": seq_len}
    if rounds is not None:
        kw["rounds"] = rounds
    result = benchmark(paths[0], paths[1], **kw)
    print_bench_table(result, console)
    if out is not None:
        atomic_write_json(out, result)


@app.command()
@user_errors
def inspect(
    run: Optional[Path] = typer.Argument(None, help="A run directory to summarise."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Show the removable groups of a model."),
    list_models: bool = typer.Option(False, "--list", help="List the built-in models."),
):
    """Show a model's removable structures (and what cannot be pruned, and why), or summarise a run."""
    from compress.inspection import inspect_model, inspect_run, list_builtin

    if list_models:
        list_builtin(console)
    elif model is not None:
        inspect_model(model, console)
    elif run is not None:
        inspect_run(run, console)
    else:
        from compress.errors import UserError

        raise UserError("give a run directory, --model NAME, or --list")


def main():  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
