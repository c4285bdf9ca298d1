"""Latency benchmark of two ONNX models (dense vs compressed) with ONNX Runtime.

Why it is built this way:
* the two models are timed in interleaved rounds in one process (A B, then B A, ...), so
  turbo, thermal throttling and neighbours' noise hit both alike;
* a session per (model, threads) with a fixed intra-op thread count, sequential execution,
  and intra-op spinning off: with spinning on, one session's idle workers keep burning the
  cores the other session is about to use, which punishes whichever model runs second;
* median, p90, min and IQR/median per model, and speedup = dense median / compressed
  median, reported next to the FLOP ratio (the ideal) and their quotient, "efficiency".
Works on any two ONNX files with the same input names: shapes come from the graph,
dynamic batch dims take each batch size and other dynamic dims `seq_len`.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np

from compress.errors import UserError
from compress.files import atomic_write_with


def all_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _load(path) -> "object":
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 — protobuf raises several types
        raise UserError(f"{path} is not a valid ONNX model ({type(e).__name__})") from None


def _initializer_elements(proto) -> int:
    return int(sum(int(np.prod(t.dims)) if len(t.dims) else 1 for t in proto.graph.initializer))


def _graph_inputs(proto) -> list[tuple[str, list, np.dtype]]:
    """(name, dims, numpy dtype) of the real inputs (initializers listed as inputs excluded);
    a dim is an int, a symbolic name, or None."""
    from onnx.helper import tensor_dtype_to_np_dtype

    inits = {t.name for t in proto.graph.initializer}
    out = []
    for i in proto.graph.input:
        if i.name in inits:
            continue
        tt = i.type.tensor_type
        if not tt.elem_type:
            raise UserError(f"input {i.name!r} is not a tensor; only tensor inputs can be benchmarked")
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        out.append((i.name, dims, np.dtype(tensor_dtype_to_np_dtype(tt.elem_type))))
    return out


def resolve_shapes(inputs, batch: int, seq_len: int, input_shapes: dict | None) -> dict[str, tuple]:
    """Concrete shape of every input: `input_shapes` may give a full shape per input name
    (None / -1 / a string in it = dynamic) or a value per symbolic dim name ({"seq": 64});
    a dynamic dim 0 is the batch, any other dynamic dim is `seq_len`."""
    over = input_shapes or {}
    names = {n for n, _, _ in inputs}
    for k in over:
        if k not in names and not isinstance(over[k], int):
            raise UserError(f"input_shapes names {k!r}, which is neither an input ({', '.join(sorted(names))}) "
                            "nor a symbolic dimension given as an int")
    shapes = {}
    for name, dims, _ in inputs:
        spec = list(over[name]) if name in over else list(dims)
        if name in over and len(spec) != len(dims) and dims:
            raise UserError(f"input_shapes[{name!r}] has rank {len(spec)}, the graph's input has rank {len(dims)}")
        out = []
        for ax, d in enumerate(spec):
            if isinstance(d, (int, np.integer)) and d > 0:
                out.append(int(d))
            elif isinstance(d, str) and isinstance(over.get(d), int):
                out.append(int(over[d]))
            else:
                out.append(batch if ax == 0 else seq_len)
        shapes[name] = tuple(out)
    return shapes


def make_feed(inputs, shapes: dict[str, tuple], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs that every model accepts: normal floats, ones for masks, ids in {0, 1}
    (valid for any vocabulary and for token-type embeddings)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for name, _, dt in inputs:
        shape = shapes[name]
        if np.issubdtype(dt, np.floating):
            feed[name] = rng.standard_normal(shape).astype(dt)
        elif dt == np.bool_ or "mask" in name.lower():
            feed[name] = np.ones(shape, dtype=dt)
        else:
            feed[name] = rng.integers(0, 2, shape).astype(dt)
    return feed


def _stats(ns: list[int]) -> dict:
    a = np.asarray(ns, dtype=np.float64) / 1e6
    q1, med, q3, p90 = np.percentile(a, [25, 50, 75, 90])
    return {"median_ms": float(med), "p90_ms": float(p90), "min_ms": float(a.min()), "mean_ms": float(a.mean()),
            "iqr_ms": float(q3 - q1), "spread": float((q3 - q1) / med) if med > 0 else 0.0, "n": int(a.size)}


def _interleaved(run_a, run_b, warmup: int, rounds: int | None, budget_s: float) -> tuple[list, list]:
    """Warm both up, then time them alternately (AB, BA, AB, ...); `rounds=None` sizes the
    run to `budget_s` from the warm-up's timings (at least 10, at most 5000 rounds)."""
    clock = time.perf_counter_ns
    t0 = clock()
    for _ in range(max(1, warmup)):
        run_a()
        run_b()
    if rounds is None:
        per_pair = (clock() - t0) / max(1, warmup) / 1e9
        rounds = int(min(5000, max(10, budget_s / max(per_pair, 1e-6))))
    ta, tb = [], []
    for r in range(rounds):
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):
            fn, acc = (run_a, ta) if which == 0 else (run_b, tb)
            s = clock()
            fn()
            acc.append(clock() - s)
    return ta, tb


