"""An ONNX file's inputs for a benchmark: the graph read without its weights, the real inputs (name,
dims, dtype), concrete shapes for each batch size and sequence length, and random feeds every model accepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.errors import UserError


def load_onnx(path) -> object:
    import onnx

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 — protobuf raises several types
        raise UserError(f"{path} is not a valid ONNX model ({type(e).__name__})") from None


def initializer_elements(proto) -> int:
    return int(sum(int(np.prod(t.dims)) if len(t.dims) else 1 for t in proto.graph.initializer))


def graph_inputs(proto) -> list[tuple[str, list, np.dtype]]:
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
            raise UserError(
                f"input_shapes names {k!r}, which is neither an input ({', '.join(sorted(names))}) "
                "nor a symbolic dimension given as an int"
            )
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
