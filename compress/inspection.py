"""Human summaries: the removable groups of a model, and the state of a run directory."""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from pathlib import Path

from compress.runs import RUN_FILES, read_config, read_metrics


def list_builtin(console) -> None:
    from rich.table import Table

    from compress.models import get_model, model_names

    t = Table(title="built-in models")
    t.add_column("name")
    t.add_column("data")
    t.add_column("description")
    for name in model_names():
        s = get_model(name)
        t.add_row(name, "yes" if s.data else "–", s.description)
    console.print(t)


def inspect_model(name: str, console, input_shape: str | None = None, data: str | None = None) -> None:
    """Groups per layer (kind, count, entries) and the structures that are not prunable, with the reason.
    The example input: `input_shape`, the model's own example_input, else a sample of `data`."""
    from rich.table import Table

    from compress.models.userspec import parse_input_shape, resolve_model
    from compress.structure.cost import count_flops, count_params
    from compress.structure.find import find_groups

    spec = resolve_model(name, parse_input_shape(input_shape))
    model = spec.build().eval()
    if data is not None and input_shape is None:
        from compress.models.userspec import resolve_data
        from compress.preflight import example_from, first_batch

        example = example_from(spec, first_batch(resolve_data(data)[0])[0], False).example
    else:
        example = spec.example_input(1)
    groups = find_groups(model, example)
    per_layer: OrderedDict[tuple[str, str], list] = OrderedDict()
    for g in groups:
        per_layer.setdefault((g.layer, g.kind), []).append(g)
    t = Table(
        title=f"{name}: {len(groups)} removable groups, {count_params(model):,} params, "
        f"{count_flops(model, example):,} FLOPs/sample"
    )
    t.add_column("layer")
    t.add_column("kind")
    t.add_column("groups", justify="right")
    t.add_column("entries / group", justify="right")
    t.add_column("coupled parameters")
    for (layer, kind), gs in per_layer.items():
        params = sorted({s.param for s in gs[0].slices})
        t.add_row(
            layer,
            kind,
            str(len(gs)),
            str(gs[0].size),
            ", ".join(params) if len(params) <= 6 else ", ".join(params[:6]) + f", … (+{len(params) - 6})",
        )
    console.print(t)
    skipped = getattr(groups, "not_prunable", [])
    if skipped:
        t2 = Table(title="not prunable")
        t2.add_column("layer")
        t2.add_column("why")
        for layer, why in skipped:
            t2.add_row(layer, why)
        console.print(t2)
    kinds = Counter(g.kind for g in groups)
    console.print("by kind: " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
    heads = Counter(g.layer for g in groups if g.kind == "head")
    if heads:
        console.print("attention heads: " + ", ".join(f"{layer} ({n})" for layer, n in heads.items()))


def inspect_run(run: Path, console) -> None:
    """Config, last epoch's metrics, and (if present) the export report and the benchmark."""
    from rich.table import Table

    run = Path(run)
    cfg = read_config(run)
    train = cfg.get("train", {})
    console.print(
        f"[bold]{run}[/]  model={cfg.get('model')}  optimizer={train.get('optimizer')}  "
        f"lr={train.get('lr')}  λ={train.get('lam')}  epochs={train.get('epochs')}  "
        f"start={cfg.get('init') or 'random weights'}"
    )
    metrics = read_metrics(run)
    if metrics:
        t = Table(title="training")
        for c in ("epoch", "train loss", "accuracy", "group sparsity", "weighted", "lr", "λ"):
            t.add_column(c, justify="right")
        shown = metrics if len(metrics) <= 12 else metrics[:3] + metrics[-8:]
        for m in shown:
            t.add_row(
                str(m["epoch"]),
                f"{m['train_loss']:.4f}",
                f"{100 * m['accuracy']:.2f}%",
                f"{100 * m['group_sparsity']:.1f}%",
                f"{100 * m['weighted_group_sparsity']:.1f}%",
                f"{m['lr']:.3g}",
                f"{m.get('lam', 0):.3g}",
            )
        console.print(t)
    done = (run / RUN_FILES["weights"]).is_file()
    status = "finished" if done else f"not finished; continue it with: compress finetune --resume {run}"
    console.print(f"training: {status}")
    rep = run / RUN_FILES["report"]
    if rep.is_file():
        from compress.deploy.pipeline import print_report

        print_report(json.loads(rep.read_text()), console)
    else:
        console.print(f"not exported yet: compress export {run}")
    b = run / RUN_FILES["bench"]
    if b.is_file():
        from compress.deploy.bench import print_bench_table
        from compress.deploy.pipeline import bench_files

        bench = json.loads(b.read_text())
        print_bench_table(bench, console)
        if "files" in bench and bench["files"] != bench_files(run):
            console.print(
                f"[yellow]stale:[/] {b.name} measured other ONNX files than the run's dense.onnx and "
                f"model.onnx now; measure again with: compress bench {run}"
            )
