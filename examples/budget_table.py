"""Compress to a budget (issue 13): FLOP targets on digits-resnet, a latency target on resnet20.

    python examples/budget_table.py [--init dense.safetensors] [--epochs 30] [--out runs/budget_table]

1. digits-resnet: a dense model trained here with AdamW (or --init), then
   `compress.budget.finetune_to_budget` with --target-flops 0.5 and 0.3, for both group
   weights (size = √group size, flops = ∝ the FLOPs a group's removal saves) and every
   freeze alignment in --aligns (default: simd_block(), the aligned freeze; 1 = unaligned).
   Each compressed model is exported (compress export, align 1: every zero group goes) and
   timed with ONNX Runtime at batch 1 and 32 against the dense model (interleaved, --threads).
2. resnet20 (synthetic 32x32 data): a latency target at batch 1, by default 55% of the dense
   model's latency measured here; reports predicted vs measured latency.

Prints the table of issue 13 (target, achieved FLOPs/params/latency, accuracy, λ at the freeze,
groups removed by the optimizer vs by enforcement vs by alignment) and writes OUT/budget_table.json
and OUT/budget_table.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compress.budget.runner import finetune_to_budget
from compress.budget.target import Budget  # noqa: E402
from compress.models import get_model  # noqa: E402
from compress.train.config import TrainConfig  # noqa: E402
from compress.train.evaluate import evaluate
from compress.train.loop import finetune


def dense_model(name: str, out: Path, epochs: int, init: str | None, console) -> tuple[torch.nn.Module, float]:
    """The dense starting point: --init weights, or AdamW training from scratch (cached in OUT)."""
    from safetensors.torch import load_file

    spec = get_model(name)
    train, test = spec.data()
    model = spec.build()
    cached = out / f"dense-{name}" / "weights.safetensors"
    if init:
        model.load_state_dict(load_file(init))
    elif cached.is_file():
        model.load_state_dict(load_file(cached))
    else:
        cfg = TrainConfig(epochs=epochs, optimizer="adamw", schedule="cosine", lr=3e-3, seed=0)
        finetune(
            model,
            train,
            test,
            spec.example_input(1),
            out / f"dense-{name}",
            cfg,
            force=True,
            progress=False,
            console=console,
        )
    acc = evaluate(model, test, torch.device("cpu"))["accuracy"]
    return model, acc


def run(name, dense, budget, cfg, out, console, measure_latency=True, align=None, threads=1):
    """One budget run, then compress export (align 1) and an ORT benchmark of model.onnx vs dense.onnx."""
    from compress.deploy.bench import benchmark
    from compress.deploy.extract import extract
    from compress.deploy.pipeline import export_run

    spec = get_model(name)
    train, test = spec.data()
    model = copy.deepcopy(dense)
    t0 = time.perf_counter()
    run_info = {"model": name, "data": None, "input_shape": None, "init": None}
    res = finetune_to_budget(
        model,
        train,
        test,
        spec.example_input(1),
        out,
        cfg,
        budget,
        force=True,
        progress=False,
        console=console,
        measure_latency=measure_latency,
        align=align,
        run_info=run_info,
    )
    seconds = time.perf_counter() - t0
    b = res.budget
    lat = b.get("latency", {})
    rep = export_run(out, align=1, console=console)
    x = spec.example_input(1)
    widths = {}
    for a in (1, 8):
        _, ext = extract(res.model.cpu(), res.groups, x, align=a)
        widths[a] = {ly: e["groups"] - e["removed"] for ly, e in ext["layers"].items() if e["kind"] != "head"}
    bench = benchmark(
        out / "dense.onnx",
        out / "model.onnx",
        batch_sizes=(1, 32),
        threads=(threads,),
        flops=(rep["flops_dense"], rep["flops_compressed"]),
    )
    speed = {r["batch"]: r["speedup"] for r in bench["results"] if r["engine"] == "onnxruntime"}
    return {
        "model": name,
        "target": budget.describe(),
        "group_weight": cfg.group_weight,
        "align": b.get("align", 1),
        "align_requested": align,
        "flops": b["achieved"]["flops_fraction"],
        "params": b["achieved"]["params_fraction"],
        "flops_export": rep["flops_compressed"] / rep["flops_dense"],
        "latency_ms": lat.get("measured_ms"),
        "latency_predicted_ms": lat.get("predicted_ms"),
        "latency_error": lat.get("prediction_error"),
        "dense_latency_ms": lat.get("dense_ms"),
        "accuracy": b.get("accuracy"),
        "onnx_accuracy": rep.get("onnx_accuracy"),
        "lam_final": b["lam_final"],
        "removed_by_optimizer": b["removed_by_optimizer"],
        "removed_by_enforcement": b["removed_by_enforcement"],
        "removed_by_alignment": b.get("removed_by_alignment", 0),
        "revived": b["revived"],
        "groups_total": b["groups_total"],
        "met": b["met"],
        "widths": widths[1],
        "export_same_with_align8": widths[1] == widths[8],
        "speedup_b1": speed.get(1),
        "speedup_b32": speed.get(32),
        "bench_threads": threads,
        "seconds": seconds,
        "run": str(out),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--init", help="dense digits-resnet weights (safetensors); default: train with AdamW here")
    ap.add_argument("--epochs", type=int, default=30, help="budget fine-tuning epochs (digits-resnet)")
    ap.add_argument("--dense-epochs", type=int, default=30)
    ap.add_argument("--targets", default="0.5,0.3")
    ap.add_argument("--group-weights", default="size,flops")
    ap.add_argument(
        "--aligns",
        default="auto",
        help="freeze alignments for digits-resnet, comma-separated: auto = simd_block(), 1 = unaligned",
    )
    ap.add_argument(
        "--milestones",
        default=None,
        help="lr decays (RAMDA restarts) for digits-resnet; default: one at 3/4 of the epochs, where the "
        "final phase starts (a frozen structure trained on at lr/10 settles; without the decay its "
        "accuracy swung 0.68-0.99 from epoch to epoch)",
    )
    ap.add_argument("--latency-ms", type=float, default=None, help="resnet20 target (default: 0.55 x dense, measured)")
    ap.add_argument("--latency-epochs", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for every latency")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--out", default="runs/budget_table")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(width=160)
    torch.manual_seed(0)
    rows = []
    dense, dense_acc = dense_model("digits-resnet", out, args.dense_epochs, args.init, console)
    console.print(f"dense digits-resnet accuracy {dense_acc:.4f}")
    milestones = (
        [int(m) for m in args.milestones.split(",") if m]
        if args.milestones is not None
        else [round(0.75 * args.epochs)]
    )
    t_start = time.perf_counter()
    aligns = [None if a == "auto" else int(a) for a in args.aligns.split(",") if a]
    for al in aligns:
        for gw in args.group_weights.split(","):
            for t in (float(x) for x in args.targets.split(",") if x):
                cfg = TrainConfig(
                    epochs=args.epochs, group_weight=gw, milestones=milestones, seed=0, threads=args.threads
                )
                tag = "" if al is None else f"-align{al}"
                console.rule(f"digits-resnet  FLOPs ≤ {t}  group weight {gw}  align {al or 'auto'}")
                row = run(
                    "digits-resnet",
                    dense,
                    Budget(flops=t),
                    cfg,
                    out / f"digits-flops{t}-{gw}{tag}",
                    console,
                    align=al,
                    threads=args.threads,
                    measure_latency=False,
                )
                row["dense_accuracy"] = dense_acc
                rows.append(row)
                save(rows, out, args, time.perf_counter() - t_start)
    if not args.skip_latency:
        r20, r20_acc = dense_model("resnet20", out, 10, None, console)
        console.print(f"dense resnet20 accuracy {r20_acc:.4f}")
        target = args.latency_ms
        if target is None:
            from compress.budget.latency import LatencyModel
            from compress.structure.cost_model import CostModel
            from compress.structure.find import find_groups

            x = get_model("resnet20").example_input(1)
            g = find_groups(r20, x)
            lm = LatencyModel(r20, g, x, CostModel(r20, g, x), batch=1, threads=args.threads)
            dense_ms = lm.measure(torch.zeros(len(g), dtype=torch.bool), tag="dense")["dense_ms"]
            target = round(0.55 * dense_ms, 3)
            console.print(
                f"resnet20 dense latency {dense_ms:.3f} ms (batch 1, {args.threads} thread) → target {target} ms"
            )
        e = args.latency_epochs
        cfg = TrainConfig(epochs=e, milestones=[max(1, round(0.7 * e))], seed=0, threads=args.threads)
        console.rule(f"resnet20  latency ≤ {target} ms")
        row = run(
            "resnet20",
            r20,
            Budget(latency_ms=target, batch=1, threads=args.threads),
            cfg,
            out / "resnet20-latency",
            console,
            threads=args.threads,
        )
        row["dense_accuracy"] = r20_acc
        rows.append(row)
        save(rows, out, args, time.perf_counter() - t_start)
    print_table(rows, console)


def save(rows, out, args, seconds):
    """OUT/budget_table.json and .md, rewritten after every run (a cut session keeps what finished)."""
    (out / "budget_table.json").write_text(json.dumps(rows, indent=2))
    cmd = "python examples/budget_table.py " + " ".join(sys.argv[1:])
    (out / "budget_table.md").write_text(markdown(rows, cmd, seconds))


def markdown(rows, cmd, seconds) -> str:
    """The issue's table as markdown, with the done criteria checked per row."""
    head = (
        "| model | target | weight | align | FLOPs | params | latency ms: measured (predicted, error) / dense "
        "| accuracy (dense) | λ at freeze | removed: optimizer / enforcement / alignment (revived) of total "
        "| ORT speedup b1 / b32 | done |"
    )
    lines = [f"`{cmd}` — {seconds / 60:.1f} min", "", head, "|" + "---|" * 12]
    for r in rows:
        if r["latency_ms"] is None:
            lat = "–"
        else:
            lat = f"{r['latency_ms']:.3f}"
            if r.get("latency_predicted_ms") is not None:
                lat += f" ({r['latency_predicted_ms']:.3f}, {100 * r['latency_error']:+.1f}%)"
            lat += f" / {r['dense_latency_ms']:.3f}"
        lines.append(
            f"| {r['model']} | {r['target']} | {r['group_weight']} | {r['align']} | {r['flops']:.3f} | {r['params']:.3f} "
            f"| {lat} | {r['accuracy']:.4f} ({r['dense_accuracy']:.4f}) | {r['lam_final']:.3g} "
            f"| {r['removed_by_optimizer']} / {r['removed_by_enforcement']} / {r['removed_by_alignment']} "
            f"({r['revived']}) of {r['groups_total']} | {r['speedup_b1']:.2f}× / {r['speedup_b32']:.2f}× "
            f"| {done(r)} |"
        )
    return "\n".join(lines) + "\n"


