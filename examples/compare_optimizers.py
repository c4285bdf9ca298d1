"""Compare the group-sparse optimizers on digits-resnet or digits-vit: accuracy at matched sparsity.

A dense model is trained here (AdamW, cosine, `--dense-epochs`), then every method
fine-tunes a copy with the same epochs, batches and step schedule (lr × γ at 1/2 and 3/4
of the epochs: RAMDA/RMDA restart there and ramp their averaging weight to 1), for
several λ each. Each run ends on the structured point with BatchNorm statistics
recalibrated, is extracted (zero groups physically removed, outputs verified) and
counted. Reported: accuracy, group sparsity and weighted group sparsity, FLOP reduction
after extraction, and the optimizer step time relative to AdamW's: measured apart, every
method alternated with AdamW round by round on the same gradients (one λ per method, the
middle of its grid), median over rounds; "train step" adds one forward+backward to both.

    python examples/compare_optimizers.py                # the full table (README)
    python examples/compare_optimizers.py --model digits-vit --out runs/compare_optimizers_vit
    python examples/compare_optimizers.py --quick        # a minute: every method once
    python examples/compare_optimizers.py --methods asgo,dsgd --lams asgo=1e-2,3e-2

Writes OUT/results.json, OUT/table.md, OUT/compare_optimizers.png and OUT/dsgd_picks_*.png.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compress.deploy.extract import extract
from compress.files import atomic_write_json, atomic_write_text, atomic_write_with
from compress.models import get_model
from compress.optim import make_optimizer
from compress.optim.dsgd import model_layers, plot_layer_picks
from compress.structure.cost import count_flops
from compress.structure.find import find_groups
from compress.structure.group import GroupList, bind_groups
from compress.train.config import TrainConfig, lr_at, momentum_at
from compress.train.evaluate import evaluate, recalibrate_batchnorm

# Fine-tuning from a good dense point: small learning rates (RAMDA 3e-4 keeps ~99% on digits;
# 1e-2 destroys the model). The λ grids come from pilot sweeps (6 and 20 epochs) and span
# light sparsity to the collapse (BatchNorm makes conv rows scale-invariant, so once the prox
# outweighs the pull of γ/β a network goes to zero quickly); λ means different things
# per method (RAMDA: α_t λ with α_t = Σ η√t; ProxAdam: η λ in Adam's metric; z-space: in
# units of D^{1/2}), so the grids differ.
RESNET_METHODS = {
    "ramda": dict(opt="ramda", lr=3e-4, kw={}, lams=[5e-3, 1e-2, 1.5e-2, 2e-2, 3e-2]),
    "rmda": dict(opt="rmda", lr=1e-2, kw={}, lams=[0.04, 0.05, 0.06, 0.08]),
    "proxsgd": dict(opt="proxsgd", lr=1e-2, kw={"momentum": 0.9}, lams=[0.01, 0.02, 0.04, 0.07]),
    "proxadam": dict(opt="proxadam", lr=1e-4, kw={"reg_space": "param"}, lams=[0.02, 0.05, 0.07, 0.085]),
    "proxadam-z": dict(opt="proxadam", lr=1e-4, kw={"reg_space": "preconditioned"}, lams=[0.2, 0.25, 0.3, 0.35]),
    "asgo": dict(opt="asgo", lr=3e-4, kw={"precond_every": 10}, lams=[0.01, 0.02, 0.03, 0.04]),
    "dasgo": dict(opt="dasgo", lr=3e-4, kw={}, lams=[0.015, 0.02, 0.03, 0.04]),
    "dsgd": dict(opt="dsgd", lr=1e-2, kw={"k": 1}, lams=[0.1, 0.2, 0.28, 0.35]),
}
ADAMW = dict(opt="adamw", lr=1e-4, kw={"weight_decay": 0.0}, lams=[0.0])
BATCH = 64

# digits-vit (heads and MLP neurons behind LayerNorm: no BatchNorm scale invariance, so the shrinkage
# of live groups costs accuracy from the first zeros on): grids from 20-epoch pilots on the same dense
# model (97.8%), spanning light sparsity to the collapse. The CNN's learning rates kept: at λ = 0 every
# method stayed at 97.8-98.2%. ProxSGD/RMDA/DSGD zero almost nothing before they collapse (pilots:
# rmda .04 0% zero 83.6%, .06 99.7% zero; proxsgd .03 11.6% zero 81.8%, .045 all zero; dsgd .15
# 13% zero 35.1%), so their grids end at the edge.
VIT_METHODS = {k: dict(v) for k, v in RESNET_METHODS.items()}
for _name, _lams in {
    "ramda": [1e-3, 2e-3, 5e-3, 8e-3, 1.2e-2],
    "rmda": [0.02, 0.04, 0.05, 0.06],
    "proxsgd": [0.01, 0.02, 0.03, 0.04],
    "proxadam": [2.5e-3, 5e-3, 1e-2, 2e-2],
    "proxadam-z": [0.05, 0.1, 0.2, 0.3],
    "asgo": [2e-3, 5e-3, 1e-2, 2e-2],
    "dasgo": [5e-3, 1e-2, 1.5e-2, 2.5e-2],
    "dsgd": [0.05, 0.1, 0.15, 0.25],
}.items():
    VIT_METHODS[_name]["lams"] = _lams

# Per model: the dense training (AdamW + cosine from scratch) and the fine-tuning grids.
PROFILES = {
    "digits-resnet": dict(dense_lr=3e-3, dense_wd=1e-4, dense_epochs=20, methods=RESNET_METHODS),
    "digits-vit": dict(dense_lr=1e-3, dense_wd=5e-2, dense_epochs=40, methods=VIT_METHODS),
}
METHODS = RESNET_METHODS  # the default model's grids (names are the same for every model)


def batches(data, epoch: int, seed: int):
    """The same shuffled batches for every method (permutation seeded by (seed, epoch))."""
    x, y = data.tensors
    g = torch.Generator().manual_seed(seed * 1009 + epoch)
    order = torch.randperm(len(y), generator=g)
    for s in range(0, len(y), BATCH):
        idx = order[s : s + BATCH]
        yield x[idx], y[idx]


def train_dense(spec, train, test, epochs: int, seed: int, lr: float = 3e-3, weight_decay: float = 1e-4):
    torch.manual_seed(seed)
    model = spec.build()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    cfg = TrainConfig(epochs=epochs, lr=lr, schedule="cosine").resolved()
    for e in range(epochs):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, e)
        model.train()
        for x, y in batches(train, e, seed):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    acc = evaluate(model, test, torch.device("cpu"))["accuracy"]
    return model, acc


def fresh_groups(groups, model):
    return bind_groups(GroupList([dataclasses.replace(g, tensors=[]) for g in groups]), model)


def build(m, lam, dense, groups):
    """A fresh copy of the dense model, its bound groups and the method's optimizer."""
    model = copy.deepcopy(dense)
    gl = fresh_groups(groups, model)
    kw = dict(m["kw"])
    if m["opt"] == "dsgd":
        layers, names = model_layers(model, gl)
        kw.update(layers=layers, layer_names=names)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(m["opt"], params, groups=gl, lr=m["lr"], lam=lam, **kw)
    return model, gl, opt


