"""Calibration and held-out data for INT8 quantization: read, check against the model, split.

Why a module of its own: a bad calibration file must fail here, with one line that names the
problem, before any quantized file exists; and the samples picked must be the same every time
(seeded choice, sorted), so the same inputs give the same INT8 model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.errors import UserError

LABEL_KEYS = ("labels", "label", "y", "targets")
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


def model_inputs(onnx_path) -> list[tuple[str, list, type]]:
    """(name, shape with None/str for free dims, numpy dtype) of an ONNX model's inputs, as ORT sees them."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises several types for unreadable files
        raise UserError(f"ONNX Runtime cannot load {onnx_path}: {str(e).splitlines()[0][:200]}") from None
    out = []
    for i in sess.get_inputs():
        if i.type not in _ORT_DTYPES:
            raise UserError(f"{onnx_path}: input {i.name} has type {i.type}, which quantization here does not handle")
        out.append((i.name, list(i.shape), _ORT_DTYPES[i.type]))
    return out


def read_npz(path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - zipfile, pickle refusal, truncated data: all "unreadable"
        raise UserError(f"calibration file {path} is not a readable .npz archive ({type(e).__name__})") from None


def as_arrays(source, inputs) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Inputs by name (+ labels if given) from an .npz path, a dict of arrays, or one array (one-input models)."""
    if isinstance(source, (str, Path)):
        arrays, where = read_npz(source), str(source)
    elif isinstance(source, dict):
        arrays, where = {k: np.asarray(v) for k, v in source.items()}, "calibration data"
    elif isinstance(source, np.ndarray) or hasattr(source, "__array__"):
        arrays, where = {inputs[0][0]: np.asarray(source)}, "calibration data"
    else:
        raise UserError(f"calibration must be an .npz path, a dict of arrays or an array, not {type(source).__name__}")
    labels = next((arrays.pop(k) for k in LABEL_KEYS if k in arrays), None)
    names = [n for n, _, _ in inputs]
    if len(names) == 1 and names[0] not in arrays and len(arrays) == 1:
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UserError(
            f"{where} lacks the model input(s) {missing}; it has {sorted(arrays)} "
            f"(keys must be the ONNX input names, plus optional 'labels')"
        )
    feeds = {n: _checked(arrays[n], n, shape, dt, where) for n, shape, dt in inputs}
    sizes = {len(a) for a in feeds.values()} | ({len(labels)} if labels is not None else set())
    if len(sizes) != 1:
        raise UserError(f"{where}: inputs and labels disagree on the number of samples ({sorted(sizes)})")
    if labels is not None and labels.ndim == 0:
        raise UserError(f"{where}: labels must be an array with one entry per sample")
    return feeds, labels


def _checked(a: np.ndarray, name: str, shape: list, dt, where: str) -> np.ndarray:
    if a.ndim != len(shape) or a.ndim == 0:
        raise UserError(f"{where}: input {name} has shape {list(a.shape)}, the model takes rank {len(shape)} {shape}")
    for i, (got, want) in enumerate(zip(a.shape[1:], shape[1:]), start=1):
        if isinstance(want, int) and want > 0 and got != want:
            raise UserError(f"{where}: input {name} has shape {list(a.shape)}, the model takes {shape} (axis {i})")
    if len(a) == 0:
        raise UserError(f"{where}: input {name} has no samples")
    kind_ok = (
        (np.issubdtype(a.dtype, np.floating) and np.issubdtype(dt, np.floating))
        or (np.issubdtype(a.dtype, np.integer) and np.issubdtype(dt, np.integer))
        or a.dtype == dt
    )
    if not kind_ok:
        raise UserError(f"{where}: input {name} is {a.dtype}, the model takes {np.dtype(dt).name}")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise UserError(f"{where}: input {name} contains NaN or infinite values")
    return np.ascontiguousarray(a.astype(dt, copy=False))


def split(n: int, n_calibration: int, seed: int, max_held_out: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, sorted calibration indices and the rest as held-out (all samples when none is left)."""
    rng = np.random.default_rng(seed)
    cal = np.sort(rng.choice(n, size=min(n, n_calibration), replace=False))
    rest = np.setdiff1d(np.arange(n), cal)
    if max_held_out is not None and len(rest) > max_held_out:
        rest = np.sort(rng.choice(rest, size=max_held_out, replace=False))
    return cal, rest


def take(feeds: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[idx] for k, v in feeds.items()}


def batches(feeds: dict[str, np.ndarray], size: int):
    n = len(next(iter(feeds.values())))
    for s in range(0, n, size):
        yield {k: v[s : s + size] for k, v in feeds.items()}


def reader(feeds: dict[str, np.ndarray], size: int):
    """An ORT CalibrationDataReader over fixed batches (rewindable: ORT may read twice)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = batches(feeds, size)

    return _Reader()


def dataset_arrays(dataset, idx, input_names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Items `idx` of a torch Dataset of (inputs, target) pairs, as ONNX feeds and a target array."""
    import torch

    from compress.train.data import split_batch

    x, y = split_batch(torch.utils.data.default_collate([dataset[int(i)] for i in idx]))
    xs = [x[k] for k in input_names] if isinstance(x, dict) else list(x) if isinstance(x, (tuple, list)) else [x]
    if len(xs) != len(input_names):
        raise UserError(f"the data gives {len(xs)} inputs, the ONNX model takes {len(input_names)}")
    return {n: t.detach().cpu().numpy() for n, t in zip(input_names, xs)}, torch.as_tensor(y).cpu().numpy()
