"""Proof of value: accuracy at equal *measured* speedup, ours against the tools users would pick instead.

    .venv/bin/python examples/compare/run.py                 # both tasks, full settings
    .venv/bin/python examples/compare/run.py --quick --task digits --out /tmp/cmp

Every method starts from the same dense model, trains on the same data for the same number
of epochs, and ends as a plain torch model that goes through our `export_onnx` (verified
against torch) and our `benchmark` (ONNX Runtime CPU, 1 intra-op thread, batch 1 and 32,
dense and compressed interleaved). Per task it writes <out>/<task>.md, .json and
<task>_pareto.png, and prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (puts the checkout on sys.path)

DIGITS_METHODS = [
    "tp-magnitude",
    "tp-magnitude-r8",
    "tp-regularized",
    "oto",
    "ours",
    "ours-budget",
    "ours-budget-ft",
    "ours-budget-rewind",
]
TEXT_METHODS = ["tp-magnitude", "ours-budget", "ours-budget-rewind", "ours-budget-ft", "ours"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=["digits", "text", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="tiny epochs, one setting per method (smoke test)")
    ap.add_argument("--out", type=Path, default=Path("runs/compare"))
    ap.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated subset (digits: {','.join(DIGITS_METHODS)}; text: {','.join(TEXT_METHODS)})",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads for training (default: all cores)")
    ap.add_argument(
        "--fractions", default=None, help="comma-separated FLOP targets instead of the task's (e.g. 0.95,0.9)"
    )
    ap.add_argument(
        "--seeds",
        default="0",
        help="comma-separated training seeds (data order, the product's seed); with several, each seed's tables go "
        "to <out>/seed<N>/ and <out>/<task>_seeds.md holds mean (min–max) per method",
    )
    ap.add_argument(
        "--ours-kw",
        default="",
        help="an ablation of the ramda-budget methods: comma-separated key=value (TrainConfig fields, "
        "finetune_to_budget arguments, else BudgetController arguments; values parsed as Python literals), "
        "e.g. group_weight=kind,freeze_epoch=2; the method names get '[key=value,…]'",
    )
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary = {
        "command": " ".join(["python", "examples/compare/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "tasks": {},
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    tasks = ["digits", "text"] if args.task == "all" else [args.task]
    tables = []
    for task in tasks:
        t_task = time.perf_counter()
        md = run_task(task, args)
        summary["tasks"][task] = {"seconds": time.perf_counter() - t_task}
        tables.append(md)
        print(md, flush=True)
    summary["seconds"] = time.perf_counter() - t0
    from compress.files import atomic_write_json, atomic_write_text

    atomic_write_json(args.out / "summary.json", summary)
    timing = (
        f"total {summary['seconds']:.0f} s on {summary['torch_threads']} torch threads "
        f"({summary['cpu_count']} CPUs): " + ", ".join(f"{k} {v['seconds']:.0f} s" for k, v in summary["tasks"].items())
    )
    atomic_write_text(args.out / "results.md", f"`{summary['command']}` — {timing}\n\n" + "\n".join(tables))
    print(timing)
    return 0


def run_task(task: str, args) -> str:
    def log(msg):
        print(f"[{task}] {msg}", flush=True)

    out = args.out / task
    out.mkdir(parents=True, exist_ok=True)
    if task == "digits":
        from digits_task import Digits as Task

        methods = DIGITS_METHODS
    else:
        from text_task import Text as Task

        methods = TEXT_METHODS
    if args.methods:
        methods = [m for m in args.methods.split(",") if m in methods]
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed, mds = {}, []
    for seed in seeds:
        sub = args.out if len(seeds) == 1 else args.out / f"seed{seed}"
        t = Task(out if len(seeds) == 1 else sub / task, args.quick, log=log, seed=seed)
        if args.ours_kw:
            t.ours_kw, t.ours_tag = parse_kw(args.ours_kw), f"[{args.ours_kw}]"
        if args.fractions:
            t.cfg["fractions"] = [float(f) for f in args.fractions.split(",")]
        per_seed[seed] = t.run(methods)
        header = t.header() + f" Training seed {seed}."
        mds.append(common.write_report(sub, task, per_seed[seed], t.metric_name, header, t.extra_cols, meta=t.meta()))
    if len(seeds) == 1:
        return mds[0]
    from compress.files import atomic_write_text

    md = f"## {task}, over seeds\n\n" + common.seed_summary(per_seed, t.metric_name)
    atomic_write_text(args.out / f"{task}_seeds.md", md)
    return md + "\n" + "\n".join(mds)


def parse_kw(text: str) -> dict:
    """'a=1,b=kind' → {"a": 1, "b": "kind"} (Python literals where they parse, else strings)."""
    import ast

    out = {}
    for item in filter(None, text.split(",")):
        key, _, raw = item.partition("=")
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw
    return out


if __name__ == "__main__":
    raise SystemExit(main())