def run_method(label, m, lam, dense, groups, train, test, example, epochs, seed, out):
    model, gl, opt = build(m, lam, dense, groups)
    cfg = TrainConfig(epochs=epochs, lr=m["lr"], optimizer=m["opt"], lam=lam).resolved()
    step_ms, full_ms = [], []
    for e in range(epochs):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, e)
        if e in cfg.milestones:
            opt.restart()
        if opt.momentum_schedule:
            opt.set_momentum(momentum_at(cfg, e))
        model.train()
        for x, y in batches(train, e, seed + 1):
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            step_ms.append(1e3 * (t2 - t1))
            full_ms.append(1e3 * (t2 - t0))
            if not math.isfinite(float(loss.detach())):
                raise RuntimeError(f"{label} λ={lam}: loss became {float(loss.detach())}")
    opt.commit_structured_point()
    recalibrate_batchnorm(model, train, torch.device("cpu"))
    acc = evaluate(model, test, torch.device("cpu"))["accuracy"]
    sp, wsp = opt.group_sparsity()
    small, rep = extract(model, gl, example)
    small_acc = evaluate(small, test, torch.device("cpu"))["accuracy"]
    flops_before, flops_after = count_flops(model, example), count_flops(small, example)
    assert flops_after == rep["flops_after"]
    row = {
        "method": label,
        "lam": lam,
        "lr": m["lr"],
        "accuracy": acc,
        "extracted_accuracy": small_acc,
        "group_sparsity": sp,
        "weighted_group_sparsity": wsp,
        "flops_before": flops_before,
        "flops_after": flops_after,
        "flop_reduction": 1 - flops_after / flops_before,
        "params_after": rep["params_after"],
        "step_ms": statistics.median(step_ms),
        "full_step_ms": statistics.median(full_ms),
    }
    if m["opt"] == "dsgd":
        row["layer_picks"] = opt.layer_picks
        plot_layer_picks(opt, out / f"dsgd_picks_lam{lam:g}.png")
    return row


