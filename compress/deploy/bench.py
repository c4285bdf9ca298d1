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

from compress.deploy.bench_report import plot_bench, print_bench_table  # noqa: F401 — importable here too
from compress.deploy.onnx_inputs import graph_inputs, initializer_elements, load_onnx, make_feed, resolve_shapes
from compress.errors import UserError


def all_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _stats(ns: list[int]) -> dict:
    a = np.asarray(ns, dtype=np.float64) / 1e6
    q1, med, q3, p90 = np.percentile(a, [25, 50, 75, 90])
    return {
        "median_ms": float(med),
        "p90_ms": float(p90),
        "min_ms": float(a.min()),
        "mean_ms": float(a.mean()),
        "iqr_ms": float(q3 - q1),
        "spread": float((q3 - q1) / med) if med > 0 else 0.0,
        "n": int(a.size),
    }


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
        for which in (0, 1) if r % 2 == 0 else (1, 0):
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
    info = {
        "cpu": cpu,
        "cores": all_cores(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }
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
    if quick:
        warmup = 1 if warmup is None else warmup
        rounds = 5 if rounds is None else rounds
    warmup = 3 if warmup is None else warmup
    if rounds is not None and rounds < 1:
        raise UserError("rounds must be ≥ 1")
    batch_sizes = tuple(int(b) for b in batch_sizes)
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError("batch sizes must be positive integers")
    thread_list = _thread_list(threads)
    providers = _providers(providers)
    from compress.deploy.signature import check_same_signature

    check_same_signature(dense_path, compressed_path, load_onnx(dense_path), load_onnx(compressed_path))
    inputs, models = _describe_models(dense_path, compressed_path)
    flop_info = _flop_info(torch_models, flops, models, inputs, seq_len, input_shapes, seed)
    flop_ratio = flop_info["dense"] / max(flop_info["compressed"], 1) if flop_info else None
    timing = {"warmup": warmup, "rounds": rounds, "budget_s": time_budget_s, "flop_ratio": flop_ratio, "seed": seed}
    rows = _ort_rows(
        (dense_path, compressed_path),
        models,
        providers,
        thread_list,
        batch_sizes,
        inputs,
        seq_len,
        input_shapes,
        spinning,
        timing,
    )
    if torch_models is not None:
        rows += _torch_rows(
            torch_models,
            inputs,
            thread_list,
            batch_sizes,
            seq_len,
            input_shapes,
            warmup,
            rounds,
            time_budget_s,
            flop_ratio,
            seed,
        )
    return {
        "dense": models["dense"],
        "compressed": models["compressed"],
        "flops": flop_info,
        "flop_ratio": flop_ratio,
        "params_ratio": models["dense"].get("params", models["dense"]["params_onnx"])
        / max(1, models["compressed"].get("params", models["compressed"]["params_onnx"])),
        "settings": {
            "batch_sizes": list(batch_sizes),
            "threads": thread_list,
            "providers": list(providers),
            "warmup": warmup,
            "rounds": rounds,
            "time_budget_s": time_budget_s,
            "seq_len": seq_len,
            "spinning": spinning,
            "interleaved": True,
            "input_shapes": {k: list(v) if not isinstance(v, int) else v for k, v in (input_shapes or {}).items()},
        },
        "machine": _machine(),
        "results": rows,
    }


def _thread_list(threads) -> list[int]:
    """Distinct intra-op thread counts in the given order; None = all cores."""
    thread_list = [all_cores() if t is None else int(t) for t in threads]
    if any(t < 1 for t in thread_list):
        raise UserError("thread counts must be ≥ 1 (None = all cores)")
    return list(dict.fromkeys(thread_list))


def _providers(providers) -> list[str]:
    """ "auto": CPU, plus CUDA where this onnxruntime has it; a given list must all be available."""
    import onnxruntime as ort

    if providers == "auto":
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.append("CUDAExecutionProvider")
    for p in providers:
        if p not in ort.get_available_providers():
            raise UserError(
                f"ONNX Runtime provider {p} is not available here ({', '.join(ort.get_available_providers())})"
            )
    return providers


def _describe_models(dense_path, compressed_path) -> tuple[list, dict]:
    """(the shared graph inputs, per model: path, file size, ONNX parameter count, inputs)."""
    protos = [load_onnx(dense_path), load_onnx(compressed_path)]
    ins = [graph_inputs(p) for p in protos]
    if [n for n, _, _ in ins[0]] != [n for n, _, _ in ins[1]]:
        raise UserError(
            f"the models' inputs differ: {dense_path} takes {[n for n, _, _ in ins[0]]}, "
            f"{compressed_path} takes {[n for n, _, _ in ins[1]]}"
        )
    models = {}
    for key, path, proto, inp in zip(("dense", "compressed"), (dense_path, compressed_path), protos, ins):
        models[key] = {
            "path": str(path),
            "file_bytes": Path(path).stat().st_size,
            "params_onnx": initializer_elements(proto),
            "inputs": {n: [d if d is not None else "?" for d in dims] for n, dims, _ in inp},
        }
    return ins[0], models


def _flop_info(torch_models, flops, models, inputs, seq_len, input_shapes, seed) -> dict | None:
    """FLOPs per sample: counted on the torch models (which also give `params`), or as given."""
    if torch_models is not None:
        from compress.structure.cost import count_flops, count_params

        feed1 = make_feed(inputs, resolve_shapes(inputs, 1, seq_len, input_shapes), seed)
        args1 = _torch_args(feed1, inputs)
        fd, fc = (count_flops(m, args1) for m in torch_models)
        for key, m in zip(("dense", "compressed"), torch_models):
            models[key]["params"] = count_params(m)
        return {"dense": fd, "compressed": fc, "per": "sample (batch 1)", "source": "torch.utils.flop_counter"}
    if flops is not None:
        fd, fc = (int(f) for f in flops)
        return {"dense": fd, "compressed": fc, "per": "sample (batch 1)", "source": "given"}
    return None


def _ort_rows(
    paths, models, providers, thread_list, batch_sizes, inputs, seq_len, input_shapes, spinning, timing
) -> list[dict]:
    """One row per (provider, threads, batch): both models timed interleaved on the same feed.
    CUDA runs once, at the last thread count (intra-op threads barely matter there)."""
    rows = []
    for provider in providers:
        tlist = thread_list if provider == "CPUExecutionProvider" else [thread_list[-1]]
        for t in tlist:
            sd, sc = (_session(p, provider, t, spinning) for p in paths)
            for b in batch_sizes:
                shapes = resolve_shapes(inputs, b, seq_len, input_shapes)
                feed = make_feed(inputs, shapes, timing["seed"])
                _first_run(sd, feed, models["dense"]["path"], shapes)
                _first_run(sc, feed, models["compressed"]["path"], shapes)
                ta, tb = _interleaved(
                    _runner(sd, feed), _runner(sc, feed), timing["warmup"], timing["rounds"], timing["budget_s"]
                )
                rows.append(
                    _row(
                        "onnxruntime",
                        provider.replace("ExecutionProvider", ""),
                        t,
                        b,
                        shapes,
                        ta,
                        tb,
                        timing["flop_ratio"],
                    )
                )
            del sd, sc
    return rows


def _runner(sess, feed):
    return lambda: sess.run(None, feed)


def _first_run(sess, feed, path, shapes) -> None:
    """One untimed run that turns a shape mismatch into an error naming the inputs."""
    try:
        sess.run(None, feed)
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"{path} does not run on inputs "
            f"{ {k: list(v) for k, v in shapes.items()} }: "
            f"{str(e).splitlines()[0][:200]}; override with input_shapes"
        ) from None


