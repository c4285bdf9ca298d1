"""Torch-Pruning peers, run the way its documentation shows.

* magnitude: `MagnitudePruner` + `GroupMagnitudeImportance(p=2)` (group L2 norm), global
  ranking, many small iterative steps until the FLOP target is met, then fine-tuning.
* regularized: `GroupNormPruner` (group-norm regularization, `pruner.regularize(model)`
  after every backward) for sparse training, then the same iterative pruning to the
  target, then fine-tuning.

Both prune by FLOP target, measured with our `count_flops` after every step, so the
peer lands where we ask it to (we give it the target; ours has to find it through λ).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch_pruning as tp

from compress.structure.cost import count_flops


def prune_to_flops(
    model: torch.nn.Module,
    pruner,
    example,
    target_fraction: float,
    steps: int,
    after_step: Callable[[torch.nn.Module], None] | None = None,
) -> dict:
    """Step the (iterative) pruner until FLOPs ≤ target_fraction · dense; returns what was reached.

    The pruner's schedule must reach its final ratio at `steps`; we stop at the first step
    under the target (the last step overshoots by at most one small step).
    """
    dense = count_flops(model, example)
    flops, done = dense, 0
    for done in range(1, steps + 1):  # noqa: B007 - the last value is reported
        pruner.step()
        if after_step is not None:
            after_step(model)
        flops = count_flops(model, example)
        if flops <= target_fraction * dense:
            break
    return {"pruning_steps": done, "flop_fraction": flops / dense, "target_met": flops <= target_fraction * dense}


def make_pruner(kind: str, model, example, ignored_layers, steps: int, max_ratio: float, reg: float = 0.0, **kw):
    """A global, iterative Torch-Pruning pruner with group-L2 importance."""
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    common = dict(
        importance=imp,
        global_pruning=True,
        pruning_ratio=max_ratio,
        iterative_steps=steps,
        ignored_layers=list(ignored_layers),
        max_pruning_ratio=max_ratio,
        **kw,
    )
    if kind == "magnitude":
        return tp.pruner.MagnitudePruner(model, example, **common)
    if kind == "regularized":
        return tp.pruner.GroupNormPruner(model, example, reg=reg, **common)
    raise ValueError(kind)
