"""INT8 ONNX models with ONNX Runtime's quantization tools, kept only when verified.

Why it is built this way:
* static quantization, per-channel weights, calibrated on a seeded sample of the user's own
  data: the same samples every time, so a form's INT8 file is the same for the same inputs;
* which form runs fastest (QOperator, QDQ, and dynamic for MatMul graphs, where static scales
  of attention activations can lose accuracy) depends on the CPU and the graph, so each form is
  built and *timed* against the FP32 model, interleaved, and the fastest that keeps accuracy wins
  (by a 3% margin over an earlier form in FORMS order, so noise does not flip the choice);
* accuracy is measured on held-out samples (classification: top-1 points; otherwise cosine of
  the outputs); a loss over `max_accuracy_drop` is refused and nothing is written (the file
  appears by rename only after every check passed);
* INT8 is often *slower* than FP32 on CPU (small layers, QDQ overhead): the report says so and
  recommends the FP32 file then.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np

from compress.deploy import calibration as cal
from compress.errors import UserError
from compress.files import atomic_write_with

FORMS = ("qoperator", "qdq", "dynamic")
DEFAULT_DROP = {"accuracy": 1.0, "cosine": 0.01}  # points of top-1 accuracy / cosine


def quantize_onnx(
    fp32_path,
    out_path,
    calibration,
    *,
    eval_data=None,
    max_accuracy_drop: float | None = None,
    forms=None,
    n_calibration: int = 256,
    seed: int = 0,
    batch_sizes=(1, 32),
    threads: int = 1,
    rounds: int | None = None,
    time_budget_s: float = 1.0,
    max_held_out: int = 2000,
) -> dict:
    """Quantize `fp32_path` to INT8 at `out_path`; returns a JSON-ready report.

    calibration: an .npz path (keys = ONNX input names, optional 'labels'), a dict of arrays, or
    one array. `n_calibration` samples (seeded) calibrate; held-out samples are `eval_data` (same
    forms) or, without it, the rest of `calibration`. With integer labels the check is top-1
    accuracy (drop in points), otherwise mean cosine of INT8 to FP32 outputs (drop = 1 − cosine).
    forms: subset of FORMS (default: static QOperator and QDQ, plus dynamic if the graph has MatMul).
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if n_calibration < 1:
        raise UserError(f"n_calibration must be ≥ 1, got {n_calibration}")
    inputs = cal.model_inputs(fp32_path)
    feeds, labels = cal.as_arrays(calibration, inputs)
    n = len(next(iter(feeds.values())))
    cal_idx, held_idx = cal.split(n, n_calibration, seed, max_held_out)
    if eval_data is not None:
        held, held_labels = cal.as_arrays(eval_data, inputs)
        reused = False
    else:
        reused = len(held_idx) == 0
        held_idx = cal_idx if reused else held_idx
        held, held_labels = cal.take(feeds, held_idx), None if labels is None else labels[held_idx]
    return quantize_arrays(
        fp32_path,
        out_path,
        inputs,
        cal.take(feeds, cal_idx),
        held,
        held_labels,
        max_accuracy_drop=max_accuracy_drop,
        forms=forms,
        batch_sizes=batch_sizes,
        threads=threads,
        rounds=rounds,
        time_budget_s=time_budget_s,
        extra={"calibration_indices": cal_idx.tolist(), "seed": seed, "held_out_is_calibration": reused},
    )


