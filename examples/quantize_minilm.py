"""INT8 on top of pruning for all-MiniLM-L6-v2 (the README's MiniLM row of "INT8 on top of pruning").

A quick prune, not a trained one: in every layer the half of the attention heads and the half of
the MLP neurons with the smallest weight norm are zeroed through `compress.find_groups` and
removed by `compress.extract` (no fine-tuning, so the pruned model's cosine to the dense one is
low; what this example measures is what INT8 costs and gains on top of a pruned model). Both
models are exported, quantized with `compress.quantize_onnx` (calibrated on 256 seeded
sentences from the standard library's docstrings, checked on 300 held-out ones by cosine to
their own FP32 model) and benchmarked side by side at batch 1 and 32, 1 thread, 128 tokens.

    .venv/bin/python examples/quantize_minilm.py --out runs/minilm-int8      (--quick: a smoke test)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "compare"))

SEQ = 128


def smallest_half(groups, kind: str) -> list:
    """Per layer, the half of the `kind` groups with the smallest L2 norm."""
    by_layer: dict[str, list] = {}
    for g in groups:
        if g.kind == kind:
            by_layer.setdefault(g.layer, []).append(g)
    out = []
    for gs in by_layer.values():
        norms = [
            sum(float(t.index_select(s.dim, torch.tensor(s.indices)).pow(2).sum()) for s, t in zip(g.slices, g.tensors))
            for g in gs
        ]
        out += [gs[i] for i in np.argsort(norms)[: len(gs) // 2]]
    return out


def zero(groups) -> None:
    with torch.no_grad():
        for g in groups:
            for s, t in zip(g.slices, g.tensors):
                t.index_fill_(s.dim, torch.tensor(s.indices), 0.0)


def tokens(tok, sentences, names) -> dict[str, np.ndarray]:
    enc = tok(sentences, truncation=True, max_length=SEQ, padding="max_length", return_tensors="np")
    return {names[0]: enc["input_ids"].astype(np.int64), names[1]: enc["attention_mask"].astype(np.int64)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/minilm-int8"))
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per model and batch (default: ~1 s each)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 32 + 32 sentences, 2 timed rounds")
    args = ap.parse_args()
    n_train, n_eval = (32, 32) if args.quick else (256, 300)
    args.rounds = 2 if args.quick and args.rounds is None else args.rounds
    torch.set_num_threads(1)
    from text_task import load_encoder, split_corpus, stdlib_docstrings

    import compress
    from compress.deploy.calibration import model_inputs
    from compress.deploy.quantrun import QUANT_REPORT, bench_quantized

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    tok, dense = load_encoder()
    ex = tok(
        ["an example sentence for export", "and a second, longer one to vary the length"],
        padding=True,
        return_tensors="pt",
    )
    example = (ex["input_ids"], ex["attention_mask"])
    model = load_encoder()[1]
    groups = compress.find_groups(model, example)
    pruned = smallest_half(groups, "head") + smallest_half(groups, "neuron")
    zero(pruned)
    small, ext = compress.extract(model, groups, example)
    compress.export_onnx(dense, example, out / "dense.onnx")
    compress.export_onnx(small, example, out / "model.onnx")
    names = [n for n, _, _ in model_inputs(out / "model.onnx")]
    train, held = split_corpus(stdlib_docstrings(), n_train=n_train, n_eval=n_eval)
    cal, ev = tokens(tok, train, names), tokens(tok, held, names)
    with torch.no_grad():
        e_dense = dense(*(torch.from_numpy(ev[n]) for n in names)).numpy()
        e_small = small(*(torch.from_numpy(ev[n]) for n in names)).numpy()
    files = {}
    for src, dst in (("model.onnx", "model.int8.onnx"), ("dense.onnx", "dense.int8.onnx")):
        files[src] = compress.quantize_onnx(out / src, out / dst, cal, eval_data=ev, rounds=args.rounds)
        files[src].pop("calibration_indices")
        print(src, "→", dst, files[src]["form"], f"cos {files[src]['cosine_mean']:.4f}", files[src]["note"])
    report = {
        "files": files,
        "recommended": files["model.onnx"]["recommended"],
        "pruned_groups": {
            "heads": sum(g.kind == "head" for g in pruned),
            "neurons": sum(g.kind == "neuron" for g in pruned),
        },
        "params": {"dense": compress.count_params(dense), "pruned": compress.count_params(small)},
        "cosine_pruned_fp32_to_dense_fp32": float((e_dense * e_small).sum(1).mean()),
        "extract_max_abs_diff": ext["max_abs_diff"],
        "calibration": {"sentences": len(train), "seq": SEQ},
        "held_out": {"sentences": len(held), "source": "stdlib docstrings, other files"},
    }
    (out / QUANT_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    bench_quantized(out, rounds=args.rounds)
    print(json.dumps({k: report[k] for k in ("pruned_groups", "params", "cosine_pruned_fp32_to_dense_fp32")}))


if __name__ == "__main__":
    main()
