"""Parameter and FLOP counts of a model, measured with torch's own flop counter."""

from __future__ import annotations

import contextlib
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from compress.structure.tensors import call_model


def _sdpa_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """softmax(q kᵀ) v: 2·L·S·d for q kᵀ plus 2·L·S·dv for the product with v, per batch and head."""
    lead, (lq, d), s, dv = math.prod(q[:-2]), q[-2:], k[-2], v[-1]
    return 2 * lead * lq * s * d + 2 * lead * lq * s * dv


# torch's counter has no entry for the CPU kernel of F.scaled_dot_product_attention: it counted 0.
ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


@contextlib.contextmanager
def counted_attention():
    """nn.MultiheadAttention's eval fast path is one fused op the counter does not see (0 FLOPs):
    count with it off, so MHA runs its projections and attention as countable ops."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: torch.nn.Module, example_inputs) -> int:
    """FLOPs of one forward pass on `example_inputs` of any form (torch.utils.flop_counter; a multiply-add is 2)."""
    was_training = model.training
    model.eval()
    try:
        with (
            torch.no_grad(),
            counted_attention(),
            FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS) as counter,
        ):
            call_model(model, example_inputs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