def quantize_arrays(
    fp32_path: Path,
    out_path: Path,
    inputs,
    cal_feeds: dict,
    held: dict,
    labels,
    *,
    max_accuracy_drop=None,
    forms=None,
    batch_sizes=(1, 32),
    threads=1,
    rounds=None,
    time_budget_s=1.0,
    extra=None,
) -> dict:
    """`quantize_onnx` once the calibration and held-out arrays are chosen (run export uses this)."""
    kind = "accuracy" if _is_labels(labels, held) else "cosine"
    limit = DEFAULT_DROP[kind] if max_accuracy_drop is None else float(max_accuracy_drop)
    if limit < 0:
        raise UserError(f"max_accuracy_drop must be ≥ 0, got {limit:g}")
    forms = list(forms) if forms is not None else _default_forms(fp32_path)
    bad = [f for f in forms if f not in FORMS]
    if bad or not forms:
        raise UserError(f"unknown quantization form(s) {bad or forms}; choose from {list(FORMS)}")
    if not out_path.parent.is_dir():
        raise UserError(f"cannot write {out_path}: directory {out_path.parent} does not exist")
    fixed = _fixed_batch(inputs)  # a model exported with a fixed batch runs (and is timed) at that batch only
    if fixed:
        batch_sizes = (fixed,)
        cal_feeds, _ = _whole_batches(cal_feeds, None, fixed, "calibration")
        held, labels = _whole_batches(held, labels, fixed, "held-out")
    fp32_out = _run(fp32_path, held, fixed or 256, threads)
    with tempfile.TemporaryDirectory(prefix=".quantize.", dir=out_path.parent) as tmp:
        tmp = Path(tmp).resolve()  # the tools run with it as working directory: absolute paths only
        src = _preprocess(fp32_path.resolve(), tmp)
        cands = {}
        for form in forms:
            path = tmp / f"{form}.onnx"
            cands[form] = {"form": form}
            try:
                _build(form, src, path, cal_feeds, fixed or 32)
                _check(path)
                got = _run(path, held, fixed or 256, threads)
            except UserError as e:
                cands[form]["error"] = str(e)
                continue
            cands[form].update(agreement(fp32_out, got, labels, kind))
            cands[form]["ok"] = cands[form]["drop"] <= limit + 1e-12
            if cands[form]["ok"]:
                cands[form]["latency"] = _latency(fp32_path, path, batch_sizes, threads, rounds, time_budget_s)
        ok = [c for c in cands.values() if c.get("ok")]
        if not ok:
            raise UserError(_refusal(fp32_path, cands, kind, limit, len(fp32_out[0])))
        best = _fastest(ok)
        atomic_write_with(out_path, lambda t: shutil.copyfile(tmp / f"{best['form']}.onnx", t))
    sizes = {"calibration_samples": len(cal_feeds[inputs[0][0]]), "held_out_samples": len(fp32_out[0])}
    return _report(fp32_path, out_path, best, cands, kind, limit, {**sizes, **(extra or {})})


def _whole_batches(feeds: dict, labels, k: int, what: str):
    n = len(next(iter(feeds.values()))) // k * k
    if n == 0:
        raise UserError(f"the model takes a fixed batch of {k}; the {what} data has fewer samples")
    return {name: a[:n] for name, a in feeds.items()}, None if labels is None else labels[:n]


def _fastest(ok: list[dict], margin: float = 0.03) -> dict:
    """The fastest form; a later one in FORMS order must win by `margin` (QOperator and QDQ often
    run the same kernels, and noise alone must not flip the choice from one export to the next)."""
    best = ok[0]
    for c in ok[1:]:
        if c["latency"]["ratio"] < best["latency"]["ratio"] * (1 - margin):
            best = c
    return best


def _is_labels(labels, held) -> bool:
    n = len(next(iter(held.values())))
    return labels is not None and labels.ndim == 1 and len(labels) == n and np.issubdtype(labels.dtype, np.integer)


def _default_forms(path: Path) -> list[str]:
    import onnx

    ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
    return ["qoperator", "qdq"] + (["dynamic"] if "MatMul" in ops else [])


def _fixed_batch(inputs) -> int | None:
    first = inputs[0][1][0] if inputs[0][1] else None
    return first if isinstance(first, int) and first > 0 else None


@contextlib.contextmanager
def _quiet(workdir: Path):
    """ORT's quantization tools print shape-inference protos, log a warning per tensor, and drop
    files into the current directory when symbolic shape inference fails (sym_shape_infer_temp.onnx
    and its weights): run them silenced, inside our temporary directory."""
    with (
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
        contextlib.chdir(workdir),
    ):
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)


def _preprocess(src: Path, tmp: Path) -> Path:
    """ORT's recommended pre-pass (shape inference + graph optimisation); the raw file when it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = tmp / "preprocessed.onnx"
    for kw in ({}, {"skip_symbolic_shape": True}):
        try:
            with _quiet(tmp):
                quant_pre_process(str(src), str(dst), **kw)
            return dst
        except Exception:  # noqa: BLE001, S112 - an optional speed-up; quantization works without it
            continue
    return src


def _build(form: str, src: Path, dst: Path, cal_feeds: dict, batch: int) -> None:
    try:
        with _quiet(dst.parent):
            _build_form(form, src, dst, cal_feeds, batch)
    except Exception as e:  # noqa: BLE001 - ORT's tools raise anything; the form is skipped with the reason
        raise UserError(f"{form}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from None


def _build_form(form: str, src: Path, dst: Path, cal_feeds: dict, batch: int) -> None:
    """Static: U8 activations (asymmetric), S8 per-channel weights (symmetric), the x86 fast path.
    Dynamic: MatMul/Gemm weights only, activation scales computed per batch at run time."""
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if form == "dynamic":
        quantize_dynamic(
            str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"]
        )
        return
    fmt = QuantFormat.QOperator if form == "qoperator" else QuantFormat.QDQ
    quantize_static(
        str(src),
        str(dst),
        cal.reader(cal_feeds, batch),
        quant_format=fmt,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"onnx.checker rejects the INT8 model: {str(e).splitlines()[0][:200]}") from None


def _run(path: Path, feeds: dict, batch: int, threads: int) -> list[np.ndarray]:
    """First output on every sample, in batches (so big held-out sets fit in memory)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        outs = [sess.run(None, b)[0] for b in cal.batches(feeds, batch)]
    except Exception as e:  # noqa: BLE001
        raise UserError(f"ONNX Runtime cannot run {path.name} on the data: {str(e).splitlines()[0][:200]}") from None
    return [np.concatenate(outs)]


