"""The run directory: its file names, reading its config, and the existence check, in one place."""
from __future__ import annotations

import json
from pathlib import Path

from compress.errors import UserError
from compress.train import checkpoint as ckpt

RUN_FILES = {
    "config": "config.json",
    "groups": "groups.json",
    "init": "init.safetensors",
    "checkpoint": "checkpoint.safetensors",
    "weights": "weights.safetensors",
    "metrics": "metrics.jsonl",
    "plot": "training.png",
}


def prepare_run_dir(out: Path, force: bool) -> None:
    """Refuse to overwrite an existing run unless forced; never delete anything but the run's own files."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise UserError(f"output directory {out} already exists; use --force to overwrite its run files, "
                            "or --resume to continue it")
        if force:
            for name in list(RUN_FILES.values()) + ["report.json", "bench.json", "model.onnx", "dense.onnx",
                                                    "bench.png", "compressed.safetensors", "budget.json", "dsgd_picks.png"]:
                (out / name).unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {out}: {e.strerror}") from e





def run_config(run: str | Path) -> dict:
    """config.json of a run made by the CLI (it names the model, so the run rebuilds it)."""
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
    return config


def load_run(run: str | Path) -> dict:
    """Config, model spec, data and groups of a finished run (weights loaded = the structured point)."""
    from compress.models.userspec import parse_input_shape, resolve_data, resolve_model
    from compress.structure.group import load_groups

    run = Path(run)
    config = run_config(run)
    weights = run / RUN_FILES["weights"]
    if not weights.is_file():
        raise UserError(f"{run} has no {RUN_FILES['weights']}: training did not finish; "
                        f"continue it with: compress finetune --resume {run}")
    spec = resolve_model(config["model"], parse_input_shape(config.get("input_shape")))
    model = spec.build()
    ckpt.load_into(model, ckpt.load_weights(weights), str(weights))
    dense = spec.build()
    ckpt.load_into(dense, ckpt.load_weights(run / RUN_FILES["init"]), str(run / RUN_FILES["init"]))
    data = resolve_data(config["data"], spec) if config.get("data") else (spec.data() if spec.data else None)
    groups = load_groups(run / RUN_FILES["groups"], model)
    return {"run": run, "config": config, "spec": spec, "model": model.eval(), "dense": dense.eval(),
            "data": data, "groups": groups}
