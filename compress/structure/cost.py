"""Parameter and FLOP counts of a model, measured with torch's own flop counter."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from compress.structure.tensors import call_model


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: torch.nn.Module, example_inputs) -> int:
    """FLOPs of one forward pass on `example_inputs` of any form (torch.utils.flop_counter; a multiply-add is 2)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call_model(model, example_inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
