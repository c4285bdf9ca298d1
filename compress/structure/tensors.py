"""Example inputs and model outputs of any form, handled one way everywhere.

An example input (and a batch's inputs) is a tensor (one positional argument), a tuple or
list (positional arguments) or a dict (keyword arguments); `as_args` is the one place that
says so, and calling a model, moving inputs and exporting all go through it. A model output
is a tensor, a tuple/list, a dict or a ModelOutput; `flatten_tensors` lists its tensors.
"""

from __future__ import annotations

import torch

from compress.errors import UserError


def as_args(example_inputs) -> tuple[tuple, dict]:
    """(positional args, keyword args) of a forward call on `example_inputs`."""
    if isinstance(example_inputs, dict):
        return (), example_inputs
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def positional_args(example_inputs, what: str = "example_inputs") -> tuple:
    """The positional args only (ONNX export and ONNX Runtime feed inputs by position)."""
    args, kwargs = as_args(example_inputs)
    if kwargs:
        raise UserError(f"{what} must be a tensor or a tuple of tensors")
    return args


def call_model(model, example_inputs):
    """`model` called on inputs of any form (see `as_args`)."""
    args, kwargs = as_args(example_inputs)
    return model(*args, **kwargs)


def to_device(x, device):
    """Every tensor in `x` (nested tuples, lists, dicts) moved to `device`; the rest as is."""
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def flatten_tensors(out) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output: tensor, tuple/list, dict or ModelOutput."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_tensors(v)]
    return []
