"""Run the zoo: find → zero half of every layer's groups → extract → compare → ONNX → ORT, per model.

Each model runs in its own subprocess with a timeout, so a hang or a crash is one row of
the table, not the end of the run. `--torch-pruning` adds Torch-Pruning's outcome on the
same model (MagnitudePruner at ratio 0.5: does its pruned model run forward?).

    python examples/zoo.py                       # every model, table on stdout
    python examples/zoo.py tv_vit hf_llama --json zoo.json --torch-pruning
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def zero_half(groups) -> int:
    """Zero every second group of each layer (so every layer and kind loses some); return how many."""
    seen: Counter = Counter()
    n = 0
    with torch.no_grad():
        for g in groups:
            seen[g.layer] += 1
            if seen[g.layer] % 2:
                continue
            for s, t in zip(g.slices, g.tensors):
                t.index_fill_(s.dim, torch.tensor(s.indices), 0.0)
            n += 1
    return n


def run_compress(name: str) -> dict:
    from zoo_models import build

    import compress

    model, x = build(name)
    row: dict = {"model": name, "params": compress.count_params(model)}
    stage = "find"
    try:
        t0 = time.perf_counter()
        groups = compress.find_groups(model, x)
        row["find_s"] = round(time.perf_counter() - t0, 2)
        row["kinds"] = dict(Counter(g.kind for g in groups))
        row["prunable_share"] = round(sum(g.size for g in groups) / row["params"], 3)
        row["refused"] = len(groups.not_prunable)
        row["reasons"] = sorted({r for _, r in groups.not_prunable})[:6]
        row["zeroed"] = zero_half(groups)
        stage = "extract"
        small, rep = compress.extract(model, groups, x)
        row["params_after"] = rep["params_after"]
        row["max_diff"] = rep["max_abs_diff"]
        stage = "onnx"
        with tempfile.TemporaryDirectory() as d:
            er = compress.export_onnx(small, x, Path(d) / "m.onnx")
        row["onnx_diff"] = er.get("max_abs_diff", er.get("max_rel_diff"))
        row["status"] = "exact"
    except Exception as e:  # noqa: BLE001 - a row of the table
        row["status"] = f"fail:{stage}"
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        row["trace"] = traceback.format_exc()[-1500:]
    return row


def run_tp(name: str) -> dict:
    import torch_pruning as tp
    from zoo_models import build

    model, x = build(name)
    ignored = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 10]
    try:
        pruner = tp.pruner.MagnitudePruner(
            model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=ignored
        )
        pruner.step()
        with torch.no_grad():
            model(x)
        return {"model": name, "tp": "runs", "tp_params": sum(p.numel() for p in model.parameters())}
    except Exception as e:  # noqa: BLE001
        return {"model": name, "tp": "crash", "tp_error": f"{type(e).__name__}: {str(e)[:200]}"}


def child(name: str, what: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", what, name]
    try:
        p = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "status" if what == "compress" else "tp": "timeout"}
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if not lines:
        key = "status" if what == "compress" else "tp"
        return {"model": name, key: "crash", "error": p.stderr[-500:]}
    return json.loads(lines[-1])


def table(rows) -> str:
    head = (
        "| model | status | groups (kind) | prunable | params → after | max diff | find s | refused | torch-pruning |"
    )
    out = [head, "|" + "---|" * 9]
    rows = sorted(rows, key=lambda r: r["model"])
    for r in rows:
        kinds = ", ".join(f"{v} {k}" for k, v in sorted(r.get("kinds", {}).items())) or "-"
        share = f"{r['prunable_share']:.0%}" if "prunable_share" in r else "-"
        after = f"{r.get('params', 0):,} → {r['params_after']:,}" if "params_after" in r else f"{r.get('params', 0):,}"
        diff = f"{r['max_diff']:.1e}" if "max_diff" in r else "-"
        out.append(
            f"| {r['model']} | {r.get('status')} | {kinds} | {share} | {after} | {diff} | {r.get('find_s', '-')} "
            f"| {r.get('refused', '-')} | {r.get('tp', '')} |"
        )
    n = sum(r.get("status") == "exact" for r in rows)
    out.append(f"\nexact: {n}/{len(rows)}; heads found on {sum('head' in r.get('kinds', {}) for r in rows)}")
    reasons = Counter(x.split(":")[0][:70] for r in rows for x in r.get("reasons", []))
    out.append("most frequent refusals: " + "; ".join(f"{k} ({v} models)" for k, v in reasons.most_common(6)))
    if any("tp" in r for r in rows):
        out.append(f"torch-pruning runs forward: {sum(r.get('tp') == 'runs' for r in rows)}/{len(rows)}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--json")
    ap.add_argument("--torch-pruning", action="store_true")
    ap.add_argument("--child", choices=["compress", "tp"])
    ap.add_argument(
        "--table",
        nargs="+",
        metavar="JSON",
        help="print the table of saved runs (later files override; torch-pruning columns kept)",
    )
    a = ap.parse_args()
    if a.table:
        rows: dict = {}
        for f in a.table:
            for r in json.loads(Path(f).read_text()):
                rows.setdefault(r["model"], {}).update(r)
        print(table(list(rows.values())))
        return
    torch.set_num_threads(1)
    if a.child:
        print(json.dumps(run_compress(a.models[0]) if a.child == "compress" else run_tp(a.models[0])))
        return
    from zoo_models import MODELS

    rows = []
    for name in a.models or list(MODELS):
        r = child(name, "compress", a.timeout)
        if a.torch_pruning:
            r.update({k: v for k, v in child(name, "tp", a.timeout).items() if k != "model"})
        rows.append(r)
        print(f"{name}: {r.get('status')} {r.get('error', '')[:160]} {r.get('tp', '')}", file=sys.stderr, flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
