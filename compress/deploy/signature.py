"""Do two ONNX files compute the same kind of thing? A latency comparison of models with different
inputs or outputs (another head, another resolution) reports a speedup that means nothing, so
`benchmark` compares their signatures first: the same number of inputs and outputs, element types
and every dimension except symbolic ones (the batch, a sequence length)."""

from __future__ import annotations

from pathlib import Path

from compress.errors import UserError


def signature(proto) -> dict[str, list[tuple[str, str, tuple]]]:
    """{"inputs"/"outputs": [(name, element type, dims)]}; a symbolic or unknown dim is None."""
    from onnx.helper import tensor_dtype_to_np_dtype

    inits = {t.name for t in proto.graph.initializer}

    def describe(values):
        out = []
        for v in values:
            if v.name in inits:
                continue
            tt = v.type.tensor_type
            dtype = str(tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else "?"
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
            out.append((v.name, dtype, dims))
        return out

    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output)}


def check_same_signature(a_path, b_path, a_proto, b_proto) -> None:
    """UserError naming the first difference between the two models' inputs or outputs."""
    a, b = signature(a_proto), signature(b_proto)
    a_name, b_name = Path(a_path).name, Path(b_path).name
    for kind in ("inputs", "outputs"):
        if len(a[kind]) != len(b[kind]):
            raise UserError(
                f"{a_name} has {len(a[kind])} {kind} and {b_name} {len(b[kind])}: the two models do "
                "not compute the same thing, so their latencies cannot be compared"
            )
        for i, ((_, ta, da), (_, tb, db)) in enumerate(zip(a[kind], b[kind])):
            same_dims = len(da) == len(db) and all(x is None or y is None or x == y for x, y in zip(da, db))
            if ta != tb or not same_dims:
                raise UserError(
                    f"{kind[:-1]} {i} of {a_name} is {_text(ta, da)} but of {b_name} {_text(tb, db)}: "
                    "the two models do not compute the same thing, so their latencies cannot be "
                    "compared"
                )


def _text(dtype: str, dims: tuple) -> str:
    return f"{dtype}[{', '.join('?' if d is None else str(d) for d in dims)}]"
