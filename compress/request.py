"""One fine-tuning request: the settings of a TOML file and of the caller (the caller's win), resolved
and validated once into a `FinetuneRequest`, then run — the plain loop or the budget runner — or a run
directory resumed. The CLI is one call of `finetune_from`; everything it used to decide lives here."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from compress.budget.settings import budget_of, controller_of, pretrained_defaults
from compress.budget.target import Budget
from compress.errors import UserError
from compress.train.config import TrainConfig

_TRAIN = (
    "epochs",
    "lr",
    "lam",
    "optimizer",
    "momentum",
    "batch_size",
    "milestones",
    "gamma",
    "schedule",
    "weight_decay",
    "group_weight",
    "solver",
    "reg_space",
    "dsgd_k",
    "seed",
    "device",
    "threads",
    "distill",
    "distill_temperature",
    "distill_alpha",
)


@dataclass
class FinetuneOptions:
    """The settings as given, None where not given: one per TOML key (and CLI flag)."""

    model: str | None = None
    out: Path | None = None
    data: str | None = None
    input_shape: str | None = None
    init: Path | None = None
    output: str | None = None
    epochs: int | None = None
    lr: float | None = None
    lam: float | None = None
    optimizer: str | None = None
    momentum: float | None = None
    batch_size: int | None = None
    milestones: str | list[int] | None = None  # "15,22" or [15, 22]
    gamma: float | None = None
    schedule: str | None = None
    weight_decay: float | None = None
    group_weight: str | None = None
    solver: str | None = None
    reg_space: str | None = None
    dsgd_k: int | None = None
    seed: int | None = None
    device: str | None = None
    threads: int | None = None
    distill: str | None = None
    distill_temperature: float | None = None
    distill_alpha: float | None = None
    target_flops: float | None = None
    target_params: float | None = None
    target_latency_ms: float | None = None
    bench_batch: int | None = None
    bench_threads: int | None = None
    final_optimizer: str | None = None
    align: int | None = None
    rewind: str | None = None
    final_lr: float | None = None
    freeze_epoch: int | None = None

    @classmethod
    def from_toml(cls, path: str | Path) -> FinetuneOptions:
        """The options of a TOML file whose keys are the field names (`batch-size` = `batch_size`)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {path} is not valid TOML: {e}") from e
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"config file {path} has unknown keys: {', '.join(sorted(unknown))}")
        return cls(**data)

    def given(self) -> dict:
        """The options that were given, type-checked (a TOML file can hold anything)."""
        hints = typing.get_type_hints(type(self))
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = _checked_type(f.name, value, hints[f.name])
        return out

    def over(self, base: FinetuneOptions) -> FinetuneOptions:
        """These options, falling back to `base` where not given (flags over a config file)."""
        return dataclasses.replace(base, **{k: v for k, v in vars(self).items() if v is not None})


def _checked_type(name: str, value, hint):
    allowed = tuple(typing.get_origin(a) or a for a in typing.get_args(hint) if a is not type(None))
    accepted = allowed + ((int,) if float in allowed else ()) + ((str,) if Path in allowed else ())
    if isinstance(value, bool) or not isinstance(value, accepted):
        names = " or ".join("a list" if a is list else a.__name__ for a in allowed)
        raise UserError(f"`{name}` must be {names}, got {value!r}", field=name)
    return Path(value) if Path in allowed else value


@dataclass(frozen=True)
class FinetuneRequest:
    """A fine-tuning run, resolved and validated: what `run_request` trains, and where."""

    out: Path
    train: TrainConfig  # defaults resolved (a budget run's milestones too), validated
    model: str = "digits-resnet"
    data: str | None = None
    input_shape: str | None = None
    init: Path | None = None
    output: str | None = None  # the entry of a dict/tuple output to train on
    budget: Budget | None = None
    controller: dict = field(
        default_factory=dict
    )  # final_optimizer / align / rewind / final_lr / controller, where given
    force: bool = False

    def run_info(self) -> dict:
        """What config.json keeps beside the TrainConfig, so export and resume can rebuild the model."""
        data = self.data
        if data and Path(data).is_file():  # a data file (hf: sentences.txt): export finds it from any folder
            data = str(Path(data).resolve())
        return {
            "model": self.model,
            "data": data,
            "input_shape": self.input_shape,
            "init": str(self.init) if self.init else None,
            "output": self.output,
        }