def _row(engine, provider, threads, batch, shapes, ta, tb, flop_ratio) -> dict:
    d, c = _stats(ta), _stats(tb)
    speedup = d["median_ms"] / c["median_ms"] if c["median_ms"] > 0 else float("inf")
    return {
        "engine": engine,
        "provider": provider,
        "threads": threads,
        "batch": batch,
        "input_shapes": {k: list(v) for k, v in shapes.items()},
        "dense": d,
        "compressed": c,
        "speedup": speedup,
        "flop_ratio": flop_ratio,
        "efficiency": speedup / flop_ratio if flop_ratio else None,
    }


def _torch_args(feed, inputs):
    import torch

    return tuple(torch.from_numpy(feed[n]) for n, _, _ in inputs)


def _eager(model, args):
    import torch

    def run():
        with torch.inference_mode():
            model(*args)

    return run


def _torch_rows(
    torch_models, inputs, thread_list, batch_sizes, seq_len, input_shapes, warmup, rounds, budget_s, flop_ratio, seed
) -> list[dict]:
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
                ta, tb = _interleaved(_eager(dense, args), _eager(comp, args), warmup, rounds, budget_s)
                rows.append(_row("torch", "eager", t, b, shapes, ta, tb, flop_ratio))
    finally:
        torch.set_num_threads(old)
    return rows
