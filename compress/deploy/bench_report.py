"""The benchmark's result for people: a rich table and a PNG of latencies and speedups.

Apart from `compress.deploy.bench` so that reading or plotting a saved bench.json needs
neither ONNX Runtime nor a model.
"""

from __future__ import annotations

import numpy as np

from compress.files import atomic_write_with


def print_bench_table(result: dict, console=None) -> None:
    """The benchmark as a rich table: one row per engine, threads and batch size."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m = result.get("machine", {})
    wide = console.width >= 110  # p90 and IQR columns only where they fit; the JSON always has them
    t = Table(
        title=f"latency, dense vs compressed (medians; interleaved) — {m.get('cpu', '?')}, "
        f"{m.get('cores', '?')} cores, onnxruntime {m.get('onnxruntime', '?')}",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    cols = ["engine", "thr", "batch", "dense ms", "compr. ms"]
    cols += ["p90 ms d / c", "IQR/med d / c"] if wide else []
    for col in cols + ["speedup", "FLOP ×", "eff."]:
        t.add_column(col, justify="left" if col == "engine" else "right", no_wrap=True)
    for r in result["results"]:
        d, c = r["dense"], r["compressed"]
        fr, eff = r.get("flop_ratio"), r.get("efficiency")
        eng = "ORT" if r["engine"] == "onnxruntime" else r["engine"]
        eng += "" if r["provider"] in ("CPU", "eager") else f" {r['provider']}"
        cells = [eng, str(r["threads"]), str(r["batch"]), f"{d['median_ms']:.3f}", f"{c['median_ms']:.3f}"]
        if wide:
            cells += [f"{d['p90_ms']:.3f} / {c['p90_ms']:.3f}", f"{d['spread']:.2f} / {c['spread']:.2f}"]
        t.add_row(
            *cells, f"{r['speedup']:.2f}×", "–" if fr is None else f"{fr:.2f}×", "–" if eff is None else f"{eff:.2f}"
        )
    console.print(t)
    dn, cp = result["dense"], result["compressed"]
    pk = "params" if "params" in dn else "params_onnx"
    line = (
        f"params {dn[pk]:,} → {cp[pk]:,} ({result['params_ratio']:.2f}×), "
        f"file {dn['file_bytes'] / 1024:.0f} → {cp['file_bytes'] / 1024:.0f} KiB"
    )
    if result.get("flops"):
        f = result["flops"]
        line += f", FLOPs/sample {f['dense']:,} → {f['compressed']:,} ({result['flop_ratio']:.2f}×)"
    console.print(line)
    console.print("efficiency = speedup / FLOP ratio (1.0 = every removed FLOP became time)")


def plot_bench(result: dict, png_path) -> None:
    """Latency bars (log scale) per setting and the speedup against the FLOP ratio; PNG, atomic."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["results"]
    labels = [
        f"{'ORT' if r['engine'] == 'onnxruntime' else r['engine']}"
        f"{'' if r['provider'] in ('CPU', 'eager') else ' ' + r['provider']}\n{r['threads']}t b{r['batch']}"
        for r in rows
    ]
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 1.1 * len(rows) + 3), 4.2))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for off, key, color in ((-0.2, "dense", "#8c8c8c"), (0.2, "compressed", "#2b8cbe")):
        med = [r[key]["median_ms"] for r in rows]
        p90 = [r[key]["p90_ms"] for r in rows]
        ax1.bar(
            x + off,
            med,
            0.4,
            label=key,
            color=color,
            yerr=[np.zeros(len(rows)), np.maximum(0, np.subtract(p90, med))],
            capsize=2,
        )
    ax1.set_yscale("log")
    ax1.set_ylabel("latency ms (median, bar to p90)")
    ax1.set_xticks(x, labels, fontsize=7)
    ax1.legend(fontsize=8)
    ax2.bar(x, [r["speedup"] for r in rows], 0.6, color="#2b8cbe", label="measured speedup")
    if result.get("flop_ratio"):
        ax2.axhline(result["flop_ratio"], color="#d95f0e", ls="--", label=f"FLOP ratio {result['flop_ratio']:.2f}×")
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.set_ylabel("speedup (dense / compressed)")
    ax2.set_xticks(x, labels, fontsize=7)
    ax2.legend(fontsize=8)
    fig.suptitle(f"dense vs compressed — {result.get('machine', {}).get('cpu', '')}", fontsize=9)
    fig.tight_layout()
    atomic_write_with(png_path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
