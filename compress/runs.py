"""The run directory: its file names, the "is this a run" check, reading and writing its config
and metrics, and preparing a new one — in one place, so every command agrees on what a run is."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from compress.errors import UserError

RUN_FILES = {
    # written by training
    "config": "config.json",
    "groups": "groups.json",
    "init": "init.safetensors",
    "checkpoint": "checkpoint.safetensors",
    "weights": "weights.safetensors",
    "metrics": "metrics.jsonl",
    "plot": "training.png",
    "dsgd_picks": "dsgd_picks.png",
    # written by a budget run
    "budget": "budget.json",
    "budget_state": "budget_state.json",
    "latency": "latency.json",
    # written by export and bench
    "report": "report.json",
    "compressed": "compressed.safetensors",
    "dense_onnx": "dense.onnx",
    "model_onnx": "model.onnx",
    "bench": "bench.json",
    "bench_plot": "bench.png",
    # written by export --quantize int8 and its bench
    "model_int8": "model.int8.onnx",
    "dense_int8": "dense.int8.onnx",
    "quantize": "quantize.json",
    "bench_int8": "bench_int8.json",
}


def is_run(path: str | Path) -> bool:
    """A run directory is one with a config.json (written before the first training step)."""
    return (Path(path) / RUN_FILES["config"]).is_file()


def check_run_dir(run: str | Path, why: str = "") -> Path:
    """`run` as a Path; UserError when it is missing or not a run (`why`: what the caller wanted of it)."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"run directory {run} does not exist; create one with: compress finetune --out {run}")
    if not is_run(run):
        raise UserError(f"{run} is not a run directory (no {RUN_FILES['config']})" + (f"; {why}" if why else ""))
    return run


def read_config(run: str | Path, why: str = "") -> dict:
    """config.json of a run: {"train": TrainConfig fields, "model", "data", "input_shape", "init", [budget...]}."""
    run = check_run_dir(run, why)
    return json.loads((run / RUN_FILES["config"]).read_text())


def write_config(run: str | Path, train_config, run_info: dict | None = None) -> None:
    """config.json: the resolved TrainConfig under "train", beside what rebuilds the model (run_info)."""
    from compress.files import atomic_write_json

    atomic_write_json(Path(run) / RUN_FILES["config"], {"train": dataclasses.asdict(train_config), **(run_info or {})})


def read_metrics(run: str | Path) -> list[dict]:
    """The per-epoch metrics (metrics.jsonl); [] before the first epoch ends."""
    path = Path(run) / RUN_FILES["metrics"]
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_out_dir(out: str | Path, force: bool) -> Path:
    """UserError when `out` cannot become a new run: not a directory, or holding files and not `force`d."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"`out` {out} exists and is not a directory", field="out")
        if any(out.iterdir()) and not force:
            raise UserError(
                f"output directory {out} already exists; use `force` to overwrite its run files, "
                "or `resume` to continue it",
                field="force",
                fields=("resume",),
            )
    return out


def prepare_run_dir(out: str | Path, force: bool) -> None:
    """Check, then create `out`; when forced, delete the run's own files there and nothing else."""
    out = check_out_dir(out, force)
    if out.exists() and force:
        for name in RUN_FILES.values():
            (out / name).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out}: {e.strerror}") from e


def run_config(run: str | Path) -> dict:
    """config.json of a run made by the CLI (it names the model, so the run rebuilds it)."""
    config = read_config(run)
    if "model" not in config:
        raise UserError(
            f"{run} was made from Python with a model object; export it with compress.extract and compress.export_onnx"
        )
    return config


def load_run(run: str | Path) -> dict:
    """Config, model spec, data and groups of a finished run (weights loaded = the structured point)."""
    from compress.models.userspec import model_data, parse_input_shape, resolve_model
    from compress.structure.group import load_groups
    from compress.structure.outputs import select_output
    from compress.train import checkpoint as ckpt

    run = Path(run)
    config = run_config(run)
    weights = run / RUN_FILES["weights"]
    if not weights.is_file():
        raise UserError(
            f"{run} has no {RUN_FILES['weights']}: training did not finish; "
            f"continue it with: compress finetune --resume {run}"
        )
    spec = resolve_model(config["model"], parse_input_shape(config.get("input_shape")))
    model = select_output(spec.build(), config.get("output"))
    ckpt.load_into(model, ckpt.load_weights(weights), str(weights))
    dense = select_output(spec.build(), config.get("output"))
    ckpt.load_into(dense, ckpt.load_weights(run / RUN_FILES["init"]), str(run / RUN_FILES["init"]))
    data = model_data(spec, config.get("data"), required=False)
    groups = load_groups(run / RUN_FILES["groups"], model)
    return {
        "run": run,
        "config": config,
        "spec": spec,
        "model": model.eval(),
        "dense": dense.eval(),
        "data": data,
        "groups": groups,
    }