def done(r) -> str:
    """Issue 13's criteria: FLOP fraction in [T−0.05, T] (accuracy ≥ dense − 0.02 at 0.5); latency
    measured ≤ 1.1 × target and predicted within 15% of measured."""
    if "latency" in r["target"]:
        target = float(r["target"].split("≤ ")[1].split(" ")[0])
        ok = r["latency_ms"] <= 1.1 * target and abs(r["latency_error"]) <= 0.15
    else:
        t = float(r["target"].split("≤ ")[1].split(" ")[0])
        ok = t - 0.05 <= r["flops"] <= t and (t != 0.5 or r["accuracy"] >= r["dense_accuracy"] - 0.02)
    return "yes" if ok else "NO"


def print_table(rows, console):
    t = Table(title="compress to a budget (issue 13)")
    for c in (
        "model",
        "target",
        "weight",
        "align",
        "FLOPs",
        "params",
        "latency ms (pred.)",
        "accuracy (dense)",
        "λ freeze",
        "removed opt / enf / align (revived)",
        "speedup b1/b32",
        "done",
    ):
        t.add_column(c, justify="right" if c not in ("model", "target") else "left")
    for r in rows:
        lat = "–" if r["latency_ms"] is None else f"{r['latency_ms']:.3f}"
        if r.get("latency_predicted_ms") is not None:
            lat += f" ({r['latency_predicted_ms']:.3f})"
        if r.get("dense_latency_ms"):
            lat += f" / {r['dense_latency_ms']:.3f}"
        t.add_row(
            r["model"],
            r["target"],
            r["group_weight"],
            str(r["align"]),
            f"{r['flops']:.3f}",
            f"{r['params']:.3f}",
            lat,
            f"{r['accuracy']:.4f} ({r['dense_accuracy']:.4f})",
            f"{r['lam_final']:.3g}",
            f"{r['removed_by_optimizer']} / {r['removed_by_enforcement']} / {r['removed_by_alignment']} "
            f"({r['revived']}) of {r['groups_total']}",
            f"{r['speedup_b1']:.2f}× / {r['speedup_b32']:.2f}×",
            done(r),
        )
    console.print(t)


if __name__ == "__main__":
    main()