def _session(path, provider: str, threads: int, spinning: bool):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:200]}") from None


def _machine() -> dict:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": all_cores(), "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "numpy": np.__version__}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def benchmark(
    dense_path,
    compressed_path,
    *,
    batch_sizes=(1, 32),
    threads=(1, None),
    warmup: int | None = None,
    rounds: int | None = None,
    input_shapes: dict | None = None,
    seq_len: int = 128,
    providers="auto",
    torch_models=None,
    flops=None,
    quick: bool = False,
    time_budget_s: float = 2.0,
    spinning: bool = False,
    seed: int = 0,
) -> dict:
    """Latency of two ONNX models under ONNX Runtime, interleaved; returns a JSON-ready dict.

    threads: intra-op thread counts, None = all cores. providers: "auto" (CPU, plus CUDA when
    this onnxruntime has it) or a list of provider names. rounds: timed runs per model and
    setting (None: fill `time_budget_s` seconds, at least 10). quick: 1 warm-up, 5 rounds
    (tests, smoke runs). torch_models: (dense, compressed) modules taking the ONNX inputs
    positionally, timed in eager mode beside ORT and used for params and FLOPs (batch 1).
    flops: (dense, compressed) FLOPs if known and no torch models are given.
    """
    import onnxruntime as ort

    if quick:
        warmup = 1 if warmup is None else warmup
        rounds = 5 if rounds is None else rounds
    warmup = 3 if warmup is None else warmup
    if rounds is not None and rounds < 1:
        raise UserError("rounds must be ≥ 1")
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError("batch sizes must be positive integers")
    thread_list = [all_cores() if t is None else int(t) for t in threads]
    if any(t < 1 for t in thread_list):
        raise UserError("thread counts must be ≥ 1 (None = all cores)")
    thread_list = list(dict.fromkeys(thread_list))
    if providers == "auto":
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.append("CUDAExecutionProvider")
    for p in providers:
        if p not in ort.get_available_providers():
            raise UserError(f"ONNX Runtime provider {p} is not available here ({', '.join(ort.get_available_providers())})")

    protos = [_load(dense_path), _load(compressed_path)]
    ins = [_graph_inputs(p) for p in protos]
    if [n for n, _, _ in ins[0]] != [n for n, _, _ in ins[1]]:
        raise UserError(f"the models' inputs differ: {dense_path} takes {[n for n, _, _ in ins[0]]}, "
                        f"{compressed_path} takes {[n for n, _, _ in ins[1]]}")
    inputs = ins[0]
    models = {}
    for key, path, proto in (("dense", dense_path, protos[0]), ("compressed", compressed_path, protos[1])):
        models[key] = {"path": str(path), "file_bytes": Path(path).stat().st_size,
                       "params_onnx": _initializer_elements(proto),
                       "inputs": {n: [d if d is not None else "?" for d in dims] for n, dims, _ in ins[0 if key == "dense" else 1]}}
    del protos

    flop_info = None
    if torch_models is not None:
        from compress.structure.cost import count_flops, count_params

        feed1 = make_feed(inputs, resolve_shapes(inputs, 1, seq_len, input_shapes), seed)
        args1 = _torch_args(feed1, inputs)
        fd, fc = (count_flops(m, args1) for m in torch_models)
        for key, m in zip(("dense", "compressed"), torch_models):
            models[key]["params"] = count_params(m)
        flop_info = {"dense": fd, "compressed": fc, "per": "sample (batch 1)", "source": "torch.utils.flop_counter"}
    elif flops is not None:
        fd, fc = (int(f) for f in flops)
        flop_info = {"dense": fd, "compressed": fc, "per": "sample (batch 1)", "source": "given"}
    flop_ratio = flop_info["dense"] / max(flop_info["compressed"], 1) if flop_info else None

    rows = []
    for provider in providers:
        tlist = thread_list if provider == "CPUExecutionProvider" else [thread_list[-1]]
        for t in tlist:
            sd = _session(dense_path, provider, t, spinning)
            sc = _session(compressed_path, provider, t, spinning)
            for b in batch_sizes:
                shapes = resolve_shapes(inputs, b, seq_len, input_shapes)
                feed = make_feed(inputs, shapes, seed)
                for key, s in (("dense", sd), ("compressed", sc)):
                    try:
                        s.run(None, feed)
                    except Exception as e:  # noqa: BLE001
                        raise UserError(f"{models[key]['path']} does not run on inputs "
                                        f"{ {k: list(v) for k, v in shapes.items()} }: "
                                        f"{str(e).splitlines()[0][:200]}; override with input_shapes") from None
                ta, tb = _interleaved(lambda: sd.run(None, feed), lambda: sc.run(None, feed),
                                      warmup, rounds, time_budget_s)
                rows.append(_row("onnxruntime", provider.replace("ExecutionProvider", ""), t, b, shapes,
                                 ta, tb, flop_ratio))
            del sd, sc
    if torch_models is not None:
        rows += _torch_rows(torch_models, inputs, thread_list, batch_sizes, seq_len, input_shapes, warmup, rounds,
                            time_budget_s, flop_ratio, seed)
    return {
        "dense": models["dense"],
        "compressed": models["compressed"],
        "flops": flop_info,
        "flop_ratio": flop_ratio,
        "params_ratio": models["dense"].get("params", models["dense"]["params_onnx"])
        / max(1, models["compressed"].get("params", models["compressed"]["params_onnx"])),
        "settings": {"batch_sizes": list(batch_sizes), "threads": thread_list, "providers": list(providers),
                     "warmup": warmup, "rounds": rounds, "time_budget_s": time_budget_s, "seq_len": seq_len,
                     "spinning": spinning, "interleaved": True,
                     "input_shapes": {k: list(v) if not isinstance(v, int) else v for k, v in (input_shapes or {}).items()}},
        "machine": _machine(),
        "results": rows,
    }


