"""OTO (only-train-once 3.0.1) HESSO as a peer — benchmark only, never a toolkit dependency.

OTO 3.0.1 does not import on torch 2.13 as published. `oto_patched()` applies three
runtime patches for the duration of the run only (the installed package is untouched):
1. `torch.onnx._globals` was removed: register a module of that name whose `GLOBALS`
   is the TorchScript exporter's `GLOBALS`;
2. `torch.onnx._optimize_graph` moved: alias it to the TorchScript exporter's;
3. HESSO calls `.cuda()` on bookkeeping tensors: on a CPU-only torch `Tensor.cuda`
   returns the tensor itself.
The compressed subnet OTO writes is a pickled module; we load only the file this run
just wrote into a fresh temporary directory.
"""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import types
from pathlib import Path

import torch

PATCHES = [
    "torch.onnx._globals registered as an alias of the TorchScript exporter's _globals",
    "torch.onnx._optimize_graph aliased to torch.onnx._internal.torchscript_exporter.utils._optimize_graph",
    "Tensor.cuda made the identity on CPU-only torch (HESSO moves bookkeeping tensors to CUDA)",
]


@contextlib.contextmanager
def oto_patched():
    """Make `import only_train_once` and HESSO work on torch 2.13 CPU for the block's duration."""
    import torch.onnx
    from torch.onnx._internal.torchscript_exporter import _globals as ts_globals
    from torch.onnx._internal.torchscript_exporter import utils as ts_utils

    name = "torch.onnx._globals"
    added_module = name not in sys.modules
    if added_module:
        mod = types.ModuleType(name)
        mod.GLOBALS = ts_globals.GLOBALS
        sys.modules[name] = mod
    missing = object()
    old_opt = getattr(torch.onnx, "_optimize_graph", missing)
    torch.onnx._optimize_graph = ts_utils._optimize_graph
    old_cuda = torch.Tensor.cuda
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = old_cuda
        if old_opt is missing:
            del torch.onnx._optimize_graph
        else:
            torch.onnx._optimize_graph = old_opt
        if added_module:
            sys.modules.pop(name, None)


def available() -> str | None:
    """None when OTO imports (with the patches), else why not."""
    try:
        with oto_patched(), contextlib.redirect_stdout(io.StringIO()):
            import only_train_once  # noqa: F401
    except Exception as e:  # noqa: BLE001 — reported in the table's notes
        return f"{type(e).__name__}: {e}"
    return None


def hesso_train(
    model: torch.nn.Module,
    example,
    batches,
    epochs: int,
    steps_per_epoch: int,
    lr: float,
    target_group_sparsity: float,
    loss_fn,
    lr_at,
    train_loop,
) -> tuple[torch.nn.Module, dict]:
    """HESSO (AdamW variant) from the dense `model`; returns OTO's compressed subnet and stats.

    Pruning schedule as in OTO's tutorials: start after 10% of the steps, prune in 10
    periods over the next 50%, train the rest with the pruned groups held at zero.
    """
    total = epochs * steps_per_epoch
    with oto_patched(), contextlib.redirect_stdout(io.StringIO()) as log:
        from only_train_once import OTO

        oto = OTO(model=model, dummy_input=example)
        opt = oto.hesso(
            variant="adamw",
            lr=lr,
            target_group_sparsity=target_group_sparsity,
            start_pruning_step=max(1, total // 10),
            pruning_steps=max(1, total // 2),
            pruning_periods=min(10, max(1, total // 2)),
        )
        losses = train_loop(model, batches, epochs, opt, lr_at, loss_fn)
        group_sparsity = opt.compute_group_sparsity_param_norm()[0]
        with tempfile.TemporaryDirectory(prefix="oto-") as tmp:
            oto.construct_subnet(out_dir=tmp)
            path = Path(oto.compressed_model_path)
            if Path(tmp) not in path.parents:
                raise RuntimeError(f"OTO wrote its subnet outside the run's directory: {path}")
            sub = torch.load(path, weights_only=False)  # a pickle this run just wrote
    sub.eval()
    return sub, {"train_losses": losses, "group_sparsity": float(group_sparsity), "oto_log_tail": log.getvalue()[-500:]}