def agreement(ref: list[np.ndarray], got: list[np.ndarray], labels, kind: str) -> dict:
    """Output differences and the accuracy (points) or cosine the INT8 model keeps."""
    a, b = ref[0].astype(np.float64), got[0].astype(np.float64)
    d = np.abs(a - b)
    out = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean())}
    fa, fb = a.reshape(len(a), -1), b.reshape(len(b), -1)
    cos = (fa * fb).sum(1) / np.maximum(np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1), 1e-12)
    out.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()))
    if kind == "accuracy":
        acc_a = float((fa.argmax(1) == labels).mean() * 100)
        acc_b = float((fb.argmax(1) == labels).mean() * 100)
        out.update(fp32_accuracy=acc_a, int8_accuracy=acc_b, drop=acc_a - acc_b)
    else:
        out["drop"] = 1.0 - out["cosine_mean"]
    return out


def _latency(fp32: Path, int8: Path, batch_sizes, threads: int, rounds, budget_s: float) -> dict:
    """INT8 vs FP32 medians, interleaved in one process; ratio = geometric mean of int8/fp32 over batches."""
    from compress.deploy.bench import benchmark

    kw = {
        "batch_sizes": tuple(batch_sizes),
        "threads": (threads,),
        "providers": ["CPUExecutionProvider"],
        "time_budget_s": budget_s,
    }
    if rounds is not None:
        kw["rounds"] = rounds
    rep = benchmark(str(fp32), str(int8), **kw)
    by = {
        str(r["batch"]): {"fp32_ms": r["dense"]["median_ms"], "int8_ms": r["compressed"]["median_ms"]}
        for r in rep["results"]
        if r["engine"] == "onnxruntime"
    }
    ratios = [v["int8_ms"] / v["fp32_ms"] for v in by.values()]
    return {"threads": threads, "by_batch": by, "ratio": math.exp(sum(map(math.log, ratios)) / len(ratios))}


def _refusal(fp32_path: Path, cands: dict, kind: str, limit: float, n: int) -> str:
    built = [c for c in cands.values() if "drop" in c]
    if not built:
        errs = "; ".join(c["error"] for c in cands.values())
        return f"quantization of {fp32_path.name} failed in every form ({errs}); nothing written"
    c = min(built, key=lambda c: c["drop"])
    if kind == "accuracy":
        what = f"loses {c['drop']:.2f} accuracy points ({c['fp32_accuracy']:.2f}% → {c['int8_accuracy']:.2f}%)"
        lim = f"{limit:g} point{'' if limit == 1 else 's'}"
    else:
        what, lim = f"keeps only {c['cosine_mean']:.4f} cosine to FP32", f"a drop of {limit:g}"
    return (
        f"INT8 {fp32_path.name} ({c['form']}, the best form) {what} on {n} held-out samples, more than "
        f"the allowed {lim} (max_accuracy_drop); nothing written"
    )


def _report(fp32: Path, out: Path, best: dict, cands: dict, kind, limit, extra: dict) -> dict:
    slower = {b: v for b, v in best["latency"]["by_batch"].items() if v["int8_ms"] >= v["fp32_ms"]}
    faster = not slower  # recommended only if it is not slower at any measured batch size
    note = (
        "INT8 is faster than FP32 here"
        if not slower
        else "INT8 is SLOWER than FP32 on this CPU at batch "
        + ", ".join(f"{b} ({v['int8_ms']:.3f} vs {v['fp32_ms']:.3f} ms)" for b, v in slower.items())
        + f"; the FP32 file {fp32.name} stays the recommended one"
    )
    keep = {k: v for k, v in best.items() if k not in ("ok", "form", "latency")}
    return {
        "fp32": str(fp32),
        "int8": str(out),
        "form": best["form"],
        "kind": kind,
        "max_accuracy_drop": limit,
        **keep,
        "latency": best["latency"],
        "int8_faster": faster,
        "recommended": str(out if faster else fp32),
        "note": note,
        "recommended_by_batch": {b: str(fp32 if b in slower else out) for b in best["latency"]["by_batch"]},
        "candidates": {f: {k: v for k, v in c.items() if k != "form"} for f, c in cands.items()},
        **extra,
    }