def _row(engine, provider, threads, batch, shapes, ta, tb, flop_ratio) -> dict:
    d, c = _stats(ta), _stats(tb)
    speedup = d["median_ms"] / c["median_ms"] if c["median_ms"] > 0 else float("inf")
    return {"engine": engine, "provider": provider, "threads": threads, "batch": batch,
            "input_shapes": {k: list(v) for k, v in shapes.items()}, "dense": d, "compressed": c,
            "speedup": speedup, "flop_ratio": flop_ratio,
            "efficiency": speedup / flop_ratio if flop_ratio else None}


def _torch_args(feed, inputs):
    import torch

    return tuple(torch.from_numpy(feed[n]) for n, _, _ in inputs)


def _torch_rows(torch_models, inputs, thread_list, batch_sizes, seq_len, input_shapes, warmup, rounds, budget_s,
                flop_ratio, seed) -> list[dict]:
    """Eager torch on CPU, same feeds and interleaving: the reference ORT should beat."""
    import torch

    dense, comp = (m.eval().cpu() for m in torch_models)
    old = torch.get_num_threads()
    rows = []
    try:
        for t in thread_list:
            torch.set_num_threads(t)
            for b in batch_sizes:
                shapes = resolve_shapes(inputs, b, seq_len, input_shapes)
                args = _torch_args(make_feed(inputs, shapes, seed), inputs)

                def run(m):
                    with torch.inference_mode():
                        m(*args)

                ta, tb = _interleaved(lambda: run(dense), lambda: run(comp), warmup, rounds, budget_s)
                rows.append(_row("torch", "eager", t, b, shapes, ta, tb, flop_ratio))
    finally:
        torch.set_num_threads(old)
    return rows


def print_bench_table(result: dict, console=None) -> None:
    """The benchmark as a rich table: one row per engine, threads and batch size."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m = result.get("machine", {})
    wide = console.width >= 110  # p90 and IQR columns only where they fit; the JSON always has them
    t = Table(title=f"latency, dense vs compressed (medians; interleaved) — {m.get('cpu', '?')}, "
                    f"{m.get('cores', '?')} cores, onnxruntime {m.get('onnxruntime', '?')}",
              box=box.SIMPLE_HEAD, padding=(0, 1))
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
        t.add_row(*cells, f"{r['speedup']:.2f}×", "–" if fr is None else f"{fr:.2f}×",
                  "–" if eff is None else f"{eff:.2f}")
    console.print(t)
    dn, cp = result["dense"], result["compressed"]
    pk = "params" if "params" in dn else "params_onnx"
    line = (f"params {dn[pk]:,} → {cp[pk]:,} ({result['params_ratio']:.2f}×), "
            f"file {dn['file_bytes'] / 1024:.0f} → {cp['file_bytes'] / 1024:.0f} KiB")
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
    labels = [f"{'ORT' if r['engine'] == 'onnxruntime' else r['engine']}"
              f"{'' if r['provider'] in ('CPU', 'eager') else ' ' + r['provider']}\n{r['threads']}t b{r['batch']}"
              for r in rows]
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6.0, 1.1 * len(rows) + 3), 4.2))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for off, key, color in ((-0.2, "dense", "#8c8c8c"), (0.2, "compressed", "#2b8cbe")):
        med = [r[key]["median_ms"] for r in rows]
        p90 = [r[key]["p90_ms"] for r in rows]
        ax1.bar(x + off, med, 0.4, label=key, color=color,
                yerr=[np.zeros(len(rows)), np.maximum(0, np.subtract(p90, med))], capsize=2)
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
