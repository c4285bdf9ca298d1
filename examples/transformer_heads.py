"""Attention heads and MLP neurons of a transformer: find them, make them zero, remove them.

    .venv/bin/python examples/transformer_heads.py                        # bert-mini, magnitude, 50%
    .venv/bin/python examples/transformer_heads.py --model vit-tiny --fraction 0.3
    .venv/bin/python examples/transformer_heads.py --steps 200 --lam 2e-3  # RAMDA on the synthetic task
    .venv/bin/python examples/transformer_heads.py --model hf-bert        # Hugging Face BERT (random weights)

Without --steps the weakest `--fraction` of heads and of MLP neurons *per layer* are
zeroed by group norm (no training: the point is the structure, not the accuracy). With
--steps the model is fine-tuned with RAMDA and group lasso on the same groups, and the
structured point Ŵ is what gets extracted. Either way `compress.extract` removes the zero
groups, updates num_heads, and verifies the outputs; the script prints the groups,
heads left per block, params/FLOPs and measured torch latency before and after.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from compress.deploy.extract import extract
from compress.models import get_model
from compress.structure.attention import attention_units
from compress.structure.find import find_groups
from compress.structure.sparsity import group_norms, group_sparsity


def build(name: str, seq: int):
    if name == "hf-bert":
        import transformers as tf

        cfg = tf.BertConfig(
            vocab_size=30522,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            num_labels=2,
        )
        model = tf.BertForSequenceClassification(cfg)
        return model, torch.randint(0, 30522, (1, seq)), None
    spec = get_model(name)
    x = torch.randint(0, 30522, (1, seq)) if name == "bert-mini" else spec.example_input(1)
    return spec.build(), x, spec.data


def zero_weakest(groups, fraction: float) -> None:
    """Zero the `fraction` weakest groups (by ‖W_g‖) of every layer, kinds kept apart."""
    norms = group_norms(groups)
    layers: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        layers.setdefault(g.layer, []).append(i)
    with torch.no_grad():
        for idx in layers.values():
            k = int(len(idx) * fraction)
            for i in sorted(idx, key=lambda i: float(norms[i]))[:k]:
                for s, t in zip(groups[i].slices, groups[i].tensors):
                    t.index_fill_(s.dim, torch.tensor(s.indices), 0.0)


def finetune(model, groups, data, steps: int, lam: float, lr: float, console) -> None:
    from compress.optim import RAMDA

    train, _ = data()
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True)
    opt = RAMDA(model.parameters(), lr=lr, lam=lam, groups=groups)
    model.train()
    step = 0
    while step < steps:
        for xb, yb in loader:
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0 or step == steps:
                frac, weighted = opt.group_sparsity()
                console.print(
                    f"step {step:4d}  loss {loss.item():.3f}  zero groups {frac:.1%} (weighted {weighted:.1%})"
                )
            if step == steps:
                break
    opt.commit_structured_point()  # extraction must see the structured point Ŵ
    model.eval()


def latency_ms(models, x, runs: int = 20) -> list[float]:
    """Median torch latency of each model, runs interleaved so machine noise hits all alike."""
    calls = [(lambda m=m: m(**x)) if isinstance(x, dict) else (lambda m=m: m(x)) for m in models]
    times = [[] for _ in models]
    with torch.no_grad():
        for c in calls:
            for _ in range(3):
                c()
        for _ in range(runs):
            for k, c in enumerate(calls):
                t = time.perf_counter()
                c()
                times[k].append((time.perf_counter() - t) * 1e3)
    return [statistics.median(t) for t in times]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bert-mini", choices=["bert-mini", "vit-tiny", "hf-bert"])
    ap.add_argument("--fraction", type=float, default=0.5, help="per-layer fraction zeroed by magnitude")
    ap.add_argument("--steps", type=int, default=0, help="RAMDA fine-tuning steps instead of magnitude zeroing")
    ap.add_argument("--lam", type=float, default=2e-3)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seq", type=int, default=128, help="sequence length of the text models' example input")
    args = ap.parse_args()
    console = Console()
    torch.manual_seed(0)
    model, x, data = build(args.model, args.seq)
    model.eval()

    groups = find_groups(model, x)
    t = Table(title=f"groups of {args.model}")
    for col in ("kind", "count", "entries per group"):
        t.add_column(col)
    for kind in ("head", "neuron", "channel"):
        gs = [g for g in groups if g.kind == kind]
        if gs:
            sizes = sorted({g.size for g in gs})
            t.add_row(kind, str(len(gs)), ", ".join(map(str, sizes[:4])))
    console.print(t)
    for layer, why in groups.not_prunable[:3]:
        console.print(f"[dim]not prunable: {layer}: {why}[/dim]")
    if len(groups.not_prunable) > 3:
        console.print(f"[dim]... and {len(groups.not_prunable) - 3} more[/dim]")

    if args.steps:
        if data is None:
            raise SystemExit("--steps needs a model with data (bert-mini or vit-tiny)")
        finetune(model, groups, data, args.steps, args.lam, args.lr, console)
    else:
        zero_weakest(groups, args.fraction)
    frac, weighted = group_sparsity(groups)
    console.print(f"zero groups: {frac:.1%} of groups, {weighted:.1%} of grouped entries")

    small, rep = extract(model, groups, x)
    heads_before = [u.num_heads for u in attention_units(model)]
    heads_after = [u.num_heads for u in attention_units(small)]
    t = Table(title="extraction")
    for col in ("", "dense", "compressed", "ratio"):
        t.add_column(col, justify="right")
    t.add_row(
        "parameters",
        f"{rep['params_before']:,}",
        f"{rep['params_after']:,}",
        f"{rep['params_after'] / rep['params_before']:.3f}",
    )
    t.add_row(
        "FLOPs",
        f"{rep['flops_before']:,}",
        f"{rep['flops_after']:,}",
        f"{rep['flops_after'] / rep['flops_before']:.3f}",
    )
    dense_ms, small_ms = latency_ms([model, small], x)
    t.add_row("torch ms (batch 1, median)", f"{dense_ms:.2f}", f"{small_ms:.2f}", f"{small_ms / dense_ms:.3f}")
    t.add_row("heads per block", str(heads_before), str(heads_after), "")
    console.print(t)
    console.print(f"max |dense − compressed| = {rep['max_abs_diff']:.2e} (output scale {rep['output_scale']:.2e})")
    for layer, info in rep["layers"].items():
        if info["note"]:
            console.print(f"[yellow]{layer}: {info['note']}[/yellow]")


if __name__ == "__main__":
    main()
