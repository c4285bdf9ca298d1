"""Shared pieces of the comparison: the peers' training loop, one measurement path for every
method (our `export_onnx` + our `benchmark`, dense and compressed interleaved), and the
result tables and Pareto plots.

Every method, ours or a peer's, ends as a plain torch model; `measure` is the only place a
speedup comes from, so all methods are timed the same way.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere: use this checkout's package
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from compress.structure.cost import count_flops, count_params  # noqa: E402


@dataclass
class Result:
    """One row of a task's table."""

    task: str
    method: str
    setting: str
    metric: float  # accuracy (digits) or mean cosine to the dense embeddings (text)
    flops: int
    flops_dense: int
    params: int
    params_dense: int
    speedup_b1: float | None = None
    speedup_b32: float | None = None
    ms_b1: float | None = None  # compressed model's median latency
    ms_b32: float | None = None
    extra: dict = field(default_factory=dict)  # method-specific numbers: losses, retrieval, sparsity, seconds

    @property
    def flop_fraction(self) -> float:
        return self.flops / self.flops_dense

    def to_json(self) -> dict:
        d = asdict(self)
        d["flop_fraction"] = self.flop_fraction
        return d


class Timer:
    """`with Timer() as t: ...; t.seconds`."""

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        return False


def cosine_lr(base: float, epochs: int) -> Callable[[int, float], float]:
    """lr at fractional epoch e (per step, like torch's CosineAnnealingLR stepped per batch)."""
    return lambda e: base * 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))