def build_request(
    options: FinetuneOptions, config_file: str | Path | None = None, force: bool = False
) -> FinetuneRequest:
    """Merge `options` over the TOML `config_file`, resolve the defaults and validate — once."""
    from compress.models.userspec import parse_input_shape
    from compress.runs import check_out_dir

    if config_file is not None:
        options = options.over(FinetuneOptions.from_toml(config_file))
    given = options.given()
    if "out" not in given:
        raise UserError("`out` (the run directory to create) is required", field="out")
    budget = budget_of(given)
    train = TrainConfig(**{k: given[k] for k in _TRAIN if k in given})
    train.milestones = _milestones(train.milestones)
    controller = controller_of(given, budget, train.epochs)
    if budget is not None:
        from compress.budget.runner import budget_config

        train = budget_config(train)  # the Python API's defaults: one lr decay, at the freeze
        pretrained_defaults(given.get("model"), controller, train.lr)
    else:
        train = train.resolved()
        train.validate()
    parse_input_shape(given.get("input_shape"))
    out = check_out_dir(given["out"], force)
    return FinetuneRequest(
        out=out,
        train=train,
        model=given.get("model", "digits-resnet"),
        data=given.get("data"),
        input_shape=given.get("input_shape"),
        init=given.get("init"),
        output=given.get("output"),
        budget=budget,
        controller=controller,
        force=force,
    )


def _milestones(value) -> list[int] | None:
    if value is None or isinstance(value, list):
        return value
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(
            f"`milestones` must be comma-separated epoch numbers, e.g. 15,22; got {value!r}", field="milestones"
        ) from None


def run_request(req: FinetuneRequest, console=None, progress: bool = True, name=None):
    """Build the model (seeded), preflight it on one batch, and train: the budget runner for a target,
    else the loop. Nothing is written before the preflight passed. `name`: how notices write a field
    (the CLI passes its flag names)."""
    from rich.console import Console

    from compress.train.baseline import RANDOM, start_kind
    from compress.train.checkpoint import load_weights

    console = console or Console()
    req, net, example, (train_data, eval_data) = prepared(req)
    req = _with_start(req, console, progress, name)
    init_weights = load_weights(req.init) if req.init and start_kind(req.init) != RANDOM else None
    cfg = req.train
    console.print(
        f"[bold]compress finetune[/] model={req.model} optimizer={cfg.optimizer} lr={cfg.lr:g} "
        f"λ={cfg.lam:g} epochs={cfg.epochs} milestones={cfg.milestones} → {req.out}"
    )
    common = dict(
        init_weights=init_weights, run_info=req.run_info(), force=req.force, console=console, progress=progress
    )
    if req.budget is not None:
        from compress.budget.runner import finetune_to_budget

        console.print(f"[bold]budget[/]: {req.budget.describe()} — λ is found automatically")
        return finetune_to_budget(
            net, train_data, eval_data, example, req.out, cfg, req.budget, **common, **req.controller
        )
    from compress.train.loop import finetune

    return finetune(net, train_data, eval_data, example, req.out, cfg, **common)


def _with_start(req: FinetuneRequest, console, progress: bool, name=None) -> FinetuneRequest:
    """`init` dense → the cached dense baseline (trained first when missing); no `init` on a sparse run → a
    warning (compress.train.baseline)."""
    from compress.train.baseline import DENSE, dense_baseline, start_kind, warn_random_start

    if start_kind(req.init) == DENSE:

        def train_run(run_dir, recipe):
            options = FinetuneOptions(
                model=req.model,
                out=run_dir,
                seed=req.train.seed,
                device=req.train.device,
                threads=req.train.threads,
                **recipe,
            )
            run_request(build_request(options, force=True), console=console, progress=progress)

        weights = dense_baseline(req.model, ":" not in req.model, req.train, console, train_run)
        return dataclasses.replace(req, init=weights)
    from compress.models import is_pretrained

    if req.init is None and not is_pretrained(req.model):
        warn_random_start(console, sparse=req.budget is not None or req.train.lam > 0, name=name)
    return req


