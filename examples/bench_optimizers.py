"""Optimizer step time: RAMDA (exact, pg), ProxAdam, ProxSGD, RMDA vs torch.optim.AdamW.

Every optimizer steps the same model on the same recorded gradients (a few real
backward passes, replayed in turn); steps of all optimizers are interleaved in rounds so
that machine noise hits every one alike, and each is reported as a ratio to AdamW
(foreach=True) measured in the same run. Compiled kernels are warmed up (compiled)
before timing. Other processes on the machine distort the numbers, multi-threaded ones
most (OpenMP threads wait on busy cores): the header prints the load average. Run:

    .venv/bin/python examples/bench_optimizers.py                 # both models
    .venv/bin/python examples/bench_optimizers.py --model cnn --rounds 30
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch
from torch import nn

from compress.optim import REGISTRY, make_optimizer


class BigCNN(nn.Module):
    """A plain 7-conv CNN (conv-BN-ReLU, max-pooling), about 12.8M parameters, for 32x32 inputs."""

    def __init__(self, widths=(64, 128, 256, 512, 512, 768, 768), num_classes=100):
        super().__init__()
        layers, c = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            if i in (1, 3, 5):
                layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _setup(model_name: str, n_grads: int, seed: int = 0):
    torch.manual_seed(seed)
    if model_name == "cnn":
        model = BigCNN()
        batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))) for _ in range(n_grads)]
        example = torch.randn(1, 3, 32, 32)
    else:
        from compress.models import get_model

        spec = get_model("digits-resnet")
        model = spec.build()
        tr, _ = spec.data()
        x, y = tr.tensors
        batches = [(x[i * 64 : (i + 1) * 64], y[i * 64 : (i + 1) * 64]) for i in range(n_grads)]
        example = spec.example_input(1)
    grads = []
    for x, y in batches:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    try:
        from compress.structure.find import find_groups

        groups_of = lambda m: find_groups(m, example)  # noqa: E731 (the toolkit's real groups)
        groups_of(copy.deepcopy(model))
    except Exception as e:  # pragma: no cover - depends on the groups module
        print(f"find_groups failed ({e}); using default row groups")
        groups_of = lambda m: None  # noqa: E731
    return model, grads, groups_of


CONFIGS = [  # label, name, kwargs
    ("adamw foreach", "adamw", dict(lr=1e-3, foreach=True)),
    ("adamw fused", "adamw", dict(lr=1e-3, fused=True)),
    ("ramda exact", "ramda", dict(lr=1e-3, lam=1e-4)),
    ("ramda pg", "ramda", dict(lr=1e-3, lam=1e-4, solver="pg")),
    ("proxadam", "proxadam", dict(lr=1e-3, lam=1e-4)),
    ("proxsgd", "proxsgd", dict(lr=1e-2, lam=1e-4)),
    ("rmda", "rmda", dict(lr=1e-2, lam=1e-4)),
]


def bench(model_name: str, rounds: int, steps_per_round: int, warmup: int, n_grads: int, compile_flag, only=None):
    base, grads, groups_of = _setup(model_name, n_grads)
    n_params = sum(p.numel() for p in base.parameters())
    runs = []
    for label, name, kw in CONFIGS:
        if only and label != CONFIGS[0][0] and not any(o in label for o in only):
            continue
        m = copy.deepcopy(base)
        kw = dict(kw)
        if REGISTRY[name].structured:  # the dense one takes neither groups nor compile
            kw["groups"] = groups_of(m)
            kw["compile"] = compile_flag
        opt = make_optimizer(name, m.parameters(), **kw)
        params = list(m.parameters())
        state = {"i": 0, "evals": []}

        def step(opt=opt, params=params, state=state):
            g = grads[state["i"] % len(grads)]
            state["i"] += 1
            for p, gg in zip(params, g):
                p.grad = gg
            opt.step()
            st = getattr(opt, "last_stats", {})
            if "newton_evals" in st:
                state["evals"].append(st["newton_evals"])
            if "pg_iters" in st:
                state["evals"].append(st["pg_iters"])

        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        runs.append(dict(label=label, step=step, opt=opt, state=state, times=[], warm=time.perf_counter() - t0))
    for _ in range(rounds):
        for r in runs:
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                r["step"]()
            r["times"].append((time.perf_counter() - t0) / steps_per_round * 1e3)
    ref = statistics.median(runs[0]["times"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\n{model_name}: {n_params / 1e6:.2f}M parameters, {torch.get_num_threads()} threads, "
        f"{rounds} rounds x {steps_per_round} steps (median ms per step), load average {load:.1f} "
        f"on {os.cpu_count()} CPUs"
    )
    print(f"{'optimizer':<15} {'ms/step':>9} {'vs AdamW':>9} {'compiled':>9} {'prox evals':>11} {'warm-up s':>10}")
    for r in runs:
        med = statistics.median(r["times"])
        comp = getattr(r["opt"], "compiled", None)
        ev = r["state"]["evals"][warmup:]
        evs = f"{sum(ev) / len(ev):.2f}" if ev else "-"
        print(
            f"{r['label']:<15} {med:9.2f} {med / ref:9.2f} {str(comp) if comp is not None else '-':>9} "
            f"{evs:>11} {r['warm']:10.1f}"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["digits", "cnn", "both"], default="both")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--grads", type=int, default=4, help="recorded gradient sets replayed in turn")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--only", nargs="*", help="substrings of optimizer labels to run (AdamW foreach always runs)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    flag = {"auto": None, "on": True, "off": False}[a.compile]
    for m in ["digits", "cnn"] if a.model == "both" else [a.model]:
        bench(m, a.rounds, a.steps, a.warmup, a.grads, flag, a.only)


if __name__ == "__main__":
    main()
