"""Training on one entry of a model's output: a dict or Hugging Face ModelOutput (`logits`, or a key the
user names) or a tuple (an index). A forward hook does the selection, so the model keeps its class and
parameter names (checkpoints, `init` weights and groups are unchanged) and a deep copy — extraction's —
keeps it too; tracing for groups and ONNX export sees the selected tensor."""

from __future__ import annotations

import torch

from compress.errors import UserError


def pick_output(out, key: str):
    """`out[key]` of a dict output, `out[int(key)]` of a tuple; UserError naming what there is."""
    if isinstance(out, dict):
        if key not in out:
            raise UserError(
                f"`output` {key!r} is not among the model's outputs: {', '.join(map(str, out))}", field="output"
            )
        value = out[key]
    else:
        try:
            value = out[int(key)]
        except (ValueError, IndexError):
            raise UserError(
                f"`output` must be an index 0..{len(out) - 1} for a model returning a tuple, got {key!r}",
                field="output",
            ) from None
    if not torch.is_tensor(value):
        raise UserError(f"the model's output {key!r} is a {type(value).__name__}, not a tensor", field="output")
    return value


def _hook(module, args, out):
    return pick_output(out, module._compress_output) if not torch.is_tensor(out) else out


def select_output(model: torch.nn.Module, key: str | None) -> torch.nn.Module:
    """Make `model(x)` return the entry `key` of its output (no-op for None; idempotent)."""
    if key is None or getattr(model, "_compress_output", None) is not None:
        return model
    model._compress_output = key
    model.register_forward_hook(_hook)
    return model
