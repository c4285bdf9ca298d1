"""Ablations of the budget path against Torch-Pruning magnitude pruning, digits-resnet, several seeds.

Every variant starts from the same dense weights (`--init`, e.g. a `compress finetune --optimizer adamw
--lam 0 --epochs 30 --schedule cosine --weight-decay 1e-4` run) and trains the same number of epochs:

  default   compress finetune --target-flops F (the budget path as shipped)
  distill   + --distill kl (teacher: the dense start)
  long      + --milestones 18 (freeze at 18 of 30: final phase 12 epochs instead of 8)
  rewind    + --rewind init
  early     the freeze at epoch 10 of 30 (Python API: controller={"freeze_epoch": 10}), 20 AdamW epochs
  pattern-ft  default-s{seed}'s frozen zero pattern on the dense weights + the peers' 30 epochs of AdamW
  tp-r8     the same with round_to=8 (widths in multiples of 8, which ONNX Runtime's blocked kernels like)
  tp        Torch-Pruning MagnitudePruner (group L2, global, small steps) to F, then AdamW lr 1e-3 wd 1e-4 cosine
            for all epochs (examples/compare's tp-magnitude, seeded)

Accuracy is that of the extracted model on the held-out split (budget.json's for ours); speed: ONNX Runtime,
1 thread, batch 1 and 32, interleaved with the dense export (compress.benchmark). Results append
to OUT/results.jsonl (one line per run, so an interrupted sweep keeps what it measured);
`--table` prints mean / min / max per variant.

    python examples/ablation_digits.py --init runs/dense/weights.safetensors --seeds 0,1,2 --out runs/ablation
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "default": [],
    "distill": ["--distill", "kl"],
    "long": ["--milestones", "18"],
    # the rewind's freeze before the early default (`--rewind init` alone now freezes after the first quarter)
    "rewind": ["--rewind", "init", "--freeze-epoch", "22"],
    "distill-long": ["--distill", "kl", "--milestones", "18"],
    "distill-t1": ["--distill", "kl", "--distill-temperature", "1", "--distill-alpha", "0.5"],
    "rewind-long": ["--rewind", "init", "--freeze-epoch", "18"],
    # the structure chosen in 8 sparsity epochs, then 22 AdamW epochs from the dense weights
    "rewind-early": ["--rewind", "init", "--freeze-epoch", "8"],
    "align16": ["--align", "16"],  # the alignment assumed, not measured (the behaviour before issue 21)
}


def run_ours(variant: str, seed: int, args) -> dict:
    out = Path(args.out) / f"{variant}-s{seed}"
    cmd = [
        str(Path(sys.executable).with_name("compress")),
        "finetune",
        "--model",
        "digits-resnet",
        "--init",
        args.init,
        "--target-flops",
        str(args.fraction),
        "--epochs",
        str(args.epochs),
        "--threads",
        "1",
        "--seed",
        str(seed),
        "--quiet",
        "--force",
        "--out",
        str(out),
        *VARIANTS[variant],
        *args.extra,
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    b = json.loads((out / "budget.json").read_text())
    widths = b["freeze"].get("alignment", {}).get("widths") or b["freeze"].get("widths")
    seconds = time.perf_counter() - t0
    from compress.deploy.pipeline import export_run

    export_run(out, console=_quiet())
    return {
        "accuracy": b["accuracy"],
        "flops": b["achieved"]["flops_fraction"],
        "widths": widths,
        "seconds": seconds,
        "command": " ".join(cmd[1:]),
        "onnx": str(out / "model.onnx"),
        **_speed(out / "model.onnx", args),
        "alignment_measured": b.get("alignment_measured"),
    }


def run_early(seed: int, args, freeze_epoch: int = 10) -> dict:
    """The budget path with the freeze at epoch 10 of 30 (20 AdamW epochs on the frozen structure): the
    freeze epoch is a Python API setting (`controller={"freeze_epoch": ...}`), not a CLI flag."""
    import torch

    from compress.budget.runner import budget_config, finetune_to_budget
    from compress.budget.target import Budget
    from compress.models import get_model
    from compress.train.checkpoint import load_weights
    from compress.train.config import TrainConfig

    out = Path(args.out) / f"early-s{seed}"
    spec = get_model("digits-resnet")
    torch.manual_seed(seed)
    net = spec.build()
    tr, te = spec.data()
    cfg = budget_config(TrainConfig(epochs=args.epochs, seed=seed, threads=1, milestones=[freeze_epoch]))
    t0 = time.perf_counter()
    res = finetune_to_budget(
        net,
        tr,
        te,
        spec.example_input(1),
        out,
        cfg,
        Budget(flops=args.fraction),
        init_weights=load_weights(args.init),
        controller={"freeze_epoch": freeze_epoch},
        run_info={"model": "digits-resnet", "data": None, "input_shape": None, "init": args.init},
        force=True,
        progress=False,
        console=_quiet(),
    )
    b = res.budget
    seconds = time.perf_counter() - t0
    from compress.deploy.pipeline import export_run

    export_run(out, console=_quiet())
    return {
        "accuracy": b["accuracy"],
        "flops": b["achieved"]["flops_fraction"],
        "widths": b["freeze"].get("alignment", {}).get("widths"),
        "seconds": seconds,
        "command": f"ablation_digits.py early seed {seed}",
        "onnx": str(out / "model.onnx"),
        **_speed(out / "model.onnx", args),
    }


def _quiet():
    import io

    from rich.console import Console

    return Console(file=io.StringIO())


def _speed(onnx_path: Path, args) -> dict:
    """ORT speedup over the shared dense export at batch 1 and 32, 1 thread, interleaved (compress.benchmark)."""
    from compress.deploy.bench import benchmark

    res = benchmark(Path(args.out) / "dense.onnx", onnx_path, batch_sizes=(1, 32), threads=(1,))
    return {f"speedup_b{r['batch']}": r["speedup"] for r in res["results"]}


def _dense_onnx(args) -> None:
    from compress.deploy.export import export_onnx
    from compress.models import get_model
    from compress.train.checkpoint import load_weights

    path = Path(args.out) / "dense.onnx"
    if not path.is_file():
        spec = get_model("digits-resnet")
        m = spec.build()
        m.load_state_dict(load_weights(args.init))
        export_onnx(m.eval(), spec.example_input(1), path, verify=False)


def run_tp(seed: int, args, **pruner_kw) -> dict:
    """examples/compare's tp-magnitude with the data order and torch seed of `seed` (`round_to=8`: tp-r8)."""
    sys.path.insert(0, str(Path(__file__).parent / "compare"))
    import torch
    import torch.nn.functional as F
    from common import cosine_lr, tensor_batches, train_loop
    from tp_peers import make_pruner, prune_to_flops

    from compress.models import get_model
    from compress.train.checkpoint import load_weights

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    spec = get_model("digits-resnet")
    (tr, te), m, example = spec.data(), spec.build(), spec.example_input(1)
    m.load_state_dict(load_weights(args.init))
    t0 = time.perf_counter()
    pr = make_pruner("magnitude", m, example, [m.fc], steps=200, max_ratio=0.95, **pruner_kw)
    reached = prune_to_flops(m, pr, example, args.fraction, steps=200)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-4)
    train_loop(
        m,
        tensor_batches(tr.tensors[:1], tr.tensors[1], 64, seed),
        args.epochs,
        opt,
        cosine_lr(1e-3, args.epochs),
        F.cross_entropy,
    )
    m.eval()
    with torch.no_grad():
        acc = float((m(te.tensors[0]).argmax(1) == te.tensors[1]).float().mean())
    widths = {n: mod.out_channels for n, mod in m.named_modules() if isinstance(mod, torch.nn.Conv2d)}
    seconds = time.perf_counter() - t0
    from compress.deploy.export import export_onnx

    path = Path(args.out) / f"tp{'-r8' * bool(pruner_kw)}-s{seed}.onnx"
    export_onnx(m, example, path, verify=False)
    return {
        "accuracy": acc,
        "flops": reached["flop_fraction"],
        "widths": widths,
        "seconds": seconds,
        "command": f"ablation_digits.py tp seed {seed} {pruner_kw or ''}",
        "onnx": str(path),
        **_speed(path, args),
    }


