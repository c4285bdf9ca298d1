"""Why an ONNX export failed, in words a user can act on: the unsupported operator and the
module whose forward calls it, instead of a page of exporter traceback."""

from __future__ import annotations

import contextlib
import re

import torch

from compress.errors import UserError


def one_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message, colours stripped."""
    msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def export_error(model, inputs, device, opset, errors) -> UserError:
    """The error to raise when every exporter in `errors` [(name, exception)] failed."""
    for _, e in errors:
        op = _unsupported_op(e)
        if op:
            where = _op_module(model, inputs, device, op)
            loc = f" in module {where}" if where else ""
            return UserError(
                f"cannot export to ONNX: operator {op}{loc} is not supported at opset {opset} "
                f"by {' or '.join(n for n, _ in errors)} exporter; replace it with supported ops "
                f"or try a newer `opset`",
                fields=("opset",),
            )
    detail = "; ".join(f"{n}: {one_line(e)}" for n, e in errors)
    err = UserError(f"ONNX export failed ({detail})")
    err.__cause__ = errors[-1][1]
    return err


def _unsupported_op(err: BaseException) -> str | None:
    """Operator named by either exporter's 'not supported' error, walking the cause chain."""
    e: BaseException | None = err
    while e is not None:
        msg = str(e)
        m = re.search(r"operator '([\w:.]+)'.*not supported", msg) or re.search(r"OpOverload\(op='([\w.]+)'", msg)
        if m:
            return m.group(1).replace("aten.", "aten::")
        e = e.__cause__ or e.__context__
    return None


def _op_norm(s: str) -> str:
    return s.split("::")[-1].split(".")[0].strip("_").lower()


def _op_module(model, inputs, device, op: str) -> str | None:
    """Name of the innermost module whose forward calls `op` (e.g. 'aten::linalg_svd'),
    found by running the model once with hooks and a torch-function/dispatch recorder."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    want = _op_norm(op)
    stack: list[str] = []
    found: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def hit(name: str):
        if not found and _op_norm(name) == want:
            found.append(stack[-1] if stack else "")

    class Fn(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            hit(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    class Disp(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            hit(func._schema.name)
            return func(*args, **(kwargs or {}))

    def pre(m, _):
        stack.append(names.get(m, ""))

    def post(m, _, __):  # returns None: a hook's return value would replace the output
        stack.pop()

    hooks = [m.register_forward_pre_hook(pre) for m in model.modules()]
    hooks += [m.register_forward_hook(post) for m in model.modules()]
    try:  # only a hint for the message: a failing forward leaves it out
        with torch.no_grad(), Fn(), Disp(), contextlib.suppress(Exception):
            model(*[x.to(device) for x in inputs])
    finally:
        for h in hooks:
            h.remove()
    if not found:
        return None
    name = found[0]
    sub = model.get_submodule(name) if name else model
    return f"{name or '<top level>'} ({type(sub).__name__})"
