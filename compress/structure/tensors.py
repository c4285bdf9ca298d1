"""Example inputs and model outputs of any form (tensor, tuple, dict, ModelOutput) as flat lists."""
from __future__ import annotations

import torch


def flatten_tensors(out) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output: tensor, tuple/list, dict or ModelOutput."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flatten_tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_tensors(v)]
    return []


def as_args(example_inputs):
    if isinstance(example_inputs, dict):
        return (), example_inputs
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}