def run_pattern_ft(seed: int, args) -> dict:
    """The frozen zero pattern of OUT/default-s{seed} applied to the dense weights, extracted, then the peers'
    fine-tuning (30 epochs AdamW): separates the structure RAMDA chose from the training it got."""
    import torch

    from compress.budget.patterns import ZeroKeeper
    from compress.deploy.extract import extract
    from compress.models import get_model
    from compress.structure.group import load_groups
    from compress.train.checkpoint import load_weights

    sys.path.insert(0, str(Path(__file__).parent / "compare"))
    import torch.nn.functional as F
    from common import cosine_lr, tensor_batches, train_loop

    src = Path(args.out) / f"default-s{seed}"
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    spec = get_model("digits-resnet")
    (tr, te), m, example = spec.data(), spec.build(), spec.example_input(1)
    m.load_state_dict(load_weights(args.init))
    groups = load_groups(src / "groups.json", m)
    mask = torch.zeros(len(groups), dtype=torch.bool)
    mask[json.loads((src / "budget_state.json").read_text())["frozen"]] = True
    ZeroKeeper(groups, mask).apply()
    m, _ = extract(m, groups, example)
    t0 = time.perf_counter()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-4)
    train_loop(
        m,
        tensor_batches(tr.tensors[:1], tr.tensors[1], 64, seed),
        args.epochs,
        opt,
        cosine_lr(1e-3, args.epochs),
        F.cross_entropy,
    )
    m.eval()
    with torch.no_grad():
        acc = float((m(te.tensors[0]).argmax(1) == te.tensors[1]).float().mean())
    from compress.deploy.export import export_onnx
    from compress.structure.cost import count_flops

    path = Path(args.out) / f"pattern-ft-s{seed}.onnx"
    export_onnx(m, example, path, verify=False)
    dense = spec.build()
    return {
        "accuracy": acc,
        "flops": count_flops(m, example) / count_flops(dense, example),
        "widths": None,
        "seconds": time.perf_counter() - t0,
        "command": f"ablation_digits.py pattern-ft seed {seed}",
        "onnx": str(path),
        **_speed(path, args),
    }


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by: dict[str, list] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    lines = [
        "| variant | seeds | accuracy mean | min | max | FLOPs | ORT speedup b1 / b32 |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, rs in by.items():
        a = [r["accuracy"] for r in rs]
        lines.append(
            f"| {v} | {','.join(str(r['seed']) for r in rs)} | {100 * statistics.mean(a):.2f}% | "
            f"{100 * min(a):.2f}% | {100 * max(a):.2f}% | {statistics.mean(r['flops'] for r in rs):.3f} | "
            f"{statistics.mean(r.get('speedup_b1', 0) for r in rs):.2f}× / "
            f"{statistics.mean(r.get('speedup_b32', 0) for r in rs):.2f}× |"
        )
    return "\n".join(lines)


def _onnx_name(r: dict) -> str:
    return f"{r['variant']}-s{r['seed']}" + (".onnx" if r["variant"].startswith("tp") else "/model.onnx")


def rebench(sources: list[Path], res: Path, args) -> int:
    """Every row's model timed again in one session, so load drift between runs does not pick winners."""
    rows = [
        {"onnx": str(p.parent / _onnx_name(r)), **r}
        for p in sources
        for r in (json.loads(line) for line in p.read_text().splitlines() if line.strip())
    ]
    with res.open("w") as f:
        for r in rows:
            r.update(_speed(Path(r["onnx"]), args))
            f.write(json.dumps(r) + "\n")
            print(f"{r['variant']:14s} seed {r['seed']}  {r['speedup_b1']:.2f}× / {r['speedup_b32']:.2f}×", flush=True)
    print(table(res))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default="runs/dense/weights.safetensors")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default="default,distill,long,rewind,tp")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--table", action="store_true", help="only print the table of OUT/results.jsonl")
    ap.add_argument(
        "--rebench",
        nargs="*",
        metavar="RESULTS",
        help="re-time every model of these results.jsonl files one after another (a quiet moment of a "
        "shared machine), write OUT/results.jsonl with the new speedups, print the table",
    )
    ap.add_argument("extra", nargs="*", help="extra `compress finetune` flags for our variants (after --)")
    args = ap.parse_args(argv)
    res = Path(args.out) / "results.jsonl"
    if args.table:
        print(table(res))
        return 0
    res.parent.mkdir(parents=True, exist_ok=True)
    _dense_onnx(args)
    if args.rebench:
        return rebench([Path(p) for p in args.rebench], res, args)
    for seed in [int(s) for s in args.seeds.split(",")]:
        for v in args.variants.split(","):
            r = (
                run_tp(seed, args)
                if v == "tp"
                else run_tp(seed, args, round_to=8)
                if v == "tp-r8"
                else run_pattern_ft(seed, args)
                if v == "pattern-ft"
                else run_early(seed, args)
                if v == "early"
                else run_ours(v, seed, args)
            )
            r.update(variant=v, seed=seed, fraction=args.fraction, epochs=args.epochs)
            with res.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(
                f"{v:14s} seed {seed}  acc {100 * r['accuracy']:.2f}%  FLOPs {r['flops']:.3f}  speedup "
                f"{r['speedup_b1']:.2f}× / {r['speedup_b32']:.2f}×  {r['seconds']:.0f}s  widths {r['widths']}",
                flush=True,
            )
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