def time_steps(entries, dense, groups, train, rounds: int = 12, per: int = 10) -> dict:
    """Median ms of one optimizer step per method, all methods alternated round by round on the
    same fixed gradients (machine noise hits every method alike), plus one forward+backward."""
    x, y = next(batches(train, 0, 0))
    setups = {}
    for label, m, lam in entries:
        model, _, opt = build(m, lam, dense, groups)
        model.train()
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad.detach().clone() for p in model.parameters()]
        setups[label] = (model, opt, grads)
    times = {label: [] for label in setups}
    fb = []
    for r in range(rounds + 1):  # round 0: warm-up, not counted
        for label, (model, opt, grads) in setups.items():
            t = 0.0
            for _ in range(per):
                for p, g in zip(model.parameters(), grads):
                    p.grad = g.clone()
                t0 = time.perf_counter()
                opt.step()
                t += time.perf_counter() - t0
            if r:
                times[label].append(1e3 * t / per)
        model = setups["adamw"][0]
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        if r:
            fb.append(1e3 * (time.perf_counter() - t0))
    return {"step_ms": {k: statistics.median(v) for k, v in times.items()}, "fwd_bwd_ms": statistics.median(fb)}


def markdown(rows, timing) -> str:
    st, fb = timing["step_ms"], timing["fwd_bwd_ms"]
    head = (
        "| method | λ | accuracy | groups zero | weighted | FLOP reduction | opt step | vs AdamW | "
        "train step vs AdamW |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        ms = st[r["method"]]
        lines.append(
            f"| {r['method']} | {r['lam']:g} | {100 * r['accuracy']:.2f}% | {100 * r['group_sparsity']:.1f}% | "
            f"{100 * r['weighted_group_sparsity']:.1f}% | {100 * r['flop_reduction']:.1f}% | "
            f"{ms:.2f} ms | {ms / st['adamw']:.1f}× | {(fb + ms) / (fb + st['adamw']):.2f}× |"
        )
    return head + "\n".join(lines) + "\n"


def plot(rows, path, model_name: str = "digits-resnet") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = sorted({r["method"] for r in rows if r["method"] != "adamw"})
    for name in methods:
        rs = sorted((r for r in rows if r["method"] == name), key=lambda r: r["lam"])
        axes[0].plot(
            [100 * r["weighted_group_sparsity"] for r in rs], [100 * r["accuracy"] for r in rs], "o-", label=name
        )
        axes[1].plot([100 * r["flop_reduction"] for r in rs], [100 * r["accuracy"] for r in rs], "o-", label=name)
    for r in rows:
        if r["method"] == "adamw":
            for ax in axes:
                ax.axhline(100 * r["accuracy"], color="gray", ls=":", label="adamw (dense)")
    axes[0].set_xlabel("weighted group sparsity (%)")
    axes[1].set_xlabel("FLOP reduction after extraction (%)")
    for ax in axes:
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{model_name}: fine-tuning a dense model with group lasso (same epochs and schedule)")
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits-resnet", choices=sorted(PROFILES))
    ap.add_argument("--quick", action="store_true", help="2 dense + 2 fine-tuning epochs, one λ per method")
    ap.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (every method)")
    ap.add_argument("--dense-epochs", type=int, default=None, help="default: the model's (digits-resnet 20)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ",".join(METHODS))
    ap.add_argument("--lams", default="", help="overrides, e.g. asgo=1e-2,3e-2;dsgd=0.1")
    ap.add_argument("--lrs", default="", help="learning-rate overrides, e.g. ramda=1e-3;dsgd=3e-2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/compare_optimizers")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [s.strip() for s in a.methods.split(",") if s.strip()]
    for name in methods:
        if name not in METHODS:
            ap.error(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    prof = PROFILES[a.model]
    table = {k: dict(v) for k, v in prof["methods"].items()}
    for part in filter(None, a.lrs.split(";")):
        k, v = part.split("=")
        table[k.strip()]["lr"] = float(v)
    grids = {k: list(v["lams"]) for k, v in table.items()}
    if a.dense_epochs is None:
        a.dense_epochs = prof["dense_epochs"]
    for part in filter(None, a.lams.split(";")):
        k, vals = part.split("=")
        grids[k.strip()] = [float(v) for v in vals.split(",")]
    if a.quick:
        a.epochs, a.dense_epochs = 2, 2
        grids = {k: v[len(v) // 2 : len(v) // 2 + 1] for k, v in grids.items()}

    spec = get_model(a.model)
    train, test = spec.data()
    example = spec.example_input(2)
    t0 = time.perf_counter()
    dense, dense_acc = train_dense(spec, train, test, a.dense_epochs, a.seed, prof["dense_lr"], prof["dense_wd"])
    print(f"dense: {100 * dense_acc:.2f}% after {a.dense_epochs} epochs ({time.perf_counter() - t0:.0f}s)", flush=True)
    groups = find_groups(dense, example)

    rows = [run_method("adamw", ADAMW, 0.0, dense, groups, train, test, example, a.epochs, a.seed, out)]
    print(f"adamw fine-tuned (λ=0): {100 * rows[0]['accuracy']:.2f}%", flush=True)
    for name in methods:
        for lam in grids[name]:
            t1 = time.perf_counter()
            r = run_method(name, table[name], lam, dense, groups, train, test, example, a.epochs, a.seed, out)
            rows.append(r)
            print(
                f"{name:11s} λ={lam:<7g} acc {100 * r['accuracy']:6.2f}%  zero {100 * r['group_sparsity']:5.1f}% "
                f"(weighted {100 * r['weighted_group_sparsity']:5.1f}%)  FLOPs -{100 * r['flop_reduction']:5.1f}%  "
                f"in-run step {r['step_ms']:6.2f} ms  [{time.perf_counter() - t1:.0f}s]",
                flush=True,
            )
    entries = [("adamw", ADAMW, 0.0)] + [(n, table[n], grids[n][len(grids[n]) // 2]) for n in methods]
    timing = time_steps(entries, dense, groups, train, rounds=3 if a.quick else 12)
    md = markdown(rows, timing)
    cmd = "python examples/compare_optimizers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    took = time.perf_counter() - t0
    atomic_write_text(
        out / "table.md",
        f"`{cmd.strip()}` — {a.model}, dense {100 * dense_acc:.2f}% after "
        f"{a.dense_epochs} epochs, {a.epochs} fine-tuning epochs, torch "
        f"{torch.__version__}, {a.threads} thread(s), {took / 60:.1f} min\n\n" + md,
    )
    atomic_write_json(
        out / "results.json",
        {
            "dense_accuracy": dense_acc,
            "epochs": a.epochs,
            "dense_epochs": a.dense_epochs,
            "rows": rows,
            "timing": timing,
            "command": cmd,
            "model": a.model,
            "seconds": took,
        },
    )
    plot(rows, out / "compare_optimizers.png", a.model)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