def prepared(req: FinetuneRequest):
    """(request, model, example input, data) after the preflight (compress.preflight); the request gains
    the input shape when it was taken from the data, so export and resume rebuild the same example."""
    import torch

    from compress.models.userspec import model_data, parse_input_shape, resolve_model
    from compress.preflight import example_from, first_batch, preflight

    spec = resolve_model(req.model, parse_input_shape(req.input_shape))
    torch.manual_seed(req.train.seed)  # the model's random init is part of the run: same seed, same bits
    net = spec.build()
    data = model_data(spec, req.data)
    x, y = first_batch(data[0])
    checked = example_from(spec, x, req.input_shape is not None)
    example = checked.example
    output = preflight(net, x, y, example, req.output, data)
    req = dataclasses.replace(req, input_shape=checked.input_shape or req.input_shape, output=output)
    return req, net, example, data


def resume_run(
    run: str | Path, lr: float | None = None, console=None, progress: bool = True, epochs: int | None = None
):
    """Continue an interrupted run directory with its saved settings (`lr` may be lowered, not for a budget);
    `epochs` extends an interrupted or finished run (how the schedule extends: loop._extended)."""
    from compress.models.userspec import model_data, parse_input_shape, resolve_model
    from compress.runs import read_config
    from compress.structure.outputs import select_output

    run = Path(run)
    saved = read_config(run, "nothing to resume")
    if "model" not in saved:
        raise UserError(
            f"{run} was made from Python with a model object; resume it with compress.finetune(model, ..., resume=True)"
        )
    spec = resolve_model(saved["model"], parse_input_shape(saved.get("input_shape")))
    train_data, eval_data = model_data(spec, saved.get("data"))
    net = select_output(spec.build(), saved.get("output"))
    if "budget" in saved:
        from compress.budget.runner import finetune_to_budget

        if lr is not None or epochs is not None:
            what = "lr" if lr is not None else "epochs"
            raise UserError(f"a budget run resumes with its saved settings; `{what}` cannot be changed", field=what)
        return finetune_to_budget(
            net, train_data, eval_data, spec.example_input(1), run, resume=True, console=console, progress=progress
        )
    from compress.train.loop import finetune

    return finetune(
        net,
        train_data,
        eval_data,
        spec.example_input(1),
        run,
        resume=True,
        resume_lr=lr,
        resume_epochs=epochs,
        console=console,
        progress=progress,
    )


def finetune_from(
    options: FinetuneOptions,
    *,
    config_file: str | Path | None = None,
    resume: str | Path | None = None,
    force: bool = False,
    console=None,
    progress: bool = True,
    name=None,
) -> Path:
    """The `compress finetune` command: a new run from options (+ TOML file), or `resume` a run.
    Returns the run directory."""
    if resume is None:
        req = build_request(options, config_file, force)
        run_request(req, console=console, progress=progress, name=name)
        return req.out
    given = options.given()
    if "out" in given and Path(given["out"]) != Path(resume):
        raise UserError("give either `resume` RUN or `out` RUN, not both", field="resume", fields=("out",))
    extra = sorted(set(given) - {"out", "lr", "epochs"}) + (["config"] if config_file is not None else [])
    if extra:
        raise UserError(
            f"`resume` continues a run with its saved settings; only `lr` (e.g. lower after a NaN "
            f"loss) and `epochs` (to make it longer) may be given with it, not `{extra[0]}`",
            field=extra[0],
            fields=("resume", "lr", "epochs"),
        )
    resume_run(resume, lr=given.get("lr"), console=console, progress=progress, epochs=given.get("epochs"))
    return Path(resume)