def train_loop(
    model: torch.nn.Module,
    batches: Callable[[int], Iterable],
    epochs: int,
    opt: torch.optim.Optimizer,
    lr_at: Callable[[float], float],
    loss_fn: Callable,
    after_backward: Callable[[], None] | None = None,
) -> list[float]:
    """The loop a Torch-Pruning / OTO user writes: forward, loss, backward, (hook), step.

    `batches(epoch)` yields (inputs tuple, target); returns the mean training loss per epoch.
    """
    losses = []
    model.train()
    for epoch in range(epochs):
        items = list(batches(epoch))
        total, count = 0.0, 0
        for i, (x, y) in enumerate(items):
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch + i / len(items))
            loss = loss_fn(model(*x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            count += len(y)
        losses.append(total / max(count, 1))
    model.eval()
    return losses


def tensor_batches(inputs: tuple[torch.Tensor, ...], target: torch.Tensor, batch_size: int, seed: int):
    """Shuffled mini-batches of a tensor data set; the order of epoch e depends only on (seed, e)."""
    n = len(target)

    def gen(epoch: int):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            yield tuple(t[idx] for t in inputs), target[idx]

    return gen


# ----------------------------------------------------------------------------- ours


def quiet_console():
    """A rich console that swallows the toolkit's progress output (the harness prints its own lines)."""
    import io

    from rich.console import Console

    return Console(file=io.StringIO())


def ours_lam(model, train, eval_data, example, out_dir: Path, cfg_kw: dict, **kw):
    """The product at a fixed λ: `compress.finetune`, then `compress.extract` with `compress export`'s align 8. Returns (small, last metrics, run result)."""
    from compress.deploy.extract import extract
    from compress.train.config import TrainConfig
    from compress.train.loop import finetune

    res = finetune(
        model,
        train,
        eval_data,
        example,
        out_dir,
        TrainConfig(**cfg_kw),
        force=True,
        progress=False,
        console=quiet_console(),
        **kw,
    )
    # as `compress export` does by default: keep a few zero channels so widths stay multiples of 8
    small, _ = extract(res.model, res.groups, example, align=8)
    return small, (res.metrics[-1] if res.metrics else {}), res


def ours_budget(model, train, eval_data, example, out_dir: Path, cfg_kw: dict, flops: float, **kw):
    """The product given a FLOP target: `compress.budget.finetune_to_budget` (λ is its controller's),
    then `compress.extract`. Returns (small, last metrics, run result), or None when the budget module is absent."""
    try:
        from compress.budget.runner import finetune_to_budget
        from compress.budget.target import Budget
    except ImportError:
        return None
    from compress.deploy.extract import extract
    from compress.train.config import TrainConfig

    res = finetune_to_budget(
        model,
        train,
        eval_data,
        example,
        out_dir,
        TrainConfig(**cfg_kw),
        Budget(flops=flops),
        force=True,
        progress=False,
        console=quiet_console(),
        **kw,
    )
    small, _ = extract(res.model, res.groups, example)
    return small, (res.metrics[-1] if res.metrics else {}), res


def split_ours_kw(ours_kw: dict, kw: dict) -> tuple[dict, dict]:
    """(TrainConfig fields, finetune_to_budget keyword arguments) of an ablation's `key=value` settings
    merged into `kw`: TrainConfig's fields, then finetune_to_budget's own, else a BudgetController argument."""
    import dataclasses
    import inspect

    from compress.budget.runner import finetune_to_budget
    from compress.train.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    own = set(inspect.signature(finetune_to_budget).parameters)
    cfg_kw, kw = {}, {**kw, "controller": dict(kw.get("controller", {}))}
    for key, value in ours_kw.items():
        if key in fields:
            cfg_kw[key] = value
        elif key in own:
            kw[key] = value
        else:
            kw["controller"][key] = value
    return cfg_kw, kw


class Task:
    """What both tasks share: the method loop, ours at fixed λ and at a FLOP budget, the notes.

    A task provides `setup()` (dense model, data, dense ONNX), `_row(method, setting, model,
    extra)` (evaluate + measure + append), `_data()` (train, eval data for the product),
    `_train_kw(optimizer)` (TrainConfig fields beyond epochs/optimizer/λ), `_loss_kw` (extra
    arguments for finetune), `_score(model)` (the metric, before fine-tuning) and
    `_finetune(model, epochs)` (the peers' fine-tuning routine, returns per-epoch losses).
    """

    before_key = "acc_before_ft"
    _loss_kw: dict = {}
    ours_kw: dict = {}  # an ablation's settings for the ramda-budget methods (run.py --ours-kw), tag in the method name
    ours_tag: str = ""

    def __init__(self, out: Path, quick: bool, log=print, seed: int = 0):
        # seed: the training runs' seed (data order, the product's seed); the dense start and the data split stay fixed
        self.out, self.quick, self.log, self.seed = out, quick, log, seed
        self.cfg = self.settings(quick)
        self.notes: list[str] = []
        self.rows: list[Result] = []

    def run(self, methods: list[str]) -> list[Result]:
        (self.out / "onnx").mkdir(parents=True, exist_ok=True)
        self.setup()
        for name in methods:
            with Timer() as t:
                getattr(self, name.replace("-", "_"))()
            self.log(f"{name}: {t.seconds:.0f} s")
        return self.rows

    def _pattern_extra(self, trained) -> dict:
        """Task hook: numbers about a trained product model before extraction (default none)."""
        return {}

    def with_notes(self, lines: list[str]) -> str:
        return "\n\n".join(lines + [f"Note: {n}" for n in self.notes])

    def ours(self) -> None:
        """`compress.finetune` at fixed λ for all epochs, then `compress.extract`."""
        for opt_name, lams in self.cfg["lams"].items():
            for lam in lams:
                with Timer() as t:
                    small, last, res = ours_lam(
                        copy.deepcopy(self.model),
                        *self._data(),
                        self.example,
                        self.out / "runs" / f"{opt_name}_lam{lam:g}",
                        {"epochs": self.cfg["epochs"], "optimizer": opt_name, "lam": lam, **self._train_kw(opt_name)},
                        **self._loss_kw,
                    )
                self._row(
                    opt_name,
                    f"λ={lam:g}",
                    small,
                    {
                        "train_loss": last.get("train_loss"),
                        "group_sparsity": last.get("group_sparsity"),
                        "seconds": t.seconds,
                        **self._pattern_extra(res.model),
                    },
                )

    def ours_budget(self) -> None:
        """`compress.budget.finetune_to_budget` at the peers' FLOP targets for all epochs, then extract."""
        for f in self.cfg["fractions"]:
            self._budget(f, self.cfg["epochs"], 0)

    def ours_budget_rewind(self) -> None:
        """As ours-budget, but at the freeze the survivors restart from the dense weights (`rewind="init"`)
        for the AdamW final phase: the group lasso chose the structure, not the surviving values. The freeze
        then comes after the first quarter of the epochs; `compress finetune` does this for pretrained hf: models."""
        for f in self.cfg["fractions"]:
            self._budget(f, self.cfg["epochs"], 0, rewind="init")

    def _budget_kw(self) -> dict:
        """Task hook: extra `finetune_to_budget` arguments (e.g. the final phase's lr)."""
        return {}

    def ours_budget_ft(self) -> None:
        """tp-regularized's split: 2/3 of the epochs to the budget, extract, 1/3 with the peers' fine-tuning."""
        E = self.cfg["epochs"]
        ft = max(1, E // 3)
        for f in self.cfg["fractions"]:
            self._budget(f, E - ft, ft)

    def _budget(self, f: float, epochs: int, ft_epochs: int, rewind: str | None = None) -> None:
        tag = "ramda-budget+ft" if ft_epochs else "ramda-budget-rewind" if rewind == "init" else "ramda-budget"
        tag += self.ours_tag
        kw = {**self._loss_kw, **self._budget_kw(), **({"rewind": rewind} if rewind else {})}
        cfg_kw, kw = split_ours_kw(self.ours_kw, kw)
        with Timer() as t:
            got = ours_budget(
                copy.deepcopy(self.model),
                *self._data(),
                self.example,
                self.out / "runs" / f"{tag}_{f}",
                {"epochs": epochs, "optimizer": "ramda", **self._train_kw("ramda"), **cfg_kw},
                f,
                **kw,
            )
            if got is None:
                self.log("ramda-budget: not run (compress.budget is missing)")
                self.notes.append("ramda-budget not run: compress.budget is missing")
                return
            small, last, res = got
            extra = {"train_loss": last.get("train_loss"), **self._pattern_extra(res.model)}
            if ft_epochs:
                extra[self.before_key] = self._score(small)
                extra["train_loss"] = self._finetune(small, ft_epochs)[-1]
        self._row(
            tag, f"flops≤{f}", small, {**extra, "group_sparsity": last.get("group_sparsity"), "seconds": t.seconds}
        )


# ----------------------------------------------------------------------------- measurement


def export(model: torch.nn.Module, example, path: Path, **kw) -> dict:
    """Our verified export (ORT must agree with torch) — every method goes through it."""
    from compress.deploy.export import export_onnx

    model.eval()
    return export_onnx(model, example, path, **kw)


def bench_pair(dense_onnx: Path, comp_onnx: Path, rounds: int | None, flops: tuple[int, int] | None, **kw) -> dict:
    """Our benchmark: dense and compressed interleaved, ORT CPU, 1 intra-op thread, batch 1 and 32.

    Returns {batch: (speedup, compressed median ms, dense median ms)} plus the raw report.
    """
    from compress.deploy.bench import benchmark

    args = {"batch_sizes": (1, 32), "threads": (1,), "providers": ["CPUExecutionProvider"]}
    if rounds is not None:
        args["rounds"] = rounds
    if flops is not None:
        args["flops"] = flops
    args.update(kw)
    rep = benchmark(str(dense_onnx), str(comp_onnx), **args)
    return {"by_batch": _speedups(rep), "report": rep}


def _speedups(rep: dict) -> dict[int, tuple[float, float, float, float]]:
    """{batch: (speedup, compressed median ms, dense median ms, speedup of the minima)} at 1 thread.

    The minimum of many runs is the least disturbed by other processes on a shared machine;
    it is reported beside the benchmark's median-based speedup."""
    out = {}
    for row in rep["results"]:
        if row.get("engine") != "onnxruntime" or row.get("provider") != "CPU" or row.get("threads") != 1:
            continue
        out[int(row["batch"])] = (
            float(row["speedup"]),
            float(row["compressed"]["median_ms"]),
            float(row["dense"]["median_ms"]),
            float(row["dense"]["min_ms"]) / float(row["compressed"]["min_ms"]),
        )
    return out


def measure(
    model: torch.nn.Module,
    example,
    dense_onnx: Path,
    out_dir: Path,
    name: str,
    rounds: int | None,
    flops_dense: int,
    flop_example=None,
    export_kw=None,
    bench_kw=None,
) -> dict:
    """Export `model` with our exporter and time it against the dense ONNX with our benchmark."""
    model.eval()
    flops = count_flops(model, flop_example if flop_example is not None else example)
    path = out_dir / f"{name}.onnx"
    rep = export(model, example, path, **(export_kw or {}))
    b = bench_pair(dense_onnx, path, rounds, (flops_dense, flops), **(bench_kw or {}))
    sp = b["by_batch"]
    return {
        "flops": flops,
        "params": count_params(model),
        "speedup_b1": sp.get(1, (None,) * 4)[0],
        "speedup_b32": sp.get(32, (None,) * 4)[0],
        "ms_b1": sp.get(1, (None,) * 4)[1],
        "ms_b32": sp.get(32, (None,) * 4)[1],
        "dense_ms_b1": sp.get(1, (None,) * 4)[2],
        "dense_ms_b32": sp.get(32, (None,) * 4)[2],
        "min_speedup_b1": sp.get(1, (None,) * 4)[3],
        "min_speedup_b32": sp.get(32, (None,) * 4)[3],
        "export_max_abs_diff": rep.get("max_abs_diff"),
        "onnx_path": str(path),
    }


# ----------------------------------------------------------------------------- reports


def _fmt(v, spec: str) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def markdown_table(rows: list[Result], metric_name: str, extra_cols: list[tuple[str, str, str]] = ()) -> str:
    """Markdown table; `extra_cols` are (header, key in Result.extra, format spec)."""
    head = [
        "method",
        "setting",
        metric_name,
        *[h for h, _, _ in extra_cols],
        "FLOP fraction",
        "params",
        "speedup b1",
        "speedup b32",
        "min-speedup b1",
        "min-speedup b32",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def x(v):
        return "–" if v is None else f"{v:.2f}×"

    for r in rows:
        cells = [
            r.method,
            r.setting,
            _fmt(r.metric, ".4f"),
            *[_fmt(r.extra.get(k), f) for _, k, f in extra_cols],
            _fmt(r.flop_fraction, ".3f"),
            f"{r.params:,}",
            x(r.speedup_b1),
            x(r.speedup_b32),
            x(r.extra.get("min_speedup_b1")),
            x(r.extra.get("min_speedup_b32")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(
    out: Path,
    task: str,
    rows: list[Result],
    metric_name: str,
    header: str,
    extra_cols: list[tuple[str, str, str]] = (),
    meta: dict | None = None,
) -> str:
    """Write `<task>.md`, `<task>.json` and `<task>_pareto.png` under `out`; return the markdown."""
    from compress.files import atomic_write_json, atomic_write_text

    md = f"## {task}\n\n{header}\n\n{markdown_table(rows, metric_name, extra_cols)}\n"
    atomic_write_text(out / f"{task}.md", md)
    atomic_write_json(
        out / f"{task}.json",
        {"task": task, "metric": metric_name, "meta": meta or {}, "rows": [r.to_json() for r in rows]},
    )
    pareto_plot(rows, metric_name, out / f"{task}_pareto.png", title=task)
    return md


def seed_summary(per_seed: dict[int, list[Result]], metric_name: str) -> str:
    """Markdown: per method and setting, the metric's mean (min–max) over seeds beside the FLOP fraction and
    the measured speedups (mean) — the spread is part of the result."""
    import statistics

    seeds = sorted(per_seed)
    by_key: dict[tuple[str, str], list[Result]] = {}
    for sd in seeds:
        for r in per_seed[sd]:
            by_key.setdefault((r.method, r.setting), []).append(r)
    head = [
        "method",
        "setting",
        "seeds",
        f"{metric_name}: mean (min–max)",
        "FLOP fraction",
        "speedup b1",
        "speedup b32",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def spread(vals, spec):
        vals = [v for v in vals if v is not None]
        if not vals:
            return "–"
        if len(vals) == 1:
            return format(vals[0], spec)
        return f"{format(statistics.mean(vals), spec)} ({format(min(vals), spec)}–{format(max(vals), spec)})"

    for (method, setting), rs in by_key.items():
        lines.append(
            "| "
            + " | ".join(
                [
                    method,
                    setting,
                    str(len(rs)),
                    spread([r.metric for r in rs], ".4f"),
                    spread([r.flop_fraction for r in rs], ".3f"),
                    spread([r.speedup_b1 for r in rs], ".2f"),
                    spread([r.speedup_b32 for r in rs], ".2f"),
                ]
            )
            + " |"
        )
    return f"Seeds {', '.join(map(str, seeds))}.\n\n" + "\n".join(lines) + "\n"


def pareto_plot(rows: list[Result], metric_name: str, path: Path, title: str) -> None:
    """Metric against measured speedup (batch 1, batch 32) and against FLOP reduction, one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    from compress.files import atomic_write_with

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
    methods = list(dict.fromkeys(r.method for r in rows))
    markers = "os^Dv<>pPX*h"
    xs = [
        ("speedup_b1", "measured ORT speedup, batch 1 (×)"),
        ("speedup_b32", "measured ORT speedup, batch 32 (×)"),
        (None, "FLOP reduction (dense / compressed)"),
    ]
    for ax, (key, label) in zip(axes, xs):
        for i, m in enumerate(methods):
            pts = [((getattr(r, key) if key else 1 / r.flop_fraction), r.metric) for r in rows if r.method == m]
            pts = sorted((x, y) for x, y in pts if x is not None)
            if not pts:
                continue
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker=markers[i % len(markers)],
                color=f"C{i % 10}",
                linestyle="-" if len(pts) > 1 else "none",
                label=m,
            )
        ax.set_xlabel(label)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "235" else ""))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(metric_name)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
